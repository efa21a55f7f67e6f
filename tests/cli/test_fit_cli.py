"""`dltrain fit` and `dltrain eval` end to end, as a user runs them: `python -m dltrain ...`.

Each command runs in a fresh process with its working directory and `output=` under tmp_path.
The full quickstart (30 epochs) runs once per module and its run folder is shared by the
checks that need a trained model.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from dltrain.config.loading import load_recipe
from dltrain.config.schema import to_yaml

from helpers.cli import QUICKSTART, dltrain, words

METRICS_HEADER = "epoch,train_loss,val_loss,val_accuracy,lr,seconds,samples_per_s"
REPORT_KEYS = {
    "split",
    "checkpoint",
    "num_samples",
    "loss",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "per_class",
    "classes",
    "confusion_matrix",
}
CHECKPOINT_KEYS = {
    "format",
    "dltrain_version",
    "recipe",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "step",
    "rng",
    "metrics",
    "classes",
    "data_meta",
}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The shipped quickstart recipe, trained in full into a temporary output folder."""
    out = tmp_path_factory.mktemp("quickstart")
    result = dltrain("fit", QUICKSTART, f"output={out}", cwd=out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "quickstart", result


def own_copy(run: Path, tmp_path: Path) -> Path:
    """A test's own copy of the shared run, for a command that writes beside its checkpoints:
    the shared folder stays as fit left it, whatever order the tests run in."""
    return Path(shutil.copytree(run, tmp_path / run.name))


# -- the quickstart run folder ----------------------------------------------------------------


@pytest.mark.slow
def test_quickstart_writes_the_run_folder(quickstart):
    run, result = quickstart
    report = json.loads((run / "report.json").read_text())
    assert f"test accuracy {report['accuracy']:.4f}" in words(result.stdout)

    # recipe.yaml: the resolved recipe (defaults filled in), loadable as a recipe again
    text = (run / "recipe.yaml").read_text()
    reloaded = load_recipe(run / "recipe.yaml")
    assert to_yaml(reloaded) == text
    raw = yaml.safe_load(text)
    assert raw["output"] == str(run.parent) and raw["name"] == "quickstart"
    assert raw["train"]["monitor"] == "val_loss" and raw["data"]["loader"] == "auto"
    assert raw["optimizer"] == {**raw["optimizer"], "name": "adamw", "lr": 0.002}

    # metrics.csv: the exact header, one row per epoch, numbers everywhere
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0] == METRICS_HEADER
    rows = list(csv.DictReader(lines))
    assert [int(row["epoch"]) for row in rows] == list(range(1, 31))
    for row in rows:
        assert all(float(value) >= 0 for value in row.values())
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) / 5

    # report.json: every contract key, on the test split, consistent with itself
    assert report.keys() >= REPORT_KEYS
    assert report["split"] == "test" and report["checkpoint"] == "checkpoints/best.pt"
    assert report["accuracy"] >= 0.95
    assert report["num_samples"] == 359 == sum(map(sum, report["confusion_matrix"]))
    assert report["classes"] == [str(i) for i in range(10)] == list(report["per_class"])
    for metric in ("precision", "recall", "f1"):
        assert set(report[metric]) == {"macro", "micro", "weighted"}
    assert report["recall"]["micro"] == pytest.approx(report["accuracy"])
    assert sum(c["support"] for c in report["per_class"].values()) == 359

    markdown = (run / "report.md").read_text()
    assert f"accuracy {report['accuracy']:.4f}" in markdown and "Confusion matrix" in markdown
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_quickstart_checkpoints_are_data_only_and_complete(quickstart):
    run, _ = quickstart
    metrics = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    stored_recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(run / "checkpoints" / name, weights_only=True)
        assert checkpoint.keys() >= CHECKPOINT_KEYS, name
        assert isinstance(checkpoint["format"], int)
        assert checkpoint["recipe"] == stored_recipe
        assert checkpoint["classes"] == [str(i) for i in range(10)]
        assert checkpoint["data_meta"]["input_shape"] == [1, 8, 8]
        assert all(isinstance(v, torch.Tensor) for v in checkpoint["model"].values())
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert last["epoch"] == 30 and last["metrics"]["history"][-1]["epoch"] == 30
    val_losses = [float(row["val_loss"]) for row in metrics]
    best_epoch = 1 + val_losses.index(min(val_losses))
    assert best["epoch"] == last["metrics"]["best_epoch"] == best_epoch


@pytest.mark.slow
def test_eval_reproduces_the_fit_report(quickstart, tmp_path):
    run, _ = quickstart
    result = dltrain(
        "eval", run / "checkpoints" / "best.pt", "--output", tmp_path / "out", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fitted = json.loads((run / "report.json").read_text())
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert again["accuracy"] == fitted["accuracy"]
    assert again["confusion_matrix"] == fitted["confusion_matrix"]
    assert {k: v for k, v in again.items() if k != "checkpoint"} == {
        k: v for k, v in fitted.items() if k != "checkpoint"
    }
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.slow
def test_eval_json_prints_only_json_and_defaults_to_eval_test_beside_the_checkpoint(
    quickstart, tmp_path
):
    run = own_copy(quickstart[0], tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = dltrain("eval", run / "checkpoints" / "best.pt", "--json", cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    written = run / "checkpoints" / "eval-test" / "report.json"
    assert printed == json.loads(written.read_text())
    assert printed["split"] == "test" and printed.keys() >= REPORT_KEYS
    assert printed["accuracy"] == json.loads((run / "report.json").read_text())["accuracy"]
    assert list(cwd.iterdir()) == []  # nothing written in the working directory


@pytest.mark.slow
def test_eval_split_val(quickstart, tmp_path):
    run = own_copy(quickstart[0], tmp_path)
    result = dltrain(
        "eval", run / "checkpoints" / "best.pt", "--split", "val", "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["split"] == "val"
    # the validation split fit carved (10 % of 1,438, stratified), not the test split
    assert report["num_samples"] == sum(map(sum, report["confusion_matrix"])) == 143
    written = json.loads((run / "checkpoints" / "eval-val" / "report.json").read_text())
    assert written == report
    history = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["metrics"]
    best_row = history["history"][history["best_epoch"] - 1]
    assert report["accuracy"] == pytest.approx(best_row["val_accuracy"])
    assert report["loss"] == pytest.approx(best_row["val_loss"], rel=1e-5)


# -- one run folder, one recipe ---------------------------------------------------------------


def test_a_rerun_goes_to_the_next_numbered_folder_and_force_replaces_the_first(tmp_path, invoke):
    run = tmp_path / "quickstart"

    def fit(*extra: str):
        result = invoke("fit", str(QUICKSTART), f"output={tmp_path}", "train.epochs=1", *extra)
        assert result.exit_code == 0, result.output
        return words(result.output)

    fit()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    said = fit("train.epochs=2")  # another recipe: the next folder
    assert f"{run} holds a run of another recipe: this run goes to {run}-2" in said
    assert (
        yaml.safe_load((tmp_path / "quickstart-2/recipe.yaml").read_text())["train"]["epochs"] == 2
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # untouched

    said = fit()  # the first recipe again, finished there: the next number
    assert f"{run} holds a finished run: this run goes to {run}-3" in said
    listed = invoke("runs", str(tmp_path), "--json", "--sort", "name")
    names = [r["name"] for r in json.loads(listed.stdout)]
    assert names == ["quickstart", "quickstart-2", "quickstart-3"]

    fit("optimizer.lr=0.01", "--force")  # replaces {name}
    assert yaml.safe_load((run / "recipe.yaml").read_text())["optimizer"]["lr"] == 0.01
    assert not (tmp_path / "quickstart-4").exists()
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["recipe"]["optimizer"]["lr"] == 0.01


def test_fit_nproc_says_which_numbered_folder_its_processes_get(tmp_path, invoke, monkeypatch):
    started = []
    monkeypatch.setattr(
        "dltrain.system.launch.launch_local", lambda *args: started.append(args) or 0
    )
    for variable in ("DLTRAIN_RUN_DIR", "DLTRAIN_NPROC"):  # what the launcher sets: unset after
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    run = tmp_path / "quickstart"
    first = invoke("fit", str(QUICKSTART), f"output={tmp_path}", "train.epochs=1")
    assert first.exit_code == 0, first.output
    launched = invoke(
        "fit", str(QUICKSTART), f"output={tmp_path}", "train.epochs=1", "--nproc", "2"
    )
    assert launched.exit_code == 0, launched.output
    assert f"{run} holds a finished run: this run goes to {run}-2" in words(launched.output)
    assert len(started) == 1


def test_smoke_runs_the_whole_path_on_one_batch_and_leaves_nothing(tmp_path, invoke):
    result = invoke("fit", str(QUICKSTART), f"output={tmp_path / 'runs'}", "--smoke")
    assert result.exit_code == 0, result.output
    said = words(result.stdout)
    assert said.startswith("smoke test passed in") and "round-trips its checkpoint" in said
    assert len(result.stdout.strip().splitlines()) <= 2  # one line (wrapped at most once)
    assert not (tmp_path / "runs").exists()
    wrong = invoke("fit", str(QUICKSTART), "model.name=transformer", "--smoke")
    assert wrong.exit_code == 2 and "takes token ids or float sequences" in words(wrong.stderr)
