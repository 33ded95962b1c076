"""The CPU threads that run NumPy's single-threaded passes on every core, and the limit
on BLAS's own threads (part of the array layer).

NumPy releases the GIL inside its loops, so disjoint parts of one array can be processed
by several threads at once. Each primitive splits its work along an axis where the
parts never write the same memory: channels for pooling, the flat array for ReLU, kernel
offsets for im2col. Arrays below ``min_parallel_elements`` stay on one thread, because a
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
worker's budget) keeps one thread. A slice gets at least ``min_thread_slice`` samples in
threads, ``min_process_slice`` in worker processes: below that, on the 2-core machine,
the Python overhead and hand-offs cost more than they saved (docs/performance.md).
``GPUCNN_BATCH_PROCESSES=0`` keeps slices out of worker processes.

All of these are one :class:`CpuSettings`, read from the environment on first use;
:func:`configured` changes some of them for a block (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gpucnn.array.backend import is_gpu


@dataclasses.dataclass(frozen=True)
class CpuSettings:
    """How gpucnn spreads NumPy work over the CPU's cores."""

    cpus: int  # cores to share out
    helper_threads: int  # GPUCNN_THREADS: threads of one primitive (1: off)
    min_parallel_elements: int  # a primitive on fewer elements stays on one thread
    batch_slices: int  # GPUCNN_BATCH_THREADS: slices of one batch (1: never split)
    min_thread_slice: int  # samples a slice in a thread needs at least
    min_process_slice: int  # samples a slice in a worker process needs (less overhead)
    worker_processes: bool  # GPUCNN_BATCH_PROCESSES != 0, on POSIX: slices may leave

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] = os.environ, cpus: int | None = None
    ) -> CpuSettings:
        """The defaults measured in docs/performance.md, with the environment's overrides;
        a variable that is not an integer is a ValueError naming it."""
        cpus = cpus or os.cpu_count() or 1
        return cls(
            cpus=cpus,
            helper_threads=_count_from(environ, "GPUCNN_THREADS", 1 if cpus <= 2 else 4),
            min_parallel_elements=1 << 16,
            batch_slices=_count_from(environ, "GPUCNN_BATCH_THREADS", min(2, cpus)),
            min_thread_slice=64,
            min_process_slice=32,
            worker_processes=environ.get("GPUCNN_BATCH_PROCESSES", "1") != "0"
            and os.name == "posix",
        )


def _count_from(environ: Mapping[str, str], name: str, default: int) -> int:
    """An int setting from the environment; 0 or less counts as 1 (off)."""
    text = environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return max(1, int(text))
    except ValueError:
        raise ValueError(
            f"{name}={text!r} is not an integer; allowed: a number of threads >= 1 (1 turns it off)"
        ) from None


_SETTINGS: list[CpuSettings] = []  # the current settings, made on first use
_EXECUTORS: dict[tuple[str, int], ThreadPoolExecutor] = {}
_IN_SLICE = threading.local()


def settings() -> CpuSettings:
    """The settings in force (read from the environment the first time)."""
    if not _SETTINGS:
        _SETTINGS.append(CpuSettings.from_environment())
    return _SETTINGS[0]


@contextlib.contextmanager
def configured(**changes: Any) -> Iterator[CpuSettings]:
    """Run a block with some settings changed (by field name), then restore them."""
    previous = settings()
    _SETTINGS[0] = dataclasses.replace(previous, **changes)
    try:
        yield _SETTINGS[0]
    finally:
        _SETTINGS[0] = previous


def executor(role: str, size: int) -> ThreadPoolExecutor:
    """A thread pool of ``size`` threads for ``role`` ('helper', 'slice'), made once."""
    key = (role, size)
    if key not in _EXECUTORS:
        _EXECUTORS[key] = ThreadPoolExecutor(size, thread_name_prefix=f"gpucnn-{role}")
    return _EXECUTORS[key]


def parallel_for(xp: Any, count: int, work: int, body: Callable[[int, int], None]) -> None:
    """Run ``body(start, stop)`` over ``range(count)`` in up to ``helper_threads``
    contiguous parts.

    ``work`` is the number of elements touched, deciding whether threads pay off. The
    parts must write disjoint memory. Inside a batch slice everything runs inline: the
    slices already keep the cores busy, and a nested pool could deadlock.
    """
    parts = parallel_parts(xp, count, work)
    if parts == 1:
        body(0, count)
        return
    pool = executor("helper", settings().helper_threads)
    bounds = [count * k // parts for k in range(parts + 1)]
    futures = [pool.submit(body, bounds[k], bounds[k + 1]) for k in range(1, parts)]
    body(bounds[0], bounds[1])
    for future in futures:
        future.result()


def parallel_parts(xp: Any, count: int, work: int) -> int:
    """Into how many parts :func:`parallel_for` cuts ``range(count)`` for ``work``
    elements (1: it runs inline)."""
    current = settings()
    parts = min(current.helper_threads, count)
    if parts <= 1 or work < current.min_parallel_elements or is_gpu(xp) or inside_slice():
        return 1
    return parts


def inside_slice() -> bool:
    """Whether this thread is computing a slice of a split batch (see running_slice)."""
    return getattr(_IN_SLICE, "active", False)


@contextlib.contextmanager
def running_slice() -> Iterator[None]:
    """Mark this thread as computing a slice of a batch for the block."""
    _IN_SLICE.active = True
    try:
        yield
    finally:
        _IN_SLICE.active = False


@functools.cache
def blas_controller() -> Any:
    """threadpoolctl's handle on the loaded BLAS libraries, or None where it cannot act."""
    try:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415
    except ImportError:
        return None
    blas = ThreadpoolController().select(user_api="blas")
    return blas if blas.lib_controllers else None


def blas_threads() -> int:
    """How many threads BLAS runs now (the fewest over its libraries; 1 if unknown)."""
    blas = blas_controller()
    return min((lib.num_threads for lib in blas.lib_controllers), default=1) if blas else 1


def blas_threads_per_slice(slices: int) -> int:
    """BLAS threads for each of ``slices`` that run at once: the cores split evenly,
    never more than BLAS is set to use now."""
    return max(1, min(settings().cpus // slices, blas_threads()))


@contextlib.contextmanager
def blas_share(slices: int) -> Iterator[None]:
    """Context: BLAS limited to this process's share of the cores while ``slices`` run
    (never more threads than the user had set), then set back.

    Through each library's own setter: threadpoolctl's ``limit()`` surveys every
    library on each call, about 25 us, and a training step enters this once or twice.
    """
    libraries = blas_controller().lib_controllers
    share = max(1, settings().cpus // slices)
    before = [lib.num_threads for lib in libraries]
    for lib, count in zip(libraries, before, strict=True):
        if count > share:
            lib.set_num_threads(share)
    try:
        yield
    finally:
        for lib, count in zip(libraries, before, strict=True):
            if count > share:
                lib.set_num_threads(count)
