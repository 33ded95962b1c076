"""Data parallel over MPI, measured: one process against 2 MPI ranks on the same cores,
beside torch, for the digits net (batch 32) and LeNet (batch 256); the collectives' time
per step reported apart.

    python benchmarks/mpi_bench.py               # needs the distributed extra
    python benchmarks/mpi_bench.py --steps 200

Each engine runs the same training step (forward, backward, update) on random inputs
for --steps steps after a warm-up; ms per step is the median of --rounds blocks. The
2-rank job is one `mpiexec -n 2` of this script (each rank on its share of the cores);
its "all-reduce" column is the time a step spends in MPI calls (the status words, the
loss and outputs, the gradient Allreduce), measured on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import NETS, gpucnn_engine, time_block, torch_engine  # noqa: E402

CASES = ("digits32", "lenet256")


def one_process(name: str, steps: int, rounds: int) -> float:
    step, sync, _ = gpucnn_engine(NETS[name], "numpy")
    for _ in range(3):
        step()
    return statistics.median(time_block(step, sync, steps) for _ in range(rounds))


def with_torch(name: str, steps: int, rounds: int) -> float | None:
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    torch.set_num_threads(2)
    step, sync, _ = torch_engine(NETS[name], "cpu")
    for _ in range(3):
        step()
    return statistics.median(time_block(step, sync, steps) for _ in range(rounds))


def rank_job(name: str, steps: int, rounds: int) -> None:
    """Inside mpiexec: the same step through MpiSplit; rank 0 prints JSON."""
    import numpy as np  # noqa: PLC0415
    from bench import build_gpucnn  # noqa: PLC0415

    from gpucnn import GradientAscent  # noqa: PLC0415
    from gpucnn.parallel.mpi import MpiSplit, World  # noqa: PLC0415

    world = World()
    net = NETS[name]
    spent = [0.0]
    world.comm = _Timed(world.comm, spent)
    with world.cpus():
        model = build_gpucnn(net, "numpy")
        rng = np.random.default_rng(0)
        x = rng.standard_normal((net.batch, *net.input_shape)).astype("float32")
        y = rng.integers(0, net.classes, net.batch)
        runner, optimizer = MpiSplit(model, world), GradientAscent(0.01)

        def step():
            runner.agreed_stop(0)  # as fit does every step
            runner.loss(x, y)
            optimizer.step(runner.params, runner.backward())

        for _ in range(3):
            step()
        blocks, comms = [], []
        for _ in range(rounds):
            spent[0] = 0.0
            blocks.append(time_block(step, lambda: None, steps))
            comms.append(spent[0] / steps)
    if world.rank == 0:
        print(json.dumps({"step": statistics.median(blocks), "comm": statistics.median(comms)}))


class _Timed:
    """The communicator with its collectives timed (everything else passed through)."""

    def __init__(self, comm, spent):
        self._comm, self._spent = comm, spent

    def __getattr__(self, name):
        attribute = getattr(self._comm, name)
        if name not in ("allreduce", "allgather", "bcast", "Allreduce"):
            return attribute

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return attribute(*args, **kwargs)
            finally:
                self._spent[0] += time.perf_counter() - started

        return timed


def two_ranks(name: str, steps: int, rounds: int) -> dict:
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    job = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, __file__, "--rank-job", name]
        + ["--steps", str(steps), "--rounds", str(rounds)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(job.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank-job", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_job:
        rank_job(args.rank_job, args.steps, args.rounds)
        return 0
    print(f"# data parallel over MPI ({os.cpu_count()} CPUs; ms per training step)\n")
    print("| net | 1 process | 2 MPI ranks | of which MPI calls | torch (2 threads) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in CASES:
        single = one_process(name, args.steps, args.rounds)
        ranks = two_ranks(name, args.steps, args.rounds)
        reference = with_torch(name, args.steps, args.rounds)
        torch_text = f"{reference * 1e3:.2f}" if reference is not None else "-"
        print(
            f"| {name} | {single * 1e3:.2f} | {ranks['step'] * 1e3:.2f} | "
            f"{ranks['comm'] * 1e3:.2f} | {torch_text} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
