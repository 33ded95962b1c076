"""A team's tracking server, for real: scripts/tracking_server.py starts PostgreSQL
(Debian's package; as root under an unprivileged user) and `mlflow server
--serve-artifacts` on loopback ports; a sweep of 8 jobs, 4 at a time, logs everything
there over HTTP; a server that goes away mid-sweep ends the job in seconds, in one line."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("psycopg2", reason="the scale extra (psycopg2-binary) is not installed")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
    pytest.skip("PostgreSQL is not installed (CI installs it)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # As root, PostgreSQL runs as an unprivileged user, who must reach its folder: not
    # under pytest's temporary folders (closed to other users), so one in /var/tmp.
    home = Path(tempfile.mkdtemp(prefix="gpucnn-server-", dir="/var/tmp"))
    home.chmod(0o755)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "tracking_server.py"), "--port", str(port)]
        + ["--folder", str(home / "postgres"), "--artifacts", str(home / "artifacts")],
        cwd=home,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    seen = []  # the script says so once both servers answer (mlflow's lines first)
    for line in process.stdout:
        seen.append(line)
        if line.startswith("tracking server:"):
            break
    assert seen and seen[-1].startswith(f"tracking server: http://127.0.0.1:{port}"), seen
    # The server's access log keeps coming: read it, or the full pipe would block it.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    yield f"http://127.0.0.1:{port}", home
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=90)
    data = home / "postgres" / "data"
    left = subprocess.run(["pgrep", "-f", f"postgres -D {data}"], capture_output=True, text=True)
    shutil.rmtree(home, ignore_errors=True)
    assert left.stdout.strip() == "", "PostgreSQL still runs after the script stopped"


def test_a_sweep_of_8_jobs_4_at_a_time_logs_everything_to_the_server(server, tmp_path):
    url, home = server
    sweep = subprocess.run(
        [sys.executable, "-m", "gpucnn.train", "-m", "experiment=digits", "backend=numpy"]
        + ["trainer.epochs=1", "trainer.seed=0,1,2,3,4,5,6,7", f"tracking.uri={url}"]
        + ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "tracking.experiment=team"],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("team")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("gpucnn.sweep") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 8 and len(runs) == 9
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(c.info.run_name for c in children) == [f"trainer.seed={k}" for k in range(8)]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.metrics["test_accuracy"] > 0.5
        assert len(client.get_metric_history(child.info.run_id, "train_loss_step")) > 0
        top = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"checkpoint", "config.yaml", "images", "report.html"} <= top
    # Artifacts went through the server (--serve-artifacts) to its own folder.
    local = client.download_artifacts(
        children[0].info.run_id, "checkpoint/model.npz", str(tmp_path)
    )
    assert Path(local).stat().st_size > 0
    assert list((home / "artifacts").rglob("model.npz"))


def test_a_server_that_goes_away_mid_sweep_ends_the_job_in_seconds(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--port", str(port), "--host", "127.0.0.1"]
        + ["--backend-store-uri", f"sqlite:///{tmp_path}/s.db", "--serve-artifacts"]
        + ["--artifacts-destination", str(tmp_path / "a"), "--workers", "1"],
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["curl", "-sf", f"{url}/health"], capture_output=True).returncode:
            assert time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.3)
        job = subprocess.Popen(
            [sys.executable, "-m", "gpucnn.train", "-m", "experiment=digits", "backend=numpy"]
            + ["trainer.epochs=30", "trainer.seed=0,1,2", f"tracking.uri={url}"],
            cwd=tmp_path,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        client = MlflowClient(url)
        while True:  # the first job's run has logged an epoch
            runs = [
                r
                for e in client.search_experiments()
                for r in client.search_runs([e.experiment_id])
            ]
            if any("val_accuracy" in r.data.metrics for r in runs):
                break
            assert job.poll() is None and time.monotonic() < deadline + 120
            time.sleep(0.3)
        os.killpg(server.pid, signal.SIGKILL)
        gone = time.monotonic()
        _, stderr = job.communicate(timeout=180)
        assert time.monotonic() - gone < 90, "the job hung on the missing server"
        assert job.returncode != 0
        lines = [line for line in stderr.splitlines() if line.startswith("gpucnn.train")]
        assert len(lines) == 1 and f"the tracking server {url} stopped answering" in lines[0], (
            stderr[-3000:]
        )
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
