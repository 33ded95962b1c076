"""The array-layer primitives on their threaded NumPy path (forced on here, whatever the
machine's default) give exactly the single-threaded results."""

from __future__ import annotations

import numpy as np
import pytest

import gpucnn.array.pointwise as pointwise
import gpucnn.array.pooling as pooling
import gpucnn.array.threads as threads
import gpucnn.array.updates as updates
from gpucnn.array.im2col import col2im, im2col, matmul_nt
from tests.conftest import tie_free


@pytest.fixture
def threaded():
    with threads.configured(helper_threads=3, min_parallel_elements=0):
        yield


def single_threaded(fn, monkeypatch):
    with threads.configured(helper_threads=1):
        return fn()


@pytest.mark.parametrize("window, stride", [((2, 2), (2, 2)), ((3, 3), (2, 2)), ((2, 3), (1, 2))])
def test_pooling_threaded_equals_single(window, stride, threaded, monkeypatch, rng):
    x = tie_free((5, 9, 10, 4), rng).astype(np.float32)
    out_hw = ((9 - window[0]) // stride[0] + 1, (10 - window[1]) // stride[1] + 1)
    grad = rng.standard_normal((5, *out_hw, 4)).astype(np.float32)

    def run():
        best, saved = pooling.max_pool(x, window, stride, out_hw)
        back = pooling.max_pool_backward(saved, grad, window, stride)
        total = pooling.sum_pool(x, window, stride, out_hw, square=True)
        spread = pooling.spread_pool_grad(grad, x.shape, window, stride, x=x)
        return best, back, total, spread

    for threaded_result, single_result in zip(
        run(), single_threaded(run, monkeypatch), strict=True
    ):
        np.testing.assert_array_equal(threaded_result, single_result)


def test_im2col_col2im_relu_threaded_equal_single(threaded, monkeypatch, rng):
    x = rng.standard_normal((3, 8, 7, 5)).astype(np.float32)

    def run():
        col = im2col(x, 3, 2, 1, 2, flip=True)
        img = col2im(col, 8, 7, 1, 2, flip=True)
        y = pointwise.relu(x)
        return col, img, y, pointwise.relu_backward(x, y)

    for threaded_result, single_result in zip(
        run(), single_threaded(run, monkeypatch), strict=True
    ):
        np.testing.assert_array_equal(threaded_result, single_result)


def test_parallel_for_covers_every_index_once(threaded):
    seen = np.zeros(101, dtype=int)

    def body(start, stop):
        seen[start:stop] += 1

    threads.parallel_for(np, 101, 10**6, body)
    assert (seen == 1).all()


@pytest.mark.parametrize("length", [1, 4096, 3 * 4096 + 17])
def test_matmul_nt_equals_plain_product(rng, length):
    # Both the one-call path (L <= GEMM_CHUNK) and the chunked one, against an explicit sum.
    a = rng.standard_normal((6, length))
    b = rng.standard_normal((9, length))
    expected = (a[:, None, :] * b[None, :, :]).sum(axis=2)
    np.testing.assert_allclose(matmul_nt(a, b), expected, rtol=1e-10, atol=1e-10)


def test_optimizer_kernels_match_formulas(backend, rng):
    param = rng.standard_normal(7)
    grad = rng.standard_normal(7)
    p = backend.asarray(param.copy())
    updates.sgd_update(p, backend.asarray(grad), 0.1)
    np.testing.assert_allclose(p.get() if backend.is_gpu else p, param - 0.1 * grad)


def first_max_backward_reference(x, grad, window, stride):
    """Loop over every window: its gradient goes to its first maximum in row-major order."""
    c, h, w, n = x.shape
    _, oh, ow, _ = grad.shape
    out = np.zeros_like(x)
    for ch, a, b, k in np.ndindex(c, oh, ow, n):
        top, left = a * stride[0], b * stride[1]
        patch = x[ch, top : top + window[0], left : left + window[1], k]
        i, j = np.unravel_index(np.argmax(patch), patch.shape)  # argmax: first of equal maxima
        out[ch, top + i, left + j, k] += grad[ch, a, b, k]
    return out


def max_reference(x, window, stride, out_hw):
    """Loop over every window: its maximum (NaN if it holds one)."""
    c, _, _, n = x.shape
    out = np.empty((c, *out_hw, n), dtype=x.dtype)
    for ch, a, b, k in np.ndindex(c, *out_hw, n):
        top, left = a * stride[0], b * stride[1]
        patch = x[ch, top : top + window[0], left : left + window[1], k]
        out[ch, a, b, k] = np.nan if np.isnan(patch).any() else patch.max()
    return out


@pytest.mark.parametrize("shape", [(4, 8, 12, 3), (4, 9, 13, 3)])  # tiled whole, and cropped
@pytest.mark.parametrize("window", [(2, 2), (3, 3), (2, 3), (1, 2)])
@pytest.mark.parametrize("ties", ["none", "some channels", "everywhere"])
def test_max_pool_routes_to_first_maximum(shape, window, ties, rng):
    """For stride == window NumPy stacks the windows' pixels side by side, then keeps
    only each window's first hit where a window holds equal maxima."""
    x = tie_free(shape, rng).astype(np.float32)
    if ties == "some channels":
        x[1] = np.round(x[1])
        x[1, : window[0], : window[1]] = 7.0  # a whole window of equal maxima
    elif ties == "everywhere":
        x = rng.integers(0, 2, shape).astype(np.float32)
    out_hw = (shape[1] // window[0], shape[2] // window[1])
    grad = rng.standard_normal((shape[0], *out_hw, shape[3])).astype(np.float32)
    best, saved = pooling.max_pool(x, window, window, out_hw)
    np.testing.assert_array_equal(best, max_reference(x, window, window, out_hw))
    back = pooling.max_pool_backward(saved, grad, window, window)
    np.testing.assert_array_equal(back, first_max_backward_reference(x, grad, window, window))


@pytest.mark.parametrize("stride", [(2, 2), (1, 1)])
def test_max_pool_of_a_window_holding_nan_is_nan_and_routes_nothing(stride, rng):
    x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
    x[0, 0, 1, 2] = np.nan
    out_hw = ((6 - 2) // stride[0] + 1, (6 - 2) // stride[1] + 1)
    best, saved = pooling.max_pool(x, (2, 2), stride, out_hw)
    np.testing.assert_array_equal(best, max_reference(x, (2, 2), stride, out_hw))
    grad = np.ones(best.shape, dtype=np.float32)
    back = pooling.max_pool_backward(saved, grad, (2, 2), stride)
    assert np.isnan(best[0, 0, 0, 2])
    if stride == (2, 2):  # the NaN's window alone covers these pixels
        assert back[0, :2, :2, 2].sum() == 0
    assert back.sum() == np.count_nonzero(~np.isnan(best))  # every other window routed


def test_cpu_settings_come_from_the_environment():
    read = threads.CpuSettings.from_environment
    two_cores = read({}, cpus=2)
    assert (two_cores.helper_threads, two_cores.batch_slices) == (1, 2)  # measured defaults
    many = read({"GPUCNN_THREADS": "6", "GPUCNN_BATCH_THREADS": "3"}, cpus=16)
    assert (many.cpus, many.helper_threads, many.batch_slices) == (16, 6, 3)
    assert read({"GPUCNN_BATCH_THREADS": "0"}, cpus=4).batch_slices == 1  # 0 is off too
    assert read({"GPUCNN_BATCH_PROCESSES": "0"}, cpus=4).worker_processes is False
    with pytest.raises(ValueError, match=r"^GPUCNN_THREADS='two' is not an integer; allowed"):
        read({"GPUCNN_THREADS": "two"}, cpus=4)


def test_configured_changes_settings_for_a_block_only():
    before = threads.settings()
    with threads.configured(helper_threads=7) as inside:
        assert threads.settings() is inside and inside.helper_threads == 7
        assert inside.batch_slices == before.batch_slices
    assert threads.settings() is before
    with pytest.raises(TypeError):  # a misspelt setting is an error, not a new attribute
        with threads.configured(helper_thread=2):
            pass
