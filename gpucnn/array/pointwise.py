"""Elementwise activations on any layout (part of the array layer): ReLU, split over
threads for large arrays, and the logistic function."""

from __future__ import annotations

from gpucnn.array import cuda_kernels
from gpucnn.array.backend import Array, array_module, is_gpu
from gpucnn.array.threads import parallel_for


def relu(x: Array) -> Array:
    xp = array_module(x)
    out = xp.empty_like(x)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    parallel_for(
        xp, flat_in.size, flat_in.size, lambda a, b: xp.maximum(flat_in[a:b], 0, out=flat_out[a:b])
    )
    return out


def relu_backward(grad_out: Array, y: Array) -> Array:
    """grad * (y > 0), where y is the ReLU output (positive exactly where the input was)."""
    xp = array_module(grad_out, y)
    if is_gpu(xp):
        return cuda_kernels.elementwise("relu_backward")(grad_out, y)
    grad_out = xp.ascontiguousarray(grad_out)
    out = xp.empty_like(grad_out)
    g, yy, o = grad_out.reshape(-1), y.reshape(-1), out.reshape(-1)

    def body(a: int, b: int) -> None:
        xp.multiply(g[a:b], yy[a:b] > 0, out=o[a:b])

    parallel_for(xp, g.size, g.size, body)
    return out


def logistic(z: Array) -> Array:
    """1 / (1 + exp(-z)), computed as (1 + tanh(z/2)) / 2 so it never overflows."""
    return 0.5 * (1.0 + array_module(z).tanh(0.5 * z))
