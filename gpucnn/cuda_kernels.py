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
    const int y = oy * SH + ki;
    const int x_ = ox * SW + kj;
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
            acc += col[((((c * KH + ki) * KW + kj) * OH + oy) * OW + ox) * N + n];
        }
    }
    img = acc;
"""

_PARAMS = "int32 H, int32 W, int32 N, int32 KH, int32 KW, int32 OH, int32 OW, int32 SH, int32 SW"


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


def im2col(x: Array, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int) -> Array:
    """(C, H, W, N) -> (C, KH, KW, OH, OW, N) in one launch."""
    cupy = _cupy()
    c, h, w, n = x.shape
    x = cupy.ascontiguousarray(x)
    col = cupy.empty((c, kh, kw, oh, ow, n), dtype=x.dtype)
    _kernels()[0](x, h, w, n, kh, kw, oh, ow, sh, sw, col)
    return col


def col2im(col: Array, h: int, w: int, sh: int, sw: int) -> Array:
    """(C, KH, KW, OH, OW, N) -> (C, H, W, N), summing overlaps, in one launch."""
    cupy = _cupy()
    c, kh, kw, oh, ow, n = col.shape
    col = cupy.ascontiguousarray(col)
    img = cupy.empty((c, h, w, n), dtype=col.dtype)
    _kernels()[1](col, h, w, n, kh, kw, oh, ow, sh, sw, img)
    return img
