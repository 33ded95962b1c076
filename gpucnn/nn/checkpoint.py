"""The checkpoint file: one plain ``.npz`` that any machine loads without pickle.

What a checkpoint holds (format ``gpucnn-checkpoint-v2``; v1 files load too, see
``Checkpoint.version``):

- ``format``: the format's name;
- ``architecture``: the model's config (:meth:`Sequential.config`) as JSON text;
- ``param/<layer>.<name>``: every parameter, a host array;
- with an optimizer: ``optimizer`` (its config as JSON text), ``optimizer_steps`` and
  ``optim/<slot>/<param>`` (momentum buffers, Adam moments);
- written during training, so that the run can go on bit for bit: ``progress`` (a
  :class:`Progress` as JSON text) and ``progress/loss_sum``, ``progress/correct`` (the
  epoch's partial sums, in their own dtypes).

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

CHECKPOINT_FORMAT = "gpucnn-checkpoint-v2"
# Format 1 differs in one meaning: its Flatten order "F" read the channel index fastest
# (since format 2 "F" is MATLAB's Z(:): rows, then columns, then maps).
READABLE_FORMATS = {"gpucnn-checkpoint-v1": 1, CHECKPOINT_FORMAT: 2}


@dataclass
class Progress:
    """Where a training run stands, with everything needed to continue it as if it had
    never stopped.

    ``order_state`` is the data-order generator's state before the shuffle of epoch
    ``epoch + 1``: the resumed run shuffles again from it and skips the ``batch``
    batches done. ``loss_sum`` and ``correct`` are that epoch's partial sums, exact.
    ``batch_split`` records how batches were cut (:class:`~gpucnn.array.threads.
    CpuSettings` fields), since the cut changes the rounding. ``extra`` is the caller's
    (JSON): the training app keeps the run's config, run id and data digest there.
    """

    epoch: int  # epochs completed
    step: int  # optimizer steps taken
    batch: int  # batches of epoch ``epoch + 1`` already taken
    order_state: dict[str, Any]
    loss_sum: np.ndarray
    correct: np.ndarray
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0  # training time so far (for images/s only)
    batch_split: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        fields = {k: v for k, v in vars(self).items() if k not in ("loss_sum", "correct")}
        return json.dumps(fields)

    @classmethod
    def from_entries(cls, text: str, loss_sum: np.ndarray, correct: np.ndarray) -> Progress:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("progress is not a JSON object")
        return cls(**fields, loss_sum=loss_sum, correct=correct)


@dataclass
class Checkpoint:
    """A checkpoint as read from its file: host arrays and plain Python values."""

    path: Path
    architecture: dict[str, Any]
    params: dict[str, np.ndarray]  # numeric and finite, checked
    optimizer: dict[str, Any] | None = None  # its config, with "type"
    optimizer_steps: int = 0
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    progress: Progress | None = None  # in checkpoints written during training
    version: int = 2  # the file's format (READABLE_FORMATS)

    def damaged(self, problem: str) -> ValueError:
        """The error for a checkpoint whose contents do not fit together."""
        return ValueError(f"checkpoint {str(self.path)!r} is damaged: {problem}")


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` with the ``.npz`` suffix NumPy would add (``model`` -> ``model.npz``)."""
    path = Path(path)
    if path.suffix == ".npz":
        return path
    return path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")


def save_checkpoint(
    path: str | os.PathLike, model: Any, optimizer: Any = None, progress: Progress | None = None
) -> Path:
    """Write ``model`` (anything with ``config()`` and ``params``, a Sequential),
    ``optimizer``'s state and the training ``progress`` to ``path`` atomically; returns
    the path written. A parameter that is NaN or infinite is a FloatingPointError and
    nothing is written: a checkpoint is always one to go on from."""
    arrays: dict[str, Any] = {
        "format": np.array(CHECKPOINT_FORMAT),
        "architecture": np.array(json.dumps(model.config())),
    }
    for key, value in model.params.items():
        arrays[f"param/{key}"] = to_host(value)
        if not np.isfinite(arrays[f"param/{key}"]).all():
            raise FloatingPointError(f"{key} holds NaN or infinite values: no checkpoint written")
    if optimizer is not None:
        arrays["optimizer"] = np.array(json.dumps(optimizer.config()))
        arrays["optimizer_steps"] = np.array(optimizer.steps)
        for key, value in optimizer.state_dict().items():
            arrays[f"optim/{key}"] = to_host(value)
    if progress is not None:
        arrays["progress"] = np.array(progress.to_json())
        arrays["progress/loss_sum"] = to_host(progress.loss_sum)
        arrays["progress/correct"] = to_host(progress.correct)
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
    version = READABLE_FORMATS.get(str(contents.get("format", "")))
    if version is None:
        raise ValueError(f"{str(path)!r} is not a gpucnn checkpoint ({CHECKPOINT_FORMAT})")
    checkpoint = Checkpoint(path, {}, {})
    checkpoint.version = version
    try:
        checkpoint.architecture = json.loads(str(contents["architecture"]))
        if "optimizer" in contents:
            checkpoint.optimizer = json.loads(str(contents["optimizer"]))
            checkpoint.optimizer_steps = int(contents["optimizer_steps"])
        if "progress" in contents:
            checkpoint.progress = Progress.from_entries(
                str(contents["progress"]),
                contents["progress/loss_sum"],
                contents["progress/correct"],
            )
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
