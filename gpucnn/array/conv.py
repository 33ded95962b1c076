"""A convolution's three products (output, weight gradient, input gradient), part of the
array layer: as im2col + one GEMM each, or on NumPy, where BLAS runs one thread, as
stacks of GEMMs over a row-unfolded input.

The im2col matrix repeats every input pixel KH*KW times: for a LeNet layer at batch 33
it is 1.7-1.9 MB, written into fresh memory and read back after it has left a 2 MB L2
cache. The *row unfold* repeats it only KW times, unfolding each padded input row along
the kernel's width:

    U[h, c, j, b, n] = x[c, h, b*SW + j, n]          shape (H, C, KW, OW, N),

about KH times smaller than im2col's matrix (KH*OH/H times). The columns of output row
``a`` are then U's rows a*SH .. a*SH+KH-1, one contiguous (KH*C*KW, OW*N) block: a
strided view, never copied. Each product is one ``np.matmul`` over the stack of those OH
blocks (NumPy calls BLAS once per block), with the kernels reordered to match, (P, KH,
C, KW), and flipped for true convolution in that tiny copy. U is kept for the weight
gradient.

The input gradient of a stride-1 layer is the same stack read backwards (the *row
fold*): input row h gets the output gradient's rows h-KH+1 .. h (zero beyond the map),
one contiguous (KH*P, OW*N) block of the transposed, zero-padded gradient, so a stack of
H GEMMs writes each row of dL/dU once and KW additions fold it onto the image, where
col2im makes KH*KW passes. It costs (H - OH) rows of extra arithmetic for the zero rows:
:func:`row_fold_pays` weighs the two.

Measured on a 2-core Xeon with one BLAS thread, LeNet at batch 33, µs, against im2col in
cache-sized blocks: conv1 forward 119 → 87 and weight gradient 144 → 69; conv2 forward
180 → 148, weight gradient 240 → 142, input gradient 374 → 222 (docs/performance.md).

Where the row unfold is used is decided once per forward pass (:func:`row_unfold_pays`)
and kept in the :class:`ConvGeometry` that the backward pass gets: where BLAS runs one
thread, which on a machine of 2-3 cores is each batch slice and worker process. Not on
CuPy (its one-launch im2col/col2im kernels and one cuBLAS call per product; the row
functions here are NumPy's only), nor for a map whose im2col matrix is small enough to
stay in cache (the lecture's nets), nor where BLAS runs several threads: each of the
stack's small GEMMs then pays the threads' hand-off (the digits net at batch 32 took
2.67 ms a step against 2.48-2.51 with im2col).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from gpucnn.array.backend import Array, array_module, is_gpu
from gpucnn.array.im2col import col2im, im2col, matmul_nt, output_size
from gpucnn.array.threads import blas_threads, parallel_for

# A map whose im2col matrix takes at most this many bytes stays on im2col: the matrix
# stays in the cache between the unfold and the GEMM.
ROW_UNFOLD_MIN_BYTES = 256 << 10
# The row fold pays while its extra multiply-adds (the zero rows) per col2im addition it
# saves stay at most this. Measured with one BLAS thread, row fold / col2im time: LeNet's
# conv2 (10 per saved addition) 0.72-0.79; the CIFAR net's 32x32 maps (3) 0.67-0.70, its
# 16x16 maps (12) 0.96-0.99, its 8x8 maps (48) 1.26-1.27; the digits net (24) 1.16-1.17.
ROW_FOLD_MAX_EXTRA_MACS = 12
# ... and while the GEMM's rows (C*KW) are enough for BLAS to run well: a 3-channel
# input (9 rows) took 1.3-1.4x col2im's time on 32x32 maps.
ROW_FOLD_MIN_ROWS = 16


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's shapes: its padded (C, H, W, N) input, P kernels of ``window``
    moved by ``stride``; ``flip`` for true convolution (the kernel turned by 180°);
    ``row_unfold``: whether its products run over the row unfold (else im2col)."""

    channels: int
    height: int
    width: int
    batch: int
    kernels: int
    window: tuple[int, int]
    stride: tuple[int, int]
    flip: bool
    row_unfold: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        return (
            output_size(self.height, self.window[0], self.stride[0]),
            output_size(self.width, self.window[1], self.stride[1]),
        )

    @property
    def depth(self) -> int:
        """Numbers in one window: C*KH*KW."""
        return self.channels * self.window[0] * self.window[1]


def conv_geometry(
    x: Array, kernels: Array, window: tuple[int, int], stride: tuple[int, int], flip: bool
) -> ConvGeometry:
    """The geometry of padded input ``x`` (C, H, W, N) and (P, C*KH*KW) ``kernels``, with
    the way its products are computed decided."""
    c, h, w, n = x.shape
    (kh, kw), (sh, sw) = window, stride
    oh, ow = output_size(h, kh, sh), output_size(w, kw, sw)
    column_bytes = c * kh * kw * oh * ow * n * x.itemsize
    rows = row_unfold_pays(array_module(x), column_bytes)
    return ConvGeometry(c, h, w, n, kernels.shape[0], (kh, kw), (sh, sw), flip, rows)


def row_unfold_pays(xp: object, column_bytes: int) -> bool:
    """Whether a convolution whose im2col matrix takes ``column_bytes`` runs over the row
    unfold: on NumPy, for a matrix larger than ROW_UNFOLD_MIN_BYTES, where BLAS runs one
    thread."""
    return not is_gpu(xp) and column_bytes > ROW_UNFOLD_MIN_BYTES and blas_threads() == 1


def row_fold_pays(g: ConvGeometry) -> bool:
    """Whether the input gradient of a convolution over the row unfold is folded by
    rows (else col2im): stride 1 down the map, C*KW rows at least ROW_FOLD_MIN_ROWS, and
    (H - OH)*KH*P extra multiply-adds per (KH - 1)*OH saved additions at most
    ROW_FOLD_MAX_EXTRA_MACS."""
    kh, oh = g.window[0], g.out_hw[0]
    if not g.row_unfold or g.stride[0] != 1 or kh == 1:
        return False
    if g.channels * g.window[1] < ROW_FOLD_MIN_ROWS:
        return False
    return (g.height - oh) * kh * g.kernels <= ROW_FOLD_MAX_EXTRA_MACS * (kh - 1) * oh


def conv_forward(
    x: Array, kernels: Array, bias: Array | None, g: ConvGeometry
) -> tuple[Array, Array]:
    """(the output (P, OH, OW, N), what :func:`conv_weight_grad` needs of the input).

    ``x`` is the padded (C, H, W, N) input, ``kernels`` the (P, C*KH*KW) weight matrix
    as stored, ``bias`` (P,) or None. The second result is the row unfold or the im2col
    matrix, as ``g.row_unfold`` says.
    """
    oh, ow = g.out_hw
    if not g.row_unfold:
        cols = im2col(x, *g.window, *g.stride, flip=g.flip).reshape(g.depth, -1)
        out = kernels @ cols
        if bias is not None:
            out += bias[:, None]
        return out.reshape(g.kernels, oh, ow, g.batch), cols
    unfold = row_unfold(x, g)
    out = numpy.empty((g.kernels, oh, ow * g.batch), dtype=x.dtype)
    # out[:, a] = K' @ block a, for every a in one call, written in place
    numpy.matmul(row_kernels(kernels, g), _row_blocks(unfold, g), out=out.transpose(1, 0, 2))
    if bias is not None:
        out += bias[:, None, None]
    return out.reshape(g.kernels, oh, ow, g.batch), unfold


def conv_weight_grad(
    saved: Array, grad_out: Array, g: ConvGeometry, bias: bool
) -> tuple[Array, Array | None]:
    """(dL/dK as the stored (P, C*KH*KW) matrix, dL/dbias (P,) if ``bias`` else None)
    from ``saved``, the second result of :func:`conv_forward`, and the (P, OH, OW, N)
    gradient of its output."""
    flat = grad_out.reshape(g.kernels, -1)
    grad_bias = flat.sum(axis=1) if bias else None
    if not g.row_unfold:
        return matmul_nt(flat, saved), grad_bias
    by_row = flat.reshape(g.kernels, g.out_hw[0], -1).transpose(1, 2, 0)  # (OH, OW*N, P)
    # block a (KH*C*KW, OW*N) @ gradient row a (OW*N, P), summed over a: (KH*C*KW, P)
    per_row = numpy.matmul(_row_blocks(saved, g), by_row)
    return _stored_kernels(per_row.sum(axis=0).T, g), grad_bias


def conv_input_grad(kernels: Array, grad_out: Array, g: ConvGeometry) -> Array:
    """dL/dx on the padded input (C, H, W, N), for the stored (P, C*KH*KW) ``kernels``
    and the (P, OH, OW, N) gradient of the output."""
    if row_fold_pays(g):
        return _row_fold(_row_unfold_grad(kernels, grad_out, g), g)
    oh, ow = g.out_hw
    grad_cols = kernels.T @ grad_out.reshape(g.kernels, -1)
    grad_cols = grad_cols.reshape(g.channels, *g.window, oh, ow, g.batch)
    return col2im(grad_cols, g.height, g.width, *g.stride, flip=g.flip)


# -- the row unfold (NumPy only) ---------------------------------------------------------------
def row_unfold(x: Array, g: ConvGeometry) -> Array:
    """U[h, c, j, b, n] = x[c, h, b*SW + j, n]: (H, C, KW, OW, N), a fresh array."""
    ow, kw, sw = g.out_hw[1], g.window[1], g.stride[1]
    step_c, step_h, step_w, step_n = x.strides
    windows = numpy.lib.stride_tricks.as_strided(
        x,
        shape=(g.height, g.channels, kw, ow, g.batch),
        strides=(step_h, step_c, step_w, step_w * sw, step_n),
        writeable=False,
    )
    unfold = numpy.empty(windows.shape, dtype=x.dtype)

    def copy_rows(start: int, stop: int) -> None:  # threads take disjoint input rows
        unfold[start:stop] = windows[start:stop]

    parallel_for(numpy, g.height, unfold.size, copy_rows)
    return unfold


def _row_blocks(unfold: Array, g: ConvGeometry) -> Array:
    """The (OH, KH*C*KW, OW*N) stack of each output row's columns: a view of ``unfold``."""
    oh, ow = g.out_hw
    row = unfold.strides[0]
    return numpy.lib.stride_tricks.as_strided(
        unfold,
        shape=(oh, g.depth, ow * g.batch),
        strides=(row * g.stride[0], unfold.strides[2], unfold.itemsize),
        writeable=False,
    )


def row_kernels(kernels: Array, g: ConvGeometry) -> Array:
    """The stored (P, C*KH*KW) kernels as (P, KH*C*KW) rows in the row unfold's order,
    flipped for true convolution."""
    kh, kw = g.window
    k = kernels.reshape(g.kernels, g.channels, kh, kw)
    if g.flip:
        k = k[:, :, ::-1, ::-1]
    return numpy.ascontiguousarray(k.transpose(0, 2, 1, 3)).reshape(g.kernels, -1)


def _stored_kernels(rows: Array, g: ConvGeometry) -> Array:
    """The inverse of :func:`row_kernels`: (P, KH*C*KW) -> the stored (P, C*KH*KW)."""
    kh, kw = g.window
    k = rows.reshape(g.kernels, kh, g.channels, kw).transpose(0, 2, 1, 3)
    if g.flip:
        k = k[:, :, ::-1, ::-1]
    return numpy.ascontiguousarray(k).reshape(g.kernels, -1)


def _row_unfold_grad(kernels: Array, grad_out: Array, g: ConvGeometry) -> Array:
    """dL/dU for stride 1, (H, C*KW, OW*N): row h is the sum over kernel rows i of
    K'_i.T @ grad row h - i, one GEMM per h over the zero-padded gradient."""
    kh = g.window[0]
    oh, ow = g.out_hw
    p, width = g.kernels, ow * g.batch
    # rows of the transposed gradient (a, P, OW*N), KH-1 rows of zeros on either side
    padded = numpy.zeros((oh + 2 * (kh - 1), p, width), dtype=grad_out.dtype)
    padded[kh - 1 : kh - 1 + oh] = grad_out.reshape(p, oh, width).transpose(1, 0, 2)
    stacked = numpy.lib.stride_tricks.as_strided(
        padded,
        shape=(g.height, kh * p, width),
        strides=padded.strides,
        writeable=False,
    )
    # [K'_{KH-1}.T ... K'_0.T]: (C*KW, KH*P), so that block q meets gradient row h-KH+1+q
    k_rows = row_kernels(kernels, g).reshape(p, kh, -1)[:, ::-1]
    k_stack = numpy.ascontiguousarray(k_rows.transpose(2, 1, 0)).reshape(-1, kh * p)
    return numpy.matmul(k_stack, stacked)


def _row_fold(grad_unfold: Array, g: ConvGeometry) -> Array:
    """The adjoint of :func:`row_unfold`: dL/dx (C, H, W, N) from dL/dU, KW additions."""
    kw, sw = g.window[1], g.stride[1]
    ow = g.out_hw[1]
    parts = grad_unfold.reshape(g.height, g.channels, kw, ow, g.batch).transpose(1, 2, 0, 3, 4)
    image = numpy.zeros((g.channels, g.height, g.width, g.batch), dtype=grad_unfold.dtype)

    def add_channels(start: int, stop: int) -> None:  # threads take disjoint channels
        for j in range(kw):
            image[start:stop, :, j : j + sw * (ow - 1) + 1 : sw] += parts[start:stop, j]

    parallel_for(numpy, g.channels, grad_unfold.size, add_channels)
    return image
