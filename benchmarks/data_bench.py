"""Real data, measured: a Fashion-MNIST epoch in gpucnn beside the same net and data in
PyTorch, and the peak memory (RSS) of the training app on real data.

    python benchmarks/data_bench.py                 # both parts, a table on stdout
    python benchmarks/data_bench.py --skip-memory   # the epoch only

Epoch: LeNet (conf/model/lenet.yaml), batch 64, float32, Adam lr 1e-3, one whole epoch of
the training split including batching and scaling. Both engines get the same uint8 images
preloaded once, the same index array per epoch and the same scaling; torch runs 2
threads, no DataLoader. Rounds alternate the engines; the table gives each engine's
median epoch time, their ratio and the test accuracy after the epoch.

Memory: the peak RSS of `python -m gpucnn.train` (each in its own process, its own
VmHWM as it exits) on the digits (the reference), for one Fashion-MNIST epoch with
LeNet, and for CIFAR-10 with the cifar10 preset: CIFAR-10's real archive is not on the build
machines, so a full-size one in the published binary format is made first, and the run
is stopped with SIGTERM after --cifar-seconds (the set is loaded and the training steps
are under way: what the memory peak is made of).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import lenet_layers  # noqa: E402

from gpucnn import Adam, Sequential, SoftmaxCrossEntropy  # noqa: E402
from gpucnn.array import threads  # noqa: E402
from gpucnn.array.backend import get_backend  # noqa: E402
from gpucnn.data import load_dataset  # noqa: E402
from gpucnn.fit import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def gpucnn_epoch(data, order_seed: int) -> tuple[float, float]:
    """(seconds for one training epoch, test accuracy after it)."""
    model = Sequential(
        lenet_layers(),
        SoftmaxCrossEntropy(),
        data.input_shape,
        backend=get_backend("numpy"),
        dtype="float32",
        seed=0,
    )
    result = fit(
        model, Adam(lr=1e-3), data, epochs=1, batch_size=64, seed=order_seed, progress=False
    )
    seconds = len(data.y_train) / result.images_per_second
    return seconds, result.test["test_accuracy"]


def torch_epoch(data, order_seed: int) -> tuple[float, float]:
    """The same epoch in PyTorch: the uint8 set preloaded as one tensor, each batch
    indexed by the same permutation and scaled the same way; test accuracy after it."""
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    images = torch.from_numpy(np.ascontiguousarray(data.x_train))
    labels = torch.from_numpy(data.y_train)
    mean, std = data.scaling.mean[0], data.scaling.std[0]
    # fit draws its epoch order from a PCG64 generator seeded so: the same index arrays.
    order = torch.from_numpy(np.random.default_rng(order_seed).permutation(len(labels)))
    started = time.perf_counter()
    for start in range(0, len(labels), 64):
        index = order[start : start + 64]
        x = (images[index].float() - mean) / std
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels[index])
        loss.backward()
        optimizer.step()
        loss.item()  # gpucnn reads each step's loss too (once per log interval)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        x = (torch.from_numpy(data.x_test).float() - mean) / std
        accuracy = (model(x).argmax(1) == torch.from_numpy(data.y_test)).float().mean()
    return seconds, float(accuracy)


def epoch_part(rounds: int) -> dict:
    import torch  # noqa: PLC0415

    torch.set_num_threads(2)
    data = load_dataset("fashion_mnist", download=False)
    times: dict[str, list[float]] = {"gpucnn": [], "torch": []}
    accuracy: dict[str, list[float]] = {"gpucnn": [], "torch": []}
    for round_number in range(rounds):
        engines = [("gpucnn", gpucnn_epoch), ("torch", torch_epoch)]
        for name, epoch in engines if round_number % 2 == 0 else engines[::-1]:
            seconds, acc = epoch(data, order_seed=round_number)
            times[name].append(seconds)
            accuracy[name].append(acc)
    return {
        "threads": threads.settings().cpus,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "train_images": len(data.y_train),
        "rounds": rounds,
        "times": times,
        "accuracy": accuracy,
    }


# The app reports its own peak (VmHWM, the high-water mark of its own address space) as it
# exits. wait4's ru_maxrss would not do: Linux carries the parent's peak over into a
# child's at exec, and this process, holding Fashion-MNIST and torch after the epochs, peaks
# above the app (every run then read as this process's ~1 GB).
_REPORT_PEAK = """
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as status, open(os.environ["GPUCNN_PEAK_FILE"], "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM")).split()[1])
atexit.register(_peak)
sys.argv = ["gpucnn.train", *sys.argv[1:]]
runpy.run_module("gpucnn.train", run_name="__main__", alter_sys=True)
"""


def peak_rss_mb(args: list[str], env: dict[str, str], stop_after: float | None = None) -> float:
    """The peak resident memory (MB) of ``python -m gpucnn.train ARGS`` in its own
    process (its worker processes not counted); with ``stop_after``, SIGTERM is sent
    after that many seconds."""
    peak_file = Path(env["BENCH_DIR"]) / "peak-kib"
    peak_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", _REPORT_PEAK, *args],
        cwd=env["BENCH_DIR"],
        env={**env, "GPUCNN_PEAK_FILE": str(peak_file)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if stop_after is not None:
        try:
            process.wait(timeout=stop_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
    error = process.communicate()[1].decode()[-2000:]
    if process.returncode not in (0, 128 + signal.SIGTERM):
        raise RuntimeError(f"gpucnn.train {' '.join(args)} failed: {error}")
    if not peak_file.is_file():
        raise RuntimeError(f"gpucnn.train {' '.join(args)} exited without its peak: {error}")
    return int(peak_file.read_text()) / 1024


def full_size_cifar(path: Path) -> None:
    """A cifar-10-binary.tar.gz of the real size (50000 + 10000 images), in its format."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for name in names:
            records = rng.integers(0, 256, (10000, 3073), dtype=np.uint8)
            records[:, 0] %= 10
            blob = records.tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))


def memory_part(cifar_seconds: float, skip_cifar: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpucnn-bench-") as scratch:
        env = {
            **os.environ,
            "BENCH_DIR": scratch,
            "GPUCNN_DATA": str(Path(scratch) / "cache"),
            "PYTHONPATH": str(ROOT),
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        one_epoch = ["backend=numpy", "trainer.epochs=1", "trainer.kernels_every=0"]
        report = {
            "digits": peak_rss_mb(["experiment=digits", *one_epoch], env),
            "fashion_mnist": peak_rss_mb(
                ["experiment=fashion_mnist", "model=lenet", *one_epoch], env
            ),
        }
        if not skip_cifar:
            archive = Path(scratch) / "cifar-10-binary.tar.gz"
            full_size_cifar(archive)
            report["cifar10"] = peak_rss_mb(
                ["experiment=cifar10", f"data.path={archive}", *one_epoch], env, cifar_seconds
            )
        report["cifar10_seconds"] = cifar_seconds
    return report


def table(report: dict) -> str:
    lines = [f"# gpucnn real-data benchmark  ({report['machine']})", ""]
    epoch = report.get("epoch")
    if epoch:
        g, t = (np.median(epoch["times"][k]) for k in ("gpucnn", "torch"))
        lines += [
            f"Fashion-MNIST epoch, LeNet, batch 64, float32, {epoch['train_images']} images, "
            f"{epoch['rounds']} rounds (median); gpucnn on {epoch['threads']} cores, torch "
            f"{epoch['torch_version']} {epoch['torch_threads']} threads",
            "",
            "| engine | epoch s (median) | all rounds | test accuracy after the epoch |",
            "| --- | ---: | --- | --- |",
        ]
        for name, median in (("gpucnn", g), ("torch", t)):
            rounds = ", ".join(f"{s:.2f}" for s in epoch["times"][name])
            accuracy = ", ".join(f"{a:.4f}" for a in epoch["accuracy"][name])
            lines.append(f"| {name} | {median:.2f} | {rounds} | {accuracy} |")
        lines += ["", f"gpucnn / torch epoch time: {g / t:.2f}x (target <= 0.6x)", ""]
    memory = report.get("memory")
    if memory:
        lines += [
            "Peak RSS of `python -m gpucnn.train` (one process each)",
            "",
            "| run | peak RSS MB | above digits MB |",
            "| --- | ---: | ---: |",
        ]
        for name in ("digits", "fashion_mnist", "cifar10"):
            if name in memory:
                above = memory[name] - memory["digits"]
                lines.append(f"| {name} | {memory[name]:.0f} | {above:+.0f} |")
        if "cifar10" in memory:
            lines.append(
                f"\n(cifar10: the preset on a full-size archive in the published format, "
                f"stopped by SIGTERM after {memory['cifar10_seconds']:.0f} s)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="epochs per engine (3)")
    parser.add_argument("--skip-epoch", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-cifar", action="store_true", help="no CIFAR-10 memory run")
    parser.add_argument("--cifar-seconds", type=float, default=60.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    if not args.skip_epoch:
        report["epoch"] = epoch_part(args.rounds)
    if not args.skip_memory:
        report["memory"] = memory_part(args.cifar_seconds, args.skip_cifar)
    print(table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
