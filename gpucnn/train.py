"""``python -m gpucnn.train``: train with Hydra configs, track every run in MLflow.

    python -m gpucnn.train experiment=digits
    python -m gpucnn.train experiment=digits optimizer.lr=0.01 trainer.epochs=5
    python -m gpucnn.train -m experiment=digits optimizer.lr=0.001,0.01   # a sweep

Everything that can be wrong with the input (config values, data path, model shapes,
backend) is checked before an MLflow run is created. A run always ends FINISHED, FAILED
(with the error as the tag ``gpucnn.error``) or KILLED (Ctrl-C).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gpucnn.array.backend import BackendUnavailableError, get_backend, to_host
from gpucnn.array.threads import settings as cpu_settings
from gpucnn.config import (
    build_model,
    build_optimizer,
    check_known_keys,
    register_configs,
    to_containers,
)
from gpucnn.data import DataError, Dataset, load_data
from gpucnn.fit import DivergedError, check_trainer_settings, fit
from gpucnn.interrupts import deferred_interrupt, sticky_interrupts
from gpucnn.nn.model import save_checkpoint
from gpucnn.tracking.mlflow_store import (
    PARENT_RUN_ENV,
    PARENT_RUN_FILE,
    MlflowTracker,
    ensure_experiment,
    flatten_params,
    git_commit,
    resolve_store,
    ui_command,
)
from gpucnn.tracking.tracker import confusion_image

# The package's conf/ (a symlink to the top-level conf/ in a checkout; real files in an
# installed wheel). Not resolved, so the path stays inside the package either way.
CONF_DIR = str(Path(__file__).absolute().parent / "conf")
USER_ERRORS = (ValueError, DataError, FileNotFoundError, BackendUnavailableError, DivergedError)

register_configs()


def prepare(cfg: dict[str, Any]) -> tuple[Any, Dataset, Any, Any]:
    """Backend, data, model and optimizer, or a clear error: nothing is logged yet."""
    check_known_keys(cfg)
    check_trainer_settings(cfg["trainer"])
    cpu_settings()  # GPUCNN_THREADS and the like are read (and checked) now, not mid-run
    backend = get_backend(cfg["backend"])
    dataset = load_data(cfg["data"])
    trainer = cfg["trainer"]
    model = build_model(
        cfg["model"], dataset.input_shape, backend, trainer["dtype"], trainer["seed"], trainer["l2"]
    )
    if cfg["model"]["head"] == "logistic" and dataset.num_classes != 2:
        raise ValueError(
            f"model {cfg['model']['name']!r} has a logistic (binary) head but data "
            f"{dataset.name!r} has {dataset.num_classes} classes; set data.positive_class=K "
            "for one-vs-rest labels, or use a softmax model"
        )
    if cfg["model"]["head"] == "softmax" and model.output_shape[0] < dataset.num_classes:
        raise ValueError(
            f"model {cfg['model']['name']!r} has {model.output_shape[0]} outputs but data "
            f"{dataset.name!r} has {dataset.num_classes} classes"
        )
    return backend, dataset, model, build_optimizer(cfg["optimizer"])


def parent_run_id(hydra_cfg: Any) -> str | None:
    """The sweep's parent run, when this job is part of a multirun."""
    if os.environ.get(PARENT_RUN_ENV):
        return os.environ[PARENT_RUN_ENV]
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        marker = Path(hydra_cfg.sweep.dir) / PARENT_RUN_FILE
        if marker.is_file():
            return marker.read_text().strip()
    return None


def run(cfg: DictConfig) -> float:
    """One training job: check everything, then one MLflow run from start to end."""
    import mlflow  # noqa: PLC0415

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    config = to_containers(cfg)
    backend, dataset, model, optimizer = prepare(config)
    uri, artifacts = resolve_store(config["tracking"]["uri"], hydra_cfg.runtime.cwd)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(config["tracking"]["experiment"], artifacts)
    active = _start_run(mlflow, experiment_id, config, hydra_cfg, backend)
    with active:
        run_id = active.info.run_id
        try:
            tracker = MlflowTracker(run_id)
            _log_inputs(tracker, cfg, config, dataset, model, output_dir)
            trainer = config["trainer"]
            result = fit(
                model,
                optimizer,
                dataset,
                epochs=trainer["epochs"],
                batch_size=trainer["batch_size"],
                seed=trainer["seed"],
                log_every=trainer["log_every"],
                kernels_every=trainer["kernels_every"],
                tracker=tracker,
            )
            checkpoint = _log_outputs(tracker, model, optimizer, result, output_dir)
        except KeyboardInterrupt:
            _mark_killed(mlflow)
            raise
        except BaseException as err:
            with deferred_interrupt():
                mlflow.set_tag("gpucnn.error", f"{type(err).__name__}: {err}"[:5000])
            raise
    summary(run_id, config, result, dataset.sizes(), checkpoint, uri, backend.name)
    return result.test["test_accuracy"]


def _start_run(
    mlflow: Any, experiment_id: str, config: dict[str, Any], hydra_cfg: Any, backend: Any
) -> Any:
    """The job's MLflow run (a child of the sweep's parent run in a multirun), tagged with
    the backend, device, overrides and git commit. Ctrl-C while it starts marks it KILLED."""
    tags = {
        "gpucnn.backend": backend.name,
        "gpucnn.device": backend.device_name(),
        "gpucnn.overrides": " ".join(hydra_cfg.overrides.task),
    }
    commit = git_commit(hydra_cfg.runtime.cwd)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        with deferred_interrupt():  # Ctrl-C here comes after the run exists: mark it
            return mlflow.start_run(
                experiment_id=experiment_id,
                run_name=config["tracking"]["run_name"],
                parent_run_id=parent_run_id(hydra_cfg),
                tags=tags,
            )
    except KeyboardInterrupt:
        _mark_killed(mlflow)
        raise


def _log_inputs(
    tracker: MlflowTracker,
    cfg: DictConfig,
    config: dict[str, Any],
    dataset: Dataset,
    model: Any,
    output_dir: Path,
) -> None:
    """Parameters (the flattened config, split sizes, model size) and the resolved
    config.yaml, from which evaluate rebuilds the run's data."""
    sizes = dataset.sizes()
    tracker.log_params(
        {
            **flatten_params(config),
            **{f"data.{k}_size": v for k, v in sizes.items()},
            "model.num_params": model.num_params(),
            "data.num_classes": dataset.num_classes,
        }
    )
    config_path = output_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_file(config_path)


def _log_outputs(
    tracker: MlflowTracker, model: Any, optimizer: Any, result: Any, output_dir: Path
) -> Path:
    """The confusion matrix (picture and CSV), each conv layer's kernels as .npy, and the
    checkpoint; returns the checkpoint's path."""
    confusion = np.array(result.confusion)
    tracker.log_image("confusion_matrix", confusion_image(confusion), step=result.steps)
    np.savetxt(output_dir / "confusion_matrix.csv", confusion, fmt="%d", delimiter=",")
    tracker.log_file(output_dir / "confusion_matrix.csv")
    for layer in model.layers:
        if layer.type == "conv":
            tracker.log_array(f"{layer.name}.npy", to_host(layer.params["weight"]))
    checkpoint = save_checkpoint(output_dir / "model.npz", model, optimizer)
    tracker.log_file(checkpoint, "checkpoint")
    return checkpoint


def _mark_killed(mlflow: Any) -> None:
    """End the active run (if any) as KILLED, not to be cut short by a second Ctrl-C."""
    with deferred_interrupt():
        mlflow.end_run("KILLED")


def summary(
    run_id: str,
    config: dict[str, Any],
    result: Any,
    sizes: dict[str, int],
    checkpoint: Path,
    uri: str,
    backend: str,
) -> None:
    test = "  ".join(f"{k} {v:.4f}" for k, v in result.test.items())
    print(
        f"\ngpucnn: run {run_id} FINISHED  (experiment {config['tracking']['experiment']!r}, "
        f"backend {backend})\n"
        f"  {test}  on {sizes['test']} test images\n"
        f"  {result.images_per_second:,.0f} images/s over {result.steps} steps\n"
        f"  checkpoint: {checkpoint}\n"
        f"  compare runs in the MLflow UI:\n    {ui_command(uri)}\n",
        flush=True,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    started = time.perf_counter()
    try:
        with sticky_interrupts():
            return run(cfg)
    except USER_ERRORS as err:
        print(f"gpucnn.train: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            f"gpucnn.train: interrupted after {time.perf_counter() - started:.1f} s; "
            "the run is marked KILLED",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
