"""Datasets as host NumPy arrays: the built-in ones, IDX and npz files, and their splits."""

from gpucnn.data.builtin import make_seed_20x20, seed_patterns
from gpucnn.data.catalog import DATASETS, load_data, load_dataset
from gpucnn.data.dataset import DataError, Dataset, build_dataset, stratified_split
from gpucnn.data.formats import load_idx_dir, load_npz, read_idx, write_idx

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "build_dataset",
    "load_data",
    "load_dataset",
    "load_idx_dir",
    "load_npz",
    "make_seed_20x20",
    "read_idx",
    "seed_patterns",
    "stratified_split",
    "write_idx",
]
