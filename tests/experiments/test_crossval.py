"""k-fold cross-validation: the fold assignment, the fold split in prepare_data, `fit --folds K`
end to end (fold run folders, cv_report.json, eval of a fold's checkpoint), re-running after an
interruption, and the wrong uses of --folds.

The end-to-end run is the quickstart with 5 folds of 2 epochs (a few seconds per fold), once per
module, in a subprocess with one thread; everything is written under tmp_path.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dltrain.config.loading import load_recipe, resolve_with_context
from dltrain.config.registry import DATASETS
from dltrain.config.schema import to_yaml
from dltrain.data.prepare import prepare_data
from dltrain.data.splits import stratified_folds
from dltrain.errors import UserError
from dltrain.experiments import crossval
from dltrain.experiments.crossval import fold_recipes, run_cross_validation, summarize_folds
from dltrain.reporting.report import report_scalars
from dltrain.runs.metrics_csv import best_val_metrics, read_metrics
from dltrain.training.evaluate import evaluate_checkpoint

from helpers.cli import QUICKSTART, dltrain
from helpers.training import DIGITS, TABULAR, make_recipe, quiet

pytestmark = pytest.mark.console_width(200)

K = 5


def digits_train_labels() -> np.ndarray:
    return DATASETS.build({"name": "digits"}, seed=0).train.y.numpy()


# -- stratified_folds -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_folds_are_disjoint_cover_every_index_and_are_stratified(k):
    rng = np.random.default_rng(1)
    labels = rng.choice(4, size=203, p=[0.5, 0.3, 0.15, 0.05])  # imbalanced
    folds = stratified_folds(labels, k, seed=7)
    assert len(folds) == k
    everything = np.concatenate(folds)
    assert sorted(everything.tolist()) == list(range(len(labels)))  # each index exactly once
    for fold in folds:
        assert fold.dtype == np.int64 and np.all(np.diff(fold) > 0)  # sorted, no repeats
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for c in np.unique(labels):
        per_fold = [int(np.sum(labels[f] == c)) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)  # each class spread evenly


def test_folds_repeat_for_a_seed_and_change_with_it():
    labels = digits_train_labels()
    a, b = stratified_folds(labels, 5, seed=0), stratified_folds(labels, 5, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = stratified_folds(labels, 5, seed=1)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_a_class_smaller_than_k_is_spread_over_as_many_folds_as_it_has_samples():
    labels = np.array(["a"] * 20 + ["rare"] * 3)
    folds = stratified_folds(labels, 5, seed=0)
    rare = [int(np.sum(labels[f] == "rare")) for f in folds]
    assert sorted(rare) == [0, 0, 1, 1, 1]
    assert all(len(f) > 0 for f in folds)


def test_folds_refuse_too_few_samples_and_k_below_two():
    with pytest.raises(ValueError, match="at least 4 samples"):
        stratified_folds(np.array([0, 1, 0]), 4, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        stratified_folds(np.array([0, 1, 0]), 1, seed=0)
    assert [f.tolist() for f in stratified_folds(np.array([0, 1, 0]), 3, seed=0)] != []


# -- data.fold: the recipe field and prepare_data ----------------------------------------------


def test_fold_recipes_record_the_fold_and_live_under_output_name(tmp_path):
    recipe = make_recipe(tmp_path, TABULAR, "cv")
    recipes = fold_recipes(recipe, 3)
    assert [r.name for r in recipes] == ["fold-1", "fold-2", "fold-3"]
    assert {r.output for r in recipes} == {str(tmp_path / "cv")}
    assert [(r.data.fold.index, r.data.fold.of) for r in recipes] == [(1, 3), (2, 3), (3, 3)]
    # recipe.yaml keeps the fold, and reads back to the same recipe; outside CV it is absent
    text = to_yaml(recipes[1])
    assert yaml.safe_load(text)["data"]["fold"] == {"index": 2, "of": 3}
    again = resolve_with_context(yaml.safe_load(text), [], "fold recipe")
    assert to_yaml(again) == text
    assert "fold" not in recipe.to_dict()["data"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("{index: 4, of: 3}", "beyond the 3 folds"), ("{index: 1, of: 1}", "data.fold.of")],
)
def test_an_impossible_fold_is_a_recipe_error(tmp_path, value, expected):
    with pytest.raises(UserError, match=expected):
        make_recipe(tmp_path, TABULAR, "x", f"data.fold={value}")


def test_prepare_data_validates_on_the_fold_and_trains_on_the_rest(tmp_path):
    labels = digits_train_labels()
    folds = stratified_folds(labels, 4, seed=5)
    full = DATASETS.build({"name": "digits"}, seed=5).train  # loaded by digits_train_labels
    seen = []
    for index in range(1, 5):
        recipe = make_recipe(
            tmp_path, DIGITS, "x", "seed=5", f"data.fold={{index: {index}, of: 4}}"
        )
        data = prepare_data(recipe.data, recipe.seed)
        val, train = data.splits["val"], data.splits["train"]
        part = folds[index - 1]
        rest = np.setdiff1d(np.arange(len(labels)), part)
        assert torch.equal(val.x, full.x[part]) and torch.equal(val.y, full.y[part])
        assert torch.equal(train.x, full.x[rest]) and torch.equal(train.y, full.y[rest])
        assert "test" in data.splits  # the test split is untouched
        # normalisation comes from the fold's training part only
        assert data.mean[0] == pytest.approx(float(full.x[rest].double().mean() / 255), rel=1e-6)
        seen.append(part)
    assert sorted(np.concatenate(seen).tolist()) == list(range(len(labels)))


def test_a_dataset_validation_split_is_not_used_under_a_fold(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        f"{split}_{what}": (rng.random((n, 6)).astype(np.float32) if what == "x" else
                            np.arange(n) % 3)
        for split, n in (("train", 60), ("val", 17), ("test", 30))
        for what in ("x", "y")
    }  # fmt: skip
    np.savez(tmp_path / "d.npz", **arrays)
    base = {**TABULAR, "data": {"name": "npz", "path": str(tmp_path / "d.npz")}}
    plain = prepare_data(make_recipe(tmp_path, base, "x").data, 0)
    assert len(plain.splits["val"]) == 17
    folded = prepare_data(make_recipe(tmp_path, base, "x", "data.fold={index: 2, of: 3}").data, 0)
    assert len(folded.splits["val"]) == 20 and len(folded.splits["train"]) == 40


def test_more_folds_than_training_samples_is_a_user_error(tmp_path):
    recipe = make_recipe(tmp_path, TABULAR, "x", "data.train_size=4", "data.fold={index: 1, of: 5}")
    with pytest.raises(UserError, match="cannot make 5 folds of 4 training samples"):
        prepare_data(recipe.data, recipe.seed)


# -- the summary ------------------------------------------------------------------------------


def test_report_scalars_take_every_scalar_metric_and_each_average():
    report = {
        "split": "test",
        "checkpoint": "checkpoints/best.pt",
        "num_samples": 10,
        "loss": 0.5,
        "accuracy": 0.9,
        "precision": {"macro": 0.8, "micro": 0.9, "weighted": 0.85},
        "auroc": {"macro": 0.7, "per_class": {"a": 0.7}},
        "per_class": {"a": {"precision": 1.0, "support": 3}},
        "classes": ["a"],
        "confusion_matrix": [[3]],
        "flag": True,
    }
    assert report_scalars(report) == {
        "loss": 0.5,
        "accuracy": 0.9,
        "precision_macro": 0.8,
        "precision_micro": 0.9,
        "precision_weighted": 0.85,
        "auroc_macro": 0.7,
    }


def test_summary_is_mean_and_sample_std_per_metric():
    reports = [{"accuracy": a, "loss": 1 - a} for a in (0.8, 0.9, 0.95)]
    histories = [[{"val_loss": 0.5, "val_accuracy": 0.7}, {"val_loss": 0.4, "val_accuracy": 0.6}]]
    summary = summarize_folds(reports, histories * 3)
    assert list(summary)[:2] == ["accuracy", "loss"]
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean([0.8, 0.9, 0.95]))
    assert summary["accuracy"]["std"] == pytest.approx(np.std([0.8, 0.9, 0.95], ddof=1))
    assert summary["best_val_loss"]["values"] == [0.4] * 3
    assert summary["best_val_accuracy"]["values"] == [0.7] * 3


# -- wrong uses of --folds: exit 2 before any work --------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--folds", "1"], "--folds must be at least 2"),
        (["--folds", "0"], "--folds must be at least 2"),
        (["--folds", "-3"], "--folds must be at least 2"),
        (["--folds", "3", "--resume", "auto"], "--resume does not combine with --folds"),
        (["data.fold={index: 1, of: 3}", "--folds", "3"], "data.fold is already set"),
        (["--folds", "many"], "--folds"),
    ],
)
def test_bad_folds_exit_2(invoke, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    result = invoke("fit", str(QUICKSTART), f"output={tmp_path}", *args)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []


def test_folds_are_refused_over_a_single_run_or_another_cross_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(crossval, "fit", _no_training)
    recipe = make_recipe(tmp_path, TABULAR, "cv")
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "recipe.yaml").write_text(to_yaml(recipe))
    with pytest.raises(UserError, match="holds a single run"):
        run_cross_validation(recipe, 3, quiet())
    (tmp_path / "cv" / "recipe.yaml").unlink()
    (tmp_path / "cv" / "fold-2").mkdir()
    (tmp_path / "cv" / "fold-2" / "recipe.yaml").write_text(to_yaml(recipe))
    with pytest.raises(UserError, match="fold-2 holds a run of a different recipe"):
        run_cross_validation(recipe, 3, quiet())


def _no_training(*args, **kwargs):
    raise AssertionError("fit was called")


# -- fit --folds 5 on the quickstart, end to end -----------------------------------------------


@pytest.fixture(scope="module")
def cross_validation(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The quickstart, 2 epochs, 5 folds, into a temporary output folder."""
    out = tmp_path_factory.mktemp("cv")
    result = dltrain("fit", QUICKSTART, "train.epochs=2", f"output={out}", "--folds", K, cwd=out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "quickstart", result


@pytest.mark.slow
def test_folds_write_fold_runs_and_a_cv_report_of_their_metrics(cross_validation):
    root, result = cross_validation
    names = [f"fold-{k}" for k in range(1, K + 1)]
    # (beside each fold: its lock file, .fold-k.lock, which stays, as OS lock files do)
    shown = [p.name for p in root.iterdir() if not p.name.startswith(".")]
    assert sorted(shown) == sorted([*names, "cv_report.json"])
    assert sorted(p.name for p in root.glob(".*")) == sorted(f".{n}.lock" for n in names)
    cv = json.loads((root / "cv_report.json").read_text())
    assert cv["folds"] == K and cv["runs"] == names and cv["split"] == "test"
    assert "epoch" not in cv["metrics"] and "num_samples" not in cv["metrics"]  # not metrics
    reports = [json.loads((root / n / "report.json").read_text()) for n in names]
    metrics = [best_val_metrics(read_metrics(root / n / "metrics.csv")) for n in names]
    expected = {
        "accuracy": [r["accuracy"] for r in reports],
        "loss": [r["loss"] for r in reports],
        "f1_macro": [r["f1"]["macro"] for r in reports],
        "precision_macro": [r["precision"]["macro"] for r in reports],
        "recall_macro": [r["recall"]["macro"] for r in reports],
        "f1_weighted": [r["f1"]["weighted"] for r in reports],
        "best_val_loss": [m["best_val_loss"] for m in metrics],
        "best_val_accuracy": [m["best_val_accuracy"] for m in metrics],
    }
    for name, values in expected.items():
        summary = cv["metrics"][name]
        assert summary["values"] == pytest.approx(values), name
        assert summary["mean"] == pytest.approx(np.mean(values)), name
        assert summary["std"] == pytest.approx(np.std(values, ddof=1)), name
    assert "num_samples" not in cv["metrics"]
    for report in reports:  # each fold's best.pt is evaluated on the (whole) test split
        assert report["split"] == "test" and report["num_samples"] == 359
    # the table: one row per metric, mean ± std
    acc = cv["metrics"]["accuracy"]
    assert f"{acc['mean']:.4f} ± {acc['std']:.4f}" in result.stdout


@pytest.mark.slow
def test_each_fold_validates_on_its_own_stratified_part_of_the_train_split(cross_validation):
    root, _ = cross_validation
    labels = digits_train_labels()
    folds = stratified_folds(labels, K, seed=0)  # the quickstart's seed
    for k in range(1, K + 1):
        recipe = load_recipe(root / f"fold-{k}" / "recipe.yaml")
        assert recipe.name == f"fold-{k}" and recipe.output == str(root)
        assert (recipe.data.fold.index, recipe.data.fold.of) == (k, K)
        data = prepare_data(recipe.data, recipe.seed)
        assert torch.equal(data.splits["val"].y, torch.from_numpy(labels[folds[k - 1]]))
        assert len(data.splits["train"]) == len(labels) - len(folds[k - 1])
        checkpoint = torch.load(root / f"fold-{k}" / "checkpoints" / "best.pt", weights_only=True)
        assert checkpoint["recipe"]["data"]["fold"] == {"index": k, "of": K}


@pytest.mark.slow
def test_eval_of_a_fold_checkpoint_reproduces_its_report_and_its_split(cross_validation):
    root, _ = cross_validation
    fold = root / "fold-3"
    best = fold / "checkpoints" / "best.pt"
    result = dltrain("eval", best, "--json", "--output", fold / "again", cwd=root)
    assert result.returncode == 0, result.stderr
    again, report = json.loads(result.stdout), json.loads((fold / "report.json").read_text())
    assert {k: v for k, v in again.items() if k != "checkpoint"} == {
        k: v for k, v in report.items() if k != "checkpoint"
    }
    # the validation split is rebuilt from the checkpoint's recipe: fold 3's part, on which the
    # best epoch's val_loss was measured
    val = evaluate_checkpoint(best, fold / "val", quiet(), split="val")
    assert val["num_samples"] == len(stratified_folds(digits_train_labels(), K, seed=0)[2])
    best_val_loss = best_val_metrics(read_metrics(fold / "metrics.csv"))["best_val_loss"]
    assert val["loss"] == pytest.approx(best_val_loss, rel=1e-5)


@pytest.mark.slow
def test_running_again_keeps_finished_folds_and_continues_an_unfinished_one(
    cross_validation, monkeypatch
):
    root, _ = cross_validation
    recipe = load_recipe(QUICKSTART, ["train.epochs=2", f"output={root.parent}"])
    before = json.loads((root / "cv_report.json").read_text())
    # fold 4 as if interrupted after its last epoch: no report.json yet
    (root / "fold-4" / "report.json").unlink()
    calls = []
    real_fit = crossval.fit

    def recording_fit(fold_recipe, run, progress, resume=None, **options):
        calls.append((fold_recipe.name, resume))
        return real_fit(fold_recipe, run, progress, resume=resume, **options)

    monkeypatch.setattr(crossval, "fit", recording_fit)
    after = run_cross_validation(recipe, K, quiet())
    assert calls == [("fold-4", root / "fold-4" / "checkpoints" / "last.pt")]
    assert after["metrics"]["accuracy"]["values"] == before["metrics"]["accuracy"]["values"]
    assert after == json.loads((root / "cv_report.json").read_text())


@pytest.mark.slow
def test_runs_lists_the_fold_runs(invoke, cross_validation):
    root, _ = cross_validation
    result = invoke("runs", str(root), "--json", "--sort", "name")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == [f"fold-{k}" for k in range(1, K + 1)]
    assert all(r["epochs"] == 2 and r["test_accuracy"] is not None for r in rows)


# -- regression -------------------------------------------------------------------------------


def _regression_table(folder: Path, rows: int = 120) -> dict:
    """A learnable regression CSV (y = 3a − b) and the data section that reads it."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=rows), rng.normal(size=rows)
    lines = ["a,b,y", *(f"{x:.4f},{z:.4f},{3 * x - z:.4f}" for x, z in zip(a, b, strict=True))]
    (folder / "r.csv").write_text("\n".join(lines) + "\n")
    return {"name": "csv", "train": str(folder / "r.csv"), "label": "y"}


def test_regression_folds_are_random_parts_that_validate_every_row_once(tmp_path):
    data = _regression_table(tmp_path)
    base = {**TABULAR, "data": data}
    validated = []
    for index in (1, 2, 3):
        recipe = make_recipe(tmp_path, base, "x", f"data.fold={{index: {index}, of: 3}}")
        splits = prepare_data(recipe.data, recipe.seed).splits
        assert len(splits["val"]) == 40 and len(splits["train"]) == 80
        validated.extend(splits["val"].y.tolist())
    every = prepare_data(make_recipe(tmp_path, base, "x", "data.val_split=0").data, 0)
    in_file_order = every.splits["train"].y.tolist()
    assert sorted(validated) == sorted(in_file_order)
    reseeded = make_recipe(tmp_path, base, "x", "seed=1", "data.fold={index: 1, of: 3}")
    other = prepare_data(reseeded.data, reseeded.seed).splits["val"].y.tolist()
    assert sorted(other) != sorted(validated[:40])  # dealt at random, with the recipe's seed


def test_fit_folds_on_a_regression_table_reports_r2_per_fold(tmp_path, invoke):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"name": "r", "output": "runs", "device": "cpu", "data": _regression_table(tmp_path),
             "model": {"name": "mlp", "hidden": [16]}, "optimizer": {"name": "adam", "lr": 0.01},
             "train": {"epochs": 30}}
        )
    )  # fmt: skip
    result = invoke("fit", recipe, "--folds", "3")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs/r/cv_report.json").read_text())
    r2 = report["metrics"]["r2"]
    assert len(r2["values"]) == 3 and min(r2["values"]) > 0.9  # learnt on every fold
