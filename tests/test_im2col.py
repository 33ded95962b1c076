"""im2col / col2im against explicit loops, and col2im as the exact adjoint of im2col."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gpucnn.array import conv
from gpucnn.array.backend import to_host
from gpucnn.array.conv import rows_per_block
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


@pytest.mark.parametrize(
    ("rows", "bytes_per_row", "budget", "expected"),
    [
        (24, 79_200, 256 << 10, 3),  # LeNet's first map at batch 33: 8 blocks of 3 rows
        (8, 211_200, 256 << 10, 1),  # its second: a row is most of the budget
        (7, 10, 1000, 7),  # all rows fit: one block
        (7, 10, 60, 1),  # 7 is prime: equal blocks are single rows
        (12, 10, 95, 6),  # the largest divisor of 12 within 9 rows
        (5, 10**9, 256, 1),  # a row over budget still makes a block
    ],
)
def test_rows_per_block_divides_the_rows_within_the_budget(rows, bytes_per_row, budget, expected):
    assert rows_per_block(rows, bytes_per_row, budget) == expected


def test_col2im_leaves_numpys_buffer_size_as_it_found_it(rng):
    before = np.getbufsize()
    col = rng.standard_normal((2, 3, 3, 4, 4, 5))
    col2im(col, 6, 6, 1, 1)
    assert np.getbufsize() == before
    with pytest.raises(RuntimeError), unbuffered_ufuncs(np):
        assert np.getbufsize() == SLAB_BUFFER_SIZE
        raise RuntimeError("inside")
    assert np.getbufsize() == before


def test_convolution_runs_in_blocks_only_with_one_blas_thread(monkeypatch, rng):
    """LeNet's second map at batch 33 unfolds to 1.7 MB: in blocks, nothing kept, where
    BLAS runs one thread (a batch slice); whole and kept where it runs several."""
    x = rng.standard_normal((8, 12, 12, 33)).astype(np.float32)
    kernels = rng.standard_normal((16, 200)).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    monkeypatch.setattr(conv, "blas_threads", lambda: 2)
    whole, kept = conv.conv_forward(x, kernels, bias, (5, 5), (1, 1), True)
    assert kept is not None and kept.shape == (200, 8 * 8 * 33)
    monkeypatch.setattr(conv, "blas_threads", lambda: 1)
    blocked, none_kept = conv.conv_forward(x, kernels, bias, (5, 5), (1, 1), True)
    assert none_kept is None
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-4)
    grad = rng.standard_normal(whole.shape).astype(np.float32)
    expected = conv.conv_weight_grad(x, kept, grad, (5, 5), (1, 1), True, True)
    got = conv.conv_weight_grad(x, None, grad, (5, 5), (1, 1), True, True)
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-3)
