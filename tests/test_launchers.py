"""Sweeps through Hydra's submitit launcher: the SLURM presets compose into the sbatch
settings they promise (SLURM itself cannot run here), a sweep runs through submitit's
local executor with one MLflow run per job, and submitit's warning signal (SIGUSR2) to a
running job stops its run with a checkpoint, KILLED and resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the scale extra is missing")
submitit = pytest.importorskip("submitit")
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from gpucnn.train import CONF_DIR  # noqa: E402
from tests.test_train_app import all_runs, client_for, train  # noqa: E402


def sbatch_text(preset: str, tmp_path: Path, monkeypatch) -> str:
    """The sbatch script submitit would submit for ``preset``, parameters passed the
    way Hydra's SlurmLauncher passes them (with a stand-in srun on the PATH: submitit
    only checks that one exists)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True
        )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert params.pop("_target_").endswith("SlurmLauncher")
    params.pop("submitit_folder")
    params["name"] = "gpucnn"
    executor = submitit.AutoExecutor(
        folder=str(tmp_path / "jobs"),
        cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m gpucnn.train", "0")


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        (
            "slurm_cpu",
            ["--cpus-per-task=2", "--ntasks-per-node=1", "--nodes=1", "--time=60", "--mem=8GB"],
        ),
        (
            "slurm_gpu",
            ["--gpus-per-node=1", "--cpus-per-task=8", "--time=240", "--mem=32GB"],
        ),
    ],
)
def test_the_slurm_presets_ask_for_what_they_say(preset, expected, tmp_path, monkeypatch):
    text = sbatch_text(preset, tmp_path, monkeypatch)
    lines = {line.strip() for line in text.splitlines() if line.startswith("#SBATCH")}
    for option in [*expected, "--signal=USR2@120"]:
        assert f"#SBATCH {option}" in lines, (option, sorted(lines))
    if preset == "slurm_cpu":
        assert not any("gpus" in line for line in lines)


@pytest.mark.slow
def test_a_sweep_through_submitit_runs_one_mlflow_run_per_job(tmp_path):
    result = train(
        tmp_path,
        "-m",
        "experiment=digits",
        "backend=numpy",
        "trainer.epochs=1",
        "trainer.seed=0,1",
        "hydra/launcher=local_jobs",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(client_for(tmp_path))
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(c.info.run_name for c in children) == ["trainer.seed=0", "trainer.seed=1"]


@pytest.mark.slow
def test_submitits_warning_signal_stops_a_job_resumably(tmp_path):
    environment = {**os.environ}
    environment.pop("MLFLOW_TRACKING_URI", None)
    sweep = subprocess.Popen(
        [sys.executable, "-m", "gpucnn.train", "-m", "experiment=digits", "backend=numpy"]
        + ["trainer.epochs=40", "trainer.seed=7", "hydra/launcher=local_jobs"],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not list((tmp_path / "runs" / "hydra").glob("**/model.npz")):  # an epoch is done
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.stderr.read()[-2000:]
        time.sleep(0.1)
    jobs = subprocess.run(
        ["pgrep", "-f", f"submitit.*{tmp_path.name}"], capture_output=True, text=True
    ).stdout.split()
    assert jobs, "no submitit job process found"
    for pid in jobs:  # what submitit (or SLURM, for it) sends ahead of a time limit
        os.kill(int(pid), signal.SIGUSR2)
    sweep.communicate(timeout=180)
    runs = all_runs(client_for(tmp_path))
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "KILLED", child.data.tags
    assert child.data.tags["gpucnn.resumable"] == "true"
    assert child.data.tags["gpucnn.stopped"].startswith(f"signal {int(signal.SIGUSR2)}")
    resumed = train(tmp_path, f"resume={child.info.run_id}")  # what a requeued job runs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client_for(tmp_path).get_run(child.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_sweep_through_a_local_ray_runs_one_mlflow_run_per_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the scale extra is missing")
    result = train(
        tmp_path,
        "-m",
        "experiment=digits",
        "backend=numpy",
        "trainer.epochs=1",
        "optimizer.lr=0.001,0.003",
        "hydra/launcher=ray_local",  # Ray started by the launcher, 2 CPUs
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(client_for(tmp_path))
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(c.info.run_name for c in children) == [
        "optimizer.lr=0.001",
        "optimizer.lr=0.003",
    ]


def test_the_ray_cluster_preset_joins_a_running_cluster():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["hydra/launcher=ray_cluster"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("RayLauncher")
    assert launcher.ray.init.address == "auto" and launcher.ray.remote.num_cpus == 1
