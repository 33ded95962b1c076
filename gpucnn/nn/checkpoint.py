"""The checkpoint file: one plain ``.npz`` that any machine loads without pickle.

What a checkpoint holds (format ``gpucnn-checkpoint-v1``):

- ``format``: the format's name;
- ``architecture``: the model's config (:meth:`Sequential.config`) as JSON text;
- ``param/<layer>.<name>``: every parameter, a host array;
- with an optimizer: ``optimizer`` (its config as JSON text), ``optimizer_steps`` and
  ``optim/<slot>/<param>`` (momentum buffers, Adam moments).

This module writes and reads that file and checks what it read; it never builds a model
(:func:`gpucnn.nn.model.load_checkpoint` does, from a :class:`Checkpoint`). A checkpoint
is written to a temporary file in the same folder, flushed and renamed over the old one,
so a crash at any moment leaves either the old file or the new one, never half of one.
Arrays are NumPy on the host: a file format is NumPy's ``.npz`` whatever the backend.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpucnn.array.backend import to_host

CHECKPOINT_FORMAT = "gpucnn-checkpoint-v1"


@dataclass
class Checkpoint:
    """A checkpoint as read from its file: host arrays and plain Python values."""

    path: Path
    architecture: dict[str, Any]
    params: dict[str, np.ndarray]  # numeric and finite, checked
    optimizer: dict[str, Any] | None = None  # its config, with "type"
    optimizer_steps: int = 0
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)

    def damaged(self, problem: str) -> ValueError:
        """The error for a checkpoint whose contents do not fit together."""
        return ValueError(f"checkpoint {str(self.path)!r} is damaged: {problem}")


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` with the ``.npz`` suffix NumPy would add (``model`` -> ``model.npz``)."""
    path = Path(path)
    if path.suffix == ".npz":
        return path
    return path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")


def save_checkpoint(path: str | os.PathLike, model: Any, optimizer: Any = None) -> Path:
    """Write ``model`` (anything with ``config()`` and ``params``, a Sequential) and
    ``optimizer``'s state to ``path`` atomically; returns the path written."""
    arrays: dict[str, Any] = {
        "format": np.array(CHECKPOINT_FORMAT),
        "architecture": np.array(json.dumps(model.config())),
    }
    for key, value in model.params.items():
        arrays[f"param/{key}"] = to_host(value)
    if optimizer is not None:
        arrays["optimizer"] = np.array(json.dumps(optimizer.config()))
        arrays["optimizer_steps"] = np.array(optimizer.steps)
        for key, value in optimizer.state_dict().items():
            arrays[f"optim/{key}"] = to_host(value)
    return write_npz_atomically(checkpoint_path(path), arrays)


def write_npz_atomically(path: Path, arrays: dict[str, Any]) -> Path:
    """``np.savez`` to a temporary file beside ``path``, flushed to disk, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The contents of a checkpoint file, checked entry by entry.

    A missing file is a FileNotFoundError; a file that is not an ``.npz``, not a gpucnn
    checkpoint, or damaged (an entry missing or unreadable, a parameter that is not a
    finite number) is a one-line ValueError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {key: data[key] for key in data.files}
    except Exception as err:
        raise ValueError(f"checkpoint {str(path)!r} is not a readable .npz file: {err}") from err
    if str(contents.get("format", "")) != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a gpucnn checkpoint ({CHECKPOINT_FORMAT})")
    checkpoint = Checkpoint(path, {}, {})
    try:
        checkpoint.architecture = json.loads(str(contents["architecture"]))
        if "optimizer" in contents:
            checkpoint.optimizer = json.loads(str(contents["optimizer"]))
            checkpoint.optimizer_steps = int(contents["optimizer_steps"])
    except KeyError as err:
        raise checkpoint.damaged(f"missing entry {err}") from err
    except (TypeError, ValueError) as err:
        raise checkpoint.damaged(str(err)) from err
    for key, value in contents.items():
        if key.startswith("param/"):
            if value.dtype.kind not in "biuf" or not np.isfinite(value).all():
                raise checkpoint.damaged(
                    f"{key[len('param/') :]} holds non-numeric, NaN or infinite values"
                )
            checkpoint.params[key[len("param/") :]] = value
        elif key.startswith("optim/"):
            checkpoint.optimizer_state[key[len("optim/") :]] = value
    return checkpoint
