"""Shared fixtures: every backend-parametrised test runs on NumPy, and on CuPy when a
CUDA device answers (otherwise it is skipped with the reason)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from gpucnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from gpucnn.array.backend import cupy_status, get_backend


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    if request.param == "cupy":
        cupy, reason = cupy_status()
        if cupy is None:
            pytest.skip(f"CuPy backend not available: {reason.split(' (')[0]}")
    return get_backend(request.param)


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench.py, imported as a module (it is a script, not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench", module)  # its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def tie_free(shape, rng, low=-1.0, high=1.0):
    """Distinct values (a shuffled linspace plus small jitter): max-pool has no ties."""
    size = int(np.prod(shape))
    values = np.linspace(low, high, size)
    values += rng.uniform(-0.1, 0.1, size) * (high - low) / size
    return rng.permutation(values).reshape(shape)


def lenet_layers() -> list:
    """LeNet as conf/model/lenet.yaml builds it, for 28x28 inputs: two 5x5 convolutions
    (8 and 16 kernels), each with a ReLU and a 2x2 max pool, and a dense layer of 10."""
    return [
        Conv2D(8, 5),
        ReLU(),
        MaxPool2D(2),
        Conv2D(16, 5),
        ReLU(),
        MaxPool2D(2),
        Flatten("C"),
        Dense(10),
    ]
