"""Batch slices in worker processes (gpucnn.parallel.workers): exact results, parameters that
follow every update, and a clean way out when a worker is interrupted, fails or dies."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import gpucnn.array.threads as threads
from gpucnn import BatchSplit
from gpucnn.parallel import workers
from tests.test_split import build, train_split_and_whole

threadpoolctl = pytest.importorskip("threadpoolctl")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="worker processes need POSIX")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_slices():
    """Any batch of 2 * 32 or more samples goes half to one worker process, whatever this
    machine's core count or environment; workers start clean and are shut down after."""
    workers.reset()
    threads.blas_controller()
    with (
        threads.configured(batch_slices=2, worker_processes=True),
        threadpoolctl.threadpool_limits(limits=2, user_api="blas"),
    ):
        yield
    workers.reset()


def unsplit(model, x, labels):
    """(loss, grads, head input) of ``model`` (a plain Sequential) on the whole batch."""
    loss = float(model.loss(x, labels))
    grads = {k: v.copy() for k, v in model.backward().items()}
    return loss, grads, model.last_output.copy()


def assert_same(split_result, whole_result):
    (loss_a, grads_a, out_a), (loss_b, grads_b, out_b) = split_result, whole_result
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-12)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-12, atol=1e-14)
    assert set(grads_a) == set(grads_b)
    for key, value in grads_b.items():
        np.testing.assert_allclose(grads_a[key], value, rtol=1e-10, atol=1e-14, err_msg=key)


def after_one_step(rng):
    """A batch, a model that took one step on it through a worker, a twin for the
    unsplit reference, and the worker."""
    x = rng.standard_normal((64, 3, 9, 9))
    labels = rng.integers(0, 3, 64)
    split, whole = BatchSplit(build("softmax")), build("softmax")
    step(split, x, labels)
    (worker,) = workers.running(split.remote_slices)
    return x, labels, split, whole, worker


def step(model, x, labels):
    loss = float(model.loss(x, labels))
    grads = {k: v.copy() for k, v in model.backward().items()}
    return loss, grads, model.last_output.copy()


@pytest.mark.parametrize("head", ["logistic", "softmax"])
def test_worker_slices_equal_the_unsplit_batch(head, two_slices, monkeypatch, rng):
    x = rng.standard_normal((71, 3, 9, 9))  # 37 here (1/32 more than half), 34 there
    labels = rng.integers(0, 2 if head == "logistic" else 3, 71)
    split, whole = BatchSplit(build(head)), build(head)
    result = step(split, x, labels)
    assert [(p.start, p.stop) for p in split.slices] == [(0, 37), (37, 71)]
    assert split.remote_slices == 1
    assert_same(result, unsplit(whole, x, labels))
    # The model's layers' own gradients hold the whole batch's.
    for layer in split.model.layers:
        for key, value in layer.grads.items():
            np.testing.assert_allclose(value, whole.layer(layer.name).grads[key], rtol=1e-10)


def test_training_with_workers_matches_unsplit(two_slices, monkeypatch, rng):
    """Every step's parameters reach the worker: after training, the weights agree."""
    split, _ = train_split_and_whole(monkeypatch, rng, n=200, held_out=70, batch_size=100)
    assert split.remote_slices == 1  # the last loss (the held-out 70) went to a worker too


def test_forward_only_calls_between_steps_stay_exact(two_slices, monkeypatch, rng):
    """A worker computes a slice's gradients ahead in training, and stops doing so when
    forwards come without backward (evaluation); either way backward is right."""
    x = rng.standard_normal((64, 3, 9, 9))
    labels = rng.integers(0, 3, 64)
    split, whole = BatchSplit(build("softmax")), build("softmax")
    step(split, x, labels)
    for _ in range(3):  # evaluation-like: loss only
        split.loss(x[::-1].copy(), labels[::-1].copy())
    result = step(split, x, labels)
    assert_same(result, unsplit(whole, x, labels))


def test_a_training_step_costs_one_request_and_one_answer(two_slices, monkeypatch, rng):
    """Each message costs tens of microseconds on a VM: in training (loss() then
    backward()) the worker gets one request per step and sends one answer; a forward-only
    loss() then a backward() take two of each."""
    x = rng.standard_normal((64, 3, 9, 9))
    labels = rng.integers(0, 3, 64)
    split = BatchSplit(build("softmax"))
    step(split, x, labels)  # the worker starts (and says it is ready) before counting
    sent, received = [], []
    send, receive = workers.Worker.send, workers.Worker._receive
    monkeypatch.setattr(workers.Worker, "send", lambda w, m: sent.append(m[0]) or send(w, m))
    monkeypatch.setattr(
        workers.Worker, "_receive", lambda w, **k: received.append(1) or receive(w, **k)
    )
    for _ in range(3):
        step(split, x, labels)
    assert sent == ["forward"] * 3 and len(received) == 3
    split.loss(x, labels)  # evaluation-like: no backward() after it...
    sent.clear(), received.clear()
    step(split, x, labels)  # ...so this loss() asks for the loss only
    assert sent == ["forward", "backward"] and len(received) == 2


def test_workers_still_answer_where_sockets_cannot_be_polled(two_slices, monkeypatch, rng):
    """select.poll is missing on some POSIX builds: a step then waits in the read itself,
    with the same results."""
    monkeypatch.delattr(workers.select, "poll")
    x = rng.standard_normal((64, 3, 9, 9))
    labels = rng.integers(0, 3, 64)
    split, whole = BatchSplit(build("softmax")), build("softmax")
    assert_same(step(split, x, labels), unsplit(whole, x, labels))
    assert split.remote_slices == 1


def test_two_models_share_a_worker(two_slices, monkeypatch, rng):
    x = rng.standard_normal((64, 3, 9, 9))
    labels = rng.integers(0, 3, 64)
    first, second = BatchSplit(build("softmax")), BatchSplit(build("softmax"))
    second.model.set_params({k: v * 1.5 for k, v in second.params.items()})
    first.loss(x, labels)
    second_result = step(second, x, labels)
    first_grads = first.backward()  # after the other model's step on the same worker
    assert first.remote_slices == second.remote_slices == 1 and len(workers._POOL) == 1
    reference = build("softmax")
    assert_same(
        (float(first.loss(x, labels)), first_grads, first.last_output),
        unsplit(reference, x, labels),
    )
    reference.set_params({k: v * 1.5 for k, v in reference.params.items()})
    assert_same(second_result, unsplit(reference, x, labels))


def test_a_copy_gets_its_own_slot(two_slices, rng):
    """A deep copy of a BatchSplit carries the original's slot key in its __dict__ but
    holds another model: it must not be served the original's copy in the worker."""
    x = rng.standard_normal((64, 3, 9, 9))
    labels = rng.integers(0, 3, 64)
    original = BatchSplit(build("softmax"))
    step(original, x, labels)
    twin = copy.deepcopy(original)
    assert twin.__dict__["_worker_key"] == original.__dict__["_worker_key"]
    twin.model.set_params({k: v * 1.5 for k, v in original.params.items()})
    original_loss = float(original.loss(x, labels))
    twin_result = step(twin, x, labels)
    original_result = (original_loss, original.backward(), original.last_output)
    assert twin.remote_slices == original.remote_slices == 1
    reference = build("softmax")
    assert_same(original_result, unsplit(reference, x, labels))
    reference.set_params({k: v * 1.5 for k, v in reference.params.items()})
    assert_same(twin_result, unsplit(reference, x, labels))


def test_backward_after_the_worker_dropped_the_model_says_what_to_do(two_slices, rng):
    x = rng.standard_normal((64, 3, 9, 9))
    labels = rng.integers(0, 3, 64)
    first = BatchSplit(build("softmax"))
    first.loss(x, labels)
    for _ in range(workers.MODELS_PER_WORKER):  # each takes the worker's least recent slot
        BatchSplit(build("softmax")).loss(x, labels)
    with pytest.raises(RuntimeError, match="no longer holds this model's slice"):
        first.backward()
    step(first, x, labels)  # a new loss() puts it back
    assert workers.usable()


def test_a_reply_left_unread_is_dropped_before_the_next_request(two_slices, monkeypatch, rng):
    """As after Ctrl-C between sending a slice and reading its answer."""
    x, labels, split, whole, worker = after_one_step(rng)
    workers.send_forward(worker, split, split.model, x[32:] * 2, labels[32:])  # never read
    assert worker.unread == 1
    assert_same(step(split, x, labels), unsplit(whole, x, labels))
    assert worker.unread == 0


def test_an_error_in_a_worker_is_raised_here_with_its_message(two_slices, rng):
    split = BatchSplit(build("softmax"))
    split.loss(rng.standard_normal((64, 3, 9, 9)), rng.integers(0, 3, 64))
    (worker,) = workers.running(split.remote_slices)
    worker.send(("no-such-request", "key", None, worker.inputs.size, None, 0, None, 1.0, False))
    with pytest.raises(workers.WorkerError, match="unknown request 'no-such-request'"):
        worker.receive()


def test_a_dead_worker_hands_over_to_threads(two_slices, monkeypatch, rng):
    x, labels, split, whole, worker = after_one_step(rng)
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    with pytest.warns(RuntimeWarning, match=r"worker process \d+ exited with code -9"):
        result = step(split, x, labels)
    assert split.remote_slices == 0 and not workers.usable()
    assert [(p.start, p.stop) for p in split.slices] == [(0, 64)]  # threads need 2 x 64
    assert_same(result, unsplit(whole, x, labels))


def test_a_worker_that_cannot_start_hands_over_to_threads(two_slices, monkeypatch, rng):
    monkeypatch.setattr(workers, "_CHILD_MAIN", "import sys; sys.exit(3)")
    x = rng.standard_normal((64, 3, 9, 9))
    labels = rng.integers(0, 3, 64)
    split, whole = BatchSplit(build("softmax")), build("softmax")
    with pytest.warns(RuntimeWarning, match=r"could not start a worker process: .*code 3"):
        result = step(split, x, labels)
    assert split.remote_slices == 0 and workers._POOL == [] and not workers.usable()
    assert_same(result, unsplit(whole, x, labels))


def test_a_worker_that_dies_between_forward_and_backward_is_an_error(two_slices, rng):
    """Outside training (a loss() that was not followed by backward() came before), the
    worker computes a forward only: if it dies then, its slice's gradients are lost."""
    x, labels = rng.standard_normal((64, 3, 9, 9)), rng.integers(0, 3, 64)
    split = BatchSplit(build("softmax"))
    split.loss(x, labels)
    split.loss(x, labels)  # forward only: the previous loss() had no backward()
    (worker,) = workers.running(split.remote_slices)
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    with (
        pytest.raises(workers.WorkerError, match="exited with code -9"),
        pytest.warns(RuntimeWarning, match="split across threads from now on"),
    ):
        split.backward()
    assert not workers.usable()


def test_a_training_step_has_its_gradients_before_loss_returns(two_slices, monkeypatch, rng):
    """In training (each loss() followed by backward()), loss() gets every slice's
    gradients: a worker that dies after it leaves backward() exact, and the next step
    hands over to threads."""
    x, labels, split, whole, worker = after_one_step(rng)
    loss = float(split.loss(x, labels))
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    grads = {k: v.copy() for k, v in split.backward().items()}
    assert_same((loss, grads, split.last_output), unsplit(whole, x, labels))
    with pytest.warns(RuntimeWarning, match=r"worker process \d+ exited with code -9"):
        assert_same(step(split, x, labels), unsplit(whole, x, labels))
    assert split.remote_slices == 0


def run_script(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "GPUCNN_BATCH_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", **env},
    )


SCRIPT = """
    # No `if __name__ == "__main__"` guard: workers must not run this script again.
    import numpy as np
    from gpucnn import BatchSplit, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
    from gpucnn import SoftmaxCrossEntropy
    from gpucnn.parallel import workers
    model = BatchSplit(Sequential([Conv2D(4, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(3)],
                                  SoftmaxCrossEntropy(), (1, 8, 8), seed=0))
    rng = np.random.default_rng(0)
    model.loss(rng.random((128, 1, 8, 8)), rng.integers(0, 3, 128))
    model.backward()
    helpers = workers.running(model.remote_slices)
    print("workers", *(w.process.pid for w in helpers))
"""


def test_a_script_without_a_main_guard_runs_once_and_leaves_no_process():
    result = run_script(SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    (line,) = result.stdout.splitlines()  # the script ran once: workers did not rerun it
    pids = [int(pid) for pid in line.split()[1:]]
    assert len(pids) == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(pids[0]):
        time.sleep(0.05)
    assert not alive(pids[0])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    return True


def test_gpucnn_batch_processes_0_keeps_to_threads():
    result = run_script(SCRIPT, GPUCNN_BATCH_PROCESSES="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["workers"]


def test_a_worker_gets_the_blas_threads_of_its_slice(monkeypatch):
    """On many cores each slice, here and in the worker, gets an even share."""
    created = []
    monkeypatch.setattr(workers, "Worker", lambda count: created.append(count) or count)
    monkeypatch.setattr(workers, "_POOL", [])
    monkeypatch.setattr(workers, "_STATE", {"broken": None, "pid": None})
    with threads.configured(cpus=16):
        with threadpoolctl.threadpool_limits(limits=16, user_api="blas"):
            assert threads.blas_threads_per_slice(2) == 8
            assert workers.pool(1) == [8] and created == [8]
        with threadpoolctl.threadpool_limits(limits=6, user_api="blas"):  # the user's limit
            assert threads.blas_threads_per_slice(2) == 6
            assert threads.blas_threads_per_slice(4) == 4


def test_the_blas_share_reaches_the_workers_environment(monkeypatch):
    """What the child is started with (its start is refused here, which must leave no
    open file behind)."""
    seen = {}

    def refuse(args, env, pass_fds, **kwargs):
        seen.update(env=env, fds=pass_fds)
        raise OSError("no processes here")

    monkeypatch.setattr(workers.subprocess, "Popen", refuse)
    with pytest.raises(OSError, match="no processes here"):
        workers.Worker(3)
    assert {seen["env"][k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")} == {"3"}
    assert seen["env"]["GPUCNN_BATCH_PROCESSES"] == "0"  # a worker never splits again
    for fd in seen["fds"]:  # the socket's child end and both shared files are closed
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_failure_while_writing_gradients_ahead_is_reported_once_by_backward(rng):
    """In training the worker writes a slice's gradients before it answers the forward:
    if that fails, the forward's answer says they are not ready (one answer per request,
    or the parent would pair every later reply with the wrong request), and the backward
    request the parent then sends reports the failure."""
    from gpucnn.parallel.serve import _ModelCopies

    model = build("softmax")
    outputs = workers.SharedFile()
    layout = workers.Layout()
    grads_at = {name: layout.place(v.shape, v.dtype) for name, v in model.params.items()}
    outputs.resize(layout.end)
    copies = _ModelCopies(outputs)
    x, labels = rng.standard_normal((8, 3, 9, 9)), rng.integers(0, 3, 8)
    views = {"x": x, "labels": labels, **{f"param/{k}": v for k, v in model.params.items()}}
    copies.forward("key", model.config(), views, grads_at)
    held = copies.models["key"]
    held.backward = lambda scale: (_ for _ in ()).throw(MemoryError("no room for gradients"))
    assert copies.gradients_ahead("key") is False  # swallowed: the forward still answers
    with pytest.raises(MemoryError, match="no room"):
        copies.backward("key")  # ...and reported here, in answer to the backward
    del held.backward  # it works again: the gradients are written and equal the unsplit
    copies.backward("key")
    model.loss(x, labels, penalty=False)
    for name, value in model.backward().items():
        np.testing.assert_allclose(outputs.views(grads_at)[name], value, rtol=1e-12)
    outputs.close()
