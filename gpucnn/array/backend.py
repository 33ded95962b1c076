"""The array layer: the one place in gpucnn that knows whether NumPy or CuPy runs.

Layers, losses and optimizers never import numpy or cupy; they ask this module for
the array module of the arrays they hold (:func:`array_module`) or use the
:class:`Backend` their model was built on.

Backends
    ``numpy``  always available, runs on the CPU.
    ``cupy``   CuPy on a CUDA device; asking for it where it cannot run raises
               :class:`BackendUnavailableError` saying why.
    ``auto``   CuPy when it imports and a CUDA device answers, else NumPy.

Dtype policy
    float32 is the training dtype, float64 the dtype of gradient checks. Arrays are
    cast once, when they enter a model (:meth:`Backend.asarray`); code inside the
    engine keeps Python scalars as scalars so nothing is silently promoted to
    float64 (a large slowdown on GPUs, cupy #7630).
"""

from __future__ import annotations

import copy
import numbers
import sys
from dataclasses import dataclass
from typing import Any

import numpy

Array = Any  # a numpy.ndarray or a cupy.ndarray

BACKEND_NAMES = ("auto", "numpy", "cupy")
DTYPES = ("float32", "float64")
TRAINING_DTYPE = "float32"
CHECK_DTYPE = "float64"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine; the message says why."""


def _import_cupy() -> tuple[Any, str | None]:
    """Return (cupy module or None, reason it cannot be used or None)."""
    try:
        import cupy  # noqa: PLC0415 - optional dependency, imported lazily on purpose
    except ImportError as err:
        return None, (
            f"CuPy is not installed ({err}); install it with "
            "`pip install 'gpucnn[gpu]'` (CUDA 12) or `pip install 'gpucnn[gpu-cuda13]'` (CUDA 13)"
        )
    except Exception as err:  # a broken CUDA install can fail at import time
        return None, f"CuPy failed to import: {type(err).__name__}: {err}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:
        text = str(err)
        if "InsufficientDriver" in text or "driver version is insufficient" in text.lower():
            return None, (
                f"the CUDA driver is older than this CuPy build needs ({text}); "
                "install the cupy wheel that matches your CUDA major version"
            )
        if "NoDevice" in text or "no CUDA-capable device" in text:
            return None, f"no CUDA device was found ({text})"
        return None, f"the CUDA runtime did not answer: {type(err).__name__}: {text}"
    if count < 1:
        return None, "no CUDA device was found (CUDA reports 0 devices)"
    try:
        cupy.zeros(1).sum().item()  # a kernel launch proves the driver and CuPy agree
    except Exception as err:
        return None, (
            f"CuPy could not run a kernel ({type(err).__name__}: {err}); "
            "this is usually a CUDA/driver mismatch with the installed cupy wheel"
        )
    return cupy, None


_CUPY_CACHE: dict[str, Any] = {}


def cupy_status() -> tuple[Any, str | None]:
    """(cupy module, None) when CuPy can run here, else (None, reason). Probed once."""
    if "result" not in _CUPY_CACHE:
        _CUPY_CACHE["result"] = _import_cupy()
    return _CUPY_CACHE["result"]


def resolve_dtype(dtype: Any) -> numpy.dtype:
    """The numpy dtype for 'float32' or 'float64'; anything else is a ValueError."""
    name = numpy.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return numpy.dtype(name)


@dataclass(frozen=True)
class Backend:
    """A resolved backend: its name ('numpy' or 'cupy') and array module."""

    name: str
    xp: Any

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """Move ``x`` onto this backend (host->device copy for CuPy), cast to ``dtype``."""
        if self.is_gpu:
            if isinstance(x, numpy.ndarray) or numpy.isscalar(x) or isinstance(x, (list, tuple)):
                x = self.xp.asarray(numpy.asarray(x))
            elif not isinstance(x, self.xp.ndarray):
                x = self.xp.asarray(x)
        else:
            if not isinstance(x, numpy.ndarray):
                x = to_host(x)
        if dtype is not None:
            x = x.astype(resolve_dtype(dtype) if _is_float_name(dtype) else dtype, copy=False)
        return x

    def zeros(self, shape: Any, dtype: Any) -> Array:
        return self.xp.zeros(shape, dtype=dtype)

    def device_name(self) -> str:
        """Human-readable name of the device arrays live on."""
        if self.is_gpu:
            props = self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)
            name = props["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        import platform  # noqa: PLC0415

        return f"CPU ({platform.processor() or platform.machine()})"

    def random(self, seed: int) -> Random:
        return Random(seed, self)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on NumPy); used by timers only."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def __deepcopy__(self, memo: dict) -> Backend:
        return self  # immutable, and its array module cannot be copied: a model copy shares it

    def __reduce__(self) -> tuple:
        return get_backend, (self.name, False)


def _is_float_name(dtype: Any) -> bool:
    try:
        return numpy.dtype(dtype).kind == "f"
    except TypeError:
        return False


class Random:
    """A seeded generator whose draws land on a backend.

    Draws are made on the host with NumPy's PCG64 and then moved, so the same seed
    gives the same numbers on NumPy and CuPy (a model initialised on the GPU equals
    the one initialised on the CPU). Only initialisation and shuffling use it, so the
    transfer is off the hot path.
    """

    def __init__(self, seed: int, backend: Backend) -> None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = int(seed)
        self.backend = backend
        self.generator = numpy.random.default_rng(seed)

    def normal(self, shape: tuple[int, ...], std: float, dtype: Any) -> Array:
        return self.backend.asarray(self.generator.normal(0.0, std, size=shape), dtype)

    def uniform(self, shape: tuple[int, ...], limit: float, dtype: Any) -> Array:
        return self.backend.asarray(self.generator.uniform(-limit, limit, size=shape), dtype)

    def permutation(self, n: int) -> numpy.ndarray:
        """A host index permutation (used to shuffle host-side datasets)."""
        return self.generator.permutation(n)

    def state(self) -> dict[str, Any]:
        """The generator's state (plain JSON-able values): a checkpoint keeps it."""
        return copy.deepcopy(self.generator.bit_generator.state)

    def set_state(self, state: dict[str, Any]) -> None:
        """Go back to a state from :meth:`state`: the same draws follow."""
        if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
            raise ValueError(f"not a PCG64 generator state: {state!r}"[:200])
        self.generator.bit_generator.state = state


_ANNOUNCED: set[str] = set()


def get_backend(name: str = "auto", announce: bool = True) -> Backend:
    """Resolve ``'auto' | 'numpy' | 'cupy'`` to a :class:`Backend`.

    ``auto`` writes one line to stderr saying which backend it chose and why.
    """
    if isinstance(name, Backend):
        return name
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend {name!r} is not known; allowed: {', '.join(BACKEND_NAMES)}")
    if name == "numpy":
        return Backend("numpy", numpy)
    cupy, reason = cupy_status()
    if name == "cupy":
        if cupy is None:
            raise BackendUnavailableError(f"backend 'cupy' cannot run here: {reason}")
        return Backend("cupy", cupy)
    chosen = Backend("cupy", cupy) if cupy is not None else Backend("numpy", numpy)
    if announce and chosen.name not in _ANNOUNCED:
        _ANNOUNCED.add(chosen.name)
        why = "a CUDA device answered" if cupy is not None else reason
        print(f"gpucnn: backend auto -> {chosen.name} ({why})", file=sys.stderr)
    return chosen


def _is_device_array(x: Any) -> bool:
    cupy = _CUPY_CACHE.get("result", (None, None))[0]
    if cupy is None:
        # Avoid importing cupy just to classify; a cupy array's type lives in module 'cupy'.
        return type(x).__module__.startswith("cupy")
    return isinstance(x, cupy.ndarray)


def array_module(*arrays: Any, **named: Any) -> Any:
    """The array module (numpy or cupy) of the given arrays.

    Non-array arguments (None, Python scalars) are ignored. Mixing host and device
    arrays raises a TypeError naming which argument is where: an implicit transfer
    would hide a bug and cost a synchronisation.
    """
    if not named and all(type(a) is numpy.ndarray for a in arrays):
        return numpy  # the common CPU case, kept cheap: it runs many times per step
    items = [(f"argument {i}", a) for i, a in enumerate(arrays)] + list(named.items())
    on_device = [label for label, a in items if _is_device_array(a)]
    on_host = [label for label, a in items if isinstance(a, numpy.ndarray)]
    if on_device and on_host:
        raise TypeError(
            f"arrays are on different devices: {', '.join(on_host)} on the host (NumPy), "
            f"{', '.join(on_device)} on the GPU (CuPy); move them with Backend.asarray or to_host"
        )
    if on_device:
        return cupy_status()[0] or __import__("cupy")
    return numpy


def is_gpu(xp: Any) -> bool:
    """Whether an array module (from :func:`array_module`) is CuPy."""
    return xp is not numpy and xp.__name__ == "cupy"


def to_host(x: Any) -> Any:
    """A NumPy copy/view of ``x`` (device->host transfer for CuPy arrays)."""
    if _is_device_array(x):
        return x.get()
    if isinstance(x, dict):
        return {k: to_host(v) for k, v in x.items()}
    return numpy.asarray(x)


def to_scalar(x: Array) -> float:
    """A Python float from a 0-d or size-1 array (synchronises on the GPU)."""
    return float(to_host(x).reshape(-1)[0])
