"""End-to-end: `python -m gpucnn.train` in a temporary directory, read back through
MlflowClient; sweeps; bad input; run status on failure and interruption; evaluate."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("hydra")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.slow

TINY = [
    "backend=numpy",
    "trainer.epochs=2",
    "trainer.log_every=5",
    "trainer.kernels_every=1",
    "trainer.batch_size=64",
]


def train(cwd, *overrides, timeout=300, env=None):
    environment = {**os.environ, **(env or {})}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "gpucnn.train", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def client_for(cwd):
    return MlflowClient(tracking_uri=f"sqlite:///{Path(cwd) / 'runs' / 'mlflow.db'}")


def all_runs(client):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def artifact_paths(client, run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return found


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("app")
    result = train(cwd, "experiment=digits", *TINY)
    assert result.returncode == 0, result.stderr
    return cwd, result


def test_run_logs_everything(digits_run):
    cwd, result = digits_run
    client = client_for(cwd)
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optimizer.lr"] == "0.001" and params["trainer.epochs"] == "2"
    assert params["model.layers.0.type"] == "conv" and params["backend"] == "numpy"
    sizes = {k: int(params[f"data.{k}_size"]) for k in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    tags = run.data.tags
    assert tags["gpucnn.backend"] == "numpy" and tags["gpucnn.device"].startswith("CPU")
    steps_per_epoch = -(-sizes["train"] // 64)
    history = {
        key: client.get_metric_history(run.info.run_id, key)
        for key in ("train_loss_step", "train_loss", "val_loss", "val_accuracy", "train_accuracy")
    }
    assert len(history["train_loss_step"]) == 2 * steps_per_epoch
    assert [m.step for m in history["train_loss_step"]] == list(range(1, 2 * steps_per_epoch + 1))
    for key in ("train_loss", "val_loss", "val_accuracy", "train_accuracy"):
        assert [m.step for m in history[key]] == [1, 2]
    metrics = run.data.metrics
    assert 0.5 < metrics["test_accuracy"] <= 1 and metrics["images_per_second"] > 0
    artifacts = artifact_paths(client, run.info.run_id)
    for expected in (
        "checkpoint/model.npz",
        "config.yaml",
        "kernels/conv1.npy",
        "kernels/conv2.npy",
        "confusion_matrix.csv",
    ):
        assert expected in artifacts
    kernel_images = [
        a for a in artifacts if a.startswith("images/kernels~conv1+step+") and a.endswith(".png")
    ]
    assert sorted(int(a.split("+step+")[1].split("+")[0]) for a in kernel_images) == [0, 1, 2]
    assert any(a.startswith("images/confusion_matrix") for a in artifacts)
    assert run.info.run_id in result.stdout and "test_accuracy" in result.stdout
    assert "mlflow ui --backend-store-uri" in result.stdout and "--host 127.0.0.1" in result.stdout
    # Hydra's outputs live under runs/, not in a stray outputs/ folder.
    assert not (Path(cwd) / "outputs").exists() and (Path(cwd) / "runs" / "hydra").is_dir()


def test_evaluate_by_run_id_and_by_path(digits_run):
    cwd, _ = digits_run
    client = client_for(cwd)
    (run,) = all_runs(client)
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    by_id = subprocess.run(
        [sys.executable, "-m", "gpucnn.evaluate", "--run-id", run.info.run_id, "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert by_id.returncode == 0, by_id.stderr
    report = json.loads(by_id.stdout.strip().splitlines()[-1])
    assert report["accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
    assert report["images"] == int(run.data.params["data.test_size"])
    checkpoint = next(Path(cwd, "runs", "hydra").rglob("model.npz"))
    by_path = subprocess.run(
        [sys.executable, "-m", "gpucnn.evaluate", "--checkpoint", str(checkpoint)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert by_path.returncode == 0 and f"accuracy {report['accuracy']:.4f}" in by_path.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "gpucnn.evaluate", "--run-id", "nope"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert missing.returncode == 2 and "run 'nope' was not found" in missing.stderr


def test_evaluate_names_a_missing_checkpoint(tmp_path, capsys):
    from gpucnn.evaluate import main as evaluate_main  # noqa: PLC0415

    gone = tmp_path / "gone.npz"
    assert evaluate_main(["--checkpoint", str(gone)]) == 2
    # The checkpoint is what was asked for: its absence is the error, not the config's.
    error = capsys.readouterr().err.strip()
    assert error == f"gpucnn.evaluate: error: checkpoint '{gone}' does not exist"


def test_evaluate_names_a_missing_store_and_creates_none(tmp_path, monkeypatch, capsys):
    from gpucnn.evaluate import main as evaluate_main  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert evaluate_main(["--run-id", "abc"]) == 2
    default = tmp_path / "runs" / "mlflow.db"
    assert capsys.readouterr().err.startswith(
        f"gpucnn.evaluate: error: no MLflow store at sqlite:///{default}: '{default}' "
        "does not exist"
    )
    elsewhere = tmp_path / "other.db"
    assert evaluate_main(["--run-id", "abc", "--tracking-uri", f"sqlite:///{elsewhere}"]) == 2
    assert f"'{elsewhere}' does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # MLflow would have created an empty store


@pytest.mark.parametrize(
    "text, problem",
    [
        ("data: {name: digits\n  oops: [", "is not a readable config: "),
        ("model: {name: x}\n", "is incomplete: it needs a data section with data.name"),
        ("- just\n- a list\n", "is incomplete: it needs a data section with data.name"),
        ("data: {name: ${nowhere}}\n", "is not a readable config: "),
    ],
)
def test_evaluate_names_a_malformed_or_incomplete_config(
    digits_run, tmp_path, capsys, text, problem
):
    from gpucnn.evaluate import main as evaluate_main  # noqa: PLC0415

    cwd, _ = digits_run
    checkpoint = next(Path(cwd, "runs", "hydra").rglob("model.npz"))
    (tmp_path / "config.yaml").write_text(text)
    argv = ["--checkpoint", str(checkpoint), "--config", str(tmp_path / "config.yaml")]
    assert evaluate_main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"gpucnn.evaluate: error: config '{tmp_path / 'config.yaml'}' ")
    assert problem in line


def test_evaluate_takes_the_config_a_training_checkpoint_carries(digits_run, tmp_path, capsys):
    """Without the config.yaml beside it, a checkpoint written by training still says
    which data it was trained on."""
    import shutil  # noqa: PLC0415

    from gpucnn.evaluate import main as evaluate_main  # noqa: PLC0415

    cwd, _ = digits_run
    original = next(Path(cwd, "runs", "hydra").rglob("model.npz"))
    alone = shutil.copy(original, tmp_path / "model.npz")
    assert evaluate_main(["--checkpoint", str(alone), "--json"]) == 0
    by_itself = json.loads(capsys.readouterr().out)
    assert evaluate_main(["--checkpoint", str(original), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_itself


def test_evaluate_refuses_an_empty_split(digits_run, tmp_path, capsys):
    from omegaconf import OmegaConf  # noqa: PLC0415

    from gpucnn.evaluate import main as evaluate_main  # noqa: PLC0415

    cwd, _ = digits_run
    checkpoint = next(Path(cwd, "runs", "hydra").rglob("model.npz"))
    config = OmegaConf.load(checkpoint.parent / "config.yaml")
    config.data.val_fraction = 0.0  # as if trained without a validation split
    OmegaConf.save(config, tmp_path / "config.yaml")
    argv = ["--checkpoint", str(checkpoint), "--config", str(tmp_path / "config.yaml")]
    assert evaluate_main([*argv, "--split", "val", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no NaN metrics printed (nor invalid JSON)
    assert err.strip() == (
        "gpucnn.evaluate: error: the run's val split has no images (trained with "
        "data.val_fraction=0); choose --split train or test"
    )
    assert evaluate_main([*argv, "--split", "test"]) == 0


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_one_parent_two_children(tmp_path, launcher):
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    result = train(
        tmp_path,
        "-m",
        "experiment=digits",
        *TINY,
        "trainer.epochs=1",
        "optimizer.lr=0.001,0.01",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    runs = all_runs(client_for(tmp_path))
    parents = [r for r in runs if r.data.tags.get("gpucnn.sweep") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.params["optimizer.lr"] for c in children) == ["0.001", "0.01"]
    # Named after what the sweep varies; the parent says which keys those are.
    assert parents[0].data.tags["gpucnn.swept_keys"] == "optimizer.lr"
    assert sorted(c.info.run_name for c in children) == ["optimizer.lr=0.001", "optimizer.lr=0.01"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:  # each can be told from a run whose process died
        assert {"gpucnn.host", "gpucnn.pid", "gpucnn.started"} <= set(run.data.tags)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.epochs=abc", "trainer.epochs"),
        ("trainer.epoch=3", "epoch"),
        ("optimizer.name=rmsprop", "rmsprop"),
    ],
)
def test_bad_override_exits_nonzero_without_a_run(tmp_path, override, message):
    result = train(tmp_path, "experiment=digits", *TINY, override)
    assert result.returncode != 0 and message in result.stderr
    store = tmp_path / "runs" / "mlflow.db"
    if store.exists():
        assert all(r.info.status != "RUNNING" for r in all_runs(client_for(tmp_path)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data=idx", "data.path=/no/such/mnist"],
            "data.path '/no/such/mnist' is not a directory of IDX files",
        ),
        (
            ["data=npz", "data.path=/no/such/file.npz"],
            "data.path '/no/such/file.npz' does not exist",
        ),
        (["trainer.epochs=0"], "trainer.epochs must be an int >= 1, got 0"),
        (["optimizer.lr=-1"], "learning rate (lr) must be a number > 0, got -1.0"),
        (["trainer.seed=-5"], "trainer.seed must be an int >= 0, got -5"),
        (["data.seed=-1"], "data.seed must be an int >= 0, got -1"),
        (
            ["data.test_fraction=0"],
            "data.test_fraction=0.0 leaves no test images out of 1797; raise it (allowed: (0, 1))",
        ),
        (
            ["model.layers.0.out_channels=-3"],
            "model.layers[0] (conv): out_channels must be an int >= 1, got -3",
        ),
        (
            ["+trainer.epoch=3"],
            "unknown config key 'trainer.epoch' (added with '+'?); allowed there: epochs, "
            "batch_size, seed, l2, log_every, kernels_every, checkpoint_every, dtype",
        ),
        (
            ["+model.layers.0.stide=2"],
            "unknown config key 'model.layers.0.stide' (added with '+'?); allowed there: "
            "type, out_channels, kernel_size, stride, padding, mode, bias, init, kind, window, "
            "order, out_features",
        ),
        (
            ["model=lenet"],
            "model 'lenet' on input (1, 8, 8): conv2: kernel 5x5 is larger than "
            "its padded input 2x2 (input C,H,W = (8, 2, 2), padding (0, 0, 0, 0))",
        ),
    ],
)
def test_bad_data_or_value_is_one_clear_line(tmp_path, overrides, message):
    result = train(tmp_path, "experiment=digits", *TINY, *overrides)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"gpucnn.train: error: {message}"
    assert not (tmp_path / "runs" / "mlflow.db").exists() or not any(
        r.info.status == "RUNNING" for r in all_runs(client_for(tmp_path))
    )


def test_a_bad_thread_setting_is_one_line_before_any_run(tmp_path):
    result = train(tmp_path, "experiment=digits", *TINY, env={"GPUCNN_BATCH_THREADS": "many"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "gpucnn.train: error: GPUCNN_BATCH_THREADS='many' is not an integer; allowed: a "
        "number of threads >= 1 (1 turns it off)"
    )
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_existing_runs_survive_a_failing_run(digits_run):
    cwd, _ = digits_run
    before = {r.info.run_id: r.info.status for r in all_runs(client_for(cwd))}
    result = train(cwd, "data=npz", "data.path=/missing.npz", *TINY)
    assert result.returncode == 2
    after = {r.info.run_id: r.info.status for r in all_runs(client_for(cwd))}
    assert after == before


def _run_in_process(tmp_path, monkeypatch, failure, ctrl_c_in_start_run=False):
    """Call the app's run() under a real Hydra context, with fit() replaced by ``failure``
    (or, with ``ctrl_c_in_start_run``, a real SIGINT arriving while MLflow creates the run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import gpucnn.train as app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with initialize_config_dir(config_dir=app.CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["experiment=digits", *TINY], return_hydra_config=True
        )
    cfg.hydra.runtime.output_dir = str(tmp_path / "out")
    cfg.hydra.runtime.cwd = str(tmp_path)
    (tmp_path / "out").mkdir()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):  # the app's main() never sees the hydra node
        del cfg["hydra"]

    def broken_fit(*args, **kwargs):
        raise failure

    monkeypatch.setattr(app, "fit", broken_fit)
    if ctrl_c_in_start_run:
        real_start_run = mlflow.start_run

        def interrupted_start_run(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            return real_start_run(*args, **kwargs)

        monkeypatch.setattr(mlflow, "start_run", interrupted_start_run)
    with pytest.raises(KeyboardInterrupt if ctrl_c_in_start_run else type(failure)):
        app.run(cfg)
    (run,) = all_runs(client_for(tmp_path))
    return run


def test_failure_inside_a_run_marks_it_failed(tmp_path, monkeypatch):
    run = _run_in_process(tmp_path, monkeypatch, RuntimeError("exploded at step 3"))
    assert run.info.status == "FAILED"
    assert run.data.tags["gpucnn.error"] == "RuntimeError: exploded at step 3"


def test_interrupt_inside_a_run_marks_it_killed(tmp_path, monkeypatch):
    run = _run_in_process(tmp_path, monkeypatch, KeyboardInterrupt())
    assert run.info.status == "KILLED"


def test_ctrl_c_while_the_run_is_created_marks_it_killed(tmp_path, monkeypatch):
    """The run is created whole, then ends KILLED (not left RUNNING), before training."""
    failure = AssertionError("training started after Ctrl-C")
    run = _run_in_process(tmp_path, monkeypatch, failure, ctrl_c_in_start_run=True)
    assert run.info.status == "KILLED"


def test_ctrl_c_marks_the_run_killed(tmp_path):
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpucnn.train",
            "experiment=seed_20x20",
            "backend=numpy",
            "trainer.epochs=100000",
            "trainer.kernels_every=0",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # Wait for the run's first artifact on disk rather than polling the database:
        # opening the store while the child is still creating its tables races with it.
        deadline = time.time() + 120
        started = []
        while time.time() < deadline and not started and process.poll() is None:
            time.sleep(0.3)
            started = list((tmp_path / "runs" / "artifacts").rglob("config.yaml"))
        if not started:
            process.kill()
            out, err = process.communicate(timeout=30)
            pytest.fail(f"the run never started; stdout: {out[-2000:]} stderr: {err[-2000:]}")
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    (run,) = all_runs(client_for(tmp_path))
    assert run.info.status == "KILLED"


def test_explicit_tracking_uri(tmp_path):
    store = tmp_path / "elsewhere.db"
    result = train(
        tmp_path,
        "experiment=digits",
        *TINY,
        "trainer.epochs=1",
        f"tracking.uri=sqlite:///{store}",
        "tracking.experiment=custom",
    )
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    assert client.get_experiment_by_name("custom") is not None
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    checkpoint = next(tmp_path.joinpath("runs", "hydra").rglob("model.npz"))
    with np.load(checkpoint, allow_pickle=False) as data:
        assert "architecture" in data.files


def _refused_port():
    """A local port with nothing listening (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_tracking_server_fails_fast_in_one_line(tmp_path):
    uri = f"http://127.0.0.1:{_refused_port()}"
    started = time.perf_counter()
    result = train(tmp_path, "experiment=digits", *TINY, f"tracking.uri={uri}")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gpucnn.train: error: tracking server '{uri}' does not answer (")
    assert "unset both for the local store under runs/" in last
    # MLflow's client alone retries a refused connection for minutes.
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_a_server_that_answers_passes_the_check_and_gets_its_own_ui_hint():
    from gpucnn.tracking.mlflow_store import check_server, ui_command  # noqa: PLC0415

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            uri = f"http://127.0.0.1:{server.server_address[1]}"
            check_server(uri)
            check_server(uri + "/no/such/prefix")  # a 404 still answers
        finally:
            server.shutdown()
    assert ui_command(uri) == f"open {uri} in a browser"
    check_server("sqlite:////no/such/dir/x.db")  # not a server: left to MLflow


@pytest.mark.parametrize("folder", ["plain", "with space", 'it\'s $HOME; `x` \\ "q"'])
def test_the_ui_command_stays_one_command_whatever_the_path_holds(folder):
    """A real shell splits the printed command back into exactly the intended words."""
    from gpucnn.tracking.mlflow_store import ui_command  # noqa: PLC0415

    uri = f"sqlite:////tmp/{folder}/runs/mlflow.db"
    command = ui_command(uri)
    words = subprocess.run(
        ["bash", "-c", f"set -- {command}; printf '%s\\n' \"$@\""],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert words == [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        "5000",
    ]


def test_git_commit_is_tagged_when_launched_in_a_checkout(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "notes.txt").write_text("x")
    git("add", "notes.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "init")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    result = train(tmp_path, "experiment=digits", *TINY, "trainer.epochs=1")
    assert result.returncode == 0, result.stderr
    (run,) = all_runs(client_for(tmp_path))
    assert run.data.tags["mlflow.source.git.commit"] == head


def test_diverging_run_fails_with_one_line(tmp_path):
    result = train(tmp_path, "experiment=digits", *TINY, "optimizer=ascent", "optimizer.lr=1e30")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gpucnn.train: error: training loss became") and "diverged" in last
    (run,) = all_runs(client_for(tmp_path))
    assert run.info.status == "FAILED"
    assert run.data.tags["gpucnn.error"].startswith("DivergedError: training loss became")


def test_deferred_interrupt_holds_ctrl_c_until_the_block_ends():
    from gpucnn.interrupts import deferred_interrupt, raise_if_interrupted  # noqa: PLC0415

    before = signal.getsignal(signal.SIGINT)
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal has been delivered by now, and held
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is before
    raise_if_interrupted()  # raised once; nothing left over to stop a later training


def test_ctrl_c_never_cuts_a_store_write_in_half(tmp_path, monkeypatch):
    """A Ctrl-C that arrives inside log_batch lets the write finish, then interrupts."""
    from gpucnn.tracking.mlflow_store import MlflowTracker  # noqa: PLC0415

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = MlflowTracker("no-run")
    written = []

    class InterruptedClient:
        def log_batch(self, run_id, metrics=(), params=()):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            written.extend(metrics)

    tracker.client = InterruptedClient()
    tracker.log_metrics({"loss": 1.0, "accuracy": 0.5}, step=3)
    with pytest.raises(KeyboardInterrupt):
        tracker.flush()
    assert [(m.key, m.value, m.step) for m in written] == [("loss", 1.0, 3), ("accuracy", 0.5, 3)]
