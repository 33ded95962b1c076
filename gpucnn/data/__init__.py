"""Datasets as host NumPy arrays: the built-in ones, IDX and npz files, and their splits."""

from gpucnn.data.dataset import (
    DATASETS,
    DataError,
    Dataset,
    build_dataset,
    load_dataset,
    load_idx_dir,
    load_npz,
    make_seed_20x20,
    read_idx,
    seed_patterns,
    stratified_split,
    write_idx,
)

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "build_dataset",
    "load_dataset",
    "load_idx_dir",
    "load_npz",
    "make_seed_20x20",
    "read_idx",
    "seed_patterns",
    "stratified_split",
    "write_idx",
]
