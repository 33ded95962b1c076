"""The training loop against a recording tracker, on every backend (no MLflow needed)."""

from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import pytest

from gpucnn import Adam, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, SoftmaxCrossEntropy
from gpucnn.array.backend import to_host
from gpucnn.data import load_dataset
from gpucnn.fit import DivergedError, check_trainer_settings, evaluate, fit
from gpucnn.interrupts import sticky_interrupts
from gpucnn.nn.layers import Pool2D
from gpucnn.nn.losses import LogisticLogLikelihood
from gpucnn.nn.optim import GradientAscent
from gpucnn.tracking.tracker import Tracker, kernel_grid


class Recorder(Tracker):
    def __init__(self):
        self.metrics, self.histories, self.images = [], {}, []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_metric_history(self, key, values, first_step):
        steps = range(first_step, first_step + len(values))
        self.histories.setdefault(key, []).extend(zip(steps, values, strict=True))

    def log_image(self, key, image, step):
        self.images.append((key, step, image.shape, image.dtype))


def test_fit_reports_per_step_and_per_epoch(backend):
    data = load_dataset("seed_20x20", n_per_class=20, noise=0.3, seed=0)
    model = Sequential(
        [
            Conv2D(1, 20, bias=False, init="glorot"),
            Pool2D("max", 1, 1),
            Flatten(),
            Dense(1, init="glorot"),
        ],
        LogisticLogLikelihood(),
        data.input_shape,
        backend=backend,
        seed=0,
        l2=0.1,
    )
    recorder = Recorder()
    result = fit(
        model,
        GradientAscent(0.1),
        data,
        epochs=30,
        batch_size=16,
        log_every=4,
        kernels_every=10,
        tracker=recorder,
        progress=False,
    )
    steps_per_epoch = 3  # 40 images in batches of 16
    assert result.steps == 30 * steps_per_epoch
    losses = recorder.histories["train_loss_step"]
    assert [s for s, _ in losses] == list(range(1, result.steps + 1))
    assert all(np.isfinite(v) for _, v in losses)
    epochs = [m for m in recorder.metrics if "val_loss" in m[1]]
    assert [s for s, _ in epochs] == list(range(1, 31))
    assert epochs[-1][1]["train_loss"] < epochs[0][1]["train_loss"]
    assert result.test["test_accuracy"] == 1.0
    assert [(k, s) for k, s, _, _ in recorder.images] == [
        ("kernels/conv1", s) for s in (0, 10, 20, 30)
    ]
    final = recorder.metrics[-1][1]
    assert set(final) == {"test_loss", "test_accuracy", "images_per_second"}


def test_fit_without_a_validation_split_logs_no_val_metrics(backend):
    data = load_dataset("seed_20x20", n_per_class=10, noise=0.3, seed=0)
    data.x_val, data.y_val = data.x_val[:0], data.y_val[:0]
    model = Sequential(
        [Conv2D(1, 20, bias=False), Flatten(), Dense(1)],
        LogisticLogLikelihood(),
        data.input_shape,
        backend=backend,
        seed=0,
    )
    recorder = Recorder()
    result = fit(
        model, GradientAscent(0.1), data, epochs=2, batch_size=8, tracker=recorder, progress=False
    )
    per_epoch = [metrics for step, metrics in recorder.metrics if "train_loss" in metrics]
    assert len(per_epoch) == 2
    assert all("val_loss" not in m and "val_accuracy" not in m for m in per_epoch)
    logged = [v for _, metrics in recorder.metrics for v in metrics.values()]
    assert all(np.isfinite(v) for v in logged)  # no NaN gaps in the MLflow charts
    assert result.history["val_loss"] == [] and len(result.history["train_loss"]) == 2
    assert np.isfinite(result.test["test_loss"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_fit_checks_every_label_before_the_first_step(backend, split):
    # A bad label in the last training batch (or only in the test split) must stop fit
    # before any update. On the GPU, loss() itself never looks at device labels.
    data = load_dataset("seed_20x20", n_per_class=10, noise=0.3, seed=0)
    labels = getattr(data, f"y_{split}").copy()
    labels[-1] = 2
    setattr(data, f"y_{split}", labels)
    model = Sequential(
        [Flatten(), Dense(1)], LogisticLogLikelihood(), data.input_shape, backend=backend
    )
    before = {k: np.array(to_host(v)) for k, v in model.params.items()}
    recorder = Recorder()
    with pytest.raises(ValueError, match=rf"^{split} split: labels must be in \[0, 1\]"):
        fit(model, GradientAscent(0.1), data, 1, batch_size=1, tracker=recorder, progress=False)
    assert recorder.metrics == [] and recorder.images == []
    for key, value in model.params.items():
        np.testing.assert_array_equal(to_host(value), before[key])


def test_evaluate_matches_direct_computation(backend, rng):
    model = Sequential(
        [Conv2D(2, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(3)],
        SoftmaxCrossEntropy(),
        (1, 6, 6),
        backend=backend,
        seed=1,
        l2=0.5,
    )
    x, y = rng.standard_normal((37, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, 37)
    report = evaluate(model, x, y, batch_size=8)
    logits = np.asarray(model.forward(x).get() if backend.is_gpu else model.forward(x), np.float64)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    assert report["loss"] == pytest.approx(-log_p[np.arange(37), y].mean(), rel=1e-5)  # no L2 term
    predicted = logits.argmax(1)
    assert report["accuracy"] == pytest.approx((predicted == y).mean())
    confusion = np.array(report["confusion"])
    assert confusion.sum() == 37 and np.trace(confusion) == (predicted == y).sum()
    expected = np.zeros((3, 3), dtype=int)
    for true, guess in zip(y, predicted, strict=True):  # rows: true class, columns: predicted
        expected[true, guess] += 1
    np.testing.assert_array_equal(confusion, expected)


def test_evaluate_keeps_each_pass_within_its_im2col_memory(monkeypatch, rng):
    """A convolution's im2col matrix grows with the batch: on NumPy an evaluation pass
    takes fewer samples than asked where it would pass EVALUATION_COLUMN_BYTES, with the
    same results."""
    import gpucnn.fit as fit_module

    model = Sequential(
        [Conv2D(4, 3), ReLU(), MaxPool2D(2), Conv2D(3, 3), Flatten(), Dense(3)],
        SoftmaxCrossEntropy(),
        (2, 10, 10),
        seed=3,
    )
    # conv1 unfolds 2*3*3 numbers for each of its 8*8 outputs, conv2 4*3*3 for each of 2*2
    per_sample = (2 * 3 * 3 * 8 * 8 + 4 * 3 * 3 * 2 * 2) * 4
    assert model.column_bytes_per_sample() == per_sample
    x, y = rng.standard_normal((50, 2, 10, 10)).astype(np.float32), rng.integers(0, 3, 50)
    whole = evaluate(model, x, y, batch_size=64, split_batches=False)
    sizes = []
    loss = model.loss
    monkeypatch.setattr(model, "loss", lambda b, *a, **k: sizes.append(len(b)) or loss(b, *a, **k))
    monkeypatch.setattr(fit_module, "EVALUATION_COLUMN_BYTES", 7 * per_sample + 5)
    small = evaluate(model, x, y, batch_size=64, split_batches=False)
    assert sizes == [7] * 7 + [1]
    assert small["confusion"] == whole["confusion"]
    assert small["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_evaluate_rejects_a_label_the_model_has_no_class_for(backend, rng):
    model = Sequential([Flatten(), Dense(3)], SoftmaxCrossEntropy(), (1, 2, 2), backend=backend)
    x = rng.standard_normal((5, 1, 2, 2))
    with pytest.raises(ValueError, match=r"^labels must be class indices 0\.\.2, got 3$"):
        evaluate(model, x, np.array([0, 1, 2, 3, 0]))


def test_fit_learns_digits_quickly(backend):
    data = load_dataset("digits", seed=0)
    model = Sequential(
        [Conv2D(8, 3, padding="same"), ReLU(), MaxPool2D(2), Flatten(), Dense(10)],
        SoftmaxCrossEntropy(),
        data.input_shape,
        backend=backend,
        seed=0,
    )
    result = fit(model, Adam(0.005), data, epochs=3, batch_size=32, progress=False)
    assert result.test["test_accuracy"] > 0.9


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"epochs": 0, "batch_size": 1, "log_every": 1},
            "trainer.epochs must be an int >= 1, got 0",
        ),
        (
            {"epochs": 1, "batch_size": 2.5, "log_every": 1},
            "trainer.batch_size must be an int >= 1",
        ),
        ({"epochs": 1, "batch_size": 1, "log_every": 1, "kernels_every": -1}, "kernels_every must"),
        ({"epochs": 1, "batch_size": 1, "log_every": 1, "l2": -0.1}, "trainer.l2 must be a number"),
    ],
)
def test_trainer_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        check_trainer_settings(settings)


def test_kernel_grid_layout():
    weight = np.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2)
    grid = kernel_grid(weight, scale=4, gap=1)  # a row per kernel, a column per channel
    assert grid.dtype == np.uint8 and grid.shape == (2 * 9 + 1, 3 * 9 + 1)
    tile = grid[1:9, 1:9]  # kernel 0, channel 0, scaled to its own min..max
    assert tile.min() == 0 and tile.max() == 255
    np.testing.assert_array_equal(tile[::4, ::4], [[0, 85], [170, 255]])
    flat = kernel_grid(np.ones((1, 1, 3, 3)))
    assert (flat[1:-1, 1:-1] == 128).all()  # a constant kernel is mid-grey
    single = kernel_grid(np.random.default_rng(0).standard_normal((32, 1, 3, 3)), scale=4)
    assert single.shape == (6 * 13 + 1, 6 * 13 + 1)  # 32 kernels in a 6 x 6 grid
    wide = kernel_grid(np.zeros((64, 32, 3, 3)))
    assert wide.shape[1] <= 1024


def test_progress_bar_shows_on_request_and_stays_quiet_otherwise(capsys):
    pytest.importorskip("tqdm")
    data = load_dataset("seed_20x20", n_per_class=4, noise=0.3, seed=0)

    def train(progress):
        model = Sequential(
            [Conv2D(1, 20, bias=False), Flatten(), Dense(1)],
            LogisticLogLikelihood(),
            data.input_shape,
            seed=0,
        )
        fit(
            model,
            GradientAscent(0.1),
            data,
            epochs=2,
            batch_size=4,
            kernels_every=0,
            progress=progress,
        )
        return capsys.readouterr().err

    shown = train(True)
    assert "epoch 1/2" in shown and "epoch 2/2" in shown and "loss=" in shown
    assert train(None) == ""  # stderr is not a terminal under pytest
    assert train(False) == ""


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow that makes it diverge
def test_divergence_stops_at_its_step_naming_where_it_began(backend):
    """On NumPy each step's loss is checked before the update: the run stops at the first
    non-finite one, names the step and where the batch first went non-finite, logs what
    it saw, and never applies that step's update."""
    if backend.is_gpu:
        pytest.skip("the GPU reads losses once per interval: next test")
    data = load_dataset("digits", seed=0)
    layers = [Conv2D(4, 3), ReLU(), Flatten(), Dense(10)]
    model = Sequential(layers, SoftmaxCrossEntropy(), data.input_shape, backend=backend, seed=0)
    recorder = Recorder()
    with pytest.raises(DivergedError) as diverged:
        fit(
            model,
            GradientAscent(1e30),
            data,
            epochs=3,
            batch_size=32,
            log_every=5,
            tracker=recorder,
            progress=False,
        )
    message = str(diverged.value)
    found = re.fullmatch(
        r"training loss became (nan|inf) at step (\d+); first non-finite: (.+); the model "
        r"diverged \(try a smaller optimizer\.lr.*; no checkpoint was written before it",
        message,
    )
    assert found, message
    step, where = int(found.group(2)), found.group(3)
    assert re.fullmatch(r"parameter \w+\.\w+ \(.*\)|the output of layer \w+ \(\w+\)", where)
    logged = recorder.histories["train_loss_step"]
    assert [s for s, _ in logged] == list(range(1, step + 1))  # all seen, the bad one last
    assert all(np.isfinite(v) for _, v in logged[:-1]) and not np.isfinite(logged[-1][1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_read_once_per_interval_is_caught_in_the_last_unread_steps_too(
    backend, monkeypatch
):
    """The GPU's way, forced here on NumPy: losses are read once per log interval, and
    the ones left after the last full interval are read and checked at the epoch's end
    (before, a NaN there went by and the run 'finished')."""
    import gpucnn.fit as loop

    original = loop._TrainingSplit.__init__

    def read_per_interval(self, *args):
        original(self, *args)
        self.check_each_step = False

    monkeypatch.setattr(loop._TrainingSplit, "__init__", read_per_interval)
    data = load_dataset("seed_20x20", n_per_class=20, noise=0.3, seed=0)  # 40 images
    model = Sequential(
        [Conv2D(1, 3), Flatten(), Dense(1)],
        LogisticLogLikelihood(),
        data.input_shape,
        backend=backend,
        seed=0,
    )
    recorder = Recorder()
    with pytest.raises(DivergedError, match=r"training loss became (nan|inf) at step \d+"):
        fit(
            model,
            GradientAscent(1e30),
            data,
            epochs=1,
            batch_size=10,
            log_every=100,
            tracker=recorder,
            progress=False,
        )
    assert [step for step, _ in recorder.histories["train_loss_step"]] == [1, 2, 3, 4]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_find_non_finite_names_the_first_place(rng):
    def net():
        return Sequential(
            [Conv2D(2, 3), ReLU(), Flatten(), Dense(3)],
            SoftmaxCrossEntropy(),
            (1, 6, 6),
            seed=0,
        )

    x, y = rng.standard_normal((4, 1, 6, 6)), rng.integers(0, 3, 4)
    assert net().find_non_finite(x, y).startswith("nowhere")
    bad_param = net()
    bad_param.params["dense1.bias"][1] = np.inf
    assert bad_param.find_non_finite(x, y).startswith("parameter dense1.bias")
    bad_input = x.copy()
    bad_input[2, 0, 3, 3] = np.nan
    assert net().find_non_finite(bad_input, y) == "the input batch itself"
    overflowing = net()
    overflowing.params["dense1.weight"][...] = 3e37  # finite, but the sum overflows float32
    assert overflowing.find_non_finite(np.abs(x) + 1, y) == "the output of layer dense1 (dense)"


class InterruptedInDel:
    """Sends Ctrl-C to this process from ``__del__``: the KeyboardInterrupt is raised
    there, and Python drops it ("Exception ignored"), as it does inside SQLAlchemy's
    weakref callbacks during garbage collection."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here, inside __del__


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_that_python_drops_still_stops_training():
    data = load_dataset("seed_20x20", n_per_class=10, noise=0.3, seed=0)
    model = Sequential(
        [Conv2D(1, 20, bias=False), Flatten(), Dense(1)], LogisticLogLikelihood(), (1, 20, 20)
    )
    before = signal.getsignal(signal.SIGINT)
    with sticky_interrupts():
        InterruptedInDel()  # collected at once; its interrupt is lost...
        with pytest.raises(KeyboardInterrupt):  # ...but the next step raises it
            fit(model, GradientAscent(0.1), data, epochs=5, batch_size=8, progress=False)
        assert not model.grads  # stopped before the first step
    assert signal.getsignal(signal.SIGINT) is before
    fit(model, GradientAscent(0.1), data, epochs=1, batch_size=8, progress=False)  # cleared
