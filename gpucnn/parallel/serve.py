"""The main loop of a worker process (started by :mod:`gpucnn.parallel.workers`): it holds
a copy of each model whose batch slices it computes, rebuilt from the model's config, and
answers forward and backward requests for them."""

from __future__ import annotations

import signal
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from gpucnn.array import host_memory
from gpucnn.interrupts import STOP_SIGNALS
from gpucnn.nn.model import Sequential
from gpucnn.parallel.workers import (
    MODELS_PER_WORKER,
    SharedFile,
    Spec,
    wait_readable_after_spin,
)


def serve(fd: int, inputs_fd: int, outputs_fd: int) -> None:
    """Answer requests on socket ``fd`` until the parent closes it.

    A forward request that asks for gradients (a training step) is answered once they
    are written, so that a step costs the parent one wait and one message; a failure
    while writing them is not an error of the forward, and the answer says they are
    not ready (the parent then asks for them with a backward request, which reports it).
    """
    # Ctrl-C, SIGTERM and SIGUSR2 reach the whole process group: the parent decides (it
    # saves a checkpoint at the next step, which needs this worker alive until then).
    for number in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(number, signal.SIG_IGN)
    host_memory.keep_heap_for_reuse()  # slices reuse the same arrays every step
    conn = Connection(fd)
    readable = wait_readable_after_spin(fd)
    inputs, outputs = SharedFile(inputs_fd), SharedFile(outputs_fd)
    copies = _ModelCopies(outputs)
    conn.send(("ok", "ready"))
    while True:
        try:
            readable()
            message = conn.recv()
        except (EOFError, OSError):
            return
        try:
            request, key, config, inputs_size, inputs_at, outputs_size, grads_at, scale, ahead = (
                message
            )
            inputs.resize(inputs_size, grow=False)
            outputs.resize(outputs_size, grow=False)
            if request == "forward":
                views = inputs.views(inputs_at)
                net, value = copies.forward(key, config, views, grads_at, scale)
                views["net"][...] = net  # the parent reads it from the shared file
                ready = copies.gradients_ahead(key) if ahead else False
                conn.send(("ok", (value, ready)))
            elif request == "backward":
                copies.backward(key)
                conn.send(("ok", None))
            else:
                raise ValueError(f"unknown request {request!r}")
        except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
            conn.send(("error", f"{type(err).__name__}: {err}"))


@dataclass
class _SliceState:
    """Where a model copy's gradients go, their scale, and whether they are written for
    its last forward."""

    grads_at: dict[str, Spec]
    scale: float = 1.0  # the gradients are those of scale x the slice's mean loss
    ready: bool = False


class _ModelCopies:
    """The models this worker serves, least recently used dropped past
    MODELS_PER_WORKER (the parent applies the same rule to the same requests)."""

    def __init__(self, outputs: SharedFile) -> None:
        self.outputs = outputs
        self.models: OrderedDict[str, Sequential] = OrderedDict()
        self.live_params: dict[str, dict[str, Any]] = {}  # each model's own parameter arrays
        self.state: dict[str, _SliceState] = {}

    def forward(
        self,
        key: str,
        config: dict | None,
        views: dict[str, Any],
        grads_at: dict[str, Spec],
        scale: float = 1.0,
    ) -> tuple[Any, float]:
        """(head input, mean loss without the L2 penalty) of the slice in ``views``, with
        the parameters the parent sent beside it; its gradients, once written, are those
        of ``scale`` times that loss."""
        model = self._model(key, config)
        self.state[key] = _SliceState(grads_at, scale)
        for name, value in self.live_params[key].items():
            value[...] = views[f"param/{name}"]
        # The parent checked the whole batch (its shape, dtype and labels) before it cut
        # this slice: no second check here, where the parent waits for the answer.
        value = float(model.data_loss(views["x"], views["labels"]))
        return model.last_output, value

    def gradients_ahead(self, key: str) -> bool:
        """Write the last forward's gradients now (a training step); whether that
        worked. Never raises: the forward's answer is still to be sent, and a failure
        here happens again, and is reported, when the parent asks for these gradients."""
        try:
            self._write_gradients(key)
        except Exception:  # noqa: BLE001 - see above
            self.state[key].ready = False
        return self.state[key].ready

    def backward(self, key: str) -> None:
        """Make sure the last forward's gradients are in the shared file."""
        if key not in self.state:
            raise RuntimeError(f"backward for model {key} without its forward")
        if not self.state[key].ready:
            self._write_gradients(key)

    def _model(self, key: str, config: dict | None) -> Sequential:
        if key not in self.models:
            if config is None:
                raise KeyError(f"model {key} is not held here")
            self.models[key] = Sequential.from_config({**config, "l2": 0.0}, "numpy")
            self.live_params[key] = self.models[key].params
            while len(self.models) > MODELS_PER_WORKER:
                gone = self.models.popitem(last=False)[0]
                self.live_params.pop(gone, None)
                self.state.pop(gone, None)
        self.models.move_to_end(key)
        return self.models[key]

    def _write_gradients(self, key: str) -> None:
        views = self.outputs.views(self.state[key].grads_at)
        for name, value in self.models[key].backward(scale=self.state[key].scale).items():
            views[name][...] = value
        self.state[key].ready = True
