"""CNN building blocks with hand-written backprop, vectorised over the batch.

Every layer has ``forward``/``backward`` on the public layout (images NCHW, vectors
(N, D)) and ``_forward``/``_backward`` on the internal layout the model chains (images
(C, H, W, N), batch innermost; see :mod:`gpucnn.array.im2col`). ``forward`` caches exactly
what ``backward`` needs; ``backward`` returns the gradient with respect to the input and
fills ``grads`` for the layer's parameters. Gradients are of the quantity being
*minimised* (the loss, i.e. minus the lecture's log-likelihood J); see docs/lecture.md.

No layer imports numpy or cupy: the array module comes from the arrays themselves.
"""

from __future__ import annotations

import math
from typing import Any

from gpucnn.array.backend import Array, Backend, Random, array_module
from gpucnn.array.conv import conv_forward, conv_geometry, conv_input_grad, conv_weight_grad
from gpucnn.array.im2col import (
    internal_to_nchw,
    nchw_to_internal,
    output_size,
    pad_internal,
    unpad_internal,
)
from gpucnn.array.pointwise import logistic, relu, relu_backward
from gpucnn.array.pooling import (
    max_pool,
    max_pool_backward,
    spread_pool_grad,
    sum_pool,
)

INITS = ("he", "glorot")
CONV_MODES = ("convolution", "cross_correlation")
POOL_KINDS = ("max", "l2", "avg")
# "F_channels_first": what "F" meant before checkpoint format 2 (the channel index
# fastest); kept so that older checkpoints compute what they were trained to.
FLATTEN_ORDERS = {
    "F": "F",
    "C": "C",
    "column_major": "F",
    "row_major": "C",
    "F_channels_first": "F_channels_first",
}


def _pair(value: Any, what: str, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        a, b = pair
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in (a, b))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{what} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(a), int(b)


def _count(value: Any, what: str) -> int:
    """A single int >= 1 (a number of channels or features)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return value


def _choice(value: Any, allowed: Any, what: str) -> Any:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not known; allowed: {', '.join(map(str, allowed))}")
    return value


class Layer:
    """Base class. ``image_in``/``image_out`` say whether the input/output is an image."""

    type = "layer"  # the name in LAYER_TYPES and the "type" of the layer's config
    image_in = False
    image_out = False
    elementwise = False  # layout-agnostic (activations): works on images and vectors alike

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.decayed: tuple[str, ...] = ()  # parameters under L2 regularisation
        self.in_shape: tuple[int, ...] | None = None
        self.out_shape: tuple[int, ...] | None = None

    # -- building -------------------------------------------------------------------
    def build(
        self, in_shape: tuple[int, ...], backend: Backend, rng: Random, dtype: Any
    ) -> tuple[int, ...]:
        """Create parameters for inputs of shape ``in_shape`` (no batch axis); return the
        output shape. ``in_shape`` is (C, H, W) for images, (D,) for vectors."""
        if self.elementwise:
            pass  # any shape
        elif self.image_in and len(in_shape) != 3:
            raise ValueError(
                f"{self.describe()} needs image input (C, H, W), got shape {tuple(in_shape)}; "
                "image layers must come before Flatten"
            )
        elif not self.image_in and len(in_shape) != 1:
            raise ValueError(
                f"{self.describe()} needs flat input (D,), got shape {tuple(in_shape)}; "
                "add a Flatten layer before it"
            )
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = self._build(self.in_shape, backend, rng, dtype)
        return self.out_shape

    def _build(self, in_shape: tuple[int, ...], backend: Backend, rng: Random, dtype: Any):
        return in_shape

    def describe(self) -> str:
        return self.name or type(self).__name__

    def config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild the layer (used by checkpoints)."""
        return {"type": self.type, "name": self.name}

    def set_param(self, key: str, value: Array) -> None:
        """Replace parameter ``key`` in place, checking the shape."""
        if key not in self.params:
            raise KeyError(
                f"{self.describe()} has no parameter {key!r}; it has {list(self.params)}"
            )
        current = self.params[key]
        xp = array_module(current)
        value = xp.asarray(value)
        if value.shape != current.shape:
            raise ValueError(
                f"{self.describe()}.{key} must have shape {current.shape}, got {value.shape}"
            )
        current[...] = value

    # -- public layout --------------------------------------------------------------
    def columns_per_sample(self) -> int:
        """Numbers per sample of the im2col matrix this layer's forward pass unfolds (0:
        none); see Sequential.column_bytes_per_sample."""
        return 0

    def forward(self, x: Array) -> Array:
        """Forward on the public layout (images NCHW, vectors (N, D))."""
        if self.in_shape is None:
            raise RuntimeError(f"{self.describe()} is not built; call build() or use Sequential")
        if self.image_in and not self.elementwise:
            x = nchw_to_internal(x)
        y = self._forward(x)
        return internal_to_nchw(y) if self.image_out and not self.elementwise else y

    def backward(self, grad_out: Array) -> Array:
        """Backward on the public layout; returns dL/dinput and fills ``grads``."""
        if self.image_out and not self.elementwise:
            grad_out = nchw_to_internal(grad_out)
        grad_in = self._backward(grad_out)
        return internal_to_nchw(grad_in) if self.image_in and not self.elementwise else grad_in

    # -- internal layout (what Sequential chains) -------------------------------------
    def _forward(self, x: Array) -> Array:
        raise NotImplementedError

    def _backward(self, grad_out: Array, need_input_grad: bool = True) -> Array | None:
        raise NotImplementedError


def _init_weight(
    init: str, shape: tuple[int, ...], fan_in: int, fan_out: int, rng: Random, dtype: Any
) -> Array:
    """Seeded He (normal, std sqrt(2/fan_in)) or Glorot (uniform, +-sqrt(6/(in+out)))."""
    if init == "he":
        return rng.normal(shape, math.sqrt(2.0 / fan_in), dtype)
    return rng.uniform(shape, math.sqrt(6.0 / (fan_in + fan_out)), dtype)


class Conv2D(Layer):
    """P kernels of KH x KW over C channels, plus an optional bias per kernel.

    ``mode='convolution'`` (default) is true convolution as in the lecture: the kernel is
    flipped in both spatial axes before sliding, F[a,b] = sum_ij X[a+i, b+j] K[KH-1-i,
    KW-1-j] (per channel, summed over channels). ``'cross_correlation'`` slides K as is.
    ``padding``: 'valid' (default), 'same' (output = ceil(input / stride), extra odd
    padding at the bottom/right), an int, (ph, pw), or (top, bottom, left, right).
    Weight shape (P, C, KH, KW); bias shape (P,).
    """

    type = "conv"
    image_in = True
    image_out = True

    def __init__(
        self,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, ...] = "valid",
        mode: str = "convolution",
        bias: bool = True,
        init: str = "he",
        in_channels: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.out_channels = _count(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.mode = _choice(mode, CONV_MODES, "conv mode")
        self.bias = bool(bias)
        self.init = _choice(init, INITS, "init")
        self.in_channels = in_channels
        self.padding = self._check_padding(padding)
        self._cache: tuple[Any, ...] | None = None

    @staticmethod
    def _check_padding(padding: Any) -> Any:
        if isinstance(padding, str):
            return _choice(padding, ("valid", "same"), "padding")
        if isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
            return (padding,) * 4
        if isinstance(padding, (tuple, list)) and len(padding) in (2, 4):
            if all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding):
                p = tuple(padding)
                return (p[0], p[0], p[1], p[1]) if len(p) == 2 else p
        raise ValueError(
            f"padding {padding!r} is not allowed; use 'valid', 'same', an int >= 0, "
            "(ph, pw) or (top, bottom, left, right)"
        )

    def _pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for size, k, s in (
                (h, self.kernel_size[0], self.stride[0]),
                (w, self.kernel_size[1], self.stride[1]),
            ):
                out = -(-size // s)
                total = max((out - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            return tuple(pads)  # type: ignore[return-value]
        return self.padding

    def _build(self, in_shape, backend, rng, dtype):
        c, h, w = in_shape
        if self.in_channels is not None and self.in_channels != c:
            raise ValueError(
                f"{self.describe()} expects {self.in_channels} input channels, got input "
                f"shape {in_shape}"
            )
        self.in_channels = c
        kh, kw = self.kernel_size
        self.pads = self._pads(h, w)
        top, bottom, left, right = self.pads
        hp, wp = h + top + bottom, w + left + right
        if kh > hp or kw > wp:
            raise ValueError(
                f"{self.describe()}: kernel {kh}x{kw} is larger than its padded input "
                f"{hp}x{wp} (input C,H,W = {in_shape}, padding {self.pads})"
            )
        p = self.out_channels
        self.params["weight"] = _init_weight(
            self.init, (p, c, kh, kw), c * kh * kw, p * kh * kw, rng, dtype
        )
        self.decayed = ("weight",)
        if self.bias:
            self.params["bias"] = backend.zeros((p,), dtype)
        return (p, output_size(hp, kh, self.stride[0]), output_size(wp, kw, self.stride[1]))

    def _forward(self, x: Array) -> Array:
        # True convolution flips the kernel: the array layer reads the windows or the
        # kernels flipped, so the weights are used as stored.
        x_padded = pad_internal(x, self.pads)
        kmat = self.params["weight"].reshape(self.out_channels, -1)  # (P, C*KH*KW), a view
        geometry = conv_geometry(
            x_padded, kmat, self.kernel_size, self.stride, self.mode == "convolution"
        )
        bias = self.params["bias"] if self.bias else None
        out, saved = conv_forward(x_padded, kmat, bias, geometry)
        self._cache = (geometry, saved)
        return out

    def _backward(self, grad_out: Array, need_input_grad: bool = True) -> Array | None:
        geometry, saved = self._cache
        weight = self.params["weight"]
        grad_weight, grad_bias = conv_weight_grad(saved, grad_out, geometry, self.bias)
        self.grads["weight"] = grad_weight.reshape(weight.shape)
        if self.bias:
            self.grads["bias"] = grad_bias
        if not need_input_grad:
            return None
        grad_padded = conv_input_grad(weight.reshape(self.out_channels, -1), grad_out, geometry)
        return unpad_internal(grad_padded, self.pads)

    def columns_per_sample(self) -> int:
        """C*KH*KW numbers for each of its OH*OW outputs."""
        return self.in_shape[0] * math.prod(self.kernel_size) * math.prod(self.out_shape[1:])

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "mode": self.mode,
            "bias": self.bias,
            "init": self.init,
            "in_channels": self.in_channels,
        }


class Pool2D(Layer):
    """Pooling over Q x Q windows moved by stride S (S = Q by default), per channel.

    ``kind``: 'max', 'l2' (square root of the sum of squares in the window; its gradient
    is taken as 0 for a window that is all zeros, where the norm has no derivative) or
    'avg'. Output size floor((D - Q) / S) + 1 in each axis.
    """

    type = "pool"
    image_in = True
    image_out = True

    def __init__(
        self,
        kind: str = "max",
        window: int | tuple[int, int] = 2,
        stride: int | tuple[int, int] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.kind = _choice(kind, POOL_KINDS, "pool kind")
        self.window = _pair(window, "pool window")
        self.stride = self.window if stride is None else _pair(stride, "pool stride")
        self._cache: tuple[Any, ...] | None = None

    def _build(self, in_shape, backend, rng, dtype):
        c, h, w = in_shape
        qh, qw = self.window
        if qh > h or qw > w:
            raise ValueError(
                f"{self.describe()}: pool window {qh}x{qw} is larger than its input {h}x{w} "
                f"(input C,H,W = {in_shape})"
            )
        return (c, output_size(h, qh, self.stride[0]), output_size(w, qw, self.stride[1]))

    def _forward(self, x: Array) -> Array:
        xp = array_module(x)
        out_hw = self.out_shape[1:]
        if self.kind == "max":
            best, saved = max_pool(x, self.window, self.stride, out_hw)
            self._cache = saved
            return best
        total = sum_pool(x, self.window, self.stride, out_hw, square=self.kind == "l2")
        if self.kind == "avg":
            self._cache = (x.shape,)
            return total * (1.0 / (self.window[0] * self.window[1]))
        norm = xp.sqrt(total)
        self._cache = (x, norm)
        return norm

    def _backward(self, grad_out: Array, need_input_grad: bool = True) -> Array | None:
        if not need_input_grad:
            return None
        xp = array_module(grad_out)
        if self.kind == "max":
            return max_pool_backward(self._cache, grad_out, self.window, self.stride)
        if self.kind == "avg":
            (x_shape,) = self._cache
            share = grad_out * (1.0 / (self.window[0] * self.window[1]))
            return spread_pool_grad(share, x_shape, self.window, self.stride)
        # d sqrt(s) / dx = x / sqrt(s); taken as 0 where the window is all zeros.
        x, norm = self._cache
        nonzero = norm > 0
        scale = xp.where(nonzero, grad_out / xp.where(nonzero, norm, 1), 0)
        return spread_pool_grad(scale, x.shape, self.window, self.stride, x=x)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "kind": self.kind,
            "window": list(self.window),
            "stride": list(self.stride),
        }


def MaxPool2D(window: int | tuple[int, int] = 2, stride: Any = None, name: str | None = None):
    """Max pooling (see :class:`Pool2D`)."""
    return Pool2D("max", window, stride, name)


def L2Pool2D(window: int | tuple[int, int] = 2, stride: Any = None, name: str | None = None):
    """L2 pooling (see :class:`Pool2D`)."""
    return Pool2D("l2", window, stride, name)


def AvgPool2D(window: int | tuple[int, int] = 2, stride: Any = None, name: str | None = None):
    """Average pooling (see :class:`Pool2D`)."""
    return Pool2D("avg", window, stride, name)


class Flatten(Layer):
    """Image (N, C, H, W) -> vector (N, C*H*W).

    ``order='F'`` (column-major, the default, as the lecture's MATLAB flattens): each
    sample's maps are read as MATLAB reads an H x W x P stack with ``Z(:)``: down the
    rows of a column first, then column after column, then map after map, so entry
    ``h + H*w + H*W*c`` is ``z[n, c, h, w]`` (``z[n].transpose(0, 2, 1).ravel()``). For
    one channel this is column after column of the map. ``order='C'`` (row-major) is
    ``z[n].ravel()``, the PyTorch convention. ``order='F_channels_first'`` is what 'F'
    meant before checkpoint format 2 (``z[n].ravel(order='F')``: the channel fastest),
    kept for the checkpoints trained with it.
    """

    type = "flatten"
    image_in = True

    def __init__(self, order: str = "F", name: str | None = None) -> None:
        super().__init__(name)
        self.order = FLATTEN_ORDERS[_choice(order, tuple(FLATTEN_ORDERS), "flatten order")]

    def _build(self, in_shape, backend, rng, dtype):
        c, h, w = in_shape
        return (c * h * w,)

    # Internal (C, H, W, N) axes, slowest to fastest within a sample, for each order.
    _AXES = {"F": (0, 2, 1, 3), "C": (0, 1, 2, 3), "F_channels_first": (2, 1, 0, 3)}

    def _forward(self, x: Array) -> Array:
        n = x.shape[3]
        return x.transpose(self._AXES[self.order]).reshape(-1, n).T

    def _backward(self, grad_out: Array, need_input_grad: bool = True) -> Array | None:
        if not need_input_grad:
            return None
        xp = array_module(grad_out)
        axes = self._AXES[self.order]
        stored = tuple(((*self.in_shape, grad_out.shape[0]))[a] for a in axes)
        inverse = tuple(axes.index(a) for a in range(4))
        return xp.ascontiguousarray(grad_out.T.reshape(stored).transpose(inverse))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "order": self.order}


class Dense(Layer):
    """Fully connected: y = x @ W + b with W of shape (D_in, D_out).

    With one output and no bias this is the lecture's neuron input net = h . theta, with
    theta = W[:, 0]. The bias is the lecture's "bias feature".
    """

    type = "dense"

    def __init__(
        self,
        out_features: int,
        bias: bool = True,
        init: str = "he",
        in_features: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        self.out_features = _count(out_features, "out_features")
        self.bias = bool(bias)
        self.init = _choice(init, INITS, "init")
        self.in_features = in_features
        self._input: Array | None = None

    def _build(self, in_shape, backend, rng, dtype):
        (d,) = in_shape
        if self.in_features is not None and self.in_features != d:
            raise ValueError(
                f"{self.describe()} expects {self.in_features} input features, got {d}"
            )
        self.in_features = d
        self.params["weight"] = _init_weight(
            self.init, (d, self.out_features), d, self.out_features, rng, dtype
        )
        self.decayed = ("weight",)
        if self.bias:
            self.params["bias"] = backend.zeros((self.out_features,), dtype)
        return (self.out_features,)

    def _forward(self, x: Array) -> Array:
        self._input = x
        out = x @ self.params["weight"]
        if self.bias:
            out += self.params["bias"]
        return out

    def _backward(self, grad_out: Array, need_input_grad: bool = True) -> Array | None:
        self.grads["weight"] = self._input.T @ grad_out
        if self.bias:
            self.grads["bias"] = grad_out.sum(axis=0)
        if not need_input_grad:
            return None
        return grad_out @ self.params["weight"].T

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "out_features": self.out_features,
            "bias": self.bias,
            "init": self.init,
            "in_features": self.in_features,
        }


class Activation(Layer):
    """Elementwise activations; they work on images and vectors alike."""

    elementwise = True

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._cache: Array | None = None


class Logistic(Activation):
    """g(z) = 1 / (1 + exp(-z)), computed as (1 + tanh(z/2)) / 2 so it never overflows."""

    type = "logistic"

    def _forward(self, x: Array) -> Array:
        y = logistic(x)
        self._cache = y
        return y

    def _backward(self, grad_out: Array, need_input_grad: bool = True) -> Array | None:
        y = self._cache
        return grad_out * y * (1.0 - y) if need_input_grad else None


class Tanh(Activation):
    type = "tanh"

    def _forward(self, x: Array) -> Array:
        y = array_module(x).tanh(x)
        self._cache = y
        return y

    def _backward(self, grad_out: Array, need_input_grad: bool = True) -> Array | None:
        y = self._cache
        return grad_out * (1.0 - y * y) if need_input_grad else None


class ReLU(Activation):
    """max(z, 0); the derivative at exactly 0 is taken as 0."""

    type = "relu"

    def _forward(self, x: Array) -> Array:
        y = relu(x)
        self._cache = y  # y > 0 exactly where x > 0: no separate mask pass
        return y

    def _backward(self, grad_out: Array, need_input_grad: bool = True) -> Array | None:
        return relu_backward(grad_out, self._cache) if need_input_grad else None


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.type: cls for cls in (Conv2D, Pool2D, Flatten, Dense, Logistic, Tanh, ReLU)
}


def layer_from_config(config: dict[str, Any]) -> Layer:
    """Rebuild a layer from :meth:`Layer.config` output."""
    config = dict(config)
    layer_type = config.pop("type", None)
    if layer_type not in LAYER_TYPES:
        allowed = ", ".join(LAYER_TYPES)
        raise ValueError(f"layer type {layer_type!r} is not known; allowed: {allowed}")
    for key in ("kernel_size", "stride", "window"):
        if isinstance(config.get(key), list):
            config[key] = tuple(config[key])
    if isinstance(config.get("padding"), list):
        config["padding"] = tuple(config["padding"])
    return LAYER_TYPES[layer_type](**config)
