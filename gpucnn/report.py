"""``python -m gpucnn.report``: one self-contained ``report.html`` per run, showing what the
trained net does inside, built from what the run logged (never from a process's memory).

    python -m gpucnn.report --run-id 3f2a...        # build it, log it to the run
    python -m gpucnn.report --run-id 3f2a... --out r.html --no-log

The training app logs it at the end of every run (and of a run stopped by SIGTERM); the
MLflow UI's artifact view shows it in place. It works offline: every picture is inline,
there is no script, and nothing refers to another host. It shows:

- the loss and accuracy curves (inline SVG);
- each conv layer's kernels at each logged epoch, side by side, on one colour scale
  centred on zero per layer (blue negative, white zero, red positive; the scale shown);
- for a few test images (one per class, then the worst misclassified): the image, every
  layer's feature maps (at most MAPS_PER_LAYER per layer), the predicted probabilities
  and the saliency map (the loss's gradient with respect to the input);
- the confusion matrix, and misclassified test images;
- for the lecture's nets (``seed_8x8``, ``seed_20x20``): the learned kernel beside the
  class patterns, and which one it matches.

Runs from before raw kernels were logged have only the final weights and per-tile-scaled
PNGs: the report then shows the final kernels and says what it could not show. The file
stays small: at most MAX_EPOCHS epochs of kernels, MAX_KERNELS kernels a layer,
MAPS_PER_LAYER maps a layer, MAX_EXAMPLES examples; a few MB at most.
"""

from __future__ import annotations

import argparse
import base64
import html
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpucnn.array.backend import BackendUnavailableError, get_backend, to_host
from gpucnn.data import DataError, Dataset, load_data, seed_patterns
from gpucnn.evaluate import read_config
from gpucnn.fit import KERNELS_FOLDER, batch_inputs, forward_batch_size
from gpucnn.nn.model import Sequential, load_checkpoint
from gpucnn.tracking import pictures
from gpucnn.tracking.mlflow_store import resolve_store, store_error

MAX_EPOCHS = 8  # kernel snapshots shown per layer (evenly spread, first and last kept)
MAX_KERNELS = 32  # kernels shown per layer (16 where each has several input channels)
MAX_CHANNELS = 6  # input channels shown per kernel
MAPS_PER_LAYER = 8  # feature maps shown per layer and image
MAX_EXAMPLES = 14  # test images walked through (one per class first)
WORST = 4  # of them, the worst misclassified
MISCLASSIFIED_SHOWN = 24
# Test images per forward pass at most, and the im2col memory one may take (it runs
# unsplit, at the end of a training run): 256 LeNet images, 28 through vgg_small.
PREDICT_BATCH = 256
PREDICT_COLUMN_BYTES = 64 << 20
CURVES = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


@dataclass
class Report:
    """What a report holds before it is written as HTML."""

    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # HTML fragments
    missing: list[str] = field(default_factory=list)  # what could not be shown, and why


# -- from the store -------------------------------------------------------------------


def _download(run_id: str, path: str, into: Path) -> Path | None:
    """An artifact of the run, or None where the run has none by that name."""
    import mlflow  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(into)
            )
        )
    except (MlflowException, OSError):
        return None


def _kernel_snapshots(client: Any, run_id: str, into: Path) -> dict[int, dict[str, np.ndarray]]:
    """Epoch -> {conv layer: weight}, from the run's raw kernel files."""
    snapshots = {}
    try:
        listed = client.list_artifacts(run_id, KERNELS_FOLDER)
    except Exception:  # noqa: BLE001 - a store without the folder: none logged
        listed = []
    for item in listed:
        name = Path(item.path).name
        if not (name.startswith("epoch_") and name.endswith(".npz")):
            continue
        local = _download(run_id, item.path, into)
        if local is None:
            continue
        with np.load(local, allow_pickle=False) as data:
            snapshots[int(name[len("epoch_") : -len(".npz")])] = {k: data[k] for k in data.files}
    return dict(sorted(snapshots.items()))


def build_report(
    run_id: str,
    out: Path,
    backend: str = "numpy",
    status: str | None = None,
    data: Dataset | None = None,
) -> Report:
    """Build ``out`` (report.html) for ``run_id`` from the active tracking store;
    ``status``: the one the run is ending with (the store still says RUNNING). ``data``:
    the run's dataset where it is in memory already (the training app's), so that it is
    not loaded a second time beside it; else it is loaded as the run's config says."""
    import mlflow  # noqa: PLC0415

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # the app's output stays ours
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    name = run.data.tags.get("mlflow.runName", run_id)
    report = Report(f"gpucnn run {name}")
    report.facts += [
        ("run id", run_id),
        ("status", status or run.info.status),
        ("experiment", client.get_experiment(run.info.experiment_id).name),
        ("model", run.data.params.get("model.name", "?")),
        ("data", run.data.params.get("data.name", "?")),
        ("parameters", run.data.params.get("model.num_params", "?")),
    ]
    for key in ("test_accuracy", "test_loss"):
        if key in run.data.metrics:
            report.facts.append((key.replace("_", " "), f"{run.data.metrics[key]:.4f}"))
    report.sections.append(_curves_section(client, run_id, report))
    with tempfile.TemporaryDirectory(prefix="gpucnn-report-") as scratch:
        scratch_path = Path(scratch)
        snapshots = _kernel_snapshots(client, run_id, scratch_path)
        checkpoint = _download(run_id, "checkpoint/model.npz", scratch_path)
        if checkpoint is None:
            report.missing.append(
                "the run has no checkpoint: no kernels, feature maps, saliency or confusion "
                "matrix could be shown"
            )
        else:
            model, _ = load_checkpoint(checkpoint, backend=get_backend(backend))
            if not snapshots:
                report.missing.append(
                    "this run logged no raw kernels per epoch (runs from before reports "
                    "only have per-tile-scaled kernel pictures): the kernels are shown at "
                    "the end of training only"
                )
                snapshots = {-1: _final_kernels(model)}
            report.sections.append(_kernels_section(snapshots, report))
            config_path = _download(run_id, "config.yaml", scratch_path) or Path("missing")
            _inside_sections(report, model, read_config(config_path, checkpoint), data)
    out.write_text(_html(report), encoding="utf-8")
    return report


def _final_kernels(model: Sequential) -> dict[str, np.ndarray]:
    return {
        layer.name: to_host(layer.params["weight"])
        for layer in model.layers
        if layer.type == "conv"
    }


# -- sections -------------------------------------------------------------------------


def _curves_section(client: Any, run_id: str, report: Report) -> str:
    histories = {}
    for key in CURVES:
        points = client.get_metric_history(run_id, key)
        if points:
            histories[key] = sorted((m.step, m.value) for m in points)
    if not histories:
        report.missing.append("no epoch metrics were logged: no curves")
        return ""
    loss = {k: v for k, v in histories.items() if k.endswith("loss")}
    accuracy = {k: v for k, v in histories.items() if k.endswith("accuracy")}
    charts = "".join(
        _svg_chart(title, series)
        for title, series in (("loss per epoch", loss), ("accuracy per epoch", accuracy))
        if series
    )
    return f"<h2>Training curves</h2><div class='row'>{charts}</div>"


def _svg_chart(title: str, series: dict[str, list[tuple[int, float]]]) -> str:
    """A line chart as inline SVG: epochs across, values up, one line per series."""
    width, height, pad = 360, 240, 40
    steps = [s for points in series.values() for s, _ in points]
    values = [v for points in series.values() for _, v in points if np.isfinite(v)]
    if not values:
        return ""
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values), max(values)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def xy(step: float, value: float) -> tuple[float, float]:
        x = pad + (step - x0) / (x1 - x0) * (width - 1.5 * pad)
        y = height - pad + (y0 - value) / (y1 - y0) * (height - 2.2 * pad)  # legend above
        return x, y

    colours = {"train": "#b2182b", "val": "#2166ac"}
    lines = []
    for key, points in series.items():
        colour = colours["train" if key.startswith("train") else "val"]
        path = " ".join("{:.1f},{:.1f}".format(*xy(s, v)) for s, v in points if np.isfinite(v))
        lines.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{path}'/>")
        label = f"{key.split('_')[0]}: last {points[-1][1]:.4f}"
        row = 14 * len([k for k in series if k < key])  # one legend line per series
        lines.append(
            f"<text x='{width - 150}' y='{14 + row}' fill='{colour}' "
            f"font-size='11'>{html.escape(label)}</text>"
        )
    axes = (
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad / 2}' y2='{height - pad}' "
        "stroke='#444'/>"
        f"<line x1='{pad}' y1='{pad * 1.2}' x2='{pad}' y2='{height - pad}' stroke='#444'/>"
        f"<text x='{pad}' y='{height - pad + 16}' font-size='11'>{x0}</text>"
        f"<text x='{width - pad}' y='{height - pad + 16}' font-size='11'>{x1}</text>"
        f"<text x='2' y='{height - pad}' font-size='11'>{y0:.3g}</text>"
        f"<text x='2' y='{pad * 1.2 + 4}' font-size='11'>{y1:.3g}</text>"
        f"<text x='{width / 2 - 20}' y='{height - 6}' font-size='11'>epoch</text>"
    )
    return (
        f"<figure><svg width='{width}' height='{height}' "
        f"role='img' aria-label='{html.escape(title)}'>{axes}{''.join(lines)}</svg>"
        f"<figcaption>{html.escape(title)} (red: training, blue: validation)</figcaption>"
        "</figure>"
    )


def _spread(epochs: list[int], most: int) -> list[int]:
    """At most ``most`` epochs, evenly spread, the first and last kept."""
    if len(epochs) <= most:
        return epochs
    picks = np.linspace(0, len(epochs) - 1, most).round().astype(int)
    return [epochs[i] for i in sorted(set(picks.tolist()))]


def _kernels_section(snapshots: dict[int, dict[str, np.ndarray]], report: Report) -> str:
    epochs = _spread(list(snapshots), MAX_EPOCHS)
    if len(epochs) < len(snapshots):
        report.missing.append(f"kernels: {len(epochs)} of {len(snapshots)} logged epochs are shown")
    layers = list(snapshots[epochs[-1]])
    parts = ["<h2>Kernels, epoch by epoch</h2>"]
    for layer in layers:
        weights = [snapshots[e][layer] for e in epochs if layer in snapshots[e]]
        p, c = weights[-1].shape[:2]
        most = MAX_KERNELS if c == 1 else MAX_KERNELS // 2
        shown = [w[:most, :MAX_CHANNELS] for w in weights]
        scale = max(float(np.abs(w).max()) for w in shown) or 1.0
        note = ""
        if p > most or c > MAX_CHANNELS:
            note = (
                f" (the first {min(p, most)} of {p} kernels, "
                f"{min(c, MAX_CHANNELS)} of {c} input channels)"
            )
        cells = "".join(
            _figure(
                pictures.kernel_rows(w, scale),
                f"{layer}, "
                + ("before training" if epoch == 0 else ("end" if epoch < 0 else f"epoch {epoch}")),
            )
            for epoch, w in zip(epochs, shown, strict=False)
        )
        rows = "one row per kernel, one column per input channel" if c > 1 else "kernels"
        parts.append(
            f"<h3>{html.escape(layer)}: {p} kernels of {c} x {weights[-1].shape[2]} x "
            f"{weights[-1].shape[3]}{note}</h3>"
            f"<p>{rows}; {_scale_html(scale)}</p><div class='row'>{cells}</div>"
        )
    return "".join(parts)


def _inside_sections(
    report: Report, model: Sequential, config: dict[str, Any], data: Dataset | None = None
) -> None:
    if data is None:
        try:
            data = load_data(config["data"])
        except (DataError, ValueError) as err:
            report.missing.append(f"the run's data could not be loaded ({err}): no images")
            return
    if data.input_shape != model.input_shape:
        report.missing.append("the data's shape differs from the model's: no images")
        return
    inputs = batch_inputs(model, data)
    x_test, y_test = data.x_test, np.asarray(data.y_test)
    probabilities, predictions = _predict(model, inputs, x_test)
    classes = max(int(model.output_shape[0]), 2)
    names = list(data.class_names) or [str(k) for k in range(classes)]
    examples = _pick_examples(y_test, predictions, probabilities, classes)
    report.sections.append(
        _examples_section(model, inputs, data, examples, probabilities, predictions, names)
    )
    report.sections.append(_confusion_section(y_test, predictions, classes, names, data))
    lecture = _lecture_section(model, config, data)
    if lecture:
        report.sections.append(lecture)


def _model_input(model: Sequential, inputs: Any, x: np.ndarray) -> Any:
    batch = model.backend.asarray(x)
    return inputs(batch) if inputs is not None else batch.astype(model.dtype)


def _predict(model: Sequential, inputs: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K) of every class, predicted classes) for a whole split."""
    probabilities = []
    size = forward_batch_size(model, PREDICT_BATCH, PREDICT_COLUMN_BYTES)
    for start in range(0, len(x), size):
        net = model.forward(_model_input(model, inputs, x[start : start + size]))
        p = to_host(model.head.predict_proba(net))
        probabilities.append(np.stack([1 - p, p], axis=1) if p.ndim == 1 else p)
    probabilities = np.concatenate(probabilities)
    return probabilities, probabilities.argmax(axis=1)


def _pick_examples(
    y: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray, classes: int
) -> list[tuple[int, str]]:
    """(test index, why shown): the first image of each class, then the misclassified
    ones with the lowest probability of their true class."""
    picks = []
    for k in range(classes):
        members = np.flatnonzero(y == k)
        if len(members) and len(picks) < MAX_EXAMPLES - WORST:
            picks.append((int(members[0]), f"first test image of class {k}"))
    wrong = np.flatnonzero(predictions != y)
    if len(wrong):
        truth = probabilities[wrong, y[wrong].astype(int)]
        for index in wrong[np.argsort(truth)][:WORST]:
            picks.append((int(index), "among the worst misclassified"))
    return picks


def _examples_section(
    model: Sequential,
    inputs: Any,
    data: Any,
    examples: list[tuple[int, str]],
    probabilities: np.ndarray,
    predictions: np.ndarray,
    names: list[str],
) -> str:
    parts = [
        "<h2>Inside the net, image by image</h2>",
        "<p>Each feature map and the saliency map are drawn on one colour scale centred on "
        "zero (per layer and image, the scale given); the saliency map is the gradient of "
        "the loss with respect to each input pixel, for the image's true class: red pixels "
        "raise the loss, blue ones lower it.</p>",
    ]
    for index, why in examples:
        x = _model_input(model, inputs, data.x_test[index : index + 1])
        label = np.asarray(data.y_test[index : index + 1])
        if model.head.type == "logistic":
            label = label.astype(model.dtype)
        outputs = {k: to_host(v)[0] for k, v in model.layer_outputs(x).items()}
        saliency = to_host(model.saliency(x, label)["input"])[0]
        truth, guess = int(data.y_test[index]), int(predictions[index])
        image = pictures.grey_rgb(np.asarray(data.x_test[index], dtype=np.float64))
        picture = pictures.enlarge(image, pictures.fit_factor(*image.shape[:2], target=112))
        top = np.argsort(probabilities[index])[::-1][:3]
        odds = ", ".join(f"{html.escape(names[k])} {probabilities[index, k]:.3f}" for k in top)
        mark = "right" if truth == guess else "wrong"
        s_scale = float(np.abs(saliency).max()) or 1.0
        s_maps = saliency if saliency.ndim == 3 else saliency[None]
        cells = [
            _figure(picture, f"test image {index}"),
            _figure(
                pictures.signed_maps(s_maps, s_scale, columns=3, target=112),
                f"saliency, {_scale_text(s_scale)}",
            ),
        ]
        for layer in model.layers:
            out = outputs[layer.name]
            cells.append(_layer_cell(layer, out))
        parts.append(
            f"<div class='example'><h3>Test image {index} ({html.escape(why)}): true "
            f"{html.escape(names[truth])}, predicted {html.escape(names[guess])} "
            f"<span class='{mark}'>({mark})</span></h3><p>probabilities: {odds}</p>"
            f"<div class='row'>{''.join(cells)}</div></div>"
        )
    return "".join(parts)


def _layer_cell(layer: Any, out: np.ndarray) -> str:
    """One layer's output for one image: its maps, or its vector as a strip."""
    if out.ndim == 3:
        shown = out[:MAPS_PER_LAYER]
        scale = float(np.abs(shown).max()) or 1.0
        note = f"{len(shown)} of {out.shape[0]} maps, " if out.shape[0] > len(shown) else ""
        caption = (
            f"{layer.name} ({layer.type}) {out.shape[0]} x {out.shape[1]} x {out.shape[2]}; "
            f"{note}{_scale_text(scale)}"
        )
        return _figure(pictures.signed_maps(shown, scale, columns=4), caption)
    scale = float(np.abs(out).max()) or 1.0
    strip = out[None, :256]
    factor = max(1, min(24, 384 // max(strip.shape[1], 1)))
    rgb = pictures.signed_rgb(strip, scale)
    rgb = np.repeat(np.repeat(rgb, factor, axis=1), 16, axis=0)  # a strip 16 pixels tall
    note = f", the first 256 of {out.size}" if out.size > 256 else ""
    caption = f"{layer.name} ({layer.type}) vector of {out.size}{note}; {_scale_text(scale)}"
    return _figure(rgb, caption)


def _confusion_section(
    y: np.ndarray, predictions: np.ndarray, classes: int, names: list[str], data: Any
) -> str:
    pairs = y.astype(np.int64) * classes + predictions.astype(np.int64)
    confusion = np.bincount(pairs, minlength=classes**2).reshape(classes, classes)
    rows_total = np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    header = "".join(f"<th>{html.escape(n)}</th>" for n in names[:classes])
    body = []
    for t in range(classes):
        cells = []
        for p in range(classes):
            share = confusion[t, p] / rows_total[t, 0]  # light tints: the counts stay legible
            red, green, blue = (
                (255 - int(120 * share), 255 - int(40 * share), 255 - int(120 * share))
                if t == p
                else (255, 255 - int(150 * share), 255 - int(150 * share))
            )
            colour = f"rgb({red},{green},{blue})"
            cells.append(f"<td style='background:{colour}'>{confusion[t, p]}</td>")
        body.append(f"<tr><th>{html.escape(names[t])}</th>{''.join(cells)}</tr>")
    accuracy = confusion.trace() / max(confusion.sum(), 1)
    wrong = np.flatnonzero(predictions != y)[:MISCLASSIFIED_SHOWN]
    thumbs = "".join(
        _figure(
            pictures.enlarge(
                pictures.grey_rgb(np.asarray(data.x_test[i], dtype=np.float64)),
                pictures.fit_factor(*data.x_test.shape[-2:], target=56),
            ),
            f"#{i}: {names[int(y[i])]} as {names[int(predictions[i])]}",
        )
        for i in wrong
    )
    total_wrong = int((predictions != y).sum())
    return (
        f"<h2>Confusion matrix on the test split</h2><p>rows: true class, columns: "
        f"predicted; accuracy {accuracy:.4f} on {len(y)} images, {total_wrong} "
        f"misclassified</p><table class='confusion'><tr><th></th>{header}</tr>"
        f"{''.join(body)}</table>"
        + (
            f"<h3>Misclassified test images (the first {len(wrong)} of {total_wrong})</h3>"
            f"<div class='row'>{thumbs}</div>"
            if total_wrong
            else "<p>No test image is misclassified.</p>"
        )
    )


def _lecture_section(model: Sequential, config: dict[str, Any], data: Any) -> str:
    """For the lecture's nets: the learned kernel beside the class patterns."""
    name = config.get("model", {}).get("name")
    if name not in ("seed_8x8", "seed_20x20"):
        return ""
    conv = next(layer for layer in model.layers if layer.type == "conv")
    kernel = to_host(conv.params["weight"])[0, 0]
    dense = next(layer for layer in reversed(model.layers) if layer.type == "dense")
    theta = to_host(dense.params["weight"]).reshape(-1)
    sign = 1.0 if theta.sum() >= 0 else -1.0
    template = sign * kernel  # what raises P(class 1): the product theta * K matters
    if name == "seed_20x20":
        patterns = seed_patterns(kernel.shape[0])
        shown = {"class 1 (X)": patterns[1], "class 0 (O)": patterns[0]}
    else:
        images = np.concatenate([data.x_train[:, 0], data.x_val[:, 0]])
        labels = np.concatenate([data.y_train, data.y_val])
        shown = {
            "class 1: mean image": images[labels == 1].mean(axis=0),
            "class 0: mean image": images[labels == 0].mean(axis=0),
        }
    scale = float(np.abs(template).max()) or 1.0
    cells = [_figure(pictures.signed_maps(template[None], scale, target=120), "sign(θ)·K")]
    answer = ""
    for label, pattern in shown.items():
        picture = pictures.enlarge(
            pictures.grey_rgb(pattern), pictures.fit_factor(*pattern.shape, 120)
        )
        cells.append(_figure(picture, label))
    if name == "seed_20x20":
        contrast = patterns[1] - patterns[0]
        r = float(np.corrcoef(template.ravel(), contrast.ravel())[0, 1])
        answer = (
            f"<p>The learned template sign(θ)·K correlates {r:.3f} with X − O: the kernel "
            f"learned {'the X, with the O pushed negative' if r > 0 else 'the O'}.</p>"
        )
    else:
        answer = (
            "<p>A 3x3 kernel slides over the 8x8 image; the map's maximum feeds the "
            "neuron. The template shows which local stroke the net looks for.</p>"
        )
    return (
        "<h2>The lecture's question: what filter did it learn?</h2>"
        f"<p>{_scale_html(scale)}</p><div class='row'>{''.join(cells)}</div>{answer}"
    )


# -- HTML -----------------------------------------------------------------------------


def _scale_text(scale: float) -> str:
    return f"scale ±{scale:.3g}"


def _scale_html(scale: float) -> str:
    bar = _img(pictures.colour_bar(scale), f"colour scale from -{scale:.3g} to +{scale:.3g}")
    return f"colour scale: −{scale:.3g} {bar} +{scale:.3g} (white: 0)"


def _img(rgb: np.ndarray, alt: str) -> str:
    encoded = base64.b64encode(pictures.png_bytes(rgb)).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{encoded}'>"


def _figure(rgb: np.ndarray, caption: str) -> str:
    return f"<figure>{_img(rgb, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;
max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
h3{font-size:14px;margin:16px 0 4px}p{font-size:13px;margin:4px 0}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;text-align:center}figcaption{font-size:11px;color:#555;max-width:260px}
img{image-rendering:pixelated;vertical-align:middle}
table.facts td{padding:2px 12px 2px 0;font-size:13px}
table.confusion{border-collapse:collapse;font-size:12px}
table.confusion td,table.confusion th{border:1px solid #ccc;padding:3px 6px;text-align:right}
.example{border-top:1px dashed #ddd;padding-top:6px}
.right{color:#1a7f37}.wrong{color:#b2182b}.missing{background:#fff8e1;padding:8px}
"""


def _html(report: Report) -> str:
    facts = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in report.facts
    )
    missing = ""
    if report.missing:
        items = "".join(f"<li>{html.escape(m)}</li>" for m in report.missing)
        missing = f"<div class='missing'><b>Not shown:</b><ul>{items}</ul></div>"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(report.title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(report.title)}</h1><table class='facts'>{facts}</table>"
        f"{missing}{''.join(report.sections)}"
        f"<p style='color:#888'>built by gpucnn.report, {time.strftime('%Y-%m-%d %H:%M')}"
        "</p></body></html>"
    )


def write_and_log(
    run_id: str, folder: Path, status: str | None = None, data: Dataset | None = None
) -> Path:
    """Build the run's report.html in ``folder`` and log it to the run (the artifact
    ``report.html``, which the MLflow UI shows in place); ``data`` as in
    :func:`build_report`."""
    import mlflow  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "report.html"
    build_report(run_id, out, status=status, data=data)
    mlflow.MlflowClient().log_artifact(run_id, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpucnn.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--run-id", required=True, help="an MLflow run id")
    parser.add_argument("--tracking-uri", help="MLflow store (default: as gpucnn.train)")
    parser.add_argument("--out", help="where to write it (default: report-<run id>.html)")
    parser.add_argument("--no-log", action="store_true", help="do not log it to the run")
    args = parser.parse_args(argv)
    import mlflow  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    out = Path(args.out or f"report-{args.run_id}.html")
    try:
        uri, _ = resolve_store(args.tracking_uri, Path.cwd(), create=False)
        mlflow.set_tracking_uri(uri)
        try:
            mlflow.MlflowClient().get_run(args.run_id)
        except MlflowException as err:
            raise ValueError(f"run {args.run_id!r} was not found in {uri}") from err
        started = time.perf_counter()
        report = build_report(args.run_id, out)
        if not args.no_log:  # the run's artifact is always named report.html
            with tempfile.TemporaryDirectory() as scratch:
                logged = Path(scratch) / "report.html"
                logged.write_bytes(out.read_bytes())
                mlflow.MlflowClient().log_artifact(args.run_id, str(logged))
    except (ValueError, DataError, FileNotFoundError, BackendUnavailableError) as err:
        print(f"gpucnn.report: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a store that failed: one line too
        problem = store_error(err)
        if problem is None:
            raise
        print(f"gpucnn.report: error: {problem}", file=sys.stderr)
        return 2
    size = out.stat().st_size / 1e6
    seconds = time.perf_counter() - started
    print(f"{out} ({size:.2f} MB, {seconds:.1f} s)" + ("" if args.no_log else ", logged"))
    for note in report.missing:
        print(f"  not shown: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def trained_model(
    run_id: str | None,
    checkpoint: str | None,
    config: str | None,
    tracking_uri: str | None,
    into: Path,
) -> tuple[Sequential, dict[str, Any]]:
    """The model and config of a run (from its store) or of a checkpoint file (its
    config beside it, or ``config``); each problem is a one-line ValueError."""
    if run_id is not None:
        import mlflow  # noqa: PLC0415
        from mlflow.exceptions import MlflowException  # noqa: PLC0415

        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        uri, _ = resolve_store(tracking_uri, Path.cwd(), create=False)
        mlflow.set_tracking_uri(uri)
        try:
            mlflow.MlflowClient().get_run(run_id)
        except MlflowException as err:
            raise ValueError(f"run {run_id!r} was not found in {uri}") from err
        path = _download(run_id, "checkpoint/model.npz", into)
        if path is None:
            raise ValueError(f"run {run_id!r} has no checkpoint (checkpoint/model.npz)")
        config_path = _download(run_id, "config.yaml", into) or Path("missing")
    else:
        path = Path(str(checkpoint))
        if not path.is_file():
            raise ValueError(f"--checkpoint {str(path)!r}: no such file")
        config_path = Path(config) if config else path.parent / "config.yaml"
    model, _ = load_checkpoint(path, backend=get_backend("numpy"))
    return model, read_config(config_path, path)


def explain_input(
    model: Sequential, config: dict[str, Any], index: int | None, image: str | None
) -> tuple[Any, int | None, list[str] | None, str]:
    """(the model's input for one image, its true class or None, class names, where it
    came from): test image ``index`` of the run's data, or the file ``image`` (.npy, or
    .png for data stored as bytes), scaled as the run's training images were."""
    data = load_data(config["data"])
    names = list(data.class_names) or None
    inputs = batch_inputs(model, data)
    if index is not None:
        count = len(data.y_test)
        if not 0 <= index < count:
            raise ValueError(
                f"--index {index} is out of range: the run's test split has {count} images "
                f"(0..{count - 1})"
            )
        raw, label = data.x_test[index : index + 1], int(data.y_test[index])
        where = f"test image {index} of {data.name}"
    else:
        raw, label = _image_file(str(image), model.input_shape, data), None
        where = str(image)
    x = model.backend.asarray(raw)
    return (inputs(x) if inputs is not None else x.astype(model.dtype)), label, names, where


def _image_file(path: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """One image (1, C, H, W) from a .npy or .png file, in the data's stored units."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--image {path!r}: no such file")
    if file.suffix.lower() == ".png":
        if data.scaling is None:
            raise ValueError(
                f"--image {path!r}: a .png is read as 0-255 pixel values, which only data "
                f"stored as bytes has (mnist, fashion_mnist, cifar10); give a .npy in "
                f"{data.name!r}'s own units"
            )
        from PIL import Image  # noqa: PLC0415

        try:
            with Image.open(file) as opened:
                picture = opened.convert("L" if shape[0] == 1 else "RGB")
                array = np.asarray(picture, dtype=np.uint8)
        except OSError as err:
            raise ValueError(f"--image {path!r}: not a readable PNG ({err})") from None
        array = array.transpose(2, 0, 1) if array.ndim == 3 else array
    else:
        try:
            array = np.load(file, allow_pickle=False)
        except Exception as err:  # noqa: BLE001 - whatever it is, one line naming the file
            raise ValueError(f"--image {path!r}: not a readable .npy array ({err})") from None
    found = tuple(array.shape)  # as the file has it, for the error
    if array.ndim == 2 and shape[0] == 1:
        array = array[None]
    if tuple(array.shape) != tuple(shape) or array.dtype.kind not in "biuf":
        wanted = f"(C, H, W) = {tuple(shape)}" + (
            f" or (H, W) = {tuple(shape[1:])}" if shape[0] == 1 else ""
        )
        raise ValueError(
            f"--image {path!r} has shape {found} ({array.dtype}); this model takes {wanted}"
        )
    if data.scaling is None and data.normalization:  # float data, standardised at load
        array = (array - data.normalization["mean"]) / data.normalization["std"]
    return array[None]
