"""``python -m gpucnn.explain``: the lecture's worked examples, step by step, computed by
the engine itself (float64, NumPy).

    python -m gpucnn.explain                  # 4x4 convolution, then the 8x8 network
    python -m gpucnn.explain --json           # the 8x8 network as one JSON object
    python -m gpucnn.explain --image X.npy --kernel K.npy --weights theta.npy --label 1

Your own arrays: the image is (H, W) or (C, H, W); the kernel (KH, KW), (C, KH, KW) or
(P, C, KH, KW); the weights one per flattened feature. Anything not given is the
lecture's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gpucnn.array.backend import get_backend
from gpucnn.nn.layers import Conv2D, Dense, Flatten, Pool2D
from gpucnn.nn.losses import LogisticLogLikelihood
from gpucnn.nn.model import Sequential

LECTURE_IMAGE = np.arange(1, 65, dtype=np.float64).reshape(8, 8)
LECTURE_KERNEL = np.arange(1, 10, dtype=np.float64).reshape(3, 3)
LECTURE_WEIGHTS = np.array([1.0, 2.0, 3.0, 4.0])
SMALL_IMAGE = 10 * np.arange(1, 5)[:, None] + np.arange(1, 5)[None, :] + 0.0
SMALL_KERNEL = 0.1 * np.arange(1, 4)[:, None] + 0.01 * np.arange(1, 4)[None, :]

KEYS = ("F", "Z", "h", "net", "y_hat", "grad_theta", "grad_K")


def walk(
    image: np.ndarray,
    kernel: np.ndarray,
    weights: np.ndarray,
    label: float = 0.0,
    pool: str = "max",
    window: int = 3,
    stride: int | None = 3,
    flatten: str = "F",
    mode: str = "convolution",
) -> dict[str, Any]:
    """Run one sample through conv -> pool -> flatten -> logistic neuron and back.

    Returns every intermediate as NumPy arrays. Gradients are of the log-likelihood J
    (what the lecture maximises), i.e. minus the loss gradients the engine computes.
    """
    image, kernel = _as_image(image), _as_kernel(kernel)
    if kernel.shape[1] != image.shape[0]:
        raise ValueError(
            f"kernel has {kernel.shape[1]} channels but the image has {image.shape[0]} "
            f"(kernel shape {kernel.shape}, image shape {image.shape})"
        )
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    model = _lecture_network(image.shape, kernel.shape, pool, window, stride, flatten, mode)
    weights = _checked_weights(weights, model)
    model.set_params({"conv1.weight": kernel, "dense1.weight": weights[:, None]})
    x = image[None]
    conv, pooling, flat, dense = model.layers
    feature_maps = conv.forward(x)[0]  # each layer on its own, to show what it gives
    pooled = pooling.forward(feature_maps[None])[0]
    h = flat.forward(pooled[None])[0]
    net = float(dense.forward(h[None])[0, 0])
    loss = float(model.loss(x, np.array([float(label)])))
    grads = model.backward()
    return {
        "X": image,
        "K": kernel,
        "theta": weights,
        "y": float(label),
        "F": feature_maps,
        "Z": pooled,
        "h": h,
        "net": net,
        "y_hat": float(model.predict_proba(x)[0]),
        "J": -loss,
        "grad_theta": -grads["dense1.weight"][:, 0],
        "grad_K": -grads["conv1.weight"],
    }


def _as_image(image: Any) -> np.ndarray:
    """(C, H, W) float64 from an (H, W) or (C, H, W) array."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W) or (C, H, W), got shape {image.shape}")
    return image


def _as_kernel(kernel: Any) -> np.ndarray:
    """(P, C, KH, KW) float64 from a (KH, KW), (C, KH, KW) or (P, C, KH, KW) array."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim in (2, 3):
        kernel = kernel.reshape((1,) * (4 - kernel.ndim) + kernel.shape)
    if kernel.ndim != 4:
        raise ValueError(
            f"kernel must be (KH, KW), (C, KH, KW) or (P, C, KH, KW), got {kernel.shape}"
        )
    return kernel


def _lecture_network(
    image_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    pool: str,
    window: int,
    stride: int | None,
    flatten: str,
    mode: str,
) -> Sequential:
    """The lecture's net for one image: conv (no bias), pool, flatten, one logistic neuron
    without bias; float64 on NumPy."""
    return Sequential(
        [
            Conv2D(kernel_shape[0], kernel_shape[2:], bias=False, mode=mode),
            Pool2D(pool, window, stride),
            Flatten(flatten),
            Dense(1, bias=False),
        ],
        LogisticLogLikelihood(),
        input_shape=image_shape,
        dtype="float64",
    )


def _checked_weights(weights: Any, model: Sequential) -> np.ndarray:
    """The output weights, one per flattened feature of ``model``."""
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    features = model.layers[2].out_shape[0]
    if weights.size != features:
        pooled = "x".join(str(d) for d in model.layers[1].out_shape)
        raise ValueError(
            f"weights have {weights.size} entries but the flattened pooled maps have {features} "
            f"(maps C x H x W = {pooled}); give one weight per feature"
        )
    return weights


def _squeeze_leading(a: np.ndarray, keep: int) -> np.ndarray:
    while a.ndim > keep and a.shape[0] == 1:
        a = a[0]
    return a


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """The keys F, Z, h, net, y_hat, grad_theta, grad_K; matrices as lists of rows."""
    return {
        "F": _squeeze_leading(result["F"], 2).tolist(),
        "Z": _squeeze_leading(result["Z"], 2).tolist(),
        "h": result["h"].tolist(),
        "net": result["net"],
        "y_hat": result["y_hat"],
        "grad_theta": result["grad_theta"].tolist(),
        "grad_K": _squeeze_leading(result["grad_K"], 2).tolist(),
    }


def _show(name: str, value: Any, meaning: str) -> str:
    if isinstance(value, np.ndarray):
        body = np.array2string(
            _squeeze_leading(value, 2), precision=6, suppress_small=True, max_line_width=120
        )
        shape = "x".join(map(str, value.shape))
        return f"{name}  ({meaning}; {shape})\n{body}\n"
    return f"{name} = {value:.10g}   ({meaning})\n"


def report(result: dict[str, Any], title: str) -> str:
    lines = [f"== {title} ==\n"]
    lines.append(_show("X", result["X"], "input image"))
    lines.append(_show("K", result["K"], "kernel; true convolution slides it flipped"))
    lines.append(_show("theta", result["theta"], "output neuron weights"))
    lines.append(_show("y", result["y"], "target class"))
    lines.append(_show("F", result["F"], "feature map, F = X * K (valid)"))
    lines.append(_show("Z", result["Z"], "pooled map"))
    lines.append(_show("h", result["h"], "Z flattened"))
    lines.append(_show("net", result["net"], "h . theta"))
    lines.append(_show("y_hat", result["y_hat"], "logistic g(net)"))
    lines.append(_show("J", result["J"], "log-likelihood y log y_hat + (1-y) log(1-y_hat)"))
    lines.append(_show("dJ/dtheta", result["grad_theta"], "= (y - y_hat) h"))
    lines.append(_show("dJ/dK", result["grad_K"], "backprop through pool and convolution"))
    return "\n".join(lines)


LECTURE_NOTE = (
    "Note: the lecture prints dJ/dK = -[[295 285 275] [215 205 195] [135 125 115]]. A\n"
    "finite-difference check gives the values above, -(535 - 80p - 10q); the lecture's\n"
    "flipped slice of X also reverses the feature-map positions. See docs/lecture.md.\n"
)


def _load(path: str | None, what: str, default: np.ndarray) -> np.ndarray:
    if path is None:
        return default
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--{what} {path!r}: no such file")
    try:
        return np.load(file, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"--{what} {path!r}: not a readable .npy array ({err})") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpucnn.explain",
        description="Walk the lecture's CNN examples (or your own arrays) step by step.",
    )
    parser.add_argument("--json", action="store_true", help="print the network example as JSON")
    parser.add_argument(
        "--image", help=".npy image, (H, W) or (C, H, W); with a trained model also .png"
    )
    parser.add_argument("--kernel", help=".npy kernel, (KH, KW), (C, KH, KW) or (P, C, KH, KW)")
    parser.add_argument("--weights", help=".npy output weights, one per flattened feature")
    parser.add_argument("--label", type=float, default=0.0, help="target class, 0 or 1")
    parser.add_argument("--pool", default="max", choices=["max", "l2", "avg"])
    parser.add_argument("--window", type=int, default=3, help="pooling window Q")
    parser.add_argument("--stride", type=int, default=3, help="pooling stride S")
    parser.add_argument(
        "--flatten", default="F", choices=["F", "C"], help="F: column-major (lecture), C: row-major"
    )
    parser.add_argument(
        "--mode", default="convolution", choices=["convolution", "cross_correlation"]
    )
    trained = parser.add_argument_group(
        "a trained model", "walk one image through a run's model, layer by layer"
    )
    source = trained.add_mutually_exclusive_group()
    source.add_argument("--run-id", help="an MLflow run id")
    source.add_argument("--checkpoint", help="a model .npz written by gpucnn.train")
    trained.add_argument("--config", help="the run's config.yaml (default: beside it)")
    trained.add_argument("--tracking-uri", help="MLflow store (default: as gpucnn.train)")
    trained.add_argument("--index", type=int, help="test image K of the run's data")
    trained.add_argument("--out", help="also write the walk as PNG pictures in this folder")
    args = parser.parse_args(argv)
    if args.run_id or args.checkpoint:
        return _explain_trained(args)
    for option in ("index", "out", "config", "tracking_uri"):
        if getattr(args, option) is not None:
            flag = "--" + option.replace("_", "-")
            print(f"gpucnn.explain: error: {flag} needs --run-id or --checkpoint", file=sys.stderr)
            return 2
    own = any(v is not None for v in (args.image, args.kernel, args.weights))
    try:
        result = walk(
            _load(args.image, "image", LECTURE_IMAGE),
            _load(args.kernel, "kernel", LECTURE_KERNEL),
            _load(args.weights, "weights", LECTURE_WEIGHTS),
            label=args.label,
            pool=args.pool,
            window=args.window,
            stride=args.stride,
            flatten=args.flatten,
            mode=args.mode,
        )
    except ValueError as err:
        print(f"gpucnn.explain: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(result)))
        return 0
    if not own:
        numpy_backend = get_backend("numpy")
        small = Conv2D(1, 3, bias=False)
        small.build((1, 4, 4), numpy_backend, numpy_backend.random(0), "float64")
        small.set_param("weight", SMALL_KERNEL[None, None])
        print("== Lecture: convolution of a 4x4 image with a 3x3 kernel ==\n")
        print(_show("X", SMALL_IMAGE, "input"))
        print(_show("K", SMALL_KERNEL, "kernel"))
        print(_show("F", small.forward(SMALL_IMAGE[None, None])[0, 0], "X * K, valid"))
    title = (
        "Your network" if own else "Lecture: 8x8 image, 3x3 kernel, 3x3/3 max pool, logistic neuron"
    )
    print(report(result, title))
    if not own:
        print(LECTURE_NOTE)
    return 0


def _explain_trained(args: argparse.Namespace) -> int:
    """The walk of one image (``--index`` of the run's test split, or ``--image``)
    through a trained model: text, ``--json``, and PNGs in ``--out``."""
    import tempfile  # noqa: PLC0415

    from gpucnn import inside  # noqa: PLC0415
    from gpucnn.report import explain_input, trained_model  # noqa: PLC0415

    if (args.index is None) == (args.image is None):
        print("gpucnn.explain: error: give one of --index K or --image FILE", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="gpucnn-explain-") as scratch:
            model, config = trained_model(
                args.run_id, args.checkpoint, args.config, args.tracking_uri, Path(scratch)
            )
        x, label, names, where = explain_input(model, config, args.index, args.image)
        walk = inside.walk_model(model, x, label, names)
        written = inside.write_pictures(walk, Path(args.out)) if args.out else []
    except (ValueError, FileNotFoundError) as err:
        print(f"gpucnn.explain: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(inside.as_json(walk))
    else:
        print(inside.as_text(walk, f"{config['model'].get('name', 'model')} on {where}"))
        if written:
            print(f"\n{len(written)} pictures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
