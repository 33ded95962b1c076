"""The optimizers' update rules, in place (part of the array layer): a NumPy expression on
the CPU, one fused CUDA kernel per parameter on the GPU. gpucnn.nn.optim calls them."""

from __future__ import annotations

from gpucnn.array import cuda_kernels
from gpucnn.array.backend import Array, array_module, is_gpu


def sgd_update(param: Array, grad: Array, lr: float) -> None:
    """param <- param - lr * grad."""
    if is_gpu(array_module(param, grad)):
        cuda_kernels.elementwise("sgd")(grad, param.dtype.type(lr), param)
        return
    param -= lr * grad


def momentum_update(param: Array, grad: Array, velocity: Array, lr: float, mu: float) -> None:
    """velocity <- mu velocity - lr grad; param <- param + velocity."""
    if is_gpu(array_module(param, grad, velocity)):
        dtype = param.dtype.type
        cuda_kernels.elementwise("momentum")(grad, dtype(lr), dtype(mu), param, velocity)
        return
    velocity *= mu
    velocity -= lr * grad
    param += velocity


def adam_update(
    param: Array,
    grad: Array,
    m: Array,
    v: Array,
    step: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """m, v <- moving averages of grad, grad^2; param <- param - step m / (sqrt(v) + eps).

    ``step`` and ``eps`` already carry Adam's bias corrections (see optim.Adam).
    """
    xp = array_module(param, grad, m, v)
    if is_gpu(xp):
        dtype = param.dtype.type
        cuda_kernels.elementwise("adam")(
            grad, dtype(step), dtype(beta1), dtype(beta2), dtype(eps), param, m, v
        )
        return
    m *= beta1
    m += (1.0 - beta1) * grad
    v *= beta2
    v += (1.0 - beta2) * (grad * grad)
    param -= step * m / (xp.sqrt(v) + eps)
