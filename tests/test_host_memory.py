"""glibc's heap kept for reuse in training: a real training loop's page faults, in a
fresh process and in a worker process, and the settings that leave malloc alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpucnn import (
    Conv2D,
    Dense,
    Flatten,
    GradientAscent,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
)
from gpucnn.array import host_memory
from gpucnn.data import load_dataset
from gpucnn.fit import fit
from gpucnn.parallel import workers
from gpucnn.parallel.split import BatchSplit
from tests.conftest import lenet_layers

ROOT = Path(__file__).resolve().parents[1]
GLIBC = host_memory.libc_is_glibc()
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the heap tuning is for glibc's malloc")

# LeNet at batch 132 (a 264 batch's slice): without the tuning glibc hands 1.4-4 MB of its
# heap back to the kernel and faults it in again every step (350-1030 faults).
LOOP = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from gpucnn import Conv2D, Dense, Flatten, GradientAscent, MaxPool2D, ReLU, Sequential
    from gpucnn import SoftmaxCrossEntropy
    from gpucnn.array import host_memory
    print(host_memory.keep_heap_for_reuse())
    layers = [Conv2D(8, 5), ReLU(), MaxPool2D(2), Conv2D(16, 5), ReLU(), MaxPool2D(2),
              Flatten("C"), Dense(10)]
    model = Sequential(layers, SoftmaxCrossEntropy(), (1, 28, 28), dtype="float32")
    x = np.random.default_rng(0).standard_normal((132, 1, 28, 28)).astype(np.float32)
    y = np.arange(132) % 10
    optimizer = GradientAscent(0.01)
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        model.loss(x, y); optimizer.step(model.params, model.backward())
    before = faults()
    for _ in range(40):
        model.loss(x, y); optimizer.step(model.params, model.backward())
    print((faults() - before) / 40)
    """
)


@needs_glibc
def test_a_training_loop_stops_faulting_its_heap_in_again():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "GPUCNN_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", LOOP], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    tuned, faults_per_step = run.stdout.split()
    assert tuned == "True"
    assert float(faults_per_step) < 50  # about 8 here; 950-1030 with GPUCNN_HEAP_TUNING=0


@needs_glibc
def test_worker_processes_keep_their_heap_too():
    if not workers.usable():
        pytest.skip("worker processes are off here")
    model = Sequential(lenet_layers(), SoftmaxCrossEntropy(), (1, 28, 28), dtype="float32")
    step = BatchSplit(model)
    x = np.random.default_rng(0).standard_normal((264, 1, 28, 28)).astype(np.float32)
    y = np.arange(264) % 10
    optimizer = GradientAscent(0.01)
    for _ in range(10):
        step.loss(x, y)
        optimizer.step(step.params, step.backward())
    if step.remote_slices != 1:
        pytest.skip(f"the batch went to {step.remote_slices} worker processes, not one")
    pid = workers.running(1)[0].process.pid

    def worker_faults() -> int:  # minflt, field 10 of /proc/PID/stat
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[7])

    before = worker_faults()
    for _ in range(20):
        step.loss(x, y)
        optimizer.step(step.params, step.backward())
    assert (worker_faults() - before) / 20 < 50


def test_fit_on_numpy_sets_the_heap_up():
    """fit asks for the tuning (this tunes the test process too, as it would any app);
    it is set wherever nothing says otherwise."""
    host_memory.keep_heap_for_reuse.cache_clear()
    data = load_dataset("digits", seed=0)
    model = Sequential(
        [Conv2D(2, 3), ReLU(), Flatten(), Dense(10)], SoftmaxCrossEntropy(), data.input_shape
    )
    fit(model, GradientAscent(0.01), data, epochs=1, batch_size=64, progress=False)
    assert host_memory.keep_heap_for_reuse.cache_info().currsize == 1
    assert host_memory.keep_heap_for_reuse() is (host_memory.why_not_tuned() is None)


@pytest.mark.parametrize(
    ("environ", "reason"),
    [
        ({"GPUCNN_HEAP_TUNING": "0"}, "GPUCNN_HEAP_TUNING=0"),
        ({"MALLOC_TRIM_THRESHOLD_": "1000"}, "set by the user (MALLOC_TRIM_THRESHOLD_)"),
        ({"MALLOC_TOP_PAD_": "1", "MALLOC_MMAP_MAX_": "0"}, "MALLOC_MMAP_MAX_, MALLOC_TOP_PAD_"),
        ({"MALLOC_ARENA_MAX": "2"}, "set by the user (MALLOC_ARENA_MAX)"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=9"}, "(GLIBC_TUNABLES)"),
    ],
)
def test_malloc_set_by_the_user_is_left_alone(environ, reason):
    assert reason in host_memory.why_not_tuned(environ)


@needs_glibc
def test_glibc_with_nothing_set_gets_the_tuning():
    assert host_memory.why_not_tuned({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"}) is None
    assert host_memory.why_not_tuned({"GPUCNN_HEAP_TUNING": "1"}) is None


def test_a_c_library_other_than_glibc_is_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "libc_is_glibc", lambda: False)
    assert host_memory.why_not_tuned({}) == "the C library is not glibc"
