"""Run under `mpiexec -n K` by tests/test_mpi.py: one epoch of the digits net in float64
through MpiSplit, rank 0 writes the final parameters (and the history) to argv[1]."""

from __future__ import annotations

import json
import sys

import numpy as np

from gpucnn import Adam, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, SoftmaxCrossEntropy
from gpucnn.data import load_dataset
from gpucnn.fit import fit
from gpucnn.parallel.mpi import MpiSplit, World


def build(data):
    layers = [Conv2D(6, 3, padding="same"), ReLU(), MaxPool2D(2), Flatten(), Dense(10)]
    return Sequential(
        layers, SoftmaxCrossEntropy(), data.input_shape, dtype="float64", seed=3, l2=1e-3
    )


def main() -> None:
    out, batch = sys.argv[1], int(sys.argv[2])
    data = load_dataset("digits", seed=0)
    model = build(data)
    world = World()
    with world.cpus():
        result = fit(
            MpiSplit(model, world),
            Adam(3e-3),
            data,
            epochs=2,
            batch_size=batch,
            seed=5,
            kernels_every=0,
            progress=False,
        )
    if world.rank == 0:
        np.savez(out, **{k: np.asarray(v) for k, v in model.params.items()})
        with open(out + ".json", "w") as handle:
            json.dump({"history": result.history, "test": result.test, "size": world.size}, handle)


if __name__ == "__main__":
    main()
