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

from bench import NETS, gpucnn_engine  # noqa: E402

from gpucnn.array.backend import cupy_status  # noqa: E402

cupy, _unavailable = cupy_status()
if cupy is None:
    sys.exit(f"gpu_probe.py needs CuPy on a CUDA GPU: {_unavailable}")
DEFAULT_NETS = ["lecture8x8", "digits32", "lenet64", "lenet256", "lenet4096"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("nets", nargs="*", help=f"some of {', '.join(sorted(NETS))}")
    parser.add_argument(
        "--one-step",
        action="store_true",
        help="profile exactly one step (for ncu --profile-from-start off)",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="GPU time of each conv layer's forward and backward (CUDA events)",
    )
    args = parser.parse_args()
    unknown = [name for name in args.nets if name not in NETS]
    if unknown:
        parser.error(f"unknown net {unknown[0]!r}; allowed: {', '.join(sorted(NETS))}")
    args.nets = args.nets or DEFAULT_NETS
    if args.layers:
        for name in args.nets:
            conv_layer_rates(name)
        return
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


def gpu_ms(fn, reps: int = 20) -> float:
    """Mean GPU time of fn() in ms, measured with CUDA events around reps calls."""
    fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / reps


def conv_layer_rates(name: str) -> None:
    """Each conv layer's forward and backward GFLOP/s against a cuBLAS float32 GEMM."""
    import numpy as np  # noqa: PLC0415
    from bench import build_gpucnn  # noqa: PLC0415

    from gpucnn.array.im2col import nchw_to_internal  # noqa: PLC0415

    net = NETS[name]
    model = build_gpucnn(net, "cupy")
    rng = np.random.default_rng(0)
    # The layers' _forward takes the internal (C, H, W, N) layout; prepare_input gives NCHW.
    h = nchw_to_internal(model.prepare_input(rng.standard_normal((net.batch, *net.input_shape))))
    a = cupy.asarray(rng.standard_normal((4096, 4096)), dtype=cupy.float32)
    gemm = 2 * 4096**3 / gpu_ms(lambda: a @ a, 10) / 1e6
    print(f"{name}: cuBLAS float32 GEMM 4096^3 {gemm:,.0f} GFLOP/s")
    for position, index in enumerate(model.execution_order):
        layer = model.layers[index]
        x = h
        h = layer._forward(x)
        if layer.type != "conv":
            continue
        p, oh, ow = layer.out_shape
        macs = (
            net.batch
            * p
            * oh
            * ow
            * layer.in_channels
            * layer.kernel_size[0]
            * layer.kernel_size[1]
        )
        grad = cupy.ones_like(h)
        forward = gpu_ms(lambda layer=layer, x=x: layer._forward(x))
        backward = gpu_ms(
            lambda layer=layer, g=grad, first=position == 0: layer._backward(
                g, need_input_grad=not first
            )
        )
        backward_flops = 2 * macs * (1 if position == 0 else 2)
        print(
            f"  {layer.name}: forward {forward:.3f} ms = {2 * macs / forward / 1e6:,.0f} GFLOP/s "
            f"({2 * macs / forward / 1e6 / gemm:.0%} of GEMM); backward {backward:.3f} ms = "
            f"{backward_flops / backward / 1e6:,.0f} GFLOP/s "
            f"({backward_flops / backward / 1e6 / gemm:.0%}); together "
            f"{(2 * macs + backward_flops) / (forward + backward) / 1e6 / gemm:.0%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
