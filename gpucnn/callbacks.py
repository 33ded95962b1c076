"""Hydra callbacks (edge code): group the MLflow runs of one multirun under a parent run."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from gpucnn.tracking.liveness import this_process
from gpucnn.tracking.mlflow_store import (
    PARENT_RUN_ENV,
    PARENT_RUN_FILE,
    SWEPT_KEYS_TAG,
    ensure_experiment,
    resolve_store,
)


def swept_keys(overrides: list[str], sweeper: Any = None) -> list[str]:
    """The keys a sweep varies: command-line sweeps (``a=1,2``, ``b=range(3)``, ...) and
    the search space a sweeper is configured with (``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    keys = [
        override.get_key_element()
        for override in OverridesParser.create().parse_overrides(overrides)
        if override.is_sweep_override()
    ]
    params = sweeper.get("params") if sweeper is not None else None
    for key in params or {}:
        if key not in keys:
            keys.append(str(key))
    return keys


class MlflowSweepCallback(Callback):
    """Hydra callback: one parent MLflow run per multirun; each job's run is its child.

    The parent's id reaches the jobs through an environment variable (inherited by
    parallel workers) and a file in the sweep directory. The parent is marked FINISHED
    at the end of the sweep, or FAILED if the process exits before that.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        import mlflow  # noqa: PLC0415

        # HydraConfig is not set yet at this point; the config carries the hydra node, and
        # Hydra shares its resolver cache with the jobs, so ${now:...} resolves the same.
        hydra_cfg = config.hydra
        sweeper = str(hydra_cfg.sweeper.get("_target_", ""))
        if "optuna" in sweeper.lower() and not config.data.get("val_fraction"):
            # The jobs would refuse one by one; the search is refused before it starts.
            print(
                f"gpucnn.train: error: a search (hydra/sweeper=optuna) maximises the "
                f"validation accuracy, but data.val_fraction={config.data.get('val_fraction')!r} "
                "leaves no validation split; give it one (0 < data.val_fraction < 1): the test "
                "split is never tuned on",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(2)
        uri, artifacts = resolve_store(config.tracking.uri, os.getcwd())
        mlflow.set_tracking_uri(uri)
        experiment_id = ensure_experiment(config.tracking.experiment, artifacts)
        sweep_dir = Path(hydra_cfg.sweep.dir)
        swept = swept_keys(list(hydra_cfg.overrides.task), hydra_cfg.get("sweeper"))
        run = mlflow.MlflowClient().create_run(
            experiment_id,
            run_name=f"sweep {sweep_dir.name}",
            tags={
                "gpucnn.sweep": "parent",
                "gpucnn.sweep_dir": str(sweep_dir),
                "gpucnn.overrides": " ".join(hydra_cfg.overrides.task),
                # the columns to compare the children by; each child is named after them
                SWEPT_KEYS_TAG: " ".join(swept),
                **this_process().as_tags(),  # a sweep whose launcher dies is found too
            },
        )
        self.parent_run_id = run.info.run_id
        self.uri = uri
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(self.parent_run_id)
        atexit.register(self._close, "FAILED")

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        self._record_best(Path(config.hydra.sweep.dir) / "optimization_results.yaml")
        self._close("FINISHED")

    def _record_best(self, results: Path) -> None:
        """A search's result (the Optuna sweeper's optimization_results.yaml): said on
        stdout and kept on the parent run, as tags and the file itself."""
        run_id = getattr(self, "parent_run_id", None)
        if not run_id or not results.is_file():
            return
        import mlflow  # noqa: PLC0415
        from omegaconf import OmegaConf  # noqa: PLC0415

        found = OmegaConf.to_container(OmegaConf.load(results))
        overrides = " ".join(f"{k}={v}" for k, v in found.get("best_params", {}).items())
        value = found.get("best_value")
        client = mlflow.MlflowClient(tracking_uri=self.uri)
        client.set_tag(run_id, "gpucnn.best_value", str(value))
        client.set_tag(run_id, "gpucnn.best_overrides", overrides)
        client.log_artifact(run_id, str(results))
        print(f"gpucnn: best validation accuracy {value} with: {overrides}", flush=True)

    def _close(self, status: str) -> None:
        import mlflow  # noqa: PLC0415

        run_id = getattr(self, "parent_run_id", None)
        if not run_id:
            return
        client = mlflow.MlflowClient(tracking_uri=self.uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
        os.environ.pop(PARENT_RUN_ENV, None)
        self.parent_run_id = None
