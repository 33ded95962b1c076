"""Datasets that need no files: the lecture's two artificial 20x20 classes. Class 1 is an
"X" (both diagonals), class 0 an "O" (a ring), each plus seeded Gaussian noise. Both
patterns are symmetric under the 180-degree turn of true convolution, so a learned kernel
can be compared with them directly."""

from __future__ import annotations

import numpy as np


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
