"""Pictures of numbers, for people: signed values on one colour scale centred on zero,
grey images, grids of maps, and the colour bar that says what a colour means. Host NumPy
arrays in, uint8 RGB arrays out (PNG-encoded by :func:`png_bytes`); no MLflow here.

The signed scale is blue for negative, white for zero, red for positive, with the same
scale for every tile of a picture, so that a weight's sign and size can be read and
compared across kernels, channels and epochs.
"""

from __future__ import annotations

import io

import numpy as np

NEGATIVE = np.array([33, 102, 172], dtype=np.float64)  # blue
ZERO = np.array([247, 247, 247], dtype=np.float64)  # near white
POSITIVE = np.array([178, 24, 43], dtype=np.float64)  # red


def signed_rgb(values: np.ndarray, scale: float) -> np.ndarray:
    """RGB uint8 (..., 3) of ``values`` on the diverging scale [-scale, +scale]: blue,
    white at zero, red; values beyond the scale saturate."""
    scale = float(scale) if scale and np.isfinite(scale) and scale > 0 else 1.0
    t = np.clip(np.asarray(values, dtype=np.float64) / scale, -1.0, 1.0)[..., None]
    rgb = np.where(t < 0, ZERO + (NEGATIVE - ZERO) * (-t), ZERO + (POSITIVE - ZERO) * t)
    return np.round(rgb).astype(np.uint8)


def grey_rgb(image: np.ndarray) -> np.ndarray:
    """An image (H, W) or (C, H, W) as RGB uint8, each stretched to its own min..max
    (three channels are shown as colour, any other count as the mean of them)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image.transpose(1, 2, 0) if image.shape[0] == 3 else image.mean(axis=0)
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    scaled = np.round(scaled * 255).astype(np.uint8)
    return scaled if scaled.ndim == 3 else np.repeat(scaled[..., None], 3, axis=2)


def enlarge(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so that single pixels stay visible."""
    factor = max(int(factor), 1)
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def fit_factor(height: int, width: int, target: int = 96, most: int = 16) -> int:
    """The enlargement that brings the larger side near ``target`` pixels."""
    return max(1, min(most, target // max(height, width, 1)))


GAP_GREY = 150  # between tiles: darker than the scale's white, so tiles stay apart


def tile_grid(tiles: list[np.ndarray], columns: int, gap: int = 2) -> np.ndarray:
    """RGB tiles of one size in a grid of ``columns``, separated by grey gaps."""
    if not tiles:
        return np.full((1, 1, 3), 255, np.uint8)
    h, w = tiles[0].shape[:2]
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    shape = (rows * (h + gap) + gap, columns * (w + gap) + gap, 3)
    grid = np.full(shape, 255, np.uint8)  # white where a row has no more tiles
    for index, tile in enumerate(tiles):
        row, col = divmod(index, columns)
        top, left = gap + row * (h + gap), gap + col * (w + gap)
        grid[top - gap : top + h + gap, left - gap : left + w + gap] = GAP_GREY  # a frame
        grid[top : top + h, left : left + w] = tile
    return grid


def signed_maps(maps: np.ndarray, scale: float, columns: int = 8, target: int = 64) -> np.ndarray:
    """Maps (K, H, W) on one signed scale, enlarged and laid out in a grid."""
    k, h, w = maps.shape
    factor = fit_factor(h, w, target)
    tiles = [enlarge(signed_rgb(m, scale), factor) for m in maps]
    return tile_grid(tiles, columns)


def kernel_rows(weight: np.ndarray, scale: float, target: int = 24) -> np.ndarray:
    """Kernels (P, C, KH, KW) on one signed scale: one row per kernel, one column per
    input channel (a single-channel set is laid out in a near-square grid)."""
    p, c, kh, kw = weight.shape
    factor = fit_factor(kh, kw, target)
    tiles = [enlarge(signed_rgb(t, scale), factor) for t in weight.reshape(p * c, kh, kw)]
    columns = c if c > 1 else int(np.ceil(np.sqrt(p)))
    return tile_grid(tiles, columns)


def colour_bar(scale: float, width: int = 160, height: int = 12) -> np.ndarray:
    """The scale itself: -scale (left, blue) .. 0 (white) .. +scale (right, red)."""
    ramp = np.linspace(-scale, scale, width)
    return np.repeat(signed_rgb(ramp, scale)[None], height, axis=0)


def png_bytes(rgb: np.ndarray) -> bytes:
    """A uint8 RGB (or grey) array as PNG bytes."""
    from PIL import Image  # noqa: PLC0415 - only needed when pictures are written

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
