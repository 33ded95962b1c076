"""Data parallel training over MPI ranks: one process per CPU socket, node or GPU, each
computing its shard of every batch, the gradients summed by one MPI all-reduce per step.

Started the usual way (``mpiexec -n K python -m gpucnn.train distributed=mpi ...``, or
``srun``). The global batch stays what the config says: rank r takes samples
``[N*r/K, N*(r+1)/K)`` of each batch, so results do not depend on K. Each rank's gradient
is its shard's mean gradient weighted by the shard's share of the batch; the weighted
gradients of all parameters are packed into one flat buffer and summed with one
``Allreduce``, which gives every rank the full batch's mean gradient. Every rank then
applies the same update, so the parameters stay identical. Losses and the head's outputs
(for accuracy) are reduced the same way, so evaluation metrics are the whole split's.

:class:`MpiSplit` composes with :class:`~gpucnn.parallel.split.BatchSplit`: it wraps a
rank's runner (by default a BatchSplit of the model, which may cut the rank's shard over
threads or worker processes), and ``fit`` follows ``.model`` down to the Sequential.

A rank whose computation raises does not leave the others waiting: its error travels
with the step's own exchanges (the loss allgather, and a small allgather after the
backward pass), so all ranks learn which rank failed and with what error, and all raise
:class:`RankFailed` at the same point. A stop requested by a signal (SIGTERM or SIGUSR2
on any rank) rides the second exchange and is honoured by every rank at the next step.

mpi4py is imported only when a World is made: nothing here needs it otherwise. NCCL for
CuPy arrays is not written yet; a CuPy model is refused.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy

from gpucnn.array import threads
from gpucnn.array.backend import Array, is_gpu, to_host
from gpucnn.interrupts import stop_requested
from gpucnn.nn.model import Sequential
from gpucnn.parallel.split import BatchSplit


class RankFailed(RuntimeError):
    """A rank raised during a step; every rank raises this at the same step."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank


class World:
    """The MPI world this process is part of (``mpi4py``'s COMM_WORLD)."""

    def __init__(self, comm: Any = None) -> None:
        try:
            from mpi4py import MPI  # noqa: PLC0415 - only data-parallel runs need it
        except ImportError as err:
            raise ImportError(
                "distributed=mpi needs mpi4py and an MPI library: pip install "
                "'gpucnn[distributed]' (mpi4py and the mpich wheel)"
            ) from err
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this host
        self.local_size = local.Get_size()
        local.Free()
        # This rank's share of the host's cores: the ranks on a host split them, so a
        # rank's threads, worker processes and BLAS never fight another rank's.
        self.cpu_share = max(1, (os.cpu_count() or 1) // self.local_size)
        self.started = False  # rank 0 has sent the other ranks what to train
        self.agreed_end = False  # every rank is ending by itself (agreed stop or failure)

    @contextlib.contextmanager
    def cpus(self, **split: Any) -> Iterator[None]:
        """This rank's CPU settings (``split``: a resumed run's batch split, kept) within
        its share of the host's cores, BLAS included."""
        current = threads.settings()
        share = self.cpu_share
        changes = {
            "cpus": share,
            "batch_slices": min(split.get("batch_slices", current.batch_slices), share),
            "helper_threads": min(current.helper_threads, share),
        }
        blas = threads.blas_controller()
        limit = (
            blas.limit(limits={lib.filepath: share for lib in blas.lib_controllers})
            if blas is not None and self.local_size > 1
            else contextlib.nullcontext()
        )
        with threads.configured(**{**split, **changes}), limit:
            yield

    def shard(self, n: int) -> slice:
        """This rank's samples of a batch of ``n``: an exact split, sizes differing by one."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def agree(self, value: int) -> int:
        """The largest of every rank's ``value`` (a status word: 0 means all is well)."""
        return int(self.comm.allreduce(int(value), op=self.MPI.MAX))

    def abort(self, code: int) -> None:
        """End every rank now (a rank that cannot go on, outside a step's collectives:
        otherwise the others would wait for it forever)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    def broadcast(self, value: Any, root: int = 0) -> Any:
        return self.comm.bcast(value, root=root)


class MpiSplit:
    """One training step's batch over the MPI world: this rank's shard through
    ``runner`` (a BatchSplit of the model by default), the loss, head outputs and
    gradients summed over the ranks. The interface fit and evaluate use:
    ``loss(x, labels, penalty)``, ``backward()``, ``params``, ``last_output``, ``.model``."""

    def __init__(self, model: Sequential | BatchSplit, world: World) -> None:
        runner = BatchSplit(model) if isinstance(model, Sequential) else model
        sequential = runner.model if isinstance(runner, BatchSplit) else runner
        if is_gpu(sequential.backend.xp):
            raise ValueError(
                "distributed=mpi with backend=cupy needs NCCL, which gpucnn does not support "
                "yet; use backend=numpy (one rank per CPU socket or node)"
            )
        self.model, self.runner, self.sequential, self.world = runner, runner, sequential, world
        self.xp = sequential.backend.xp
        self.last_output: Array | None = None
        self._weight = 1.0
        self._penalized = False
        self._has_shard = True
        self._agreed_signal: int | None = None  # agreed with the last gradients

    @property
    def params(self) -> dict[str, Array]:
        return self.sequential.params

    def agreed_stop(self, signal_number: int) -> int:
        """A stop requested on any rank is a stop on all, at the same step: the signals
        were exchanged with the previous step's gradients (before the first step, with a
        collective of their own). A signal that arrives between steps counts a step later."""
        if self._agreed_signal is None:
            return self.world.agree(signal_number)
        agreed, self._agreed_signal = self._agreed_signal, None
        return agreed

    def loss(self, x: Array, labels: Array, penalty: bool = True) -> Array:
        """The whole batch's mean loss: one allgather brings every rank's weighted shard
        loss, its head outputs (for accuracy) and its error, if any."""
        n = len(labels)
        part = self.world.shard(n)
        self._weight = (part.stop - part.start) / n
        self._has_shard = part.stop > part.start
        local_loss, outputs, error = 0.0, None, None
        try:
            if self._has_shard:
                value = self.runner.loss(x[part], labels[part], penalty=False)
                local_loss = float(to_host(value)) * self._weight
                outputs = to_host(self.runner.last_output)
        except Exception as err:  # noqa: BLE001 - every rank learns it, below
            error = err
        gathered = self.world.comm.allgather((_describe(error), local_loss, outputs))
        _raise_first_failure(gathered, error)
        total = sum(loss for _, loss, _ in gathered)  # Σ_r share_r * mean_r, in rank order
        self.last_output = self.xp.asarray(
            numpy.concatenate([o for _, _, o in gathered if o is not None]),
            dtype=self.sequential.dtype,
        )
        value = self.xp.asarray(total, dtype=self.sequential.dtype)
        self._penalized = bool(penalty and self.sequential.l2)
        if self._penalized:
            value = value + self.sequential.penalty()
        return value

    def backward(self) -> dict[str, Array]:
        """The whole batch's gradients: this rank's shard-mean gradients weighted by its
        share, packed into one buffer, summed over the ranks by one Allreduce (after a
        small exchange of errors and stop requests)."""
        names = list(self.sequential.params)
        error, flat = None, None
        try:
            if self._has_shard:
                grads = self.runner.backward()
                flat = numpy.concatenate([to_host(grads[k]).ravel() for k in names])
                flat *= self._weight
        except Exception as err:  # noqa: BLE001 - every rank learns it, below
            error = err
        status = self.world.comm.allgather((_describe(error), stop_requested()))
        _raise_first_failure([(e, None, None) for e, _ in status], error)
        self._agreed_signal = max(s for _, s in status)
        sizes = [int(self.sequential.params[k].size) for k in names]
        if flat is None:
            flat = numpy.zeros(sum(sizes), dtype=self.sequential.dtype)
        self.world.comm.Allreduce(self.world.MPI.IN_PLACE, flat, op=self.world.MPI.SUM)
        result, at = {}, 0
        for key, size in zip(names, sizes, strict=True):
            shape = self.sequential.params[key].shape
            result[key] = self.xp.asarray(flat[at : at + size].reshape(shape))
            at += size
        if self._penalized:
            for key, value in self.sequential.penalty_gradients().items():
                result[key] = result[key] + value
        return result


def _describe(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _raise_first_failure(gathered: list[tuple], error: BaseException | None) -> None:
    """RankFailed on every rank, naming the lowest rank that failed, if any did."""
    for rank, entry in enumerate(gathered):
        if entry[0] is not None:
            raise RankFailed(rank, entry[0]) from error
