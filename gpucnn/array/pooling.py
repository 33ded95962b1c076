"""Pooling primitives on the internal (C, H, W, N) layout (part of the array layer): max,
sum and sum of squares over windows, and their backward passes, split over channels
across threads for large maps; one CUDA kernel each on the GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpucnn.array import cuda_kernels
from gpucnn.array.backend import Array, array_module, is_gpu
from gpucnn.array.im2col import window_offsets, window_slices
from gpucnn.array.threads import parallel_for


def _channel_split(x: Array, body: Callable[[slice], None]) -> None:
    """Run ``body(channel_slice)`` over the channels of (C, ...) arrays, in parallel."""
    parallel_for(array_module(x), x.shape[0], x.size, lambda a, b: body(slice(a, b)))


def max_pool(
    x: Array, window: tuple[int, int], stride: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[Array, Any]:
    """Max over each window. Returns (output, what max_pool_backward needs).

    NumPy: one elementwise maximum per kernel offset; backward finds the winners again
    from the input and output. CuPy: one kernel that also saves each window's winner.
    """
    xp = array_module(x)
    if is_gpu(xp):
        out, arg = cuda_kernels.max_pool(x, window, stride, out_hw)
        return out, (x.shape, arg)
    if _small_tiling(x.shape, window, stride, out_hw):
        best = _tiles(x, window).max(axis=(2, 4))
        return best, (x, best)
    offsets = window_offsets(window)
    out = xp.empty((x.shape[0], *out_hw, x.shape[3]), dtype=x.dtype)

    def body(ch: slice) -> None:
        part = x[ch]
        best = out[ch]
        best[...] = part[window_slices(*offsets[0], *out_hw, *stride)]
        for i, j in offsets[1:]:
            xp.maximum(best, part[window_slices(i, j, *out_hw, *stride)], out=best)

    _channel_split(x, body)
    return out, (x, out)


def max_pool_backward(
    saved: Any, grad_out: Array, window: tuple[int, int], stride: tuple[int, int]
) -> Array:
    """Route each window's gradient to its first maximum (row-major window order), so
    ties never duplicate it."""
    xp = array_module(grad_out)
    if is_gpu(xp):
        x_shape, arg = saved
        return cuda_kernels.max_pool_backward(arg, grad_out, x_shape, window, stride)
    x, best = saved
    out_hw = best.shape[1:3]
    disjoint = stride[0] >= window[0] and stride[1] >= window[1]
    grad_in = (xp.empty if disjoint and _covers(x.shape, window, stride, out_hw) else xp.zeros)(
        x.shape, dtype=grad_out.dtype
    )

    def routed(ch: slice) -> None:
        part, top, grad, target = x[ch], best[ch], grad_out[ch], grad_in[ch]
        taken = xp.zeros(top.shape, dtype=bool)
        for i, j in window_offsets(window):
            sl = window_slices(i, j, *out_hw, *stride)
            hit = part[sl] == top
            hit &= ~taken
            taken |= hit
            if disjoint:  # each input pixel lies in at most one window: write, don't add
                xp.multiply(grad, hit, out=target[sl])
            else:
                target[sl] += grad * hit

    def tiled(ch: slice) -> None:
        # Windows as big as their stride: compare every pixel with its window's maximum
        # in one broadcast pass; the mask times the gradient is the answer once each
        # window keeps only its first hit.
        hit = _tiles(x[ch], window, out_hw) == _spread(best[ch])
        if int(xp.count_nonzero(hit)) != best[ch].size:  # ties (or NaN windows, no hit)
            _keep_first_hits(hit, window)
        target = _tiles(grad_in[ch], window, out_hw)
        xp.copyto(target, hit)
        target *= _spread(grad_out[ch])

    _channel_split(x, tiled if tuple(stride) == tuple(window) else routed)
    return grad_in


SMALL_MAP = 1 << 14  # elements; below this, per-call overhead outweighs the passes


def _small_tiling(
    shape: tuple[int, ...],
    window: tuple[int, int],
    stride: tuple[int, int],
    out_hw: tuple[int, ...],
) -> bool:
    """A small map whose windows tile it exactly: a few whole-array calls beat a loop
    over offsets (for the lecture's 3x3/3 pool, 10 us against 45 us)."""
    return int(shape[0] * shape[1] * shape[2] * shape[3]) <= SMALL_MAP and _covers(
        shape, window, stride, out_hw
    )


def _tiles(x: Array, window: tuple[int, int], out_hw: tuple[int, int] | None = None) -> Array:
    """(C, H, W, N) -> the view (C, OH, QH, OW, QW, N) of its stride-Q windows (the rows
    and columns past the last whole window are left out)."""
    c, h, w, n = x.shape
    (qh, qw) = window
    oh, ow = out_hw or (h // qh, w // qw)
    return x[:, : oh * qh, : ow * qw, :].reshape(c, oh, qh, ow, qw, n)


def _keep_first_hits(hit: Array, window: tuple[int, int]) -> None:
    """Clear, in place, every hit after the first of its window (row-major window order);
    ``hit`` is a (C, OH, QH, OW, QW, N) mask."""
    taken = hit[:, :, 0, :, 0, :].copy()
    for i, j in window_offsets(window)[1:]:
        entry = hit[:, :, i, :, j, :]
        entry &= ~taken
        taken |= entry


def _spread(per_window: Array) -> Array:
    """(C, OH, OW, N) -> the view (C, OH, 1, OW, 1, N) that broadcasts against _tiles."""
    return per_window[:, :, None, :, None, :]


def _covers(
    shape: tuple[int, ...],
    window: tuple[int, int],
    stride: tuple[int, int],
    out_hw: tuple[int, ...],
) -> bool:
    """Whether disjoint windows tile the whole input (so every pixel gets written)."""
    return (
        stride == window and out_hw[0] * window[0] == shape[1] and out_hw[1] * window[1] == shape[2]
    )


def sum_pool(
    x: Array,
    window: tuple[int, int],
    stride: tuple[int, int],
    out_hw: tuple[int, int],
    square: bool,
) -> Array:
    """Sum (of squares, if ``square``) over each window."""
    xp = array_module(x)
    if is_gpu(xp):
        return cuda_kernels.sum_pool(x, window, stride, out_hw, square)
    out = xp.zeros((x.shape[0], *out_hw, x.shape[3]), dtype=x.dtype)

    def body(ch: slice) -> None:
        part, total = x[ch], out[ch]
        for i, j in window_offsets(window):
            values = part[window_slices(i, j, *out_hw, *stride)]
            total += values * values if square else values

    _channel_split(x, body)
    return out


def spread_pool_grad(
    grad_window: Array,
    x_shape: tuple[int, ...],
    window: tuple[int, int],
    stride: tuple[int, int],
    x: Array | None = None,
) -> Array:
    """Backward of :func:`sum_pool`: each window's gradient added to all its pixels,
    times the pixel itself when ``x`` is given (the L2 case, with the 1/norm factor
    already folded into ``grad_window``)."""
    xp = array_module(grad_window)
    if is_gpu(xp):
        return cuda_kernels.spread_pool_grad(grad_window, x_shape, window, stride, x)
    out_hw = grad_window.shape[1:3]
    grad_in = xp.zeros(x_shape, dtype=grad_window.dtype)

    def body(ch: slice) -> None:
        grad, target = grad_window[ch], grad_in[ch]
        for i, j in window_offsets(window):
            sl = window_slices(i, j, *out_hw, *stride)
            target[sl] += grad if x is None else grad * x[ch][sl]

    _channel_split(grad_in, body)
    return grad_in
