"""Where a CuPy training step spends its time, and how many kernels it launches.

    python benchmarks/gpu_probe.py [nets...]
        host enqueue time per step (Python + launch overhead) against the time until the
        GPU has finished: when the two are equal, the step is bound by launches.
    ncu --profile-from-start off --csv --metrics gpu__time_duration.sum \\
        python benchmarks/gpu_probe.py --one-step lenet256
        runs one step between cudaProfilerStart/Stop, so Nsight Compute lists exactly
        the kernels of one step (one CSV row per launch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy  # noqa: E402
from bench import NETS, gpucnn_engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "nets", nargs="*", default=["lecture8x8", "digits32", "lenet64", "lenet256", "lenet4096"]
    )
    parser.add_argument(
        "--one-step",
        action="store_true",
        help="profile exactly one step (for ncu --profile-from-start off)",
    )
    args = parser.parse_args()
    for name in args.nets:
        step, sync, _ = gpucnn_engine(NETS[name], "cupy")
        for _ in range(3):
            step()
        sync()
        if args.one_step:
            cupy.cuda.profiler.start()
            step()
            sync()
            cupy.cuda.profiler.stop()
            continue
        reps = 200 if name != "lenet4096" else 20
        start = time.perf_counter()
        for _ in range(reps):
            step()
        host = (time.perf_counter() - start) / reps
        sync()
        total = (time.perf_counter() - start) / reps
        print(
            f"{name:11s} host enqueue {1e3 * host:.3f} ms/step  until GPU done "
            f"{1e3 * total:.3f} ms/step",
            flush=True,
        )


if __name__ == "__main__":
    main()
