"""Array-layer primitives for pooling and ReLU on the internal (C, H, W, N) layout, and
the thread pool that runs NumPy's single-threaded passes on every core.

NumPy releases the GIL inside its loops, so disjoint parts of one array can be processed
by several threads at once. Each primitive splits its work along an axis where the
parts never write the same memory: channels for pooling, the flat array for ReLU, kernel
offsets for im2col. Arrays below ``PARALLEL_MIN_ELEMENTS`` stay on one thread, because a
hand-off costs tens of microseconds. CuPy arrays always take the single-call path.

``GPUCNN_THREADS`` sets the pool size. The default follows what we measured
(docs/performance.md). On 2 CPUs it is 1 (off): after each GEMM OpenBLAS's worker spins
for about 0.1 s on the other core, and a second pool competing with it made a LeNet step
10-40% slower. On more CPUs it
is 4, which made a LeNet step at batch 256 15% faster on a 16-core host.

A larger batch is split coarser: :func:`batch_parts` cuts it into contiguous slices of
samples. A training step sends slices 1..K-1 to worker processes
(:func:`run_parts_remote`, with :mod:`gpucnn.parallel.workers`), which scale better than threads
because they share no GIL; :func:`run_parts` runs each slice's whole forward or backward
pass in its own thread instead, where workers cannot run (the model keeps a clone of its
layers per slice). OpenBLAS is limited to its
share of the cores meanwhile, through threadpoolctl, and the fine-grained pool above runs
inline inside a part. ``GPUCNN_BATCH_THREADS`` sets the number of parts (default 2 where
there are 2 or more CPUs; 1 turns splitting off); it never exceeds BLAS's own thread
setting, so ``OPENBLAS_NUM_THREADS=1`` (or a joblib worker's budget) keeps one thread.
A part gets at least ``MIN_PART_SAMPLES`` samples in threads, ``MIN_PROCESS_PART_SAMPLES``
in worker processes: below that, on the 2-core machine, the Python overhead and hand-offs
cost more than they saved (docs/performance.md).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

from gpucnn.array import cuda_kernels
from gpucnn.array.backend import Array, array_module, is_gpu

CPUS = os.cpu_count() or 1
THREADS = max(1, int(os.environ.get("GPUCNN_THREADS", 1 if CPUS <= 2 else 4)))
PARALLEL_MIN_ELEMENTS = 1 << 16
BATCH_THREADS = max(1, int(os.environ.get("GPUCNN_BATCH_THREADS", min(2, CPUS))))
MIN_PART_SAMPLES = 64
MIN_PROCESS_PART_SAMPLES = 32  # per worker process (gpucnn.parallel.workers): less overhead
_EXECUTOR: list[ThreadPoolExecutor] = []
_PART_EXECUTOR: list[ThreadPoolExecutor] = []
_BLAS: list[Any] = []  # [threadpoolctl controller of the BLAS libraries, or None]
_IN_PART = threading.local()
T = TypeVar("T")


def _executor() -> ThreadPoolExecutor:
    if not _EXECUTOR:
        _EXECUTOR.append(ThreadPoolExecutor(THREADS, thread_name_prefix="gpucnn"))
    return _EXECUTOR[0]


def parallel_for(xp: Any, count: int, work: int, body: Callable[[int, int], None]) -> None:
    """Run ``body(start, stop)`` over ``range(count)`` in up to THREADS contiguous parts.

    ``work`` is the number of elements touched, deciding whether threads pay off. The
    parts must write disjoint memory.
    """
    parts = min(THREADS, count)
    if parts <= 1 or work < PARALLEL_MIN_ELEMENTS or is_gpu(xp) or _inside_part():
        body(0, count)
        return
    bounds = [count * k // parts for k in range(parts + 1)]
    futures = [_executor().submit(body, bounds[k], bounds[k + 1]) for k in range(1, parts)]
    body(bounds[0], bounds[1])
    for future in futures:
        future.result()


def _blas_controller() -> Any:
    """threadpoolctl's handle on the loaded BLAS libraries, or None where it cannot act."""
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415

            blas = ThreadpoolController().select(user_api="blas")
            _BLAS.append(blas if blas.lib_controllers else None)
        except ImportError:
            _BLAS.append(None)
    return _BLAS[0]


def _inside_part() -> bool:
    return getattr(_IN_PART, "active", False)


def batch_parts(xp: Any, n: int, min_samples: int | None = None, lead: float = 0.0) -> list[slice]:
    """Contiguous slices of a batch of ``n`` samples, one per thread (or worker process)
    that will run it, each of at least ``min_samples`` (default ``MIN_PART_SAMPLES``).
    The first slice gets ``lead`` (a fraction) more than an even share.

    One slice (no split) on CuPy, for small batches, inside a part already, where BLAS
    is held to one thread, or where its threads cannot be limited (the split would
    oversubscribe the cores).
    """
    parts = min(BATCH_THREADS, n // (min_samples or MIN_PART_SAMPLES))
    blas = None if parts <= 1 or is_gpu(xp) or _inside_part() else _blas_controller()
    if blas is not None:
        # The BLAS thread setting is the thread budget (OPENBLAS_NUM_THREADS, or what a
        # launcher such as joblib's gave this worker process): stay within it.
        parts = min(parts, *(lib.num_threads for lib in blas.lib_controllers))
    if blas is None or parts <= 1:
        return [slice(0, n)]
    bounds = [n * k // parts for k in range(parts + 1)]
    if lead:
        first = min(round(n / parts * (1 + lead)), n - parts + 1)
        bounds = [0] + [first + (n - first) * k // (parts - 1) for k in range(parts)]
    return [slice(bounds[k], bounds[k + 1]) for k in range(parts)]


def run_parts(parts: list[slice], body: Callable[[int, slice], T]) -> list[T]:
    """``[body(k, parts[k]) for k ...]``, each part on its own thread when there are several.

    Part 0 runs on the calling thread. Every part has finished when this returns, also
    when one of them raised (the first error is re-raised).
    """
    if len(parts) == 1:
        return [body(0, parts[0])]
    if not _PART_EXECUTOR:
        _PART_EXECUTOR.append(
            ThreadPoolExecutor(BATCH_THREADS - 1, thread_name_prefix="gpucnn-part")
        )
    with _blas_share(len(parts)):
        futures = [
            _PART_EXECUTOR[0].submit(_run_part, body, k, parts[k]) for k in range(1, len(parts))
        ]
        try:
            first = _run_part(body, 0, parts[0])
        finally:
            wait(futures)
        return [first, *(future.result() for future in futures)]


def run_parts_remote(
    parts: list[slice],
    body: Callable[[int, slice], T],
    send: Callable[[int, slice], None],
    receive: Callable[[int], T],
) -> list[T]:
    """Like :func:`run_parts`, with parts k >= 1 run elsewhere (worker processes):
    ``send(k, part)`` hands each one over, part 0 runs here as ``body(0, part)``, then
    ``receive(k)`` collects the others in order. BLAS here keeps to its share of the
    cores meanwhile."""
    with _blas_share(len(parts)):
        for k in range(1, len(parts)):
            send(k, parts[k])
        first = _run_part(body, 0, parts[0])
        return [first, *(receive(k) for k in range(1, len(parts)))]


def blas_threads_per_part(parts: int) -> int:
    """BLAS threads for each of ``parts`` slices that run at once: the cores split evenly,
    never more than BLAS is set to use now."""
    blas = _blas_controller()
    budget = min((lib.num_threads for lib in blas.lib_controllers), default=1) if blas else 1
    return max(1, min(CPUS // parts, budget))


def _blas_share(parts: int) -> Any:
    """Context: BLAS limited to this process's share of the cores while ``parts`` run."""
    blas = _blas_controller()
    share = max(1, CPUS // parts)  # never more than the user had set
    return blas.limit(
        limits={lib.filepath: min(share, lib.num_threads) for lib in blas.lib_controllers}
    )


def _run_part(body: Callable[[int, slice], T], k: int, part: slice) -> T:
    _IN_PART.active = True
    try:
        return body(k, part)
    finally:
        _IN_PART.active = False


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


def _offsets(window: tuple[int, int]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(window[0]) for j in range(window[1])]


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
    offsets = _offsets(window)
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
        for i, j in _offsets(window):
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
    for i, j in _offsets(window)[1:]:
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
        for i, j in _offsets(window):
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
        for i, j in _offsets(window):
            sl = window_slices(i, j, *out_hw, *stride)
            target[sl] += grad if x is None else grad * x[ch][sl]

    _channel_split(grad_in, body)
    return grad_in


def relu(x: Array) -> Array:
    xp = array_module(x)
    out = xp.empty_like(x)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    parallel_for(
        xp, flat_in.size, flat_in.size, lambda a, b: xp.maximum(flat_in[a:b], 0, out=flat_out[a:b])
    )
    return out


def relu_backward(grad_out: Array, y: Array) -> Array:
    """grad * (y > 0), where y is the ReLU output (positive exactly where the input was)."""
    xp = array_module(grad_out, y)
    if is_gpu(xp):
        return cuda_kernels.elementwise("relu_backward")(grad_out, y)
    grad_out = xp.ascontiguousarray(grad_out)
    out = xp.empty_like(grad_out)
    g, yy, o = grad_out.reshape(-1), y.reshape(-1), out.reshape(-1)

    def body(a: int, b: int) -> None:
        xp.multiply(g[a:b], yy[a:b] > 0, out=o[a:b])

    parallel_for(xp, g.size, g.size, body)
    return out


# -- optimizer updates, in place (one fused kernel per parameter on the GPU) -------------
def sgd_update(param: Array, grad: Array, lr: float) -> None:
    """param <- param - lr * grad."""
    if is_gpu(array_module(param, grad)):
        cuda_kernels.elementwise("sgd")(grad, param.dtype.type(lr), param)
        return
    param -= lr * grad


def momentum_update(param: Array, grad: Array, velocity: Array, lr: float, mu: float) -> None:
    """velocity <- mu velocity - lr grad; param <- param + velocity."""
    if is_gpu(array_module(param, grad, velocity)):
        dtype = param.dtype.type
        cuda_kernels.elementwise("momentum")(grad, dtype(lr), dtype(mu), param, velocity)
        return
    velocity *= mu
    velocity -= lr * grad
    param += velocity


def adam_update(
    param: Array,
    grad: Array,
    m: Array,
    v: Array,
    step: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """m, v <- moving averages of grad, grad^2; param <- param - step m / (sqrt(v) + eps).

    ``step`` and ``eps`` already carry Adam's bias corrections (see optim.Adam).
    """
    xp = array_module(param, grad, m, v)
    if is_gpu(xp):
        dtype = param.dtype.type
        cuda_kernels.elementwise("adam")(
            grad, dtype(step), dtype(beta1), dtype(beta2), dtype(eps), param, m, v
        )
        return
    m *= beta1
    m += (1.0 - beta1) * grad
    v *= beta2
    v += (1.0 - beta2) * (grad * grad)
    param -= step * m / (xp.sqrt(v) + eps)


def logistic(z: Array) -> Array:
    """1 / (1 + exp(-z)), computed as (1 + tanh(z/2)) / 2 so it never overflows."""
    return 0.5 * (1.0 + array_module(z).tanh(0.5 * z))


def log_softmax(logits: Array) -> Array:
    """Row-wise log softmax of (N, K) logits, shifted by the row maximum (no overflow)."""
    xp = array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


# -- output heads: per-sample loss and the gradient of the mean, in one go --------------
def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """(per-sample -log softmax(logits)[label], d mean / d logits) for (N, K) logits.

    Through log-softmax with the row maximum subtracted, so finite logits never overflow.
    """
    xp = array_module(logits, labels)
    if is_gpu(xp):
        return cuda_kernels.softmax_cross_entropy(logits, labels)
    log_p = log_softmax(logits)
    rows = xp.arange(logits.shape[0])
    grad = xp.exp(log_p)
    grad[rows, labels] -= 1.0
    return -log_p[rows, labels], grad * (1.0 / logits.shape[0])


def logistic_cross_entropy(net: Array, labels: Array) -> tuple[Array, Array]:
    """(per-sample softplus(net) - y net, (g(net) - y) / N) for a logistic neuron."""
    xp = array_module(net, labels)
    if is_gpu(xp):
        return cuda_kernels.logistic_cross_entropy(net, labels)
    softplus = xp.maximum(net, 0) + xp.log1p(xp.exp(-xp.abs(net)))
    return softplus - labels * net, (logistic(net) - labels) * (1.0 / net.shape[0])
