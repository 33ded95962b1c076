"""What the README shows a library user runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gpucnn import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_library_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Library use") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves model.npz
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    model, step = namespace["model"], namespace["step"]
    assert step.model is model and np.isfinite(float(namespace["loss"]))
    restored, optimizer = load_checkpoint(tmp_path / "model.npz")
    assert restored.config() == model.config() and optimizer.steps == 1
