"""CuPy kernels for the sliding-window primitives (part of the array layer).

The NumPy formulation of im2col/col2im launches one copy per kernel offset (25 for a
5x5 kernel); on the GPU each is a separate kernel launch. These ElementwiseKernels do
the whole unfold in one launch. col2im is written in gather form, one thread per input
pixel summing the windows that cover it, so it needs no atomics and is deterministic.

Only reached through :mod:`gpucnn.im2col` when the arrays are CuPy arrays; cupy itself
comes from :func:`gpucnn.backend.cupy_status`, never imported here.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from gpucnn.backend import Array, cupy_status

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

_COL2IM = r"""
    const ptrdiff_t n = i % N;
    ptrdiff_t t = i / N;
    const int x_ = t % W; t /= W;
    const int y = t % H;
    const ptrdiff_t c = t / H;
    T acc = 0;
    for (int ki = 0; ki < KH; ++ki) {
        const int dy = y - ki;
        if (dy < 0) break;
        if (dy % SH) continue;
        const int oy = dy / SH;
        if (oy >= OH) continue;
        for (int kj = 0; kj < KW; ++kj) {
            const int dx = x_ - kj;
            if (dx < 0) break;
            if (dx % SW) continue;
            const int ox = dx / SW;
            if (ox >= OW) continue;
            const int si = FLIP ? KH - 1 - ki : ki;  // the slot that holds this offset
            const int sj = FLIP ? KW - 1 - kj : kj;
            acc += col[((((c * KH + si) * KW + sj) * OH + oy) * OW + ox) * N + n];
        }
    }
    img = acc;
"""

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

_MAXPOOL_BACKWARD = r"""
    const ptrdiff_t n = i % N;
    ptrdiff_t t = i / N;
    const int x_ = t % W; t /= W;
    const int y = t % H;
    const ptrdiff_t c = t / H;
    T acc = 0;
    for (int qi = 0; qi < QH; ++qi) {
        const int dy = y - qi;
        if (dy < 0) break;
        if (dy % SH) continue;
        const int oy = dy / SH;
        if (oy >= OH) continue;
        for (int qj = 0; qj < QW; ++qj) {
            const int dx = x_ - qj;
            if (dx < 0) break;
            if (dx % SW) continue;
            const int ox = dx / SW;
            if (ox >= OW) continue;
            const ptrdiff_t o = ((c * OH + oy) * OW + ox) * N + n;
            if (arg[o] == qi * QW + qj) acc += grad[o];
        }
    }
    img_grad = acc;
"""

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
