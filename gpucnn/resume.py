"""``python -m gpucnn.train resume=RUN_ID`` (or ``resume=PATH`` to a checkpoint): what to go
on from, and which overrides a resumed run accepts.

A resumed run keeps its config: the checkpoint carries it. Only what cannot change the
result may be given again: ``trainer.epochs`` (to train longer), how often it writes
checkpoints, logs and kernel images, ``tracking.*`` but the experiment, where the data
is found (``data.path``; the data must still be the same, by its digest) and
``backend`` (then the run goes on, but not bit for bit). Anything else that differs from
the run's config is refused in one line naming it.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpucnn.nn.checkpoint import Progress, read_checkpoint
from gpucnn.tracking.mlflow_store import CHECKPOINT_TAG

# What a resumed run may be given again: none of it changes what it computes.
ALLOWED = (
    "trainer.epochs",
    "trainer.checkpoint_every",
    "trainer.log_every",
    "trainer.kernels_every",
    "tracking.",
    "data.path",
    "data.cache_dir",
    "data.url",
    "data.download",
    "backend",
    "distributed",
)
ALLOWED_TEXT = (
    "trainer.epochs, trainer.checkpoint_every, trainer.log_every, trainer.kernels_every, "
    "tracking.*, data.path, data.cache_dir, data.url, data.download, backend, distributed"
)
GROUPS = ("model", "data", "optimizer", "trainer", "experiment", "tracking")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Resumption:
    """What a resumed run starts from."""

    config: dict[str, Any]  # the run's config, with the allowed overrides applied
    progress: Progress
    checkpoint: Path  # a local copy of the checkpoint file
    run_id: str | None  # the MLflow run to continue; None: start a new one
    checkpoint_bytes: bytes | None = None  # the file's bytes, for the other MPI ranks


def is_run_id(target: str) -> bool:
    """True for a run id, False for a checkpoint file; anything else is a ValueError."""
    if Path(target).expanduser().is_file():
        return False
    if not RUN_ID.match(target):
        raise ValueError(
            f"resume={target!r} is neither a checkpoint file nor a run id "
            "(32 hexadecimal characters)"
        )
    return True


def find_checkpoint(target: str, into: Path) -> tuple[Path, str | None]:
    """(local checkpoint file, run id) for ``resume=target``: a checkpoint file, or the
    id of a run in the active MLflow store that can be continued (its checkpoint is
    downloaded into ``into``)."""
    if not is_run_id(target):
        return Path(target).expanduser(), None
    import mlflow  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    run = stored_run(target)
    if run is None:
        raise ValueError(f"resume={target}: no run with that id in {mlflow.get_tracking_uri()}")
    _check_can_go_on(run, f"resume={target}")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # errors stay one line
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=target, artifact_path="checkpoint/model.npz", dst_path=str(into)
        )
    except (MlflowException, OSError):
        raise ValueError(
            f"resume={target}: the run ({run.info.status}) has no checkpoint to go on from; "
            "it stopped before its first one"
        ) from None
    return Path(local), target


def stored_run(run_id: str) -> Any:
    """The run with this id in the active store, or None."""
    import mlflow  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None


def _check_can_go_on(run: Any, what: str) -> None:
    """A FINISHED run, or one still RUNNING, cannot be continued."""
    if run.info.status == "FINISHED":
        raise ValueError(
            f"{what}: the run FINISHED; there is nothing to go on with (start a new run "
            "to train more)"
        )
    if run.info.status == "RUNNING":
        tags = run.data.tags
        raise ValueError(
            f"{what}: the run is still RUNNING (pid {tags.get('gpucnn.pid', '?')} on "
            f"{tags.get('gpucnn.host', '?')}); stop it first, or wait for the next start on "
            "that host to mark it FAILED if its process is gone"
        )


def _check_not_behind(run: Any, progress: Progress, path: Path) -> None:
    """A checkpoint file older than the run's last one would roll the run back."""
    latest = re.search(r"after epoch (\d+), step (\d+)", run.data.tags.get(CHECKPOINT_TAG, ""))
    if latest and int(latest.group(2)) > progress.step:
        raise ValueError(
            f"resume: checkpoint {str(path)!r} is at step {progress.step} but its run went "
            f"on to step {latest.group(2)}; go on from the run's last checkpoint "
            f"(resume={run.info.run_id})"
        )


def prepare_resumption(
    target: str, overrides: list[str], composed: dict[str, Any], into: Path, store: bool = True
) -> Resumption:
    """The run to go on with, its config and progress, or a one-line ValueError.

    ``overrides`` are the command line's (``key=value``), ``composed`` the config Hydra
    built from them (it gives each override's value, typed). ``store=False``: there is
    no store yet (a checkpoint file's run is then not in it)."""
    path, run_id = find_checkpoint(target, into)
    checkpoint = read_checkpoint(path)
    progress = checkpoint.progress
    if progress is None or "config" not in progress.extra:
        raise ValueError(
            f"resume: checkpoint {str(path)!r} holds no training progress (written by "
            "save_checkpoint, or before runs could be resumed); only gpucnn.train's can"
        )
    if store and run_id is None and progress.extra.get("run_id"):  # a file: its stored run
        run = stored_run(progress.extra["run_id"])
        if run is not None:
            _check_can_go_on(run, f"resume={target} (run {run.info.run_id})")
            _check_not_behind(run, progress, path)
            run_id = run.info.run_id
    from omegaconf import OmegaConf  # noqa: PLC0415 - the edge: Hydra's config library

    config = OmegaConf.create(copy.deepcopy(progress.extra["config"]))
    given = OmegaConf.create(composed)
    if checkpoint.architecture.get("layers") is None:
        raise checkpoint.damaged("its architecture lists no layers")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "resume":
            continue
        if key in GROUPS or key.startswith("hydra"):
            raise ValueError(
                f"resume: {override!r} cannot be given: a resumed run keeps its config "
                f"(allowed: {ALLOWED_TEXT})"
            )
        new = OmegaConf.select(given, key, default=_MISSING)
        old = OmegaConf.select(config, key, default=_MISSING)
        if key == "tracking.experiment" and new != old:
            raise ValueError(
                f"resume: tracking.experiment cannot change: a run stays in its experiment "
                f"({old!r})"
            )
        if any(key == a or (a.endswith(".") and key.startswith(a)) for a in ALLOWED):
            OmegaConf.update(config, key, new, merge=False)
        elif new != old:
            raise ValueError(
                f"resume: {key} cannot change when a run goes on (the run has {_shown(old)}, "
                f"the override gives {_shown(new)}); allowed: {ALLOWED_TEXT}"
            )
    config.resume = None
    plain = OmegaConf.to_container(config)
    _check_epochs(plain["trainer"]["epochs"], progress)
    return Resumption(plain, progress, path, run_id)


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
