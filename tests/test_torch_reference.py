"""Replay the same computations in PyTorch (float64) as an independent reference: values
and gradients of conv (both modes, stride, padding), pooling, dense and both heads.
Skipped where PyTorch is not installed (CI); runs where it is (dev machines, GPU hosts)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import threadpoolctl

torch = pytest.importorskip("torch")
F = torch.nn.functional

from gpucnn import (  # noqa: E402
    AvgPool2D,
    BatchSplit,
    Conv2D,
    Dense,
    Flatten,
    L2Pool2D,
    LogisticLogLikelihood,
    MaxPool2D,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
    Tanh,
)
from gpucnn.array import conv as conv_module  # noqa: E402
from gpucnn.array import threads  # noqa: E402
from gpucnn.array.backend import to_host  # noqa: E402
from tests.conftest import lenet_layers  # noqa: E402


def torch_forward(model, x, params, outputs=None):
    """The same network written with torch ops, from gpucnn's own layer settings; each
    layer's output is appended to ``outputs`` when a list is given."""
    h = x
    for layer in model.layers:
        if outputs is not None and h is not x:
            outputs.append(h)
        if layer.type == "conv":
            w = params[f"{layer.name}.weight"]
            if layer.mode == "convolution":
                w = torch.flip(w, dims=(2, 3))  # torch's conv2d is cross-correlation
            top, bottom, left, right = layer.pads
            h = F.pad(h, (left, right, top, bottom))
            h = F.conv2d(h, w, params.get(f"{layer.name}.bias"), stride=layer.stride)
        elif layer.type == "pool":
            if layer.kind == "max":
                h = F.max_pool2d(h, layer.window, layer.stride)
            elif layer.kind == "avg":
                h = F.avg_pool2d(h, layer.window, layer.stride)
            else:
                h = torch.sqrt(
                    F.avg_pool2d(h * h, layer.window, layer.stride)
                    * (layer.window[0] * layer.window[1])
                )
        elif layer.type == "flatten":
            # F: MATLAB's Z(:) of each sample's H x W x C stack (rows fastest, then
            # columns, then maps); F_channels_first: the channel fastest; C: row-major.
            axes = {"F": (0, 1, 3, 2), "F_channels_first": (0, 3, 2, 1), "C": (0, 1, 2, 3)}
            h = h.permute(*axes[layer.order]).reshape(h.shape[0], -1)
        elif layer.type == "dense":
            h = h @ params[f"{layer.name}.weight"]
            if f"{layer.name}.bias" in params:
                h = h + params[f"{layer.name}.bias"]
        else:
            h = {"relu": torch.relu, "tanh": torch.tanh, "logistic": torch.sigmoid}[layer.type](h)
    if outputs is not None:
        outputs.append(h)
    return h


NETS = {
    "conv_max_softmax": (
        lambda: [Conv2D(3, 3, padding="same"), ReLU(), MaxPool2D(2), Flatten(), Dense(4)],
        SoftmaxCrossEntropy,
        (2, 8, 8),
    ),
    "xcorr_stride_l2_rowmajor": (
        lambda: [
            Conv2D(4, (3, 2), stride=2, mode="cross_correlation"),
            Tanh(),
            L2Pool2D(2),
            Flatten("C"),
            Dense(3),
        ],
        SoftmaxCrossEntropy,
        (3, 11, 10),
    ),
    "stacked_avg_logistic": (
        lambda: [
            Conv2D(2, 3),
            ReLU(),
            Conv2D(3, 2, padding=1),
            AvgPool2D(3, 2),
            Flatten(),
            Dense(1),
        ],
        LogisticLogLikelihood,
        (1, 9, 9),
    ),
    # Overlapping max windows after a ReLU (which the model runs after the pool), uneven
    # padding and stride, and a batch large enough to be split across threads.
    "overlap_max_uneven_pad_split": (
        lambda: [
            Conv2D(3, 3, stride=(1, 2), padding=(1, 0, 2, 1)),
            ReLU(),
            MaxPool2D(3, 2),
            Conv2D(2, 2),
            Flatten("C"),
            Dense(5),
        ],
        SoftmaxCrossEntropy,
        (2, 10, 9),
    ),
    # LeNet at full size in two slices of one BLAS thread each, as fit trains it on 2
    # cores: each slice (here and in a worker process) runs its convolutions over the row
    # unfold, with the row fold for conv2's input gradient.
    "lenet_in_slices": (
        lenet_layers,
        SoftmaxCrossEntropy,
        (1, 28, 28),
    ),
}
_SLICE = max(threads.settings().min_thread_slice, threads.settings().min_process_slice)
BATCH = {
    "overlap_max_uneven_pad_split": 2 * threads.settings().min_thread_slice + 3,
    "lenet_in_slices": 2 * _SLICE + 2,
}


@pytest.fixture(params=["as chosen", "row unfold", "im2col"])
def conv_path(request, monkeypatch):
    """The convolutions' formulation in this process: as the array layer chooses it,
    or forced (the row unfold is NumPy's)."""
    if request.param != "as chosen":
        rows = request.param == "row unfold"
        if rows and request.getfixturevalue("backend").name != "numpy":
            pytest.skip("the row unfold is NumPy's")
        monkeypatch.setattr(conv_module, "row_unfold_pays", lambda xp, column_bytes: rows)
    return request.param


@pytest.mark.parametrize("name", list(NETS))
def test_values_and_gradients_match_pytorch(name, backend, rng, conv_path):
    layers, head, shape = NETS[name]
    model = Sequential(layers(), head(), shape, backend=backend, dtype="float64", seed=4, l2=0.05)
    n = BATCH.get(name, 5)
    x = rng.standard_normal((n, *shape))
    if head is LogisticLogLikelihood:
        labels = rng.integers(0, 2, n).astype(float)
    else:
        labels = rng.integers(0, model.output_shape[0], n)
    runner = BatchSplit(model)  # as fit computes it: a large batch in slices
    with contextlib.ExitStack() as setting:
        if name == "lenet_in_slices":  # two slices of one BLAS thread each, as on 2 cores
            setting.enter_context(threads.configured(cpus=2, batch_slices=2))
            setting.enter_context(threadpoolctl.threadpool_limits(2, user_api="blas"))
        loss = float(to_host(runner.loss(x, labels)))
        checkable = threads.blas_controller() is not None and backend.name == "numpy"
        if name == "lenet_in_slices" and conv_path == "as chosen" and checkable:
            assert len(runner.slices) == 2
            first_conv = runner._replicas[0].layers[0]
            assert first_conv._cache[0].row_unfold, "this slice's convolutions took im2col"
        grads = {k: to_host(v) for k, v in runner.backward().items()}

    params = {k: torch.tensor(to_host(v), requires_grad=True) for k, v in model.params.items()}
    out = torch_forward(model, torch.tensor(x), params)
    if head is LogisticLogLikelihood:
        data_loss = F.binary_cross_entropy_with_logits(out.reshape(-1), torch.tensor(labels))
    else:
        data_loss = F.cross_entropy(out, torch.tensor(labels))
    penalty = sum((params[k] ** 2).sum() for k in model.decayed_params())
    reference = data_loss + 0.5 * 0.05 * penalty
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-10)
    for key, value in params.items():
        np.testing.assert_allclose(
            grads[key], value.grad.numpy(), rtol=1e-8, atol=1e-10, err_msg=key
        )


@pytest.mark.parametrize("name", list(NETS))
def test_layer_outputs_and_saliency_match_pytorch(name, backend, rng):
    """What a learner is shown: every layer's output, in the order the layers are
    written (a ReLU before a max pool included, which training runs after the pool), and
    the loss's gradient with respect to the input and to every layer's output."""
    layers, head, shape = NETS[name]
    model = Sequential(layers(), head(), shape, backend=backend, dtype="float64", seed=4, l2=0.05)
    n = 3
    x = rng.standard_normal((n, *shape))
    if head is LogisticLogLikelihood:
        labels = rng.integers(0, 2, n).astype(float)
    else:
        labels = rng.integers(0, model.output_shape[0], n)
    outputs = model.layer_outputs(x)
    gradients = model.saliency(x, labels)
    assert list(outputs) == [layer.name for layer in model.layers]
    assert list(gradients) == ["input", *outputs]

    params = {k: torch.tensor(to_host(v)) for k, v in model.params.items()}
    x_torch = torch.tensor(x, requires_grad=True)
    reference_outputs = []
    out = torch_forward(model, x_torch, params, reference_outputs)
    for h in reference_outputs:
        h.retain_grad()
    if head is LogisticLogLikelihood:
        loss = F.binary_cross_entropy_with_logits(out.reshape(-1), torch.tensor(labels))
    else:
        loss = F.cross_entropy(out, torch.tensor(labels))  # the data loss: no L2
    loss.backward()
    np.testing.assert_allclose(
        to_host(gradients["input"]), x_torch.grad.numpy(), rtol=1e-8, atol=1e-12
    )
    for layer, reference in zip(model.layers, reference_outputs, strict=True):
        got = to_host(outputs[layer.name])
        assert got.shape == tuple(reference.shape), layer.name
        np.testing.assert_allclose(got, reference.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            to_host(gradients[layer.name]),
            reference.grad.numpy(),
            rtol=1e-8,
            atol=1e-12,
            err_msg=layer.name,
        )
    # The last output is what the model's own (reordered) forward pass returns.
    np.testing.assert_allclose(
        to_host(outputs[model.layers[-1].name]), to_host(model.forward(x)), rtol=1e-12
    )
