"""Float64 central-difference gradient checks, written independently of the code under test."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gpucnn.array.backend import to_host


def numerical_gradient(f: Callable[[], float], array, eps: float = 1e-6) -> np.ndarray:
    """d f / d array by central differences, perturbing ``array`` (host or device) in place."""
    grad = np.zeros(array.shape)
    assert array.flags.c_contiguous, "perturbation needs a contiguous array (a reshape view)"
    flat_view = array.reshape(-1)
    for i in range(array.size):
        original = float(flat_view[i])
        flat_view[i] = original + eps
        plus = f()
        flat_view[i] = original - eps
        minus = f()
        flat_view[i] = original
        grad.reshape(-1)[i] = (plus - minus) / (2 * eps)
    return grad


def assert_close(analytic, numeric, rtol: float = 1e-6, atol: float = 1e-7, what: str = "") -> None:
    np.testing.assert_allclose(to_host(analytic), numeric, rtol=rtol, atol=atol, err_msg=what)
