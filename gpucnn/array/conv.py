"""A convolution's products as im2col + GEMM, on NumPy in cache-sized blocks of output rows
(part of the array layer).

The whole im2col matrix of a LeNet layer at batch 33 is 1.7-1.9 MB. Written in one piece
into fresh memory it has left the core's 2 MB L2 cache by the time the GEMM reads it back.
Here each block of output rows (about BLOCK_BYTES of columns) is unfolded into one small
buffer and multiplied at once, while it is still in cache, and nothing is kept: the
backward pass unfolds the blocks again from the layer's input for the weight gradient.
With one BLAS thread on a 2-core Xeon, LeNet's two convolutions at batch 33 went from
about 300 us each to 156 and 199 us forward, and conv2's backward from 645 to 590 us
(docs/performance.md).

Blocks are for one BLAS thread (a batch slice, a worker process). With more threads, on
CuPy, and for a map whose matrix fits one block, the matrix is unfolded whole and kept
for the backward pass. Each output is the same dot product either way; the weight
gradient sums the blocks' products, equal up to float rounding.
"""

from __future__ import annotations

import functools

from gpucnn.array.backend import Array, array_module, is_gpu
from gpucnn.array.im2col import col2im, im2col, matmul_nt, output_size, window_view
from gpucnn.array.threads import blas_threads, parallel_for, parallel_parts

# Bytes of im2col columns one block may take: well inside a 2 MB L2 with the block's
# output and the weights beside it. Measured on LeNet at batch 33 with one BLAS thread
# (2-core Xeon): 256 and 512 KB alike, 128 KB and below 5% slower (more blocks), 1 MB
# and more 15-21% slower. Blocks are for one BLAS thread only (a batch slice, a worker):
# with two, the digits net's step at batch 32 took 2.86 ms in 256 KB blocks, 2.54 ms in
# one (each small GEMM pays the threads' hand-off).
BLOCK_BYTES = 256 << 10


def rows_per_block(out_rows: int, bytes_per_row: int, budget: int | None = None) -> int:
    """The largest divisor of ``out_rows`` whose rows' columns fit in ``budget`` bytes
    (BLOCK_BYTES by default; at least 1 row): blocks of equal size, one buffer for all."""
    most = max(1, (BLOCK_BYTES if budget is None else budget) // max(1, bytes_per_row))
    return _largest_divisor(out_rows, min(most, out_rows))


@functools.lru_cache(maxsize=1024)
def _largest_divisor(number: int, most: int) -> int:
    return max(d for d in range(1, most + 1) if number % d == 0)


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
    rows = _block_rows(x, window, stride)
    if rows < oh and (is_gpu(xp) or blas_threads() > 1):
        rows = oh
    if rows == oh:  # one block (or cuBLAS, or several BLAS threads): unfold all, keep it
        cols = im2col(x, kh, kw, sh, sw, flip=flip).reshape(depth, -1)
        out = kernels @ cols
        if bias is not None:
            out += bias[:, None]
        return out.reshape(p, oh, ow, n), cols
    if bias is not None:  # the bias is one more kernel column, against a row of ones
        kernels = xp.concatenate([kernels, bias[:, None]], axis=1)
    blocks = _ColumnBlocks(x, window, stride, flip, rows, ones=bias is not None)
    out = xp.empty((p, oh, ow * n), dtype=x.dtype)
    for top in range(0, oh, rows):
        xp.matmul(kernels, blocks.unfold(top), out=out[:, top : top + rows].reshape(p, -1))
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
    p, oh = grad_out.shape[:2]
    grad = grad_out.reshape(p, oh, -1)  # (P, OH, OW*N)
    if cols is not None:  # kept whole by the forward pass
        flat = grad.reshape(p, -1)
        return matmul_nt(flat, cols), flat.sum(axis=1) if bias else None
    xp = array_module(x, grad_out)
    rows = _block_rows(x, window, stride)  # as the forward pass cut them
    blocks = _ColumnBlocks(x, window, stride, flip, rows, ones=bias)
    total = None
    for top in range(0, oh, rows):
        part = grad[:, top : top + rows].reshape(p, -1)
        product = blocks.unfold(top) @ part.T  # (C*KH*KW [+1], P): see matmul_nt
        total = product if total is None else xp.add(total, product, out=total)
    if bias:  # the row of ones gave each kernel's sum of its output gradient
        return total[:-1].T, total[-1]
    return total.T, None


def _block_rows(x: Array, window: tuple[int, int], stride: tuple[int, int]) -> int:
    """Output rows per block of the padded image ``x`` (all of them: one block)."""
    c, h, w, n = x.shape
    oh, ow = output_size(h, window[0], stride[0]), output_size(w, window[1], stride[1])
    row_bytes = c * window[0] * window[1] * ow * n * x.itemsize
    return oh if oh * row_bytes <= BLOCK_BYTES else rows_per_block(oh, row_bytes)


class _ColumnBlocks:
    """The im2col matrix of ``x`` in blocks of ``rows`` output rows: :meth:`unfold` gives
    the (C*KH*KW, rows*OW*N) matrix of the block from a row on, with a last row of ones
    if ``ones``. Every block is unfolded into the same buffer: use each before the next."""

    def __init__(
        self,
        x: Array,
        window: tuple[int, int],
        stride: tuple[int, int],
        flip: bool,
        rows: int,
        ones: bool,
    ) -> None:
        xp = self.xp = array_module(x)
        c, _, w, n = x.shape
        (kh, kw), (sh, sw) = window, stride
        ow = output_size(w, kw, sw)
        depth = c * kh * kw
        self.rows = rows
        self.windows = window_view(x, kh, kw, sh, sw, flip)  # (C, KH, KW, OH, OW, N)
        self.matrix = xp.empty((depth + ones, self.rows * ow * n), dtype=x.dtype)
        if ones:
            self.matrix[depth] = 1
        self.unfolded = self.matrix[:depth].reshape(c, kh, kw, self.rows, ow, n)
        # Decided once per layer call: its blocks are many.
        self.inline = parallel_parts(xp, kh, self.unfolded.size) == 1

    def unfold(self, top: int) -> Array:
        block = self.windows[:, :, :, top : top + self.rows]
        if self.inline:
            self.xp.copyto(self.unfolded, block)
        else:
            _copy_windows(self.xp, self.unfolded, block)
        return self.matrix


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
