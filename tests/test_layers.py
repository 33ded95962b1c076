"""Each layer alone: values against independent references, float64 gradient checks on
every input and parameter, and clear errors for bad arguments and shapes."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gpucnn.array import conv as conv_module
from gpucnn.array.backend import is_gpu, to_host
from gpucnn.nn.layers import (
    Conv2D,
    Dense,
    Flatten,
    Logistic,
    Pool2D,
    ReLU,
    Tanh,
    layer_from_config,
)
from tests.conftest import tie_free
from tests.gradcheck import assert_close, numerical_gradient


def built(layer, in_shape, backend, seed=0):
    layer.build(in_shape, backend, backend.random(seed), "float64")
    return layer


def check_layer_gradients(layer, x_host, backend, rng):
    """Gradient check of L = sum(forward(x) * R) for a fixed random R."""
    x = backend.asarray(x_host, "float64")
    out = layer.forward(x)
    weights = backend.asarray(rng.standard_normal(out.shape), "float64")

    def objective():
        return float(to_host((layer.forward(x) * weights).sum()))

    objective()
    grad_x = layer.backward(weights)
    assert_close(grad_x, numerical_gradient(objective, x), what="input gradient")
    for key, value in layer.params.items():
        layer.forward(x)
        layer.backward(weights)
        analytic = to_host(layer.grads[key]).copy()
        assert_close(analytic, numerical_gradient(objective, value), what=f"grad of {key}")


# -- references written from the definitions -------------------------------------------
def reference_conv(x, k, b, stride, pads, flip):
    """Explicit loops over batch, kernel, output pixels: NCHW in, NCHW out."""
    top, bottom, left, right = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, w = x.shape
    p, _, kh, kw = k.shape
    if flip:
        k = k[:, :, ::-1, ::-1]
    oh, ow = (h - kh) // stride[0] + 1, (w - kw) // stride[1] + 1
    out = np.zeros((n, p, oh, ow))
    for a in range(oh):
        for bb in range(ow):
            patch = x[
                :, :, a * stride[0] : a * stride[0] + kh, bb * stride[1] : bb * stride[1] + kw
            ]
            out[:, :, a, bb] = np.einsum("nchw,pchw->np", patch, k)
    return out + (0 if b is None else b[None, :, None, None])


def reference_pool(x, kind, q, s):
    n, c, h, w = x.shape
    oh, ow = (h - q[0]) // s[0] + 1, (w - q[1]) // s[1] + 1
    out = np.zeros((n, c, oh, ow))
    for a in range(oh):
        for b in range(ow):
            win = x[:, :, a * s[0] : a * s[0] + q[0], b * s[1] : b * s[1] + q[1]]
            if kind == "max":
                out[:, :, a, b] = win.max(axis=(2, 3))
            elif kind == "avg":
                out[:, :, a, b] = win.mean(axis=(2, 3))
            else:
                out[:, :, a, b] = np.sqrt((win**2).sum(axis=(2, 3)))
    return out


# -- Conv2D -------------------------------------------------------------------------------
CONV_CASES = [
    # (in_shape C,H,W, P, kernel, stride, padding, mode, bias)
    ((1, 5, 5), 1, 3, 1, "valid", "convolution", False),
    ((3, 6, 5), 2, (3, 2), 1, "valid", "convolution", True),
    ((2, 7, 7), 3, 3, 2, "valid", "cross_correlation", True),
    ((2, 5, 6), 2, 3, 1, "same", "convolution", True),
    ((1, 6, 6), 2, 4, 2, "same", "cross_correlation", False),
    ((2, 4, 5), 2, 2, (1, 2), (1, 0, 2, 1), "convolution", True),
    ((1, 4, 4), 1, 4, 1, 1, "convolution", True),
]


@pytest.fixture(params=["row unfold", "row unfold, col2im", "im2col"])
def conv_path(request, monkeypatch):
    """Each way the array layer computes a convolution, forced for these small maps: the
    row unfold with its row fold for the input gradient (wherever the stride allows it),
    the row unfold with col2im, and im2col (CuPy's way, and NumPy's for small maps or
    several BLAS threads)."""
    monkeypatch.setattr(conv_module, "row_unfold_pays", lambda xp, column_bytes: False)
    if request.param != "im2col":
        if is_gpu(request.getfixturevalue("backend").xp):
            pytest.skip("the row unfold is NumPy's")
        monkeypatch.setattr(conv_module, "row_unfold_pays", lambda xp, column_bytes: True)
        folds = request.param == "row unfold"  # wherever it can: stride 1 down the map
        monkeypatch.setattr(conv_module, "row_fold_pays", lambda g: folds and g.stride[0] == 1)
    return request.param


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_matches_loop_reference(case, backend, rng, conv_path):
    in_shape, p, kernel, stride, padding, mode, bias = case
    conv = built(Conv2D(p, kernel, stride, padding, mode, bias), in_shape, backend)
    if bias:
        conv.set_param("bias", backend.asarray(rng.standard_normal(p)))
    x = rng.standard_normal((3, *in_shape))
    out = to_host(conv.forward(backend.asarray(x)))
    k = to_host(conv.params["weight"])
    b = to_host(conv.params["bias"]) if bias else None
    expected = reference_conv(x, k, b, conv.stride, conv.pads, mode == "convolution")
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    assert out.shape == (3, p) + conv.out_shape[1:]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_gradients(case, backend, rng, conv_path):
    in_shape, p, kernel, stride, padding, mode, bias = case
    conv = built(Conv2D(p, kernel, stride, padding, mode, bias), in_shape, backend)
    check_layer_gradients(conv, rng.standard_normal((2, *in_shape)), backend, rng)


def test_true_convolution_matches_scipy(rng):
    signal = pytest.importorskip("scipy.signal")
    from gpucnn.array.backend import get_backend

    backend = get_backend("numpy")
    x = rng.standard_normal((1, 1, 9, 7))
    conv = built(Conv2D(1, (4, 3), bias=False), (1, 9, 7), backend)
    k = to_host(conv.params["weight"])[0, 0]
    np.testing.assert_allclose(
        conv.forward(x)[0, 0], signal.convolve2d(x[0, 0], k, mode="valid"), rtol=1e-12
    )
    xcorr = built(Conv2D(1, (4, 3), bias=False, mode="cross_correlation"), (1, 9, 7), backend)
    xcorr.set_param("weight", k[None, None])
    np.testing.assert_allclose(
        xcorr.forward(x)[0, 0], signal.correlate2d(x[0, 0], k, mode="valid"), rtol=1e-12
    )


def test_conv_same_padding_keeps_size(backend):
    for kernel in (1, 2, 3, 4, 5):
        conv = built(Conv2D(2, kernel, padding="same"), (1, 7, 6), backend)
        assert conv.out_shape == (2, 7, 6)
    strided = built(Conv2D(2, 3, stride=2, padding="same"), (1, 7, 6), backend)
    assert strided.out_shape == (2, 4, 3)  # ceil(7/2), ceil(6/2)


def test_conv_kernel_larger_than_input_names_both_shapes(backend):
    with pytest.raises(ValueError, match=r"kernel 5x5 is larger than its padded input 4x6"):
        built(Conv2D(1, 5), (1, 4, 6), backend)
    built(Conv2D(1, 5, padding=1), (1, 4, 6), backend)  # padding makes it fit


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"out_channels": 0, "kernel_size": 3}, "out_channels must be an int >= 1, got 0"),
        # A pair is not a channel count (it was once read as its first entry).
        ({"out_channels": (2, 3), "kernel_size": 3}, r"out_channels must be .*, got \(2, 3\)"),
        ({"out_channels": 2, "kernel_size": 0}, "kernel_size must be an int >= 1"),
        ({"out_channels": 2, "kernel_size": 3, "stride": -1}, "stride must be"),
        ({"out_channels": 2, "kernel_size": 3, "padding": "full"}, "padding 'full' is not"),
        ({"out_channels": 2, "kernel_size": 3, "padding": -1}, "padding -1 is not allowed"),
        ({"out_channels": 2, "kernel_size": 3, "mode": "flip"}, "conv mode 'flip' is not known"),
        ({"out_channels": 2, "kernel_size": 3, "init": "xavier"}, "init 'xavier' is not known"),
    ],
)
def test_conv_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Conv2D(**kwargs)


def test_conv_wrong_channel_count(backend):
    with pytest.raises(ValueError, match="expects 3 input channels"):
        built(Conv2D(2, 3, in_channels=3), (1, 5, 5), backend)


# -- Pooling --------------------------------------------------------------------------------
POOL_CASES = [
    ("max", 2, None, (2, 6, 6)),
    ("max", 3, 3, (1, 6, 6)),
    ("max", 3, 2, (2, 7, 8)),  # overlapping windows
    ("max", (2, 3), (1, 2), (1, 5, 7)),
    ("l2", 2, None, (2, 4, 6)),
    ("l2", 3, 2, (1, 7, 7)),
    ("avg", 2, None, (2, 4, 4)),
    ("avg", 3, 1, (1, 5, 6)),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(POOL_CASES)])
def test_pool_matches_loop_reference_and_gradients(case, backend, rng):
    kind, window, stride, in_shape = case
    pool = built(Pool2D(kind, window, stride), in_shape, backend)
    x = tie_free((2, *in_shape), rng)
    expected = reference_pool(x, kind, pool.window, pool.stride)
    np.testing.assert_allclose(to_host(pool.forward(backend.asarray(x))), expected, rtol=1e-12)
    check_layer_gradients(pool, x, backend, rng)


def test_l2_pool_gradient_defined_for_all_zero_window(backend):
    pool = built(Pool2D("l2", 2), (1, 4, 4), backend)
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 2:, 2:] = [[3.0, 0.0], [0.0, 4.0]]
    out = to_host(pool.forward(backend.asarray(x)))
    np.testing.assert_allclose(out[0, 0], [[0, 0], [0, 5.0]])
    grad = to_host(pool.backward(backend.asarray(np.ones((1, 1, 2, 2)))))
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad[0, 0, :2, :2], 0.0)
    np.testing.assert_allclose(grad[0, 0, 2:, 2:], [[0.6, 0.0], [0.0, 0.8]])


def test_max_pool_ties_route_gradient_to_one_input(backend):
    pool = built(Pool2D("max", 2), (1, 2, 2), backend)
    pool.forward(backend.asarray(np.ones((1, 1, 2, 2))))
    grad = to_host(pool.backward(backend.asarray(np.full((1, 1, 1, 1), 5.0))))
    assert grad.sum() == 5.0 and (grad != 0).sum() == 1


def test_pool_errors(backend):
    with pytest.raises(ValueError, match="pool kind 'median' is not known; allowed: max, l2, avg"):
        Pool2D("median", 2)
    with pytest.raises(ValueError, match="pool window must be"):
        Pool2D("max", 0)
    with pytest.raises(ValueError, match="pool window 5x5 is larger than its input 4x4"):
        built(Pool2D("max", 5), (1, 4, 4), backend)


# -- Flatten ---------------------------------------------------------------------------------
def test_flatten_orders(backend, rng):
    x = rng.standard_normal((2, 3, 4, 5))
    col = built(Flatten("F"), (3, 4, 5), backend)
    row = built(Flatten("row_major"), (3, 4, 5), backend)
    out_f = to_host(col.forward(backend.asarray(x)))
    out_c = to_host(row.forward(backend.asarray(x)))
    for n in range(2):
        # MATLAB's Z(:) of the H x W x P stack of maps: NumPy's order="F" on (H, W, P).
        stack = x[n].transpose(1, 2, 0)
        np.testing.assert_array_equal(out_f[n], stack.flatten(order="F"))
        np.testing.assert_array_equal(out_c[n], x[n].flatten(order="C"))
    # Two 2x2 maps, written out: map 1 column by column, then map 2 column by column.
    maps = np.array([[[[1.0, 3.0], [2.0, 4.0]], [[5.0, 7.0], [6.0, 8.0]]]])
    two = built(Flatten("F"), (2, 2, 2), backend)
    np.testing.assert_array_equal(to_host(two.forward(backend.asarray(maps)))[0], range(1, 9))
    old = built(Flatten("F_channels_first"), (3, 4, 5), backend)
    out_old = to_host(old.forward(backend.asarray(x)))
    for n in range(2):  # what "F" meant before checkpoint format 2
        np.testing.assert_array_equal(out_old[n], x[n].flatten(order="F"))
    check_layer_gradients(old, x, backend, rng)
    # One channel: column-major reads the map column after column (the lecture's h).
    z = np.array([[[[1110.0, 1245.0], [2190.0, 2325.0]]]])
    one = built(Flatten(), (1, 2, 2), backend)
    np.testing.assert_array_equal(
        to_host(one.forward(backend.asarray(z)))[0], [1110, 2190, 1245, 2325]
    )
    check_layer_gradients(col, x, backend, rng)
    check_layer_gradients(row, x, backend, rng)
    with pytest.raises(ValueError, match="flatten order 'K' is not known"):
        Flatten("K")


# -- Dense and activations ----------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_dense(bias, backend, rng):
    dense = built(Dense(3, bias=bias), (5,), backend)
    x = rng.standard_normal((4, 5))
    out = to_host(dense.forward(backend.asarray(x)))
    w = to_host(dense.params["weight"])
    np.testing.assert_allclose(out, x @ w + (to_host(dense.params["bias"]) if bias else 0))
    check_layer_gradients(dense, x, backend, rng)


def test_dense_needs_flat_input(backend):
    with pytest.raises(ValueError, match="needs flat input.*add a Flatten layer"):
        built(Dense(3), (1, 4, 4), backend)


@pytest.mark.parametrize("bad", [0, -3, (4, 4), 2.0, True])
def test_dense_out_features_is_one_count(bad):
    message = f"out_features must be an int >= 1, got {bad!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Dense(bad)


@pytest.mark.parametrize("layer_cls", [Logistic, Tanh, ReLU])
def test_activations(layer_cls, backend, rng):
    x = rng.standard_normal((2, 3, 4, 4))
    x[np.abs(x) < 1e-3] = 0.5  # keep ReLU away from its kink for the finite differences
    layer = built(layer_cls(), (3, 4, 4), backend)
    out = to_host(layer.forward(backend.asarray(x)))
    expected = {Logistic: 1 / (1 + np.exp(-x)), Tanh: np.tanh(x), ReLU: np.maximum(x, 0)}
    np.testing.assert_allclose(out, expected[layer_cls], rtol=1e-12)
    check_layer_gradients(layer, x, backend, rng)


def test_logistic_activation_is_finite_for_huge_inputs(backend):
    layer = built(Logistic(), (3,), backend)
    out = to_host(layer.forward(backend.asarray(np.array([[-1e5, 0.0, 18525.0]]))))
    np.testing.assert_array_equal(out, [[0.0, 0.5, 1.0]])


def test_layer_config_round_trip():
    layers = [
        Conv2D(4, (3, 2), stride=2, padding=(1, 0, 2, 1), mode="cross_correlation", bias=False),
        Pool2D("l2", 3, 2),
        Flatten("C"),
        Dense(7, bias=False, init="glorot"),
        ReLU(),
    ]
    for layer in layers:
        assert layer_from_config(layer.config()).config() == layer.config()
    with pytest.raises(ValueError, match="layer type 'lstm' is not known"):
        layer_from_config({"type": "lstm"})
