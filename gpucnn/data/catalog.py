"""The datasets gpucnn knows by name, and how a data config becomes a :class:`Dataset`.

- ``seed_20x20``: the lecture's two artificial 20x20 classes (:mod:`gpucnn.data.builtin`).
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download).
- ``mnist``, ``fashion_mnist``: the published gzip IDX files; ``cifar10``: its binary
  version (``cifar-10-binary.tar.gz``), never its pickled one. Found or downloaded as
  :mod:`gpucnn.data.sources` says, checked, kept as bytes.
- ``idx``: MNIST-format IDX files in the directory ``path``.
- ``npz``: arrays in the ``.npz`` file ``path``.
"""

from __future__ import annotations

import hashlib
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gpucnn.data.builtin import make_seed_20x20
from gpucnn.data.dataset import (
    Augmentation,
    DataError,
    Dataset,
    as_labels,
    build_byte_dataset,
    build_dataset,
    split_off_test,
)
from gpucnn.data.formats import (
    cifar10_archive,
    file_md5,
    has_mnist_files,
    load_idx_dir,
    load_npz,
    read_cifar10_binary,
    read_mnist_family,
)
from gpucnn.data.sources import SOURCES, Found, Source, locate


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
    cache_dir: str | None = None  # published datasets: where downloads are kept
    url: str | None = None  # published datasets: the base URL to download from
    download: bool = True  # published datasets: download when not found
    crop_padding: int = 0  # training batches: random crops of the image padded so
    flip: bool = False  # training batches: flip half of them left-right


CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}


def _published(name: str, options: DataOptions) -> Dataset:
    """MNIST, Fashion-MNIST or CIFAR-10 from their published files, found or downloaded
    (:func:`gpucnn.data.sources.locate`) and checked (:func:`_check_files`)."""
    source = SOURCES[name]
    if name == "cifar10":

        def has_files(folder: Path) -> bool:
            return (folder / source.files[0].name).is_file()

    else:
        has_files = has_mnist_files
    found = locate(
        source, has_files, options.path, options.cache_dir, options.url, options.download
    )
    if name == "cifar10":
        arrays, files = read_cifar10_binary(found.location)
    else:
        if not found.location.is_dir():
            raise DataError(f"data.path {str(found.location)!r} is not a folder of IDX files")
        arrays, files = read_mnist_family(found.location)
    _check_files(source, files, found)
    dataset = build_byte_dataset(
        name, arrays, options.val_fraction, options.seed + 1, options.normalize
    )
    del arrays
    summary = "".join(f"{n}:{digest}\n" for n, (_, digest) in sorted(files.items()))
    dataset.content_digest = hashlib.sha256(summary.encode()).hexdigest()
    dataset.source = found.url or str(found.location)
    dataset.class_names = CLASS_NAMES[name]
    return dataset


def _check_files(source: Source, files: dict[str, tuple[Path, str]], found: Found) -> None:
    """Each file against what is pinned for it: its content's SHA-256 where gpucnn pins
    one (a mismatch is an error), else the published archive's MD5 (files that are not
    the published archives are read for their format only, and that is said once)."""
    published = {f.name: f for f in source.files}
    unchecked = []
    md5s: dict[Path, str] = {}  # CIFAR-10's six batches share one archive: one MD5
    for name, (path, content) in files.items():
        spec = published.get(name) or published.get(f"{name}.gz")
        if spec is not None and spec.content_sha256 is not None:
            if content != spec.content_sha256:
                raise DataError(
                    f"{str(path)!r} is not {source.name}'s {spec.name}: the SHA-256 of its "
                    f"content is {content}, expected {spec.content_sha256}"
                )
            continue
        archive = cifar10_archive(path) if source.name == "cifar10" else path
        spec = published.get(archive.name) if archive is not None else None
        if spec is None or not archive.is_file():
            unchecked.append(str(archive or path))
            continue
        if archive not in md5s:
            md5s[archive] = file_md5(archive)
        if md5s[archive] != spec.md5:
            unchecked.append(str(archive))
    if unchecked and found.how != "download":
        names = sorted({Path(u).name for u in unchecked})
        folders = sorted({str(Path(u).parent) for u in unchecked})
        print(
            f"gpucnn: {source.name}: {', '.join(names)} in {', '.join(folders)} "
            f"{'is' if len(names) == 1 else 'are'} not the published archive (its MD5 "
            "differs) and gpucnn pins no digest of the content: only the format was checked",
            file=sys.stderr,
            flush=True,
        )


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
    "mnist": _published,
    "fashion_mnist": _published,
    "cifar10": _published,
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
    cache_dir: str | None = None,
    url: str | None = None,
    download: bool = True,
    crop_padding: int = 0,
    flip: bool = False,
) -> Dataset:
    """Load dataset ``name`` (one of DATASETS) with seeded, stratified splits; the
    settings are :class:`DataOptions`'s."""
    if name not in LOADERS:
        raise DataError(f"dataset {name!r} is not known; allowed: {', '.join(DATASETS)}")
    options = DataOptions(
        path=path,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        n_per_class=n_per_class,
        noise=noise,
        normalize=normalize,
        cache_dir=cache_dir,
        url=url,
        download=download,
        crop_padding=crop_padding,
        flip=flip,
    )
    padding = options.crop_padding
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise DataError(f"data.crop_padding must be an int >= 0, got {padding!r}")
    for what in ("val_fraction", "test_fraction"):
        value = getattr(options, what)
        if not 0 <= value < 1:
            raise DataError(f"data.{what} must be in [0, 1), got {value!r}")
    seed = options.seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(f"data.seed must be an int >= 0, got {seed!r}")
    dataset = LOADERS[name](name, replace(options, seed=int(seed)))
    if padding and min(dataset.input_shape[1:]) <= 0:
        raise DataError(f"data.crop_padding={padding} needs images, got {dataset.input_shape}")
    dataset.augmentation = Augmentation(padding, bool(options.flip))
    return dataset


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
