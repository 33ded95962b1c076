"""A run stopped by SIGTERM at any step and resumed from its checkpoint ends bit for bit as
the run never stopped: parameters, optimizer state, every logged loss and accuracy.
In-process here; tests/test_train_app.py sends the signal to a real training process."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from gpucnn import Adam, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, SoftmaxCrossEntropy
from gpucnn.array import threads
from gpucnn.data import load_dataset
from gpucnn.fit import Checkpoints, TrainingStopped, fit
from gpucnn.interrupts import stop_on_signals
from gpucnn.nn.checkpoint import read_checkpoint
from gpucnn.nn.model import load_checkpoint
from gpucnn.parallel import workers
from gpucnn.tracking import Tracker

EPOCHS, BATCH = 3, 64


class Recorder(Tracker):
    """Keeps what a run logs; sends SIGTERM to this process once step ``stop_at`` is
    logged (log_every=1: every step is logged when it is taken)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.steps, self.epochs, self.final, self.files = stop_at, {}, {}, {}, []

    def log_metric_history(self, key, values, first_step):
        for offset, value in enumerate(values):
            self.steps[first_step + offset] = value
            if first_step + offset == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

    def log_metrics(self, metrics, step):
        kept = {k: v for k, v in metrics.items() if "per_second" not in k}  # times differ
        (self.final if "test_loss" in metrics else self.epochs).setdefault(step, {}).update(kept)

    def log_file(self, path, folder=None):
        self.files.append((str(path), folder))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def build(data, dtype):
    layers = [Conv2D(6, 3, padding="same"), ReLU(), MaxPool2D(2), Flatten(), Dense(10)]
    return Sequential(layers, SoftmaxCrossEntropy(), data.input_shape, dtype=dtype, seed=3, l2=1e-3)


def train(data, model, optimizer, tracker, path, resume=None):
    return fit(
        model,
        optimizer,
        data,
        epochs=EPOCHS,
        batch_size=BATCH,
        seed=5,
        log_every=1,
        kernels_every=0,
        tracker=tracker,
        progress=False,
        checkpoints=Checkpoints(path, every=1),
        resume=resume,
    )


@pytest.fixture(params=["threads", "workers"])
def batch_split(request):
    """Unsplit (one thread) or split in two, half of each batch in a worker process."""
    if request.param == "threads":
        with threads.configured(batch_slices=1):
            yield request.param
        return
    if os.name != "posix":
        pytest.skip("worker processes need POSIX")
    workers.reset()
    with threads.configured(batch_slices=2, worker_processes=True, min_process_slice=16):
        yield request.param
    workers.reset()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("stop_at", [0, 7, 21, 30])  # before step 1, mid-epoch, at an epoch end
def test_a_run_stopped_anywhere_resumes_bit_for_bit(digits, dtype, stop_at, batch_split, tmp_path):
    steps_per_epoch = -(-len(digits.y_train) // BATCH)
    assert steps_per_epoch == 21  # so step 21 ends the first epoch
    whole = Recorder()
    model, optimizer = build(digits, dtype), Adam(3e-3)
    result = train(digits, model, optimizer, whole, tmp_path / "whole.npz")

    stopped = Recorder(stop_at=stop_at)
    path = tmp_path / "stopped.npz"
    with stop_on_signals():
        if stop_at == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(TrainingStopped) as stop:
            train(digits, build(digits, dtype), Adam(3e-3), stopped, path)
    assert stop.value.step == stop_at and stop.value.checkpoint == path
    assert stopped.files[-1] == (str(path), "checkpoint")  # handed to the tracker too

    checkpoint = read_checkpoint(path)
    assert checkpoint.progress.step == stop_at
    assert checkpoint.progress.batch_split["batch_slices"] == threads.settings().batch_slices
    resumed_model, resumed_optimizer = load_checkpoint(path)
    resumed = Recorder()
    again = train(
        digits, resumed_model, resumed_optimizer, resumed, path, resume=checkpoint.progress
    )

    for key, value in model.params.items():
        assert np.array_equal(resumed_model.params[key], value), key
    for key, value in optimizer.state_dict().items():
        assert np.array_equal(resumed_optimizer.state_dict()[key], value), key
    assert resumed_optimizer.steps == optimizer.steps
    assert {**stopped.steps, **resumed.steps} == whole.steps  # every step's loss, once
    assert set(stopped.steps).isdisjoint(resumed.steps)
    epochs = dict(stopped.epochs)
    for epoch, values in resumed.epochs.items():
        epochs.setdefault(epoch, {}).update(values)
    assert epochs == whole.epochs and resumed.final == whole.final
    assert again.history == result.history and again.test == result.test


def test_a_checkpoint_is_never_written_from_non_finite_parameters(digits, tmp_path):
    from gpucnn.nn.checkpoint import save_checkpoint

    model = build(digits, "float32")
    model.params["dense1.weight"][0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="dense1.weight holds NaN"):
        save_checkpoint(tmp_path / "bad.npz", model)
    assert not list(tmp_path.iterdir())


class SpoilsAWeight(Recorder):
    """Turns a weight NaN once step ``at`` is logged, as an overflowing update would."""

    def __init__(self, model, at):
        super().__init__()
        self.model, self.at = model, at

    def log_metric_history(self, key, values, first_step):
        super().log_metric_history(key, values, first_step)
        if first_step + len(values) - 1 == self.at:
            self.model.params["conv1.weight"][0, 0, 1, 1] = np.nan


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_run_that_diverges_keeps_and_names_its_last_good_checkpoint(digits, tmp_path):
    from gpucnn.fit import DivergedError

    model, path = build(digits, "float32"), tmp_path / "ck.npz"
    with pytest.raises(DivergedError) as diverged:
        train(digits, model, Adam(3e-3), SpoilsAWeight(model, at=22), path)
    message = str(diverged.value)
    assert "at step 23; first non-finite: parameter conv1.weight" in message
    assert message.endswith(f"; the last good checkpoint is {path} (step 21)")
    kept = read_checkpoint(path)  # epoch 1's, finite, untouched by the NaN
    assert kept.progress.epoch == 1 and kept.progress.step == 21
    assert np.isfinite(kept.params["conv1.weight"]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_parameters_spoiled_by_an_epochs_last_step_are_caught_by_its_checkpoint(digits, tmp_path):
    """The last step of an epoch leaves a NaN weight: no later step's loss shows it, but
    the epoch's checkpoint refuses it, and the run stops as diverged."""
    from gpucnn.fit import DivergedError

    model, path = build(digits, "float32"), tmp_path / "ck.npz"
    with pytest.raises(DivergedError) as diverged:
        train(digits, model, Adam(3e-3), SpoilsAWeight(model, at=21), path)
    assert str(diverged.value) == (
        "the parameters are not finite after step 21: conv1.weight holds NaN or infinite "
        "values: no checkpoint written; no checkpoint was written before it"
    )
    assert not path.exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_stop_that_meets_spoilt_parameters_names_the_checkpoint_once(digits, tmp_path):
    """SIGTERM lands while a weight has just turned NaN: the stop's checkpoint is refused
    and the run ends as diverged, with the last good checkpoint named once."""
    from gpucnn.fit import DivergedError

    model, path = build(digits, "float32"), tmp_path / "ck.npz"

    class SpoilsAndStops(SpoilsAWeight):
        def log_metric_history(self, key, values, first_step):
            super().log_metric_history(key, values, first_step)
            if first_step + len(values) - 1 == self.at:
                os.kill(os.getpid(), signal.SIGTERM)

    with stop_on_signals(), pytest.raises(DivergedError) as diverged:
        train(digits, model, Adam(3e-3), SpoilsAndStops(model, at=30), path)
    message = str(diverged.value)
    assert message.startswith("the parameters are not finite after step 30: conv1.weight")
    assert message.count("last good checkpoint") == 1
    assert message.endswith(f"the last good checkpoint is {path} (step 21)")


@pytest.fixture(scope="module")
def byte_digits(digits):
    """The digits as byte images (0..255), scaled per batch, with random crops and flips:
    the path the real datasets take."""
    from gpucnn.data.dataset import Augmentation, build_byte_dataset

    def as_bytes(x):
        return np.round((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)

    arrays = {
        "x_train": as_bytes(np.concatenate([digits.x_train, digits.x_val])),
        "y_train": np.concatenate([digits.y_train, digits.y_val]),
        "x_test": as_bytes(digits.x_test),
        "y_test": digits.y_test,
    }
    data = build_byte_dataset("digit_bytes", arrays, val_fraction=0.1, seed=1)
    data.augmentation = Augmentation(crop_padding=1, flip=True)
    return data


@pytest.mark.parametrize("stop_at", [7, 30])
def test_a_run_on_varied_byte_images_resumes_bit_for_bit(byte_digits, stop_at, tmp_path):
    assert byte_digits.x_train.dtype == np.uint8
    with threads.configured(batch_slices=1):
        whole = Recorder()
        model = build(byte_digits, "float64")
        train(byte_digits, model, Adam(3e-3), whole, tmp_path / "whole.npz")
        stopped = Recorder(stop_at=stop_at)
        path = tmp_path / "stopped.npz"
        with stop_on_signals(), pytest.raises(TrainingStopped):
            train(byte_digits, build(byte_digits, "float64"), Adam(3e-3), stopped, path)
        checkpoint = read_checkpoint(path)
        resumed_model, resumed_optimizer = load_checkpoint(path)
        resumed = Recorder()
        train(byte_digits, resumed_model, resumed_optimizer, resumed, path, checkpoint.progress)
    for key, value in model.params.items():
        assert np.array_equal(resumed_model.params[key], value), key
    assert {**stopped.steps, **resumed.steps} == whole.steps
    # The crops and flips made a difference: without them the run is another run.
    plain = Recorder()
    byte_digits.augmentation, kept = type(byte_digits.augmentation)(), byte_digits.augmentation
    try:
        with threads.configured(batch_slices=1):
            train(byte_digits, build(byte_digits, "float64"), Adam(3e-3), plain, tmp_path / "p.npz")
    finally:
        byte_digits.augmentation = kept
    assert plain.steps[stop_at + 1] != whole.steps[stop_at + 1]
