"""Model inputs from stored images, on the images' backend (part of the array layer).

Datasets of byte images stay bytes on the device; each batch is cast and scaled here when
it is used, so a CuPy step never copies a batch from the host. Training batches can be
varied (random crop of the zero-padded image, horizontal flip) in one vectorised gather.
The random numbers come from a counter-based hash of (seed, step, image): the same on
NumPy and CuPy, and a resumed run draws exactly what the run never stopped would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpucnn.array.backend import Array, array_module

_MASK = (1 << 64) - 1


def _splitmix64_int(value: int) -> int:
    """SplitMix64's finaliser on a Python int (the key of a step)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def _splitmix64(xp: Any, counters: Array) -> Array:
    """SplitMix64 on an array of uint64 counters (wrapping arithmetic)."""
    z = counters + xp.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(0x94D049BB133111EB)
    return z ^ (z >> xp.uint64(31))


def random_words(xp: Any, n: int, seed: int, step: int) -> Array:
    """``n`` pseudo-random uint64 words for training step ``step`` of seed ``seed``,
    computed where ``xp`` computes (no host draw, no transfer)."""
    key = _splitmix64_int(_splitmix64_int(seed) ^ step)
    counters = xp.arange(n, dtype=xp.uint64)
    return _splitmix64(xp, counters + xp.uint64(key))


def crop_and_flip(x: Array, padding: int, flip: bool, seed: int, step: int) -> Array:
    """A batch (N, C, H, W) varied per image: a random H x W window of the image padded
    with ``padding`` zeros on each side (every offset in [0, 2 * padding] equally
    likely), then, with ``flip``, mirrored left-right with probability 1/2."""
    xp = array_module(x)
    n, c, h, w = x.shape
    words = random_words(xp, n, seed, step)
    span = xp.uint64(2 * padding + 1)
    top = (words % span).astype(xp.int64)
    left = ((words >> xp.uint64(21)) % span).astype(xp.int64)
    mirrored = ((words >> xp.uint64(42)) & xp.uint64(1)).astype(bool) if flip else None
    if padding:
        padded = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=x.dtype)
        padded[:, :, padding : padding + h, padding : padding + w] = x
    else:
        padded = x
    rows = top[:, None] + xp.arange(h)  # (n, h)
    columns = xp.arange(w)
    if mirrored is not None:
        columns = xp.where(mirrored[:, None], w - 1 - columns, columns)  # (n, w)
    else:
        columns = xp.broadcast_to(columns, (n, w))
    columns = left[:, None] + columns
    images = xp.arange(n)[:, None, None, None]
    channels = xp.arange(c)[None, :, None, None]
    return padded[images, channels, rows[:, None, :, None], columns[:, None, None, :]]


class ByteImages:
    """Batches of stored images as the model takes them: cast to ``dtype`` and, per
    channel, ``(pixel - mean[c]) / std[c]``; with a crop padding or flip, training
    batches are varied first (:func:`crop_and_flip`). The constants live on the backend,
    made once."""

    def __init__(
        self,
        xp: Any,
        dtype: Any,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.xp, self.dtype = xp, dtype
        self.mean = xp.asarray(list(mean), dtype=dtype).reshape(1, -1, 1, 1)
        self.std = xp.asarray(list(std), dtype=dtype).reshape(1, -1, 1, 1)
        self.crop_padding, self.flip, self.seed = crop_padding, flip, seed

    def __call__(self, x: Array, step: int | None = None) -> Array:
        """The model's input for stored batch ``x``; ``step`` (a training step) varies
        it as configured, None (evaluation) never does."""
        if step is not None and (self.crop_padding or self.flip):
            x = crop_and_flip(x, self.crop_padding, self.flip, self.seed, step)
        # The cast happens inside the subtraction (one pass less, the same numbers).
        out = self.xp.subtract(x, self.mean, dtype=self.dtype)
        out /= self.std
        return out
