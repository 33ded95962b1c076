"""The output heads' losses fused with their gradients (part of the array layer): softmax
cross-entropy and the logistic neuron's, each as per-sample loss and d mean / d input."""

from __future__ import annotations

from gpucnn.array import cuda_kernels
from gpucnn.array.backend import Array, array_module, is_gpu
from gpucnn.array.pointwise import logistic


def log_softmax(logits: Array) -> Array:
    """Row-wise log softmax of (N, K) logits, shifted by the row maximum (no overflow)."""
    xp = array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


# -- output heads: per-sample loss and the gradient of the mean, in one go --------------
def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """(per-sample -log softmax(logits)[label], d mean / d logits) for (N, K) logits.

    Through log-softmax with the row maximum subtracted, so finite logits never overflow.
    """
    xp = array_module(logits, labels)
    if is_gpu(xp):
        return cuda_kernels.softmax_cross_entropy(logits, labels)
    log_p = log_softmax(logits)
    rows = xp.arange(logits.shape[0])
    grad = xp.exp(log_p)
    grad[rows, labels] -= 1.0
    return -log_p[rows, labels], grad * (1.0 / logits.shape[0])


def logistic_cross_entropy(net: Array, labels: Array) -> tuple[Array, Array]:
    """(per-sample softplus(net) - y net, (g(net) - y) / N) for a logistic neuron."""
    xp = array_module(net, labels)
    if is_gpu(xp):
        return cuda_kernels.logistic_cross_entropy(net, labels)
    softplus = xp.maximum(net, 0) + xp.log1p(xp.exp(-xp.abs(net)))
    return softplus - labels * net, (logistic(net) - labels) * (1.0 / net.shape[0])
