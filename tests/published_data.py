"""Files in the exact published formats of MNIST (gzip IDX) and CIFAR-10 (binary records
in a tar.gz), made by the tests, and a real HTTP server on 127.0.0.1 that serves a
folder (and can misbehave: cut a file short, or close the connection half-way)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import struct
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file, built here from the format's description (magic 0x0000,
    type 0x08, the number of dimensions, big-endian sizes, then the bytes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def learnable_images(n: int, shape: tuple[int, ...], classes: int, seed: int) -> tuple:
    """(images uint8 (n, *shape), labels): class k is a bright band at row band k plus
    noise, so a small net can learn it."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
    rows = shape[-2]
    band = max(rows // classes, 1)
    for k in range(classes):
        top = (k * band) % rows
        images[labels == k, ..., top : top + band, :] = 230
    return images, labels


def write_mnist(folder: Path, n_train: int = 300, n_test: int = 100, gz: bool = True) -> dict:
    """The four MNIST files in ``folder``; returns their arrays and content SHA-256s."""
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = learnable_images(n_train, (28, 28), 10, 1)
    x_test, y_test = learnable_images(n_test, (28, 28), 10, 2)
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    names = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    digests = {}
    for key, stem in names.items():
        raw = idx_bytes(arrays[key])
        digests[stem] = hashlib.sha256(raw).hexdigest()
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (folder / stem).write_bytes(raw)
    return {"arrays": arrays, "content_sha256": digests}


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10's binary records, from its description: per image one label byte, then
    the 1024 red, 1024 green and 1024 blue values, each channel row by row."""
    rows = [
        bytes([int(label)]) + image.tobytes() for image, label in zip(images, labels, strict=True)
    ]
    return b"".join(rows)


def write_cifar(path: Path, n_per_batch: int = 40, n_test: int = 40) -> dict:
    """A ``cifar-10-binary.tar.gz`` at ``path`` (members under cifar-10-batches-bin/)."""
    batches, train_x, train_y = {}, [], []
    for i in range(1, 6):
        x, y = learnable_images(n_per_batch, (3, 32, 32), 10, 10 + i)
        batches[f"data_batch_{i}.bin"] = cifar_records(x, y)
        train_x.append(x)
        train_y.append(y)
    x_test, y_test = learnable_images(n_test, (3, 32, 32), 10, 20)
    batches["test_batch.bin"] = cifar_records(x_test, y_test)
    batches["batches.meta.txt"] = "\n".join(["airplane", "automobile"]).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    arrays = {
        "x_train": np.concatenate(train_x),
        "y_train": np.concatenate(train_y),
        "x_test": x_test,
        "y_test": y_test,
    }
    return {"arrays": arrays, "batches": batches}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; ``/cut/NAME`` promises NAME's full length but sends half and
    ends the response; ``/drop/NAME`` sends half and then resets the connection;
    ``/slow/NAME`` sends it slowly."""

    def log_message(self, *args) -> None:  # the test output stays clean
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/slow/"):  # 1 kB per 50 ms: a download that takes a while
            body = (Path(self.directory) / self.path.split("/", 2)[2]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for start in range(0, len(body), 1024):
                    self.wfile.write(body[start : start + 1024])
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:  # the client went away
                pass
            self.close_connection = True
            return
        for mode in ("cut", "drop"):
            if self.path.startswith(f"/{mode}/"):
                body = (Path(self.directory) / self.path.split("/", 2)[2]).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if mode == "drop":
                    self.connection.shutdown(2)
                self.close_connection = True
                return
        super().do_GET()


@contextmanager
def serving(folder: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (a free port) serving ``folder``: its base URL."""

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(folder), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
