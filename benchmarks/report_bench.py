"""How long a run's report.html takes to build and log, and how big it is.

    python benchmarks/report_bench.py            # digits and LeNet on Fashion-MNIST
    python benchmarks/report_bench.py --skip-fashion

Each run is trained first (in a scratch MLflow store, one process per run, like `make
train`); then `gpucnn.report.write_and_log` is timed --rounds times in this process, as
the training app calls it at the end of a run. Targets (issue 14): at most 2 s for the
digits run and 10 s for LeNet on Fashion-MNIST, on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "digits (small_cnn, 3 epochs)": ["experiment=digits", "trainer.epochs=3"],
    "Fashion-MNIST (lenet, 1 epoch)": [
        "experiment=fashion_mnist",
        "model=lenet",
        "trainer.epochs=1",
    ],
}
TARGETS = {"digits (small_cnn, 3 epochs)": 2.0, "Fashion-MNIST (lenet, 1 epoch)": 10.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-fashion", action="store_true")
    args = parser.parse_args(argv)
    import mlflow  # noqa: PLC0415

    from gpucnn.report import write_and_log  # noqa: PLC0415

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpucnn-report-bench-") as scratch:
        store = f"sqlite:///{scratch}/mlflow.db"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MLFLOW_TRACKING_URI", None)
        mlflow.set_tracking_uri(store)
        for name, overrides in RUNS.items():
            if args.skip_fashion and "Fashion" in name:
                continue
            before = {
                r.info.run_id
                for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
            }
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gpucnn.train",
                    *overrides,
                    "backend=numpy",
                    f"tracking.uri={store}",
                ],
                cwd=scratch,
                env=env,
                check=True,
                capture_output=True,
            )
            (run_id,) = {
                r.info.run_id
                for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
            } - before
            times = []
            for round_number in range(args.rounds):
                started = time.perf_counter()
                out = write_and_log(run_id, Path(scratch) / f"report-{round_number}")
                times.append(time.perf_counter() - started)
            rows.append((name, times, out.stat().st_size / 1e6))
    print(f"# report.html: build and log ({os.cpu_count()} CPUs, {args.rounds} rounds)\n")
    print("| run | median s | all rounds s | target s | size MB |")
    print("| --- | ---: | --- | ---: | ---: |")
    for name, times, size in rows:
        spread = ", ".join(f"{t:.2f}" for t in times)
        median = statistics.median(times)
        print(f"| {name} | {median:.2f} | {spread} | {TARGETS[name]:.0f} | {size:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
