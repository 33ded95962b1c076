"""What the training loop reports to: the :class:`Tracker` interface (the base class
records nothing), and the pictures a tracker logs (kernels, confusion matrices). No
MLflow here: :mod:`gpucnn.tracking.mlflow_store` implements the interface at the edge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Tracker:
    """What the training loop reports to. The base class records nothing."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_metric_history(self, key: str, values: list[float], first_step: int) -> None: ...

    def log_image(self, key: str, image: np.ndarray, step: int) -> None: ...

    def log_array(self, name: str, array: np.ndarray) -> None: ...

    def log_file(self, path: str | Path, folder: str | None = None) -> None: ...

    def log_arrays(self, name: str, arrays: dict[str, np.ndarray], folder: str) -> None:
        """Raw arrays as one ``.npz`` file ``name`` in ``folder`` (e.g. every conv
        layer's kernels at an epoch, for the run's report)."""

    def log_checkpoint(self, path: str | Path, epoch: int, step: int) -> None:
        """A checkpoint was written after ``epoch`` epochs and ``step`` steps."""
        self.log_file(path, "checkpoint")

    def flush(self) -> None: ...


def kernel_grid(
    weight: np.ndarray, scale: int = 16, gap: int = 1, max_width: int = 1024
) -> np.ndarray:
    """(P, C, KH, KW) kernels -> one uint8 grayscale image.

    Single-channel kernels are laid out in a near-square grid; with several input
    channels each kernel is a row and each channel a column. Every tile is scaled to its
    own [min, max] and enlarged (nearest neighbour, at most ``scale`` times and so that the
    image stays within ``max_width`` pixels) so that single weights stay visible.
    """
    p, c, kh, kw = weight.shape
    tiles = weight.reshape(p * c, kh, kw)
    if c == 1:
        cols = int(np.ceil(np.sqrt(p)))
        rows = int(np.ceil(p / cols))
    else:
        rows, cols = p, c
    scale = max(1, min(scale, (max_width - gap) // (cols * (kw + gap)), 256 // max(kh, kw, 1)))
    tile_h, tile_w = kh * scale, kw * scale
    grid = np.full((rows * (tile_h + gap) + gap, cols * (tile_w + gap) + gap), 255, np.uint8)
    for index, tile in enumerate(tiles.astype(np.float64)):
        row, col = divmod(index, cols)
        span = tile.max() - tile.min()
        tile = (tile - tile.min()) / span if span > 0 else np.full_like(tile, 0.5)
        top, left = gap + row * (tile_h + gap), gap + col * (tile_w + gap)
        grid[top : top + tile_h, left : left + tile_w] = (
            (np.kron(tile, np.ones((scale, scale))) * 255).round().astype(np.uint8)
        )
    return grid


def confusion_image(confusion: np.ndarray, cell: int = 36) -> np.ndarray:
    """A confusion matrix as an RGB heat map with the counts written in (rows: true
    class, columns: predicted)."""
    from PIL import Image, ImageDraw  # noqa: PLC0415 - only needed when logging images

    k = confusion.shape[0]
    margin = cell
    size = (margin + k * cell, margin + k * cell)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    for t in range(k):
        draw.text((4, margin + t * cell + cell // 3), str(t), fill="black")
        draw.text((margin + t * cell + cell // 3, 4), str(t), fill="black")
        for p in range(k):
            shade = int(255 * (1 - rows[t, p]))
            box = (
                margin + p * cell,
                margin + t * cell,
                margin + (p + 1) * cell - 1,
                margin + (t + 1) * cell - 1,
            )
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text(
                (box[0] + 4, box[1] + cell // 3),
                str(int(confusion[t, p])),
                fill="white" if rows[t, p] > 0.5 else "black",
            )
    return np.asarray(image)
