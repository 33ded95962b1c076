"""The training loop: epochs of shuffled mini-batches, metrics to a Tracker.

Core code: it knows neither Hydra nor MLflow. Device values (losses, correct counts)
stay on the device during an interval and are read once per ``log_every`` steps and
once per epoch, so a CuPy step never waits for the host.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from gpucnn.array.backend import Array, array_module, to_host
from gpucnn.interrupts import raise_if_interrupted
from gpucnn.nn.losses import LogisticLogLikelihood
from gpucnn.nn.model import Sequential
from gpucnn.nn.optim import Optimizer
from gpucnn.parallel.split import BatchSplit
from gpucnn.tracking.tracker import Tracker, kernel_grid


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


def _model_and_runner(model: Sequential | BatchSplit, split_batches: bool) -> tuple[Any, Any]:
    """(the Sequential, what computes its batches): a plain model is wrapped in a
    BatchSplit unless ``split_batches`` is false; a wrapper is used as it is."""
    if isinstance(model, Sequential):
        return model, BatchSplit(model) if split_batches else model
    return model.model, model


def evaluate(
    model: Sequential | BatchSplit,
    x: Any,
    y: Any,
    batch_size: int = 512,
    split_batches: bool = True,
) -> dict[str, Any]:
    """Data loss (no L2 penalty), accuracy and confusion matrix over a whole split."""
    model, runner = _model_and_runner(model, split_batches)
    xp = model.backend.xp
    n = len(y)
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "confusion": None}
    model.head.check_labels(to_host(y), model.output_shape)  # once, on the host
    labels = _labels_for(model, y)
    x = model.backend.asarray(x, model.dtype)
    total = xp.zeros((), dtype=model.dtype)
    predictions = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        total += runner.loss(x[start:stop], labels[start:stop], penalty=False) * (stop - start)
        predictions.append(model.head.predict(runner.last_output))
    predicted = to_host(xp.concatenate(predictions))
    truth = to_host(y).astype("int64")
    classes = max(int(model.output_shape[0]), 2)
    pairs = array_module(truth).bincount(truth * classes + predicted, minlength=classes**2)
    confusion = pairs.reshape(classes, classes).tolist()  # rows: true, columns: predicted
    return {
        "loss": float(to_host(total)) / n,
        "accuracy": float((predicted == truth).mean()),
        "confusion": confusion,
    }


def check_trainer_settings(trainer: dict[str, Any]) -> None:
    """Raise a one-line ValueError for a trainer setting outside its range."""
    for key in ("epochs", "batch_size", "log_every"):
        value = trainer.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"trainer.{key} must be an int >= 1, got {value!r}")
    every = trainer.get("kernels_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"trainer.kernels_every must be an int >= 0 (0: never), got {every!r}")
    seed = trainer.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"trainer.seed must be an int >= 0, got {seed!r}")
    l2 = trainer.get("l2", 0.0)
    if l2 is not None and (not isinstance(l2, (int, float)) or l2 < 0):
        raise ValueError(f"trainer.l2 must be a number >= 0, got {l2!r}")


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
) -> TrainResult:
    """Train ``model`` on ``data`` (a :class:`gpucnn.data.Dataset`), report to ``tracker``.

    Each batch is computed through a :class:`~gpucnn.parallel.split.BatchSplit` of the model
    (slices in parallel where that pays) unless ``split_batches`` is false or ``model``
    is a wrapper already. ``progress=None`` shows a bar per epoch only when stderr is a
    terminal.
    """
    for value, what in (
        (epochs, "trainer.epochs"),
        (batch_size, "trainer.batch_size"),
        (log_every, "trainer.log_every"),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    if not isinstance(kernels_every, int) or kernels_every < 0:
        raise ValueError(
            f"trainer.kernels_every must be an int >= 0 (0 = never), got {kernels_every!r}"
        )
    model, runner = _model_and_runner(model, split_batches)
    tracker = tracker or Tracker()
    backend = model.backend
    xp = backend.xp
    rng = backend.random(seed)
    # Once, on the host, before any step: on the GPU loss() does not look at device labels.
    for split in ("train", "val", "test"):
        try:
            model.head.check_labels(to_host(getattr(data, f"y_{split}")), model.output_shape)
        except ValueError as err:
            raise ValueError(f"{split} split: {err}") from None
    x_train = backend.asarray(data.x_train, model.dtype)
    y_train = _labels_for(model, data.y_train)
    class_train = backend.asarray(data.y_train).astype("int64")  # for accuracy, cast once
    n = len(data.y_train)
    has_val = len(data.y_val) > 0
    show = sys.stderr.isatty() if progress is None else progress
    result = TrainResult(
        history={k: [] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")}
    )
    step = 0
    pending: list[Array] = []
    pending_first_step = 0
    seconds = 0.0
    _log_kernels(model, tracker, 0, kernels_every)
    for epoch in range(1, epochs + 1):
        order = backend.asarray(rng.permutation(n))
        bar = _progress_bar(show, (n + batch_size - 1) // batch_size, epoch, epochs)
        loss_sum = xp.zeros((), dtype=model.dtype)
        correct = xp.zeros((), dtype="int64")
        started = time.perf_counter()
        for start in range(0, n, batch_size):
            raise_if_interrupted()  # a Ctrl-C that Python dropped (see sticky_interrupts)
            index = order[start : start + batch_size]
            xb, yb, classes_b = x_train[index], y_train[index], class_train[index]
            loss = runner.loss(xb, yb)
            optimizer.step(runner.params, runner.backward())
            loss_sum += loss * len(index)
            correct += (model.head.predict(runner.last_output) == classes_b).sum()
            pending.append(loss)
            step += 1
            if len(pending) == log_every:
                values = to_host(xp.stack(pending)).tolist()  # one transfer per interval
                tracker.log_metric_history("train_loss_step", values, pending_first_step + 1)
                _check_finite(values, pending_first_step + 1)
                if bar is not None:
                    bar.set_postfix(loss=f"{values[-1]:.4f}")
                pending, pending_first_step = [], step
            if bar is not None:
                bar.update(1)
        train_loss = float(to_host(loss_sum)) / n
        train_accuracy = float(to_host(correct)) / n
        seconds += time.perf_counter() - started
        epoch_metrics = {"train_loss": train_loss, "train_accuracy": train_accuracy}
        if has_val:  # no validation split (val_fraction=0): no val metrics, rather than NaN
            val = evaluate(runner, data.x_val, data.y_val)
            epoch_metrics.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        for key, value in epoch_metrics.items():
            result.history[key].append(value)
        tracker.log_metrics(
            {**epoch_metrics, "epoch_images_per_second": n / max(seconds / epoch, 1e-9)}, step=epoch
        )
        if bar is not None:
            shown = {"loss": f"{train_loss:.4f}", "acc": f"{train_accuracy:.3f}"}
            if has_val:
                shown["val_acc"] = f"{val['accuracy']:.3f}"
            bar.set_postfix(shown)
            bar.close()
        _log_kernels(model, tracker, epoch, kernels_every, final=epoch == epochs)
    if pending:
        tracker.log_metric_history(
            "train_loss_step", to_host(xp.stack(pending)).tolist(), pending_first_step + 1
        )
    result.steps = step
    result.images_per_second = n * epochs / max(seconds, 1e-9)
    test = evaluate(runner, data.x_test, data.y_test)
    result.confusion = test.pop("confusion")
    result.test = {"test_loss": test["loss"], "test_accuracy": test["accuracy"]}
    tracker.log_metrics({**result.test, "images_per_second": result.images_per_second}, step=step)
    tracker.flush()
    return result


class DivergedError(FloatingPointError):
    """The training loss stopped being a finite number."""


def _check_finite(values: list[float], first_step: int) -> None:
    """Stop at the first log interval whose losses include NaN or infinity."""
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise DivergedError(
                f"training loss became {value} at step {first_step + offset}; the model "
                "diverged (try a smaller optimizer.lr, or check the data for extreme values)"
            )


def _log_kernels(
    model: Sequential, tracker: Tracker, epoch: int, every: int, final: bool = False
) -> None:
    if not every or (epoch % every and not final):
        return
    for layer in model.layers:
        if layer.type == "conv":
            weight = to_host(layer.params["weight"])
            tracker.log_image(f"kernels/{layer.name}", kernel_grid(weight), step=epoch)


def _progress_bar(show: bool, total: int, epoch: int, epochs: int) -> Any:
    if not show:
        return None
    try:
        from tqdm import tqdm  # noqa: PLC0415 - optional, part of the train extra
    except ImportError:
        return None
    return tqdm(
        total=total,
        desc=f"epoch {epoch}/{epochs}",
        leave=True,
        unit="batch",
        file=sys.stderr,
        dynamic_ncols=True,
    )
