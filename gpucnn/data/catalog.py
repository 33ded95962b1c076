"""The datasets gpucnn knows by name, and how a data config becomes a :class:`Dataset`.

- ``seed_20x20``: the lecture's two artificial 20x20 classes (:mod:`gpucnn.data.builtin`).
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download).
- ``idx``: MNIST-format IDX files in the directory ``path``.
- ``npz``: arrays in the ``.npz`` file ``path``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from gpucnn.data.builtin import make_seed_20x20
from gpucnn.data.dataset import DataError, Dataset, as_labels, build_dataset, split_off_test
from gpucnn.data.formats import load_idx_dir, load_npz


@dataclass(frozen=True)
class DataOptions:
    """A data config's settings (``data.*``), checked where all datasets share them."""

    path: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    n_per_class: int = 50  # seed_20x20 only
    noise: float = 0.3  # seed_20x20 only
    normalize: bool = True


def _seed_20x20(name: str, options: DataOptions) -> Dataset:
    n, noise, seed = options.n_per_class, options.noise, options.seed
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"data.n_per_class must be an int >= 1, got {n!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise DataError(f"data.noise must be a number >= 0, got {noise!r}")
    x_train, y_train = make_seed_20x20(n, noise, seed)
    x_val, y_val = make_seed_20x20(max(1, n // 5), noise, seed + 1)
    x_test, y_test = make_seed_20x20(max(1, n // 2), noise, seed + 2)
    return build_dataset(
        name,
        x_train,
        y_train,
        x_test,
        y_test,
        options.val_fraction,
        seed,
        x_val,
        y_val,
        options.normalize,
    )


def _digits(name: str, options: DataOptions) -> Dataset:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - only this dataset needs it

    digits = load_digits()
    x, y = digits.images.astype(np.float32), digits.target
    rest, test = split_off_test(y, options.test_fraction, options.seed)
    return build_dataset(
        name,
        x[rest],
        y[rest],
        x[test],
        y[test],
        options.val_fraction,
        options.seed + 1,
        normalize=options.normalize,
    )


def _from_files(name: str, options: DataOptions) -> Dataset:
    """``idx`` (a directory of IDX files) or ``npz`` (one file) at ``data.path``."""
    path = options.path
    if not path:
        kind = "directory" if name == "idx" else ".npz file"
        raise DataError(f"dataset {name!r} needs data.path (a {kind})")
    arrays: dict[str, Any] = load_idx_dir(path) if name == "idx" else load_npz(path)
    if "x_train" not in arrays:  # one set of x and y: split off the test images here
        labels = as_labels(arrays["y"], f"{path} y")
        rest, test = split_off_test(labels, options.test_fraction, options.seed)
        x, y = arrays["x"], arrays["y"]
        arrays = {"x_train": x[rest], "y_train": y[rest], "x_test": x[test], "y_test": y[test]}
    try:
        return build_dataset(
            name,
            arrays["x_train"],
            arrays["y_train"],
            arrays["x_test"],
            arrays["y_test"],
            options.val_fraction,
            options.seed + 1,
            arrays.get("x_val"),
            arrays.get("y_val"),
            options.normalize,
        )
    except DataError as err:
        raise DataError(f"data.path {str(path)!r}: {err}") from err


# Every dataset gpucnn knows by name: a new one is a function here (and a conf/data/ file).
LOADERS: dict[str, Callable[[str, DataOptions], Dataset]] = {
    "seed_20x20": _seed_20x20,
    "digits": _digits,
    "idx": _from_files,
    "npz": _from_files,
}
DATASETS = tuple(LOADERS)


def load_dataset(
    name: str,
    path: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    n_per_class: int = 50,
    noise: float = 0.3,
    normalize: bool = True,
) -> Dataset:
    """Load dataset ``name`` (one of DATASETS) with seeded, stratified splits; the
    settings are :class:`DataOptions`'s."""
    if name not in LOADERS:
        raise DataError(f"dataset {name!r} is not known; allowed: {', '.join(DATASETS)}")
    options = DataOptions(path, val_fraction, test_fraction, seed, n_per_class, noise, normalize)
    for what in ("val_fraction", "test_fraction"):
        value = getattr(options, what)
        if not 0 <= value < 1:
            raise DataError(f"data.{what} must be in [0, 1), got {value!r}")
    seed = options.seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(f"data.seed must be an int >= 0, got {seed!r}")
    return LOADERS[name](name, replace(options, seed=int(seed)))


def load_data(data_cfg: dict[str, Any]) -> Dataset:
    """The dataset a data config (``data.*``, with ``name``) describes; with
    ``positive_class=K``, its labels become one-vs-rest (1 for class K, else 0)."""
    options = {k: v for k, v in data_cfg.items() if k != "positive_class"}
    dataset = load_dataset(**options)
    positive = data_cfg.get("positive_class")
    if positive is not None:
        if not 0 <= positive < dataset.num_classes:
            raise DataError(
                f"data.positive_class={positive} is not a class of {dataset.name!r} "
                f"(0..{dataset.num_classes - 1})"
            )
        for split in ("train", "val", "test"):
            labels = getattr(dataset, f"y_{split}")
            setattr(dataset, f"y_{split}", (labels == positive).astype(np.int64))
        dataset.num_classes = 2
    return dataset
