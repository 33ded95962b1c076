"""A large NumPy batch runs, through the BatchSplit wrapper, as slices of samples on
parallel threads (gpucnn.parallel.split.batch_slices and run_slices): the loss, the
outputs and every gradient must equal the unsplit ones. (Slices in worker processes:
test_workers.py.)"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import gpucnn.array.threads as threads
import gpucnn.parallel.split as split_module
from gpucnn import (
    BatchSplit,
    Conv2D,
    Dense,
    Flatten,
    GradientAscent,
    L2Pool2D,
    LogisticLogLikelihood,
    MaxPool2D,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
    Tanh,
)
from gpucnn.data import Dataset
from gpucnn.fit import fit
from gpucnn.nn.layers import AvgPool2D

threadpoolctl = pytest.importorskip("threadpoolctl")


@pytest.fixture
def split_in_three():
    """Split any batch of 3 * 4 or more samples into three slices (with a BLAS thread
    budget of 3, whatever this machine's), in threads: worker processes have their own
    tests (test_workers.py)."""
    with threads.configured(worker_processes=False, batch_slices=3, min_thread_slice=4):
        threads.blas_controller()
        with threadpoolctl.threadpool_limits(limits=3, user_api="blas"):
            yield


def build(head: str) -> Sequential:
    """A colour net with conv ('same' and valid), every pool kind, Tanh, ReLU and Dense."""
    layers = [
        Conv2D(4, 3, padding="same"),
        ReLU(),
        MaxPool2D(2),  # 9 -> 4: the last row and column are outside every window
        Conv2D(5, 2, stride=1),
        Tanh(),
        L2Pool2D(2, 1),
        AvgPool2D(2),
        Flatten("F"),
        Dense(6),
        ReLU(),
        Dense(1 if head == "logistic" else 3),
    ]
    loss = LogisticLogLikelihood() if head == "logistic" else SoftmaxCrossEntropy()
    return Sequential(layers, loss, (3, 9, 9), dtype="float64", seed=3, l2=0.01)


@pytest.mark.parametrize("head", ["logistic", "softmax"])
def test_split_batch_equals_unsplit(head, split_in_three, monkeypatch, rng):
    x = rng.standard_normal((13, 3, 9, 9))  # 13 = 4 + 4 + 5: unequal parts
    labels = rng.integers(0, 2 if head == "logistic" else 3, 13)
    split, whole = BatchSplit(build(head)), build(head)

    loss_split = float(split.loss(x, labels))
    grads_split = {k: v.copy() for k, v in split.backward().items()}
    assert [(p.start, p.stop) for p in split.slices] == [(0, 4), (4, 8), (8, 13)]
    # A plain model never splits: the whole batch runs in this thread.
    loss_whole = float(whole.loss(x, labels))
    grads_whole = whole.backward()
    forward_whole = whole.forward(x)

    np.testing.assert_allclose(loss_split, loss_whole, rtol=1e-12)
    np.testing.assert_allclose(split.last_output, whole.last_output, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(split.forward(x), forward_whole, rtol=1e-12, atol=1e-14)
    assert set(grads_split) == set(grads_whole) == set(split.params)
    for key, value in grads_whole.items():
        np.testing.assert_allclose(grads_split[key], value, rtol=1e-10, atol=1e-14, err_msg=key)
    # The model's own gradients, and its layers', hold the whole batch's, not the first
    # slice's: after a step through the wrapper the model looks as after an unsplit one.
    assert split.model.grads is split.grads
    np.testing.assert_allclose(split.model.last_output, whole.last_output, rtol=1e-12)
    for layer in split.model.layers:
        for key, value in layer.grads.items():
            expected = whole.layer(layer.name).grads[key]
            np.testing.assert_allclose(value, expected, rtol=1e-10, atol=1e-14)


def test_a_plain_model_computes_the_whole_batch_in_this_thread(split_in_three, rng):
    """The split lives above the model: Sequential alone never cuts a batch, never makes
    a replica, never reaches a worker."""
    model = build("softmax")
    seen = []
    first = model.layers[0]
    original = first._forward

    def spy(h):
        seen.append((threading.current_thread() is threading.main_thread(), h.shape[-1]))
        return original(h)

    first._forward = spy
    model.loss(rng.standard_normal((13, 3, 9, 9)), rng.integers(0, 3, 13))
    model.backward()
    assert seen == [(True, 13)]


def train_split_and_whole(monkeypatch, rng, n: int, held_out: int, batch_size: int):
    """Two equal models trained alike on random data, one through a BatchSplit as this
    test's settings say, one whole; their weights must agree. Returns the BatchSplit and
    the number of slices of each of its loss() calls."""
    x = rng.standard_normal((n, 3, 9, 9))
    y = rng.integers(0, 3, n)
    rest = (x[:held_out], y[:held_out])
    data = Dataset("random", x, y, *rest, *rest, num_classes=3)
    split, whole = BatchSplit(build("softmax")), build("softmax")
    slice_counts = []  # per loss() of the split model
    split_loss = split.loss

    def counted_loss(*args, **kwargs):
        value = split_loss(*args, **kwargs)
        slice_counts.append(len(split.slices))
        return value

    split.loss = counted_loss
    fit(split, GradientAscent(0.1), data, epochs=2, batch_size=batch_size, progress=False)
    fit(
        whole,
        GradientAscent(0.1),
        data,
        epochs=2,
        batch_size=batch_size,
        progress=False,
        split_batches=False,
    )
    for key, value in whole.params.items():
        np.testing.assert_allclose(split.params[key], value, rtol=1e-9, atol=1e-12, err_msg=key)
    return split, slice_counts


def test_split_training_matches_unsplit(split_in_three, monkeypatch, rng):
    _, slice_counts = train_split_and_whole(monkeypatch, rng, n=40, held_out=5, batch_size=16)
    assert max(slice_counts) == 3  # full training batches of 16 went in three slices


def test_fine_grained_pool_runs_inline_inside_a_slice(split_in_three, monkeypatch, rng):
    """With the per-primitive pool forced on as well, nothing nests on a pool (which
    could deadlock) and the result is unchanged."""
    calls_in_slices = []  # one entry per use of the fine-grained pool's executor
    reached_in_slices = []  # parallel_for calls made from inside a slice
    original_executor, original_inside = threads.executor, threads.inside_slice

    def spy_inside_slice():  # parallel_for asks this once it would use the pool
        inside = original_inside()
        reached_in_slices.append(inside)
        return inside

    def spy_executor(role, size):
        if role == "helper":
            calls_in_slices.append(original_inside())
        return original_executor(role, size)

    monkeypatch.setattr(threads, "executor", spy_executor)
    monkeypatch.setattr(threads, "inside_slice", spy_inside_slice)
    x = rng.standard_normal((12, 3, 9, 9))
    labels = rng.integers(0, 3, 12)
    split, whole = BatchSplit(build("softmax")), build("softmax")
    with threads.configured(helper_threads=3, min_parallel_elements=0):
        split.loss(x, labels)
        grads = split.backward()
    assert any(reached_in_slices)  # the pool was asked for inside the slices...
    assert not any(calls_in_slices)  # ...and never used there
    whole.loss(x, labels)
    for key, value in whole.backward().items():
        np.testing.assert_allclose(grads[key], value, rtol=1e-10, atol=1e-14)


def test_batch_slices_policy(monkeypatch):
    threads.blas_controller()
    with (
        threads.configured(batch_slices=2),
        threadpoolctl.threadpool_limits(limits=2, user_api="blas"),
    ):
        assert split_module.batch_slices(np, 127, 64) == [slice(0, 127)]
        assert split_module.batch_slices(np, 129, 64) == [slice(0, 64), slice(64, 129)]
        # The first slice can take more (for worker processes): here 1/16 above an even share.
        assert split_module.batch_slices(np, 256, 32, 1 / 16) == [slice(0, 136), slice(136, 256)]
        with threads.running_slice():  # a slice is never split again
            assert split_module.batch_slices(np, 1024, 64) == [slice(0, 1024)]
    with (
        threads.configured(batch_slices=2),
        threadpoolctl.threadpool_limits(limits=1, user_api="blas"),  # one-thread budget
    ):
        assert split_module.batch_slices(np, 1024, 64) == [slice(0, 1024)]
    with threads.configured(batch_slices=1):  # GPUCNN_BATCH_THREADS=1: off
        assert split_module.batch_slices(np, 1024, 64) == [slice(0, 1024)]
    monkeypatch.setattr(threads, "blas_controller", lambda: None)  # BLAS cannot be limited
    with threads.configured(batch_slices=2):
        assert split_module.batch_slices(np, 1024, 64) == [slice(0, 1024)]


@pytest.fixture
def two_slices():
    with threads.configured(batch_slices=2):
        yield


def test_run_slices_limits_blas_and_restores_it(two_slices):
    blas = threads.blas_controller()
    before = [lib["num_threads"] for lib in blas.info()]
    seen = split_module.run_slices(
        [slice(0, 1), slice(1, 2)],
        lambda k, part: (k, threads.inside_slice(), [lib["num_threads"] for lib in blas.info()]),
    )
    inside = [min(max(1, threads.settings().cpus // 2), count) for count in before]
    assert seen == [(0, True, inside), (1, True, inside)]
    assert [lib["num_threads"] for lib in blas.info()] == before
    assert not threads.inside_slice()


def test_run_slices_never_raises_the_users_blas_threads():
    """On a many-core host a slice's share is several threads; a user who limited BLAS to
    one thread keeps one."""
    blas = threads.blas_controller()
    with (
        threads.configured(batch_slices=2, cpus=16),
        threadpoolctl.threadpool_limits(limits=1, user_api="blas"),
    ):
        seen = split_module.run_slices(
            [slice(0, 1), slice(1, 2)],
            lambda k, part: [lib["num_threads"] for lib in blas.info()],
        )
        assert seen == [[1] * len(blas.lib_controllers)] * 2
        assert [lib["num_threads"] for lib in blas.info()] == [1] * len(blas.lib_controllers)


def test_run_slices_finishes_every_slice_and_reraises(two_slices):
    finished = threading.Event()

    def body(k, part):
        if k == 0:
            raise RuntimeError("slice 0 failed")
        time.sleep(0.2)
        finished.set()

    with pytest.raises(RuntimeError, match="slice 0 failed"):
        split_module.run_slices([slice(0, 1), slice(1, 2)], body)
    assert finished.is_set()  # the other slice was waited for, not abandoned

    def fails_in_worker(k, part):
        if k == 1:
            raise ValueError("slice 1 failed")
        return k

    with pytest.raises(ValueError, match="slice 1 failed"):
        split_module.run_slices([slice(0, 1), slice(1, 2)], fails_in_worker)


def test_no_split_on_cupy(backend):
    if not backend.is_gpu:
        pytest.skip("checks the CuPy policy")
    assert split_module.batch_slices(backend.xp, 4096, 64) == [slice(0, 4096)]


def test_label_count_is_checked_for_the_whole_batch(split_in_three, rng):
    split = BatchSplit(build("softmax"))
    with pytest.raises(ValueError, match=r"labels have shape \(12,\), expected \(13,\)"):
        split.loss(rng.standard_normal((13, 3, 9, 9)), rng.integers(0, 3, 12))


def test_split_batches_false_keeps_fit_and_its_evaluations_whole(monkeypatch, rng):
    """No BatchSplit anywhere in fit with split_batches=False: not for the training
    steps, not for the validation and test passes."""
    import gpucnn.fit as loop

    made = []
    monkeypatch.setattr(loop, "BatchSplit", lambda model: made.append(model) or model)
    x, y = rng.standard_normal((30, 3, 9, 9)), rng.integers(0, 3, 30)
    data = Dataset("random", x, y, x[:6], y[:6], x[:6], y[:6], num_classes=3)
    fit(
        build("softmax"),
        GradientAscent(0.1),
        data,
        epochs=2,
        batch_size=10,
        progress=False,
        split_batches=False,
    )
    assert made == []
    fit(build("softmax"), GradientAscent(0.1), data, epochs=2, batch_size=10, progress=False)
    assert len(made) == 1  # by default: one wrapper for the whole run


def test_the_model_is_never_left_holding_one_slice(split_in_three, rng):
    """Between the wrapper's loss and backward the model itself has no half-done step:
    its own backward refuses, and after the wrapper's backward it holds the whole
    batch's gradients."""
    model = build("softmax")
    step = BatchSplit(model)
    x, labels = rng.standard_normal((13, 3, 9, 9)), rng.integers(0, 3, 13)
    step.loss(x, labels)
    assert len(step.slices) == 3 and model.last_output.shape == (13, 3)
    with pytest.raises(RuntimeError, match="call loss"):
        model.backward()
    grads = step.backward()
    assert model.grads is grads


class PassThrough:
    """A wrapper around a wrapper, as a data-parallel one around BatchSplit would be."""

    def __init__(self, inner):
        self.model, self.calls = inner, 0

    params = property(lambda self: self.model.params)
    last_output = property(lambda self: self.model.last_output)

    def loss(self, x, labels, penalty=True):
        self.calls += 1
        return self.model.loss(x, labels, penalty)

    def backward(self):
        return self.model.backward()


def test_fit_takes_a_wrapper_around_a_wrapper(split_in_three, rng):
    x, y = rng.standard_normal((40, 3, 9, 9)), rng.integers(0, 3, 40)
    data = Dataset("random", x, y, x[:5], y[:5], x[:5], y[:5], num_classes=3)
    outer, whole = PassThrough(BatchSplit(build("softmax"))), build("softmax")
    fit(outer, GradientAscent(0.1), data, epochs=2, batch_size=16, progress=False)
    fit(
        whole,
        GradientAscent(0.1),
        data,
        epochs=2,
        batch_size=16,
        progress=False,
        split_batches=False,
    )
    assert outer.calls == 2 * 3 + 2 + 1  # steps, validation passes, the test pass
    for key, value in whole.params.items():
        np.testing.assert_allclose(outer.params[key], value, rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="a Sequential or a wrapper of one"):
        fit(object(), GradientAscent(0.1), data, epochs=1, batch_size=16, progress=False)


def test_replicas_follow_the_model_to_another_backend(split_in_three, rng):
    model = build("softmax")
    step = BatchSplit(model)
    x, labels = rng.standard_normal((13, 3, 9, 9)), rng.integers(0, 3, 13)
    step.loss(x, labels)
    model.to("numpy")  # a new Backend object, as a move to the GPU and back gives
    step.loss(x, labels)
    assert all(replica.backend is model.backend for replica in step._replicas)
