"""`dltrain runs`: finding run folders, their summaries (best validation metrics, test report),
sorting, the JSON output, and the messages for an empty or missing folder.

A few tiny tabular runs are trained in-process once per module; the CLI runs in-process too
(typer's CliRunner: `runs` needs no torch).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dltrain.runs.folder import RunFolder
from dltrain.runs.listing import COLUMNS, find_runs, list_runs, sort_runs, summarize_run
from dltrain.runs.metrics_csv import read_metrics

from helpers.training import TABULAR, metric_rows, train

pytestmark = pytest.mark.console_width(200)


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory) -> Path:
    """Four runs: with validation (two, one nested), without, and one still 'in progress'."""
    out = tmp_path_factory.mktemp("runs")
    train(out, TABULAR, "with-val", "data.val_split=0.25")
    train(out, TABULAR, "with-val-3", "data.val_split=0.25", "train.epochs=3", "seed=1")
    train(out / "group", TABULAR, "no-val")  # TABULAR has val_split 0: no val metrics
    shutil.copytree(out / "with-val", out / "unfinished")
    (out / "unfinished" / "report.json").unlink()  # training, not yet evaluated
    (out / "with-val" / "eval-test").mkdir()  # an eval folder: a report but no recipe: no run
    shutil.copy(out / "with-val" / "report.json", out / "with-val" / "eval-test")
    (out / "notes").mkdir()
    (out / "notes" / "recipe.yaml").write_text("name: x\n")  # a recipe alone: no run
    return out


def test_find_runs_finds_every_run_folder_at_any_depth(runs_folder):
    found = [p.relative_to(runs_folder).as_posix() for p in find_runs(runs_folder)]
    assert found == ["group/no-val", "unfinished", "with-val", "with-val-3"]


def test_a_summary_has_the_best_validation_metrics_and_the_test_report(runs_folder):
    run = runs_folder / "with-val-3"
    row = summarize_run(run, runs_folder)
    assert set(COLUMNS) <= set(row)
    rows = metric_rows(RunFolder(run))
    losses = [float(r["val_loss"]) for r in rows]
    accuracies = [float(r["val_accuracy"]) for r in rows]
    report = json.loads((run / "report.json").read_text())
    assert row["name"] == "with-val-3" and row["path"] == str(run)
    assert (row["model"], row["dataset"]) == ("mlp", "synthetic")
    assert (row["epochs"], row["epochs_planned"]) == (3, 3)
    assert row["best_val_loss"] == min(losses)
    assert row["best_val_accuracy"] == max(accuracies)
    assert row["test_accuracy"] == report["accuracy"]
    assert row["f1_macro"] == report["f1"]["macro"]
    assert row["report_split"] == "test"
    assert row["modified"] is not None and row["modified"][:2] == "20"


def test_missing_values_are_none(runs_folder):
    no_val = summarize_run(runs_folder / "group" / "no-val", runs_folder)
    assert no_val["name"] == "group/no-val"
    assert no_val["best_val_loss"] is None and no_val["best_val_accuracy"] is None
    assert no_val["test_accuracy"] is not None
    unfinished = summarize_run(runs_folder / "unfinished", runs_folder)
    assert unfinished["test_accuracy"] is None and unfinished["f1_macro"] is None
    assert unfinished["best_val_loss"] is not None


def test_damaged_files_leave_values_missing_instead_of_failing(tmp_path):
    run = tmp_path / "broken"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: [unclosed\n")
    (run / "metrics.csv").write_text("epoch,val_loss\n1,not-a-number\n")
    (run / "report.json").write_text("{truncated")
    row = summarize_run(run, tmp_path)
    assert row["model"] is None and row["epochs"] == 1 and row["best_val_loss"] is None
    assert row["test_accuracy"] is None
    assert read_metrics(tmp_path / "absent.csv") == []


def test_sorting(runs_folder):
    rows = list_runs(runs_folder)  # default: test accuracy, highest first, missing last
    accuracies = [r["test_accuracy"] for r in rows]
    assert accuracies[-1] is None and rows[-1]["name"] == "unfinished"
    assert accuracies[:-1] == sorted(accuracies[:-1], reverse=True)
    assert [r["name"] for r in sort_runs(rows, "name")] == [
        "group/no-val",
        "unfinished",
        "with-val",
        "with-val-3",
    ]
    by_loss = sort_runs(rows, "best_val_loss")  # lowest first; no-val (missing) last
    losses = [r["best_val_loss"] for r in by_loss]
    assert losses[-1] is None and losses[:-1] == sorted(losses[:-1])
    assert [r["epochs"] for r in sort_runs(rows, "epochs")][0] == 3


def test_runs_command_prints_a_table_with_dashes_for_missing_values(invoke, runs_folder):
    result = invoke("runs", str(runs_folder))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    rows = {name: next(line for line in lines if f" {name} " in line) for name in
            ("group/no-val", "unfinished", "with-val", "with-val-3")}  # fmt: skip
    with_val = summarize_run(runs_folder / "with-val", runs_folder)
    assert f"{with_val['best_val_loss']:.4f}" in rows["with-val"]
    assert f"{with_val['test_accuracy']:.4f}" in rows["with-val"]
    assert "2/2" in rows["with-val"] and "mlp" in rows["with-val"]
    assert rows["group/no-val"].count("—") == 2  # best val_loss and val accuracy
    assert rows["unfinished"].count("—") == 2  # test accuracy and macro F1
    order = [min(i for i, line in enumerate(lines) if f" {n} " in line) for n in rows]
    assert order[1] == max(order)  # unfinished (no test accuracy) comes last


def test_runs_json_is_sorted_and_parses(invoke, runs_folder):
    result = invoke("runs", str(runs_folder), "--json", "--sort", "name")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["group/no-val", "unfinished", "with-val", "with-val-3"]
    assert set(COLUMNS) <= set(rows[0])
    assert rows[0]["best_val_loss"] is None


def test_runs_of_an_empty_folder_says_so(invoke, tmp_path):
    result = invoke("runs", str(tmp_path))
    assert result.exit_code == 0
    assert "no runs in" in result.output
    result = invoke("runs", str(tmp_path), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_runs_default_folder_is_runs(invoke, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("runs")
    assert result.exit_code == 2 and "runs does not exist" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing"], "missing does not exist"),
        (["a-file"], "is a file, not a folder"),
        ([".", "--sort", "test_acc"], "Did you mean 'test_accuracy'"),
    ],
)
def test_runs_wrong_input_exits_2(invoke, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    result = invoke("runs", *args)
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split())


def test_each_task_shows_its_own_headline(invoke, tmp_path):
    # a regression and a seq2seq run beside a classification one: MSE/R² and exact match columns
    # appear with values where they apply; a listing of one task keeps only its columns
    reports = {
        "regress": {"split": "test", "task": "regression", "mse": 0.25, "mae": 0.4, "r2": 0.81},
        "seq": {"split": "val", "task": "seq2seq", "exact_match": 0.5, "token_accuracy": 0.9},
    }
    for name, report in reports.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.yaml").write_text(f"name: {name}\n")
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    rows = {r["name"]: r for r in list_runs(tmp_path)}
    assert (rows["regress"]["test_mse"], rows["regress"]["test_r2"]) == (0.25, 0.81)
    assert rows["seq"]["exact_match"] == 0.5 and rows["seq"]["test_accuracy"] is None
    shown = invoke("runs", str(tmp_path)).stdout
    assert "test MSE" in shown and "test R²" in shown and "exact match" in shown
    assert "0.8100" in shown and "0.5000 (val)" in shown  # the seq2seq report is on val


def test_a_classification_listing_has_no_other_tasks_columns(invoke, runs_folder):
    shown = invoke("runs", str(runs_folder)).stdout
    assert "test acc" in shown and "test MSE" not in shown and "exact match" not in shown
