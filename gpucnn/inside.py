"""What a trained model does with one image, layer by layer, in words, JSON and pictures:
the walk ``python -m gpucnn.explain --run-id ... --index K`` prints.

For every layer as the layer list writes it: its output's shape and values (the
feature maps of a convolution; the pooled maps of a pool, with the winner of each max
window marked in the maps it pooled; the flattened vector and the order it reads the
maps in), then the logits, the probabilities, the predicted class, and the saliency map
(the gradient of the loss with respect to each input pixel, for the true class when
it is known, else for the predicted one). No MLflow here: the model and the image come
from the caller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gpucnn.array.backend import to_host
from gpucnn.nn.model import Sequential
from gpucnn.tracking import pictures

WINNER = (255, 200, 0)  # yellow: the pixel a max window passed on
PRINT_VALUES_UP_TO = 12  # a map this size or smaller is printed in full, else summarised
ORDERS = {
    "F": "column-major (MATLAB's Z(:)): down each column of a map, column after column, "
    "map after map",
    "C": "row-major: along each row of a map, row after row, map after map",
    "F_channels_first": "the channel fastest, then down the rows, then across the columns "
    "(checkpoints before format 2)",
}


def walk_model(
    model: Sequential, x: np.ndarray, label: int | None = None, names: list[str] | None = None
) -> dict[str, Any]:
    """The walk of one model input ``x`` (1, C, H, W), already scaled as the model takes
    it; ``label``: the true class where known. Host NumPy arrays throughout."""
    outputs = {k: to_host(v)[0] for k, v in model.layer_outputs(x).items()}
    logits = outputs[model.layers[-1].name]
    probabilities = to_host(model.head.predict_proba(model.forward(x)))[0]
    if probabilities.ndim == 0:  # a logistic head: P(class 1)
        probabilities = np.array([1 - float(probabilities), float(probabilities)])
    predicted = int(np.argmax(probabilities))
    target = predicted if label is None else int(label)
    target_array = np.array([target], dtype=model.dtype if model.head.type == "logistic" else None)
    saliency = to_host(model.saliency(x, target_array)["input"])[0]
    steps, previous = [], to_host(x)[0]
    for layer in model.layers:
        out = outputs[layer.name]
        step: dict[str, Any] = {"name": layer.name, "type": layer.type, "shape": list(out.shape)}
        step["values"] = out
        if layer.type == "pool" and getattr(layer, "kind", "") == "max":
            step["winners"] = max_winners(previous, layer.window, layer.stride)
            step["_input"] = previous  # for the text and pictures, not the JSON
        if layer.type == "flatten":
            step["order"] = ORDERS.get(layer.order, layer.order)
        steps.append(step)
        previous = out
    classes = names or [str(k) for k in range(len(probabilities))]
    return {
        "input": to_host(x)[0],
        "steps": steps,
        "logits": np.atleast_1d(logits),
        "probabilities": probabilities,
        "predicted": predicted,
        "predicted_name": classes[predicted] if predicted < len(classes) else str(predicted),
        "label": label,
        "saliency_for": target,
        "saliency": saliency,
    }


def max_winners(maps: np.ndarray, window: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """A boolean mask over ``maps`` (C, H, W): True at the first maximum of every pooling
    window, the value the max pool passes on (and routes the gradient back to)."""
    c, h, w = maps.shape
    (qh, qw), (sh, sw) = window, stride
    oh, ow = (h - qh) // sh + 1, (w - qw) // sw + 1
    rows = (np.arange(oh) * sh)[:, None] + np.arange(qh)[None, :]  # (OH, QH)
    cols = (np.arange(ow) * sw)[:, None] + np.arange(qw)[None, :]  # (OW, QW)
    windows = maps[:, rows[:, None, :, None], cols[None, :, None, :]]  # (C, OH, OW, QH, QW)
    first = windows.reshape(c, oh, ow, -1).argmax(axis=3)
    mask = np.zeros(maps.shape, dtype=bool)
    channel, a, b = np.meshgrid(np.arange(c), np.arange(oh), np.arange(ow), indexing="ij")
    mask[channel, a * sh + first // qw, b * sw + first % qw] = True
    return mask


def as_text(walk: dict[str, Any], title: str) -> str:
    lines = [f"== {title} ==", ""]
    lines += _array_lines("input", walk["input"])
    for step in walk["steps"]:
        values = step["values"]
        lines.append(
            f"-- {step['name']} ({step['type']}): output {' x '.join(map(str, values.shape))}"
        )
        if "order" in step:
            lines.append(f"   reads the maps {step['order']}")
        if "winners" in step:
            lines.append("   its input, the winner of each max window marked *:")
            lines += _array_lines("", step["_input"], step["winners"])
        lines += _array_lines("", values)
    probabilities = walk["probabilities"]
    lines += [
        "",
        "logits: " + np.array2string(walk["logits"], precision=4, max_line_width=100),
        "probabilities: " + np.array2string(probabilities, precision=4, max_line_width=100),
        f"predicted class: {walk['predicted']} ({walk['predicted_name']})"
        + ("" if walk["label"] is None else f"; true class: {walk['label']}"),
        f"saliency (d loss / d pixel, for class {walk['saliency_for']}): max |value| "
        f"{float(np.abs(walk['saliency']).max()):.4g}",
    ]
    return "\n".join(lines)


def _array_lines(
    name: str, values: np.ndarray | None, marks: np.ndarray | None = None
) -> list[str]:
    """An array in full when small, else one line of statistics per map."""
    if values is None:
        return []
    prefix = f"{name}: " if name else "   "
    if values.ndim == 1:
        if values.size <= 64:
            return [prefix + np.array2string(values, precision=4, max_line_width=100)]
        return [prefix + f"{values.size} values, {_stats(values)}"]
    maps = values if values.ndim == 3 else values[None]
    out = []
    for index, plane in enumerate(maps):
        label = f"{prefix}map {index}" if len(maps) > 1 else (name or "   values")
        if max(plane.shape) <= PRINT_VALUES_UP_TO:
            rows = []
            for r, row in enumerate(plane):
                cells = []
                for c, v in enumerate(row):
                    star = "*" if marks is not None and marks[index, r, c] else " "
                    cells.append(f"{v:9.4g}{star}")
                rows.append("     " + "".join(cells))
            out += [label + ":", *rows]
        else:
            winners = f", {int(marks[index].sum())} winners" if marks is not None else ""
            out.append(f"{label}: {plane.shape[0]} x {plane.shape[1]}, {_stats(plane)}{winners}")
        if index >= 15 and len(maps) > 17:
            out.append(f"   ... {len(maps) - 16} more maps")
            break
    return out


def _stats(values: np.ndarray) -> str:
    return f"min {values.min():.4g}, mean {values.mean():.4g}, max {values.max():.4g}"


def as_json(walk: dict[str, Any]) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if not k.startswith("_")}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return json.dumps(plain(walk))


def write_pictures(walk: dict[str, Any], folder: Path) -> list[Path]:
    """PNGs of the walk in ``folder``: the input, each layer's output (maps on one
    zero-centred colour scale per layer, max-pool winners in yellow on the maps they
    pooled), and the saliency map. Returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name: str, rgb: np.ndarray) -> None:
        path = folder / name
        path.write_bytes(pictures.png_bytes(rgb))
        written.append(path)

    image = walk["input"]
    save(
        "00_input.png",
        pictures.enlarge(pictures.grey_rgb(image), pictures.fit_factor(*image.shape[-2:], 160)),
    )
    for number, step in enumerate(walk["steps"], start=1):
        values = step["values"]
        scale = float(np.abs(values).max()) or 1.0
        if values.ndim == 3:
            rgb = pictures.signed_maps(values, scale, target=96)
        else:
            strip = pictures.signed_rgb(values[None, :512], scale)
            rgb = np.repeat(np.repeat(strip, max(1, 768 // strip.shape[1]), axis=1), 24, axis=0)
        save(f"{number:02d}_{step['name']}.png", rgb)
        if "winners" in step:  # the maps it pooled, each window's winner in yellow
            maps, mask = step["_input"], step["winners"]
            in_scale = float(np.abs(maps).max()) or 1.0
            factor = pictures.fit_factor(*maps.shape[1:], target=96)
            tiles = []
            for plane, marks in zip(maps, mask, strict=True):
                rgb = pictures.signed_rgb(plane, in_scale)
                rgb[marks] = WINNER
                tiles.append(pictures.enlarge(rgb, factor))
            save(f"{number:02d}_{step['name']}_winners.png", pictures.tile_grid(tiles, 8))
    saliency = walk["saliency"]
    s_scale = float(np.abs(saliency).max()) or 1.0
    maps = saliency if saliency.ndim == 3 else saliency[None]
    save("99_saliency.png", pictures.signed_maps(maps, s_scale, target=160))
    return written
