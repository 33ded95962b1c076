"""The run report (report.html): logged at the end of a real training run, read back from
the MLflow store, checked for content (every picture decodes, its colours follow the
numbers the model computes, nothing refers to another host), rebuilt for an older run
that lacks raw kernels, and rendered in headless Chromium where it is installed."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlflow")
PIL = pytest.importorskip("PIL.Image")

from gpucnn.data import load_dataset  # noqa: E402
from gpucnn.nn.checkpoint import read_checkpoint  # noqa: E402
from tests.test_train_app import all_runs, client_for, train  # noqa: E402

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page(HTMLParser):
    """The report's images (alt text -> decoded RGB array) and every tag and URL."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, np.ndarray] = {}
        self.tags: set[str] = set()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attributes = dict(attrs)
        for key in ("src", "href", "xlink:href", "action"):
            if key in attributes:
                self.urls.append(attributes[key])
        if tag == "img":
            prefix = "data:image/png;base64,"
            assert attributes["src"].startswith(prefix), attributes["src"][:40]
            image = PIL.open(io.BytesIO(base64.b64decode(attributes["src"][len(prefix) :])))
            image.load()  # decodes the whole PNG, or raises
            self.images[attributes["alt"]] = np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("report")
    result = train(
        cwd,
        "experiment=digits",
        "backend=numpy",
        "trainer.epochs=3",
        "trainer.kernels_every=1",
        "model.layers.0.out_channels=4",  # small kernels, every one shown
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_for(cwd)
    (run,) = all_runs(client)
    return cwd, client, run


def run_in(cwd, *args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd``, where the run's store is found as the app finds it."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )


def read_page(client, run_id, into: Path) -> tuple[Page, str]:
    path = Path(client.download_artifacts(run_id, "report.html", str(into)))
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return page, text


def test_the_report_is_logged_self_contained_and_says_what_the_run_did(digits_run, tmp_path):
    cwd, client, run = digits_run
    page, text = read_page(client, run.info.run_id, tmp_path)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(url.startswith("data:image/png;base64,") for url in page.urls)
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE)
    assert "<td>status</td><td>FINISHED</td>" in text
    accuracy = run.data.metrics["test_accuracy"]
    assert f"<td>test accuracy</td><td>{accuracy:.4f}</td>" in text
    assert text.count("<polyline") == 4  # train and val, loss and accuracy
    for epoch in ("before training", "epoch 1", "epoch 2", "epoch 3"):
        assert f"conv1, {epoch}" in page.images
    assert "Confusion matrix on the test split" in text
    assert len(text) < 3_000_000


def test_kernel_pictures_follow_the_checkpoint_weights(digits_run, tmp_path):
    """Each tile of the last epoch's conv1 picture is red where the weight is positive
    and blue where it is negative, saturating with |w| on the shown scale."""
    cwd, client, run = digits_run
    page, text = read_page(client, run.info.run_id, tmp_path)
    checkpoint = Path(client.download_artifacts(run.info.run_id, "checkpoint", str(tmp_path)))
    weight = read_checkpoint(checkpoint / "model.npz").params["conv1.weight"]  # (4, 1, 3, 3)
    picture = page.images["conv1, epoch 3"].astype(int)
    scale = float(re.search(r"conv1: .*?colour scale: −([0-9.e-]+)", text).group(1))
    # 4 kernels of 3x3 in a 2 x 2 grid; each tile is 3x3 pixels enlarged, framed by gaps.
    rows, columns = 2, 2
    tile_h = (picture.shape[0] - 2) // rows
    tile_w = (picture.shape[1] - 2) // columns
    sizes, greens = [], []
    for k in range(4):
        row, col = divmod(k, columns)
        for i in range(3):
            for j in range(3):
                cell = (tile_h - 2) / 3
                y = int(2 + row * tile_h + (i + 0.5) * cell)
                x = int(2 + col * tile_w + (j + 0.5) * cell)
                red, green, blue = picture[y, x]
                w = weight[k, 0, i, j]
                if abs(w) > 0.1 * scale:
                    assert np.sign(red - blue) == np.sign(w), (k, i, j, w, picture[y, x])
                sizes.append(abs(w))
                greens.append(green)
    # The larger |w|, the further from white (green falls on both sides of the scale).
    ranks = np.argsort(np.argsort(sizes)), np.argsort(np.argsort(greens))
    assert np.corrcoef(*ranks)[0, 1] < -0.9
    assert max(sizes) <= scale * 1.01  # the scale covers every weight shown


def test_the_saliency_picture_follows_the_models_gradient(digits_run, tmp_path):
    """The first example's saliency map, recomputed from the checkpoint and the data,
    has the picture's signs."""
    from gpucnn.fit import batch_inputs
    from gpucnn.nn.model import load_checkpoint

    cwd, client, run = digits_run
    page, text = read_page(client, run.info.run_id, tmp_path)
    index = int(re.search(r"Test image (\d+) \(first test image of class 0\)", text).group(1))
    checkpoint = Path(client.download_artifacts(run.info.run_id, "checkpoint", str(tmp_path)))
    model, _ = load_checkpoint(checkpoint / "model.npz")
    data = load_dataset("digits", seed=0)
    assert data.y_test[index] == 0 and not np.any(data.y_test[:index] == 0)
    inputs = batch_inputs(model, data)
    x = data.x_test[index : index + 1]
    x = inputs(x) if inputs is not None else x.astype(model.dtype)
    gradient = model.saliency(x, data.y_test[index : index + 1])["input"][0, 0]  # 8x8
    alt = next(k for k in page.images if k.startswith("saliency, scale"))
    scale = float(alt.split("±")[1])
    assert scale == pytest.approx(float(np.abs(gradient).max()), rel=1e-2)
    picture = page.images[alt].astype(int)
    cell = (picture.shape[0] - 4) / 8
    for i in range(8):
        for j in range(8):
            red, _, blue = picture[int(2 + (i + 0.5) * cell), int(2 + (j + 0.5) * cell)]
            if abs(gradient[i, j]) > 0.1 * scale:
                assert np.sign(red - blue) == np.sign(gradient[i, j]), (i, j)


def test_an_older_run_gets_a_report_that_says_what_it_could_not_show(digits_run, tmp_path):
    """A run without raw kernels (as before reports): `python -m gpucnn.report` builds
    one from its final weights and says so."""
    cwd, client, run = digits_run
    uri = run.info.artifact_uri
    artifacts = Path(urllib.parse.urlparse(uri).path if uri.startswith("file:") else uri)
    raw = artifacts / "kernels" / "raw"
    assert raw.is_dir()
    shutil.move(str(raw), str(tmp_path / "raw-kept"))
    try:
        out = tmp_path / "old.html"
        result = run_in(
            cwd, "-m", "gpucnn.report", "--run-id", run.info.run_id, "--out", str(out), "--no-log"
        )
    finally:
        shutil.move(str(tmp_path / "raw-kept"), str(raw))
    assert result.returncode == 0, result.stderr
    assert "not shown: this run logged no raw kernels per epoch" in result.stdout
    page = Page()
    page.feed(out.read_text())
    assert "conv1, end" in page.images and "conv1, epoch 3" not in page.images


# Builds a run's report from a dataset given to it, with loading forbidden: the training
# app's way (argv: run id, the run's config.yaml, where to write).
GIVEN_DATA = """
import sys
from pathlib import Path
import mlflow
import gpucnn.report as report
from gpucnn.data import load_data
from gpucnn.evaluate import read_config
from gpucnn.tracking.mlflow_store import resolve_store
run_id, config, out = sys.argv[1:]
mlflow.set_tracking_uri(resolve_store(None, Path.cwd(), create=False)[0])
data = load_data(read_config(Path(config), Path("none"))["data"])
def refuse(*args, **kwargs):
    raise AssertionError("the report loaded the dataset a second time")
report.load_data = refuse
report.build_report(run_id, Path(out), status="FINISHED", data=data)
"""


def test_the_apps_report_from_its_dataset_in_memory_equals_one_built_afresh(digits_run, tmp_path):
    """The training app builds its report from the dataset it holds, so that the data is
    never in memory twice at the end of a run; `python -m gpucnn.report` loads it as the
    run's config says. All give the same page."""
    cwd, client, run = digits_run
    run_id = run.info.run_id
    _, logged = read_page(client, run_id, tmp_path / "logged")
    afresh, given = tmp_path / "afresh.html", tmp_path / "given.html"
    result = run_in(
        cwd, "-m", "gpucnn.report", "--run-id", run_id, "--out", str(afresh), "--no-log"
    )
    assert result.returncode == 0, result.stderr
    config = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    result = run_in(cwd, "-c", GIVEN_DATA, run_id, config, str(given))
    assert result.returncode == 0, result.stderr

    def undated(page: str) -> str:  # the footer says when each was built
        return re.sub(r"built by gpucnn\.report, [0-9-]+ [0-9:]+", "built", page)

    assert undated(afresh.read_text(encoding="utf-8")) == undated(logged)
    assert undated(given.read_text(encoding="utf-8")) == undated(logged)
    assert undated(logged) != logged  # the footer was there, and only it was set aside


def test_a_report_for_a_run_that_does_not_exist_is_one_line(digits_run):
    cwd, _, _ = digits_run
    result = run_in(cwd, "-m", "gpucnn.report", "--run-id", "0" * 32)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("gpucnn.report: error: run '000")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_lecture_run_answers_which_filter_it_learned(tmp_path):
    result = train(tmp_path, "experiment=seed_20x20", "trainer.epochs=150", "backend=numpy")
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_for(tmp_path)
    (run,) = all_runs(client)
    page, text = read_page(client, run.info.run_id, tmp_path / "r")
    assert "what filter did it learn?" in text
    r = float(re.search(r"correlates (-?[0-9.]+) with X − O", text).group(1))
    assert r > 0.8
    assert {"sign(θ)·K", "class 1 (X)", "class 0 (O)"} <= set(page.images)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (CI installs it)")
def test_the_report_renders_in_headless_chromium(digits_run, tmp_path):
    cwd, client, run = digits_run
    path = Path(client.download_artifacts(run.info.run_id, "report.html", str(tmp_path)))
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "shot.png"
    rendered = subprocess.run(
        [CHROMIUM, *flags, "--window-size=1200,1600", f"--screenshot={shot}", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    image = np.asarray(PIL.open(shot).convert("RGB"))
    assert image.shape[:2] == (1600, 1200)
    assert (image < 200).any(axis=2).mean() > 0.02  # text and pictures, not a blank page
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0 and "Inside the net, image by image" in dom.stdout
    assert "net::ERR" not in rendered.stderr + dom.stderr  # nothing failed to load


# --- python -m gpucnn.explain on a trained model -------------------------------------


def explain(cwd, *args):
    return run_in(cwd, "-m", "gpucnn.explain", *args)


def test_explain_walks_a_test_image_through_the_trained_model(digits_run, tmp_path):
    import json

    from gpucnn.nn.model import load_checkpoint

    cwd, client, run = digits_run
    result = explain(cwd, "--run-id", run.info.run_id, "--index", "5", "--json")
    assert result.returncode == 0, result.stderr
    walk = json.loads(result.stdout)
    checkpoint = Path(client.download_artifacts(run.info.run_id, "checkpoint", str(tmp_path)))
    model, _ = load_checkpoint(checkpoint / "model.npz")
    assert [s["name"] for s in walk["steps"]] == [layer.name for layer in model.layers]
    data = load_dataset("digits", seed=0)
    logits = model.forward(data.x_test[5:6].astype(np.float32))[0]  # digits: float data
    np.testing.assert_allclose(walk["logits"], logits, rtol=1e-5, atol=1e-6)
    assert walk["predicted"] == int(np.argmax(logits)) and walk["label"] == int(data.y_test[5])
    assert sum(walk["probabilities"]) == pytest.approx(1.0)
    assert walk["steps"][0]["shape"] == [4, 8, 8]  # conv1: 4 maps of 8 x 8 ('same')
    pool = next(s for s in walk["steps"] if s["type"] == "pool")
    winners = np.array(pool["winners"])  # one winner per 2 x 2 window and channel
    assert winners.shape == (64, 8, 8)
    assert (winners.reshape(64, 4, 2, 4, 2).sum(axis=(2, 4)) == 1).all()
    text = explain(cwd, "--run-id", run.info.run_id, "--index", "5")
    assert text.returncode == 0 and "the winner of each max window marked *" in text.stdout
    assert f"predicted class: {walk['predicted']}" in text.stdout


def test_explain_writes_the_walk_as_pictures(digits_run, tmp_path):
    cwd, client, run = digits_run
    out = tmp_path / "walk"
    result = explain(cwd, "--run-id", run.info.run_id, "--index", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names[0] == "00_input.png" and names[-1] == "99_saliency.png"
    for path in out.iterdir():
        PIL.open(path).load()
    winners = np.asarray(PIL.open(out / "05_pool1_winners.png").convert("RGB"))
    yellow = (winners == (255, 200, 0)).all(axis=2).sum()
    factor = 96 // 8  # 8 x 8 maps enlarged to about 96 pixels
    assert yellow == 64 * 4 * 4 * factor * factor  # every window of every channel, once


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--index", "100000"], r"--index 100000 is out of range: the run's test split has"),
        (["--image", "wrong.npy"], r"--image 'wrong.npy' has shape \(3, 3\) \(float64\); this"),
        (["--image", "nothing.png"], r"--image 'nothing.png': no such file"),
        ([], r"give one of --index K or --image FILE"),
    ],
)
def test_explain_bad_input_is_one_line(digits_run, args, message):
    cwd, _, run = digits_run
    np.save(cwd / "wrong.npy", np.zeros((3, 3)))
    result = explain(cwd, "--run-id", run.info.run_id, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr


def test_explain_a_run_without_a_checkpoint_is_one_line(digits_run):
    cwd, client, run = digits_run
    empty = client.create_run(run.info.experiment_id).info.run_id
    client.set_terminated(empty, "FAILED")
    result = explain(cwd, "--run-id", empty, "--index", "0")
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"gpucnn.explain: error: run {empty!r} has no checkpoint "
        "(checkpoint/model.npz)"
    )
