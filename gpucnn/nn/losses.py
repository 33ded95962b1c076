"""Output heads: an activation and its objective, fused so both stay numerically stable.

Sign convention. The lecture *maximises* the log-likelihood J with gradient ascent.
gpucnn computes the loss L = -J / N (the mean negative log-likelihood over the batch)
and its gradients; ascent on J is descent on L, step for step (see docs/lecture.md).
For one sample, -dL/dtheta is the lecture's dJ/dtheta exactly.
"""

from __future__ import annotations

from typing import Any

from gpucnn.array.backend import Array, array_module
from gpucnn.array.cross_entropy import (
    log_softmax,
    logistic_cross_entropy,
    softmax_cross_entropy,
)
from gpucnn.array.pointwise import logistic


class Head:
    """A loss at the end of a network: ``forward(net, y)`` -> mean loss, ``backward()``."""

    type = "head"  # the name in HEAD_TYPES and the "type" of the head's config

    def check_outputs(self, out_shape: tuple[int, ...]) -> None:
        """Raise if the network's output shape cannot feed this head."""

    def check_labels(self, labels: Array, out_shape: tuple[int, ...]) -> None:
        """Raise a one-line ValueError naming a label this head cannot take.

        Called on host labels only: checking device labels would cost a transfer per step.
        """

    def forward(self, net: Array, labels: Array) -> Array:
        raise NotImplementedError

    def backward(self) -> Array:
        raise NotImplementedError

    def predict_proba(self, net: Array) -> Array:
        raise NotImplementedError

    def predict(self, net: Array) -> Array:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"type": self.type}


class LogisticLogLikelihood(Head):
    """One logistic neuron, y_hat = g(net), with the Bernoulli log-likelihood
    J = y log y_hat + (1 - y) log(1 - y_hat).

    The loss per sample is -J = softplus(net) - y * net, which is finite for any net
    (net = 18525 and y = 0 give 18525, where the textbook formula gives log(0)), and
    dL/dnet = y_hat - y. Labels are 0/1 floats of shape (N,).
    """

    type = "logistic"

    def check_outputs(self, out_shape: tuple[int, ...]) -> None:
        if tuple(out_shape) != (1,):
            raise ValueError(
                f"the logistic head needs exactly one output per sample, got {tuple(out_shape)}"
            )

    def check_labels(self, labels: Array, out_shape: tuple[int, ...]) -> None:
        if labels.dtype.kind not in "biuf":
            raise ValueError(f"labels must be numbers in [0, 1], got dtype {labels.dtype}")
        if labels.size and not (labels.min() >= 0 and labels.max() <= 1):  # NaN fails too
            bad = labels[~((labels >= 0) & (labels <= 1))].reshape(-1)[0]
            raise ValueError(
                f"labels must be in [0, 1] (class 1 = 1, class 0 = 0), got {bad.item()!r}"
            )

    def forward(self, net: Array, labels: Array) -> Array:
        net = net.reshape(-1)
        labels = labels.reshape(-1)
        if labels.shape != net.shape:
            raise ValueError(f"labels have shape {labels.shape}, expected ({net.shape[0]},)")
        per_sample, grad = logistic_cross_entropy(net, labels)
        self._grad = grad  # d(mean loss)/d net = (g(net) - y) / N
        return per_sample.mean()

    def backward(self) -> Array:
        return self._grad.reshape(-1, 1)

    def predict_proba(self, net: Array) -> Array:
        """P(class 1) per sample, shape (N,)."""
        return logistic(net.reshape(-1))

    def predict(self, net: Array) -> Array:
        return (net.reshape(-1) > 0).astype("int64")


class SoftmaxCrossEntropy(Head):
    """Softmax over K outputs with the categorical log-likelihood (cross-entropy).

    Computed through log-softmax (logits shifted by their maximum), so any finite
    logits give a finite loss. dL/dlogits = (softmax - one_hot) / N. Labels are integer
    class indices of shape (N,).
    """

    type = "softmax"

    def check_outputs(self, out_shape: tuple[int, ...]) -> None:
        if len(out_shape) != 1 or out_shape[0] < 2:
            raise ValueError(
                f"the softmax head needs a flat output of >= 2 classes, got {tuple(out_shape)}"
            )

    def check_labels(self, labels: Array, out_shape: tuple[int, ...]) -> None:
        classes = out_shape[0]
        allowed = f"class indices 0..{classes - 1}"
        if labels.dtype.kind not in "biuf":
            raise ValueError(f"labels must be {allowed}, got dtype {labels.dtype}")
        if not labels.size:
            return
        if labels.dtype.kind == "f":
            fractional = labels != labels.round()  # NaN and inf included
            if fractional.any():
                raise ValueError(f"labels must be {allowed}, got {labels[fractional][0].item()!r}")
        low, high = labels.min(), labels.max()
        if low < 0 or high >= classes:
            raise ValueError(f"labels must be {allowed}, got {(low if low < 0 else high).item()!r}")

    def forward(self, net: Array, labels: Array) -> Array:
        labels = labels.reshape(-1)
        if labels.shape[0] != net.shape[0]:
            raise ValueError(f"labels have shape {labels.shape}, expected ({net.shape[0]},)")
        if labels.dtype.kind not in "iu":
            labels = labels.astype("int64")
        per_sample, grad = softmax_cross_entropy(net, labels)
        self._grad = grad  # d(mean loss)/d logits = (softmax - one_hot) / N
        return per_sample.mean()

    def backward(self) -> Array:
        return self._grad

    def predict_proba(self, net: Array) -> Array:
        return array_module(net).exp(log_softmax(net))

    def predict(self, net: Array) -> Array:
        return net.argmax(axis=1)


HEAD_TYPES: dict[str, type[Head]] = {
    cls.type: cls for cls in (LogisticLogLikelihood, SoftmaxCrossEntropy)
}


def head_from_config(config: dict[str, Any] | str) -> Head:
    head_type = config if isinstance(config, str) else config.get("type")
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head {head_type!r} is not known; allowed: {', '.join(HEAD_TYPES)}")
    return HEAD_TYPES[head_type]()
