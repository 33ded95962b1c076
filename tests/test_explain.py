"""`python -m gpucnn.explain`: the lecture's walk-through, JSON output, user arrays, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gpucnn import explain
from tests.test_lecture import LECTURE_F, LECTURE_GRAD_THETA, LECTURE_H, LECTURE_Z


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "gpucnn.explain", *args], capture_output=True, text=True, timeout=120
    )


def test_json_output_has_the_lecture_values():
    result = run_cli("--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"F", "Z", "h", "net", "y_hat", "grad_theta", "grad_K"}
    assert data["F"] == LECTURE_F.tolist()
    assert data["Z"] == LECTURE_Z.tolist()
    assert data["h"] == LECTURE_H.tolist()
    assert data["net"] == 18525.0
    assert data["y_hat"] == pytest.approx(1.0)
    assert data["grad_theta"] == LECTURE_GRAD_THETA.tolist()
    p, q = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    assert data["grad_K"] == (-(535.0 - 80 * p - 10 * q)).tolist()  # gradient-checked values


def test_text_walkthrough_names_every_step():
    result = run_cli()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("X ", "K ", "F ", "Z ", "h ", "net =", "y_hat =", "dJ/dtheta", "dJ/dK"):
        assert name in out
    assert "[[37.5  39.48]" in out and "[57.3  59.28]]" in out  # the 4x4 example
    assert "docs/lecture.md" in out


def test_user_arrays(tmp_path):
    rng = np.random.default_rng(0)
    image, kernel = rng.standard_normal((2, 7, 7)), rng.standard_normal((2, 2, 3, 3))
    weights = rng.standard_normal(2 * 2 * 2)  # 2 maps of 5x5 -> 2x2 after 3x3/2 pooling
    for name, arr in (("x", image), ("k", kernel), ("w", weights)):
        np.save(tmp_path / f"{name}.npy", arr)
    result = run_cli(
        "--json",
        "--image",
        str(tmp_path / "x.npy"),
        "--kernel",
        str(tmp_path / "k.npy"),
        "--weights",
        str(tmp_path / "w.npy"),
        "--label",
        "1",
        "--stride",
        "2",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    direct = explain.walk(image, kernel, weights, label=1, stride=2)
    assert np.allclose(data["net"], direct["net"])
    assert np.array(data["F"]).shape == (2, 5, 5)
    # dJ/dtheta = (y - y_hat) h
    assert np.allclose(data["grad_theta"], (1 - data["y_hat"]) * np.array(data["h"]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.npy"], "--image 'missing.npy': no such file"),
        (["--label", "2"], "label must be 0 or 1, got 2.0"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"gpucnn.explain: error: {message}"]


def test_shape_mismatches(tmp_path):
    np.save(tmp_path / "w.npy", np.ones(3))
    result = run_cli("--weights", str(tmp_path / "w.npy"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "gpucnn.explain: error: weights have 3 entries but the flattened pooled maps have 4 "
        "(maps C x H x W = 1x2x2); give one weight per feature"
    )
    np.save(tmp_path / "k.npy", np.ones((3, 3, 3)))
    result = run_cli("--kernel", str(tmp_path / "k.npy"))
    assert "kernel has 3 channels but the image has 1" in result.stderr
