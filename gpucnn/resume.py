"""``python -m gpucnn.train resume=RUN_ID`` (or ``resume=PATH`` to a checkpoint): what to go
on from, and which overrides a resumed run accepts.

A resumed run keeps its config: the checkpoint carries it. Only what cannot change the
result may be given again: ``trainer.epochs`` (to train longer), ``tracking.*``, where
the data is found (``data.path``; the data must still be the same, by its digest) and
``backend`` (then the run goes on, but not bit for bit). Anything else that differs from
the run's config is refused in one line naming it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpucnn.nn.checkpoint import Progress, read_checkpoint

ALLOWED = ("trainer.epochs", "tracking.", "data.path", "backend")
GROUPS = ("model", "data", "optimizer", "trainer", "experiment", "tracking")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Resumption:
    """What a resumed run starts from."""

    config: dict[str, Any]  # the run's config, with the allowed overrides applied
    progress: Progress
    checkpoint: Path  # a local copy of the checkpoint file
    run_id: str | None  # the MLflow run to continue; None: start a new one
    notes: list[str] = field(default_factory=list)  # to print before training


def find_checkpoint(target: str, into: Path) -> tuple[Path, str | None]:
    """(local checkpoint file, run id) for ``resume=target``: a checkpoint file, or the
    id of a run in the active MLflow store that can be continued."""
    path = Path(target).expanduser()
    if path.is_file():
        return path, None
    if not RUN_ID.match(target):
        raise ValueError(
            f"resume={target!r} is neither a checkpoint file nor a run id "
            "(32 hexadecimal characters)"
        )
    import mlflow  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    client = mlflow.MlflowClient()
    try:
        run = client.get_run(target)
    except MlflowException:
        raise ValueError(
            f"resume={target}: no run with that id in {mlflow.get_tracking_uri()}"
        ) from None
    status = run.info.status
    if status == "FINISHED":
        raise ValueError(
            f"resume={target}: the run FINISHED; there is nothing to go on with "
            "(start a new run to train more)"
        )
    if status == "RUNNING":
        raise ValueError(
            f"resume={target}: the run is still RUNNING in another process "
            f"(pid {run.data.tags.get('gpucnn.pid', '?')} on "
            f"{run.data.tags.get('gpucnn.host', '?')}); stop it first"
        )
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=target, artifact_path="checkpoint/model.npz", dst_path=str(into)
        )
    except (MlflowException, OSError):
        raise ValueError(
            f"resume={target}: the run ({status}) has no checkpoint to go on from; it "
            "stopped before its first one"
        ) from None
    return Path(local), target


def prepare_resumption(
    target: str, overrides: list[str], composed: dict[str, Any], into: Path
) -> Resumption:
    """The run to go on with, its config and progress, or a one-line ValueError.

    ``overrides`` are the command line's (``key=value``), ``composed`` the config Hydra
    built from them (it gives each override's value, typed)."""
    path, run_id = find_checkpoint(target, into)
    checkpoint = read_checkpoint(path)
    progress = checkpoint.progress
    if progress is None or "config" not in progress.extra:
        raise ValueError(
            f"resume: checkpoint {str(path)!r} holds no training progress (written by "
            "save_checkpoint, or before runs could be resumed); only gpucnn.train's can"
        )
    config = copy.deepcopy(progress.extra["config"])
    if checkpoint.architecture.get("layers") is None:
        raise checkpoint.damaged("its architecture lists no layers")
    notes = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "resume":
            continue
        if key in GROUPS or key.startswith("hydra"):
            raise ValueError(
                f"resume: {override!r} cannot be given: a resumed run keeps its config "
                f"(allowed: {', '.join(a + '*' if a.endswith('.') else a for a in ALLOWED)})"
            )
        new, old = _lookup(composed, key), _lookup(config, key)
        if any(key == a or (a.endswith(".") and key.startswith(a)) for a in ALLOWED):
            if key == "backend" and new != old:
                notes.append(
                    f"gpucnn: backend {old} -> {new}: the run goes on, but no longer bit "
                    "for bit as if it had never stopped"
                )
            _assign(config, key, new)
        elif new != old:
            raise ValueError(
                f"resume: {key} cannot change when a run goes on (the run has {_shown(old)}, "
                f"the override gives {_shown(new)}); allowed: trainer.epochs, tracking.*, "
                "data.path, backend"
            )
    _check_epochs(config["trainer"]["epochs"], progress)
    config["resume"] = None
    return Resumption(config, progress, path, run_id or progress.extra.get("run_id"), notes)


def _check_epochs(epochs: Any, progress: Progress) -> None:
    done = progress.epoch + (1 if progress.batch else 0)  # a part-done epoch must finish
    if isinstance(epochs, int) and epochs < done:
        raise ValueError(
            f"resume: trainer.epochs={epochs} but the run is {progress.epoch} epochs and "
            f"{progress.batch} batches in; give trainer.epochs >= {done}"
        )


_MISSING = object()


def _shown(value: Any) -> str:
    return "no such key" if value is _MISSING else repr(value)


def _lookup(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _assign(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
