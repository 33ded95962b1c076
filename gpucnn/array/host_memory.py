"""Host memory for a training loop: glibc's heap kept for reuse between steps (part of
the array layer).

A NumPy training step allocates and frees the same arrays of a few MB every step.
glibc's malloc serves an array above its *mmap threshold* from fresh pages of the
kernel, and gives the top of its heap back to the kernel once more than its *trim
threshold* lies free there. Its dynamic rule raises the mmap threshold to the size of
each mapped array freed (up to 32 MB on 64-bit) and the trim threshold to twice that, so
it follows the largest array it has seen, and a step whose arrays sit differently on the
heap can hand the same pages back to the kernel and fault them in, zeroed, every step:
LeNet at batch 132 in one process took 350-1030 page faults a step (1.4-4 MB), and its
step ran 10% slower for it.

:func:`keep_heap_for_reuse` sets both at once to the highest values that rule reaches:
arrays up to 32 MB (glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) come from the heap, and
a heap is trimmed only once 64 MB lie free at its top. The heap then stays as large as a
step needs: the training app's peak memory (VmHWM) measured the same with and without it
(digits, Fashion-MNIST and CIFAR-10 runs, docs/performance.md). The setting is the whole
process's, for the rest of its life (each malloc arena may keep up to 64 MB free); ``fit``
and the worker processes call it on NumPy. It leaves malloc alone where the user set it
(any ``MALLOC_*`` variable or ``glibc.malloc`` tunable), where ``GPUCNN_HEAP_TUNING=0``,
and on any C library but glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Mapping

MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20
# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def why_not_tuned(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why :func:`keep_heap_for_reuse` leaves malloc alone here, or None if it may act."""
    if environ.get("GPUCNN_HEAP_TUNING", "1").strip() == "0":
        return "GPUCNN_HEAP_TUNING=0"
    chosen = sorted(name for name in environ if name.startswith("MALLOC_"))
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"malloc is set by the user ({', '.join(chosen)})"
    if not libc_is_glibc():
        return "the C library is not glibc"
    return None


def libc_is_glibc() -> bool:
    """Whether this process runs on glibc (the C library it was linked with)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name here
        return False


@functools.cache
def keep_heap_for_reuse() -> bool:
    """Set glibc's mmap and trim thresholds for a training loop (once per process);
    whether they were set."""
    if why_not_tuned() is not None:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first, and nothing more if it is refused: setting either one
    # ends glibc's dynamic rule, and a trim threshold alone would leave every array
    # above 128 KB on fresh pages.
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        return False
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
