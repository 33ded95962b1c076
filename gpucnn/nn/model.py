"""Sequential model: a stack of layers, an output head, L2 regularisation and checkpoints.

Typical use::

    model = Sequential(
        [Conv2D(8, 5), ReLU(), MaxPool2D(2), Flatten(), Dense(10)],
        head=SoftmaxCrossEntropy(), input_shape=(1, 28, 28), backend="auto", seed=0,
    )
    loss = model.loss(x, y)      # forward; a 0-d array on the model's backend
    model.backward()             # fills model.grads
    optimizer.step(model.params, model.grads)

Images enter as NCHW and are turned into the internal (C, H, W, N) layout once;
parameters and gradients are addressed by name, e.g. ``"conv1.weight"``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from gpucnn.array.backend import (
    Array,
    Backend,
    array_module,
    get_backend,
    is_gpu,
    resolve_dtype,
    to_host,
)
from gpucnn.array.im2col import internal_to_nchw, nchw_to_internal
from gpucnn.nn.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from gpucnn.nn.layers import Layer, layer_from_config
from gpucnn.nn.losses import Head, head_from_config
from gpucnn.nn.optim import Optimizer, make_optimizer


class Sequential:
    """Layers applied in order, then ``head``.

    Args:
        layers: image layers first (Conv2D, Pool2D, activations), then Flatten, then
            vector layers (Dense, activations).
        head: LogisticLogLikelihood (binary) or SoftmaxCrossEntropy (multi-class).
        input_shape: one sample's shape, (C, H, W) for images or (D,) for vectors.
        backend: 'auto' | 'numpy' | 'cupy' or a Backend.
        dtype: 'float32' (training) or 'float64' (gradient checks).
        seed: seeds He/Glorot initialisation; the same seed gives the same weights on
            every backend.
        l2: lambda of the L2 penalty (lambda / 2) * sum ||W||^2 over weights (not biases),
            added to the loss.
    """

    def __init__(
        self,
        layers: list[Layer],
        head: Head,
        input_shape: tuple[int, ...],
        backend: str | Backend = "numpy",
        dtype: str = "float32",
        seed: int = 0,
        l2: float = 0.0,
    ) -> None:
        if not layers:
            raise ValueError("a model needs at least one layer")
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or l2 < 0:
            raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
        shape = tuple(input_shape)
        if len(shape) not in (1, 3) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(
                f"input_shape must be (C, H, W) or (D,) of positive ints, got {input_shape!r}"
            )
        self.backend = get_backend(backend)
        self.dtype = resolve_dtype(dtype)
        rng = self.backend.random(seed)  # checks the seed
        self.seed = rng.seed
        self.l2 = float(l2)
        self.input_shape = shape
        self.layers = list(layers)
        self.head = head
        self._name_layers()
        for layer in self.layers:
            shape = layer.build(shape, self.backend, rng, self.dtype)
        self.output_shape = shape
        head.check_outputs(shape)
        self.execution_order = plan_execution(self.layers)
        self.grads: dict[str, Array] = {}
        self.last_output: Array | None = None
        self._loss_ready = False
        self._penalized = False  # whether the last loss() included the L2 penalty

    def _name_layers(self) -> None:
        counts: dict[str, int] = {}
        taken = {layer.name for layer in self.layers if layer.name}
        for layer in self.layers:
            if layer.name is None:
                counts[layer.type] = counts.get(layer.type, 0) + 1
                name = f"{layer.type}{counts[layer.type]}"
                while name in taken:
                    counts[layer.type] += 1
                    name = f"{layer.type}{counts[layer.type]}"
                layer.name = name
                taken.add(name)
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {names}")

    # -- parameters ------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Array]:
        """Live parameter arrays by name ("layer.param"); optimizers update them in place."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.params.items()}

    def named_grads(self) -> dict[str, Array]:
        """The layers' current gradients by name ("layer.param"), no L2 term."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.grads.items()}

    def decayed_params(self) -> list[str]:
        """Names of the parameters under L2 regularisation (weights, never biases)."""
        return [f"{layer.name}.{k}" for layer in self.layers for k in layer.decayed]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {[layer.name for layer in self.layers]}")

    def set_params(self, values: dict[str, Any]) -> None:
        """Overwrite parameters by name (host or device arrays), checking shapes."""
        for key, value in values.items():
            layer_name, _, param = key.rpartition(".")
            if not layer_name:
                raise KeyError(f"parameter names look like 'conv1.weight', got {key!r}")
            self.layer(layer_name).set_param(param, self.backend.asarray(value, self.dtype))

    def num_params(self) -> int:
        return sum(int(v.size) for v in self.params.values())

    def column_bytes_per_sample(self) -> int:
        """Bytes per sample of the im2col matrices of a forward pass (each convolution's
        C*KH*KW x OH*OW numbers per sample; 0 without convolutions). CuPy, and NumPy with
        several BLAS threads, keep them for the backward pass, the bulk of a pass's
        memory. Where NumPy's BLAS runs one thread, a convolution keeps its row unfold
        instead, about KH times smaller (:mod:`gpucnn.array.conv`): there the figure is
        an upper bound."""
        itemsize = self.backend.xp.dtype(self.dtype).itemsize
        return itemsize * sum(layer.columns_per_sample() for layer in self.layers)

    # -- computation -----------------------------------------------------------------
    # A model computes a whole batch in the calling process (the array primitives may
    # still use threads). Splitting a large batch across threads or worker processes is
    # a wrapper's job, above the model: gpucnn.parallel.split.BatchSplit.
    def prepare_input(self, x: Any) -> Array:
        """A checked public-layout batch on the model's backend and dtype (not yet internal)."""
        x = self.backend.asarray(x, self.dtype)
        if tuple(x.shape[1:]) != self.input_shape or x.ndim != len(self.input_shape) + 1:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; this model takes (N, "
                f"{', '.join(map(str, self.input_shape))})"
                + (" (NCHW)" if len(self.input_shape) == 3 else "")
            )
        if x.shape[0] == 0:
            raise ValueError("the batch is empty (0 samples)")
        return x

    def prepare_labels(self, labels: Any, count: int) -> Array:
        """Checked labels for a batch of ``count`` samples, flat, on the model's backend.

        Host labels are checked against the head (a device label would cost a transfer
        to look at; fit and evaluate check whole splits once on the host instead).
        """
        if not is_gpu(array_module(labels)):
            self.head.check_labels(to_host(labels), self.output_shape)
        labels = self.backend.asarray(labels)
        if labels.ndim == 0 or labels.size != count:
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({count},)")
        return labels.reshape(-1)

    def _run_layers(self, x: Array) -> Array:
        h = nchw_to_internal(x) if x.ndim == 4 else x
        for index in self.execution_order:
            h = self.layers[index]._forward(h)
        return h

    def forward(self, x: Any) -> Array:
        """The head's input (logits / net) for a batch, shape (N,) + output_shape."""
        return self._run_layers(self.prepare_input(x))

    def loss(self, x: Any, labels: Any, penalty: bool = True) -> Array:
        """Mean loss over the batch (plus the L2 penalty unless ``penalty=False``), as a
        0-d backend array.

        Left on the device so a training step never waits for the host; read it with
        :func:`gpucnn.array.backend.to_scalar` when you want the number. The head's input is
        kept in ``last_output`` (for accuracy without a second forward pass).
        :meth:`backward` then gives the gradient of exactly this value.
        """
        x = self.prepare_input(x)
        value = self.data_loss(x, self.prepare_labels(labels, x.shape[0]))
        if penalty and self.l2:
            value = value + self.penalty()
            self._penalized = True
        return value

    def data_loss(self, x: Array, labels: Array) -> Array:
        """The head's mean loss on a batch already checked by :meth:`prepare_input` and
        :meth:`prepare_labels`, without the L2 penalty; :meth:`backward` follows it."""
        self.last_output = self._run_layers(x)
        value = self.head.forward(self.last_output, labels)
        self._loss_ready, self._penalized = True, False
        return value

    def penalty(self) -> Array:
        """The L2 penalty (l2 / 2) * sum ||W||^2 over the weights (never the biases)."""
        params = self.params
        return (0.5 * self.l2) * sum((params[k] * params[k]).sum() for k in self.decayed_params())

    def penalty_gradients(self) -> dict[str, Array]:
        """d penalty / d W for each weight under L2: l2 * W."""
        params = self.params
        return {key: self.l2 * params[key] for key in self.decayed_params()}

    def backward(self, scale: float = 1.0) -> dict[str, Array]:
        """Backpropagate the last :meth:`loss`; fills and returns ``grads`` by name.

        With ``scale``, the gradients of ``scale`` times that loss: a slice's share of a
        batch (:class:`~gpucnn.parallel.split.BatchSplit`), applied once to the head's
        small gradient instead of to every parameter's.
        """
        if not self._loss_ready:
            raise RuntimeError("call loss(x, labels) before backward()")
        order = self.execution_order
        grad = self.head.backward()
        if scale != 1.0:
            grad = grad * scale
        for position in range(len(order) - 1, -1, -1):
            # The first layer's input gradient is never used: skip its col2im.
            grad = self.layers[order[position]]._backward(grad, need_input_grad=position > 0)
        grads = self.named_grads()
        if self._penalized:
            for key, value in self.penalty_gradients().items():
                grads[key] = grads[key] + (value * scale if scale != 1.0 else value)
        self.grads = grads
        self._loss_ready = False
        return grads

    # -- looking inside -------------------------------------------------------------
    # Not on the training step's path: these run the layers in the order they are
    # written (never the reordered execution plan), so what a learner sees of each layer
    # is what the layer list says, and they overwrite the layers' caches and gradients.
    def layer_outputs(self, x: Any) -> dict[str, Array]:
        """Every layer's output for batch ``x``, by layer name, in the order the layers
        are written, on the public layout: (N, C, H, W) for images, (N, D) for vectors.
        The last one is the head's input (what :meth:`forward` returns)."""
        h = self._internal(self.prepare_input(x))
        outputs = {}
        for layer in self.layers:
            h = layer._forward(h)
            outputs[layer.name] = _public(h)
        self._loss_ready = False
        return outputs

    def saliency(self, x: Any, labels: Any) -> dict[str, Array]:
        """The gradient of the batch's mean data loss (no L2 penalty) with respect to
        the input (key ``"input"``) and to every layer's output (by layer name), on the
        public layout, in the order the layers are written. For one image and its true
        class, ``"input"`` is its saliency map: how each pixel moves the loss."""
        x = self.prepare_input(x)
        labels = self.prepare_labels(labels, x.shape[0])
        h = self._internal(x)
        for layer in self.layers:
            h = layer._forward(h)
        self.head.forward(h, labels)
        grad = self.head.backward()
        gradients = {}
        for layer in reversed(self.layers):
            gradients[layer.name] = _public(grad)
            grad = layer._backward(grad, need_input_grad=True)
        self._loss_ready = False
        return {"input": _public(grad), **dict(reversed(gradients.items()))}

    @staticmethod
    def _internal(x: Array) -> Array:
        return nchw_to_internal(x) if x.ndim == 4 else x

    def find_non_finite(self, x: Any, labels: Any) -> str:
        """Where a batch first turns NaN or infinite in this model, in words: a parameter,
        the input, a layer's output, the loss, or a gradient on the way back. For the
        error that stops a diverging run; it overwrites the layers' caches."""
        xp = self.backend.xp

        def finite(value: Array) -> bool:
            return bool(xp.isfinite(value).all())

        for name, value in self.params.items():
            if not finite(value):
                return f"parameter {name} (an earlier step's update was not finite)"
        x = self.prepare_input(x)
        labels = self.prepare_labels(labels, x.shape[0])
        if not finite(x):
            return "the input batch itself"
        h = nchw_to_internal(x) if x.ndim == 4 else x
        for index in self.execution_order:
            layer = self.layers[index]
            h = layer._forward(h)
            if not finite(h):
                return f"the output of layer {layer.name} ({layer.type})"
        if not finite(self.head.forward(h, labels)):
            return f"the {self.head.type} head's loss, from finite inputs"
        grad = self.head.backward()
        for position in range(len(self.execution_order) - 1, -1, -1):
            layer = self.layers[self.execution_order[position]]
            grad = layer._backward(grad, need_input_grad=position > 0)
            for key, value in layer.grads.items():
                if not finite(value):
                    return f"the gradient of {layer.name}.{key}"
            if grad is not None and not finite(grad):
                return f"the gradient into layer {layer.name} ({layer.type})"
        return "nowhere on a second pass (the step was not repeatable)"

    def replica(self) -> Sequential:
        """A model that computes with this one's parameters (the same arrays, so every
        update reaches it) but keeps its own forward caches and gradients: one per thread
        that runs a slice of a batch."""
        twin = copy.copy(self)
        twin.layers = []
        for layer in self.layers:
            clone = copy.copy(layer)  # shares the params dict; own caches from here on
            clone.grads = {}
            twin.layers.append(clone)
        twin.head = copy.copy(self.head)
        twin.grads, twin.last_output, twin._loss_ready = {}, None, False
        return twin

    def predict_proba(self, x: Any) -> Array:
        return self.head.predict_proba(self.forward(x))

    def predict(self, x: Any) -> Array:
        """Predicted class per sample (0/1 for the logistic head)."""
        return self.head.predict(self.forward(x))

    # -- moving and saving -------------------------------------------------------------
    def to(self, backend: str | Backend, optimizer: Optimizer | None = None) -> Sequential:
        """Move all parameters to ``backend`` in place, and ``optimizer``'s state (momentum
        buffers, Adam moments) with them so training can go on; returns self."""
        self.backend = get_backend(backend)
        for layer in self.layers:
            for key, value in layer.params.items():
                layer.params[key] = self.backend.asarray(to_host(value), self.dtype)
            layer.grads = {}
        self.grads = {}
        if optimizer is not None:
            state = {k: self.backend.asarray(to_host(v)) for k, v in optimizer.state_dict().items()}
            optimizer.load_state_dict(state, optimizer.steps)
        return self

    def config(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "layers": [layer.config() for layer in self.layers],
            "head": self.head.config(),
            "dtype": self.dtype.name,
            "seed": self.seed,
            "l2": self.l2,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], backend: str | Backend = "numpy") -> Sequential:
        return cls(
            [layer_from_config(c) for c in config["layers"]],
            head_from_config(config["head"]),
            tuple(config["input_shape"]),
            backend=backend,
            dtype=config.get("dtype", "float32"),
            seed=config.get("seed", 0),
            l2=config.get("l2", 0.0),
        )

    def save(self, path: str | os.PathLike, optimizer: Optimizer | None = None) -> Path:
        """Write a checkpoint (see :mod:`gpucnn.nn.checkpoint`); returns its path."""
        return save_checkpoint(path, self, optimizer)


def _public(h: Array) -> Array:
    """An internal activation on the public layout: (C, H, W, N) -> (N, C, H, W)."""
    return internal_to_nchw(h) if h.ndim == 4 else h


def plan_execution(layers: list[Layer]) -> list[int]:
    """The order in which to run the layers: their own order, except that a ReLU directly
    followed by a max pool runs after the pool.

    relu(max(window)) == max(relu(window)) exactly, and the gradients agree too: when a
    window's maximum is <= 0 both orders give it zero gradient, otherwise both route it to
    the window's first maximum. Pooling first makes the ReLU's two passes 4x smaller
    after a 2x2 pool.
    """
    order = list(range(len(layers)))
    for k in range(len(order) - 1):
        first, second = layers[order[k]], layers[order[k + 1]]
        if first.type == "relu" and second.type == "pool" and second.kind == "max":
            order[k], order[k + 1] = order[k + 1], order[k]
    return order


def load_checkpoint(
    path: str | os.PathLike, backend: str | Backend = "numpy"
) -> tuple[Sequential, Optimizer | None]:
    """Rebuild the model (and optimizer, if saved) from a checkpoint file
    (:mod:`gpucnn.nn.checkpoint`), on ``backend``."""
    checkpoint = read_checkpoint(path)
    backend = get_backend(backend)  # its own errors are not the checkpoint's
    try:
        return _rebuild(checkpoint, backend)
    except KeyError as err:
        raise checkpoint.damaged(f"missing entry {err}") from err
    except (TypeError, ValueError) as err:
        raise checkpoint.damaged(str(err)) from err


def _rebuild(checkpoint: Checkpoint, backend: Backend) -> tuple[Sequential, Optimizer | None]:
    """Model and optimizer from a checkpoint; KeyError/TypeError/ValueError where the
    parts do not fit together."""
    model = Sequential.from_config(checkpoint.architecture, backend)
    if checkpoint.version < 2:  # format 1's "F" read the channel index fastest
        for layer in model.layers:
            if layer.type == "flatten" and layer.order == "F" and layer.in_shape[0] > 1:
                layer.order = "F_channels_first"
    expected, stored = set(model.params), set(checkpoint.params)
    if stored != expected:
        raise ValueError(
            f"its architecture needs parameters {sorted(expected)}; missing "
            f"{sorted(expected - stored)}, unexpected {sorted(stored - expected)}"
        )
    model.set_params(checkpoint.params)
    optimizer = None
    if checkpoint.optimizer is not None:
        options = dict(checkpoint.optimizer)
        optimizer = make_optimizer(options.pop("type"), **options)
        state = {k: model.backend.asarray(v) for k, v in checkpoint.optimizer_state.items()}
        optimizer.load_state_dict(state, checkpoint.optimizer_steps)
    return model, optimizer
