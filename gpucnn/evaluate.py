"""``python -m gpucnn.evaluate``: test metrics of a trained model.

    python -m gpucnn.evaluate --run-id 3f2a...            # a run in the MLflow store
    python -m gpucnn.evaluate --checkpoint runs/hydra/.../model.npz

The data (and its split and normalisation) are rebuilt from the run's resolved
``config.yaml``: the artifact of the run, or the file beside the checkpoint (or
``--config``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from gpucnn.array.backend import BackendUnavailableError, get_backend
from gpucnn.data import DataError, load_data
from gpucnn.fit import evaluate
from gpucnn.nn.checkpoint import read_checkpoint
from gpucnn.nn.model import load_checkpoint
from gpucnn.tracking.mlflow_store import mark_dead_runs, resolve_store, store_error

SPLITS = ("train", "val", "test")


def read_config(path: Path, checkpoint: Path) -> dict[str, Any]:
    """The run's config: the YAML at ``path``, else the one a training checkpoint holds.
    Malformed or incomplete, it is a one-line ValueError naming the file."""
    if not path.is_file():
        progress = read_checkpoint(checkpoint).progress
        if progress is not None and isinstance(progress.extra.get("config"), dict):
            return _checked_config(progress.extra["config"], str(checkpoint))
        raise FileNotFoundError(f"config {str(path)!r} does not exist; pass --config")
    from omegaconf import OmegaConf  # noqa: PLC0415

    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # YAML syntax, interpolation: whatever it is, say where
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"config {str(path)!r} is not a readable config: {problem}") from None
    return _checked_config(config, str(path))


def _checked_config(config: Any, where: str) -> dict[str, Any]:
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError(
            f"config {where!r} is incomplete: it needs a data section with data.name "
            "(the config.yaml that gpucnn.train wrote beside the checkpoint)"
        )
    return config


def _download(run_id: str, uri: str | None, into: Path) -> tuple[Path, Path]:
    import mlflow  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    tracking_uri, _ = resolve_store(uri, Path.cwd(), create=False)
    mlflow.set_tracking_uri(tracking_uri)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # output stays ours
    for dead, _ in mark_dead_runs(f"gpucnn.evaluate (pid {os.getpid()})"):
        print(f"gpucnn: run {dead}'s process no longer exists; marked FAILED", file=sys.stderr)
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"run {run_id!r} was not found in {tracking_uri}") from err
    try:
        checkpoint = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="checkpoint/model.npz", dst_path=str(into)
        )
        config = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.yaml", dst_path=str(into)
        )
    except (MlflowException, OSError) as err:
        raise ValueError(
            f"run {run_id!r} has no checkpoint/model.npz and config.yaml (did it finish?): {err}"
        ) from err
    return Path(checkpoint), Path(config)


def evaluate_checkpoint(
    checkpoint: Path, config_path: Path, backend: str = "numpy", split: str = "test"
) -> dict[str, Any]:
    model, _ = load_checkpoint(checkpoint, backend=get_backend(backend))  # checked first
    config = read_config(config_path, checkpoint)
    dataset = load_data(config["data"])
    if dataset.input_shape != model.input_shape:
        raise ValueError(
            f"checkpoint takes input {model.input_shape} but the data gives {dataset.input_shape}"
        )
    x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
    if len(y) == 0:
        hint = " (trained with data.val_fraction=0)" if split == "val" else ""
        others = " or ".join(name for name in SPLITS if name != split)
        raise ValueError(f"the run's {split} split has no images{hint}; choose --split {others}")
    metrics = evaluate(model, x, y, data=dataset)
    return {
        "split": split,
        "images": len(y),
        "loss": metrics["loss"],
        "accuracy": metrics["accuracy"],
        "confusion": metrics["confusion"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpucnn.evaluate", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="an MLflow run id")
    source.add_argument("--checkpoint", help="a model .npz written by gpucnn.train")
    parser.add_argument("--config", help="the run's config.yaml (default: beside the checkpoint)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: as gpucnn.train)")
    parser.add_argument("--backend", default="numpy", choices=["auto", "numpy", "cupy"])
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.run_id:
                checkpoint, config = _download(args.run_id, args.tracking_uri, Path(tmp))
            else:
                checkpoint = Path(args.checkpoint)
                config = Path(args.config) if args.config else checkpoint.parent / "config.yaml"
            result = evaluate_checkpoint(checkpoint, config, args.backend, args.split)
    except (ValueError, DataError, FileNotFoundError, BackendUnavailableError) as err:
        print(f"gpucnn.evaluate: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a SQLite store that failed: one line too
        problem = store_error(err)
        if problem is None:
            raise
        print(f"gpucnn.evaluate: error: {problem}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['split']}: accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  "
            f"({result['images']} images)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
