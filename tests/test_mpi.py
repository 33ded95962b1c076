"""Data parallel over MPI, with real `mpiexec` (MPICH from the `distributed` extra): K
ranks give the parameters of one process on the whole batch; the training app logs one
run; a rank that raises stops every rank with one line and a FAILED run; a rank killed
outright leaves nothing hanging; a stopped run goes on with `resume=` under mpiexec."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="the distributed extra (mpi4py, mpich) is not installed")
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
if MPIEXEC is None:
    pytest.skip("no mpiexec (pip install 'gpucnn[distributed]')", allow_module_level=True)

from gpucnn import Adam  # noqa: E402
from gpucnn.data import load_dataset  # noqa: E402
from gpucnn.fit import fit  # noqa: E402
from tests.mpi_job import build  # noqa: E402
from tests.test_train_app import all_runs, client_for  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def mpiexec(n, args, cwd, env=None, timeout=240, **kwargs):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [MPIEXEC, "-n", str(n), sys.executable, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


@pytest.fixture(scope="module")
def one_process():
    """The reference: one process, the whole batch, no split."""
    data = load_dataset("digits", seed=0)
    model = build(data)
    result = fit(
        model,
        Adam(3e-3),
        data,
        epochs=2,
        batch_size=64,
        seed=5,
        kernels_every=0,
        progress=False,
        split_batches=False,
    )
    return {k: np.asarray(v) for k, v in model.params.items()}, result


@pytest.mark.parametrize("ranks", [2, 3])  # 3: 64 samples split 21/21/22
def test_ranks_give_the_parameters_of_one_process_on_the_whole_batch(ranks, one_process, tmp_path):
    out = tmp_path / "params.npz"
    job = mpiexec(ranks, [str(ROOT / "tests" / "mpi_job.py"), str(out), "64"], tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    expected, result = one_process
    with np.load(out) as got:
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-12, atol=1e-14, err_msg=key)
    logged = json.loads(Path(f"{out}.json").read_text())
    assert logged["size"] == ranks
    for key, values in result.history.items():  # evaluation reduced over the ranks too
        np.testing.assert_allclose(logged["history"][key], values, rtol=1e-12)
    assert logged["test"]["test_accuracy"] == pytest.approx(result.test["test_accuracy"])


def train_args(*overrides):
    return ["-m", "gpucnn.train", "experiment=digits", "distributed=mpi", "backend=numpy"] + [
        "trainer.epochs=2",
        *overrides,
    ]


def test_the_app_logs_one_run_with_the_world_size(tmp_path):
    job = mpiexec(2, train_args(), tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("FINISHED") == 1  # one summary: rank 0's
    (run,) = all_runs(client_for(tmp_path))
    assert run.info.status == "FINISHED"
    assert run.data.params["distributed.world_size"] == "2"
    assert run.data.params["distributed"] == "mpi"


FAULT = """
import os, signal
from gpucnn.nn import layers

if int(os.environ.get("PMI_RANK", "0")) == {rank}:
    original, calls = layers.Dense._forward, [0]

    def failing(self, x):
        calls[0] += 1
        if calls[0] == {at}:
            {action}
        return original(self, x)

    layers.Dense._forward = failing
"""


def with_fault(tmp_path, rank, at, action):
    """A sitecustomize that makes one rank fail at its ``at``-th dense forward pass."""
    folder = tmp_path / "fault"
    folder.mkdir()
    code = FAULT.format(rank=rank, at=at, action=action)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
    return {"PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}


def test_a_rank_that_raises_stops_every_rank_and_the_run_is_failed(tmp_path):
    env = with_fault(tmp_path, 1, 30, 'raise MemoryError("injected on rank 1")')
    started = time.monotonic()
    job = mpiexec(2, train_args(), tmp_path, env=env, timeout=120)
    assert time.monotonic() - started < 60
    assert job.returncode != 0
    lines = [line for line in job.stderr.splitlines() if line.startswith("gpucnn.train")]
    assert lines == [
        "gpucnn.train: error: rank 1 failed: MemoryError: injected on rank 1; the run is "
        "marked FAILED"
    ], job.stderr[-2000:]
    (run,) = all_runs(client_for(tmp_path))
    assert run.info.status == "FAILED"
    assert "rank 1 failed" in run.data.tags["gpucnn.error"]


def test_a_rank_killed_outright_leaves_nothing_hanging(tmp_path):
    env = with_fault(tmp_path, 1, 30, "os.kill(os.getpid(), signal.SIGKILL)")
    started = time.monotonic()
    job = mpiexec(2, train_args("trainer.epochs=20"), tmp_path, env=env, timeout=120)
    assert time.monotonic() - started < 60
    assert job.returncode != 0
    leftovers = subprocess.run(  # this test's ranks, by their own command line
        ["pgrep", "-f", "distributed=mpi backend=numpy trainer.epochs=2 trainer.epochs=20"],
        capture_output=True,
        text=True,
    )
    assert leftovers.stdout.strip() == ""
    # Rank 0 had no chance to mark the run; the next start on this host finds it dead.
    (run,) = all_runs(client_for(tmp_path))
    assert run.info.status in ("RUNNING", "FAILED")


def test_a_stopped_run_goes_on_under_mpiexec(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop("MLFLOW_TRACKING_URI", None)
    job = subprocess.Popen(
        [MPIEXEC, "-n", "2", sys.executable, *train_args("trainer.epochs=30")],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs" / "hydra").glob("**/model.npz")):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGTERM)  # what a scheduler does: every process of the job
    _, stderr = job.communicate(timeout=120)
    (run,) = all_runs(client_for(tmp_path))
    assert run.info.status == "KILLED", stderr[-2000:]
    assert run.data.tags["gpucnn.resumable"] == "true"
    alone = mpiexec(2, ["-m", "gpucnn.train", f"resume={run.info.run_id}"], tmp_path)
    assert alone.returncode != 0
    assert "2 processes started by an MPI launcher, but distributed=none" in alone.stderr
    resumed = mpiexec(
        2, ["-m", "gpucnn.train", f"resume={run.info.run_id}", "distributed=mpi"], tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client_for(tmp_path).get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    history = client_for(tmp_path).get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, 31))


def test_cupy_with_mpi_is_refused_in_one_line(tmp_path):
    job = mpiexec(1, train_args("backend=cupy"), tmp_path)
    assert job.returncode == 2
    assert job.stderr.strip().splitlines()[-1] == (
        "gpucnn.train: error: distributed=mpi with backend=cupy needs NCCL, which gpucnn "
        "does not support yet; use backend=numpy"
    )
