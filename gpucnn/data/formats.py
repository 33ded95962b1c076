"""Dataset file formats: MNIST-style IDX files (optionally gzipped) and ``.npz`` arrays,
read without pickle, each error naming the file and what was wrong."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from gpucnn.data.dataset import DataError

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
