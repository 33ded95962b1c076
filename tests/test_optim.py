"""Optimizer update rules against hand-written formulas."""

from __future__ import annotations

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
