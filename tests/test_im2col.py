"""im2col / col2im against explicit loops, and col2im as the exact adjoint of im2col."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from gpucnn.array import conv
from gpucnn.array.backend import to_host
from gpucnn.array.im2col import (
    SLAB_BUFFER_SIZE,
    col2im,
    im2col,
    internal_to_nchw,
    nchw_to_internal,
    unbuffered_ufuncs,
)

CASES = [
    ((2, 5, 6, 3), 3, 2, 1, 1),
    ((1, 7, 7, 2), 3, 3, 2, 2),
    ((3, 6, 5, 4), 2, 3, 1, 2),
    ((2, 8, 8, 1), 4, 4, 4, 4),
    ((1, 5, 5, 2), 5, 5, 1, 1),
    ((2, 8, 7, 2), 3, 2, 2, 3),  # strides that leave rows and columns unread
]


def loop_im2col(x, kh, kw, sh, sw, flip):
    c, h, w, n = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    col = np.zeros((c, kh, kw, oh, ow, n))
    for ci, i, j, a, b, ni in itertools.product(*map(range, (c, kh, kw, oh, ow, n))):
        di, dj = (kh - 1 - i, kw - 1 - j) if flip else (i, j)
        col[ci, i, j, a, b, ni] = x[ci, a * sh + di, b * sw + dj, ni]
    return col


def loop_col2im(col, h, w, sh, sw, flip):
    c, kh, kw, oh, ow, n = col.shape
    img = np.zeros((c, h, w, n))
    for ci, i, j, a, b, ni in itertools.product(*map(range, (c, kh, kw, oh, ow, n))):
        di, dj = (kh - 1 - i, kw - 1 - j) if flip else (i, j)
        img[ci, a * sh + di, b * sw + dj, ni] += col[ci, i, j, a, b, ni]
    return img


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_im2col_col2im_match_loops(case, flip, backend, rng):
    shape, kh, kw, sh, sw = case
    x = rng.standard_normal(shape)
    col = im2col(backend.asarray(x), kh, kw, sh, sw, flip=flip)
    np.testing.assert_array_equal(to_host(col), loop_im2col(x, kh, kw, sh, sw, flip))
    g = rng.standard_normal(col.shape)
    img = col2im(backend.asarray(g), shape[1], shape[2], sh, sw, flip=flip)
    expected = loop_col2im(g, shape[1], shape[2], sh, sw, flip)
    np.testing.assert_allclose(to_host(img), expected, rtol=1e-12)
    # Adjoint: <im2col(x), g> == <x, col2im(g)>
    assert np.vdot(to_host(col), g) == pytest.approx(np.vdot(x, to_host(img)), rel=1e-12)


def test_layout_round_trip(backend, rng):
    x = rng.standard_normal((4, 3, 5, 6))
    internal = nchw_to_internal(backend.asarray(x))
    assert internal.shape == (3, 5, 6, 4) and internal.flags.c_contiguous
    np.testing.assert_array_equal(to_host(internal_to_nchw(internal)), x)


@pytest.mark.parametrize("flip", [False, True])
def test_im2col_of_a_strided_view(flip, rng):
    """NumPy's im2col reads through the input's own strides: a sliced view works too."""
    base = rng.standard_normal((3, 9, 12, 4))
    x = base[1:, ::-1, ::2, :]  # not contiguous, one axis reversed
    assert not x.flags.c_contiguous
    expected = loop_im2col(x, 3, 2, 2, 1, flip)
    np.testing.assert_array_equal(im2col(x, 3, 2, 2, 1, flip=flip), expected)


def test_col2im_leaves_numpys_buffer_size_as_it_found_it(rng):
    before = np.getbufsize()
    col = rng.standard_normal((2, 3, 3, 4, 4, 5))
    col2im(col, 6, 6, 1, 1)
    assert np.getbufsize() == before
    with pytest.raises(RuntimeError), unbuffered_ufuncs(np):
        assert np.getbufsize() == SLAB_BUFFER_SIZE
        raise RuntimeError("inside")
    assert np.getbufsize() == before


def loop_row_unfold(x, kw, sw):
    c, h, w, n = x.shape
    ow = (w - kw) // sw + 1
    unfold = np.zeros((h, c, kw, ow, n))
    for hi, ci, j, b, ni in itertools.product(*map(range, (h, c, kw, ow, n))):
        unfold[hi, ci, j, b, ni] = x[ci, hi, b * sw + j, ni]
    return unfold


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_row_unfold_and_its_fold_match_loops(case, flip, rng):
    """NumPy's row unfold, U[h, c, j, b, n] = x[c, h, b*SW + j, n], and the fold that
    gives the input gradient from dL/dU: its exact adjoint."""
    shape, kh, kw, sh, sw = case
    x = rng.standard_normal(shape)
    shapes = conv.conv_geometry(x, np.zeros((2, shape[0] * kh * kw)), (kh, kw), (sh, sw), flip)
    unfold = conv.row_unfold(x, shapes)
    np.testing.assert_array_equal(unfold, loop_row_unfold(x, kw, sw))
    grad = rng.standard_normal(unfold.shape)
    image = conv._row_fold(grad, shapes)
    # <U(x), g> == <x, fold(g)>, and fold(g) is zero where no window reads x
    assert np.vdot(unfold, grad) == pytest.approx(np.vdot(x, image), rel=1e-12)
    unread_columns = np.ones(shape[2], bool)
    unread_columns[: (shapes.out_hw[1] - 1) * sw + kw] = False
    assert not image[:, :, unread_columns].any()


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_both_formulations_give_the_same_products(case, flip, strided, monkeypatch, rng):
    """The row unfold (NumPy) and im2col (CuPy's formulation, run on NumPy here) give
    the same output and gradients, and the row fold the same input gradient as col2im;
    also for an input and a gradient that are strided views (not contiguous)."""
    shape, kh, kw, sh, sw = case
    x = rng.standard_normal(shape)
    kernels = rng.standard_normal((3, shape[0] * kh * kw))
    bias = rng.standard_normal(3)
    shapes = conv.conv_geometry(x, kernels, (kh, kw), (sh, sw), flip)
    grad = rng.standard_normal((3, *shapes.out_hw, shape[3]))
    if strided:  # the same numbers, read through reversed and transposed strides
        x = np.ascontiguousarray(x[:, ::-1])[:, ::-1]
        grad = np.asfortranarray(grad)
        assert not x.flags.c_contiguous and not grad.flags.c_contiguous
    monkeypatch.setattr(conv, "row_fold_pays", lambda g: g.stride[0] == 1)
    shapes = dataclasses.replace(shapes, row_unfold=True)
    out, unfold = conv.conv_forward(x, kernels, bias, shapes)
    assert unfold.shape == (shape[1], shape[0], kw, shapes.out_hw[1], shape[3])
    rows = (out, *conv.conv_weight_grad(unfold, grad, shapes, True))
    rows += (conv.conv_input_grad(kernels, grad, shapes),)
    shapes = dataclasses.replace(shapes, row_unfold=False)
    out, cols = conv.conv_forward(x, kernels, bias, shapes)
    assert cols.shape == (shapes.depth, np.prod(shapes.out_hw) * shape[3])
    columns = (out, *conv.conv_weight_grad(cols, grad, shapes, True))
    columns += (conv.conv_input_grad(kernels, grad, shapes),)
    for mine, theirs in zip(rows, columns, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12)


def test_kernel_rows_round_trip(rng):
    kernels = rng.standard_normal((4, 3 * 2 * 5))
    for flip in (False, True):
        shapes = conv.ConvGeometry(3, 6, 7, 2, 4, (2, 5), (1, 1), flip)
        rows = conv.row_kernels(kernels, shapes)
        k = kernels.reshape(4, 3, 2, 5)
        expected = k[:, :, ::-1, ::-1] if flip else k
        np.testing.assert_array_equal(rows.reshape(4, 2, 3, 5), expected.transpose(0, 2, 1, 3))
        np.testing.assert_array_equal(conv._stored_kernels(rows, shapes), kernels)


@pytest.mark.parametrize(
    ("blas", "shape", "expected"),
    [
        (1, (8, 12, 12, 33), True),  # LeNet's second map in a batch slice: 1.7 MB
        (2, (8, 12, 12, 33), False),  # the same with two BLAS threads
        (1, (1, 8, 8, 1), False),  # a lecture-sized map: 1600 bytes of im2col
    ],
)
def test_where_the_row_unfold_is_used(blas, shape, expected, monkeypatch):
    monkeypatch.setattr(conv, "blas_threads", lambda: blas)
    x = np.zeros(shape, np.float32)
    kernels = np.zeros((16, shape[0] * 25), np.float32)
    assert conv.conv_geometry(x, kernels, (5, 5), (1, 1), True).row_unfold is expected


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        # (C, H (padded), P, kernel, stride): the measured layers of docs/performance.md
        ((8, 12, 16, 5, 1), True),  # LeNet's conv2: 10 extra multiply-adds per addition
        ((32, 34, 32, 3, 1), True),  # the CIFAR net's 32x32 maps: 3
        ((64, 18, 64, 3, 1), True),  # its 16x16 maps: 12, a tie
        ((64, 10, 128, 3, 1), False),  # its 8x8 maps: 48
        ((32, 10, 64, 3, 1), False),  # the digits net: 24
        ((3, 34, 32, 3, 1), False),  # 3 channels: 9 rows for the GEMM
        ((8, 12, 16, 5, 2), False),  # stride 2 down the map
        ((8, 12, 16, 1, 1), False),  # 1x1 kernels: nothing to fold
    ],
)
def test_where_the_row_fold_is_used(layer, expected):
    c, h, p, k, s = layer
    shapes = conv.ConvGeometry(c, h, h, 32, p, (k, k), (s, 1), True, row_unfold=True)
    assert conv.row_fold_pays(shapes) is expected
    assert not conv.row_fold_pays(dataclasses.replace(shapes, row_unfold=False))
