"""Datasets, as host NumPy arrays in NCHW float32 with int64 labels.

- ``seed_20x20``: the lecture's two artificial 20x20 classes. Class 1 is an "X" (both
  diagonals), class 0 an "O" (a ring), each plus seeded Gaussian noise. Both patterns
  are symmetric under the 180-degree turn of true convolution, so a learned kernel can
  be compared with them directly.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download).
- ``idx``: MNIST-format IDX files in the directory ``path``.
- ``npz``: arrays in the ``.npz`` file ``path``.

Splits are stratified and seeded. Inputs are standardised with the training split's
mean and standard deviation, and the same numbers are applied to val and test.
"""

from __future__ import annotations

import gzip
import numbers
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("seed_20x20", "digits", "idx", "npz")


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


# -- the lecture's 20x20 classes ----------------------------------------------------------
def seed_patterns(size: int = 20) -> dict[int, np.ndarray]:
    """The clean class patterns: 1 -> "X", 0 -> "O" (values 0 or 1)."""
    r, c = np.mgrid[0:size, 0:size]
    cross = (np.abs(r - c) <= 1) | (np.abs(r + c - (size - 1)) <= 1)
    centre = (size - 1) / 2
    radius = np.hypot(r - centre, c - centre)
    ring = np.abs(radius - size * 0.33) <= 1.2
    return {1: cross.astype(np.float32), 0: ring.astype(np.float32)}


def make_seed_20x20(n_per_class: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n_per_class noisy copies of each pattern, shuffled: (N, 1, 20, 20), labels (N,)."""
    rng = np.random.default_rng(seed)
    patterns = seed_patterns()
    x = np.concatenate([np.repeat(patterns[k][None], n_per_class, 0) for k in (0, 1)])
    x = x + rng.normal(0.0, noise, size=x.shape)
    y = np.repeat(np.array([0, 1]), n_per_class)
    order = rng.permutation(len(y))
    return x[order, None].astype(np.float32), y[order].astype(np.int64)


# -- file formats -------------------------------------------------------------------------
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), e.g. MNIST's train-images-idx3-ubyte."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {str(path)!r} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise DataError(f"IDX file {str(path)!r} could not be read: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(
            f"IDX file {str(path)!r} is corrupt: bad magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000 then a type code 08/09/0b/0c/0d/0e and the number of dimensions)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {str(path)!r} is corrupt: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file {str(path)!r} is corrupt: header says shape {shape} ({expected} bytes) "
            f"but {len(raw) - header} bytes of data follow"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(
        f"data.path {str(directory)!r} has no {stems[0]} (looked for {', '.join(stems)}, "
        "optionally .gz)"
    )


def load_idx_dir(path: str | Path) -> dict[str, np.ndarray]:
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"data.path {str(directory)!r} is not a directory of IDX files")
    arrays = {
        "x_train": read_idx(
            _find(directory, ("train-images-idx3-ubyte", "train-images.idx3-ubyte"))
        ),
        "y_train": read_idx(
            _find(directory, ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"))
        ),
        "x_test": read_idx(_find(directory, ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"))),
        "y_test": read_idx(_find(directory, ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"))),
    }
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(
                f"data.path {str(directory)!r}: {split} has {len(arrays[f'x_{split}'])} images "
                f"but {len(arrays[f'y_{split}'])} labels"
            )
    return arrays


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Keys x_train, y_train, x_test, y_test (x_val, y_val optional), or just x and y."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data.path {str(path)!r} is a directory; data=npz needs a .npz file")
    if not path.is_file():
        raise DataError(f"data.path {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:
        raise DataError(f"data.path {str(path)!r} is not a readable .npz file: {err}") from err
    if not ({"x_train", "y_train", "x_test", "y_test"} <= set(arrays) or {"x", "y"} <= set(arrays)):
        raise DataError(
            f"data.path {str(path)!r} has keys {sorted(arrays)}; it needs x_train, y_train, "
            "x_test, y_test (x_val, y_val optional) or x and y"
        )
    for prefix in ("", "_train", "_val", "_test"):
        x, y = arrays.get(f"x{prefix}"), arrays.get(f"y{prefix}")
        if x is not None and y is not None and len(x) != len(y):
            raise DataError(
                f"data.path {str(path)!r}: x{prefix} has {len(x)} samples "
                f"but y{prefix} has {len(y)}"
            )
    return arrays


# -- assembling a Dataset -----------------------------------------------------------------
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


def _test_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, test) of a stratified split; the test part must not come out empty."""
    rest, test = stratified_split(y, fraction, seed)
    if len(test) == 0:
        raise DataError(
            f"data.test_fraction={fraction!r} leaves no test images out of {len(y)}; "
            "raise it (allowed: (0, 1))"
        )
    return rest, test


def _as_images(x: np.ndarray, where: str) -> np.ndarray:
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


def _as_labels(y: np.ndarray, where: str) -> np.ndarray:
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
    x_train, x_test = _as_images(x_train, f"{name} x_train"), _as_images(x_test, f"{name} x_test")
    y_train, y_test = _as_labels(y_train, f"{name} y_train"), _as_labels(y_test, f"{name} y_test")
    if x_val is None:
        rest, held = stratified_split(y_train, val_fraction, seed)
        x_val, y_val = x_train[held], y_train[held]
        x_train, y_train = x_train[rest], y_train[rest]
    else:
        x_val, y_val = _as_images(x_val, f"{name} x_val"), _as_labels(y_val, f"{name} y_val")
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
        rest, test = _test_split(y, test_fraction, seed)
        return build_dataset(
            name, x[rest], y[rest], x[test], y[test], val_fraction, seed + 1, normalize=normalize
        )
    if not path:
        raise DataError(
            f"dataset {name!r} needs data.path (a {'directory' if name == 'idx' else '.npz file'})"
        )
    arrays: dict[str, Any] = load_idx_dir(path) if name == "idx" else load_npz(path)
    if "x_train" not in arrays:
        rest, test = _test_split(_as_labels(arrays["y"], f"{path} y"), test_fraction, seed)
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


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as an IDX file (used by tests and to export data)."""
    codes = {v: k for k, v in _IDX_TYPES.items()}
    dtype = np.dtype(array.dtype).newbyteorder(">")
    code = codes.get(dtype.str) or codes.get(dtype.str.replace("|", ">"))
    if code is None:
        raise ValueError(f"dtype {array.dtype} has no IDX type code")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(dtype).tobytes())
