"""One batch over several threads or worker processes, wrapping a model from above.

A :class:`~gpucnn.nn.model.Sequential` computes a whole batch in the calling process. On
NumPy a large batch goes faster in contiguous slices of samples computed in parallel:
:class:`BatchSplit` wraps a model, offers the same ``loss``/``backward``/``forward``/
``params`` interface, and sends slices 1..K-1 of a training step to worker processes
(:mod:`gpucnn.parallel.workers`), which scale better than threads because they share no GIL, or
runs each slice in its own thread where workers cannot run. The model never knows: a
slice in a thread runs on a :meth:`~gpucnn.nn.model.Sequential.replica` that shares the
parameters, a worker holds its own copy and gets the current parameters with each
slice. The loss and gradients are the slices' values weighted by their share of the
batch, equal to the unsplit ones up to float rounding. While ``loss()`` and
``backward()`` alternate (training), a step in worker processes computes every slice's
gradients inside ``loss()``, so that each worker answers once per step; ``backward()``
then only adds them up.

``fit`` and ``evaluate`` wrap their model so by default; a library user gets the same in
one line::

    step = BatchSplit(model)
    loss = step.loss(x, y)
    optimizer.step(step.params, step.backward())

On CuPy, for small batches, inside a slice already, or where BLAS cannot be held to its
share of the cores, there is one slice and the wrapper is the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import wait
from typing import Any, TypeVar

from gpucnn.array import threads
from gpucnn.array.backend import Array, is_gpu
from gpucnn.nn.model import Sequential
from gpucnn.parallel import workers

T = TypeVar("T")
# This process takes 1/32 more samples than an even share when the other slices go to
# worker processes: it starts its slice at once, while a worker first wakes, reads the
# request and copies the parameters in. Measured on 2 cores (docs/performance.md): with
# one answer per training step, LeNet steps at batch 64 took 2.17 ms against 2.22 ms
# with even slices and 2.23 ms with 1/16 more (the best share before).
OWN_SLICE_EXTRA = 1 / 32


class BatchSplit:
    """``model`` with each batch computed in slices, in parallel, where that pays.

    ``loss``, ``backward``, ``forward``, ``params``, ``grads`` and ``last_output`` mean
    what they mean on the model. Every slice here runs on a replica of the model, so the
    model itself is never left holding one slice's state: after ``loss`` its
    ``last_output`` is the whole batch's, and after ``backward`` its ``grads`` and its
    layers' ``grads`` are the whole batch's, as after an unsplit step.
    """

    def __init__(self, model: Sequential) -> None:
        self.model = model
        self.slices: list[slice] = []  # of the last loss()
        self.remote_slices = 0  # how many of them went to worker processes
        self._replicas: list[Sequential] = []  # one per slice computed in this process
        self._penalized = False
        self._loss_ready = False
        # Training alternates loss() and backward(): while it does, a step in worker
        # processes computes every slice's gradients inside loss() (see _step_in_workers).
        self._followed_by_backward = True
        self._ahead: _GradientsAhead | None = None

    @property
    def params(self) -> dict[str, Array]:
        """The model's live parameters (optimizers update them in place)."""
        return self.model.params

    @property
    def grads(self) -> dict[str, Array]:
        """The whole batch's gradients of the last :meth:`backward` (the model's)."""
        return self.model.grads

    @property
    def last_output(self) -> Array | None:
        """The whole batch's head input of the last :meth:`loss` (the model's)."""
        return self.model.last_output

    # -- how a batch is cut ----------------------------------------------------------
    def _slices_for(self, n: int) -> tuple[list[slice], list[workers.Worker] | None]:
        """The slices of a training batch of ``n`` samples, and its worker processes."""
        current = threads.settings()
        if n < 2 * min(current.min_thread_slice, current.min_process_slice):
            self._ready_replicas(1)  # too small to split anywhere: skip the planning
            return [slice(0, n)], None
        return self._slices_in_workers(n)

    def _slices_in_workers(self, n: int) -> tuple[list[slice], list[workers.Worker] | None]:
        """The slices for ``n`` samples and a worker process for each but the first, or
        (thread slices, None) where workers cannot take them."""
        if workers.usable():  # batch_slices gives CuPy arrays one slice: no workers
            min_samples = threads.settings().min_process_slice
            slices = batch_slices(self.model.backend.xp, n, min_samples, OWN_SLICE_EXTRA)
            helpers = workers.pool(len(slices) - 1) if len(slices) > 1 else None
            if helpers is not None:
                self._ready_replicas(1)
                return slices, helpers
        return self._slices_in_threads(n), None

    def _slices_in_threads(self, n: int) -> list[slice]:
        """The slices for ``n`` samples, with a replica of the model ready for each (made
        here, on the calling thread, never inside a slice)."""
        slices = batch_slices(self.model.backend.xp, n, threads.settings().min_thread_slice)
        self._ready_replicas(len(slices))
        return slices

    def _ready_replicas(self, count: int) -> None:
        if self._replicas and self._replicas[0].backend is not self.model.backend:
            self._replicas = []  # the model moved (Sequential.to): replicas follow it
        while len(self._replicas) < count:
            self._replicas.append(self.model.replica())

    # -- computation -----------------------------------------------------------------
    def forward(self, x: Any) -> Array:
        """The head's input for a batch, computed in thread slices."""
        x = self.model.prepare_input(x)
        slices = self._slices_in_threads(x.shape[0])
        outs = run_slices(slices, lambda k, part: self._replicas[k].forward(x[part]))
        return outs[0] if len(outs) == 1 else self.model.backend.xp.concatenate(outs)

    def predict_proba(self, x: Any) -> Array:
        return self.model.head.predict_proba(self.forward(x))

    def predict(self, x: Any) -> Array:
        return self.model.head.predict(self.forward(x))

    def loss(self, x: Any, labels: Any, penalty: bool = True) -> Array:
        """The model's :meth:`~gpucnn.nn.model.Sequential.loss`, computed in slices."""
        model = self.model
        x = model.prepare_input(x)
        labels = model.prepare_labels(labels, x.shape[0])  # checked whole, before any split
        slices, helpers = self._slices_for(x.shape[0])
        self._ahead = None
        with_gradients, self._followed_by_backward = self._followed_by_backward, False
        if len(slices) == 1:  # the common case on CuPy and for small batches: no bookkeeping
            self.slices, self.remote_slices = slices, 0
            value = self._replicas[0].data_loss(x, labels)
            model.last_output = self._replicas[0].last_output
        else:
            value = self._loss_in_slices(x, labels, slices, helpers, with_gradients)
        self._penalized = bool(penalty and model.l2)
        if self._penalized:
            value = value + model.penalty()
        self._loss_ready = True
        return value

    def _loss_in_slices(
        self,
        x: Array,
        labels: Array,
        slices: list[slice],
        helpers: list[workers.Worker] | None,
        with_gradients: bool,
    ) -> Array:
        """The mean data loss of a batch cut in several slices (and the model's
        ``last_output``); in worker processes ``with_gradients``, the gradients too."""

        def forward_part(k: int, part: slice) -> tuple[Array, Array]:
            replica = self._replicas[k]
            value = replica.data_loss(x[part], labels[part])
            return replica.last_output, value

        self.remote_slices, results = 0, None
        if helpers is not None:
            try:
                results = self._step_in_workers(helpers, slices, x, labels, with_gradients)
                self.remote_slices = len(helpers)
            except workers.WorkerError as err:  # a worker died: threads take over
                workers.disable(str(err))
                slices = self._slices_in_threads(x.shape[0])
        if results is None:
            results = run_slices(slices, forward_part)
        self.slices = slices
        if len(results) == 1:  # a worker died and the thread plan has one slice
            self.model.last_output, value = results[0]
            return value
        self.model.last_output = self.model.backend.xp.concatenate([net for net, _ in results])
        weights = slice_weights(slices)
        return sum(w * part_loss for w, (_, part_loss) in zip(weights, results, strict=True))

    def backward(self) -> dict[str, Array]:
        """Backpropagate the last :meth:`loss`; fills and returns ``grads`` by name."""
        if not self._loss_ready:
            raise RuntimeError("call loss(x, labels) before backward()")
        model = self.model
        self._followed_by_backward = True
        if len(self.slices) == 1:  # the whole batch on one replica: its gradients as they are
            replica = self._replicas[0]
            grads = dict(replica.backward())
            for layer, twin in zip(model.layers, replica.layers, strict=True):
                layer.grads = twin.grads
        else:
            weights = slice_weights(self.slices)

            def backward_part(k: int, part: slice) -> list[dict[str, Array]]:
                replica = self._replicas[k]
                replica.backward(scale=weights[k])  # its share of the batch's gradients
                return [layer.grads for layer in replica.layers]

            if self.remote_slices:
                helpers = workers.running(self.remote_slices)
                results = self._backward_in_workers(helpers, backward_part)
            else:
                results = run_slices(self.slices, backward_part)
            for i, layer in enumerate(model.layers):  # the slices' sums, into the model's layers
                layer.grads = {
                    key: _total(part[i][key] for part in results) for key in results[0][i]
                }
            grads = model.named_grads()
        if self._penalized:
            for key, value in model.penalty_gradients().items():
                grads[key] = grads[key] + value
        model.grads = grads
        self._loss_ready = False
        return grads

    # -- worker processes ------------------------------------------------------------
    def _step_in_workers(
        self,
        helpers: list[workers.Worker],
        slices: list[slice],
        x: Array,
        labels: Array,
        with_gradients: bool,
    ) -> list[tuple[Array, Array]]:
        """[(head input, mean loss)] of each slice, slice 0 here and the others in
        ``helpers``. ``with_gradients`` (training), every slice's gradients are computed
        here too, before the workers' answers are read: then each worker answers once per
        step, after its gradients are written, and this process waits once (each message
        and each wait costs tens of microseconds on a VM)."""
        model = self.model
        replica = self._replicas[0]
        weights = slice_weights(slices)
        with threads.blas_share(len(slices)):
            for k in range(1, len(slices)):
                part = slices[k]
                workers.send_forward(
                    helpers[k - 1], self, model, x[part], labels[part], weights[k], with_gradients
                )
            with threads.running_slice():
                own = slices[0]
                value = replica.data_loss(x[own], labels[own])
                own_grads = None
                if with_gradients:
                    replica.backward(scale=weights[0])
                    own_grads = [layer.grads for layer in replica.layers]
            answers = [workers.forward_answer(helpers[k - 1]) for k in range(1, len(slices))]
        self._ahead = _GradientsAhead(own_grads, [ready for _, _, ready in answers])
        results = [(replica.last_output, value)]
        for net, part_loss, _ in answers:
            results.append((net, model.backend.xp.asarray(part_loss, dtype=model.dtype)))
        return results

    def _backward_in_workers(
        self,
        helpers: list[workers.Worker],
        backward_part: Callable[[int, slice], list[dict[str, Array]]],
    ) -> list[list[dict[str, Array]]]:
        """Each slice's gradients per layer: those computed ahead by the last loss(),
        the others computed now (a worker gets a backward request for them)."""
        layers = self.model.layers
        ahead = self._ahead or _GradientsAhead(None, [False] * len(helpers))
        self._ahead = None

        def remote(k: int) -> list[dict[str, Array]]:
            grads = workers.gradients(helpers[k - 1], self)  # views: summed by the caller
            return [{key: grads[f"{layer.name}.{key}"] for key in layer.params} for layer in layers]

        try:
            for k, ready in enumerate(ahead.remote_ready, start=1):
                workers.check_held(helpers[k - 1], self)
                if not ready:
                    workers.send_backward(helpers[k - 1], self)
            own = ahead.own
            if own is None:
                with threads.blas_share(len(self.slices)), threads.running_slice():
                    own = backward_part(0, self.slices[0])
            for k, ready in enumerate(ahead.remote_ready, start=1):
                if not ready:
                    helpers[k - 1].receive()
            return [own, *(remote(k) for k in range(1, len(self.slices)))]
        except workers.WorkerError as err:  # its slice's forward state is gone with it
            workers.disable(str(err))
            raise


class _GradientsAhead:
    """What the last loss() computed of the step's gradients: this process's slice's per
    layer (or None), and whether each worker has written its slice's."""

    def __init__(self, own: list[dict[str, Array]] | None, remote_ready: list[bool]) -> None:
        self.own = own
        self.remote_ready = remote_ready


def _total(arrays: Iterable[Array]) -> Array:
    """The sum of a few arrays, as one new array."""
    parts = iter(arrays)
    total = next(parts) + next(parts, 0)
    for part in parts:
        total += part
    return total


def slice_weights(slices: list[slice]) -> list[float]:
    """Each slice's share of the batch (the slices run from 0 to the batch size)."""
    return [(part.stop - part.start) / slices[-1].stop for part in slices]


def batch_slices(xp: Any, n: int, min_samples: int, first_extra: float = 0.0) -> list[slice]:
    """Contiguous slices of a batch of ``n`` samples, one per thread (or worker process)
    that will run it, each of at least ``min_samples``. The first slice gets
    ``first_extra`` (a fraction) more than an even share.

    One slice (no split) on CuPy, for small batches, inside a slice already, where BLAS
    is held to one thread, or where its threads cannot be limited (the split would
    oversubscribe the cores).
    """
    parts = min(threads.settings().batch_slices, n // min_samples)
    if parts <= 1 or is_gpu(xp) or threads.inside_slice():
        return [slice(0, n)]
    blas = threads.blas_controller()
    if blas is None:
        return [slice(0, n)]
    # The BLAS thread setting is the thread budget (OPENBLAS_NUM_THREADS, or what a
    # launcher such as joblib's gave this worker process): stay within it.
    parts = min(parts, *(lib.num_threads for lib in blas.lib_controllers))
    if parts <= 1:
        return [slice(0, n)]
    bounds = [n * k // parts for k in range(parts + 1)]
    if first_extra:
        first = min(round(n / parts * (1 + first_extra)), n - parts + 1)
        bounds = [0] + [first + (n - first) * k // (parts - 1) for k in range(parts)]
    return [slice(bounds[k], bounds[k + 1]) for k in range(parts)]


def run_slices(slices: list[slice], body: Callable[[int, slice], T]) -> list[T]:
    """``[body(k, slices[k]) for k ...]``, each slice on its own thread when there are
    several.

    Slice 0 runs on the calling thread. Every slice has finished when this returns, also
    when one of them raised (the first error is re-raised).
    """
    if len(slices) == 1:
        return [body(0, slices[0])]
    pool = threads.executor("slice", len(slices) - 1)
    with threads.blas_share(len(slices)):
        futures = [pool.submit(_run_slice, body, k, slices[k]) for k in range(1, len(slices))]
        try:
            first = _run_slice(body, 0, slices[0])
        finally:
            wait(futures)
        return [first, *(future.result() for future in futures)]


def _run_slice(body: Callable[[int, slice], T], k: int, part: slice) -> T:
    with threads.running_slice():
        return body(k, part)
