"""An Optuna search (Hydra's Optuna sweeper, conf/hparams_search/optuna.yaml) with real
trials: it maximises the last epoch's validation accuracy, names each trial's run after
what it varies, and leaves the best value and overrides on the sweep's parent run; a
search without a validation split is refused in one line, before any run exists."""

from __future__ import annotations

import pytest

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the scale extra is missing")
from tests.test_train_app import all_runs, client_for, train  # noqa: E402

pytestmark = pytest.mark.slow
SEARCH = ["-m", "experiment=digits", "hparams_search=optuna", "backend=numpy"]


def test_a_search_maximises_validation_accuracy_and_keeps_the_best(tmp_path):
    result = train(tmp_path, *SEARCH, "hydra.sweeper.n_trials=3", "trainer.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_for(tmp_path)
    runs = all_runs(client)
    (parent,) = [r for r in runs if r.data.tags.get("gpucnn.sweep") == "parent"]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in runs)
    swept = parent.data.tags["gpucnn.swept_keys"].split()
    assert set(swept) == {
        "optimizer.lr",
        "trainer.l2",
        "trainer.batch_size",
        "model.layers.0.out_channels",
    }
    # The objective is each trial's last validation accuracy: the best is the largest.
    best = max(trials, key=lambda r: r.data.metrics["val_accuracy"])
    assert float(parent.data.tags["gpucnn.best_value"]) == pytest.approx(
        best.data.metrics["val_accuracy"]
    )
    best_overrides = dict(
        o.split("=", 1) for o in parent.data.tags["gpucnn.best_overrides"].split()
    )
    for key, value in best_overrides.items():
        assert float(best.data.params[key]) == pytest.approx(float(value))
    for trial in trials:  # named after the values it was given
        assert trial.info.run_name.split()[0].startswith("optimizer.lr=")
    assert "gpucnn: best validation accuracy" in result.stdout


def test_a_search_without_a_validation_split_is_refused_in_one_line(tmp_path):
    result = train(tmp_path, *SEARCH, "hydra.sweeper.n_trials=2", "data.val_fraction=0")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "leaves no validation split" in lines[0], result.stderr
    assert not (tmp_path / "runs" / "mlflow.db").exists()
