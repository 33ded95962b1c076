"""Worker processes that run slices of a large NumPy batch beside the calling process.

Threads can split a batch too (:func:`gpucnn.parallel.split.run_slices`), but a step
makes about a hundred NumPy calls per slice and each one needs the GIL to start. On 2
cores two threads reached 60-70% parallel efficiency; two processes reached 83-110%
(docs/performance.md). So where it can, a :class:`~gpucnn.parallel.split.BatchSplit`
sends slices 1..K-1 of a batch to worker processes and runs slice 0 itself.

This module is the pool and the parent's side of the protocol; it never builds a model.
Each worker is a plain ``python -c`` child that runs
:func:`gpucnn.parallel.serve.serve`, joined to this
process by a socket pair, not a ``multiprocessing`` child: spawn and forkserver would
import the user's main script again in the child, which breaks every script without an
``if __name__ == "__main__"`` guard, and fork is unsafe once BLAS threads exist. A worker
runs as many BLAS threads as this process keeps for its own slice (its share of the
cores: one each on 2 cores), ignores Ctrl-C and SIGTERM (the parent decides) and exits
when the parent closes the socket or dies. It keeps a copy of each model it has served (rebuilt
from ``Sequential.config()``); every forward request carries the current parameters, so
the copy never goes stale. Arrays (the slice, its labels, the parameters, the gradients)
travel through two memory files both processes map, unlinked files that disappear with
them; the socket carries only small messages. Through the socket alone a LeNet slice of
32 samples cost about 0.25 ms per step, as much as the split saved.

A training step costs one request and one answer: the forward request asks for the
gradients too, and the worker answers once they are written (the parent computes its own
slice's gradients meanwhile). Each message and each wake-up costs tens of microseconds
on a VM, so both sides poll the socket for :data:`SPIN_SECONDS` before they sleep on it.

Only the main thread uses workers, and only on POSIX. ``GPUCNN_BATCH_PROCESSES=0``
turns them off (threads split the batch instead). A worker that fails to start or dies
turns them off for the rest of the process, with one warning; the split then falls back
to threads.
"""

from __future__ import annotations

import atexit
import math
import mmap
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np  # the shared files hold host arrays: workers serve NumPy only

from gpucnn.array import threads

START_SECONDS = 60.0  # a worker must have imported gpucnn and answered within this
MODELS_PER_WORKER = 8  # model copies a worker keeps (least recently used dropped)
# A worker never splits its own slice again; its BLAS threads are its share of the cores.
_CHILD_ENV = {"GPUCNN_BATCH_PROCESSES": "0", "GPUCNN_BATCH_THREADS": "1", "GPUCNN_THREADS": "1"}
_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_CHILD_MAIN = "import sys; from gpucnn.parallel.serve import serve; serve(*map(int, sys.argv[1:]))"
_POOL: list[Worker] = []
_STATE = {"broken": None, "pid": None}  # why workers were turned off; the pool's owner


class WorkerError(RuntimeError):
    """A worker process failed: it died, or its slice raised (the message says which)."""


class Worker:
    """One worker process, the socket to it and two shared files: ``inputs`` (slices,
    labels and parameters, written here and read by the worker while it serves a
    forward request) and ``outputs`` (gradients, a region per model, written only by the
    worker). Requests are answered in order; replies not yet read (after an interrupt or
    an error in the caller) are read and dropped before the next request."""

    def __init__(self, blas_threads: int = 1) -> None:
        self.inputs, self.outputs = SharedFile(), SharedFile()
        parent_end, child_end = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        env = {
            **os.environ,
            **_CHILD_ENV,
            **dict.fromkeys(_BLAS_ENV, str(blas_threads)),
            "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
        }
        fds = [child_end.fileno(), self.inputs.fd, self.outputs.fd]
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, *map(str, fds)],
                pass_fds=fds,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except OSError:
            parent_end.close()
            self.inputs.close()
            self.outputs.close()
            raise
        finally:
            child_end.close()
        self.conn = Connection(parent_end.detach())
        self._readable = wait_readable_after_spin(self.conn.fileno())
        # The model copies the worker holds, mirrored: both sides apply the same
        # least-recently-used rule to the same sequence of forward requests. Each has a
        # region of ``outputs`` for its gradients: (offset, bytes, where each goes).
        self.models: OrderedDict[str, tuple[int, int, dict[str, Spec]]] = OrderedDict()
        self.free: list[tuple[int, int]] = []  # regions of models no longer held
        self.outputs_end = 0
        self.plans: dict[tuple, dict[str, Spec]] = {}  # inputs layouts by model and shapes
        self.head_input: Any = None  # where the last forward request's answer goes
        self.unread = 0
        try:
            if not self.conn.poll(START_SECONDS):
                raise WorkerError(f"a worker process did not start within {START_SECONDS:.0f} s")
            self._receive()  # its "ready" (or EOF, if it failed to start)
        except WorkerError:
            self.close()
            raise

    def drain(self) -> None:
        """Read and drop replies left unread, so the worker is idle and the next reply
        is the next request's."""
        while self.unread:
            self._receive(raise_errors=False)

    def send(self, message: tuple) -> None:
        self.drain()
        try:
            self.conn.send(message)
        except OSError as err:
            raise self._died(err) from None
        self.unread += 1

    def receive(self) -> Any:
        return self._receive()

    def _receive(self, raise_errors: bool = True) -> Any:
        try:
            self._readable()
            status, payload = self.conn.recv()
        except (EOFError, OSError) as err:
            raise self._died(err) from None
        self.unread = max(0, self.unread - 1)
        if status == "error" and raise_errors:
            raise WorkerError(f"batch slice in worker process {self.process.pid}: {payload}")
        return payload

    def _died(self, err: BaseException) -> WorkerError:
        try:  # its socket closed: it is exiting, or has
            code = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        state = "exited" if code is None else f"exited with code {code}"
        return WorkerError(f"worker process {self.process.pid} {state} ({type(err).__name__})")

    def hold(self, key: str, params: dict[str, Any]) -> tuple[bool, dict[str, Spec]]:
        """Count ``key`` as held by the worker from its next forward request on: (whether
        it was held before, where its gradients go)."""
        known = key in self.models
        if not known:
            layout = Layout()
            relative = {name: layout.place(v.shape, v.dtype) for name, v in params.items()}
            offset = self._allocate(layout.end)
            specs = {
                name: (offset + at, shape, dtype) for name, (at, shape, dtype) in relative.items()
            }
            self.models[key] = (offset, layout.end, specs)
            while len(self.models) > MODELS_PER_WORKER:
                self.forget(next(iter(self.models)))
        self.models.move_to_end(key)
        return known, self.models[key][2]

    def forget(self, key: str) -> None:
        """Stop counting ``key`` as held; its gradient region is free for another model."""
        if key in self.models:
            offset, size, _ = self.models.pop(key)
            self.free.append((offset, size))
            self.plans = {k: v for k, v in self.plans.items() if k[0] != key}

    def _allocate(self, size: int) -> int:
        for index, (offset, free_size) in enumerate(self.free):
            if free_size >= size:
                del self.free[index]
                return offset
        offset, self.outputs_end = self.outputs_end, self.outputs_end + max(size, ALIGN)
        self.outputs.resize(max(self.outputs.size, self.outputs_end))
        return offset

    def close(self) -> None:
        self.conn.close()  # the worker reads EOF and exits
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # stuck: it holds nothing this process needs
            self.process.kill()
            self.process.wait()
        self.inputs.close()
        self.outputs.close()


# How long a process polls its socket before it sleeps in the kernel. Waking a sleeping
# process costs both sides tens of microseconds on a VM, several times per step: LeNet
# steps at batch 64 took about 5% longer without the spin (docs/performance.md). The
# waits it covers are short (the other slice's last part, the parent's step between
# two batches); a longer one, such as an evaluation, sleeps after this.
SPIN_SECONDS = 0.002


def wait_readable_after_spin(fd: int, spin_seconds: float = SPIN_SECONDS) -> Callable[[], None]:
    """A function that returns once ``fd`` has data to read (or is closed): it polls
    without sleeping for up to ``spin_seconds``, then sleeps until then. Where Python
    has no ``select.poll``, it returns at once (the read that follows sleeps instead)."""
    if not hasattr(select, "poll"):
        return lambda: None
    poller = select.poll()
    poller.register(fd, select.POLLIN)

    def wait() -> None:
        deadline = time.perf_counter() + spin_seconds
        while not poller.poll(0):
            if time.perf_counter() > deadline:
                poller.poll()
                return

    return wait


ALIGN = 64
Spec = tuple[int, tuple[int, ...], str]  # (offset, shape, dtype) of an array in a SharedFile


class SharedFile:
    """Memory both processes map: a memfd on Linux, else an unlinked temporary file,
    grown on demand by the parent (the worker maps the size each message names)."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create("gpucnn-worker")
            else:
                fd, path = tempfile.mkstemp(prefix="gpucnn-worker-")
                os.unlink(path)
        self.fd = fd
        self.size = 0
        self.map: mmap.mmap | None = None
        self._views: dict[Any, dict[str, Any]] = {}  # of the current map, by layout

    def resize(self, size: int, grow: bool = True) -> None:
        """Map ``size`` bytes (the parent grows the file first; the worker follows)."""
        if size == self.size:
            return
        if grow:
            os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)  # the old map closes once no view holds it
        self.size = size
        self._views = {}

    def view(self, spec: Spec) -> Any:
        offset, shape, dtype = spec
        return np.ndarray(shape, dtype=np.dtype(dtype), buffer=self.map, offset=offset)

    def views(self, specs: dict[str, Spec]) -> dict[str, Any]:
        """Arrays at ``specs`` (name -> (offset, shape, dtype)), made once per layout."""
        key = tuple(specs.items())
        found = self._views.get(key)
        if found is None:
            if len(self._views) > 64:
                self._views = {}
            found = self._views[key] = {name: self.view(spec) for name, spec in specs.items()}
        return found

    def close(self) -> None:
        self.map, self._views = None, {}
        os.close(self.fd)


class Layout:
    """Offsets for a sequence of arrays in a :class:`SharedFile`."""

    def __init__(self) -> None:
        self.end = 0

    def place(self, shape: tuple[int, ...], dtype: Any) -> Spec:
        dtype = np.dtype(dtype)
        offset = self.end
        self.end = -(-(offset + math.prod(shape) * dtype.itemsize) // ALIGN) * ALIGN
        return offset, tuple(int(d) for d in shape), dtype.str


def usable() -> bool:
    """Whether batch slices may go to worker processes from the calling thread."""
    return (
        threads.settings().worker_processes
        and _STATE["broken"] is None
        and threading.current_thread() is threading.main_thread()
    )


def pool(count: int) -> list[Worker] | None:
    """``count`` running workers, started on first use; None where they cannot run (then
    workers stay off for this process, after one warning)."""
    if os.getpid() != _STATE["pid"]:  # first use, or a forked child: its parent's workers
        _POOL.clear()  # are not this process's to talk to
        _STATE["pid"] = os.getpid()
    try:
        while len(_POOL) < count:  # each as many BLAS threads as this process's slice
            _POOL.append(Worker(threads.blas_threads_per_slice(count + 1)))
    except (OSError, WorkerError) as err:
        disable(f"could not start a worker process: {err}")
        return None
    return _POOL[:count]


def running(count: int) -> list[Worker]:
    """The ``count`` workers already serving this process (those of the last loss())."""
    if count and (os.getpid() != _STATE["pid"] or len(_POOL) < count):
        raise RuntimeError(
            "the worker processes of the last loss() have stopped; call loss() again"
        )
    return _POOL[:count]


def disable(reason: str) -> None:
    """Turn workers off for the rest of this process and say so once."""
    if _STATE["broken"] is None:
        _STATE["broken"] = reason
        warnings.warn(
            f"gpucnn: {reason}; large batches are split across threads from now on",
            RuntimeWarning,
            stacklevel=3,
        )
    shutdown()


def reset() -> None:
    """Close every worker and forget why workers were turned off (tests start clean)."""
    shutdown()
    _STATE["broken"] = None


@atexit.register
def shutdown() -> None:
    """Close every worker of this process (they exit on their own when it dies, too)."""
    if _STATE["pid"] == os.getpid():
        while _POOL:
            _POOL.pop().close()


def slot_key(owner: Any) -> str:
    """The name of ``owner``'s model copy in the workers (``owner`` sends its slices):
    no other owner shares it. Not ``id()``, which a later object can reuse, and made
    afresh for a copy (whose ``id()`` differs)."""
    held_by, key = getattr(owner, "_worker_key", (None, None))
    if held_by != id(owner):
        key = uuid.uuid4().hex
        owner._worker_key = (id(owner), key)
    return key


def send_forward(
    worker: Worker,
    owner: Any,
    model: Any,
    x: Any,
    labels: Any,
    scale: float = 1.0,
    with_gradients: bool = False,
) -> None:
    """Ask ``worker`` for the head input and mean loss (no L2 penalty) of ``model`` on
    (x, labels), with ``model``'s current parameters, in the slot of ``owner``;
    :func:`forward_answer` then gives (head input, mean loss, whether the gradients are
    written). The gradients, when asked for, are those of ``scale`` times that loss
    (the slice's share of a batch). ``with_gradients``, the worker writes them before it
    answers (read them with :func:`gradients`). ``x`` and ``labels`` are taken as
    checked (as ``prepare_input`` and ``prepare_labels`` give them): the worker does not
    check them again. ``model`` needs ``params``, ``config()``, ``output_shape`` and
    ``dtype``."""
    worker.drain()  # the worker reads the inputs file until it answers: let it finish
    key = slot_key(owner)
    params = model.params
    known, grads_at = worker.hold(key, params)
    signature = (key, x.shape, x.dtype.str, labels.shape, labels.dtype.str)
    inputs = worker.plans.get(signature)
    if inputs is None:  # where each array goes; the same every step of a training run
        if len(worker.plans) > 64:
            worker.plans.clear()
        layout = Layout()
        arrays = {"x": x, "labels": labels, **{f"param/{k}": v for k, v in params.items()}}
        inputs = worker.plans[signature] = {
            n: layout.place(a.shape, a.dtype) for n, a in arrays.items()
        }
        # The worker's answer: its head input, written there (unpickling an array in the
        # answer cost this process 15-20 us a step).
        inputs["net"] = layout.place((len(x), *model.output_shape), model.dtype)
        worker.inputs.resize(max(worker.inputs.size, layout.end))
    views = worker.inputs.views(inputs)
    worker.head_input = views["net"]
    views["x"][...] = x
    views["labels"][...] = labels
    for name, value in params.items():
        views[f"param/{name}"][...] = value
    config = None if known else model.config()
    worker.send(
        (
            "forward",
            key,
            config,
            worker.inputs.size,
            inputs,
            worker.outputs.size,
            grads_at,
            scale,
            with_gradients,
        )
    )


def forward_answer(worker: Worker) -> tuple[Any, float, bool]:
    """The answer to the forward request last sent to ``worker``: (head input, mean
    loss, whether the gradients are written). The head input is a view of the shared
    file, valid until the worker's next request."""
    value, ready = worker.receive()
    return worker.head_input, value, ready


def check_held(worker: Worker, owner: Any) -> None:
    """Raise if ``worker`` no longer holds ``owner``'s model copy (so neither its last
    forward nor its gradients)."""
    if slot_key(owner) not in worker.models:
        raise RuntimeError(
            f"the worker process no longer holds this model's slice (over "
            f"{MODELS_PER_WORKER} other models ran since its loss()); call loss() again"
        )


def send_backward(worker: Worker, owner: Any) -> None:
    """Ask for the gradients of ``owner``'s last forward request on ``worker``; once it
    answers, read them with :func:`gradients`."""
    check_held(worker, owner)
    key = slot_key(owner)
    worker.send(
        ("backward", key, None, worker.inputs.size, None, worker.outputs.size, None, 1.0, False)
    )


def gradients(worker: Worker, owner: Any) -> dict[str, Any]:
    """The gradients of ``owner``'s last slice on ``worker``, by parameter name: views
    of the shared file, valid until the next request in ``owner``'s slot."""
    check_held(worker, owner)
    return worker.outputs.views(worker.models[slot_key(owner)][2])
