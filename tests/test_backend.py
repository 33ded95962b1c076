"""The array layer: backend choice, transfers, seeded generators, dtype policy, and the
rule that layers, losses and optimizers never import numpy or cupy."""

from __future__ import annotations

import numpy as np
import pytest

import gpucnn.array.backend as backend_module
from gpucnn.array.backend import (
    BackendUnavailableError,
    array_module,
    cupy_status,
    get_backend,
    resolve_dtype,
    to_host,
)


def test_numpy_backend_always_available():
    b = get_backend("numpy")
    assert b.name == "numpy" and b.xp is np and not b.is_gpu
    assert "CPU" in b.device_name()


def test_auto_announces_its_choice(capsys, monkeypatch):
    monkeypatch.setattr(backend_module, "_ANNOUNCED", set())
    chosen = get_backend("auto")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gpucnn: backend auto -> {chosen.name} (")
    expected = "numpy" if cupy_status()[0] is None else "cupy"
    assert chosen.name == expected


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend 'tpu' is not known; allowed: auto, numpy, cupy"):
        get_backend("tpu")


@pytest.mark.parametrize(
    "reason_fragment, fake_status",
    [
        ("CuPy is not installed", (None, "CuPy is not installed (No module named 'cupy')")),
        ("no CUDA device", (None, "no CUDA device was found (CUDA reports 0 devices)")),
        ("driver is older", (None, "the CUDA driver is older than this CuPy build needs")),
    ],
)
def test_cupy_unavailable_says_why(monkeypatch, reason_fragment, fake_status):
    monkeypatch.setattr(backend_module, "_CUPY_CACHE", {"result": fake_status})
    with pytest.raises(
        BackendUnavailableError, match=f"backend 'cupy' cannot run here: .*{reason_fragment}"
    ):
        get_backend("cupy")
    assert get_backend("auto", announce=False).name == "numpy"


def test_cupy_probe_classifies_driver_errors(monkeypatch):
    """The probe's messages, with a fake cupy whose runtime raises like a real one."""
    import sys
    import types

    class FakeRuntimeError(Exception):
        pass

    def fake_cupy(device_count=None, error=None):
        module = types.ModuleType("cupy")
        runtime = types.SimpleNamespace()

        def get_count():
            if error:
                raise FakeRuntimeError(error)
            return device_count

        runtime.getDeviceCount = get_count
        module.cuda = types.SimpleNamespace(runtime=runtime)
        return module

    for module, expected in [
        (
            fake_cupy(error="cudaErrorInsufficientDriver: CUDA driver version is insufficient"),
            "driver is older",
        ),
        (
            fake_cupy(error="cudaErrorNoDevice: no CUDA-capable device is detected"),
            "no CUDA device",
        ),
        (fake_cupy(device_count=0), "CUDA reports 0 devices"),
    ]:
        monkeypatch.setitem(sys.modules, "cupy", module)
        cupy, reason = backend_module._import_cupy()
        assert cupy is None and expected in reason


def test_array_module_and_host_transfer():
    x = np.ones(3)
    assert array_module(x, None, 2.0) is np
    assert to_host(x) is x or np.array_equal(to_host(x), x)


def test_mixing_host_and_device_arrays_names_arguments():
    cupy, reason = cupy_status()
    if cupy is None:
        pytest.skip(f"needs a GPU: {reason.split(' (')[0]}")
    with pytest.raises(TypeError, match=r"weight on the host \(NumPy\), x on the GPU \(CuPy\)"):
        array_module(x=cupy.ones(2), weight=np.ones(2))
    with pytest.raises(TypeError, match=r"argument 1 on the host"):
        array_module(cupy.ones(2), np.ones(2))


def test_seeded_generator_is_the_same_on_every_backend(backend):
    a = to_host(backend.random(42).normal((3, 4), 1.0, "float32"))
    b = get_backend("numpy").random(42).normal((3, 4), 1.0, "float32")
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32
    assert not np.array_equal(a, to_host(backend.random(43).normal((3, 4), 1.0, "float32")))


def test_dtype_policy():
    assert resolve_dtype("float32") == np.float32
    assert resolve_dtype(np.float64) == np.float64
    assert backend_module.TRAINING_DTYPE == "float32" and backend_module.CHECK_DTYPE == "float64"
    with pytest.raises(
        ValueError, match="dtype 'int8' is not supported; allowed: float32, float64"
    ):
        resolve_dtype("int8")


def test_asarray_moves_and_casts(backend):
    x = backend.asarray(np.arange(4.0), "float32")
    assert array_module(x) is backend.xp and x.dtype == np.float32
