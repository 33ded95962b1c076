"""Stops a training process does not choose, sent for real to `python -m gpucnn.train`:
SIGTERM to its process group (worker processes included) and SIGKILL. Each stopped run
is resumed, and must end bit for bit as the same run never stopped: final parameters,
every step loss and every epoch and test metric."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("hydra")
from mlflow.tracking import MlflowClient  # noqa: E402

from gpucnn.nn.checkpoint import read_checkpoint  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="process groups and signals: POSIX"),
]
# 12 epochs of 21 steps (1293 training images); batches of 64 go half to a worker
# process (2 slices, whatever the host).
ARGS = [
    "experiment=digits",
    "backend=numpy",
    "trainer.epochs=12",
    "trainer.batch_size=64",
    "trainer.log_every=5",
    "trainer.kernels_every=0",
]
ENV = {"GPUCNN_BATCH_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "GPUCNN_BATCH_PROCESSES": "1"}
STEPS = 12 * 21
STORE: dict[str, Path] = {}  # what the module's store fixture found
METRICS = ("train_loss_step", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
FINAL = ("test_loss", "test_accuracy")


def environment():
    env = {**os.environ, **ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def train(cwd, *args):
    return subprocess.run(
        [sys.executable, "-m", "gpucnn.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(),
    )


def client_for(cwd):
    return MlflowClient(tracking_uri=f"sqlite:///{Path(cwd) / 'runs' / 'mlflow.db'}")


def run_ids(cwd):
    client = client_for(cwd)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id for r in client.search_runs(experiments)} if experiments else set()


def checkpoints(cwd):
    return set((Path(cwd) / "runs" / "hydra").rglob("model.npz"))


def start_and_stop(cwd, signal_number, after_checkpoints=1, pause=0.3, extra=(), ready=None):
    """Start a training process in its own process group; once it has written
    ``after_checkpoints`` checkpoints (and ``ready(run_id)`` holds, if given), plus
    ``pause`` seconds, signal the whole group. Returns (process, stdout, stderr, run id)."""
    before_runs, before_files = run_ids(cwd), checkpoints(cwd)
    process = subprocess.Popen(
        [sys.executable, "-m", "gpucnn.train", *ARGS, *extra],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
        start_new_session=True,  # its own process group, as a scheduler's job has
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            new = checkpoints(cwd) - before_files
            if new and _epochs_done(next(iter(new))) >= after_checkpoints:
                if ready is None or ready(next(iter(run_ids(cwd) - before_runs))):
                    break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(pause)
        os.killpg(process.pid, signal_number)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    _wait_for_group_to_end(process.pid)
    (run_id,) = run_ids(cwd) - before_runs
    return process, out, err, run_id


def _epochs_done(path):
    try:
        return read_checkpoint(path).progress.epoch
    except (OSError, ValueError):
        return 0  # being replaced right now


def _wait_for_group_to_end(group):
    """No process of the job's group (the worker processes) outlives it."""
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"processes of group {group} are still alive after the job ended")


def history(client, run_id):
    logged = {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=_step)]
        for key in METRICS + FINAL
    }
    return logged


def _step(metric):
    return metric.step


def final_params(client, run_id, into):
    into.mkdir(parents=True, exist_ok=True)
    path = client.download_artifacts(run_id, "checkpoint/model.npz", str(into))
    return read_checkpoint(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with the uninterrupted reference run."""
    cwd = tmp_path_factory.mktemp("stops")
    result = train(cwd, *ARGS)
    assert result.returncode == 0, result.stderr
    (reference,) = run_ids(cwd)
    (STORE["reference checkpoint"],) = checkpoints(cwd)
    return cwd, reference


def assert_same_as_reference(cwd, reference, run_id, tmp_path):
    client = client_for(cwd)
    assert client.get_run(run_id).info.status == "FINISHED"
    expected, got = history(client, reference), history(client, run_id)
    assert [step for step, _ in got["train_loss_step"]] == list(range(1, STEPS + 1))
    assert got == expected  # every logged loss and accuracy, bit for bit
    mine = final_params(client, run_id, tmp_path / "mine")
    theirs = final_params(client, reference, tmp_path / "theirs")
    assert mine.params.keys() == theirs.params.keys()
    for key, value in theirs.params.items():
        assert np.array_equal(mine.params[key], value), key
    for key, value in theirs.optimizer_state.items():
        assert np.array_equal(mine.optimizer_state[key], value), key
    assert mine.optimizer_steps == theirs.optimizer_steps == STEPS


def test_sigterm_to_the_job_saves_stops_and_the_run_goes_on_bit_for_bit(store, tmp_path):
    cwd, reference = store
    process, _, err, run_id = start_and_stop(cwd, signal.SIGTERM)
    assert process.returncode == 143, err
    line = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"gpucnn\.train: stopped by signal 15 before step (\d+); checkpoint \S+model\.npz; "
        rf"the run is marked KILLED and can go on with: python -m gpucnn\.train resume={run_id}",
        line,
    )
    assert match, line
    stopped_at = int(match.group(1)) - 1
    assert 21 <= stopped_at < STEPS  # after the first epoch, before the end
    client = client_for(cwd)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["gpucnn.resumable"] == "true"
    saved = final_params(client, run_id, tmp_path / "saved")  # the stop's own checkpoint
    assert saved.progress.step == stopped_at
    assert saved.progress.batch_split["worker_processes"] is True
    # Everything up to the stop is in the store already.
    logged = [m.step for m in client.get_metric_history(run_id, "train_loss_step")]
    assert sorted(logged) == list(range(1, stopped_at + 1))
    # The stop left time for the run's report; the resumed run rewrites it at its end.
    report = Path(client.download_artifacts(run_id, "report.html", str(tmp_path / "r1")))
    assert "<td>status</td><td>KILLED</td>" in report.read_text()

    resumed = train(cwd, f"resume={run_id}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_reference(cwd, reference, run_id, tmp_path)
    report = Path(client.download_artifacts(run_id, "report.html", str(tmp_path / "r2")))
    assert "<td>status</td><td>FINISHED</td>" in report.read_text()
    tags = client.get_run(run_id).data.tags
    assert tags["gpucnn.resumable"] == "false" and "gpucnn.stopped" not in tags
    assert tags["gpucnn.resumed_from"].endswith(f"step {stopped_at}")


def test_sigusr2_a_schedulers_warning_stops_like_sigterm(store, tmp_path):
    """submitit has SLURM send SIGUSR2 ahead of a time limit or a preemption: the same
    stop at a step boundary, checkpoint, KILLED and resumable, to the whole job's group
    (worker processes included)."""
    cwd, reference = store
    process, _, err, run_id = start_and_stop(cwd, signal.SIGUSR2)
    assert process.returncode == 128 + signal.SIGUSR2, err
    assert f"stopped by signal {int(signal.SIGUSR2)} before step" in err.strip().splitlines()[-1]
    run = client_for(cwd).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["gpucnn.resumable"] == "true"
    resumed = train(cwd, f"resume={run_id}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_reference(cwd, reference, run_id, tmp_path)


def test_a_job_killed_without_a_word_is_found_failed_and_goes_on(store, tmp_path):
    """...and goes on from its checkpoint file (resume=PATH): the same run. Checkpoints
    every 3 epochs, killed once epoch 4 is in the store: the epochs logged after the
    checkpoint are not logged twice when the run goes on."""
    cwd, reference = store
    before = checkpoints(cwd)

    def past_the_checkpoint(run_id):
        return len(client_for(cwd).get_metric_history(run_id, "train_loss")) >= 4

    process, _, _, run_id = start_and_stop(
        cwd,
        signal.SIGKILL,
        pause=0.0,
        extra=["trainer.checkpoint_every=3"],
        ready=past_the_checkpoint,
    )
    (its_checkpoint,) = checkpoints(cwd) - before
    assert read_checkpoint(its_checkpoint).progress.epoch == 3
    assert process.returncode == -signal.SIGKILL
    client = client_for(cwd)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could say otherwise
    # Each completed epoch was in the store when it ended, whatever came next.
    assert len(client.get_metric_history(run_id, "train_loss")) >= 4
    # The next gpucnn start against this store (here: evaluate) finds it.
    found = subprocess.run(
        [sys.executable, "-m", "gpucnn.evaluate", "--run-id", reference, "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
    )
    assert found.returncode == 0, found.stderr
    assert f"gpucnn: run {run_id}'s process no longer exists; marked FAILED" in found.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["gpucnn.resumable"] == "true"
    assert "ended without a word" in run.data.tags["gpucnn.error"]
    assert re.search(
        r"last checkpoint: checkpoint/model\.npz after epoch \d+, step \d+",
        run.data.tags["gpucnn.error"],
    )
    resumed = train(cwd, f"resume={its_checkpoint}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_reference(cwd, reference, run_id, tmp_path)
    assert "gpucnn.error" not in client.get_run(run_id).data.tags


REFUSALS = [
    (
        "file",
        ["optimizer.lr=0.5"],
        r"resume: optimizer\.lr cannot change when a run goes on \(the run has 0\.001, the "
        r"override gives 0\.5\); allowed: trainer\.epochs, .*tracking\.\*, data\.path, "
        r"data\.cache_dir, data\.url, data\.download, backend",
    ),
    ("file", ["model=lenet"], r"resume: 'model=lenet' cannot be given: a resumed run keeps"),
    (
        "file",
        ["trainer.epochs=3"],
        r"resume: trainer\.epochs=3 but the run is 12 epochs and 0 batches in; give "
        r"trainer\.epochs >= 12",
    ),
    ("run", [], r"resume=\w+: the run FINISHED; there is nothing to go on with"),
    ("its own store", [], r"resume=\S+model\.npz \(run \w+\): the run FINISHED"),
    ("mismatch", [], r"resume: checkpoint '.*' does not match its run's config"),
    ("nothing", [], r"resume='0123' is neither a checkpoint file nor a run id"),
    ("empty", [], r"resume= is empty; give a run id or a checkpoint file"),
]


def mismatched_checkpoint(source, tmp_path):
    """A copy of ``source`` whose recorded config asks for another first conv layer."""
    import json

    with np.load(source, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    progress = json.loads(str(arrays["progress"]))
    progress["extra"]["config"]["model"]["layers"][0]["out_channels"] += 1
    arrays["progress"] = np.array(json.dumps(progress))
    path = tmp_path / "mismatched.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("target, overrides, message", REFUSALS)
def test_what_a_resume_refuses_is_one_line(store, target, overrides, message, tmp_path):
    """Against the reference run (FINISHED), or its checkpoint file: in the run's own
    store (so FINISHED too), or from another folder (where its run is unknown, so the
    overrides are what is refused). Nothing in the store changes."""
    cwd, reference = store
    before = {r: client_for(cwd).get_run(r).info.status for r in run_ids(cwd)}
    where = {
        "run": reference,
        "file": str(STORE["reference checkpoint"]),
        "nothing": "0123",
        "empty": "",
        "mismatch": "mismatch",
        "its own store": str(STORE["reference checkpoint"]),
    }[target]
    if target == "mismatch":
        where = str(mismatched_checkpoint(STORE["reference checkpoint"], tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = train(
        cwd if target in ("run", "its own store") else elsewhere, f"resume={where}", *overrides
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # nothing else
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(f"gpucnn.train: error: {message}.*", last), last
    assert {r: client_for(cwd).get_run(r).info.status for r in run_ids(cwd)} == before


def test_sigterm_while_starting_leaves_no_run_running(tmp_path):
    """Before the handler is set the default action ends the process; after it, the app
    stops before it starts a run. Either way nothing is left RUNNING."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gpucnn.train", *ARGS],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
        start_new_session=True,
    )
    time.sleep(2.0)  # importing, composing the config, loading the data
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode in (-signal.SIGTERM, 143), err
    if process.returncode == 143:
        last = err.strip().splitlines()[-1]
        assert (
            last.startswith("gpucnn.train: stopped by signal 15")
            and "KILLED" in last
            or (
                last == "gpucnn.train: stopped by signal 15 before the run started; nothing was "
                "logged"
            )
        )
    if (tmp_path / "runs" / "mlflow.db").exists():
        client = client_for(tmp_path)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments) if experiments else []
        assert all(r.info.status != "RUNNING" for r in runs)
