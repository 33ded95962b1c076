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


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_both_formulations_give_the_same_products(case, flip, monkeypatch, rng):
    """The row unfold (NumPy) and im2col (CuPy's formulation, run on NumPy here) give
    the same output and gradients, and the row fold the same input gradient as col2im."""
    shape, kh, kw, sh, sw = case
    x = rng.standard_normal(shape)
    kernels = rng.standard_normal((3, shape[0] * kh * kw))
    bias = rng.standard_normal(3)
    shapes = conv.conv_geometry(x, kernels, (kh, kw), (sh, sw), flip)
    grad = rng.standard_normal((3, *shapes.out_hw, shape[3]))
    monkeypatch.setattr(conv, "ROW_FOLD_MIN_KERNEL_HEIGHT", 1)
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
        (1, (1, 8, 8, 1), False),  # the lecture's net: 144 bytes of im2col
    ],
)
def test_where_the_row_unfold_is_used(blas, shape, expected, monkeypatch):
    monkeypatch.setattr(conv, "blas_threads", lambda: blas)
    x = np.zeros(shape, np.float32)
    kernels = np.zeros((16, shape[0] * 25), np.float32)
    assert conv.conv_geometry(x, kernels, (5, 5), (1, 1), True).row_unfold is expected
