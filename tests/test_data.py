"""Datasets: the lecture's 20x20 classes, digits splits, IDX and npz readers, errors."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest

from gpucnn.data import (
    DataError,
    load_dataset,
    read_idx,
    seed_patterns,
    stratified_split,
    write_idx,
)


def test_seed_20x20_classes_are_seeded_and_patterned():
    a = load_dataset("seed_20x20", n_per_class=10, noise=0.2, seed=3, normalize=False)
    b = load_dataset("seed_20x20", n_per_class=10, noise=0.2, seed=3, normalize=False)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (20, 1, 20, 20) and a.num_classes == 2
    assert np.bincount(a.y_train).tolist() == [10, 10]
    patterns = seed_patterns()
    # Each noisy image is closer to its own class pattern than to the other one.
    for x, y in zip(a.x_train[:, 0], a.y_train, strict=True):
        assert np.abs(x - patterns[int(y)]).mean() < np.abs(x - patterns[1 - int(y)]).mean()
    assert not np.array_equal(a.x_train[:1], a.x_test[:1])


def test_digits_split_is_stratified_seeded_and_normalised():
    data = load_dataset("digits", test_fraction=0.2, val_fraction=0.1, seed=0)
    sizes = data.sizes()
    assert sum(sizes.values()) == 1797 and sizes["test"] == pytest.approx(0.2 * 1797, abs=10)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    # Stratified: every class is in every split in about the same proportion.
    for labels in (data.y_train, data.y_val, data.y_test):
        share = np.bincount(labels, minlength=10) / len(labels)
        assert share.min() > 0.07 and share.max() < 0.13
    # Standardised with the training split's statistics only.
    assert abs(float(data.x_train.mean())) < 1e-4 and float(data.x_train.std()) == pytest.approx(
        1, abs=1e-3
    )
    again = load_dataset("digits", test_fraction=0.2, val_fraction=0.1, seed=0)
    np.testing.assert_array_equal(data.y_test, again.y_test)
    other = load_dataset("digits", test_fraction=0.2, val_fraction=0.1, seed=1)
    assert not np.array_equal(data.y_test, other.y_test)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"test_fraction": 0.0}, "data.test_fraction=0.0 leaves no test images out of 1797"),
        ({"test_fraction": 0.001}, "data.test_fraction=0.001 leaves no test images out of 1797"),
        ({"seed": -1}, "data.seed must be an int >= 0, got -1"),
        ({"seed": 1.5}, "data.seed must be an int >= 0, got 1.5"),
    ],
)
def test_digits_bad_split_settings(options, message):
    with pytest.raises(DataError, match=f"^{re.escape(message)}"):
        load_dataset("digits", **options)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_per_class": 0}, "data.n_per_class must be an int >= 1, got 0"),
        ({"noise": -1.0}, "data.noise must be a number >= 0, got -1.0"),
        ({"noise": float("nan")}, "data.noise must be a number >= 0, got nan"),
    ],
)
def test_seed_20x20_bad_settings(options, message):
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        load_dataset("seed_20x20", **options)


def test_a_directory_is_not_an_npz_file(tmp_path):
    with pytest.raises(DataError, match="is a directory; data=npz needs a .npz file$"):
        load_dataset("npz", path=str(tmp_path))


def test_a_numpy_integer_seed_is_a_seed():
    from_numpy, from_int = (
        load_dataset("seed_20x20", seed=np.int64(3)),
        load_dataset("seed_20x20", seed=3),
    )
    np.testing.assert_array_equal(from_numpy.x_train, from_int.x_train)
    np.testing.assert_array_equal(from_numpy.y_test, from_int.y_test)


def test_stratified_split_disjoint_and_complete():
    y = np.repeat(np.arange(3), [10, 20, 30])
    rest, held = stratified_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([rest, held]).tolist()) == list(range(60))
    assert np.bincount(y[held]).tolist() == [2, 4, 6]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_and_directory(tmp_path, suffix, rng):
    images = rng.integers(0, 256, (30, 6, 5), dtype=np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 3
    test_images, test_labels = images[:9], labels[:9]
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test_images)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", test_labels)
    np.testing.assert_array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), images)
    data = load_dataset("idx", path=str(tmp_path), val_fraction=0.2, normalize=False)
    assert data.input_shape == (1, 6, 5) and data.sizes() == {"train": 24, "val": 6, "test": 9}
    assert data.num_classes == 3


def test_idx_errors_name_the_path(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(DataError, match=f"IDX file '{bad}' is corrupt: bad magic number 12345678"):
        read_idx(bad)
    truncated = tmp_path / "short"
    truncated.write_bytes(
        bytes([0, 0, 8, 2]) + (3).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"\x00"
    )
    with pytest.raises(DataError, match=r"header says shape \(3, 3\) \(9 bytes\) but 1 bytes"):
        read_idx(truncated)
    with gzip.open(tmp_path / "empty.gz", "wb"):
        pass
    with pytest.raises(DataError, match="is corrupt: bad magic number \\(empty\\)"):
        read_idx(tmp_path / "empty.gz")
    with pytest.raises(DataError, match="data.path '/no/such/dir' is not a directory"):
        load_dataset("idx", path="/no/such/dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no train-images-idx3-ubyte"):
        load_dataset("idx", path=str(empty))


def test_npz_variants_and_errors(tmp_path, rng):
    x, y = rng.standard_normal((50, 4, 4)), np.arange(50) % 2
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    data = load_dataset("npz", path=str(tmp_path / "xy.npz"), test_fraction=0.2, val_fraction=0.25)
    assert data.sizes() == {"train": 30, "val": 10, "test": 10}
    np.savez(
        tmp_path / "split.npz",
        x_train=rng.standard_normal((20, 3, 5, 5)),
        y_train=np.arange(20) % 4,
        x_test=rng.standard_normal((8, 3, 5, 5)),
        y_test=np.arange(8) % 4,
    )
    data = load_dataset("npz", path=str(tmp_path / "split.npz"))
    assert data.input_shape == (3, 5, 5) and data.num_classes == 4
    np.savez(tmp_path / "bad.npz", x=x, y=y[:10])
    with pytest.raises(DataError, match="x has 50 samples but y has 10"):
        load_dataset("npz", path=str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "keys.npz", images=x)
    with pytest.raises(DataError, match=r"has keys \['images'\]; it needs x_train"):
        load_dataset("npz", path=str(tmp_path / "keys.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="is not a readable .npz file"):
        load_dataset("npz", path=str(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match="data.path '/missing.npz' does not exist"):
        load_dataset("npz", path="/missing.npz")
    with pytest.raises(DataError, match="dataset 'npz' needs data.path"):
        load_dataset("npz")
    with pytest.raises(DataError, match=r"^data.test_fraction=0.0 leaves no test images out of 50"):
        load_dataset("npz", path=str(tmp_path / "xy.npz"), test_fraction=0.0)
    np.savez(tmp_path / "empty_test.npz", x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])
    with pytest.raises(DataError, match="empty_test.npz': npz: the test split is empty$"):
        load_dataset("npz", path=str(tmp_path / "empty_test.npz"))
    np.savez(tmp_path / "labels.npz", x=x, y=y - 0.5)
    with pytest.raises(DataError, match="labels must be non-negative integers"):
        load_dataset("npz", path=str(tmp_path / "labels.npz"))


def test_non_finite_pixels_are_rejected_with_the_path(tmp_path, rng):
    x = rng.standard_normal((20, 4, 4))
    x[3, 1, 2] = np.nan
    x[7, 0, 0] = np.inf
    y = np.arange(20) % 2
    np.savez(tmp_path / "nan.npz", x_train=x, y_train=y, x_test=x[:2] * 0, y_test=y[:2])
    with pytest.raises(
        DataError, match=r"nan.npz': npz x_train: 2 pixel values are NaN or infinite"
    ):
        load_dataset("npz", path=str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "text.npz", x=np.array([["a"] * 4] * 20).reshape(20, 2, 2), y=np.zeros(20))
    with pytest.raises(DataError, match="images must be numeric, got dtype <U1"):
        load_dataset("npz", path=str(tmp_path / "text.npz"))


def test_unknown_dataset():
    with pytest.raises(
        DataError, match="dataset 'cifar' is not known; allowed: seed_20x20, digits, idx, npz"
    ):
        load_dataset("cifar")
