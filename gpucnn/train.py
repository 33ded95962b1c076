"""``python -m gpucnn.train``: train with Hydra configs, track every run in MLflow.

    python -m gpucnn.train experiment=digits
    python -m gpucnn.train experiment=digits optimizer.lr=0.01 trainer.epochs=5
    python -m gpucnn.train -m experiment=digits optimizer.lr=0.001,0.01   # a sweep

    python -m gpucnn.train resume=<run id>                                 # go on with a run

Everything that can be wrong with the input (config values, data path, model shapes,
backend) is checked before an MLflow run is created. A run always ends FINISHED, FAILED
(with the error as the tag ``gpucnn.error``) or KILLED (Ctrl-C, or SIGTERM: then at a
step boundary, with a checkpoint to resume from). A run whose process died without a
word is marked FAILED by the next gpucnn.train or gpucnn.evaluate on the same host.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gpucnn.array.backend import BackendUnavailableError, get_backend, to_host
from gpucnn.array.threads import configured as cpu_configured
from gpucnn.array.threads import settings as cpu_settings
from gpucnn.config import (
    build_model,
    build_optimizer,
    check_known_keys,
    register_configs,
    to_containers,
)
from gpucnn.data import DataError, Dataset, load_data
from gpucnn.data.sources import DownloadStopped
from gpucnn.fit import Checkpoints, DivergedError, TrainingStopped, check_trainer_settings, fit
from gpucnn.interrupts import (
    deferred_interrupt,
    sticky_interrupts,
    stop_on_signals,
    stop_requested,
)
from gpucnn.nn.checkpoint import read_checkpoint
from gpucnn.nn.model import load_checkpoint
from gpucnn.parallel.mpi import MpiSplit, RankFailed, World
from gpucnn.parallel.split import BatchSplit
from gpucnn.resume import Resumption, is_run_id, prepare_resumption, stored_run
from gpucnn.tracking.liveness import this_process
from gpucnn.tracking.mlflow_store import (
    CHECKPOINT_TAG,
    PARENT_RUN_ENV,
    PARENT_RUN_FILE,
    RESUMABLE_TAG,
    SWEPT_KEYS_TAG,
    MlflowTracker,
    ensure_experiment,
    flatten_params,
    git_commit,
    mark_dead_runs,
    resolve_store,
    store_error,
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


def run(cfg: DictConfig, world: Any = None) -> float:
    """One training job: check everything, then one MLflow run from start to end (or a
    stopped run continued, with ``resume=``). With ``world`` (distributed=mpi), this is
    rank 0: the only rank that talks to MLflow."""
    import mlflow  # noqa: PLC0415

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    config = to_containers(cfg)
    launch_dir = hydra_cfg.runtime.cwd
    resumption = None
    if config.get("resume") == "":  # resume=$RUN with $RUN unset: not a fresh run
        raise ValueError("resume= is empty; give a run id or a checkpoint file")
    _check_search(config, hydra_cfg)
    if config.get("resume"):
        resumption, (backend, dataset, model, optimizer, digest), (uri, artifacts) = (
            _prepare_resumed(config, hydra_cfg, mlflow)
        )
        config = resumption.config
    else:
        backend, dataset, model, optimizer = prepare(config)
        digest = dataset.digest()
        uri, artifacts = resolve_store(config["tracking"]["uri"], launch_dir)
        mlflow.set_tracking_uri(uri)
        _report_dead_runs(config)
    experiment_id = ensure_experiment(config["tracking"]["experiment"], artifacts)
    if resumption is not None:
        _note_backend_change(resumption, backend.name)
    if stop_requested():  # SIGTERM while setting up: nothing to save, no run to start
        raise TrainingStopped(stop_requested(), 0, None)
    active = _start_run(mlflow, experiment_id, config, hydra_cfg, backend, resumption)
    with active:
        run_id = active.info.run_id
        try:
            tracker = MlflowTracker(run_id)
            if resumption is None or resumption.run_id != run_id:
                _log_inputs(tracker, config, dataset, model, output_dir, digest)
                if world is not None:
                    tracker.log_params({"distributed.world_size": world.size})
            else:
                _write_config(tracker, config, output_dir)
                tracker.skip_what_is_logged()
            checkpoints = Checkpoints(
                output_dir / "model.npz",
                config["trainer"]["checkpoint_every"],
                {
                    "config": config,
                    "run_id": run_id,
                    "data_digest": digest,
                    "backend": backend.name,
                },
            )
            result = _train(
                model, optimizer, dataset, config, tracker, checkpoints, resumption, world
            )
            _log_outputs(tracker, model, result, output_dir)
            _write_report(run_id, output_dir, "FINISHED", dataset)
        except TrainingStopped as stop:
            _end_stopped(mlflow, run_id, stop)  # marked first: the grace may end any time
            if stop.checkpoint is not None:  # then the report, if the stop leaves time
                _write_report(run_id, output_dir, "KILLED", dataset)
            stop.run_id, stop.hint = run_id, resume_hint(run_id, config)
            raise
        except KeyboardInterrupt:
            _mark_resumable(mlflow, run_id)
            _mark_killed(mlflow)
            raise
        except BaseException as err:
            if store_error(err) is not None:  # the store itself is gone: nothing to tag
                raise
            with deferred_interrupt():
                mlflow.set_tag("gpucnn.error", f"{type(err).__name__}: {err}"[:5000])
            if isinstance(err, DivergedError):  # it would diverge again: start afresh
                mlflow.set_tag(RESUMABLE_TAG, "false")
            else:
                _mark_resumable(mlflow, run_id)
            raise
        mlflow.set_tag(RESUMABLE_TAG, "false")  # it FINISHED
    summary(run_id, config, result, dataset.sizes(), checkpoints.path, uri, backend.name)
    # What a sweeper optimises: the last epoch's validation accuracy, never the test's.
    validation = result.history.get("val_accuracy") or [float("nan")]
    return validation[-1]


def _check_search(config: dict[str, Any], hydra_cfg: Any) -> None:
    """A search optimises the validation accuracy: without a validation split it is
    refused before anything runs."""
    sweeper = str(hydra_cfg.get("sweeper", {}).get("_target_", ""))
    if "optuna" in sweeper.lower() and not config["data"].get("val_fraction"):
        raise ValueError(
            f"a search (hydra/sweeper=optuna) maximises the validation accuracy, but "
            f"data.val_fraction={config['data'].get('val_fraction')!r} leaves no validation "
            "split; give it one (0 < data.val_fraction < 1): the test split is never tuned on"
        )


def _prepare_resumed(config: dict[str, Any], hydra_cfg: Any, mlflow: Any) -> tuple:
    """For ``resume=``: (the resumption, (backend, data, model, optimizer, data digest)
    loaded from its checkpoint, (store uri, artifact location)), with the store set."""
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        raise ValueError("resume= continues one run: drop -m (--multirun)")
    launch_dir, by_id = hydra_cfg.runtime.cwd, is_run_id(config["resume"])
    try:
        uri, artifacts = resolve_store(config["tracking"]["uri"], launch_dir, create=False)
    except ValueError:
        if by_id:  # a run id needs its store
            raise
        uri = None  # no store yet: the file's run is not in it; made once all is checked
    if uri is not None:
        mlflow.set_tracking_uri(uri)
        _report_dead_runs(config)
    with tempfile.TemporaryDirectory(prefix="gpucnn-resume-") as scratch:
        resumption = prepare_resumption(
            config["resume"], list(hydra_cfg.overrides.task), config, Path(scratch), uri is not None
        )
        backend, dataset, model, optimizer = prepare(resumption.config)
        digest = dataset.digest()
        model, optimizer = _resumed_model(resumption, model, backend, digest)
        resumption.checkpoint_bytes = resumption.checkpoint.read_bytes()  # for other ranks
    if uri is None:
        uri, artifacts = resolve_store(resumption.config["tracking"]["uri"], launch_dir)
        mlflow.set_tracking_uri(uri)
    return resumption, (backend, dataset, model, optimizer, digest), (uri, artifacts)


def _train(
    model: Any,
    optimizer: Any,
    dataset: Dataset,
    config: dict[str, Any],
    tracker: MlflowTracker,
    checkpoints: Checkpoints,
    resumption: Resumption | None,
    world: Any = None,
) -> Any:
    """fit() as the config says; a resumed run cuts its batches as it did before. With
    ``world``, the other ranks get the config and the checkpoint to start from first."""
    trainer = config["trainer"]
    split = dict(resumption.progress.batch_split) if resumption else {}
    split_batches = split.pop("split_batches", True)
    if world is not None:
        checkpoint = resumption.checkpoint_bytes if resumption else None
        world.broadcast({"config": config, "checkpoint": checkpoint})
        world.started = True
        world.comm.Barrier()  # the others have loaded their data and model: steps start
    with world.cpus(**split) if world is not None else cpu_configured(**split):
        if world is not None:
            model = MpiSplit(BatchSplit(model) if split_batches else model, world)
        return fit(
            model,
            optimizer,
            dataset,
            **_loop_settings(trainer),
            kernels_every=trainer["kernels_every"],
            tracker=tracker,
            split_batches=split_batches,
            checkpoints=checkpoints,
            resume=resumption.progress if resumption else None,
        )


def _loop_settings(trainer: dict[str, Any]) -> dict[str, Any]:
    """The trainer settings fit takes as they are (the same on every MPI rank)."""
    return {key: trainer[key] for key in ("epochs", "batch_size", "seed", "log_every")}


def _resumed_model(
    resumption: Resumption, built: Any, backend: Any, digest: str
) -> tuple[Any, Any]:
    """The model and optimizer of the checkpoint, after checking that they are the ones
    its config builds and that the data is the run's."""
    model, optimizer = load_checkpoint(resumption.checkpoint, backend)
    if _as_configured(model.config()) != built.config():
        raise ValueError(
            f"resume: checkpoint {str(resumption.checkpoint)!r} does not match its run's "
            "config (its architecture differs from the model the config builds)"
        )
    if optimizer is None:
        raise ValueError(f"resume: checkpoint {str(resumption.checkpoint)!r} has no optimizer")
    recorded = resumption.progress.extra.get("data_digest")
    if recorded != digest:
        raise ValueError(
            f"resume: the data found now is not the run's (SHA-256 {digest[:16]}..., the run "
            f"used {str(recorded)[:16]}...); point data.path at the run's data"
        )
    return model, optimizer


def _as_configured(architecture: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's architecture as its run's config writes it: a format-1 checkpoint
    loads its Flatten "F" as "F_channels_first" (what "F" meant then), from config "F"."""
    layers = [
        {**layer, "order": "F"} if layer.get("order") == "F_channels_first" else layer
        for layer in architecture["layers"]
    ]
    return {**architecture, "layers": layers}


def _report_dead_runs(config: dict[str, Any]) -> None:
    """Mark FAILED the runs of this host whose process died without a word; say so."""
    for run_id, checkpoint in mark_dead_runs(f"gpucnn.train (pid {os.getpid()})"):
        print(
            f"gpucnn: run {run_id} was left RUNNING by a process that no longer exists; "
            "marked FAILED"
            + (f" (continue it with: {resume_hint(run_id, config)})" if checkpoint else ""),
            file=sys.stderr,
            flush=True,
        )


def resume_hint(run_id: str, config: dict[str, Any]) -> str:
    """The command that goes on with ``run_id``, naming its store when it is not the
    default one (found again from the launch folder or MLFLOW_TRACKING_URI)."""
    command = f"python -m gpucnn.train resume={run_id}"
    uri = config["tracking"].get("uri")
    return command + (f" tracking.uri={shlex.quote(uri)}" if uri else "")


def _note_backend_change(resumption: Resumption, now: str) -> None:
    before = resumption.progress.extra.get("backend")
    if before is not None and before != now:
        print(
            f"gpucnn: the run ran on {before} and goes on on {now}: it goes on, but no "
            "longer bit for bit as if it had never stopped",
            file=sys.stderr,
            flush=True,
        )


def _end_stopped(mlflow: Any, run_id: str, stop: TrainingStopped) -> None:
    """A run stopped by SIGTERM at a step boundary: KILLED, resumable from its checkpoint."""
    with deferred_interrupt():
        mlflow.set_tag(RESUMABLE_TAG, "true" if stop.checkpoint else "false")
        mlflow.set_tag("gpucnn.stopped", f"signal {stop.signal_number} before step {stop.step + 1}")
    _mark_killed(mlflow)


def _mark_resumable(mlflow: Any, run_id: str) -> None:
    """Tag a run that ends early as resumable when it has a checkpoint."""
    with deferred_interrupt():
        run = mlflow.MlflowClient().get_run(run_id)
        mlflow.set_tag(RESUMABLE_TAG, "true" if CHECKPOINT_TAG in run.data.tags else "false")


def _start_run(
    mlflow: Any,
    experiment_id: str,
    config: dict[str, Any],
    hydra_cfg: Any,
    backend: Any,
    resumption: Resumption | None = None,
) -> Any:
    """The job's MLflow run (a child of the sweep's parent run in a multirun), tagged with
    the backend, device, overrides, git commit and the process it runs in; or the run
    being resumed, back to RUNNING. Ctrl-C while it starts marks it KILLED."""
    overrides = " ".join(hydra_cfg.overrides.task)
    tags = {
        "gpucnn.backend": backend.name,
        "gpucnn.device": backend.device_name(),
        "gpucnn.overrides" if resumption is None else "gpucnn.resumed_with": overrides,
        **this_process().as_tags(),
    }
    commit = git_commit(hydra_cfg.runtime.cwd)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if resumption is not None:
        progress = resumption.progress
        tags["gpucnn.resumed_from"] = f"epoch {progress.epoch}, step {progress.step}"
        tags["gpucnn.epochs"] = str(config["trainer"]["epochs"])
        if config["tracking"].get("run_name"):
            tags["mlflow.runName"] = config["tracking"]["run_name"]
    existing = resumption.run_id if resumption else None
    if existing is not None and stored_run(existing) is None:
        existing = None  # a checkpoint file from another store: a new run goes on with it
    try:
        with deferred_interrupt():  # Ctrl-C here comes after the run exists: mark it
            if existing is not None:
                # The new process's tags first: the moment the run is RUNNING again, a
                # dead-run sweep must see a live process; and nothing can fail after it.
                client = mlflow.MlflowClient()
                for key, value in tags.items():
                    client.set_tag(existing, key, value)
                for stale in ("gpucnn.error", "gpucnn.stopped"):  # it goes on now
                    if stale in client.get_run(existing).data.tags:
                        client.delete_tag(existing, stale)
                return mlflow.start_run(run_id=existing)
            parent = parent_run_id(hydra_cfg)
            return mlflow.start_run(
                experiment_id=experiment_id,
                run_name=config["tracking"]["run_name"] or _child_name(mlflow, parent, hydra_cfg),
                parent_run_id=parent,
                tags=tags,
            )
    except KeyboardInterrupt:
        _mark_killed(mlflow)
        raise


def _child_name(mlflow: Any, parent: str | None, hydra_cfg: Any) -> str | None:
    """A sweep job's run name: its values of the keys the sweep varies
    (``optimizer.lr=0.01 trainer.seed=1``), so the UI's run list tells the jobs apart."""
    if parent is None:
        return None
    swept = mlflow.MlflowClient().get_run(parent).data.tags.get(SWEPT_KEYS_TAG, "").split()
    mine = dict(o.split("=", 1) for o in hydra_cfg.overrides.task if "=" in o)
    parts = [f"{key}={mine[key]}" for key in swept if key in mine]
    return " ".join(parts) or None


def _log_inputs(
    tracker: MlflowTracker,
    config: dict[str, Any],
    dataset: Dataset,
    model: Any,
    output_dir: Path,
    digest: str,
) -> None:
    """Parameters (the flattened config, split sizes, model size, the data's digest) and
    the resolved config.yaml, from which evaluate rebuilds the run's data."""
    sizes = dataset.sizes()
    tracker.log_params(
        {
            **flatten_params({k: v for k, v in config.items() if k != "resume"}),
            **{f"data.{k}_size": v for k, v in sizes.items()},
            "model.num_params": model.num_params(),
            "data.num_classes": dataset.num_classes,
            "data.digest": digest,
        }
    )
    tracker.log_dataset(
        dataset.name, digest, dataset.source, {f"gpucnn.{k}_size": str(v) for k, v in sizes.items()}
    )
    _write_config(tracker, config, output_dir)


def _write_config(tracker: MlflowTracker, config: dict[str, Any], output_dir: Path) -> None:
    config_path = output_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    tracker.log_file(config_path)


def _log_outputs(tracker: MlflowTracker, model: Any, result: Any, output_dir: Path) -> None:
    """The confusion matrix (picture and CSV) and each conv layer's kernels as .npy (fit
    wrote and logged the checkpoint)."""
    confusion = np.array(result.confusion)
    tracker.log_image("confusion_matrix", confusion_image(confusion), step=result.steps)
    np.savetxt(output_dir / "confusion_matrix.csv", confusion, fmt="%d", delimiter=",")
    tracker.log_file(output_dir / "confusion_matrix.csv")
    for layer in model.layers:
        if layer.type == "conv":
            tracker.log_array(f"{layer.name}.npy", to_host(layer.params["weight"]))


def _write_report(run_id: str, output_dir: Path, status: str, dataset: Dataset) -> None:
    """The run's report.html, built from what it logged and from the dataset in memory
    (not loaded a second time beside it), as an artifact; a report that cannot be built
    costs the run nothing but a line on stderr."""
    from gpucnn.report import write_and_log  # noqa: PLC0415 - heavy, at the end only

    try:
        with deferred_interrupt():
            write_and_log(run_id, output_dir, status, dataset)
    except Exception as err:  # noqa: BLE001 - the run's results are logged already
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"gpucnn: the run's report was not written: {first}", file=sys.stderr, flush=True)


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
    try:
        world = _world(cfg)
    except (ImportError, ValueError) as err:
        print(f"gpucnn.train: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if world is not None and world.rank != 0:
        sys.exit(_follow(world))
    try:
        return _main(cfg, world)
    except SystemExit as ending:
        if world is not None:
            _release(world, ending.code if isinstance(ending.code, int) else 1)
        raise


def _world(cfg: DictConfig) -> Any:
    """The MPI world for distributed=mpi (None otherwise); refused on CuPy (no NCCL yet),
    and distributed=none is refused in a job an MPI launcher started several times."""
    chosen = to_containers(OmegaConf.masked_copy(cfg, ["distributed", "backend"]))
    if chosen.get("distributed", "none") == "none":
        launched = _launched_processes()
        if launched > 1:
            rank = int(os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
            if rank != 0:
                sys.exit(2)  # rank 0 says why
            raise ValueError(
                f"this job is {launched} processes started by an MPI launcher, but "
                "distributed=none: add distributed=mpi (else each would train alone)"
            )
        return None
    if chosen.get("backend") == "cupy":
        raise ValueError(
            "distributed=mpi with backend=cupy needs NCCL, which gpucnn does not support "
            "yet; use backend=numpy"
        )
    return World()


def _launched_processes() -> int:
    """How many processes the MPI launcher (MPICH's or Open MPI's mpiexec) started."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def _release(world: Any, code: int) -> None:
    """Rank 0 is ending with ``code``: ranks still waiting to start are told to end;
    ranks already training end with it unless they end by themselves (an agreed stop or
    failure): MPI would otherwise leave them waiting in a collective."""
    if world.size == 1:
        return
    if not world.started:
        world.broadcast({"abort": code})
    elif not getattr(world, "agreed_end", False):
        world.abort(code)


def _follow(world: Any) -> int:
    """A rank other than 0: the config (and checkpoint) from rank 0, the same fit on its
    shard of each batch, nothing logged; its exit code follows rank 0's."""
    with sticky_interrupts(), stop_on_signals():
        try:
            start = world.broadcast(None)
            if "abort" in start:
                return int(start["abort"])
            config = start["config"]
            _, dataset, model, optimizer = prepare(config)
            progress, split = None, {}
            if start["checkpoint"] is not None:
                with tempfile.TemporaryDirectory(prefix="gpucnn-rank-") as scratch:
                    path = Path(scratch) / "model.npz"
                    path.write_bytes(start["checkpoint"])
                    model, optimizer = load_checkpoint(path, model.backend)
                    progress = read_checkpoint(path).progress
                split = dict(progress.batch_split)
            split_batches = split.pop("split_batches", True)
            trainer = config["trainer"]
            world.comm.Barrier()  # ready: rank 0 starts its clock with ours
            with world.cpus(**split):
                fit(
                    MpiSplit(BatchSplit(model) if split_batches else model, world),
                    optimizer,
                    dataset,
                    **_loop_settings(trainer),
                    kernels_every=0,
                    progress=False,
                    resume=progress,
                )
            return 0
        except RankFailed:
            return 1  # rank 0 says what happened
        except DivergedError:
            return 2
        except TrainingStopped as stop:
            return 128 + stop.signal_number
        except KeyboardInterrupt:
            return 130
        except Exception as err:  # noqa: BLE001 - outside a step: the others would wait
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"gpucnn.train: rank {world.rank}: error: {first}", file=sys.stderr, flush=True)
            world.abort(2)
            return 2


def _main(cfg: DictConfig, world: Any) -> float:
    started = time.perf_counter()
    try:
        with sticky_interrupts(), stop_on_signals():
            return run(cfg, world)
    except RankFailed as failed:
        if world is not None:
            world.agreed_end = True
        print(f"gpucnn.train: error: {failed}; the run is marked FAILED", file=sys.stderr)
        sys.exit(1)
    except USER_ERRORS as err:
        if isinstance(err, DivergedError) and world is not None:
            world.agreed_end = True  # the same loss on every rank: all stopped
        print(f"gpucnn.train: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except DownloadStopped as stop:
        print(f"gpucnn.train: {stop}; nothing was kept or logged", file=sys.stderr, flush=True)
        sys.exit(128 + stop.signal_number)
    except TrainingStopped as stop:
        if world is not None and world.started:
            world.agreed_end = True  # every rank stopped at the same step
        run_id, hint = getattr(stop, "run_id", None), getattr(stop, "hint", "")
        if run_id is None:
            print(
                f"gpucnn.train: stopped by signal {stop.signal_number} before the run "
                "started; nothing was logged",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"gpucnn.train: {stop}; the run is marked KILLED and can go on with: {hint}",
                file=sys.stderr,
                flush=True,
            )
        sys.exit(128 + stop.signal_number)
    except Exception as err:  # a SQLite store that failed under way: one line too
        problem = store_error(err)
        if problem is None:
            raise
        print(f"gpucnn.train: error: {problem}", file=sys.stderr, flush=True)
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
