"""The training loop: epochs of shuffled mini-batches, metrics to a Tracker.

Core code: it knows neither Hydra nor MLflow. Device values (losses, correct counts)
stay on the device during an interval and are read once per ``log_every`` steps and
once per epoch, so a CuPy step never waits for the host.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpucnn.array import host_memory, threads
from gpucnn.array.backend import Array, is_gpu, to_host
from gpucnn.array.inputs import ByteImages
from gpucnn.interrupts import raise_if_interrupted, stop_requested
from gpucnn.nn.checkpoint import Progress, save_checkpoint
from gpucnn.nn.losses import LogisticLogLikelihood
from gpucnn.nn.model import Sequential
from gpucnn.nn.optim import Optimizer
from gpucnn.parallel.split import BatchSplit
from gpucnn.tracking.tracker import Tracker, kernel_grid

KERNELS_FOLDER = "kernels/raw"  # where each logged epoch's kernels go, as .npz


@dataclass
class TrainResult:
    history: dict[str, list[float]] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    confusion: Any = None
    images_per_second: float = 0.0
    steps: int = 0


def _labels_for(model: Sequential, y: Any) -> Array:
    """Device labels in the form the head wants (0/1 floats for the logistic head)."""
    if isinstance(model.head, LogisticLogLikelihood):
        return model.backend.asarray(y, model.dtype)
    return model.backend.asarray(y).astype("int64")


def _model_and_runner(model: Any, split_batches: bool) -> tuple[Sequential, Any]:
    """(the Sequential, what computes its batches). A plain model is wrapped in a
    BatchSplit unless ``split_batches`` is false. A wrapper (anything with the model's
    ``loss``/``backward``/``params``/``last_output`` and the thing it wraps as ``.model``:
    a BatchSplit, or a wrapper around one) is used as it is."""
    if isinstance(model, Sequential):
        return model, BatchSplit(model) if split_batches else model
    inner = model
    while not isinstance(inner, Sequential):
        if not hasattr(inner, "model"):
            raise TypeError(
                f"fit and evaluate take a Sequential or a wrapper of one (with .model), "
                f"got {type(model).__name__}"
            )
        inner = inner.model
    return inner, model


def evaluate(
    model: Sequential | BatchSplit,
    x: Any,
    y: Any,
    batch_size: int = 512,
    split_batches: bool = True,
    data: Any = None,
) -> dict[str, Any]:
    """Data loss (no L2 penalty), accuracy and confusion matrix over a whole split,
    computed through a BatchSplit of a plain model unless ``split_batches`` is false.
    With ``data`` (the Dataset ``x`` comes from), stored byte images are scaled per
    batch as its ``scaling`` says (never varied)."""
    model, runner = _model_and_runner(model, split_batches)
    inputs = batch_inputs(model, data) if data is not None else None
    return _evaluate(model, runner, x, y, batch_size, inputs)


# The im2col matrices one forward-only pass may take. An evaluation batch of 512 through
# CIFAR-10's vgg_small unfolds 1.2 GB of them (2.3 MB a sample); through LeNet, 56 MB
# (109 KB a sample). A BatchSplit takes about half of it in this process. Where BLAS runs
# one thread (on 2-3 cores, each batch slice) NumPy keeps a row unfold instead, about KH
# times smaller (gpucnn.array.conv): there the cap is generous, and the memory figures in
# docs/performance.md were measured with it.
EVALUATION_COLUMN_BYTES = 128 << 20


def forward_batch_size(model: Sequential, most: int, column_bytes: int | None = None) -> int:
    """Samples per forward-only pass (evaluation, prediction): ``most``, or on NumPy
    fewer where its im2col matrices would pass ``column_bytes`` (by default
    EVALUATION_COLUMN_BYTES; the results are the same: samples do not interact)."""
    per_sample = model.column_bytes_per_sample()
    if not per_sample or is_gpu(model.backend.xp):
        return most
    return max(1, min(most, (column_bytes or EVALUATION_COLUMN_BYTES) // per_sample))


def _evaluate(
    model: Sequential,
    runner: Any,
    x: Any,
    y: Any,
    batch_size: int = 512,
    inputs: ByteImages | None = None,
) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix over a split, in batches of at most
    ``batch_size`` (see forward_batch_size)."""
    xp = model.backend.xp
    batch_size = forward_batch_size(model, batch_size)
    n = len(y)
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "confusion": None}
    model.head.check_labels(to_host(y), model.output_shape)  # once, on the host
    labels = _labels_for(model, y)
    x = model.backend.asarray(x, model.dtype) if inputs is None else model.backend.asarray(x)
    total = xp.zeros((), dtype=model.dtype)
    predictions = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = x[start:stop] if inputs is None else inputs(x[start:stop])
        total += runner.loss(batch, labels[start:stop], penalty=False) * (stop - start)
        predictions.append(model.head.predict(runner.last_output))
    # The confusion matrix is counted where the predictions are; one K x K transfer.
    classes = max(int(model.output_shape[0]), 2)
    truth = model.backend.asarray(y).astype("int64")
    pairs = xp.bincount(truth * classes + xp.concatenate(predictions), minlength=classes**2)
    confusion = to_host(pairs).reshape(classes, classes)  # rows: true, columns: predicted
    return {
        "loss": float(to_host(total)) / n,
        "accuracy": float(confusion.trace()) / n,
        "confusion": confusion.tolist(),
    }


def _check_int(value: Any, what: str, minimum: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}{note}, got {value!r}")


def _check_loop_settings(epochs: Any, batch_size: Any, log_every: Any, kernels_every: Any) -> None:
    for value, key in ((epochs, "epochs"), (batch_size, "batch_size"), (log_every, "log_every")):
        _check_int(value, f"trainer.{key}", 1)
    _check_int(kernels_every, "trainer.kernels_every", 0, " (0: never)")


def _check_checkpoint_every(every: Any) -> None:
    _check_int(every, "trainer.checkpoint_every", 0, " (0: only the last)")


def check_trainer_settings(trainer: dict[str, Any]) -> None:
    """Raise a one-line ValueError for a trainer setting outside its range."""
    _check_loop_settings(
        trainer.get("epochs"),
        trainer.get("batch_size"),
        trainer.get("log_every"),
        trainer.get("kernels_every", 0),
    )
    _check_int(trainer.get("seed", 0), "trainer.seed", 0)
    _check_checkpoint_every(trainer.get("checkpoint_every", 1))
    l2 = trainer.get("l2", 0.0)
    if l2 is not None and (not isinstance(l2, (int, float)) or l2 < 0):
        raise ValueError(f"trainer.l2 must be a number >= 0, got {l2!r}")


@dataclass
class Checkpoints:
    """Where and how often :func:`fit` writes a checkpoint it can go on from: every
    ``every`` epochs (0: none but the last), at the end of training, and at a requested
    stop (SIGTERM, see :mod:`gpucnn.interrupts`). Each one replaces the previous at
    ``path`` atomically and goes to the tracker (``log_file(path, "checkpoint")``).
    ``extra`` (JSON) is kept in the checkpoint's progress for the caller."""

    path: Path
    every: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingStopped(Exception):
    """Training stopped at a step boundary because a stop was requested (SIGTERM); the
    state there is in ``checkpoint`` (None when fit had nowhere to write it)."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path | None) -> None:
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by signal {signal_number} before step {step + 1}{where}")
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint


def fit(
    model: Sequential | BatchSplit,
    optimizer: Optimizer,
    data: Any,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    log_every: int = 10,
    kernels_every: int = 1,
    tracker: Tracker | None = None,
    progress: bool | None = None,
    split_batches: bool = True,
    checkpoints: Checkpoints | None = None,
    resume: Progress | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` (a :class:`gpucnn.data.Dataset`), report to ``tracker``.

    Each batch is computed through a :class:`~gpucnn.parallel.split.BatchSplit` of the
    model (slices in parallel where that pays) unless ``split_batches`` is false or
    ``model`` is a wrapper already. ``progress=None`` shows a bar per epoch only when
    stderr is a terminal.

    With ``checkpoints``, the state is saved as they say. ``resume`` (a checkpoint's
    :class:`~gpucnn.nn.checkpoint.Progress`, with the model and optimizer loaded from the
    same checkpoint) continues a run where it stopped: everything logged and the final
    parameters are bit for bit those of the run never stopped, given the same batch
    split. Each epoch's metrics and step losses reach the tracker when the epoch ends.
    """
    _check_loop_settings(epochs, batch_size, log_every, kernels_every)
    model, runner = _model_and_runner(model, split_batches)
    if not is_gpu(model.backend.xp):  # each step's arrays come from a heap kept for them
        host_memory.keep_heap_for_reuse()
    tracker = tracker or Tracker()
    _check_labels_once(model, data)
    train = _TrainingSplit(model, data, seed)
    rng = model.backend.random(seed)
    at = _starting_point(model, rng, resume, split_batches)
    step_losses = _StepLosses(tracker, log_every, model.backend.xp, at.step)
    saver = _Saver(checkpoints, model, optimizer, tracker)
    show = sys.stderr.isatty() if progress is None else progress
    if resume is None:  # the kernels before training, once per run
        _log_kernels(model, tracker, 0, kernels_every)
    for epoch in range(at.epoch + 1, epochs + 1):
        bar = _progress_bar(show, -(-train.size // batch_size), epoch, epochs, at.batch)
        started = time.perf_counter()
        at.order_state = rng.state()  # before this epoch's shuffle
        order = model.backend.asarray(rng.permutation(train.size))
        try:  # a divergence anywhere in the epoch names the last good checkpoint, once
            epoch_metrics = _train_epoch(
                runner, optimizer, train, order, batch_size, step_losses, bar, at, saver
            )
            at.seconds += time.perf_counter() - started
            if len(data.y_val):  # no validation split (val_fraction=0): no val metrics
                val = _evaluate(model, runner, data.x_val, data.y_val, inputs=train.inputs)
                epoch_metrics.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            for key, value in epoch_metrics.items():
                at.history.setdefault(key, []).append(value)
            speed = train.size * epoch / max(at.seconds, 1e-9)  # both over the whole run
            tracker.log_metrics({**epoch_metrics, "epoch_images_per_second": speed}, step=epoch)
            tracker.flush()  # this epoch is in the store, whatever happens next
            _close_progress_bar(bar, epoch_metrics)
            _log_kernels(model, tracker, epoch, kernels_every, final=epoch == epochs)
            at.epoch, at.batch, at.order_state = epoch, 0, rng.state()
            at.loss_sum, at.correct = _zero_sums(train)
            if saver.due(epoch, epochs):
                saver.save(at)
        except DivergedError as err:
            raise saver.diverged(err) from None
    metrics = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    result = TrainResult(history={k: list(at.history.get(k, [])) for k in metrics})
    result.steps = at.step
    result.images_per_second = train.size * epochs / max(at.seconds, 1e-9)
    test = _evaluate(model, runner, data.x_test, data.y_test, inputs=train.inputs)
    result.confusion = test.pop("confusion")
    result.test = {"test_loss": test["loss"], "test_accuracy": test["accuracy"]}
    speed = {"images_per_second": result.images_per_second}
    tracker.log_metrics({**result.test, **speed}, step=result.steps)
    tracker.flush()
    return result


def _starting_point(
    model: Sequential, rng: Any, resume: Progress | None, split_batches: bool
) -> Progress:
    """The progress to start from: fresh, or ``resume`` with the order generator set
    back to it (its partial sums moved to the model's backend)."""
    if resume is None:
        zeros = model.backend.xp.zeros
        return Progress(
            epoch=0,
            step=0,
            batch=0,
            order_state=rng.state(),
            loss_sum=zeros((), dtype=model.dtype),
            correct=zeros((), dtype="int64"),
            batch_split=_batch_split_record(split_batches),
        )
    at = copy.deepcopy(resume)
    rng.set_state(at.order_state)
    at.loss_sum = model.backend.asarray(at.loss_sum).astype(model.dtype)
    at.correct = model.backend.asarray(at.correct).astype("int64")
    at.batch_split = _batch_split_record(split_batches)
    return at


def _batch_split_record(split_batches: bool) -> dict[str, Any]:
    """How batches are being cut, for the checkpoint (the cut changes the rounding)."""
    current = threads.settings()
    fields = ("batch_slices", "min_thread_slice", "min_process_slice", "worker_processes")
    return {"split_batches": split_batches, **{k: getattr(current, k) for k in fields}}


def _zero_sums(train: _TrainingSplit) -> tuple[Array, Array]:
    return train.xp.zeros((), dtype=train.dtype), train.xp.zeros((), dtype="int64")


class _Saver:
    """Writes fit's checkpoints, as its Checkpoints say (nothing without them)."""

    def __init__(
        self, plan: Checkpoints | None, model: Sequential, optimizer: Optimizer, tracker: Tracker
    ) -> None:
        self.plan, self.model, self.optimizer, self.tracker = plan, model, optimizer, tracker
        self.last: Path | None = None  # the last checkpoint written
        self.last_step = 0

    def due(self, epoch: int, epochs: int) -> bool:
        every = self.plan.every if self.plan else 0
        return self.plan is not None and (epoch == epochs or (every > 0 and epoch % every == 0))

    def save(self, at: Progress) -> Path | None:
        if self.plan is None:
            return None
        at.extra = dict(self.plan.extra)
        try:
            written = save_checkpoint(self.plan.path, self.model, self.optimizer, at)
        except FloatingPointError as err:  # an update that no step's loss has shown yet
            problem = f"the parameters are not finite after step {at.step}: {err}"
            raise DivergedError(problem) from None
        self.last = written
        self.last_step = at.step
        self.tracker.log_checkpoint(self.last, at.epoch, at.step)
        return self.last

    def diverged(self, err: DivergedError) -> DivergedError:
        """``err`` naming the last good checkpoint, which stays as it was."""
        if self.last is None:
            return DivergedError(f"{err}; no checkpoint was written before it")
        return DivergedError(
            f"{err}; the last good checkpoint is {self.last} (step {self.last_step})"
        )


def _check_labels_once(model: Sequential, data: Any) -> None:
    """Every split's labels against the head, once, on the host, before any step: on the
    GPU loss() does not look at device labels."""
    for split in ("train", "val", "test"):
        try:
            model.head.check_labels(to_host(getattr(data, f"y_{split}")), model.output_shape)
        except ValueError as err:
            raise ValueError(f"{split} split: {err}") from None


def batch_inputs(model: Sequential, data: Any, seed: int = 0) -> ByteImages | None:
    """What turns a stored batch of ``data`` into the model's input: None where the
    stored arrays are the input already (cast once, when moved); else a
    :class:`~gpucnn.array.inputs.ByteImages` (byte images scaled per batch, training
    batches varied as ``data.augmentation`` says)."""
    scaling = getattr(data, "scaling", None)
    augmentation = getattr(data, "augmentation", None)
    if scaling is None and not augmentation:
        return None
    channels = data.x_train.shape[1]
    mean = scaling.mean if scaling is not None else (0.0,) * channels
    std = scaling.std if scaling is not None else (1.0,) * channels
    padding = augmentation.crop_padding if augmentation else 0
    flip = bool(augmentation.flip) if augmentation else False
    return ByteImages(model.backend.xp, model.dtype, mean, std, padding, flip, seed)


class _TrainingSplit:
    """The training images and labels on the model's backend, moved (and cast, unless
    they are scaled per batch) once."""

    def __init__(self, model: Sequential, data: Any, seed: int = 0) -> None:
        backend = model.backend
        self.size = len(data.y_train)
        self.inputs = batch_inputs(model, data, seed)
        if self.inputs is None:
            self.x = backend.asarray(data.x_train, model.dtype)
        else:
            self.x = backend.asarray(data.x_train)
        self.labels = _labels_for(model, data.y_train)  # as the head takes them
        self.classes = backend.asarray(data.y_train).astype("int64")  # for accuracy
        self.dtype, self.xp, self.model = model.dtype, backend.xp, model
        self.check_each_step = not backend.is_gpu  # a host value is free to read


def _train_epoch(
    runner: Any,
    optimizer: Optimizer,
    train: _TrainingSplit,
    order: Array,
    batch_size: int,
    step_losses: _StepLosses,
    bar: Any,
    at: Progress,
    saver: _Saver,
) -> dict[str, float]:
    """One pass over the training split in ``order``, from batch ``at.batch`` on (a
    resumed epoch starts part-way, with its partial sums): a step per batch. Returns the
    epoch's mean training loss and accuracy (read from the device once, at the end).

    At every step boundary a requested stop (SIGTERM) saves the state there and raises
    TrainingStopped."""
    loss_sum, correct = at.loss_sum, at.correct
    started = time.perf_counter()  # (the part of an epoch before a stop counts too)
    agreed_stop = getattr(runner, "agreed_stop", None)
    for batch, start in enumerate(range(0, train.size, batch_size)):
        if batch < at.batch:
            continue  # done before the run stopped
        raise_if_interrupted()  # a Ctrl-C that Python dropped (see sticky_interrupts)
        signal_number = stop_requested()
        if agreed_stop is not None:  # data parallel: all ranks stop at the same step
            signal_number = agreed_stop(signal_number)
        if signal_number:
            at.batch, at.loss_sum, at.correct = batch, loss_sum, correct
            at.seconds += time.perf_counter() - started
            step_losses.flush()
            step_losses.tracker.flush()
            raise TrainingStopped(signal_number, at.step, saver.save(at))
        index = order[start : start + batch_size]
        x = train.x[index] if train.inputs is None else train.inputs(train.x[index], at.step)
        loss = runner.loss(x, train.labels[index])
        if train.check_each_step and not math.isfinite(float(loss)):
            # On the host a loss costs nothing to read: stop before the update, and say
            # where the batch first went non-finite.
            step_losses.add(loss, check=False)
            where = train.model.find_non_finite(x, train.labels[index])
            raise _diverged(float(loss), at.step + 1, f"first non-finite: {where}")
        optimizer.step(runner.params, runner.backward())
        loss_sum += loss * len(index)
        correct += (train.model.head.predict(runner.last_output) == train.classes[index]).sum()
        at.step += 1
        shown = step_losses.add(loss)
        if bar is not None:
            if shown:
                bar.set_postfix(loss=f"{shown[-1]:.4f}")
            bar.update(1)
    step_losses.flush()  # the epoch's step losses, read and checked before its metrics
    return {
        "train_loss": float(to_host(loss_sum)) / train.size,
        "train_accuracy": float(to_host(correct)) / train.size,
    }


class _StepLosses:
    """Each step's training loss, kept on the device and read, logged as
    ``train_loss_step`` and checked for divergence once per ``every`` steps."""

    def __init__(self, tracker: Tracker, every: int, xp: Any, steps: int = 0) -> None:
        self.tracker, self.every, self.xp = tracker, every, xp
        self.pending: list[Array] = []
        self.steps = steps  # steps taken so far
        self.on_device = is_gpu(xp)

    def add(self, loss: Array, check: bool = True) -> list[float]:
        """Count a step; the interval's losses when this step completed one, else []. With
        ``check=False`` the losses are read and logged now, unchecked (the caller knows)."""
        self.pending.append(loss)
        self.steps += 1
        if not check:
            return self.flush(check=False)
        return self.flush() if len(self.pending) == self.every else []

    def flush(self, check: bool = True) -> list[float]:
        """Read, log and check the losses not yet read (one transfer)."""
        if not self.pending:
            return []
        first_step = self.steps - len(self.pending) + 1
        values = to_host(self.xp.stack(self.pending)).tolist()
        self.pending = []
        self.tracker.log_metric_history("train_loss_step", values, first_step)
        if check:
            _check_finite(values, first_step, self.on_device)
        return values


class DivergedError(FloatingPointError):
    """The training loss stopped being a finite number."""


def _check_finite(values: list[float], first_step: int, on_device: bool = False) -> None:
    """Stop at the first log interval whose losses include NaN or infinity."""
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            where = (
                "on the GPU a step's loss is read once per log interval, so the layer where "
                "it began is not known (resume from the last checkpoint with backend=numpy "
                "to find it)"
                if on_device
                else "the layer where it began is not known"
            )
            raise _diverged(value, first_step + offset, where)


def _diverged(value: float, step: int, where: str) -> DivergedError:
    return DivergedError(
        f"training loss became {value} at step {step}; {where}; the model diverged (try a "
        "smaller optimizer.lr, or check the data for extreme values)"
    )


def _log_kernels(
    model: Sequential, tracker: Tracker, epoch: int, every: int, final: bool = False
) -> None:
    if not every or (epoch % every and not final):
        return
    weights = {}
    for layer in model.layers:
        if layer.type == "conv":
            weight = to_host(layer.params["weight"])
            tracker.log_image(f"kernels/{layer.name}", kernel_grid(weight), step=epoch)
            weights[layer.name] = weight
    if weights:  # the raw numbers too: the report draws them on one scale per layer
        tracker.log_arrays(f"epoch_{epoch:05d}.npz", weights, KERNELS_FOLDER)


def _close_progress_bar(bar: Any, metrics: dict[str, float]) -> None:
    if bar is None:
        return
    shown = {"loss": f"{metrics['train_loss']:.4f}", "acc": f"{metrics['train_accuracy']:.3f}"}
    if "val_accuracy" in metrics:
        shown["val_acc"] = f"{metrics['val_accuracy']:.3f}"
    bar.set_postfix(shown)
    bar.close()


def _progress_bar(show: bool, total: int, epoch: int, epochs: int, done: int = 0) -> Any:
    if not show:
        return None
    try:
        from tqdm import tqdm  # noqa: PLC0415 - optional, part of the train extra
    except ImportError:
        return None
    return tqdm(
        total=total,
        initial=done,
        desc=f"epoch {epoch}/{epochs}",
        leave=True,
        unit="batch",
        file=sys.stderr,
        dynamic_ncols=True,
    )
