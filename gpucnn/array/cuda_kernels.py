"""CuPy kernels for the sliding-window primitives (part of the array layer).

The NumPy formulation of im2col/col2im launches one copy per kernel offset (25 for a
5x5 kernel); on the GPU each is a separate kernel launch. These ElementwiseKernels do
the whole unfold in one launch. col2im is written in gather form, one thread per input
pixel summing the windows that cover it, so it needs no atomics and is deterministic.

Only reached through :mod:`gpucnn.array.im2col` when the arrays are CuPy arrays; cupy itself
comes from :func:`gpucnn.array.backend.cupy_status`, never imported here.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from gpucnn.array.backend import Array, cupy_status

_IM2COL = r"""
    const ptrdiff_t n = i % N;
    ptrdiff_t t = i / N;
    const int ox = t % OW; t /= OW;
    const int oy = t % OH; t /= OH;
    const int kj = t % KW; t /= KW;
    const int ki = t % KH;
    const ptrdiff_t c = t / KH;
    const int y = oy * SH + (FLIP ? KH - 1 - ki : ki);
    const int x_ = ox * SW + (FLIP ? KW - 1 - kj : kj);
    col = img[((c * H + y) * W + x_) * N + n];
"""


def _gather_over_windows(accumulate: str, window_h: str = "QH", window_w: str = "QW") -> str:
    """CUDA body shared by the gather-form backward kernels: thread i owns pixel (c, y, x, n)
    of a (C, H, W, N) image, visits every window (oy, ox) and offset (qi, qj) that covers
    it, and runs ``accumulate`` there (adding into ``acc``). No atomics, deterministic."""
    return rf"""
    const ptrdiff_t n = i % N;
    ptrdiff_t t = i / N;
    const int x_ = t % W; t /= W;
    const int y = t % H;
    const ptrdiff_t c = t / H;
    T acc = 0;
    for (int qi = 0; qi < {window_h}; ++qi) {{
        const int dy = y - qi;
        if (dy < 0) break;
        if (dy % SH) continue;
        const int oy = dy / SH;
        if (oy >= OH) continue;
        for (int qj = 0; qj < {window_w}; ++qj) {{
            const int dx = x_ - qj;
            if (dx < 0) break;
            if (dx % SW) continue;
            const int ox = dx / SW;
            if (ox >= OW) continue;
            {accumulate}
        }}
    }}
"""


_COL2IM = (
    _gather_over_windows(
        """const int si = FLIP ? KH - 1 - qi : qi;  // the slot that holds this offset
            const int sj = FLIP ? KW - 1 - qj : qj;
            acc += col[((((c * KH + si) * KW + sj) * OH + oy) * OW + ox) * N + n];""",
        "KH",
        "KW",
    )
    + "    img = acc;\n"
)

_PARAMS = (
    "int32 H, int32 W, int32 N, int32 KH, int32 KW, int32 OH, int32 OW, int32 SH, int32 SW, "
    "int32 FLIP"
)


def _cupy() -> Any:
    cupy, reason = cupy_status()
    if cupy is None:  # pragma: no cover - only reachable with a CuPy array and no CuPy
        raise RuntimeError(reason)
    return cupy


@cache
def _kernels() -> tuple[Any, Any]:
    cupy = _cupy()
    im2col_kernel = cupy.ElementwiseKernel(
        f"raw T img, {_PARAMS}", "T col", _IM2COL, "gpucnn_im2col"
    )
    col2im_kernel = cupy.ElementwiseKernel(
        f"raw T col, {_PARAMS}", "T img", _COL2IM, "gpucnn_col2im"
    )
    return im2col_kernel, col2im_kernel


def im2col(
    x: Array, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int, flip: bool = False
) -> Array:
    """(C, H, W, N) -> (C, KH, KW, OH, OW, N) in one launch."""
    cupy = _cupy()
    c, h, w, n = x.shape
    x = cupy.ascontiguousarray(x)
    col = cupy.empty((c, kh, kw, oh, ow, n), dtype=x.dtype)
    _kernels()[0](x, h, w, n, kh, kw, oh, ow, sh, sw, int(flip), col)
    return col


def col2im(col: Array, h: int, w: int, sh: int, sw: int, flip: bool = False) -> Array:
    """(C, KH, KW, OH, OW, N) -> (C, H, W, N), summing overlaps, in one launch."""
    cupy = _cupy()
    c, kh, kw, oh, ow, n = col.shape
    col = cupy.ascontiguousarray(col)
    img = cupy.empty((c, h, w, n), dtype=col.dtype)
    _kernels()[1](col, h, w, n, kh, kw, oh, ow, sh, sw, int(flip), img)
    return img


# -- max pooling: one launch forward (saving the winning offset), one backward ----------
_MAXPOOL = r"""
    const ptrdiff_t n = i % N;
    ptrdiff_t t = i / N;
    const int ox = t % OW; t /= OW;
    const int oy = t % OH;
    const ptrdiff_t c = t / OH;
    const ptrdiff_t base = ((c * H + oy * SH) * W + ox * SW) * N + n;
    T top = img[base];
    int winner = 0;
    for (int qi = 0; qi < QH; ++qi) {
        for (int qj = 0; qj < QW; ++qj) {
            const T v = img[base + ((ptrdiff_t)qi * W + qj) * N];
            if (v > top) { top = v; winner = qi * QW + qj; }  // first maximum wins ties
        }
    }
    out = top;
    arg = winner;
"""

_MAXPOOL_BACKWARD = (
    _gather_over_windows(
        """const ptrdiff_t o = ((c * OH + oy) * OW + ox) * N + n;
            if (arg[o] == qi * QW + qj) acc += grad[o];"""
    )
    + "    img_grad = acc;\n"
)

_POOL_PARAMS = (
    "int32 H, int32 W, int32 N, int32 OH, int32 OW, int32 QH, int32 QW, int32 SH, int32 SW"
)


@cache
def _pool_kernels() -> tuple[Any, Any]:
    cupy = _cupy()
    forward = cupy.ElementwiseKernel(
        f"raw T img, {_POOL_PARAMS}", "T out, int32 arg", _MAXPOOL, "gpucnn_maxpool"
    )
    backward = cupy.ElementwiseKernel(
        f"raw T grad, raw int32 arg, {_POOL_PARAMS}",
        "T img_grad",
        _MAXPOOL_BACKWARD,
        "gpucnn_maxpool_backward",
    )
    return forward, backward


def max_pool(
    x: Array, window: tuple[int, int], stride: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[Array, Array]:
    """(C, H, W, N) -> (max over windows, index of the winning offset per window)."""
    cupy = _cupy()
    c, h, w, n = x.shape
    x = cupy.ascontiguousarray(x)
    out = cupy.empty((c, *out_hw, n), dtype=x.dtype)
    arg = cupy.empty((c, *out_hw, n), dtype=cupy.int32)
    _pool_kernels()[0](x, h, w, n, *out_hw, *window, *stride, out, arg)
    return out, arg


def max_pool_backward(
    arg: Array,
    grad_out: Array,
    x_shape: tuple[int, ...],
    window: tuple[int, int],
    stride: tuple[int, int],
) -> Array:
    cupy = _cupy()
    c, h, w, n = x_shape
    grad_out = cupy.ascontiguousarray(grad_out)
    grad_in = cupy.empty(x_shape, dtype=grad_out.dtype)
    _pool_kernels()[1](grad_out, arg, h, w, n, *arg.shape[1:3], *window, *stride, grad_in)
    return grad_in


# -- fused elementwise updates ------------------------------------------------------------
@cache
def _elementwise() -> dict[str, Any]:
    cupy = _cupy()
    return {
        "relu_backward": cupy.ElementwiseKernel(
            "T grad, T y", "T out", "out = y > (T)0 ? grad : (T)0", "gpucnn_relu_backward"
        ),
        "sgd": cupy.ElementwiseKernel(
            "T grad, T lr", "T param", "param -= lr * grad", "gpucnn_sgd"
        ),
        "momentum": cupy.ElementwiseKernel(
            "T grad, T lr, T mu",
            "T param, T velocity",
            "velocity = mu * velocity - lr * grad; param += velocity",
            "gpucnn_momentum",
        ),
        "adam": cupy.ElementwiseKernel(
            "T grad, T step, T beta1, T beta2, T eps",
            "T param, T m, T v",
            """
            m = beta1 * m + ((T)1 - beta1) * grad;
            v = beta2 * v + ((T)1 - beta2) * grad * grad;
            param -= step * m / (sqrt(v) + eps);
            """,
            "gpucnn_adam",
        ),
    }


def elementwise(name: str) -> Any:
    return _elementwise()[name]


# -- sum / L2 / average pooling ----------------------------------------------------------
_SUMPOOL = r"""
    const ptrdiff_t n = i % N;
    ptrdiff_t t = i / N;
    const int ox = t % OW; t /= OW;
    const int oy = t % OH;
    const ptrdiff_t c = t / OH;
    const ptrdiff_t base = ((c * H + oy * SH) * W + ox * SW) * N + n;
    T acc = 0;
    for (int qi = 0; qi < QH; ++qi) {
        for (int qj = 0; qj < QW; ++qj) {
            const T v = img[base + ((ptrdiff_t)qi * W + qj) * N];
            acc += SQUARE ? v * v : v;
        }
    }
    out = acc;
"""

# Each input pixel sums the gradients of the windows that cover it (gather form), times
# the pixel itself for the L2 case: d sqrt(sum x^2) / dx_i = x_i / norm.
_SPREAD = (
    _gather_over_windows("acc += grad[((c * OH + oy) * OW + ox) * N + n];")
    + "    img_grad = SCALE_BY_X ? acc * img[i] : acc;\n"
)


@cache
def _sum_pool_kernels() -> tuple[Any, Any]:
    cupy = _cupy()
    forward = cupy.ElementwiseKernel(
        f"raw T img, {_POOL_PARAMS}, int32 SQUARE", "T out", _SUMPOOL, "gpucnn_sumpool"
    )
    backward = cupy.ElementwiseKernel(
        f"raw T grad, raw T img, {_POOL_PARAMS}, int32 SCALE_BY_X",
        "T img_grad",
        _SPREAD,
        "gpucnn_sumpool_backward",
    )
    return forward, backward


def sum_pool(
    x: Array,
    window: tuple[int, int],
    stride: tuple[int, int],
    out_hw: tuple[int, int],
    square: bool,
) -> Array:
    cupy = _cupy()
    c, h, w, n = x.shape
    x = cupy.ascontiguousarray(x)
    out = cupy.empty((c, *out_hw, n), dtype=x.dtype)
    _sum_pool_kernels()[0](x, h, w, n, *out_hw, *window, *stride, int(square), out)
    return out


def spread_pool_grad(
    grad_window: Array,
    x_shape: tuple[int, ...],
    window: tuple[int, int],
    stride: tuple[int, int],
    x: Array | None,
) -> Array:
    cupy = _cupy()
    c, h, w, n = x_shape
    grad_window = cupy.ascontiguousarray(grad_window)
    image = cupy.ascontiguousarray(x) if x is not None else grad_window  # unused when None
    grad_in = cupy.empty(x_shape, dtype=grad_window.dtype)
    _sum_pool_kernels()[1](
        grad_window,
        image,
        h,
        w,
        n,
        *grad_window.shape[1:3],
        *window,
        *stride,
        int(x is not None),
        grad_in,
    )
    return grad_in


# -- output heads: per-row loss and its gradient in one launch ---------------------------
_SOFTMAX_XENT = r"""
    const T* z = &logits[i * K];
    T top = z[0];
    for (int k = 1; k < K; ++k) top = z[k] > top ? z[k] : top;
    T total = 0;
    for (int k = 0; k < K; ++k) total += exp(z[k] - top);
    const I label = labels[i];
    loss = log(total) + top - z[label];
    for (int k = 0; k < K; ++k) {
        grad[i * K + k] = (exp(z[k] - top) / total - (k == label ? (T)1 : (T)0)) * scale;
    }
"""

_LOGISTIC_XENT = r"""
    // softplus(z) - y z, and (g(z) - y) * scale, both finite for any z
    const T softplus = (z > (T)0 ? z : (T)0) + log1p(exp(-fabs(z)));
    loss = softplus - y * z;
    grad = ((T)0.5 * ((T)1 + tanh((T)0.5 * z)) - y) * scale;
"""


@cache
def _head_kernels() -> tuple[Any, Any]:
    cupy = _cupy()
    softmax = cupy.ElementwiseKernel(
        "raw T logits, raw I labels, int32 K, T scale",
        "T loss, raw T grad",
        _SOFTMAX_XENT,
        "gpucnn_softmax_xent",
    )
    logistic = cupy.ElementwiseKernel(
        "T z, T y, T scale", "T loss, T grad", _LOGISTIC_XENT, "gpucnn_logistic_xent"
    )
    return softmax, logistic


def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Per-row cross-entropy of softmax(logits) and d(mean loss)/d logits."""
    cupy = _cupy()
    logits = cupy.ascontiguousarray(logits)
    n, k = logits.shape
    loss = cupy.empty(n, dtype=logits.dtype)
    grad = cupy.empty_like(logits)
    _head_kernels()[0](
        logits, cupy.ascontiguousarray(labels), k, logits.dtype.type(1.0 / n), loss, grad
    )
    return loss, grad


def logistic_cross_entropy(net: Array, labels: Array) -> tuple[Array, Array]:
    """Per-sample -log-likelihood of a logistic neuron and d(mean loss)/d net."""
    scale = net.dtype.type(1.0 / net.shape[0])
    return _head_kernels()[1](net, labels.astype(net.dtype, copy=False), scale)
