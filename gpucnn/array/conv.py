"""A convolution's products as im2col + GEMM, on NumPy in cache-sized blocks of output rows
(part of the array layer).

The whole im2col matrix of a LeNet layer at batch 33 is 1.7-1.9 MB. Written in one piece
into fresh memory it has left the core's 2 MB L2 cache by the time the GEMM reads it back.
Here each block of output rows (about BLOCK_BYTES of columns) is unfolded into one small
buffer and multiplied at once, while it is still in cache, and nothing is kept: the
backward pass unfolds the blocks again from the layer's input for the weight gradient.
On a 2-core Xeon with one BLAS thread, LeNet's two convolutions at batch 33 went from
340 and 310 us to 155 and 190 us forward, and from 170 and 630 us to 210 and 575 us
backward (docs/performance.md).

Each output is the same dot product as in the one-piece product; the weight gradient
sums the blocks' products, equal up to float rounding. CuPy unfolds in one kernel and
keeps the matrix (cuBLAS and the GPU's caches have no such problem).
"""

from __future__ import annotations

from collections.abc import Iterator

from gpucnn.array import cuda_kernels
from gpucnn.array.backend import Array, array_module, is_gpu
from gpucnn.array.im2col import col2im, matmul_nt, output_size, window_view
from gpucnn.array.threads import parallel_for, parallel_parts

# Bytes of im2col columns one block may take: well inside a 2 MB L2 with the block's
# output and the weights beside it. Measured on LeNet at batch 33 (2-core Xeon): 128 KB
# to 512 KB within 3% of each other, 1.7 MB (one block) 30-60% slower.
BLOCK_BYTES = 256 << 10


def rows_per_block(out_rows: int, bytes_per_row: int, budget: int | None = None) -> int:
    """The largest divisor of ``out_rows`` whose rows' columns fit in ``budget`` bytes
    (BLOCK_BYTES by default; at least 1 row): blocks of equal size, one buffer for all."""
    most = max(1, (BLOCK_BYTES if budget is None else budget) // max(1, bytes_per_row))
    return max(d for d in range(1, min(most, out_rows) + 1) if out_rows % d == 0)


def conv_forward(
    x: Array,
    kernels: Array,
    bias: Array | None,
    window: tuple[int, int],
    stride: tuple[int, int],
    flip: bool,
) -> tuple[Array, Array | None]:
    """(K @ im2col(x) + bias as (P, OH, OW, N), the im2col matrix where it is kept, else
    None).

    ``x`` is a padded (C, H, W, N) image, ``kernels`` the (P, C*KH*KW) weight matrix,
    ``bias`` (P,) or None; ``flip`` unfolds windows flipped (true convolution, see
    :func:`im2col`). Pass both results on to :func:`conv_weight_grad`.
    """
    xp = array_module(x, kernels)
    c, h, w, n = x.shape
    (kh, kw), (sh, sw) = window, stride
    oh, ow = output_size(h, kh, sh), output_size(w, kw, sw)
    p, depth = kernels.shape
    if is_gpu(xp):
        cols = cuda_kernels.im2col(x, kh, kw, sh, sw, oh, ow, flip).reshape(depth, -1)
        out = kernels @ cols
        if bias is not None:
            out += bias[:, None]
        return out.reshape(p, oh, ow, n), cols
    if bias is not None:  # the bias is one more kernel column, against a row of ones
        kernels = xp.concatenate([kernels, bias[:, None]], axis=1)
    out = xp.empty((p, oh, ow * n), dtype=x.dtype)
    for top, block in _column_blocks(x, window, stride, flip, ones=bias is not None):
        rows = block.shape[1] // (ow * n)
        xp.matmul(kernels, block, out=out[:, top : top + rows].reshape(p, -1))
    return out.reshape(p, oh, ow, n), None


def conv_weight_grad(
    x: Array,
    cols: Array | None,
    grad_out: Array,
    window: tuple[int, int],
    stride: tuple[int, int],
    flip: bool,
    bias: bool,
) -> tuple[Array, Array | None]:
    """(dL/dK as the (P, C*KH*KW) matrix, grad @ im2col(x).T; dL/dbias (P,) if ``bias``
    else None) for the padded input ``x`` and ``cols`` of :func:`conv_forward` and the
    (P, OH, OW, N) gradient of its output."""
    p = grad_out.shape[0]
    grad = grad_out.reshape(p, grad_out.shape[1], -1)  # (P, OH, OW*N)
    if cols is not None:
        flat = grad.reshape(p, -1)
        return matmul_nt(flat, cols), flat.sum(axis=1) if bias else None
    xp = array_module(x, grad_out)
    total = None
    for top, block in _column_blocks(x, window, stride, flip, ones=bias):
        rows = block.shape[1] // grad.shape[2]
        part = grad[:, top : top + rows].reshape(p, -1)
        product = block @ part.T  # (C*KH*KW [+1], P): the faster orientation (matmul_nt)
        total = product if total is None else xp.add(total, product, out=total)
    if bias:  # the row of ones gave each kernel's sum of its output gradient
        return total[:-1].T, total[-1]
    return total.T, None


def _column_blocks(
    x: Array, window: tuple[int, int], stride: tuple[int, int], flip: bool, ones: bool
) -> Iterator[tuple[int, Array]]:
    """(first output row, that block's im2col matrix (C*KH*KW, rows*OW*N), with a last
    row of ones if ``ones``) for each block of output rows in turn. The blocks share one
    buffer: use each before the next."""
    xp = array_module(x)
    c, h, w, n = x.shape
    (kh, kw), (sh, sw) = window, stride
    oh, ow = output_size(h, kh, sh), output_size(w, kw, sw)
    depth = c * kh * kw
    rows = rows_per_block(oh, depth * ow * n * x.itemsize)
    width = rows * ow * n
    windows = window_view(x, kh, kw, sh, sw, flip)  # (C, KH, KW, OH, OW, N), no copy
    matrix = xp.empty((depth + ones, width), dtype=x.dtype)
    if ones:
        matrix[depth] = 1
    unfolded = matrix[:depth].reshape(c, kh, kw, rows, ow, n)
    inline = parallel_parts(xp, kh, unfolded.size) == 1  # decided once: blocks are many
    for top in range(0, oh, rows):
        block = windows[:, :, :, top : top + rows]
        if inline:
            xp.copyto(unfolded, block)
        else:
            _copy_windows(xp, unfolded, block)
        yield top, matrix


def conv_input_grad(
    kernels: Array,
    grad_out: Array,
    padded_hw: tuple[int, int],
    window: tuple[int, int],
    stride: tuple[int, int],
    flip: bool,
) -> Array:
    """dL/dx on the padded input (C, H, W, N): K.T @ grad folded back by col2im."""
    p, depth = kernels.shape
    c = depth // (window[0] * window[1])
    _, oh, ow, n = grad_out.shape
    grad_cols = (kernels.T @ grad_out.reshape(p, -1)).reshape(c, *window, oh, ow, n)
    return col2im(grad_cols, *padded_hw, *stride, flip=flip)


def _copy_windows(xp: object, target: Array, windows: Array) -> None:
    """``target[...] = windows``, split over threads by kernel row (disjoint writes)."""

    def copy_kernel_rows(start: int, stop: int) -> None:
        target[:, start:stop] = windows[:, start:stop]

    parallel_for(xp, windows.shape[1], target.size, copy_kernel_rows)
