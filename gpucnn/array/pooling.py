"""Pooling primitives on the internal (C, H, W, N) layout (part of the array layer): max,
sum and sum of squares over windows, and their backward passes, split over channels
across threads for large maps; one CUDA kernel each on the GPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpucnn.array import cuda_kernels
from gpucnn.array.backend import Array, array_module, is_gpu
from gpucnn.array.im2col import window_offsets, window_slices
from gpucnn.array.threads import parallel_for, parallel_parts


def _channel_split(x: Array, body: Callable[[slice], None]) -> None:
    """Run ``body(channel_slice)`` over the channels of (C, ...) arrays, in parallel."""
    parallel_for(array_module(x), x.shape[0], x.size, lambda a, b: body(slice(a, b)))


def max_pool(
    x: Array, window: tuple[int, int], stride: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[Array, Any]:
    """Max over each window. Returns (output, what max_pool_backward needs).

    NumPy, windows that tile the map (stride == window): each window's pixels are first
    copied side by side (:func:`_stacked_windows`), then the maximum and the backward's
    comparisons run on contiguous arrays. Other strides: one elementwise maximum per
    kernel offset; backward finds the winners again from the input and output. CuPy: one
    kernel that also saves each window's winner.
    """
    xp = array_module(x)
    if is_gpu(xp):
        out, arg = cuda_kernels.max_pool(x, window, stride, out_hw)
        return out, (x.shape, arg)
    if tuple(stride) == tuple(window):
        # Small maps (and every batch slice) stay on one thread: whole-array calls, as
        # each call's overhead is most of their cost.
        inline = parallel_parts(xp, x.shape[0], x.size) == 1
        stacked = _stacked_windows(x, window, out_hw, inline)
        # One reduction over the stacked pixels (a NaN window's max is NaN): the lecture
        # net's 3x3 pool took 0.9 us so against 3.5 us for one maximum per pixel.
        if inline:
            best = stacked.max(axis=0)
        else:
            best = xp.empty(stacked.shape[1:], dtype=x.dtype)
            _channel_split(best, lambda ch: xp.max(stacked[:, ch], axis=0, out=best[ch]))
        return best, ("stacked", stacked, best, x.shape)
    offsets = window_offsets(window)
    out = xp.empty((x.shape[0], *out_hw, x.shape[3]), dtype=x.dtype)

    def body(ch: slice) -> None:
        part = x[ch]
        best = out[ch]
        best[...] = part[window_slices(*offsets[0], *out_hw, *stride)]
        for i, j in offsets[1:]:
            xp.maximum(best, part[window_slices(i, j, *out_hw, *stride)], out=best)

    _channel_split(x, body)
    return out, ("offsets", x, out)


def max_pool_backward(
    saved: Any, grad_out: Array, window: tuple[int, int], stride: tuple[int, int]
) -> Array:
    """Route each window's gradient to its first maximum (row-major window order), so
    ties never duplicate it."""
    xp = array_module(grad_out)
    if is_gpu(xp):
        x_shape, arg = saved
        return cuda_kernels.max_pool_backward(arg, grad_out, x_shape, window, stride)
    if saved[0] == "stacked":
        return _stacked_backward(*saved[1:], grad_out, window)
    _, x, best = saved
    out_hw = best.shape[1:3]
    grad_in = xp.zeros(x.shape, dtype=grad_out.dtype)

    def routed(ch: slice) -> None:
        part, top, grad, target = x[ch], best[ch], grad_out[ch], grad_in[ch]
        taken = xp.zeros(top.shape, dtype=bool)
        for i, j in window_offsets(window):
            sl = window_slices(i, j, *out_hw, *stride)
            hit = part[sl] == top
            hit &= ~taken
            taken |= hit
            target[sl] += grad * hit

    _channel_split(x, routed)
    return grad_in


def _stacked_windows(
    x: Array, window: tuple[int, int], out_hw: tuple[int, int], inline: bool
) -> Array:
    """(C, H, W, N) -> (QH*QW, C, OH, OW, N), a contiguous copy: entry k holds pixel k
    (row-major) of every stride-Q window; pixels past the last whole window are left
    out. NumPy runs a ufunc on a strided window view through an 8192-element buffer,
    and ties in real images cost the backward pass several such passes; on this copy,
    made by one strided copy (no buffer), they run on contiguous arrays. ``inline``: in
    one call, else a copy per helper thread's channels."""
    xp = array_module(x)
    (qh, qw), (oh, ow) = window, out_hw
    c, _, _, n = x.shape
    windows = _tiles(x, window, out_hw).transpose(2, 4, 0, 1, 3, 5)  # (QH, QW, C, OH, OW, N)
    if inline:
        return xp.ascontiguousarray(windows).reshape(qh * qw, c, oh, ow, n)
    stacked = xp.empty(windows.shape, dtype=x.dtype)
    _channel_split(x, lambda ch: xp.copyto(stacked[:, :, ch], windows[:, :, ch]))
    return stacked.reshape(qh * qw, c, oh, ow, n)


def _stacked_backward(
    stacked: Array,
    best: Array,
    x_shape: tuple[int, ...],
    grad_out: Array,
    window: tuple[int, int],
) -> Array:
    """The gradient of a stride-Q max pool from its stacked windows and maxima: each
    window's first pixel equal to its maximum (NaN windows: none) takes its gradient."""
    xp = array_module(stacked, grad_out)
    (qh, qw), (oh, ow) = window, best.shape[1:3]
    covers = oh * qh == x_shape[1] and ow * qw == x_shape[2]
    grad_in = (xp.empty if covers else xp.zeros)(x_shape, dtype=grad_out.dtype)

    def route_channels(ch: slice) -> None:
        hit = stacked[:, ch] == best[ch]
        if int(xp.count_nonzero(hit)) != best[ch].size:  # ties (or NaN windows, no hit)
            _keep_first_hits(hit)
        routed = xp.multiply(hit, grad_out[ch], dtype=grad_out.dtype)
        target = _tiles(grad_in[ch], window, (oh, ow)).transpose(2, 4, 0, 1, 3, 5)
        xp.copyto(target, routed.reshape(qh, qw, *routed.shape[1:]))

    _channel_split(grad_in, route_channels)
    return grad_in


def _keep_first_hits(hit: Array) -> None:
    """Clear, in place, every hit after the first of its window in a (Q, ...) mask of
    stacked windows (Q in row-major window order)."""
    xp = array_module(hit)
    taken = hit[0]
    for k in range(1, len(hit)):
        xp.logical_and(hit[k], xp.logical_not(taken), out=hit[k])
        if k + 1 < len(hit):
            taken = taken | hit[k] if k == 1 else xp.logical_or(taken, hit[k], out=taken)


def _tiles(x: Array, window: tuple[int, int], out_hw: tuple[int, int]) -> Array:
    """(C, H, W, N) -> the view (C, OH, QH, OW, QW, N) of its stride-Q windows (the rows
    and columns past the last whole window are left out)."""
    c, _, _, n = x.shape
    (qh, qw), (oh, ow) = window, out_hw
    return x[:, : oh * qh, : ow * qw, :].reshape(c, oh, qh, ow, qw, n)


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
