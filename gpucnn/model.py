"""Sequential model: a stack of layers, an output head, L2 regularisation and checkpoints.

Typical use::

    model = Sequential(
        [Conv2D(8, 5), ReLU(), MaxPool2D(2), Flatten(), Dense(10)],
        head=SoftmaxCrossEntropy(), input_shape=(1, 28, 28), backend="auto", seed=0,
    )
    loss = model.loss(x, y)      # forward; a 0-d array on the model's backend
    model.backward()             # fills model.grads
    optimizer.step(model.params, model.grads)

Images enter as NCHW and are turned into the internal (C, H, W, N) layout once;
parameters and gradients are addressed by name, e.g. ``"conv1.weight"``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpucnn import workers
from gpucnn.backend import (
    Array,
    Backend,
    array_module,
    get_backend,
    host_module,
    is_gpu,
    resolve_dtype,
    to_host,
)
from gpucnn.im2col import nchw_to_internal
from gpucnn.layers import Layer, layer_from_config
from gpucnn.losses import Head, head_from_config
from gpucnn.ops import MIN_PROCESS_PART_SAMPLES, batch_parts, run_parts, run_parts_remote
from gpucnn.optim import Optimizer, make_optimizer

CHECKPOINT_FORMAT = "gpucnn-checkpoint-v1"


class Sequential:
    """Layers applied in order, then ``head``.

    Args:
        layers: image layers first (Conv2D, Pool2D, activations), then Flatten, then
            vector layers (Dense, activations).
        head: LogisticLogLikelihood (binary) or SoftmaxCrossEntropy (multi-class).
        input_shape: one sample's shape, (C, H, W) for images or (D,) for vectors.
        backend: 'auto' | 'numpy' | 'cupy' or a Backend.
        dtype: 'float32' (training) or 'float64' (gradient checks).
        seed: seeds He/Glorot initialisation; the same seed gives the same weights on
            every backend.
        l2: lambda of the L2 penalty (lambda / 2) * sum ||W||^2 over weights (not biases),
            added to the loss.
    """

    def __init__(
        self,
        layers: list[Layer],
        head: Head,
        input_shape: tuple[int, ...],
        backend: str | Backend = "numpy",
        dtype: str = "float32",
        seed: int = 0,
        l2: float = 0.0,
    ) -> None:
        if not layers:
            raise ValueError("a model needs at least one layer")
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or l2 < 0:
            raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
        shape = tuple(input_shape)
        if len(shape) not in (1, 3) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(
                f"input_shape must be (C, H, W) or (D,) of positive ints, got {input_shape!r}"
            )
        self.backend = get_backend(backend)
        self.dtype = resolve_dtype(dtype)
        rng = self.backend.random(seed)  # checks the seed
        self.seed = rng.seed
        self.l2 = float(l2)
        self.input_shape = shape
        self.layers = list(layers)
        self.head = head
        self._name_layers()
        for layer in self.layers:
            shape = layer.build(shape, self.backend, rng, self.dtype)
        self.output_shape = shape
        head.check_outputs(shape)
        self.execution_order = plan_execution(self.layers)
        self.grads: dict[str, Array] = {}
        self._loss_ready = False
        self._parts: list[slice] = []
        self._clones: list[tuple[list[Layer], Head]] = []
        self._worker_parts = 0  # slices of the last loss() that went to worker processes

    def _name_layers(self) -> None:
        counts: dict[str, int] = {}
        taken = {layer.name for layer in self.layers if layer.name}
        for layer in self.layers:
            if layer.name is None:
                counts[layer.kind] = counts.get(layer.kind, 0) + 1
                name = f"{layer.kind}{counts[layer.kind]}"
                while name in taken:
                    counts[layer.kind] += 1
                    name = f"{layer.kind}{counts[layer.kind]}"
                layer.name = name
                taken.add(name)
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {names}")

    # -- parameters ------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Array]:
        """Live parameter arrays by name ("layer.param"); optimizers update them in place."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.params.items()}

    def decayed_params(self) -> list[str]:
        """Names of the parameters under L2 regularisation (weights, never biases)."""
        return [f"{layer.name}.{k}" for layer in self.layers for k in layer.decayed]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {[layer.name for layer in self.layers]}")

    def set_params(self, values: dict[str, Any]) -> None:
        """Overwrite parameters by name (host or device arrays), checking shapes."""
        for key, value in values.items():
            layer_name, _, param = key.rpartition(".")
            if not layer_name:
                raise KeyError(f"parameter names look like 'conv1.weight', got {key!r}")
            self.layer(layer_name).set_param(param, self.backend.asarray(value, self.dtype))

    def num_params(self) -> int:
        return sum(int(v.size) for v in self.params.values())

    # -- computation -----------------------------------------------------------------
    # On NumPy a large batch is split into contiguous slices of samples that run in
    # parallel: in worker processes for a training step (gpucnn.workers), or in threads
    # (gpucnn.ops.batch_parts / run_parts) where workers cannot run and for forward().
    # In threads, slice k > 0 runs through a clone of the layers and head that shares
    # their parameters but keeps its own caches; a worker holds a copy of the model and
    # gets the current parameters with each slice. The loss and gradients are the
    # slices' values weighted by their share of the batch, equal to the unsplit ones up
    # to float rounding.
    def _prepare_input(self, x: Any) -> Array:
        """Checked public-layout batch on the model's backend (not yet internal)."""
        x = self.backend.asarray(x, self.dtype)
        if tuple(x.shape[1:]) != self.input_shape or x.ndim != len(self.input_shape) + 1:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; this model takes (N, "
                f"{', '.join(map(str, self.input_shape))})"
                + (" (NCHW)" if len(self.input_shape) == 3 else "")
            )
        if x.shape[0] == 0:
            raise ValueError("the batch is empty (0 samples)")
        return x

    def _split_to_workers(self, n: int) -> tuple[list[slice], list[workers.Worker] | None]:
        """The batch slices for ``n`` samples and a worker process for each but the first,
        or (thread slices, None) where workers cannot take them."""
        if workers.usable():  # batch_parts gives CuPy arrays one slice: no workers
            parts = batch_parts(self.backend.xp, n, MIN_PROCESS_PART_SAMPLES, workers.LEAD)
            helpers = workers.pool(len(parts) - 1) if len(parts) > 1 else None
            if helpers is not None:
                return parts, helpers
        return self._split(n), None

    def _split(self, n: int) -> list[slice]:
        """The batch slices for ``n`` samples, with a layer clone ready for each but the
        first (made here, on the calling thread, never inside a part)."""
        parts = batch_parts(self.backend.xp, n)
        while len(self._clones) < len(parts) - 1:
            layers = []
            for layer in self.layers:
                clone = copy.copy(layer)  # shares the params dict; own caches from here on
                clone.grads = {}
                layers.append(clone)
            self._clones.append((layers, copy.copy(self.head)))
        return parts

    def _part(self, k: int) -> tuple[list[Layer], Head]:
        """Layers and head for batch slice k: the model's own for k = 0, else a clone."""
        return (self.layers, self.head) if k == 0 else self._clones[k - 1]

    def _run_layers(self, layers: list[Layer], x: Array) -> Array:
        h = nchw_to_internal(x) if x.ndim == 4 else x
        for index in self.execution_order:
            h = layers[index]._forward(h)
        return h

    def forward(self, x: Any) -> Array:
        """The head's input (logits / net) for a batch, shape (N,) + output_shape."""
        x = self._prepare_input(x)
        parts = self._split(x.shape[0])
        outs = run_parts(parts, lambda k, part: self._run_layers(self._part(k)[0], x[part]))
        return outs[0] if len(outs) == 1 else self.backend.xp.concatenate(outs)

    def loss(self, x: Any, labels: Any, penalty: bool = True) -> Array:
        """Mean loss over the batch (plus the L2 penalty unless ``penalty=False``), as a
        0-d backend array.

        Left on the device so a training step never waits for the host; read it with
        :func:`gpucnn.backend.to_scalar` when you want the number. The head's input is
        kept in ``last_output`` (for accuracy without a second forward pass).
        """
        x = self._prepare_input(x)
        if not is_gpu(array_module(labels)):  # host labels; device ones would cost a transfer
            self.head.check_labels(host_module().asarray(labels), self.output_shape)
        labels = self.backend.asarray(labels)
        if labels.ndim == 0 or labels.size != x.shape[0]:  # checked whole, before any split
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({x.shape[0]},)")
        labels = labels.reshape(-1)
        parts, helpers = self._split_to_workers(x.shape[0])

        def forward_part(k: int, part: slice) -> tuple[Array, Array]:
            layers, head = self._part(k)
            net = self._run_layers(layers, x[part])
            return net, head.forward(net, labels[part])

        self._worker_parts, results = 0, None
        if helpers is not None:
            try:
                results = self._forward_in_workers(helpers, parts, forward_part, x, labels)
                self._worker_parts = len(helpers)
            except workers.WorkerError as err:  # a worker died: threads take over
                workers.disable(str(err))
                parts = self._split(x.shape[0])
        if results is None:
            results = run_parts(parts, forward_part)
        if len(results) == 1:
            self.last_output, value = results[0]
        else:
            self.last_output = self.backend.xp.concatenate([net for net, _ in results])
            weights = _slice_weights(parts)
            value = sum(w * part_loss for w, (_, part_loss) in zip(weights, results, strict=True))
        self._parts = parts
        if self.l2 and penalty:
            params = self.params
            penalty = sum((params[k] * params[k]).sum() for k in self.decayed_params())
            value = value + (0.5 * self.l2) * penalty
        self._loss_ready = True
        return value

    def backward(self) -> dict[str, Array]:
        """Backpropagate the last :meth:`loss`; fills and returns ``grads`` by name."""
        if not self._loss_ready:
            raise RuntimeError("call loss(x, labels) before backward()")
        order = self.execution_order

        def backward_part(k: int, part: slice) -> list[dict[str, Array]]:
            layers, head = self._part(k)
            grad = head.backward()
            for position in range(len(order) - 1, -1, -1):
                # The first layer's input gradient is never used: skip its col2im.
                grad = layers[order[position]]._backward(grad, need_input_grad=position > 0)
            return [layer.grads for layer in layers]

        if not self._worker_parts:
            results = run_parts(self._parts, backward_part)
        else:
            results = self._backward_in_workers(workers.running(self._worker_parts), backward_part)
        if len(results) > 1:  # weighted sum into the model's own layers
            weights = _slice_weights(self._parts)
            for i, layer in enumerate(self.layers):
                for key in layer.grads:
                    layer.grads[key] = sum(
                        w * part[i][key] for w, part in zip(weights, results, strict=True)
                    )
        grads = {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.grads.items()}
        if self.l2:
            params = self.params
            for key in self.decayed_params():
                grads[key] = grads[key] + self.l2 * params[key]
        self.grads = grads
        self._loss_ready = False
        return grads

    def _forward_in_workers(
        self,
        helpers: list[workers.Worker],
        parts: list[slice],
        forward_part: Callable[[int, slice], tuple[Array, Array]],
        x: Array,
        labels: Array,
    ) -> list[tuple[Array, Array]]:
        def send(k: int, part: slice) -> None:
            workers.send_forward(helpers[k - 1], self, x[part], labels[part])

        def receive(k: int) -> tuple[Array, Array]:
            net, value = helpers[k - 1].receive()
            return net, self.backend.xp.asarray(value, dtype=self.dtype)

        return run_parts_remote(parts, forward_part, send, receive)

    def _backward_in_workers(
        self,
        helpers: list[workers.Worker],
        backward_part: Callable[[int, slice], list[dict[str, Array]]],
    ) -> list[list[dict[str, Array]]]:
        def send(k: int, part: slice) -> None:
            workers.send_backward(helpers[k - 1], self)

        def receive(k: int) -> list[dict[str, Array]]:
            grads = workers.receive_backward(helpers[k - 1], self)  # views: summed below
            return [
                {key: grads[f"{layer.name}.{key}"] for key in layer.params} for layer in self.layers
            ]

        try:
            return run_parts_remote(self._parts, backward_part, send, receive)
        except workers.WorkerError as err:  # its slice's forward state is gone with it
            workers.disable(str(err))
            raise

    def predict_proba(self, x: Any) -> Array:
        return self.head.predict_proba(self.forward(x))

    def predict(self, x: Any) -> Array:
        """Predicted class per sample (0/1 for the logistic head)."""
        return self.head.predict(self.forward(x))

    # -- moving and saving -------------------------------------------------------------
    def to(self, backend: str | Backend, optimizer: Optimizer | None = None) -> Sequential:
        """Move all parameters to ``backend`` in place, and ``optimizer``'s state (momentum
        buffers, Adam moments) with them so training can go on; returns self."""
        self.backend = get_backend(backend)
        for layer in self.layers:
            for key, value in layer.params.items():
                layer.params[key] = self.backend.asarray(to_host(value), self.dtype)
            layer.grads = {}
        self.grads = {}
        if optimizer is not None:
            state = {k: self.backend.asarray(to_host(v)) for k, v in optimizer.state_dict().items()}
            optimizer.load_state_dict(state, optimizer.steps)
        return self

    def config(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "layers": [layer.config() for layer in self.layers],
            "head": self.head.config(),
            "dtype": self.dtype.name,
            "seed": self.seed,
            "l2": self.l2,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], backend: str | Backend = "numpy") -> Sequential:
        return cls(
            [layer_from_config(c) for c in config["layers"]],
            head_from_config(config["head"]),
            tuple(config["input_shape"]),
            backend=backend,
            dtype=config.get("dtype", "float32"),
            seed=config.get("seed", 0),
            l2=config.get("l2", 0.0),
        )

    def save(self, path: str | os.PathLike, optimizer: Optimizer | None = None) -> Path:
        return save_checkpoint(path, self, optimizer)


def _slice_weights(parts: list[slice]) -> list[float]:
    """Each batch slice's share of the batch (the slices run from 0 to the batch size)."""
    return [(part.stop - part.start) / parts[-1].stop for part in parts]


def plan_execution(layers: list[Layer]) -> list[int]:
    """The order in which to run the layers: their own order, except that a ReLU directly
    followed by a max pool runs after the pool.

    relu(max(window)) == max(relu(window)) exactly, and the gradients agree too: when a
    window's maximum is <= 0 both orders give it zero gradient, otherwise both route it to
    the window's first maximum. Pooling first makes the ReLU's two passes 4x smaller
    after a 2x2 pool.
    """
    order = list(range(len(layers)))
    for k in range(len(order) - 1):
        first, second = layers[order[k]], layers[order[k + 1]]
        if first.kind == "relu" and second.kind == "pool" and second.pool_kind == "max":
            order[k], order[k + 1] = order[k + 1], order[k]
    return order


def save_checkpoint(
    path: str | os.PathLike, model: Sequential, optimizer: Optimizer | None = None
) -> Path:
    """Write a plain ``.npz``: architecture as JSON text, host copies of all arrays.

    Written to a temporary file and renamed, so an existing checkpoint is never left
    half-written. Loads without pickle, on any backend.
    """
    np = host_module()
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
    arrays: dict[str, Any] = {
        "format": np.array(CHECKPOINT_FORMAT),
        "architecture": np.array(json.dumps(model.config())),
    }
    for key, value in model.params.items():
        arrays[f"param/{key}"] = to_host(value)
    if optimizer is not None:
        arrays["optimizer"] = np.array(json.dumps(optimizer.config()))
        arrays["optimizer_steps"] = np.array(optimizer.steps)
        for key, value in optimizer.state_dict().items():
            arrays[f"optim/{key}"] = to_host(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike, backend: str | Backend = "numpy"
) -> tuple[Sequential, Optimizer | None]:
    """Rebuild the model (and optimizer, if saved) from :func:`save_checkpoint` output."""
    np = host_module()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {key: data[key] for key in data.files}
    except Exception as err:
        raise ValueError(f"checkpoint {str(path)!r} is not a readable .npz file: {err}") from err
    if str(contents.get("format", "")) != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a gpucnn checkpoint ({CHECKPOINT_FORMAT})")
    backend = get_backend(backend)  # its own errors are not the checkpoint's
    try:
        return _rebuild(contents, backend)
    except (KeyError, TypeError, ValueError) as err:
        problem = f"missing entry {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"checkpoint {str(path)!r} is damaged: {problem}") from err


def _rebuild(contents: dict[str, Any], backend: Backend) -> tuple[Sequential, Optimizer | None]:
    """Model and optimizer from a checkpoint's arrays; KeyError/ValueError where damaged."""
    model = Sequential.from_config(json.loads(str(contents["architecture"])), backend)
    expected = set(model.params)
    stored = {k[len("param/") :] for k in contents if k.startswith("param/")}
    if stored != expected:
        raise ValueError(
            f"its architecture needs parameters {sorted(expected)}; missing "
            f"{sorted(expected - stored)}, unexpected {sorted(stored - expected)}"
        )
    for key in sorted(expected):
        value = contents[f"param/{key}"]
        if value.dtype.kind not in "biuf" or not host_module().isfinite(value).all():
            raise ValueError(f"{key} holds non-numeric, NaN or infinite values")
    model.set_params({key: contents[f"param/{key}"] for key in expected})
    optimizer = None
    if "optimizer" in contents:
        options = json.loads(str(contents["optimizer"]))
        optimizer = make_optimizer(options.pop("type"), **options)
        state = {
            k[len("optim/") :]: model.backend.asarray(v)
            for k, v in contents.items()
            if k.startswith("optim/")
        }
        optimizer.load_state_dict(state, int(contents["optimizer_steps"]))
    return model, optimizer
