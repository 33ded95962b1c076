"""MNIST, Fashion-MNIST and CIFAR-10 from their published formats: read, checked, kept as
bytes, scaled per batch; found in the order the docs give; downloaded from a real HTTP
server on 127.0.0.1 that behaves, lies or breaks off."""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest

from gpucnn.array.backend import to_host
from gpucnn.array.inputs import ByteImages, crop_and_flip, random_words
from gpucnn.data import DataError, load_dataset
from gpucnn.data import sources as data_sources
from gpucnn.data.sources import PublishedFile, fetch
from tests.published_data import free_port, idx_bytes, serving, write_cifar, write_mnist

FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_package = pytest.mark.skipif(
    not (FASHION_SYSTEM / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (CI installs it)",
)


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """Every test starts with its own empty cache, never the user's."""
    monkeypatch.setenv("GPUCNN_DATA", str(tmp_path / "cache"))


def test_mnist_files_are_read_as_bytes_with_their_content_as_identity(tmp_path, capsys):
    made = write_mnist(tmp_path / "mnist")
    data = load_dataset("mnist", path=str(tmp_path / "mnist"), val_fraction=0.1)
    assert data.x_train.dtype == np.uint8 and data.input_shape == (1, 28, 28)
    sizes = data.sizes()  # 10% of each class held out, rounded per class
    assert sizes["train"] + sizes["val"] == 300 and 25 <= sizes["val"] <= 35
    assert sizes["test"] == 100
    np.testing.assert_array_equal(data.x_test[:, 0], made["arrays"]["x_test"])
    np.testing.assert_array_equal(data.y_test, made["arrays"]["y_test"])
    # Every training and validation image is one of the file's, each exactly once.
    kept = np.concatenate([data.x_train, data.x_val])[:, 0].reshape(300, -1)
    original = made["arrays"]["x_train"].reshape(300, -1)
    assert sorted(map(bytes, kept)) == sorted(map(bytes, original))
    # The scaling is the training split's own mean and standard deviation.
    pixels = data.x_train.astype(np.float64)
    assert data.scaling.mean[0] == pytest.approx(pixels.mean(), rel=1e-12)
    assert data.scaling.std[0] == pytest.approx(pixels.std(), rel=1e-12)
    # Identity: the content of the four files, whatever their compression.
    summary = "".join(
        f"{name}.gz:{digest}\n" for name, digest in sorted(made["content_sha256"].items())
    )
    assert data.digest() == hashlib.sha256(summary.encode()).hexdigest()
    assert "only the format was checked" in capsys.readouterr().err


def test_uncompressed_files_are_read_too(tmp_path):
    made = write_mnist(tmp_path / "raw", gz=False)
    data = load_dataset("mnist", path=str(tmp_path / "raw"))
    np.testing.assert_array_equal(data.x_test[:, 0], made["arrays"]["x_test"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("magic", r"train-images-idx3-ubyte.gz' is corrupt: bad magic number 00000703"),
        ("truncated", r"train-images-idx3-ubyte.gz' could not be read: truncated"),
        ("short", r"train-images-idx3-ubyte.gz' is corrupt: header says shape \(300, 28, 28\)"),
        ("labels", r"the train images file has 300 images but its labels file has 299"),
        ("label_value", r"train-labels-idx1-ubyte.gz' has label 12; allowed: 0..9"),
        ("image_shape", r"train-images-idx3-ubyte.gz' holds uint8 of shape \(300, 32, 32\)"),
    ],
)
def test_a_damaged_file_is_one_error_naming_it(tmp_path, damage, message):
    folder = tmp_path / "mnist"
    made = write_mnist(folder)
    images, labels = made["arrays"]["x_train"], made["arrays"]["y_train"]
    target = folder / "train-images-idx3-ubyte.gz"
    raw = idx_bytes(images)
    if damage == "magic":
        target.write_bytes(gzip.compress(b"\x00\x00\x07" + raw[3:]))
    elif damage == "truncated":
        target.write_bytes(gzip.compress(raw)[:-5000])
    elif damage == "short":
        target.write_bytes(gzip.compress(raw[:-784]))
    elif damage == "labels":
        (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[:-1])))
    elif damage == "label_value":
        bad = labels.copy()
        bad[5] = 12
        (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(bad)))
    elif damage == "image_shape":
        target.write_bytes(gzip.compress(idx_bytes(np.zeros((300, 32, 32), np.uint8))))
    with pytest.raises(DataError, match=message):
        load_dataset("mnist", path=str(folder))


def test_cifar10_binary_archive_and_its_extracted_folder_give_the_same_data(tmp_path):
    archive = tmp_path / "dl" / "cifar-10-binary.tar.gz"
    made = write_cifar(archive)
    by_archive = load_dataset("cifar10", path=str(archive), val_fraction=0.1)
    by_folder = load_dataset("cifar10", path=str(archive.parent))
    with tarfile.open(archive) as opened:
        opened.extractall(tmp_path / "x", filter="data")
    extracted = load_dataset("cifar10", path=str(tmp_path / "x" / "cifar-10-batches-bin"))
    assert by_archive.input_shape == (3, 32, 32) and by_archive.x_train.dtype == np.uint8
    sizes = by_archive.sizes()
    assert sizes["train"] + sizes["val"] == 200 and sizes["test"] == 40
    # Record layout: label byte, then red, green, blue planes row by row.
    np.testing.assert_array_equal(by_archive.x_test, made["arrays"]["x_test"])
    np.testing.assert_array_equal(by_archive.y_test, made["arrays"]["y_test"])
    first = made["batches"]["test_batch.bin"][:3073]
    assert first[0] == by_archive.y_test[0]
    np.testing.assert_array_equal(
        np.frombuffer(first[1:1025], np.uint8).reshape(32, 32), by_archive.x_test[0, 0]
    )
    for other in (by_folder, extracted):
        np.testing.assert_array_equal(other.x_train, by_archive.x_train)
        assert other.digest() == by_archive.digest()
    # Per-channel statistics: three means, from the training split.
    pixels = by_archive.x_train.astype(np.float64)
    np.testing.assert_allclose(by_archive.scaling.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(by_archive.scaling.std, pixels.std(axis=(0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("record", r"data_batch_2.bin in .* is corrupt: 122919 bytes is not a whole number"),
        ("missing", r"has no test_batch.bin"),
        ("truncated", r"could not be read"),
    ],
)
def test_a_damaged_cifar_archive_is_one_error(tmp_path, damage, message):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    made = write_cifar(archive)
    batches = made["batches"]
    if damage == "truncated":
        archive.write_bytes(archive.read_bytes()[:-20000])
    else:
        if damage == "record":
            batches["data_batch_2.bin"] = batches["data_batch_2.bin"][:-1]
        else:
            del batches["test_batch.bin"]
        import io

        with tarfile.open(archive, "w:gz") as out:
            for name, blob in batches.items():
                info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
                info.size = len(blob)
                out.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", path=str(archive))


@needs_fashion_package
def test_fashion_mnist_from_the_debian_package_matches_the_pinned_content():
    data = load_dataset("fashion_mnist")
    assert data.source == str(FASHION_SYSTEM)
    assert data.sizes() == {"train": 54000, "val": 6000, "test": 10000}
    assert data.class_names[9] == "Ankle boot"
    # The pinned digests are of the decompressed bytes, recomputed here independently.
    for spec in data_sources.SOURCES["fashion_mnist"].files:
        with gzip.open(FASHION_SYSTEM / spec.name) as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == spec.content_sha256


@needs_fashion_package
def test_fashion_mnist_files_that_differ_from_the_pinned_content_are_refused(tmp_path):
    folder = tmp_path / "fashion"
    folder.mkdir()
    for spec in data_sources.SOURCES["fashion_mnist"].files:
        raw = gzip.decompress((FASHION_SYSTEM / spec.name).read_bytes())
        if spec.name.startswith("t10k-labels"):
            raw = raw[:-1] + bytes([(raw[-1] + 1) % 10])  # one label changed
        (folder / spec.name).write_bytes(gzip.compress(raw, compresslevel=1))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz' is not fashion_mnist's"):
        load_dataset("fashion_mnist", path=str(folder))


def test_the_cache_comes_before_a_download_and_data_path_before_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    write_mnist(cache / "mnist")
    in_cache = load_dataset("mnist", download=False)
    assert in_cache.source == str(cache / "mnist")
    given = write_mnist(tmp_path / "given", n_train=200)
    by_path = load_dataset("mnist", path=str(tmp_path / "given"), cache_dir=str(cache))
    assert by_path.sizes()["train"] + by_path.sizes()["val"] == 200
    assert by_path.digest() != in_cache.digest()
    np.testing.assert_array_equal(by_path.x_test[:, 0], given["arrays"]["x_test"])
    other = tmp_path / "other"
    write_mnist(other / "mnist", n_train=100)
    by_setting = load_dataset("mnist", cache_dir=str(other), download=False)
    assert by_setting.source == str(other / "mnist")


def test_not_found_offline_names_every_way_to_get_the_data(tmp_path):
    port = free_port()
    with pytest.raises(DataError) as raised:
        load_dataset("mnist", url=f"http://127.0.0.1:{port}")
    message = str(raised.value)
    assert "\n" not in message
    assert f"download of http://127.0.0.1:{port}/train-images-idx3-ubyte.gz failed" in message
    assert str(tmp_path / "cache" / "mnist") in message and "data.path=FOLDER" in message
    assert not (tmp_path / "cache" / "mnist").exists() or not any(
        (tmp_path / "cache" / "mnist").iterdir()
    )
    with pytest.raises(DataError, match=r"not found \(data.download=false\).*data.download=true"):
        load_dataset("mnist", download=False)


def test_fashion_offline_message_names_the_debian_package(tmp_path, monkeypatch):
    source = data_sources.SOURCES["fashion_mnist"]
    monkeypatch.setitem(
        data_sources.SOURCES,
        "fashion_mnist",
        data_sources.Source(
            source.name, source.url, source.files, str(tmp_path / "none"), source.package
        ),
    )
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", download=False)


# --- downloads from a real HTTP server on 127.0.0.1 ---------------------------------


def published(path: Path, **changes) -> PublishedFile:
    """What would be pinned for ``path``: its size and MD5, computed here."""
    data = path.read_bytes()
    fields = {"name": path.name, "size": len(data), "md5": hashlib.md5(data).hexdigest()}
    return PublishedFile(**{**fields, **changes})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_good_download_is_checked_then_renamed_into_place(tmp_path):
    served = tmp_path / "served"
    write_mnist(served)
    name = "train-images-idx3-ubyte.gz"
    target = tmp_path / "cache" / "mnist" / name
    with serving(served) as url:
        fetch(f"{url}/{name}", target, published(served / name), progress=False)
    assert target.read_bytes() == (served / name).read_bytes()
    assert leftovers(target.parent) == [name]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("digest", r"is not the published train-images-idx3-ubyte.gz: \d+ bytes with MD5"),
        ("cut", r"(truncated: \d+ of \d+ bytes arrived|broke off after \d+ bytes)"),
        ("drop", r"(truncated: \d+ of \d+ bytes arrived|broke off after \d+ bytes)"),
        ("missing", r"failed: HTTP 404"),
    ],
)
def test_a_bad_download_leaves_nothing_behind(tmp_path, how, message):
    served = tmp_path / "served"
    write_mnist(served)
    name = "train-images-idx3-ubyte.gz"
    target = tmp_path / "cache" / "mnist" / name
    expected = published(served / name)
    if how == "digest":  # the server sends other bytes than the ones pinned
        expected = published(served / name, md5=hashlib.md5(b"other").hexdigest())
    with serving(served) as url:
        address = {
            "digest": f"{url}/{name}",
            "cut": f"{url}/cut/{name}",
            "drop": f"{url}/drop/{name}",
            "missing": f"{url}/nothing-here.gz",
        }[how]
        with pytest.raises(DataError, match=message):
            fetch(address, target, expected, progress=False)
    assert leftovers(target.parent) == []


@needs_fashion_package
def test_fashion_mnist_downloads_from_a_mirror_that_recompressed_it(tmp_path, monkeypatch):
    """Debian's files differ from the published archives but hold the pinned content: a
    mirror serving them passes by content; a later run finds them in the cache."""
    source = data_sources.SOURCES["fashion_mnist"]
    no_system = data_sources.Source(source.name, source.url, source.files, None, source.package)
    monkeypatch.setitem(data_sources.SOURCES, "fashion_mnist", no_system)
    with serving(FASHION_SYSTEM) as url:
        data = load_dataset("fashion_mnist", url=url)
    assert data.source == url
    cached = tmp_path / "cache" / "fashion_mnist"
    assert leftovers(cached) == sorted(f.name for f in source.files)
    again = load_dataset("fashion_mnist", download=False)
    assert again.source == str(cached) and again.digest() == data.digest()


def test_a_download_that_is_neither_published_nor_pinned_content_is_refused(tmp_path):
    served = tmp_path / "served"
    write_mnist(served)  # MNIST's format, not MNIST's published files
    with serving(served) as url, pytest.raises(DataError, match="is not the published"):
        load_dataset("mnist", url=url)
    assert leftovers(tmp_path / "cache" / "mnist") == []


# --- byte images on the backend: scaled per batch, varied per step ------------------


def test_byte_images_are_scaled_per_channel_as_the_dataset_says(backend):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 3, 4, 4)).astype(np.uint8)
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
    inputs = ByteImages(backend.xp, "float64", mean, std)
    out = to_host(inputs(backend.asarray(x)))
    expected = (x.astype(np.float64) - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    # in float32, bit for bit the textbook's cast, subtraction and division
    single = to_host(ByteImages(backend.xp, "float32", mean, std)(backend.asarray(x)))
    mean32 = np.array(mean, np.float32)[:, None, None]
    std32 = np.array(std, np.float32)[:, None, None]
    assert single.dtype == np.float32
    np.testing.assert_array_equal(single, (x.astype(np.float32) - mean32) / std32)


def test_crop_and_flip_moves_whole_images_and_is_the_same_for_a_step(backend):
    rng = np.random.default_rng(1)
    x = rng.integers(1, 256, (64, 2, 6, 5)).astype(np.uint8)
    padding = 2
    out = to_host(crop_and_flip(backend.asarray(x), padding, True, seed=3, step=7))
    again = to_host(crop_and_flip(backend.asarray(x), padding, True, seed=3, step=7))
    other = to_host(crop_and_flip(backend.asarray(x), padding, True, seed=3, step=8))
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    flips, offsets = 0, set()
    for i in range(len(x)):  # each output is one window of its padded image, maybe mirrored
        matches = [
            (dy, dx, mirror)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            for mirror in (False, True)
            if np.array_equal(
                out[i],
                (lambda w: w[..., ::-1] if mirror else w)(padded[i, :, dy : dy + 6, dx : dx + 5]),
            )
        ]
        assert matches, f"image {i} is not a window of its padded image"
        flips += matches[0][2]
        offsets.add(matches[0][:2])
    assert 16 < flips < 48 and len(offsets) > 10


def test_the_random_words_agree_between_backends_when_cupy_is_there(backend):
    words = to_host(random_words(backend.xp, 8, seed=5, step=11))
    reference = random_words(np, 8, seed=5, step=11)
    np.testing.assert_array_equal(words, reference)
    assert len(set(reference.tolist())) == 8
