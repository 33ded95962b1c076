"""A dataset: host NumPy arrays in NCHW float32 with int64 labels, in train, val and test
splits.

Splits are stratified and seeded. Inputs are standardised with the training split's
mean and standard deviation, and the same numbers are applied to val and test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A dataset could not be read; the message names the path and what was wrong."""


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    normalization: dict[str, float] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def digest(self) -> str:
        """SHA-256 of every split's images and labels as the model sees them (shapes,
        dtypes and bytes): the same data, wherever its files were found."""
        digest = hashlib.sha256()
        for split in ("train", "val", "test"):
            for array in (getattr(self, f"x_{split}"), getattr(self, f"y_{split}")):
                array = np.ascontiguousarray(array)
                digest.update(f"{split}{array.shape}{array.dtype.str}".encode())
                digest.update(array.data)
        return digest.hexdigest()


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out), holding out ``fraction`` of each class."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        held.append(members[: int(round(fraction * len(members)))])
    held_out = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(y)), held_out)
    return rng.permutation(rest), held_out


def split_off_test(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, test) of a stratified split; the test part must not come out empty."""
    rest, test = stratified_split(y, fraction, seed)
    if len(test) == 0:
        raise DataError(
            f"data.test_fraction={fraction!r} leaves no test images out of {len(y)}; "
            "raise it (allowed: (0, 1))"
        )
    return rest, test


def as_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{where}: images must be (N, H, W) or (N, C, H, W), got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: images must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise DataError(f"{where}: {bad} pixel values are NaN or infinite")
    return x


def as_labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.size and (not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0):
        raise DataError(f"{where}: labels must be non-negative integers")
    return y.astype(np.int64)


def build_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    val_fraction: float,
    seed: int,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    normalize: bool = True,
) -> Dataset:
    x_train, x_test = as_images(x_train, f"{name} x_train"), as_images(x_test, f"{name} x_test")
    y_train, y_test = as_labels(y_train, f"{name} y_train"), as_labels(y_test, f"{name} y_test")
    if x_val is None:
        rest, held = stratified_split(y_train, val_fraction, seed)
        x_val, y_val = x_train[held], y_train[held]
        x_train, y_train = x_train[rest], y_train[rest]
    else:
        x_val, y_val = as_images(x_val, f"{name} x_val"), as_labels(y_val, f"{name} y_val")
    if len(y_train) == 0:
        raise DataError(f"{name}: the training split is empty")
    if len(y_test) == 0:
        raise DataError(f"{name}: the test split is empty")
    shapes = {x_train.shape[1:], x_val.shape[1:], x_test.shape[1:]}
    if len(shapes) != 1:
        raise DataError(f"{name}: train/val/test images differ in shape: {sorted(shapes)}")
    num_classes = int(max(y_train.max(), y_val.max(initial=0), y_test.max(initial=0))) + 1
    stats: dict[str, float] = {}
    if normalize:
        mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
        stats = {"mean": mean, "std": std}
        x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))
    return Dataset(
        name,
        x_train.astype(np.float32),
        y_train,
        x_val.astype(np.float32),
        y_val,
        x_test.astype(np.float32),
        y_test,
        max(num_classes, 2),
        stats,
    )
