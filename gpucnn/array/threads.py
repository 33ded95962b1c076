"""The CPU threads that run NumPy's single-threaded passes on every core, and the limit
on BLAS's own threads (part of the array layer).

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

A larger batch is split coarser, above the model (:mod:`gpucnn.parallel.split`). While
its slices run, OpenBLAS is limited to its share of the cores through threadpoolctl, and
the fine-grained pool above runs inline inside a slice. ``GPUCNN_BATCH_THREADS`` sets the
number of slices (default 2 where there are 2 or more CPUs; 1 turns splitting off); it
never exceeds BLAS's own thread setting, so ``OPENBLAS_NUM_THREADS=1`` (or a joblib
worker's budget) keeps one thread. A slice gets at least ``MIN_PART_SAMPLES`` samples in
threads, ``MIN_PROCESS_PART_SAMPLES`` in worker processes: below that, on the 2-core
machine, the Python overhead and hand-offs cost more than they saved
(docs/performance.md).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gpucnn.array.backend import is_gpu

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
