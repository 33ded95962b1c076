"""Experiment tracking at the edge: a small Tracker interface for the training loop, and
its MLflow implementation. The core never imports MLflow; only this module does.

Default store: a SQLite database and an artifact folder under ``runs/`` of the directory
the user launched from, created on first use. ``tracking.uri`` or ``MLFLOW_TRACKING_URI``
points elsewhere (e.g. an ``http://`` tracking server).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

PARENT_RUN_ENV = "GPUCNN_PARENT_RUN_ID"
PARENT_RUN_FILE = "mlflow_parent_run_id"
METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt.

    A store write cut in half can leave SQLite locked by the interrupted transaction, and
    then marking the run KILLED fails with "database is locked". Off the main thread,
    where Python delivers no signals, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    sticky = signal.getsignal(signal.SIGINT) is _remember_and_raise

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)
        if sticky:  # inside sticky_interrupts(): remember it there too
            _INTERRUPTED[0] = True

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if received:
            raise KeyboardInterrupt


_INTERRUPTED = [False]  # Ctrl-C arrived inside sticky_interrupts()


def _remember_and_raise(signum: int, frame: Any) -> None:
    _INTERRUPTED[0] = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def sticky_interrupts() -> Iterator[None]:
    """Make Ctrl-C impossible to lose inside the block: see :func:`raise_if_interrupted`.

    Python raises KeyboardInterrupt wherever the main thread is when the signal arrives.
    If that is inside a weakref callback or a ``__del__`` (SQLAlchemy's, during garbage
    collection, say), the exception is printed as "Exception ignored" and dropped, and
    training would go on. Within this block the signal is also remembered.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _remember_and_raise)
    _INTERRUPTED[0] = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        _INTERRUPTED[0] = False


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C arrived in :func:`sticky_interrupts` (the
    training loop asks once per step, in case the first one was dropped)."""
    if _INTERRUPTED[0]:
        raise KeyboardInterrupt


def _whole(method: F) -> F:
    """Run a store write with Ctrl-C held (see :func:`deferred_interrupt`)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with deferred_interrupt():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Tracker:
    """What the training loop reports to. The base class records nothing."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_metric_history(self, key: str, values: list[float], first_step: int) -> None: ...

    def log_image(self, key: str, image: np.ndarray, step: int) -> None: ...

    def log_array(self, name: str, array: np.ndarray) -> None: ...

    def log_file(self, path: str | Path, folder: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def flush(self) -> None: ...


# -- images -----------------------------------------------------------------------------
def kernel_grid(
    weight: np.ndarray, scale: int = 16, gap: int = 1, max_width: int = 1024
) -> np.ndarray:
    """(P, C, KH, KW) kernels -> one uint8 grayscale image.

    Single-channel kernels are laid out in a near-square grid; with several input
    channels each kernel is a row and each channel a column. Every tile is scaled to its
    own [min, max] and enlarged (nearest neighbour, at most ``scale`` times and so that the
    image stays within ``max_width`` pixels) so that single weights stay visible.
    """
    p, c, kh, kw = weight.shape
    tiles = weight.reshape(p * c, kh, kw)
    if c == 1:
        cols = int(np.ceil(np.sqrt(p)))
        rows = int(np.ceil(p / cols))
    else:
        rows, cols = p, c
    scale = max(1, min(scale, (max_width - gap) // (cols * (kw + gap)), 256 // max(kh, kw, 1)))
    tile_h, tile_w = kh * scale, kw * scale
    grid = np.full((rows * (tile_h + gap) + gap, cols * (tile_w + gap) + gap), 255, np.uint8)
    for index, tile in enumerate(tiles.astype(np.float64)):
        row, col = divmod(index, cols)
        span = tile.max() - tile.min()
        tile = (tile - tile.min()) / span if span > 0 else np.full_like(tile, 0.5)
        top, left = gap + row * (tile_h + gap), gap + col * (tile_w + gap)
        grid[top : top + tile_h, left : left + tile_w] = (
            (np.kron(tile, np.ones((scale, scale))) * 255).round().astype(np.uint8)
        )
    return grid


def confusion_image(confusion: np.ndarray, cell: int = 36) -> np.ndarray:
    """A confusion matrix as an RGB heat map with the counts written in (rows: true
    class, columns: predicted)."""
    from PIL import Image, ImageDraw  # noqa: PLC0415 - only needed when logging images

    k = confusion.shape[0]
    margin = cell
    size = (margin + k * cell, margin + k * cell)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    for t in range(k):
        draw.text((4, margin + t * cell + cell // 3), str(t), fill="black")
        draw.text((margin + t * cell + cell // 3, 4), str(t), fill="black")
        for p in range(k):
            shade = int(255 * (1 - rows[t, p]))
            box = (
                margin + p * cell,
                margin + t * cell,
                margin + (p + 1) * cell - 1,
                margin + (t + 1) * cell - 1,
            )
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text(
                (box[0] + 4, box[1] + cell // 3),
                str(int(confusion[t, p])),
                fill="white" if rows[t, p] > 0.5 else "black",
            )
    return np.asarray(image)


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
        if create:
            (Path(base_dir) / "runs").mkdir(parents=True, exist_ok=True)
    database = sqlite_file(uri)
    if not create and database is not None and not database.is_file():
        raise ValueError(
            f"no MLflow store at {uri}: {str(database)!r} does not exist (run from the "
            "directory you trained in, or give the store: --tracking-uri or MLFLOW_TRACKING_URI)"
        )
    return uri, artifacts


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the current directory when
    the path is), else None."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix) :])


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
    return f"{sys.executable} -m mlflow ui --backend-store-uri '{uri}' --host 127.0.0.1 --port 5000"


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

    @_whole
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # noqa: PLC0415

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        stamp = _now_ms()
        self._pending += [Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()]
        if len(self._pending) >= METRICS_PER_BATCH:
            self.flush()

    def log_metric_history(self, key: str, values: list[float], first_step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        stamp = _now_ms()
        self._pending += [
            Metric(key, float(v), stamp, first_step + i) for i, v in enumerate(values)
        ]
        if len(self._pending) >= METRICS_PER_BATCH:
            self.flush()

    @_whole
    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = (
                self._pending[:METRICS_PER_BATCH],
                self._pending[METRICS_PER_BATCH:],
            )
            self.client.log_batch(self.run_id, metrics=chunk)

    @_whole
    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        import mlflow  # noqa: PLC0415

        mlflow.log_image(image, key=key, step=int(step), synchronous=True)

    @_whole
    def log_array(self, name: str, array: np.ndarray) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            np.save(path, array, allow_pickle=False)
            self.client.log_artifact(self.run_id, str(path), "kernels")

    @_whole
    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    @_whole
    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value)[:5000])


def _now_ms() -> int:
    import time  # noqa: PLC0415

    return int(time.time() * 1000)
