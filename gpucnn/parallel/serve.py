"""The main loop of a worker process (started by :mod:`gpucnn.parallel.workers`): it holds a copy
of each model whose batch slices it computes, rebuilt from the model's config, and
answers forward and backward requests for them."""

from __future__ import annotations

import signal
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any

from gpucnn.nn.model import Sequential
from gpucnn.parallel.workers import MODELS_PER_WORKER, SharedFile, Spec


def serve(fd: int, inputs_fd: int, outputs_fd: int) -> None:
    """Answer requests on socket ``fd`` until the parent closes it.

    After answering a forward request the worker goes straight on to that slice's
    gradients, while the parent finishes its own slice, when the model's previous
    forward was followed by a backward request (a training loop). Forward after forward
    (evaluation) turns that off again after one wasted backward.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle

    conn = Connection(fd)
    inputs, outputs = SharedFile(inputs_fd), SharedFile(outputs_fd)
    models: OrderedDict[str, Any] = OrderedDict()
    live_params: dict[str, dict[str, Any]] = {}  # each model's own parameter arrays
    # Per model: where its gradients go, whether a backward was asked for since its last
    # forward, whether they are written, and whether to write them ahead (training).
    state: dict[str, dict[str, Any]] = {}
    conn.send(("ok", "ready"))
    while True:
        try:
            request, key, config, inputs_size, inputs_at, outputs_size, grads_at = conn.recv()
        except (EOFError, OSError):
            return
        try:
            inputs.resize(inputs_size, grow=False)
            outputs.resize(outputs_size, grow=False)
            if request == "forward":
                if key not in models:
                    if config is None:
                        raise KeyError(f"model {key} is not held here")
                    models[key] = Sequential.from_config({**config, "l2": 0.0}, "numpy")
                    live_params[key] = models[key].params
                    while len(models) > MODELS_PER_WORKER:
                        gone = models.popitem(last=False)[0]
                        live_params.pop(gone, None)
                        state.pop(gone, None)
                models.move_to_end(key)
                model = models[key]
                before = state.get(key)
                ahead = before["asked"] if before is not None else True
                state[key] = {"grads_at": grads_at, "asked": False, "ready": False, "ahead": ahead}
                views = inputs.views(inputs_at)
                for name, value in live_params[key].items():
                    value[...] = views[f"param/{name}"]
                value = float(model.loss(views["x"], views["labels"], penalty=False))
                conn.send(("ok", (model.last_output, value)))
                if ahead:
                    _write_grads(model, outputs, grads_at)
                    state[key]["ready"] = True
            elif request == "backward":
                if key not in state:
                    raise RuntimeError(f"backward for model {key} without its forward")
                if not state[key]["ready"]:
                    _write_grads(models[key], outputs, state[key]["grads_at"])
                    state[key]["ready"] = True
                state[key]["asked"] = True
                conn.send(("ok", None))
            else:
                raise ValueError(f"unknown request {request!r}")
        except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
            conn.send(("error", f"{type(err).__name__}: {err}"))


def _write_grads(model: Any, outputs: SharedFile, grads_at: dict[str, Spec]) -> None:
    views = outputs.views(grads_at)
    for name, value in model.backward().items():
        views[name][...] = value
