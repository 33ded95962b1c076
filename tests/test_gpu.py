"""GPU-only checks (skipped without CuPy and a CUDA device): a training step never
synchronises or copies to the host, and NumPy and CuPy agree on whole training steps."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gpucnn import Adam, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, SoftmaxCrossEntropy
from gpucnn.array.backend import cupy_status, get_backend, to_host
from gpucnn.nn.layers import L2Pool2D, Tanh
from gpucnn.nn.losses import LogisticLogLikelihood
from gpucnn.nn.optim import GradientAscent, Momentum
from tests.conftest import lenet_layers

cupy, reason = cupy_status()
pytestmark = pytest.mark.skipif(cupy is None, reason=f"needs a CUDA device: {reason}")


def lenet(backend, seed=0):
    return Sequential(
        lenet_layers(),
        SoftmaxCrossEntropy(),
        (1, 28, 28),
        backend=backend,
        seed=seed,
        l2=1e-4,
    )


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def assert_never_waits_for_device(step):
    """Queue a kernel that keeps the GPU busy for about 2 s, then run ``step`` on the host.

    Any synchronisation or device-to-host copy inside the step would make the host wait
    for that kernel, so if the step returns while the kernel still runs, it never did.
    (CUDA stream capture would be the usual proof, but CuPy refuses cuBLAS calls while
    a stream is capturing.)
    """
    spin = cupy.RawKernel(_SPIN, "spin")
    calibration = 10**8
    start = cupy.cuda.Event()
    stop = cupy.cuda.Event()
    start.record()
    spin((1,), (1,), (np.int64(calibration),))
    stop.record()
    stop.synchronize()
    seconds_per_cycle = cupy.cuda.get_elapsed_time(start, stop) / 1e3 / calibration
    busy_seconds = 2.0
    spin((1,), (1,), (np.int64(busy_seconds / seconds_per_cycle),))
    spinner_done = cupy.cuda.Event()
    spinner_done.record()
    began = time.perf_counter()
    result = step()
    host_seconds = time.perf_counter() - began
    assert not spinner_done.done, "the step waited for the GPU (a sync or device-to-host copy)"
    assert host_seconds < busy_seconds / 2
    cupy.cuda.get_current_stream().synchronize()
    return result


@pytest.mark.parametrize("optimizer_cls", [GradientAscent, Momentum, Adam])
def test_training_step_never_touches_the_host(optimizer_cls):
    backend = get_backend("cupy")
    model = lenet(backend)
    optimizer = optimizer_cls(0.01)
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((64, 1, 28, 28)), "float32")
    y = backend.asarray(rng.integers(0, 10, 64)).astype("int64")

    def step():
        loss = model.loss(x, y)
        optimizer.step(model.params, model.backward())
        return loss

    for _ in range(2):  # warm the memory pool and compile the kernels
        step()
    loss = assert_never_waits_for_device(step)
    assert np.isfinite(float(to_host(loss)))  # the value is read afterwards, once


def test_logistic_step_never_touches_the_host():
    backend = get_backend("cupy")
    model = Sequential(
        [Conv2D(1, 3, bias=False), MaxPool2D(3, 3), Flatten(), Dense(1, bias=False)],
        LogisticLogLikelihood(),
        (1, 8, 8),
        backend=backend,
        l2=0.1,
    )
    x = backend.asarray(np.arange(64.0).reshape(1, 1, 8, 8), "float32")
    y = backend.asarray(np.zeros(1), "float32")
    optimizer = GradientAscent(0.1)

    def step():
        model.loss(x, y)
        optimizer.step(model.params, model.backward())

    for _ in range(2):
        step()
    assert_never_waits_for_device(step)


def test_a_synchronising_step_is_caught():
    """The check itself: a step that reads a value on the host must fail it."""
    backend = get_backend("cupy")
    x = backend.asarray(np.ones(4), "float32")
    with pytest.raises(AssertionError, match="waited for the GPU"):
        assert_never_waits_for_device(lambda: float(x.sum()))


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-10), ("float32", 2e-4)])
def test_numpy_and_cupy_agree_over_training_steps(dtype, rtol):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 3, 12, 12))
    y = rng.integers(0, 4, 16)

    def run(backend):
        model = Sequential(
            [
                Conv2D(4, 3, padding="same"),
                Tanh(),
                L2Pool2D(2),
                Conv2D(6, 3, stride=2, mode="cross_correlation"),
                ReLU(),
                Flatten(),
                Dense(4),
            ],
            SoftmaxCrossEntropy(),
            (3, 12, 12),
            backend=backend,
            dtype=dtype,
            seed=7,
            l2=0.01,
        )
        optimizer = Adam(0.01)
        losses = []
        for _ in range(5):
            losses.append(float(to_host(model.loss(x, y))))
            optimizer.step(model.params, model.backward())
        return losses, {k: to_host(v) for k, v in model.params.items()}

    cpu_losses, cpu_params = run(get_backend("numpy"))
    gpu_losses, gpu_params = run(get_backend("cupy"))
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=rtol)
    for key in cpu_params:
        np.testing.assert_allclose(
            gpu_params[key], cpu_params[key], rtol=rtol * 10, atol=rtol, err_msg=key
        )
