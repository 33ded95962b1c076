"""The SQLite store under concurrent jobs: a new store created by several processes at
once, a store another process keeps locked, a store that cannot be written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from gpucnn.tracking.mlflow_store import resolve_store  # noqa: E402


@pytest.mark.skipif(os.name != "posix", reason="the store's lock file uses flock (POSIX)")
def test_a_store_another_process_keeps_locked_is_waited_for_then_one_line(tmp_path, monkeypatch):
    import fcntl

    (tmp_path / "runs").mkdir()
    holder = os.open(tmp_path / "runs" / "mlflow.db.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as another process setting the store up would
    monkeypatch.setenv("GPUCNN_STORE_WAIT", "0.5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        with pytest.raises(ValueError, match=r"stayed locked by another process for 0.5 s"):
            resolve_store(None, tmp_path)
    finally:
        os.close(holder)
    resolve_store(None, tmp_path)  # free again: it goes through
    assert (tmp_path / "runs" / "mlflow.db").is_file()


def test_a_store_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"
    with pytest.raises(ValueError, match=r"^the MLflow store '.*mlflow\.db' cannot be written"):
        resolve_store(uri, tmp_path)


def test_a_bad_store_wait_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCNN_STORE_WAIT", "soon")
    with pytest.raises(ValueError, match=r"^GPUCNN_STORE_WAIT='soon' is not a number"):
        resolve_store(None, tmp_path)


@pytest.mark.slow
def test_eight_jobs_at_once_into_a_new_store_lose_no_run(tmp_path):
    """Each job creates the store if it is missing: MLflow alone failed all eight."""
    env = {**os.environ, "GPUCNN_BATCH_PROCESSES": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpucnn.train",
                "experiment=digits",
                "backend=numpy",
                "trainer.epochs=1",
                "trainer.kernels_every=0",
                f"trainer.seed={seed}",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for seed in range(8)
    ]
    results = [(job, *job.communicate(timeout=300)) for job in jobs]
    for job, _, err in results:
        assert job.returncode == 0, err[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(tmp_path) / 'runs' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["trainer.seed"] for r in runs) == [str(s) for s in range(8)]


def test_resume_refuses_a_run_without_a_checkpoint_or_still_running(tmp_path, monkeypatch):
    """In a real store: a run that stopped before its first checkpoint, and one whose
    process (this one) is alive."""
    from gpucnn.resume import find_checkpoint
    from gpucnn.tracking.liveness import this_process

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, _ = resolve_store(None, tmp_path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # as the train app sets it before resuming
    try:
        client = MlflowClient(tracking_uri=uri)
        early = client.create_run("0", tags=this_process().as_tags())
        client.set_terminated(early.info.run_id, "KILLED")
        with pytest.raises(ValueError, match=r"the run \(KILLED\) has no checkpoint to go on"):
            find_checkpoint(early.info.run_id, tmp_path)
        live = client.create_run("0", tags=this_process().as_tags())
        with pytest.raises(ValueError, match=rf"is still RUNNING \(pid {os.getpid()} on "):
            find_checkpoint(live.info.run_id, tmp_path)
    finally:
        mlflow.set_tracking_uri(previous)


def test_a_checkpoint_file_behind_its_run_is_refused():
    """resume=PATH with an older checkpoint of a run that went on would roll it back."""
    from types import SimpleNamespace

    from gpucnn.resume import _check_not_behind

    run = SimpleNamespace(
        info=SimpleNamespace(run_id="a" * 32),
        data=SimpleNamespace(
            tags={"gpucnn.checkpoint": "checkpoint/model.npz after epoch 4, step 84"}
        ),
    )
    older = SimpleNamespace(step=42)
    with pytest.raises(
        ValueError,
        match=rf"is at step 42 but its run went on to step 84; go on "
        rf"from the run's last checkpoint \(resume={'a' * 32}\)",
    ):
        _check_not_behind(run, older, Path("old.npz"))
    _check_not_behind(run, SimpleNamespace(step=84), Path("latest.npz"))  # fine


def test_the_resume_hint_names_a_store_given_on_the_command_line():
    from gpucnn.train import resume_hint

    assert resume_hint("r" * 32, {"tracking": {"uri": None}}) == (
        f"python -m gpucnn.train resume={'r' * 32}"
    )
    assert resume_hint("r" * 32, {"tracking": {"uri": "sqlite:////a b/x.db"}}) == (
        f"python -m gpucnn.train resume={'r' * 32} tracking.uri='sqlite:////a b/x.db'"
    )
