"""The lecture's worked examples, number for number (values typed in from the lecture).

Where the lecture's own arithmetic disagrees with a finite-difference gradient check
(dJ/dK of the 8x8 example), the check wins: see docs/lecture.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpucnn import Conv2D, Dense, Flatten, LogisticLogLikelihood, MaxPool2D, Sequential
from gpucnn.array.backend import to_host
from gpucnn.array.im2col import nchw_to_internal
from gpucnn.nn.layers import Pool2D
from tests.gradcheck import numerical_gradient

X8 = np.arange(1, 65, dtype=np.float64).reshape(8, 8)
K8 = np.arange(1, 10, dtype=np.float64).reshape(3, 3)
THETA = np.array([1.0, 2.0, 3.0, 4.0])

LECTURE_F = np.array(
    [
        [300, 345, 390, 435, 480, 525],
        [660, 705, 750, 795, 840, 885],
        [1020, 1065, 1110, 1155, 1200, 1245],
        [1380, 1425, 1470, 1515, 1560, 1605],
        [1740, 1785, 1830, 1875, 1920, 1965],
        [2100, 2145, 2190, 2235, 2280, 2325],
    ],
    dtype=np.float64,
)
LECTURE_Z = np.array([[1110, 1245], [2190, 2325]], dtype=np.float64)
LECTURE_H = np.array([1110, 2190, 1245, 2325], dtype=np.float64)
LECTURE_GRAD_THETA = np.array([-1110, -2190, -1245, -2325], dtype=np.float64)
# What the lecture prints for dJ/dK; a gradient check shows it is wrong (test below).
LECTURE_PRINTED_GRAD_K = -np.array([[295, 285, 275], [215, 205, 195], [135, 125, 115]], float)


def lecture_model(backend, flatten_order="F"):
    model = Sequential(
        [Conv2D(1, 3, bias=False), MaxPool2D(3, 3), Flatten(flatten_order), Dense(1, bias=False)],
        LogisticLogLikelihood(),
        input_shape=(1, 8, 8),
        backend=backend,
        dtype="float64",
    )
    model.set_params({"conv1.weight": K8[None, None], "dense1.weight": THETA[:, None]})
    return model


def run_layers(model, x):
    """Each intermediate of the forward pass, on the host."""
    out, h = {}, nchw_to_internal(model.prepare_input(x))
    for layer in model.layers:
        h = layer._forward(h)
        out[layer.name] = h
    return {k: to_host(v) for k, v in out.items()}


def test_convolution_4x4_example(backend):
    x = np.array([[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34], [41, 42, 43, 44]], float)
    k = np.array([[0.11, 0.12, 0.13], [0.21, 0.22, 0.23], [0.31, 0.32, 0.33]])
    conv = Conv2D(1, 3, bias=False)
    conv.build((1, 4, 4), backend, backend.random(0), "float64")
    conv.set_param("weight", backend.asarray(k[None, None]))
    f = to_host(conv.forward(backend.asarray(x[None, None])))[0, 0]
    np.testing.assert_allclose(f, [[37.5, 39.48], [57.3, 59.28]], rtol=1e-12)


def test_8x8_forward_matches_lecture(backend):
    model = lecture_model(backend)
    steps = run_layers(model, X8[None, None])
    np.testing.assert_array_equal(steps["conv1"][0, :, :, 0], LECTURE_F)
    np.testing.assert_array_equal(steps["pool1"][0, :, :, 0], LECTURE_Z)
    np.testing.assert_array_equal(steps["flatten1"][0], LECTURE_H)  # column-major
    assert to_host(steps["dense1"]).item() == 18525.0
    y_hat = to_host(model.predict_proba(X8[None, None])).item()
    assert y_hat == pytest.approx(1.0, abs=1e-12)


def test_8x8_objective_is_finite_at_net_18525(backend):
    model = lecture_model(backend)
    loss = to_host(model.loss(X8[None, None], np.array([0.0]))).item()
    # -J = -log(1 - g(18525)) = 18525 + log(1 + e^-18525) = 18525 in float64.
    assert loss == 18525.0
    grads = model.backward()
    for value in grads.values():
        assert np.isfinite(to_host(value)).all()


def test_8x8_grad_theta_matches_lecture(backend):
    model = lecture_model(backend)
    model.loss(X8[None, None], np.array([0.0]))
    grad_j_theta = -to_host(model.backward()["dense1.weight"]).ravel()  # dJ/dtheta = -dL/dtheta
    np.testing.assert_array_equal(grad_j_theta, LECTURE_GRAD_THETA)


def reference_grad_k_by_loops(x, k, theta, y):
    """dJ/dK written straight from the definitions with explicit loops (no engine code).

    F[a,b] = sum_ij X[a+i, b+j] K[M-1-i, M-1-j]   (true convolution, valid)
    Z = 3x3/stride-3 max pool of F; h = Z flattened column-major; J = log-likelihood.
    dJ/dK[p,q] = (y - y_hat) * sum_s theta_s * X[a_s + M-1-p, b_s + M-1-q], (a_s, b_s) the
    argmax of pooling window s.
    """
    m = k.shape[0]
    oh, ow = x.shape[0] - m + 1, x.shape[1] - m + 1
    f = np.zeros((oh, ow))
    for a in range(oh):
        for b in range(ow):
            f[a, b] = sum(
                x[a + i, b + j] * k[m - 1 - i, m - 1 - j] for i in range(m) for j in range(m)
            )
    winners = []
    for wb in range(2):  # column-major: windows down the first column first
        for wa in range(2):
            block = f[3 * wa : 3 * wa + 3, 3 * wb : 3 * wb + 3]
            r, c = np.unravel_index(np.argmax(block), block.shape)
            winners.append((3 * wa + r, 3 * wb + c))
    net = sum(theta[s] * f[a, b] for s, (a, b) in enumerate(winners))
    y_hat = 1.0 / (1.0 + np.exp(-net))
    grad = np.zeros_like(k)
    for p in range(m):
        for q in range(m):
            grad[p, q] = (y - y_hat) * sum(
                theta[s] * x[a + m - 1 - p, b + m - 1 - q] for s, (a, b) in enumerate(winners)
            )
    return grad


def test_8x8_grad_k_passes_gradient_check_and_corrects_lecture(backend):
    model = lecture_model(backend)
    x, y = X8[None, None], np.array([0.0])
    model.loss(x, y)
    grad_j_k = -to_host(model.backward()["conv1.weight"])[0, 0]

    kernel = model.params["conv1.weight"]

    def objective():  # J, the log-likelihood the lecture maximises
        return -to_host(model.loss(x, y)).item()

    numeric = numerical_gradient(objective, kernel, eps=1e-3)[0, 0]
    np.testing.assert_allclose(grad_j_k, numeric, rtol=1e-6)
    np.testing.assert_allclose(grad_j_k, reference_grad_k_by_loops(X8, K8, THETA, 0.0))
    # The correct values are -(535 - 80p - 10q); the lecture prints -(295 - 80p - 10q).
    p, q = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    np.testing.assert_array_equal(grad_j_k, -(535.0 - 80 * p - 10 * q))
    assert not np.allclose(grad_j_k, LECTURE_PRINTED_GRAD_K)
    np.testing.assert_array_equal(grad_j_k - LECTURE_PRINTED_GRAD_K, np.full((3, 3), -240.0))


def test_gradient_ascent_step_follows_lecture(backend):
    from gpucnn import GradientAscent

    model = lecture_model(backend)
    model.loss(X8[None, None], np.array([0.0]))
    grads = model.backward()
    eta = 1e-4
    expected_k = K8 + eta * (-to_host(grads["conv1.weight"])[0, 0])  # K <- K + eta dJ/dK
    GradientAscent(eta).step(model.params, grads)
    np.testing.assert_allclose(to_host(model.params["conv1.weight"])[0, 0], expected_k)


def test_pool_output_size_formula():
    # floor((D - Q) / S) + 1; with Q = S it agrees with the lecture's floor(D / S).
    for d, q, s, expected in [
        (6, 3, 3, 2),
        (7, 3, 3, 2),
        (7, 3, 2, 3),
        (5, 2, 1, 4),
        (20, 1, 1, 20),
    ]:
        pool = Pool2D("max", q, s)
        from gpucnn.array.backend import get_backend

        backend = get_backend("numpy")
        assert pool.build((1, d, d), backend, backend.random(0), "float64") == (
            1,
            expected,
            expected,
        )
