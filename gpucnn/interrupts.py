"""Ctrl-C for the training loop and the code that writes to a store: held across a store
write so it cannot be cut in half, and remembered so Python cannot drop it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt.

    A store write cut in half can leave SQLite locked by the interrupted transaction, and
    then marking the run KILLED fails with "database is locked". Off the main thread,
    where Python delivers no signals, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    sticky = signal.getsignal(signal.SIGINT) is _remember_and_raise

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)
        if sticky:  # inside sticky_interrupts(): remember it there too
            _INTERRUPTED[0] = True

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if received:
            raise KeyboardInterrupt


_INTERRUPTED = [False]  # Ctrl-C arrived inside sticky_interrupts()


def _remember_and_raise(signum: int, frame: Any) -> None:
    _INTERRUPTED[0] = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def sticky_interrupts() -> Iterator[None]:
    """Make Ctrl-C impossible to lose inside the block: see :func:`raise_if_interrupted`.

    Python raises KeyboardInterrupt wherever the main thread is when the signal arrives.
    If that is inside a weakref callback or a ``__del__`` (SQLAlchemy's, during garbage
    collection, say), the exception is printed as "Exception ignored" and dropped, and
    training would go on. Within this block the signal is also remembered.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _remember_and_raise)
    _INTERRUPTED[0] = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        _INTERRUPTED[0] = False


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C arrived in :func:`sticky_interrupts` (the
    training loop asks once per step, in case the first one was dropped)."""
    if _INTERRUPTED[0]:
        raise KeyboardInterrupt


_STOP = [0]  # the signal that asked training to stop, inside stop_on_signals()


# What schedulers send before they end a job: SIGTERM, and SIGUSR2, which submitit has
# SLURM send ahead of a time limit or a preemption (--signal=USR2@90).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, SIGTERM or SIGUSR2 (what schedulers send before they kill a
    job) asks the training loop to stop at its next step boundary instead of killing the
    process: :func:`stop_requested` then returns the signal's number. Off the main
    thread, where Python delivers no signals, this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def remember(signum: int, frame: Any) -> None:
        _STOP[0] = _STOP[0] or signum

    _STOP[0] = 0  # before the handler: a signal from then on is kept
    previous = {number: signal.signal(number, remember) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        _STOP[0] = 0


def stop_requested() -> int:
    """The number of the signal that asked to stop (0: none); the loop asks once a step."""
    return _STOP[0]
