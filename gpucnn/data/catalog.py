"""The datasets gpucnn knows by name, and how a data config becomes a :class:`Dataset`.

- ``seed_20x20``: the lecture's two artificial 20x20 classes (:mod:`gpucnn.data.builtin`).
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download).
- ``idx``: MNIST-format IDX files in the directory ``path``.
- ``npz``: arrays in the ``.npz`` file ``path``.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from gpucnn.data.builtin import make_seed_20x20
from gpucnn.data.dataset import DataError, Dataset, as_labels, build_dataset, split_off_test
from gpucnn.data.formats import load_idx_dir, load_npz

DATASETS = ("seed_20x20", "digits", "idx", "npz")


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
    """Load dataset ``name`` (one of DATASETS) with seeded, stratified splits."""
    if name not in DATASETS:
        raise DataError(f"dataset {name!r} is not known; allowed: {', '.join(DATASETS)}")
    for value, what in ((val_fraction, "val_fraction"), (test_fraction, "test_fraction")):
        if not 0 <= value < 1:
            raise DataError(f"data.{what} must be in [0, 1), got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(f"data.seed must be an int >= 0, got {seed!r}")
    seed = int(seed)
    if name == "seed_20x20":
        if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
            raise DataError(f"data.n_per_class must be an int >= 1, got {n_per_class!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise DataError(f"data.noise must be a number >= 0, got {noise!r}")
        x_train, y_train = make_seed_20x20(n_per_class, noise, seed)
        x_val, y_val = make_seed_20x20(max(1, n_per_class // 5), noise, seed + 1)
        x_test, y_test = make_seed_20x20(max(1, n_per_class // 2), noise, seed + 2)
        return build_dataset(
            name, x_train, y_train, x_test, y_test, val_fraction, seed, x_val, y_val, normalize
        )
    if name == "digits":
        from sklearn.datasets import load_digits  # noqa: PLC0415 - only this dataset needs it

        digits = load_digits()
        x, y = digits.images.astype(np.float32), digits.target
        rest, test = split_off_test(y, test_fraction, seed)
        return build_dataset(
            name, x[rest], y[rest], x[test], y[test], val_fraction, seed + 1, normalize=normalize
        )
    if not path:
        raise DataError(
            f"dataset {name!r} needs data.path (a {'directory' if name == 'idx' else '.npz file'})"
        )
    arrays: dict[str, Any] = load_idx_dir(path) if name == "idx" else load_npz(path)
    if "x_train" not in arrays:
        rest, test = split_off_test(as_labels(arrays["y"], f"{path} y"), test_fraction, seed)
        arrays = {
            "x_train": arrays["x"][rest],
            "y_train": arrays["y"][rest],
            "x_test": arrays["x"][test],
            "y_test": arrays["y"][test],
        }
    try:
        return build_dataset(
            name,
            arrays["x_train"],
            arrays["y_train"],
            arrays["x_test"],
            arrays["y_test"],
            val_fraction,
            seed + 1,
            arrays.get("x_val"),
            arrays.get("y_val"),
            normalize,
        )
    except DataError as err:
        raise DataError(f"data.path {str(path)!r}: {err}") from err


def load_data(data_cfg: dict[str, Any]) -> Dataset:
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
