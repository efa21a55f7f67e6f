"""bench/speedrun.py: the time-to-accuracy harness (its clock and its figures), on tiny fits."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import speedrun  # noqa: E402  (bench/speedrun.py)


def test_summary_gives_mean_std_and_the_share_of_seeds_reaching_the_target():
    runs = [
        {"accuracy": 0.95, "seconds": 10.0, "epochs": 10},
        {"accuracy": 0.93, "seconds": 12.0, "epochs": 10},
        {"accuracy": 0.94, "seconds": 11.0, "epochs": 9},
    ]
    summary = speedrun.summarise(runs, 0.94)
    assert summary["seeds"] == 3
    assert summary["reached_target"] == 2  # 0.94 itself counts
    assert summary["fraction_reaching_target"] == pytest.approx(2 / 3)
    assert summary["accuracy"]["mean"] == pytest.approx(0.94)
    assert summary["accuracy"]["std"] == pytest.approx(0.01)  # sample std
    assert summary["seconds"] == {"mean": 11.0, "std": 1.0, "min": 10.0, "max": 12.0}
    assert speedrun.summarise(runs[:1], 0.94)["accuracy"]["std"] == 0.0
    assert speedrun.summarise([], 0.94) == {"seeds": 0, "target": 0.94}


def test_a_warm_up_then_timed_seeds_each_clocked_from_training_to_the_final_evaluation(
    tmp_path, capsys
):
    out = tmp_path / "speedrun.json"
    recipe = ROOT / "recipes" / "quickstart.yaml"
    code = speedrun.main(
        [str(recipe), "--seeds", "2", "--json", str(out), "train.epochs=1", "device=cpu"]
    )
    assert code == 0
    document = json.loads(out.read_text())

    assert document["warmup"]["seed"] == 1000
    assert [run["seed"] for run in document["runs"]] == [0, 1]
    for run in [document["warmup"], *document["runs"]]:
        assert run["split"] == "test"  # the quickstart has a test split
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["epochs"] == 1 and len(run["history"]) == 1
        assert run["report_write_seconds"] is not None
        assert run["train_seconds"] > 0 and run["final_eval_seconds"] > 0
        assert math.isclose(run["seconds"], run["train_seconds"] + run["final_eval_seconds"])
        # the setup and writing the report (plots) are outside the clock, inside the fit
        assert run["setup_seconds"] > 0 and run["report_write_seconds"] > 0
        assert run["seconds"] + run["setup_seconds"] + run["report_write_seconds"] <= (
            run["fit_wall_seconds"] + 1e-6
        )
    summary = document["summary"]
    accuracies = [run["accuracy"] for run in document["runs"]]
    assert summary["seeds"] == 2
    assert summary["accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)
    assert summary["reached_target"] == sum(a >= 0.94 for a in accuracies)
    assert document["machine"]["torch"] and document["machine"]["cpu_count"] >= 1
    printed = capsys.readouterr().out
    assert "warm-up/compile (seed 1000)" in printed and "2 seeds: accuracy" in printed


def test_a_bad_override_is_refused_before_any_fit(tmp_path, capsys):
    out = tmp_path / "speedrun.json"
    recipe = ROOT / "recipes" / "quickstart.yaml"
    assert speedrun.main([str(recipe), "--json", str(out), "train.epochz=1"]) == 2
    assert "train.epochz" in capsys.readouterr().err
    assert not out.exists()
