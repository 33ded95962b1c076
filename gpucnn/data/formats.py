"""Dataset file formats: MNIST-style IDX files (optionally gzipped) and ``.npz`` arrays,
read without pickle, each error naming the file and what was wrong."""

from __future__ import annotations

import gzip
import hashlib
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from gpucnn.data.dataset import DataError

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), e.g. MNIST's train-images-idx3-ubyte."""
    return read_idx_content(path)[0]


def read_idx_content(path: str | Path) -> tuple[np.ndarray, str]:
    """(the array of an IDX file, optionally gzipped; the SHA-256 of its decompressed
    bytes). The array is read straight into its own buffer: a 47 MB file costs 47 MB."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {str(path)!r} does not exist")
    digest = hashlib.sha256()
    try:
        with _open_maybe_gzip(path) as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_TYPES:
                raise DataError(
                    f"IDX file {str(path)!r} is corrupt: bad magic number "
                    f"{magic.hex() or '(empty)'} (expected 0000 then a type code "
                    "08/09/0b/0c/0d/0e and the number of dimensions)"
                )
            ndim = magic[3]
            dims = handle.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataError(f"IDX file {str(path)!r} is corrupt: truncated header")
            shape = struct.unpack(f">{ndim}I", dims)
            array = np.empty(shape, dtype=np.dtype(_IDX_TYPES[magic[2]]))
            expected = array.nbytes
            got = handle.readinto(memoryview(array).cast("B")) if expected else 0
            extra = len(handle.read(1 << 16))
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"IDX file {str(path)!r} could not be read: {_why(err)}") from None
    if got != expected or extra:
        follow = f"{got} bytes" if not extra else "more bytes"
        raise DataError(
            f"IDX file {str(path)!r} is corrupt: header says shape {shape} ({expected} bytes) "
            f"but {follow} of data follow"
        )
    digest.update(magic + dims)
    digest.update(memoryview(array).cast("B"))
    return array, digest.hexdigest()


def file_md5(path: Path) -> str:
    """The MD5 of a file's bytes as they are (what dataset authors publish)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(path: str | Path) -> str:
    """SHA-256 of a file's decompressed bytes (gzip is undone; anything else as is)."""
    digest = hashlib.sha256()
    try:
        with _open_maybe_gzip(Path(path)) as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{str(path)!r} could not be read: {_why(err)}") from None
    return digest.hexdigest()


def _open_maybe_gzip(path: Path) -> Any:
    """gzip by its magic bytes, not by the name: a cached file may be either."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _why(err: BaseException) -> str:
    if isinstance(err, EOFError):
        return "truncated (the compressed data ends early)"
    return f"{type(err).__name__}: {err}" if not str(err).startswith("[Errno") else str(err)


# The MNIST family's four files (Fashion-MNIST uses the same names), each may be gzipped.
MNIST_FILES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find(directory: Path, stems: tuple[str, ...]) -> Path:
    found = _found(directory, stems)
    if found is None:
        raise DataError(
            f"data.path {str(directory)!r} has no {stems[0]} (looked for {', '.join(stems)}, "
            "optionally .gz)"
        )
    return found


def load_idx_dir(path: str | Path) -> dict[str, np.ndarray]:
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"data.path {str(directory)!r} is not a directory of IDX files")
    arrays = {key: read_idx(_find(directory, stems)) for key, stems in MNIST_FILES.items()}
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


def has_mnist_files(folder: Path) -> bool:
    return folder.is_dir() and all(
        _found(folder, stems) is not None for stems in MNIST_FILES.values()
    )


def read_mnist_family(
    folder: Path, image_shape: tuple[int, int] = (28, 28), classes: int = 10
) -> tuple[dict[str, np.ndarray], dict[str, tuple[Path, str]]]:
    """The four IDX files of an MNIST-style dataset in ``folder``: (arrays x_train,
    y_train, x_test, y_test as uint8; each file's (path, content SHA-256)). Each file
    must be what its name says: images (N, *image_shape) of unsigned bytes, labels (N,)
    below ``classes``, as many labels as images."""
    arrays, files = {}, {}
    for key, stems in MNIST_FILES.items():
        path = _find(folder, stems)
        array, digest = read_idx_content(path)
        want = (None, *image_shape) if key.startswith("x") else (None,)
        if array.dtype != np.uint8 or array.ndim != len(want) or array.shape[1:] != want[1:]:
            shape = "(N, " + ", ".join(map(str, image_shape)) + ")" if key[0] == "x" else "(N,)"
            raise DataError(
                f"IDX file {str(path)!r} holds {array.dtype} of shape {array.shape}; "
                f"{'images' if key[0] == 'x' else 'labels'} must be unsigned bytes of shape "
                f"{shape}"
            )
        if key.startswith("y") and array.size and int(array.max()) >= classes:
            raise DataError(
                f"IDX file {str(path)!r} has label {int(array.max())}; allowed: 0..{classes - 1}"
            )
        arrays[key], files[path.name] = array, (path, digest)
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(images) != len(labels):
            raise DataError(
                f"{str(folder)!r}: the {split} images file has {len(images)} images but its "
                f"labels file has {len(labels)} labels"
            )
    return arrays, files


def _found(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = ("test_batch.bin",)
_CIFAR_RECORD = 1 + 3 * 32 * 32  # a label byte, then 1024 red, 1024 green, 1024 blue


def cifar10_archive(location: Path) -> Path | None:
    """The CIFAR-10 binary archive or folder of .bin files at ``location`` (the archive
    itself, a folder holding it, the extracted folder, or its parent), else None."""
    if location.is_file():
        return location
    for candidate in (location / CIFAR10_ARCHIVE, location / CIFAR10_FOLDER, location):
        if candidate.is_file() or (
            candidate.is_dir() and all((candidate / n).is_file() for n in CIFAR10_TRAIN)
        ):
            return candidate
    return None


def read_cifar10_binary(
    location: Path,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[Path, str]]]:
    """CIFAR-10's binary version (``cifar-10-binary.tar.gz``, or its extracted folder of
    .bin files), read without unpickling or extracting anything to disk: (arrays
    x_train (50000, 3, 32, 32) uint8, y_train, x_test, y_test; each batch file's
    (where, content SHA-256))."""
    where = cifar10_archive(location)
    if where is None:
        raise DataError(
            f"data.path {str(location)!r} holds no {CIFAR10_ARCHIVE} and no "
            f"{CIFAR10_FOLDER}/ with {', '.join(CIFAR10_TRAIN + CIFAR10_TEST)}"
        )
    try:
        if where.is_dir():
            sizes = {n: (where / n).stat().st_size for n in CIFAR10_TRAIN + CIFAR10_TEST}
            return _cifar_arrays(sizes, lambda name: (where / name).read_bytes(), where)
        with tarfile.open(where, "r:gz") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            missing = [n for n in CIFAR10_TRAIN + CIFAR10_TEST if n not in members]
            if missing:
                raise DataError(f"archive {str(where)!r} has no {', '.join(missing)}")

            def read(name: str) -> bytes:
                handle = archive.extractfile(members[name])
                return handle.read() if handle is not None else b""

            sizes = {n: members[n].size for n in CIFAR10_TRAIN + CIFAR10_TEST}
            return _cifar_arrays(sizes, read, where)
    except FileNotFoundError as err:
        raise DataError(f"CIFAR-10 file {err.filename!r} does not exist") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"archive {str(where)!r} could not be read: {_why(err)}") from None


def _cifar_arrays(
    sizes: dict[str, int], read: Any, where: Path
) -> tuple[dict[str, np.ndarray], dict[str, tuple[Path, str]]]:
    """Arrays from the batch files (``sizes``: their lengths; ``read(name)``: their
    bytes), filled one file at a time: the set is held once, plus one file."""
    for name, size in sizes.items():
        if size == 0 or size % _CIFAR_RECORD:
            raise DataError(
                f"CIFAR-10 file {name} in {str(where)!r} is corrupt: {size} bytes is not "
                f"a whole number of {_CIFAR_RECORD}-byte records"
            )
    files, arrays = {}, {}
    for split, names in (("train", CIFAR10_TRAIN), ("test", CIFAR10_TEST)):
        count = sum(sizes[n] // _CIFAR_RECORD for n in names)
        images = np.empty((count, 3, 32, 32), np.uint8)
        labels = np.empty(count, np.uint8)
        at = 0
        for name in names:
            blob = read(name)
            if len(blob) != sizes[name]:
                raise DataError(
                    f"CIFAR-10 file {name} in {str(where)!r} is truncated: {len(blob)} of "
                    f"{sizes[name]} bytes"
                )
            files[name] = (where, hashlib.sha256(blob).hexdigest())
            records = np.frombuffer(blob, np.uint8).reshape(-1, _CIFAR_RECORD)
            n = len(records)
            labels[at : at + n] = records[:, 0]
            images[at : at + n] = records[:, 1:].reshape(n, 3, 32, 32)
            at += n
            del blob, records
        if labels.size and int(labels.max()) > 9:
            raise DataError(
                f"CIFAR-10 {split} files in {str(where)!r} have label {int(labels.max())}; "
                "allowed: 0..9"
            )
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    return arrays, files
