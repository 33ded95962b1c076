"""Regenerate the pictures in docs/: `python docs/figures.py` (needs the train extra).

docs/img/seed_20x20.png: the lecture's two 20x20 classes, a noisy sample of each, and the
kernel that `experiment=seed_20x20` learns, each scaled to its own min..max.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw

from gpucnn.array.backend import to_host
from gpucnn.config import to_containers
from gpucnn.data import seed_patterns
from gpucnn.fit import fit
from gpucnn.train import CONF_DIR, prepare

OUT = Path(__file__).resolve().parent / "img"


def tile(array: np.ndarray, scale: int = 8) -> Image.Image:
    span = array.max() - array.min()
    norm = (array - array.min()) / (span if span > 0 else 1)
    return Image.fromarray((np.kron(norm, np.ones((scale, scale))) * 255).astype(np.uint8))


def seed_20x20() -> float:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_containers(
            compose(config_name="config", overrides=["experiment=seed_20x20", "backend=numpy"])
        )
    _, data, model, optimizer = prepare(cfg)
    trainer = cfg["trainer"]
    result = fit(
        model,
        optimizer,
        data,
        trainer["epochs"],
        trainer["batch_size"],
        trainer["seed"],
        kernels_every=0,
        progress=False,
    )
    kernel = to_host(model.params["conv1.weight"])[0, 0]
    # The output depends on theta * K only, so K may come out with either sign; the
    # template the neuron actually responds to is sign(theta) * K.
    theta_sign = float(np.sign(to_host(model.params["dense1.weight"]).ravel()[0])) or 1.0
    patterns = seed_patterns()
    sample = {k: data.x_train[np.flatnonzero(data.y_train == k)[0], 0] for k in (1, 0)}
    panels = [
        ("class 1 (X)", patterns[1]),
        ("class 0 (O)", patterns[0]),
        ("noisy class 1", sample[1]),
        ("noisy class 0", sample[0]),
        ("learned K", kernel),
        ("sign(theta) * K", theta_sign * kernel),
    ]
    width = 20 * 8
    canvas = Image.new("L", (len(panels) * (width + 12) + 12, width + 40), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (title, array) in enumerate(panels):
        left = 12 + i * (width + 12)
        canvas.paste(tile(array), (left, 28))
        draw.text((left, 8), title, fill=0)
    OUT.mkdir(exist_ok=True)
    canvas.save(OUT / "seed_20x20.png")
    template = theta_sign * kernel.ravel()
    correlation = float(np.corrcoef(template, (patterns[1] - patterns[0]).ravel())[0, 1])
    with_x = float(np.corrcoef(template, patterns[1].ravel())[0, 1])
    print(
        f"seed_20x20: test accuracy {result.test['test_accuracy']:.3f}; sign(theta) = "
        f"{theta_sign:+.0f}; correlation of sign(theta)*K with (X - O) {correlation:.3f}, "
        f"with X {with_x:.3f}"
    )
    return correlation


if __name__ == "__main__":
    seed_20x20()
