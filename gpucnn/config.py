"""Structured config schemas for the training app (edge code: Hydra's ConfigStore), and
the builders that turn a composed config into gpucnn objects.

The schema is the first entry of ``conf/config.yaml``'s defaults list, so every YAML file
and every command-line override is checked against it. A wrong type, an unknown key or
a value outside an enum is rejected by Hydra before training starts. Hydra lets an
override that starts with ``+`` add a key the schema lacks (``+trainer.epoch=5``), so
:func:`check_known_keys` rejects those too.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from gpucnn.array.backend import BACKEND_NAMES, DTYPES
from gpucnn.data import DATASETS
from gpucnn.nn.layers import LAYER_TYPES, Layer
from gpucnn.nn.losses import HEAD_TYPES, head_from_config
from gpucnn.nn.model import Sequential
from gpucnn.nn.optim import OPTIMIZER_TYPES, Optimizer


def _choices(name: str, values: Iterable[str]) -> type[Enum]:
    """An Enum of ``values`` (member name = value) for the schema: built from the engine's
    own registries, so a new layer, head, optimizer or dataset is allowed here at once."""
    return Enum(name, {value: value for value in values})


BackendName = _choices("BackendName", BACKEND_NAMES)
LayerType = _choices("LayerType", LAYER_TYPES)
HeadName = _choices("HeadName", HEAD_TYPES)
OptimizerName = _choices("OptimizerName", OPTIMIZER_TYPES)
DataName = _choices("DataName", DATASETS)
DType = _choices("DType", DTYPES)
Distributed = _choices("Distributed", ("none", "mpi"))


@dataclass
class LayerSpec:
    """One layer. Fields that don't apply to ``type`` are ignored."""

    type: LayerType = MISSING
    out_channels: int | None = None  # conv
    kernel_size: Any = None  # conv: int or [kh, kw]
    stride: Any = None  # conv (default 1), pool (default: the window)
    padding: Any = "valid"  # conv: valid | same | int | [ph, pw] | [t, b, l, r]
    mode: str = "convolution"  # conv: convolution | cross_correlation
    bias: bool = True  # conv, dense
    init: str = "he"  # conv, dense: he | glorot
    kind: str = "max"  # pool: max | l2 | avg
    window: Any = None  # pool: int or [qh, qw]
    order: str = "F"  # flatten: F (column-major) | C (row-major)
    out_features: int | None = None  # dense


@dataclass
class ModelConfig:
    name: str = MISSING
    layers: list[LayerSpec] = field(default_factory=list)
    head: HeadName = HeadName.softmax


@dataclass
class DataConfig:
    name: DataName = DataName.digits
    path: str | None = None  # idx, mnist...: a folder; npz: a file; cifar10: either
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    n_per_class: int = 50  # seed_20x20 only
    noise: float = 0.3  # seed_20x20 only
    normalize: bool = True
    positive_class: int | None = None  # one-vs-rest labels for a binary (logistic) model
    cache_dir: str | None = None  # mnist, fashion_mnist, cifar10: the download cache
    url: str | None = None  # mnist, fashion_mnist, cifar10: base URL of the files
    download: bool = True  # mnist, fashion_mnist, cifar10: download when not found
    crop_padding: int = 0  # training batches: random crop of the image padded by this
    flip: bool = False  # training batches: mirror half of them left-right


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adam
    lr: float = 1e-3
    momentum: float = 0.9  # momentum only
    beta1: float = 0.9  # adam only
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    l2: float = 0.0
    log_every: int = 10  # steps between reads of the per-step loss
    kernels_every: int = 1  # epochs between kernel images (0: never)
    checkpoint_every: int = 1  # epochs between checkpoints (0: only the last; always at a stop)
    dtype: DType = DType.float32


@dataclass
class TrackingConfig:
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite under ./runs
    experiment: str = "gpucnn"
    run_name: str | None = None


@dataclass
class Config:
    resume: str | None = None  # a run id, or a checkpoint file: continue that run
    backend: BackendName = BackendName.auto
    distributed: Distributed = Distributed.none  # mpi: data parallel over MPI ranks
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def check_known_keys(config: dict[str, Any]) -> None:
    """Raise ValueError naming the first key of ``config`` (a plain composed config) that
    the schema does not have, and the keys allowed there."""
    unknown = _unknown_keys(config, Config, "")
    if unknown:
        path, allowed = unknown[0]
        raise ValueError(
            f"unknown config key {path!r} (added with '+'?); allowed there: {', '.join(allowed)}"
        )


def _unknown_keys(value: Any, schema: Any, path: str) -> list[tuple[str, list[str]]]:
    """(path, allowed keys) for every key in ``value`` that ``schema`` (a dataclass, or a
    list of one) does not define."""
    if get_origin(schema) is list and isinstance(value, list):
        (item,) = get_args(schema)
        return [
            found
            for index, entry in enumerate(value)
            for found in _unknown_keys(entry, item, f"{path}.{index}")
        ]
    if not (is_dataclass(schema) and isinstance(value, dict)):
        return []
    types = get_type_hints(schema)
    allowed = [f.name for f in fields(schema)]
    found = []
    for key, entry in value.items():
        where = f"{path}.{key}" if path else str(key)
        if key in types:
            found += _unknown_keys(entry, types[key], where)
        else:
            found.append((where, allowed))
    return found


def to_containers(cfg: Any) -> Any:
    """A DictConfig as plain Python containers, enums as their names."""
    if isinstance(cfg, (DictConfig,)) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return cfg


def build_layer(spec: dict[str, Any], index: int) -> Layer:
    """The layer a LayerSpec describes, through LAYER_TYPES: each argument of the layer
    class comes from the field of the same name; a field left unset (None) takes the
    class's default, or is an error naming it where the class has none."""
    layer_type = spec["type"]
    where = f"model.layers[{index}] ({layer_type})"
    layer_class = LAYER_TYPES[layer_type]
    arguments = {}
    for name, parameter in inspect.signature(layer_class).parameters.items():
        value = spec.get(name)
        if value is None:
            if parameter.default is inspect.Parameter.empty:
                raise ValueError(f"{where} needs {name}")
            continue
        arguments[name] = tuple(value) if isinstance(value, list) else value
    try:
        return layer_class(**arguments)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def build_model(
    model_cfg: dict[str, Any],
    input_shape: tuple[int, ...],
    backend: Any,
    dtype: str,
    seed: int,
    l2: float,
) -> Sequential:
    layers = [build_layer(spec, i) for i, spec in enumerate(model_cfg["layers"])]
    if not layers:
        raise ValueError(f"model {model_cfg.get('name')!r} has no layers")
    try:
        return Sequential(
            layers,
            head_from_config(model_cfg["head"]),
            input_shape,
            backend=backend,
            dtype=dtype,
            seed=seed,
            l2=l2,
        )
    except ValueError as err:
        raise ValueError(f"model {model_cfg.get('name')!r} on input {input_shape}: {err}") from err


def build_optimizer(cfg: dict[str, Any]) -> Optimizer:
    """The optimizer ``cfg["name"]`` from OPTIMIZER_TYPES, given the fields of ``cfg`` that
    its constructor takes (``momentum`` only for momentum, ``beta1`` only for adam, ...)."""
    optimizer_class = OPTIMIZER_TYPES[cfg["name"]]
    accepted = inspect.signature(optimizer_class).parameters
    return optimizer_class(**{k: v for k, v in cfg.items() if k in accepted})
