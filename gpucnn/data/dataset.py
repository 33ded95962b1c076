"""A dataset: host NumPy arrays in NCHW with int64 labels, in train, val and test splits.

Splits are stratified and seeded. Inputs are standardised with the training split's
mean and standard deviation, and the same numbers are applied to val and test. Images
that come as bytes (MNIST, CIFAR-10) stay bytes, a quarter of float32's memory: their
:class:`PixelScaling` is applied to each batch when it is used (on the device, on CuPy).
Small float datasets are standardised once, here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A dataset could not be read; the message names the path and what was wrong."""


@dataclass(frozen=True)
class PixelScaling:
    """What a batch of byte images becomes before the model sees it: per channel,
    ``(pixel - mean[c]) / std[c]`` in the model's dtype."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, images: np.ndarray, normalize: bool = True) -> PixelScaling:
        """The training images' per-channel mean and standard deviation (exact, from a
        histogram of the 256 byte values: no float copy of the set); with
        ``normalize=False`` the identity (mean 0, std 1)."""
        channels = images.shape[1]
        if not normalize:
            return cls((0.0,) * channels, (1.0,) * channels)
        values = np.arange(256, dtype=np.float64)
        means, stds = [], []
        for c in range(channels):
            counts = np.zeros(256, np.float64)
            for start in range(0, len(images), 4096):  # bincount copies to int64: in chunks
                chunk = images[start : start + 4096, c].reshape(-1)
                counts += np.bincount(chunk, minlength=256)
            total = max(counts.sum(), 1.0)
            mean = float(counts @ values / total)
            std = float(np.sqrt(counts @ (values - mean) ** 2 / total))
            means.append(mean)
            stds.append(std or 1.0)
        return cls(tuple(means), tuple(stds))


@dataclass(frozen=True)
class Augmentation:
    """Random variations of each training batch: a crop of the image padded with
    ``crop_padding`` zero pixels on each side, and a horizontal flip of half the images."""

    crop_padding: int = 0
    flip: bool = False

    def __bool__(self) -> bool:
        return bool(self.crop_padding or self.flip)


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
    # Byte images: how each batch is scaled (None: the arrays are the model's input).
    scaling: PixelScaling | None = None
    # The SHA-256 of the source files' content, where the data came from files.
    content_digest: str | None = None
    source: str | None = None  # where the files were found (a folder, archive or URL)
    augmentation: Augmentation = field(default_factory=Augmentation)
    class_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def digest(self) -> str:
        """The data's identity: the SHA-256 of its source files' content where it came
        from published files (the same data wherever they were found, whatever their
        compression), else of every split's images and labels as the model sees them."""
        if self.content_digest is not None:
            return self.content_digest
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


def build_byte_dataset(
    name: str,
    arrays: dict[str, np.ndarray],
    val_fraction: float,
    seed: int,
    normalize: bool = True,
) -> Dataset:
    """A dataset of byte images (``arrays``: x_train, y_train, x_test, y_test; images
    (N, H, W) or (N, C, H, W) uint8) that stays bytes: the validation split is held out
    of the training images stratified and seeded, and the training split's per-channel
    statistics become the :class:`PixelScaling` each batch gets. The training split is
    compacted in place, so the set is never held twice."""
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if x_train.ndim == 3:
        x_train, x_test = x_train[:, None], x_test[:, None]
    y_train = as_labels(arrays["y_train"], f"{name} y_train")
    y_test = as_labels(arrays["y_test"], f"{name} y_test")
    if len(y_train) == 0 or len(y_test) == 0:
        raise DataError(f"{name}: the {'training' if len(y_train) == 0 else 'test'} set is empty")
    rest, held = stratified_split(y_train, val_fraction, seed)
    rest = np.sort(rest)  # fit shuffles; in order, the split can be compacted in place
    x_val, y_val = x_train[held], y_train[held]
    if not x_train.flags.writeable:
        x_train = x_train.copy()
    for start in range(0, len(rest), 4096):  # rest[i] >= i: a row is read before overwritten
        block = rest[start : start + 4096]
        x_train[start : start + len(block)] = x_train[block]
    x_train, y_train = x_train[: len(rest)], y_train[rest]
    if len(y_train) == 0:
        raise DataError(f"{name}: the training split is empty")
    num_classes = int(max(y_train.max(), y_val.max(initial=0), y_test.max(initial=0))) + 1
    return Dataset(
        name,
        x_train,
        y_train,
        x_val,
        y_val,
        x_test,
        y_test,
        max(num_classes, 2),
        scaling=PixelScaling.of(x_train, normalize),
    )
