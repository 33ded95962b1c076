"""Whole networks: float64 gradient checks of composite nets, L2, initialisation,
parameters by name, and checkpoint round trips."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest

from gpucnn import (
    Adam,
    Conv2D,
    Dense,
    Flatten,
    GradientAscent,
    L2Pool2D,
    LogisticLogLikelihood,
    MaxPool2D,
    Momentum,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
    Tanh,
    load_checkpoint,
)
from gpucnn.array.backend import get_backend, to_host
from gpucnn.nn.layers import AvgPool2D, Logistic
from tests.gradcheck import assert_close, numerical_gradient


def check_model_gradients(model, x, labels):
    loss_value = model.loss(x, labels)
    assert np.isfinite(to_host(loss_value))
    analytic = {k: to_host(v).copy() for k, v in model.backward().items()}
    assert set(analytic) == set(model.params)

    def objective():
        return float(to_host(model.loss(x, labels)))

    for key, value in model.params.items():
        assert_close(
            analytic[key], numerical_gradient(objective, value), rtol=1e-5, atol=1e-8, what=key
        )


COMPOSITES = {
    "several_kernels_logistic_l2": dict(
        layers=lambda: [Conv2D(3, 3), MaxPool2D(2), Flatten(), Dense(1)],
        head=LogisticLogLikelihood,
        input_shape=(1, 6, 6),
        l2=0.1,
        classes=2,
    ),
    "colour_l2pool_rowmajor_softmax": dict(
        layers=lambda: [Conv2D(2, 3, bias=True), L2Pool2D(2), Flatten("C"), Dense(3)],
        head=SoftmaxCrossEntropy,
        input_shape=(3, 6, 7),
        l2=0.0,
        classes=3,
    ),
    "stacked_conv_stride_padding": dict(
        layers=lambda: [
            Conv2D(3, 3, stride=1, padding="same"),
            Tanh(),
            Conv2D(2, 3, stride=2, padding=1, mode="cross_correlation"),
            ReLU(),
            MaxPool2D(2, 1),
            Flatten(),
            Dense(4),
            Logistic(),
            Dense(3),
        ],
        head=SoftmaxCrossEntropy,
        input_shape=(2, 7, 7),
        l2=0.05,
        classes=3,
    ),
    "stacked_conv_avgpool_logistic": dict(
        layers=lambda: [
            Conv2D(2, 2),
            ReLU(),
            Conv2D(2, 2),
            AvgPool2D(2),
            Flatten(),
            Dense(1, bias=False),
        ],
        head=LogisticLogLikelihood,
        input_shape=(1, 6, 6),
        l2=0.01,
        classes=2,
    ),
}


@pytest.mark.parametrize("name", list(COMPOSITES))
def test_composite_gradients(name, backend, rng):
    spec = COMPOSITES[name]
    model = Sequential(
        spec["layers"](),
        spec["head"](),
        spec["input_shape"],
        backend=backend,
        dtype="float64",
        seed=3,
        l2=spec["l2"],
    )
    x = rng.standard_normal((4, *spec["input_shape"]))
    labels = rng.integers(0, spec["classes"], size=4)
    if spec["head"] is LogisticLogLikelihood:
        labels = labels.astype(float)
    check_model_gradients(model, x, labels)


def test_l2_penalty_is_on_weights_not_biases(rng):
    def build(l2):
        return Sequential(
            [Conv2D(2, 3), Flatten(), Dense(1)],
            LogisticLogLikelihood(),
            (1, 4, 4),
            dtype="float64",
            seed=0,
            l2=l2,
        )

    plain, regularised = build(0.0), build(0.5)
    regularised.set_params({"conv1.bias": [1.0, -2.0], "dense1.bias": [3.0]})
    plain.set_params({"conv1.bias": [1.0, -2.0], "dense1.bias": [3.0]})
    x, y = rng.standard_normal((3, 1, 4, 4)), np.array([0.0, 1.0, 1.0])
    weights = [plain.params[k] for k in ("conv1.weight", "dense1.weight")]
    penalty = 0.25 * sum(float((w**2).sum()) for w in weights)
    assert float(regularised.loss(x, y)) == pytest.approx(float(plain.loss(x, y)) + penalty)
    g_reg, g_plain = regularised.backward(), plain.backward()
    for key in ("conv1.bias", "dense1.bias"):
        np.testing.assert_allclose(g_reg[key], g_plain[key])
    for key in ("conv1.weight", "dense1.weight"):
        np.testing.assert_allclose(g_reg[key], g_plain[key] + 0.5 * plain.params[key])
    assert regularised.decayed_params() == ["conv1.weight", "dense1.weight"]


def test_backward_is_the_gradient_of_the_last_loss_with_or_without_penalty(rng):
    """loss(penalty=False) then backward() gives the data term's gradient, checked
    against finite differences of that same data term."""
    model = Sequential(
        [Conv2D(2, 3), Tanh(), Flatten(), Dense(3)],
        SoftmaxCrossEntropy(),
        (1, 5, 5),
        dtype="float64",
        seed=2,
        l2=0.3,
    )
    x, y = rng.standard_normal((4, 1, 5, 5)), rng.integers(0, 3, 4)
    data_value = float(model.loss(x, y, penalty=False))
    data_grads = {k: v.copy() for k, v in model.backward().items()}
    assert float(model.loss(x, y)) == pytest.approx(data_value + float(model.penalty()))
    full_grads = model.backward()
    for key, param in model.params.items():
        numeric = numerical_gradient(lambda: float(model.loss(x, y, penalty=False)), param)
        assert_close(data_grads[key], numeric, what=key)
        extra = 0.3 * param if key.endswith("weight") else 0.0
        np.testing.assert_allclose(full_grads[key], data_grads[key] + extra, err_msg=key)


@pytest.mark.parametrize("penalty", [False, True])
def test_backward_with_a_scale_is_the_gradient_of_the_scaled_loss(penalty, rng):
    """backward(scale=s) gives d(s * loss)/d params, the L2 term included: checked
    against finite differences of s times the loss."""
    model = Sequential(
        [Conv2D(2, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(3)],
        SoftmaxCrossEntropy(),
        (2, 6, 6),
        dtype="float64",
        seed=4,
        l2=0.2,
    )
    x, y = rng.standard_normal((5, 2, 6, 6)), rng.integers(0, 3, 5)
    scale = 0.375
    model.loss(x, y, penalty=penalty)
    scaled = {k: v.copy() for k, v in model.backward(scale=scale).items()}
    for key, param in model.params.items():
        numeric = numerical_gradient(lambda: scale * float(model.loss(x, y, penalty)), param)
        assert_close(scaled[key], numeric, what=key)


def test_a_replica_shares_parameters_but_not_caches(rng):
    model = Sequential(
        [Conv2D(2, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(2)],
        SoftmaxCrossEntropy(),
        (1, 8, 8),
        dtype="float64",
        seed=1,
    )
    replica = model.replica()
    assert all(replica.params[k] is v for k, v in model.params.items())
    a, b = rng.standard_normal((3, 1, 8, 8)), rng.standard_normal((5, 1, 8, 8))
    ya, yb = rng.integers(0, 2, 3), rng.integers(0, 2, 5)
    model.loss(a, ya)
    replica.loss(b, yb)  # its own caches: the model's backward still sees batch a
    grads_a = {k: v.copy() for k, v in model.backward().items()}
    twin = Sequential(
        [Conv2D(2, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(2)],
        SoftmaxCrossEntropy(),
        (1, 8, 8),
        dtype="float64",
        seed=1,
    )
    twin.loss(a, ya)
    for key, value in twin.backward().items():
        np.testing.assert_allclose(grads_a[key], value, err_msg=key)
    model.params["dense1.weight"] += 1.0  # an update in place reaches the replica
    np.testing.assert_allclose(replica.forward(a), model.forward(a))


def test_a_deep_copy_is_independent_and_computes_the_same(rng):
    model = Sequential(
        [Conv2D(2, 3), Flatten(), Dense(1)], LogisticLogLikelihood(), (1, 4, 4), seed=0
    )
    twin = copy.deepcopy(model)
    x = rng.standard_normal((2, 1, 4, 4))
    np.testing.assert_array_equal(twin.forward(x), model.forward(x))
    assert twin.backend is model.backend
    twin.params["dense1.weight"] += 1.0
    assert not np.array_equal(twin.params["dense1.weight"], model.params["dense1.weight"])


def test_named_params_and_seeded_init():
    def build(seed):
        return Sequential(
            [Conv2D(4, 3, init="he"), ReLU(), Conv2D(2, 3, init="glorot"), Flatten(), Dense(10)],
            SoftmaxCrossEntropy(),
            (1, 16, 16),
            seed=seed,
        )

    a, b, c = build(7), build(7), build(8)
    assert list(a.params) == [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "dense1.weight",
        "dense1.bias",
    ]
    for key in a.params:
        np.testing.assert_array_equal(a.params[key], b.params[key])
    assert not np.array_equal(a.params["conv1.weight"], c.params["conv1.weight"])
    assert a.params["conv1.weight"].dtype == np.float32
    # He: std sqrt(2 / fan_in); Glorot: uniform within sqrt(6 / (fan_in + fan_out)).
    he = Sequential(
        [Conv2D(64, 5, init="he"), Flatten(), Dense(2)], SoftmaxCrossEntropy(), (8, 5, 5), seed=0
    ).params["conv1.weight"]
    assert he.std() == pytest.approx(np.sqrt(2 / (8 * 25)), rel=0.03)
    assert abs(float(he.mean())) < 0.01
    glorot = c.params["conv2.weight"]
    assert np.abs(glorot).max() <= np.sqrt(6 / (4 * 9 + 2 * 9))
    assert np.all(a.params["conv1.bias"] == 0)


def test_same_seed_same_weights_on_every_backend(backend):
    layers = lambda: [Conv2D(3, 3), MaxPool2D(2), Flatten(), Dense(2)]  # noqa: E731
    cpu = Sequential(layers(), SoftmaxCrossEntropy(), (1, 8, 8), backend="numpy", seed=5)
    other = Sequential(layers(), SoftmaxCrossEntropy(), (1, 8, 8), backend=backend, seed=5)
    for key in cpu.params:
        np.testing.assert_array_equal(to_host(other.params[key]), cpu.params[key])


def test_float32_stays_float32(backend, rng):
    model = Sequential(
        [Conv2D(2, 3), ReLU(), L2Pool2D(2), Flatten(), Dense(3)],
        SoftmaxCrossEntropy(),
        (1, 8, 8),
        backend=backend,
        l2=0.1,
    )
    x = rng.standard_normal((5, 1, 8, 8))  # float64 on the host: cast once on entry
    loss = model.loss(x, rng.integers(0, 3, 5))
    assert loss.dtype == np.float32
    grads = model.backward()
    assert all(g.dtype == np.float32 for g in grads.values())
    for opt in (GradientAscent(0.1), Momentum(0.1), Adam(0.01)):
        opt.step(model.params, grads)
        assert all(p.dtype == np.float32 for p in model.params.values())


@pytest.mark.parametrize("optimizer_cls", [GradientAscent, Momentum, Adam])
def test_checkpoint_round_trip(optimizer_cls, tmp_path, backend, rng):
    model = Sequential(
        [Conv2D(2, 3, padding="same"), ReLU(), MaxPool2D(2), Flatten("C"), Dense(3)],
        SoftmaxCrossEntropy(),
        (2, 6, 6),
        backend=backend,
        seed=2,
        l2=0.01,
    )
    optimizer = optimizer_cls(0.05)
    x, y = rng.standard_normal((4, 2, 6, 6)), rng.integers(0, 3, 4)
    for _ in range(3):
        model.loss(x, y)
        optimizer.step(model.params, model.backward())
    path = model.save(tmp_path / "model.npz", optimizer)
    # The archive holds no pickled objects.
    with np.load(path, allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
    restored, restored_opt = load_checkpoint(path, backend="numpy")  # always loads on the CPU
    assert restored.config() == model.config()
    for key in model.params:
        np.testing.assert_array_equal(restored.params[key], to_host(model.params[key]))
    assert restored_opt.config() == optimizer.config() and restored_opt.steps == 3
    # Continuing training from the checkpoint matches continuing the original.
    model.loss(x, y)
    optimizer.step(model.params, model.backward())
    restored.loss(x, y)
    restored_opt.step(restored.params, restored.backward())
    for key in model.params:
        np.testing.assert_allclose(
            restored.params[key], to_host(model.params[key]), rtol=1e-5, atol=1e-6
        )


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="is not a readable .npz file"):
        load_checkpoint(bad)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(2))
    with pytest.raises(ValueError, match="is not a gpucnn checkpoint"):
        load_checkpoint(other)


DATA = Path(__file__).resolve().parent / "data"


def test_a_checkpoint_from_before_the_package_layout_loads_and_trains_on(rng):
    """Written by commit c61e7f2 (flat gpucnn/ package, before the layout of folders):
    every layer type, Adam after 3 steps. That code's own outputs are stored beside it."""
    model, optimizer = load_checkpoint(DATA / "checkpoint-c61e7f2.npz")
    with np.load(DATA / "checkpoint-c61e7f2-expected.npz") as expected:
        x, y = expected["x"], expected["y"]
        np.testing.assert_allclose(model.forward(x), expected["forward"], rtol=1e-6, atol=1e-6)
        loss = float(model.loss(x, y))
        assert loss == pytest.approx(float(expected["loss"]), rel=1e-6)
        assert optimizer.config()["type"] == "adam" and optimizer.steps == 3
        optimizer.step(model.params, model.backward())  # Adam's moments came back too
        after = np.concatenate([v.ravel() for v in model.params.values()])
        np.testing.assert_allclose(after, expected["after_step"], rtol=1e-5, atol=1e-6)


def test_save_does_not_corrupt_existing_checkpoint_on_failure(tmp_path, monkeypatch):
    model = Sequential([Flatten(), Dense(2)], SoftmaxCrossEntropy(), (1, 2, 2))
    path = model.save(tmp_path / "keep.npz")
    before = path.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.npz"]


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 1, 2, 10], "labels must be class indices 0..9, got 10"),
        ([0, -1, 2, 3], "labels must be class indices 0..9, got -1"),  # would wrap to 9
        ([0.0, 1.5, 2.0, 3.0], "labels must be class indices 0..9, got 1.5"),  # would truncate
        ([0.0, float("nan"), 2.0, 3.0], "labels must be class indices 0..9, got nan"),
        (["a", "b", "c", "d"], "labels must be class indices 0..9, got dtype <U1"),
    ],
)
def test_softmax_rejects_labels_that_are_not_class_indices(rng, labels, message):
    model = Sequential([Flatten(), Dense(10)], SoftmaxCrossEntropy(), (1, 2, 2))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.loss(rng.standard_normal((4, 1, 2, 2)), labels)


def test_softmax_takes_integer_valued_labels_of_any_numeric_dtype(rng):
    model = Sequential([Flatten(), Dense(10)], SoftmaxCrossEntropy(), (1, 2, 2))
    x = rng.standard_normal((4, 1, 2, 2))
    expected = float(model.loss(x, np.array([0, 9, 2, 3])))
    for labels in ([0.0, 9.0, 2.0, 3.0], np.array([0, 9, 2, 3], dtype=np.uint8)):
        assert float(model.loss(x, labels)) == expected


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 1, 2, 0], "labels must be in [0, 1] (class 1 = 1, class 0 = 0), got 2"),
        ([0, -1, 1, 0], "labels must be in [0, 1] (class 1 = 1, class 0 = 0), got -1"),
        ([0.0, float("nan"), 1, 0], "labels must be in [0, 1] (class 1 = 1, class 0 = 0), got nan"),
        (["x", "y", "x", "y"], "labels must be numbers in [0, 1], got dtype <U1"),
    ],
)
def test_logistic_rejects_labels_outside_zero_one(rng, labels, message):
    model = Sequential([Flatten(), Dense(1)], LogisticLogLikelihood(), (1, 2, 2))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        model.loss(rng.standard_normal((4, 1, 2, 2)), labels)
    # Targets between 0 and 1 are a valid Bernoulli log-likelihood.
    assert np.isfinite(float(model.loss(rng.standard_normal((4, 1, 2, 2)), [0.25] * 4)))


@pytest.mark.parametrize(
    "damage, problem",
    [
        ({"architecture": "{not json"}, "Expecting property name enclosed in double quotes"),
        ({"architecture": '{"input_shape": [1, 5, 5]}'}, "missing entry 'layers'"),
        ({"architecture": None}, "missing entry 'architecture'"),
        ({"param/conv1.weight": None}, "missing ['conv1.weight'], unexpected []"),
        ({"param/extra.weight": np.zeros(3)}, "missing [], unexpected ['extra.weight']"),
        ({"param/conv1.weight": np.zeros((3, 1, 3, 3))}, "conv1.weight must have shape"),
        ({"param/conv1.weight": np.full((2, 1, 3, 3), np.nan)}, "conv1.weight holds non-numeric"),
        ({"param/dense1.bias": np.array(["a"] * 10)}, "dense1.bias holds non-numeric"),
        ({"optimizer": '{"type": "rmsprop", "lr": 0.1}'}, "optimizer 'rmsprop' is not known"),
        ({"optimizer_steps": None}, "missing entry 'optimizer_steps'"),
    ],
)
def test_a_damaged_checkpoint_is_one_clear_error(tmp_path, damage, problem):
    model = Sequential([Conv2D(2, 3), Flatten(), Dense(10)], SoftmaxCrossEntropy(), (1, 5, 5))
    path = model.save(tmp_path / "model.npz", Adam(0.01))
    with np.load(path, allow_pickle=False) as data:
        contents = {key: data[key] for key in data.files}
    for key, value in damage.items():
        if value is None:
            del contents[key]
        else:
            contents[key] = np.asarray(value)
    np.savez(path, **contents)
    with pytest.raises(ValueError) as caught:
        load_checkpoint(path)
    assert str(caught.value).startswith(f"checkpoint '{path}' is damaged: ")
    assert problem in str(caught.value)


def test_a_bad_backend_name_is_not_blamed_on_the_checkpoint(tmp_path):
    model = Sequential([Flatten(), Dense(2)], SoftmaxCrossEntropy(), (1, 2, 2))
    path = model.save(tmp_path / "model.npz")
    with pytest.raises(ValueError, match="^backend 'tpu' is not known"):
        load_checkpoint(path, backend="tpu")


def test_an_empty_batch_is_a_clear_error(rng):
    model = Sequential([Flatten(), Dense(10)], SoftmaxCrossEntropy(), (1, 2, 2))
    empty = rng.standard_normal((0, 1, 2, 2))
    for call in (lambda: model.loss(empty, []), lambda: model.forward(empty)):
        with pytest.raises(ValueError, match=r"^the batch is empty \(0 samples\)$"):
            call()


def test_model_input_and_structure_errors(rng):
    model = Sequential([Conv2D(1, 3), Flatten(), Dense(1)], LogisticLogLikelihood(), (1, 5, 5))
    with pytest.raises(
        ValueError, match=r"input has shape \(2, 5, 5\); this model takes \(N, 1, 5, 5\)"
    ):
        model.forward(rng.standard_normal((2, 5, 5)))
    with pytest.raises(ValueError, match="needs image input"):
        Sequential([Flatten(), Conv2D(1, 3)], LogisticLogLikelihood(), (1, 5, 5))
    with pytest.raises(ValueError, match="logistic head needs exactly one output"):
        Sequential([Flatten(), Dense(3)], LogisticLogLikelihood(), (1, 5, 5))
    with pytest.raises(ValueError, match="softmax head needs a flat output of >= 2 classes"):
        Sequential([Flatten(), Dense(1)], SoftmaxCrossEntropy(), (1, 5, 5))
    with pytest.raises(ValueError, match="input_shape must be"):
        Sequential([Flatten()], SoftmaxCrossEntropy(), (1, 0, 5))
    with pytest.raises(ValueError, match="l2 must be a number >= 0"):
        Sequential([Flatten(), Dense(2)], SoftmaxCrossEntropy(), (1, 2, 2), l2=-1)
    for seed in (-1, 1.5, "0"):
        with pytest.raises(ValueError, match=f"seed must be an int >= 0, got {seed!r}"):
            Sequential([Flatten(), Dense(2)], SoftmaxCrossEntropy(), (1, 2, 2), seed=seed)
    seeded = Sequential([Flatten(), Dense(2)], SoftmaxCrossEntropy(), (1, 2, 2), seed=np.int64(3))
    assert seeded.seed == 3 and type(seeded.seed) is int
    with pytest.raises(ValueError, match="dtype 'float16' is not supported"):
        Sequential([Flatten(), Dense(2)], SoftmaxCrossEntropy(), (1, 2, 2), dtype="float16")
    with pytest.raises(ValueError, match=r"dense1.weight must have shape \(9, 1\)"):
        model.set_params({"dense1.weight": np.zeros((4, 1))})
    with pytest.raises(RuntimeError, match="call loss"):
        model.backward()


def test_training_reduces_loss(backend, rng):
    """A short run on a separable toy problem: sanity that the pieces learn together."""
    x = rng.standard_normal((64, 1, 6, 6))
    y = (x[:, 0, :3].sum(axis=(1, 2)) > x[:, 0, 3:].sum(axis=(1, 2))).astype(int)
    model = Sequential(
        [Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(2)],
        SoftmaxCrossEntropy(),
        (1, 6, 6),
        backend=backend,
        seed=0,
    )
    optimizer = Adam(0.02)
    first = float(to_host(model.loss(x, y)))
    for _ in range(60):
        model.loss(x, y)
        optimizer.step(model.params, model.backward())
    assert float(to_host(model.loss(x, y))) < 0.5 * first
    accuracy = (to_host(model.predict(x)) == y).mean()
    assert accuracy > 0.9


def test_training_goes_on_after_moving_model_and_optimizer(backend, rng):
    def fresh():
        return Sequential(
            [Conv2D(2, 3), Flatten(), Dense(3)], SoftmaxCrossEntropy(), (1, 5, 5), seed=4
        )

    x, y = rng.standard_normal((6, 1, 5, 5)), np.array([0, 1, 2, 0, 1, 2])
    moved, reference = fresh(), fresh()
    moved_opt, reference_opt = Adam(0.05), Adam(0.05)
    for step in range(5):
        if step == 2:  # Adam's moments are under way: they must travel too
            moved.to(backend, moved_opt)
            x_moved, y_moved = backend.asarray(x, "float32"), backend.asarray(y)
        if step >= 2:
            moved.loss(x_moved, y_moved)
        else:
            moved.loss(x, y)
        moved_opt.step(moved.params, moved.backward())
        reference.loss(x, y)
        reference_opt.step(reference.params, reference.backward())
    assert moved_opt.steps == 5
    for key, value in reference.params.items():
        np.testing.assert_allclose(to_host(moved.params[key]), value, rtol=1e-5, atol=1e-6)


def test_model_moves_between_backends(backend):
    model = Sequential(
        [Conv2D(2, 3), Flatten(), Dense(2)], SoftmaxCrossEntropy(), (1, 5, 5), seed=1
    )
    before = {k: v.copy() for k, v in model.params.items()}
    model.to(backend).to(get_backend("numpy"))
    for key in before:
        np.testing.assert_array_equal(model.params[key], before[key])


def test_flatten_f_keeps_the_order_its_checkpoint_was_trained_with(tmp_path, rng):
    """Format 2 made "F" MATLAB's order; a format-1 file's "F" (channels fastest) loads
    as F_channels_first, so its outputs do not change. With one channel both agree."""
    layers = [Conv2D(3, 2), Flatten("F"), Dense(4)]
    model = Sequential(layers, SoftmaxCrossEntropy(), (2, 5, 5), dtype="float64", seed=1)
    x = rng.standard_normal((3, 2, 5, 5))
    path = model.save(tmp_path / "v2.npz")
    assert load_checkpoint(path)[0].layer("flatten1").order == "F"
    with np.load(path) as data:  # the same parameters, labelled format 1
        entries = {k: data[k] for k in data.files}
    entries["format"] = np.array("gpucnn-checkpoint-v1")
    np.savez(tmp_path / "v1.npz", **entries)
    old, _ = load_checkpoint(tmp_path / "v1.npz")
    assert old.layer("flatten1").order == "F_channels_first"
    legacy = Sequential(
        [Conv2D(3, 2), Flatten("F_channels_first"), Dense(4)],
        SoftmaxCrossEntropy(),
        (2, 5, 5),
        dtype="float64",
        seed=1,
    )
    np.testing.assert_array_equal(old.forward(x), legacy.forward(x))
    assert not np.allclose(old.forward(x), model.forward(x))
    one = Sequential([Flatten("F"), Dense(2)], SoftmaxCrossEntropy(), (1, 3, 3), seed=2)
    one.save(tmp_path / "one.npz")
    with np.load(tmp_path / "one.npz") as data:
        entries = {k: data[k] for k in data.files}
    entries["format"] = np.array("gpucnn-checkpoint-v1")
    np.savez(tmp_path / "one_v1.npz", **entries)
    assert load_checkpoint(tmp_path / "one_v1.npz")[0].layer("flatten1").order == "F"
