"""Where a named dataset's files come from, and how they are checked.

A dataset with published files (MNIST, Fashion-MNIST, CIFAR-10) is looked for, in this
order: ``data.path`` (a folder, or the archive itself); the cache folder
(``data.cache_dir``, else ``$GPUCNN_DATA``, else ``~/.cache/gpucnn``, one subfolder per
dataset); a system folder a distribution package fills (Debian's
``dataset-fashion-mnist``); and, with ``data.download=true``, the dataset's canonical
URLs (``data.url`` replaces the base), into the cache.

Every file is checked. A download must be the published archive (its size and the
digest its authors or torchvision publish), or, where gpucnn pins a SHA-256 of the
decompressed content, have that content; it is written under a temporary name and
renamed only once it passed, so an interrupted or corrupt download never leaves a file a
later run would trust. A file found on disk is checked by its decompressed content where
a content digest is pinned (Debian re-compressed Fashion-MNIST, so its archives differ
from the published ones while the IDX bytes are the same), else by the published archive
digest; a file that is neither (files a user or a test made in the published format) is
read for its format only, and said so.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpucnn.data.dataset import DataError
from gpucnn.data.formats import content_sha256
from gpucnn.interrupts import stop_requested

CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = float(os.environ.get("GPUCNN_DOWNLOAD_TIMEOUT", "60"))


@dataclass(frozen=True)
class PublishedFile:
    """One file of a dataset as it is published: its name, its size in bytes and the
    MD5 published for it; ``content_sha256``: the SHA-256 of its decompressed bytes,
    where gpucnn could compute it from real files (None where it could not)."""

    name: str
    size: int
    md5: str
    content_sha256: str | None = None


@dataclass(frozen=True)
class Source:
    """A named dataset's files, where they are published, and the Debian-style system
    folder that may hold them."""

    name: str
    url: str  # base URL: each file is url + "/" + its name
    files: tuple[PublishedFile, ...]
    system_dir: str | None = None
    package: str | None = None  # the distribution package that fills system_dir


# MD5s: as published by the dataset's authors (CIFAR-10: the Toronto page) or, for the
# MNIST family, torchvision's resources lists; sizes as published (MNIST's page) or as
# served. Content SHA-256s of Fashion-MNIST computed from Debian's dataset-fashion-mnist
# (0.0~git20200523.55506a9-1), whose gzip files carry the same IDX bytes under another
# gzip header.
File = PublishedFile
SOURCES: dict[str, Source] = {
    "mnist": Source(
        "mnist",
        "https://ossci-datasets.s3.amazonaws.com/mnist",
        (
            File("train-images-idx3-ubyte.gz", 9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            File("train-labels-idx1-ubyte.gz", 28881, "d53e105ee54ea40749a09fcbcd1e9432"),
            File("t10k-images-idx3-ubyte.gz", 1648877, "9fb629c4189551a2d022fa330f9573f3"),
            File("t10k-labels-idx1-ubyte.gz", 4542, "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
    ),
    "fashion_mnist": Source(
        "fashion_mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
        (
            File(
                "train-images-idx3-ubyte.gz",
                26421880,
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            File(
                "train-labels-idx1-ubyte.gz",
                29515,
                "25c81989df183df01b3e8a0aad5dffbe",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            File(
                "t10k-images-idx3-ubyte.gz",
                4422102,
                "bef4ecab320f06d8554ea6380940ec79",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            File(
                "t10k-labels-idx1-ubyte.gz",
                5148,
                "bb300cfdad3c16e7a12a480ee83cd310",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        ),
        system_dir="/usr/share/datasets/fashion-mnist",
        package="dataset-fashion-mnist",
    ),
    "cifar10": Source(
        "cifar10",
        "https://www.cs.toronto.edu/~kriz",
        (File("cifar-10-binary.tar.gz", 170052171, "c32a1d4ab5d03f1284b67883e8d87530"),),
    ),
}


def default_cache_dir() -> Path:
    """``$GPUCNN_DATA``, else ``~/.cache/gpucnn``."""
    return Path(os.environ.get("GPUCNN_DATA") or Path.home() / ".cache" / "gpucnn")


@dataclass(frozen=True)
class Found:
    """Where a dataset's files were found: the folder or archive, how (path, cache,
    system, download) and the URL they came from when downloaded."""

    location: Path
    how: str
    url: str | None = None


def locate(
    source: Source,
    has_files: Callable[[Path], bool],
    path: str | None,
    cache_dir: str | None,
    url: str | None,
    download: bool,
    progress: bool | None = None,
) -> Found:
    """The folder (or archive) holding ``source``'s files, looked for in the order of
    this module's docstring; ``has_files(folder)`` says whether a folder holds them.
    Raises DataError naming the ways to get them when none works."""
    if path:
        given = Path(path).expanduser()
        if not given.exists():
            raise DataError(f"data.path {str(given)!r} does not exist")
        return Found(given, "path")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = cache / source.name
    if has_files(folder):
        return Found(folder, "cache")
    if source.system_dir and has_files(Path(source.system_dir)):
        return Found(Path(source.system_dir), "system")
    if not download:
        raise DataError(_not_found(source, folder, "data.download=false"))
    base = (url or source.url).rstrip("/")
    try:
        for published in source.files:
            target = folder / published.name
            if not target.is_file():
                fetch(f"{base}/{published.name}", target, published, progress)
    except DataError as err:
        if getattr(err, "offline", False):
            raise DataError(f"{err}; {_not_found(source, folder, 'offline')}") from None
        raise
    return Found(folder, "download", base)


def _not_found(source: Source, folder: Path, why: str) -> str:
    ways = [
        f"put its files ({', '.join(f.name for f in source.files)}) in {folder} or give "
        "data.path=FOLDER",
        "set data.cache_dir=FOLDER (or $GPUCNN_DATA) to a folder that holds them",
    ]
    if source.package:
        ways.append(f"apt-get install {source.package} (fills {source.system_dir})")
    if why != "offline":
        ways.append("allow data.download=true")
    return f"dataset {source.name!r} was not found ({why}): " + "; or ".join(ways)


class DownloadStopped(Exception):
    """A stop was requested (SIGTERM) during a download; nothing of it was kept."""

    def __init__(self, signal_number: int, url: str) -> None:
        super().__init__(f"stopped by signal {signal_number} while downloading {url}")
        self.signal_number = signal_number


def fetch(url: str, target: Path, published: PublishedFile, progress: bool | None = None) -> None:
    """Download ``url`` to ``target``: streamed to a temporary name beside it, checked
    (:func:`check_download`), then renamed. On any failure nothing is left at
    ``target`` or under the temporary name, and DataError says what went wrong."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    started = time.perf_counter()
    try:
        received, md5 = _stream(url, partial, published, progress)
        check_download(url, partial, published, received, md5)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    print(
        f"gpucnn: downloaded {url} ({received / 1e6:.1f} MB in {seconds:.1f} s), checked, "
        f"kept as {target}",
        file=sys.stderr,
        flush=True,
    )


def _stream(
    url: str, partial: Path, published: PublishedFile, progress: bool | None
) -> tuple[int, str]:
    """Write ``url`` to ``partial``; (bytes received, their MD5). A short body (the
    server closed early, or sent less than its Content-Length) is a DataError."""
    try:
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)  # noqa: S310
    except urllib.error.HTTPError as err:
        raise DataError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        failure = DataError(f"download of {url} failed: {reason}")
        failure.offline = True  # type: ignore[attr-defined]
        raise failure from None
    md5, received = hashlib.md5(usedforsecurity=False), 0
    length = response.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    bar = _bar(progress, expected or published.size, published.name)
    try:
        with response, open(partial, "wb") as out:
            while True:
                signal_number = stop_requested()
                if signal_number:
                    raise DownloadStopped(signal_number, url)
                try:
                    block = response.read(CHUNK)
                except (OSError, ValueError) as err:  # IncompleteRead, reset, timeout
                    raise DataError(
                        f"download of {url} broke off after {received} bytes: {err}"
                    ) from None
                if not block:
                    break
                out.write(block)
                md5.update(block)
                received += len(block)
                bar(len(block))
    finally:
        bar(None)
    if expected is not None and received != expected:
        raise DataError(f"download of {url} is truncated: {received} of {expected} bytes arrived")
    return received, md5.hexdigest()


def check_download(
    url: str, partial: Path, published: PublishedFile, received: int, md5: str
) -> None:
    """A download passes as the published archive (size and MD5), or by its content's
    SHA-256 where one is pinned (a mirror that re-compressed the files)."""
    if received == published.size and md5 == published.md5:
        return
    if published.content_sha256 is not None:
        try:
            content = content_sha256(partial)
        except DataError:
            content = None
        if content == published.content_sha256:
            return
    raise DataError(
        f"download of {url} is not the published {published.name}: {received} bytes with MD5 "
        f"{md5}, expected {published.size} bytes with MD5 {published.md5}"
        + (" (or the pinned content)" if published.content_sha256 else "")
        + "; nothing was kept"
    )


def _bar(show: bool | None, total: int, name: str) -> Callable[[int | None], None]:
    """A progress callback (bytes received; None at the end): a tqdm bar on a terminal,
    else nothing (fetch says in one line what it kept)."""
    show = sys.stderr.isatty() if show is None else show
    if show:
        try:
            from tqdm import tqdm  # noqa: PLC0415 - optional, part of the train extra
        except ImportError:
            return lambda n: None
        bar = tqdm(total=total, desc=name, unit="B", unit_scale=True, file=sys.stderr)
        return lambda n: bar.update(n) if n is not None else bar.close()
    return lambda n: None
