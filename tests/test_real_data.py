"""The real-data presets end to end: `python -m gpucnn.train experiment=...` on
Fashion-MNIST's real files (Debian's package), on MNIST and CIFAR-10 files made here in
their published formats, a download refused, the data recorded as an MLflow dataset
input, and a resumed run that finds the same data elsewhere.

The accuracy aims (``needs_data``) run whenever the real files are in the cache, and are
skipped with that reason otherwise."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpucnn.data import sources as data_sources
from gpucnn.data.formats import content_sha256, file_md5
from tests.published_data import free_port, serving, write_cifar, write_mnist
from tests.test_train_app import all_runs, client_for, train

pytestmark = pytest.mark.slow

FASHION_SYSTEM = Path(data_sources.SOURCES["fashion_mnist"].system_dir)
needs_fashion_package = pytest.mark.skipif(
    not (FASHION_SYSTEM / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (CI installs it)",
)


def isolated(tmp_path: Path) -> dict[str, str]:
    """The app's environment: its own empty data cache."""
    return {"GPUCNN_DATA": str(tmp_path / "cache")}


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr
    return lines[0]


def dataset_input(client, run_id: str):
    (entry,) = client.get_run(run_id).inputs.dataset_inputs
    return entry.dataset, {tag.key: tag.value for tag in entry.tags}


@needs_fashion_package
def test_one_real_fashion_mnist_epoch_is_tracked_with_its_data(tmp_path):
    result = train(
        tmp_path,
        "experiment=fashion_mnist",
        "trainer.epochs=1",
        "backend=numpy",
        env=isolated(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_for(tmp_path)
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] > 0.8
    dataset, tags = dataset_input(client, run.info.run_id)
    # The identity: the SHA-256 over the four files' content digests, computed here.
    files = {
        f.name: content_sha256(FASHION_SYSTEM / f.name)
        for f in data_sources.SOURCES["fashion_mnist"].files
    }
    assert files == {f.name: f.content_sha256 for f in data_sources.SOURCES["fashion_mnist"].files}
    assert dataset.name == "fashion_mnist"
    assert tags["gpucnn.sha256"] == run.data.params["data.digest"]
    assert dataset.digest == run.data.params["data.digest"][:32]
    assert tags["mlflow.data.context"] == "training"
    assert str(FASHION_SYSTEM) in dataset.source
    assert tags["gpucnn.train_size"] == run.data.params["data.train_size"] == "54000"


@needs_fashion_package
def test_a_resumed_run_accepts_the_same_data_found_elsewhere(tmp_path):
    """The identity is the content: a re-compressed copy elsewhere is the same data; a
    copy with one label changed is not."""
    env = {**os.environ, **isolated(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "gpucnn.train", "experiment=fashion_mnist", "model=lenet"]
        + ["trainer.epochs=3", "backend=numpy"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not list((tmp_path / "runs" / "hydra").glob("**/model.npz")):  # epoch 1 is done
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    client = client_for(tmp_path)
    (run,) = all_runs(client)
    assert run.info.status == "KILLED"
    copy, changed = tmp_path / "copy", tmp_path / "changed"
    for folder in (copy, changed):
        folder.mkdir()
        for spec in data_sources.SOURCES["fashion_mnist"].files:  # other gzip bytes
            raw = gzip.decompress((FASHION_SYSTEM / spec.name).read_bytes())
            if folder == changed and spec.name.startswith("t10k-labels"):
                raw = raw[:-1] + bytes([(raw[-1] + 1) % 10])
            (folder / spec.name).write_bytes(gzip.compress(raw, compresslevel=1))
    assert file_md5(copy / spec.name) != file_md5(FASHION_SYSTEM / spec.name)
    refused = train(tmp_path, f"resume={run.info.run_id}", f"data.path={changed}", env=env)
    assert refused.returncode == 2 and "is not fashion_mnist's" in refused.stderr
    resumed = train(tmp_path, f"resume={run.info.run_id}", f"data.path={copy}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 3


def test_the_mnist_preset_trains_on_files_in_the_published_format(tmp_path):
    write_mnist(tmp_path / "mnist", n_train=1000, n_test=100)
    result = train(
        tmp_path,
        "experiment=mnist",
        f"data.path={tmp_path / 'mnist'}",
        "trainer.epochs=3",
        "backend=numpy",
        env=isolated(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "only the format was checked" in result.stderr
    client = client_for(tmp_path)
    (run,) = all_runs(client)
    assert run.data.params["model.name"] == "lenet"
    assert run.data.metrics["test_accuracy"] > 0.5  # a band per class: chance is 0.1
    dataset, _ = dataset_input(client, run.info.run_id)
    assert dataset.name == "mnist" and str(tmp_path / "mnist") in dataset.source


def test_one_step_of_the_cifar10_preset_on_files_in_the_published_format(tmp_path):
    archive = tmp_path / "cifar" / "cifar-10-binary.tar.gz"
    write_cifar(archive, n_per_batch=20, n_test=20)
    result = train(
        tmp_path,
        "experiment=cifar10",
        f"data.path={archive}",
        "trainer.epochs=1",
        "trainer.batch_size=128",  # 90 training images: one step
        "backend=numpy",
        env=isolated(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_for(tmp_path)
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.crop_padding"] == "4" and run.data.params["data.flip"] == "True"
    assert run.data.params["model.name"] == "vgg_small"
    history = client.get_metric_history(run.info.run_id, "train_loss_step")
    assert [m.step for m in history] == [1]


def test_a_download_that_is_not_the_published_file_is_one_line_and_no_run(tmp_path):
    served = tmp_path / "served"
    write_mnist(served)
    with serving(served) as url:
        result = train(
            tmp_path, "experiment=mnist", f"data.url={url}", "backend=numpy", env=isolated(tmp_path)
        )
    line = one_line_error(result)
    assert line.startswith("gpucnn.train: error: download of ") and "is not the published" in line
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    cache = tmp_path / "cache" / "mnist"
    assert not cache.exists() or not any(cache.iterdir())


def test_offline_and_not_cached_is_one_line_naming_the_ways(tmp_path):
    port = free_port()
    result = train(
        tmp_path,
        "experiment=mnist",
        f"data.url=http://127.0.0.1:{port}",
        "backend=numpy",
        env=isolated(tmp_path),
    )
    line = one_line_error(result)
    assert str(tmp_path / "cache" / "mnist") in line and "data.path=FOLDER" in line
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_sigterm_during_a_download_stops_it_and_keeps_nothing(tmp_path):
    served = tmp_path / "served"
    write_mnist(served)
    cache = tmp_path / "cache" / "mnist"
    with serving(served) as url:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpucnn.train",
                "experiment=mnist",
                "backend=numpy",
                f"data.url={url}/slow",
            ],
            cwd=tmp_path,
            env={**os.environ, **isolated(tmp_path)},
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not (cache.is_dir() and any(cache.glob(".*.part"))):
            assert process.poll() is None and time.monotonic() < deadline, "no download began"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "stopped by signal 15 while downloading" in lines[0], stderr
    assert list(cache.iterdir()) == []
    assert not (tmp_path / "runs" / "mlflow.db").exists()


# --- the accuracy aims, on the real files in the cache ------------------------------


def real_files_in_cache(name: str) -> Path | None:
    """The cache folder of dataset ``name`` when it holds the real, published files
    (checked by their published MD5 or pinned content), else None."""
    folder = data_sources.default_cache_dir() / name
    for spec in data_sources.SOURCES[name].files:
        path = folder / spec.name
        if not path.is_file():
            return None
        if file_md5(path) != spec.md5 and (
            spec.content_sha256 is None or content_sha256(path) != spec.content_sha256
        ):
            return None
    return folder


@pytest.mark.needs_data
@pytest.mark.parametrize(
    ("experiment", "aim"), [("fashion_mnist", 0.90), ("mnist", 0.99), ("cifar10", 0.70)]
)
def test_the_preset_reaches_its_accuracy_aim_on_the_real_data(tmp_path, experiment, aim):
    folder = real_files_in_cache(experiment)
    if folder is None:
        pytest.skip(
            f"the real {experiment} files are not in the cache "
            f"({data_sources.default_cache_dir() / experiment}; set GPUCNN_DATA)"
        )
    result = train(tmp_path, f"experiment={experiment}", "data.download=false", timeout=6 * 3600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = all_runs(client_for(tmp_path))
    assert run.data.metrics["test_accuracy"] >= aim


def test_the_cache_check_of_real_files_refuses_files_made_here(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCNN_DATA", str(tmp_path))
    write_mnist(tmp_path / "mnist")
    assert real_files_in_cache("mnist") is None
    if (FASHION_SYSTEM / "train-images-idx3-ubyte.gz").is_file():
        shutil.copytree(FASHION_SYSTEM, tmp_path / "fashion_mnist")
        assert real_files_in_cache("fashion_mnist") == tmp_path / "fashion_mnist"
