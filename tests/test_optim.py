"""Optimizer update rules against hand-written formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpucnn.array.backend import to_host
from gpucnn.nn.optim import Adam, GradientAscent, Momentum, make_optimizer


def run(optimizer, backend, grads_per_step, start):
    params = {"w": backend.asarray(start.copy())}
    for g in grads_per_step:
        optimizer.step(params, {"w": backend.asarray(g)})
    return to_host(params["w"])


@pytest.fixture
def steps(rng):
    return [rng.standard_normal(5) for _ in range(4)]


def test_gradient_ascent_is_descent_on_the_loss(backend, steps, rng):
    start = rng.standard_normal(5)
    expected = start - 0.1 * sum(steps)  # theta + eta * dJ/dtheta with dJ = -dL
    np.testing.assert_allclose(run(GradientAscent(0.1), backend, steps, start), expected)


def test_momentum(backend, steps, rng):
    start = rng.standard_normal(5)
    w, v = start.copy(), np.zeros(5)
    for g in steps:
        v = 0.8 * v - 0.05 * g
        w = w + v
    np.testing.assert_allclose(run(Momentum(0.05, 0.8), backend, steps, start), w)


def test_adam(backend, steps, rng):
    start = rng.standard_normal(5)
    w, m, v = start.copy(), np.zeros(5), np.zeros(5)
    b1, b2, eps, lr = 0.9, 0.99, 1e-8, 0.01
    for t, g in enumerate(steps, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(run(Adam(lr, b1, b2, eps), backend, steps, start), w, rtol=1e-10)


@pytest.mark.parametrize(
    "kind, options, message",
    [
        ("ascent", {"lr": 0}, "learning rate \\(lr\\) must be a number > 0, got 0"),
        ("ascent", {"lr": float("inf")}, "must be finite"),
        ("momentum", {"lr": 0.1, "momentum": 1.5}, "momentum must be a number in \\[0, 1\\)"),
        ("adam", {"lr": 0.1, "beta2": -0.1}, "beta2 must be"),
        (
            "rmsprop",
            {"lr": 0.1},
            "optimizer 'rmsprop' is not known; allowed: ascent, momentum, adam",
        ),
    ],
)
def test_bad_options(kind, options, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(kind, **options)


def test_missing_gradient_is_an_error():
    with pytest.raises(KeyError, match="no gradient for parameters \\['b'\\]"):
        GradientAscent(0.1).step({"a": np.zeros(1), "b": np.zeros(1)}, {"a": np.zeros(1)})


def adam_by_formula(params, grad_steps, lr, b1, b2, eps):
    """Adam per parameter, written out: float32 numbers as gpucnn computes them (the
    bias corrections folded into the step and epsilon, see optim.Adam)."""
    params = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    for t, grads in enumerate(grad_steps, start=1):
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)  # Python floats: float32 stays
        for k in params:
            m[k] = m[k] * b1 + (1 - b1) * grads[k]
            v2[k] = v2[k] * b2 + (1 - b2) * (grads[k] * grads[k])
            params[k] = params[k] - step * m[k] / (np.sqrt(v2[k]) + eps * math.sqrt(1 - b2**t))
    return params, m, v2


def test_adam_on_numpy_updates_all_parameters_as_one_vector_with_the_same_numbers(rng):
    """The flat update (every parameter in one vector) gives each parameter and moment
    exactly the numbers of Adam applied to each parameter alone."""
    shapes = {"conv.weight": (4, 2, 3, 3), "conv.bias": (4,), "dense.weight": (5, 7)}
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grad_steps = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(5)
    ]
    params = {k: v.copy() for k, v in start.items()}
    adam = Adam(1e-2, 0.9, 0.99, 1e-8)
    for grads in grad_steps:
        adam.step(params, grads)
    expected, m, v = adam_by_formula(start, grad_steps, 1e-2, 0.9, 0.99, 1e-8)
    for slot in ("m", "v"):  # the flat update ran: every moment is a piece of one vector
        first, *others = [buffer.base for buffer in adam.state[slot].values()]
        assert first is not None and all(base is first for base in others)
    for k in shapes:
        assert params[k].dtype == np.float32
        np.testing.assert_array_equal(params[k], expected[k])
        np.testing.assert_array_equal(adam.state_dict()[f"m/{k}"], m[k])
        np.testing.assert_array_equal(adam.state_dict()[f"v/{k}"], v[k])


def test_adam_goes_on_exactly_from_loaded_state(rng):
    """A checkpoint's state (loaded as separate arrays) continues the flat update as if
    the run had never stopped, and the state dict is the moments, not stale copies."""
    shapes = {"a": (3, 4), "b": (6,)}
    grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(6)]
    start = {k: rng.standard_normal(s) for k, s in shapes.items()}
    straight, adam = {k: v.copy() for k, v in start.items()}, Adam(1e-2)
    for g in grads:
        adam.step(straight, g)
    resumed, first = {k: v.copy() for k, v in start.items()}, Adam(1e-2)
    for g in grads[:3]:
        first.step(resumed, g)
    second = Adam(1e-2)
    second.load_state_dict({k: v.copy() for k, v in first.state_dict().items()}, first.steps)
    for g in grads[3:]:
        second.step(resumed, g)
    for k in shapes:
        np.testing.assert_array_equal(resumed[k], straight[k])
    for key, value in adam.state_dict().items():
        np.testing.assert_array_equal(second.state_dict()[key], value)
