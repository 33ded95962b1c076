"""A convolution's three products (output, weight gradient, input gradient), part of the
array layer: as im2col + one GEMM each, or on NumPy with one BLAS thread as stacks of
GEMMs over a row-unfolded input.

The im2col matrix repeats every input pixel KH*KW times: for a LeNet layer at batch 33
it is 1.7-1.9 MB, written into fresh memory and read back after it has left a 2 MB L2
cache. The *row unfold* repeats it only KW times, unfolding each padded input row along
the kernel's width:

    U[h, c, j, b, n] = x[c, h, b*SW + j, n]          shape (H, C, KW, OW, N).

The columns of output row ``a`` are then U's rows a*SH .. a*SH+KH-1, one contiguous
(KH*C*KW, OW*N) block: a strided view, never copied. Each product is one ``np.matmul``
over the stack of those OH blocks (NumPy calls BLAS once per block), with the kernels
reordered to match, (P, KH, C, KW), and flipped for true convolution in that tiny copy.
U is kept for the weight gradient. The input gradient of a stride-1 layer is the same
stack read backwards: input row h gets the output gradient's rows h-KH+1 .. h (zero
beyond the map), one contiguous (KH*P, OW*N) block of the transposed, zero-padded
gradient, so a stack of H GEMMs writes each row of dL/dU once and KW additions fold it
onto the image, where col2im makes KH*KW.

Measured on a 2-core Xeon with one BLAS thread, LeNet at batch 33, µs, against im2col in
cache-sized blocks: conv1 forward 119 → 87 and weight gradient 144 → 69; conv2 forward
180 → 148, weight gradient 240 → 142, input gradient 374 → 222 (docs/performance.md).
For 3x3 kernels col2im's 9 passes cost no more than the row fold's extra arithmetic (H/OH
times im2col's, for the padding rows), so they keep col2im.

Where the row unfold is used is decided once per forward pass (:func:`row_unfold_pays`)
and kept in the :class:`ConvGeometry` that the backward pass gets. Not on CuPy (its
one-launch im2col/col2im kernels and one cuBLAS call per product), nor for a map whose
im2col matrix is small enough to stay in cache (the lecture's nets), nor where BLAS runs
several threads: each of the stack's small GEMMs then pays the threads' hand-off (the
digits net at batch 32 took 2.67 ms a step against 2.48-2.51 with im2col).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gpucnn.array.backend import Array, array_module, is_gpu
from gpucnn.array.im2col import col2im, im2col, matmul_nt, output_size
from gpucnn.array.threads import blas_threads, parallel_for

# A map whose im2col matrix takes at most this many bytes is unfolded whole: it stays in
# the cache between the unfold and the GEMM.
ROW_UNFOLD_MIN_BYTES = 256 << 10
# The input gradient folds through the row unfold for kernels at least this tall, with
# stride 1; shorter kernels use col2im. 5x5: 25-30% faster than col2im (LeNet); 3x3: a
# tie or up to 20% slower (the digits and CIFAR nets).
ROW_FOLD_MIN_KERNEL_HEIGHT = 4


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
    shape = ConvGeometry(c, h, w, n, kernels.shape[0], tuple(window), tuple(stride), flip)
    columns = shape.depth * shape.out_hw[0] * shape.out_hw[1] * n * x.itemsize
    if row_unfold_pays(array_module(x), columns):
        shape = replace(shape, row_unfold=True)
    return shape


def row_unfold_pays(xp: object, column_bytes: int) -> bool:
    """Whether a convolution whose im2col matrix takes ``column_bytes`` runs over the row
    unfold: on NumPy, for a matrix larger than ROW_UNFOLD_MIN_BYTES, where BLAS runs one
    thread (a batch slice, a worker process)."""
    return not is_gpu(xp) and column_bytes > ROW_UNFOLD_MIN_BYTES and blas_threads() == 1


def conv_forward(
    x: Array, kernels: Array, bias: Array | None, g: ConvGeometry
) -> tuple[Array, Array]:
    """(the output (P, OH, OW, N), what :func:`conv_weight_grad` needs of the input).

    ``x`` is the padded (C, H, W, N) input, ``kernels`` the (P, C*KH*KW) weight matrix
    as stored, ``bias`` (P,) or None. The second result is the row unfold or the im2col
    matrix, as ``g.row_unfold`` says.
    """
    xp = array_module(x, kernels)
    oh, ow = g.out_hw
    if not g.row_unfold:
        cols = im2col(x, *g.window, *g.stride, flip=g.flip).reshape(g.depth, -1)
        out = kernels @ cols
        if bias is not None:
            out += bias[:, None]
        return out.reshape(g.kernels, oh, ow, g.batch), cols
    unfold = row_unfold(x, g)
    out = xp.empty((g.kernels, oh, ow * g.batch), dtype=x.dtype)
    # out[:, a] = K' @ block a, for every a in one call, written in place
    xp.matmul(row_kernels(kernels, g), _row_blocks(unfold, g), out=out.transpose(1, 0, 2))
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
    oh = g.out_hw[0]
    by_row = grad_out.reshape(g.kernels, oh, -1).transpose(1, 2, 0)  # (OH, OW*N, P) view
    # block a (KH*C*KW, OW*N) @ gradient row a (OW*N, P), summed over a: (KH*C*KW, P)
    per_row = array_module(saved).matmul(_row_blocks(saved, g), by_row)
    return _stored_kernels(per_row.sum(axis=0).T, g), grad_bias


def conv_input_grad(kernels: Array, grad_out: Array, g: ConvGeometry) -> Array:
    """dL/dx on the padded input (C, H, W, N), for the stored (P, C*KH*KW) ``kernels``
    and the (P, OH, OW, N) gradient of the output."""
    if g.row_unfold and g.stride[0] == 1 and g.window[0] >= ROW_FOLD_MIN_KERNEL_HEIGHT:
        return _row_fold(_row_unfold_grad(kernels, grad_out, g), g)
    oh, ow = g.out_hw
    grad_cols = kernels.T @ grad_out.reshape(g.kernels, -1)
    grad_cols = grad_cols.reshape(g.channels, *g.window, oh, ow, g.batch)
    return col2im(grad_cols, g.height, g.width, *g.stride, flip=g.flip)


# -- the row unfold (NumPy) ---------------------------------------------------------------
def row_unfold(x: Array, g: ConvGeometry) -> Array:
    """U[h, c, j, b, n] = x[c, h, b*SW + j, n]: (H, C, KW, OW, N), a fresh array."""
    xp = array_module(x)
    ow, kw, sw = g.out_hw[1], g.window[1], g.stride[1]
    step_c, step_h, step_w, step_n = x.strides
    windows = xp.lib.stride_tricks.as_strided(
        x,
        shape=(g.height, g.channels, kw, ow, g.batch),
        strides=(step_h, step_c, step_w, step_w * sw, step_n),
        writeable=False,
    )
    unfold = xp.empty(windows.shape, dtype=x.dtype)

    def copy_rows(start: int, stop: int) -> None:  # threads take disjoint input rows
        unfold[start:stop] = windows[start:stop]

    parallel_for(xp, g.height, unfold.size, copy_rows)
    return unfold


def _row_blocks(unfold: Array, g: ConvGeometry) -> Array:
    """The (OH, KH*C*KW, OW*N) stack of each output row's columns: a view of ``unfold``."""
    oh, ow = g.out_hw
    row = unfold.strides[0]
    return array_module(unfold).lib.stride_tricks.as_strided(
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
    return array_module(kernels).ascontiguousarray(k.transpose(0, 2, 1, 3)).reshape(g.kernels, -1)


def _stored_kernels(rows: Array, g: ConvGeometry) -> Array:
    """The inverse of :func:`row_kernels`: (P, KH*C*KW) -> the stored (P, C*KH*KW)."""
    kh, kw = g.window
    k = rows.reshape(g.kernels, kh, g.channels, kw).transpose(0, 2, 1, 3)
    if g.flip:
        k = k[:, :, ::-1, ::-1]
    return array_module(rows).ascontiguousarray(k).reshape(g.kernels, -1)


def _row_unfold_grad(kernels: Array, grad_out: Array, g: ConvGeometry) -> Array:
    """dL/dU for stride 1, (H, C*KW, OW*N): row h is the sum over kernel rows i of
    K'_i.T @ grad row h - i, one GEMM per h over the zero-padded gradient."""
    xp = array_module(kernels, grad_out)
    kh = g.window[0]
    oh, ow = g.out_hw
    p, width = g.kernels, ow * g.batch
    # rows of the transposed gradient (a, P, OW*N), KH-1 rows of zeros on either side
    padded = xp.zeros((oh + 2 * (kh - 1), p, width), dtype=grad_out.dtype)
    padded[kh - 1 : kh - 1 + oh] = grad_out.reshape(p, oh, width).transpose(1, 0, 2)
    stacked = xp.lib.stride_tricks.as_strided(
        padded,
        shape=(g.height, kh * p, width),
        strides=padded.strides,
        writeable=False,
    )
    # [K'_{KH-1}.T ... K'_0.T]: (C*KW, KH*P), so that block q meets gradient row h-KH+1+q
    k_rows = row_kernels(kernels, g).reshape(p, kh, -1)[:, ::-1]
    k_stack = xp.ascontiguousarray(k_rows.transpose(2, 1, 0)).reshape(-1, kh * p)
    return xp.matmul(k_stack, stacked)


def _row_fold(grad_unfold: Array, g: ConvGeometry) -> Array:
    """The adjoint of :func:`row_unfold`: dL/dx (C, H, W, N) from dL/dU, KW additions."""
    xp = array_module(grad_unfold)
    kw, sw = g.window[1], g.stride[1]
    ow = g.out_hw[1]
    parts = grad_unfold.reshape(g.height, g.channels, kw, ow, g.batch).transpose(1, 2, 0, 3, 4)
    image = xp.zeros((g.channels, g.height, g.width, g.batch), dtype=grad_unfold.dtype)

    def add_channels(start: int, stop: int) -> None:  # threads take disjoint channels
        for j in range(kw):
            image[start:stop, :, j : j + sw * (ow - 1) + 1 : sw] += parts[start:stop, j]

    parallel_for(xp, g.channels, grad_unfold.size, add_channels)
    return image
