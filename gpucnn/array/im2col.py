"""Sliding-window primitives on the internal batch-innermost layout (part of the array layer).

Notation (the same everywhere in gpucnn):
    N   batch size              C   input channels       P   output channels (kernels)
    H,W input height/width      KH,KW kernel size        SH,SW stride
    OH,OW output height/width = (H - KH) // SH + 1, (W - KW) // SW + 1

Internally images are stored (C, H, W, N): the batch is the innermost, contiguous axis,
so every window slice ``x[:, i:i+SH*OH:SH, j:j+SW*OW:SW, :]`` copies runs of N
contiguous numbers. This measured about 2x faster than NCHW for im2col on CPU. The
public API converts NCHW at the model's edge (:func:`nchw_to_internal`).

Both functions loop over the KH*KW kernel offsets only, never over batch items or
output pixels. col2im accumulates with slice ``+=`` per offset rather than
``np.add.at`` (about 12x slower).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from gpucnn.array import cuda_kernels
from gpucnn.array.backend import Array, array_module, is_gpu
from gpucnn.array.threads import parallel_for


def output_size(size: int, window: int, stride: int) -> int:
    """Number of valid window positions: floor((size - window) / stride) + 1."""
    return (size - window) // stride + 1


def window_slices(
    i: int, j: int, out_h: int, out_w: int, stride_h: int, stride_w: int
) -> tuple[slice, slice, slice, slice]:
    """Index of the (C, OH, OW, N) slab of an internal image touched by kernel offset (i, j)."""
    return (
        slice(None),
        slice(i, i + stride_h * (out_h - 1) + 1, stride_h),
        slice(j, j + stride_w * (out_w - 1) + 1, stride_w),
        slice(None),
    )


def window_offsets(window: tuple[int, int]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(window[0]) for j in range(window[1])]


def im2col(x: Array, kh: int, kw: int, sh: int, sw: int, flip: bool = False) -> Array:
    """Unfold windows: (C, H, W, N) -> (C, KH, KW, OH, OW, N), a fresh contiguous array.

    With ``flip``, slot (i, j) holds the pixel at window offset (KH-1-i, KW-1-j), so that
    ``K @ col`` is the true convolution with an unflipped K (no flipped copy of K needed).
    NumPy copies a strided view of all windows in one call: 1.2-2.5x faster than a slice
    copy per kernel offset, and fewer calls leave threads less to wait for on the GIL.
    """
    xp = array_module(x)
    c, h, w, n = x.shape
    oh, ow = output_size(h, kh, sh), output_size(w, kw, sw)
    if is_gpu(xp):
        return cuda_kernels.im2col(x, kh, kw, sh, sw, oh, ow, flip)
    windows = window_view(x, kh, kw, sh, sw, flip)
    col = xp.empty(windows.shape, dtype=x.dtype)

    def copy_rows(start: int, stop: int) -> None:  # threads take disjoint kernel rows
        col[:, start:stop] = windows[:, start:stop]

    parallel_for(xp, kh, col.size, copy_rows)
    return col


def window_view(x: Array, kh: int, kw: int, sh: int, sw: int, flip: bool = False) -> Array:
    """Read-only NumPy view (C, KH, KW, OH, OW, N) of every window of x, no copy: entry
    (c, i, j, a, b, n) is x[c, a*SH + i, b*SW + j, n], or x[c, a*SH + KH-1-i, ...] with
    ``flip`` (negative strides over the kernel axes)."""
    xp = array_module(x)
    c, h, w, n = x.shape
    oh, ow = output_size(h, kh, sh), output_size(w, kw, sw)
    step_c, step_h, step_w, step_n = x.strides
    kernel_h, kernel_w = step_h, step_w
    if flip:  # start at the window's last row and column, walk back
        x = x[:, kh - 1 :, kw - 1 :, :]
        kernel_h, kernel_w = -step_h, -step_w
    return xp.lib.stride_tricks.as_strided(
        x,
        shape=(c, kh, kw, oh, ow, n),
        strides=(step_c, kernel_h, kernel_w, step_h * sh, step_w * sw, step_n),
        writeable=False,
    )


def col2im(col: Array, h: int, w: int, sh: int, sw: int, flip: bool = False) -> Array:
    """Fold windows back, summing overlaps: (C, KH, KW, OH, OW, N) -> (C, H, W, N).

    The adjoint of :func:`im2col` (with the same ``flip``): pixels not covered by any
    window get zero.
    """
    xp = array_module(col)
    c, kh, kw, oh, ow, n = col.shape
    if is_gpu(xp):
        return cuda_kernels.col2im(col, h, w, sh, sw, flip)
    img = xp.zeros((c, h, w, n), dtype=col.dtype)

    def add_channels(start: int, stop: int) -> None:  # threads take disjoint channels
        part, source = img[start:stop], col[start:stop]
        with unbuffered_ufuncs(xp):
            for i in range(kh):
                for j in range(kw):
                    si, sj = (kh - 1 - i, kw - 1 - j) if flip else (i, j)
                    part[window_slices(si, sj, oh, ow, sh, sw)] += source[:, i, j]

    parallel_for(xp, c, col.size, add_channels)
    return img


# NumPy runs a ufunc on non-contiguous views through buffers of 8192 elements by default:
# each slab of a window (rows of OW*N numbers, strided) is copied into the buffer and the
# sum copied back. With buffers smaller than a row, NumPy works on the views in place.
# col2im's slab additions then measured 1.6-2x faster (LeNet's two maps, CIFAR-sized
# maps of 3 and 64 channels; docs/performance.md). Pooling's windows are rows of N and
# get slower so: this is for col2im only.
SLAB_BUFFER_SIZE = 256


@contextlib.contextmanager
def unbuffered_ufuncs(xp: Any) -> Iterator[None]:
    """NumPy's ufunc buffer at SLAB_BUFFER_SIZE elements for this thread, for the block."""
    previous = xp.setbufsize(SLAB_BUFFER_SIZE)
    try:
        yield
    finally:
        xp.setbufsize(previous)


GEMM_CHUNK = 4096


def matmul_nt(a: Array, b: Array) -> Array:
    """``a @ b.T`` for a (M, L) and b (K, L) with a long inner dimension L.

    A convolution's weight gradient is such a product: M and K are small (kernels and
    kernel entries) while L = OH*OW*N runs to 10^5 or more. OpenBLAS runs that shape at
    a fraction of its speed. On a 2-core CPU, computing ``(b @ a.T).T`` measured
    1.4-2.6x faster for every conv shape we tried, and summing it over 4096-column chunks
    gained another 1.1-1.8x once L passes 4096. cuBLAS has no such problem, so CuPy gets
    one call.
    """
    xp = array_module(a, b)
    length = a.shape[1]
    if is_gpu(xp):
        return a @ b.T
    if length <= GEMM_CHUNK:
        return (b @ a.T).T
    out = b[:, :GEMM_CHUNK] @ a[:, :GEMM_CHUNK].T
    for start in range(GEMM_CHUNK, length, GEMM_CHUNK):
        out += b[:, start : start + GEMM_CHUNK] @ a[:, start : start + GEMM_CHUNK].T
    return out.T


def pad_internal(x: Array, pads: tuple[int, int, int, int]) -> Array:
    """Zero-pad the spatial axes of a (C, H, W, N) array by (top, bottom, left, right)."""
    top, bottom, left, right = pads
    if not any(pads):
        return x
    xp = array_module(x)
    c, h, w, n = x.shape
    out = xp.zeros((c, h + top + bottom, w + left + right, n), dtype=x.dtype)
    out[:, top : top + h, left : left + w, :] = x
    return out


def unpad_internal(x: Array, pads: tuple[int, int, int, int]) -> Array:
    """Inverse of :func:`pad_internal`: drop the padded border."""
    top, bottom, left, right = pads
    if not any(pads):
        return x
    _, h, w, _ = x.shape
    return x[:, top : h - bottom, left : w - right, :]


def nchw_to_internal(x: Array) -> Array:
    """Public (N, C, H, W) -> internal (C, H, W, N), contiguous."""
    xp = array_module(x)
    return xp.ascontiguousarray(x.transpose(1, 2, 3, 0))


def internal_to_nchw(x: Array) -> Array:
    """Internal (C, H, W, N) -> public (N, C, H, W), contiguous."""
    xp = array_module(x)
    return xp.ascontiguousarray(x.transpose(3, 0, 1, 2))
