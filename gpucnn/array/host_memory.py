"""Host memory for a training loop: glibc's heap kept for reuse between steps (part of
the array layer).

A NumPy training step allocates and frees the same arrays of a few MB every step.
glibc's malloc serves an array above its *mmap threshold* from fresh pages of the
kernel, and gives the top of its heap back to the kernel once more than its *trim
threshold* lies free there. Its dynamic rule raises both only as it sees large arrays
freed, so in a step whose arrays outgrow what it has seen, the same pages go back to the
kernel and are faulted in, zeroed, again every step: LeNet at batch 132 in one process
took 350-650 page faults a step (1.4-2.6 MB), and its step ran 10% slower for it.

:func:`keep_heap_for_reuse` sets the two thresholds at once to where glibc's own rule
ends up after its first large array: arrays up to 32 MB from the heap (glibc's
DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) and the heap trimmed when 64 MB lie free at its top
(twice that, as the rule keeps them). The heap then stays as large as the step needs;
the peak memory (VmHWM) is the same. ``fit`` and the worker processes call it on NumPy.
It leaves the allocator alone where the user set glibc's malloc themselves (a
``MALLOC_*_`` variable or ``glibc.malloc`` tunables), where ``GPUCNN_HEAP_TUNING=0``, and
on any C library but glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Mapping

MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20
# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)


def why_not_tuned(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why :func:`keep_heap_for_reuse` leaves malloc alone here, or None if it may act."""
    if environ.get("GPUCNN_HEAP_TUNING", "1").strip() == "0":
        return "GPUCNN_HEAP_TUNING=0"
    chosen = [name for name in _USER_SETTINGS if name in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"malloc is set by the user ({', '.join(chosen)})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    return None


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
    # The mmap threshold first: setting either one ends glibc's dynamic rule.
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and done
