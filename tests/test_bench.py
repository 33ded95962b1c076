"""benchmarks/bench.py: its statistics and its command line (timings are never asserted)."""

from __future__ import annotations

import json

import pytest


def test_ratio_is_the_median_of_per_round_ratios(bench):
    # Round ratios 1, 1.5, 1, 2: median 1.25; quartiles (exclusive method) 1.0 and 1.875.
    summary = bench.ratio_summary([2.0, 3.0, 4.0, 10.0], [2.0, 2.0, 4.0, 5.0])
    assert summary["ratio_to_torch"] == pytest.approx(1.25)
    assert summary["ratio_q1"] == pytest.approx(1.0)
    assert summary["ratio_q3"] == pytest.approx(1.875)


def test_drift_that_hits_both_engines_cancels_out_of_the_ratio(bench):
    # The machine slows down 8x over the run, for both engines alike.
    summary = bench.ratio_summary([1.0, 2.0, 4.0, 8.0], [2.0, 4.0, 8.0, 16.0])
    assert summary == {"ratio_to_torch": 0.5, "ratio_q1": 0.5, "ratio_q3": 0.5}


def test_reference_is_torch_on_the_same_device(bench):
    samples = {"gpucnn-numpy": [], "gpucnn-cupy": [], "torch-cpu": [], "torch-cuda": []}
    assert bench.reference_engine("gpucnn-numpy", samples) == "torch-cpu"
    assert bench.reference_engine("gpucnn-cupy", samples) == "torch-cuda"
    assert bench.reference_engine("torch-cpu", samples) is None
    assert bench.reference_engine("gpucnn-cupy", {"gpucnn-cupy": [], "torch-cpu": []}) is None


@pytest.mark.parametrize(
    "argument, message",
    [
        (["--rounds", "0"], "argument --rounds: '0' is not an int >= 1"),
        (["--warmup", "-1"], "argument --warmup: '-1' is not an int >= 0"),
        (["--gemm-size", "big"], "argument --gemm-size: 'big' is not an int >= 1"),
        (["--block-seconds", "0"], "argument --block-seconds: '0' is not a number of seconds > 0"),
        (["--pause", "-0.5"], "argument --pause: '-0.5' is not a number of seconds >= 0"),
        (["--pause", "nan"], "argument --pause: 'nan' is not a number of seconds >= 0"),
    ],
)
def test_bad_settings_are_named(bench, capsys, argument, message):
    with pytest.raises(SystemExit) as stop:
        bench.main(argument)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_run_writes_every_block_time(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--nets", "lecture8x8", "--engines", "gpucnn-numpy", "--rounds", "2"]
    assert bench.main([*argv, "--pause", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert (row["net"], row["engine"], row["batch"]) == ("lecture8x8", "gpucnn-numpy", 1)
    assert len(row["times_ms"]) == 2 and all(t > 0 for t in row["times_ms"])
    assert row["ratio_to_torch"] is None  # no torch engine was asked for
    assert "lecture8x8  gpucnn-numpy" in capsys.readouterr().out
