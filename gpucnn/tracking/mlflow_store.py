"""Experiment tracking at the edge: the MLflow implementation of the training loop's
:class:`~gpucnn.tracking.tracker.Tracker`, and where the store is. The core never imports
MLflow; only this module (and the entry points) do.

Default store: a SQLite database and an artifact folder under ``runs/`` of the directory
the user launched from, created on first use. ``tracking.uri`` or ``MLFLOW_TRACKING_URI``
points elsewhere (e.g. an ``http://`` tracking server).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gpucnn.interrupts import deferred_interrupt
from gpucnn.tracking.liveness import ProcessIdentity, is_alive, this_process
from gpucnn.tracking.tracker import Tracker

SWEPT_KEYS_TAG = "gpucnn.swept_keys"  # on a sweep's parent run: the keys it varies
PARENT_RUN_ENV = "GPUCNN_PARENT_RUN_ID"
PARENT_RUN_FILE = "mlflow_parent_run_id"
CHECKPOINT_TAG = "gpucnn.checkpoint"  # the last checkpoint: artifact path, epoch and step
RESUMABLE_TAG = "gpucnn.resumable"  # "true" on a run that stopped with a checkpoint
METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
F = TypeVar("F", bound=Callable[..., Any])


def _holding_ctrl_c(method: F) -> F:
    """Run a store write with Ctrl-C held (see :func:`deferred_interrupt`)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with deferred_interrupt():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# -- store resolution --------------------------------------------------------------------
def default_store(base_dir: str | Path) -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded store under base_dir/runs."""
    runs = Path(base_dir).resolve() / "runs"
    return f"sqlite:///{runs / 'mlflow.db'}", (runs / "artifacts").as_uri()


def resolve_store(
    uri: str | None, base_dir: str | Path, create: bool = True
) -> tuple[str, str | None]:
    """The tracking URI to use and, for the embedded store, the artifact location.

    Precedence: explicit ``uri`` > ``MLFLOW_TRACKING_URI`` > embedded SQLite under runs/.
    ``create=False`` is for readers: a SQLite store that does not exist is then an error
    (MLflow would create an empty one and report the run as not found).
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_server(uri)
        artifacts = None
    else:
        uri, artifacts = default_store(base_dir)
    database = sqlite_file(uri)
    if not create and database is not None and not database.is_file():
        raise ValueError(
            f"no MLflow store at {uri}: {str(database)!r} does not exist (run from the "
            "directory you trained in, or give the store: tracking.uri=... for gpucnn.train, "
            "--tracking-uri for gpucnn.evaluate, or MLFLOW_TRACKING_URI)"
        )
    if database is not None and create:  # readers find it made: they need no lock
        ready_sqlite_store(uri, database)
    return uri, artifacts


def store_wait_seconds() -> float:
    """How long to wait for a SQLite store another process holds (GPUCNN_STORE_WAIT)."""
    text = os.environ.get("GPUCNN_STORE_WAIT", "60")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"GPUCNN_STORE_WAIT={text!r} is not a number of seconds >= 0")
    return seconds


def ready_sqlite_store(uri: str, database: Path) -> None:
    """Create the SQLite store (or bring its tables up to date) once, under a lock file
    beside it: MLflow creates the tables on first use, and several processes starting at
    once into a new store all fail ("table ... already exists") and leave it unusable.

    A store another process keeps locked is waited for, up to GPUCNN_STORE_WAIT seconds
    (60), then a one-line ValueError; so is a store that cannot be written."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    seconds = store_wait_seconds()
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(database.with_name(database.name + ".lock"), os.O_RDWR | os.O_CREAT)
    except OSError as err:
        raise ValueError(
            f"the MLflow store {str(database)!r} cannot be written: {err.strerror or err} "
            "(choose another folder, or tracking.uri / MLFLOW_TRACKING_URI)"
        ) from None
    deadline = time.monotonic() + seconds  # for the lock and the store together
    try:
        _lock(handle, database, seconds, deadline)
        while True:
            try:
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
                return
            except Exception as err:  # noqa: BLE001 - told apart just below
                problem = _store_problem(err)
                if problem is None:
                    raise
                if "locked" not in problem or time.monotonic() > deadline:
                    raise ValueError(_store_message(database, problem, seconds)) from None
                time.sleep(0.2)
    finally:
        os.close(handle)  # releases the lock


def _lock(handle: int, database: Path, seconds: float, deadline: float) -> None:
    try:
        import fcntl  # noqa: PLC0415 - POSIX; elsewhere the store is set up unlocked
    except ImportError:
        return
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ValueError(_store_message(database, "database is locked", seconds)) from None
            time.sleep(0.05)


def _store_problem(err: BaseException) -> str | None:
    """What a SQLite error says (locked, read-only, cannot open), or None for others."""
    seen: BaseException | None = err
    while seen is not None:
        text = str(seen).lower()
        for problem in (
            "database is locked",
            "readonly database",
            "unable to open database file",
            "disk i/o error",
        ):
            if problem in text:
                return problem
        seen = seen.__cause__ or seen.__context__
    return None


def _store_message(database: Path, problem: str, seconds: float) -> str:
    if "locked" in problem:
        return (
            f"the MLflow store {str(database)!r} stayed locked by another process for "
            f"{seconds:g} s (raise GPUCNN_STORE_WAIT, or use a tracking server)"
        )
    return (
        f"the MLflow store {str(database)!r} cannot be written ({problem}); choose another "
        "folder, or tracking.uri / MLFLOW_TRACKING_URI"
    )


HTTP_FAIL_FAST = {  # a refused connection fails at once: few retries, short backoff
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def store_error(err: BaseException) -> ValueError | None:
    """A one-line error for a failure of the active store met under way: a SQLite store
    locked past MLflow's own 20 s or unwritable, or a tracking server that stopped
    answering; else None."""
    if "mlflow" not in sys.modules:  # nothing was opened yet
        return None
    uri = sys.modules["mlflow"].get_tracking_uri()
    if is_server(uri):
        text = f"{type(err).__name__}: {err}"
        signs = ("Max retries exceeded", "Connection refused", "ConnectionError", "timed out")
        if any(sign in text for sign in signs):
            return ValueError(
                f"the tracking server {uri} stopped answering ({_first_line(text)[:200]}); "
                "what was logged before is kept there; the run could not be marked there"
            )
        return None
    database = sqlite_file(uri)
    problem = _store_problem(err) if database is not None else None
    if problem is None:
        return None
    return ValueError(_store_message(database, problem, 20.0))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the current directory when
    the path is), else None."""
    prefix = "sqlite:///"
    path = uri[len(prefix) :].split("?", 1)[0]  # (a query such as ?timeout=30 is not the file)
    if not uri.startswith(prefix) or path in ("", ":memory:"):
        return None
    return Path(path)


def is_server(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line, when an http(s) tracking server does not answer.

    MLflow's own client retries a refused connection with backoff for minutes before it
    gives up. Any HTTP answer (even 401 from a proxy) counts as reachable; other URIs
    (sqlite, file, databricks) are left to MLflow.
    """
    if not is_server(uri):
        return
    # A server that goes away later: MLflow's client would retry each request with
    # backoff for minutes; a few seconds, then the job's one-line error (the user's own
    # settings of these variables win).
    for name, value in HTTP_FAIL_FAST.items():
        os.environ.setdefault(name, value)
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(
            f"tracking server {uri!r} does not answer ({reason}); start it, fix "
            "tracking.uri / MLFLOW_TRACKING_URI, or unset both for the local store under runs/"
        ) from None


def ui_command(uri: str) -> str:
    """How to look at the runs in ``uri``: the server itself, or a local UI on the store."""
    if is_server(uri):
        return f"open {uri} in a browser"
    python, store = shlex.quote(sys.executable), shlex.quote(uri)  # one command, any path
    return f"{python} -m mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5000"


def ensure_experiment(name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it (with an explicit artifact location) if needed."""
    import mlflow  # noqa: PLC0415

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        # Another process (a parallel sweep) created it first.
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit(directory: str | Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; lists of mappings get their index in the key."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, item in enumerate(value):
                flat.update(flatten_params(item, f"{name}.{index}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:6000]
    return flat


# -- MLflow ------------------------------------------------------------------------------
class MlflowTracker(Tracker):
    """Logs to the active MLflow run. Metrics are buffered and sent with log_batch (one
    HTTP call instead of hundreds)."""

    def __init__(self, run_id: str) -> None:
        from mlflow.tracking import MlflowClient  # noqa: PLC0415

        self.client = MlflowClient()
        self.run_id = run_id
        self._pending: list[Any] = []
        self._logged_up_to: dict[str, int] = {}  # a resumed run: steps the store has

    def skip_what_is_logged(self) -> None:
        """For a run that goes on from a checkpoint: metric values the store already has
        (logged after that checkpoint, before the stop) are not sent again. Resumed bit
        for bit, they are the same values; sent again, the history would hold each twice."""
        for key in self.client.get_run(self.run_id).data.metrics:
            steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
            self._logged_up_to[key] = max(steps, default=-1)

    def _already_logged(self, key: str, step: int) -> bool:
        return step <= self._logged_up_to.get(key, -1)

    def _new(self, metrics: list[Any]) -> list[Any]:
        if not self._logged_up_to:
            return metrics
        return [m for m in metrics if m.step > self._logged_up_to.get(m.key, -1)]

    @_holding_ctrl_c
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # noqa: PLC0415

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        stamp = _now_ms()
        self._pending += self._new(
            [Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()]
        )
        if len(self._pending) >= METRICS_PER_BATCH:
            self.flush()

    def log_metric_history(self, key: str, values: list[float], first_step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        stamp = _now_ms()
        self._pending += self._new(
            [Metric(key, float(v), stamp, first_step + i) for i, v in enumerate(values)]
        )
        if len(self._pending) >= METRICS_PER_BATCH:
            self.flush()

    @_holding_ctrl_c
    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = (
                self._pending[:METRICS_PER_BATCH],
                self._pending[METRICS_PER_BATCH:],
            )
            self.client.log_batch(self.run_id, metrics=chunk)

    @_holding_ctrl_c
    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        import mlflow  # noqa: PLC0415

        if key.startswith("kernels/") and self._already_logged("train_loss", step):
            return  # an epoch's kernels, logged with its metrics before the stop
        mlflow.log_image(image, key=key, step=int(step), synchronous=True)

    @_holding_ctrl_c
    def log_array(self, name: str, array: np.ndarray) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            np.save(path, array, allow_pickle=False)
            self.client.log_artifact(self.run_id, str(path), "kernels")

    @_holding_ctrl_c
    def log_arrays(self, name: str, arrays: dict[str, np.ndarray], folder: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            np.savez(path, **arrays)  # plain arrays: read back without pickle
            self.client.log_artifact(self.run_id, str(path), folder)

    @_holding_ctrl_c
    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    @_holding_ctrl_c
    def log_checkpoint(self, path: str | Path, epoch: int, step: int) -> None:
        """The checkpoint as the artifact checkpoint/<name>, and a tag saying how far it
        is (read when the run is resumed, or found dead)."""
        self.client.log_artifact(self.run_id, str(path), "checkpoint")
        where = f"checkpoint/{Path(path).name} after epoch {epoch}, step {step}"
        self.client.set_tag(self.run_id, CHECKPOINT_TAG, where)

    @_holding_ctrl_c
    def log_dataset(self, name: str, sha256: str, source: str | None, tags: dict[str, str]) -> None:
        """The run's data as an MLflow dataset input (the UI's Datasets column): its name,
        digest (the first 32 hex digits of its SHA-256; MLflow keeps at most 36
        characters, the whole one is the input tag gpucnn.sha256) and source (the URL it
        was downloaded from, the folder or archive it was read from, or, for a dataset
        made in code, a code source naming it)."""
        from mlflow.data.code_dataset_source import CodeDatasetSource  # noqa: PLC0415
        from mlflow.data.http_dataset_source import HTTPDatasetSource  # noqa: PLC0415
        from mlflow.data.meta_dataset import MetaDataset  # noqa: PLC0415

        if source is None:
            where: Any = CodeDatasetSource({"gpucnn.dataset": name})
        elif source.startswith(("http://", "https://")):
            where = HTTPDatasetSource(source)
        else:
            from mlflow.data.dataset_source_registry import (  # noqa: PLC0415
                resolve_dataset_source,
            )

            where = resolve_dataset_source(Path(source).absolute().as_uri())
        import mlflow  # noqa: PLC0415

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"log_dataset needs run {self.run_id} to be the active run")
        dataset = MetaDataset(where, name=name, digest=sha256[:32])
        mlflow.log_input(dataset, context="training", tags={"gpucnn.sha256": sha256, **tags})


def _running_runs_of(client: Any, host: str) -> list[Any]:
    """Every RUNNING run tagged with ``host``, in every experiment (page by page)."""
    experiments, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        experiments += [e.experiment_id for e in page]
        token = page.token
        if not token:
            break
    found = []
    for start in range(0, len(experiments), 100):  # a bounded number per query
        token = None
        while True:
            page = client.search_runs(
                experiments[start : start + 100],
                filter_string=f"attributes.status = 'RUNNING' and tags.`gpucnn.host` = '{host}'",
                max_results=1000,
                page_token=token,
            )
            found += list(page)
            token = page.token
            if not token:
                break
    return found


def mark_dead_runs(found_by: str) -> list[tuple[str, str | None]]:
    """Mark FAILED every RUNNING run of the active store whose process, on this host, no
    longer exists (killed with SIGKILL, out of memory, a power cut): a tag says so and
    names its last checkpoint. Runs of other hosts are never touched. Returns (run id,
    its last checkpoint or None) for each run marked."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    client = MlflowClient()
    me = this_process()
    marked = []
    for run in _running_runs_of(client, me.host):
        owner = ProcessIdentity.from_tags(run.data.tags)
        if owner is None or not owner.same_machine(me) or is_alive(owner):
            continue
        checkpoint = run.data.tags.get(CHECKPOINT_TAG)
        what = (
            f"its process {owner.pid} on {owner.host} ended without a word (SIGKILL, out of "
            f"memory or a power cut); found by {found_by}; last checkpoint: "
            + (checkpoint or "none")
        )
        with deferred_interrupt():
            client.set_tag(run.info.run_id, "gpucnn.error", what[:5000])
            client.set_tag(run.info.run_id, RESUMABLE_TAG, "true" if checkpoint else "false")
            client.set_terminated(run.info.run_id, "FAILED")
        marked.append((run.info.run_id, checkpoint))
    return marked


def _now_ms() -> int:
    return int(time.time() * 1000)
