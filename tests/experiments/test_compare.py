"""`dltrain compare`'s logic: reading run folders, the recipe keys that differ, the table and
--json of each run's figures, the PNG of curves on shared axes, and the refusals.

Three tiny real runs are trained in-process once per module: the quickstart recipe twice
(different lr and epochs) and a small CSV regression; other cases copy or damage them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dltrain.errors import UserError
from dltrain.experiments.compare import (
    DEFAULT_OUTPUT,
    ComparedRun,
    compare_json,
    compare_table,
    differing_keys,
    keys_table,
    load_runs,
    plot_compare,
    unique_names,
)

from helpers.training import one_torch_thread, quickstart_recipe, recipe, train

SPEED = ("data.batch_size=128",)  # the same in both runs: fewer steps, not a difference


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Run folders, side by side in one folder: 'slow' (lr 0.002, 2 epochs), 'fast' (lr 0.01,
    3 epochs) and 'prices' (a regression on a CSV table, 2 epochs)."""
    out = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 2))
    y = 3 * x[:, 0] - x[:, 1] + rng.normal(0, 0.1, size=120)
    table = out / "prices.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "price"])
        writer.writerows(np.column_stack([x, y]).tolist())
    data = {"name": "csv", "path": str(table), "label": "price", "batch_size": 32}
    model = {"name": "mlp", "hidden": [16]}
    regression = recipe(data, model, lr=0.01, epochs=2, loss={"name": "mse"}, device="cpu")
    quickstart = {**quickstart_recipe(), "device": "cpu"}
    with one_torch_thread():  # module fixtures run before the autouse one
        slow, _ = train(out, quickstart, "slow", "train.epochs=2", "optimizer.lr=0.002", *SPEED)
        fast, _ = train(out, quickstart, "fast", "train.epochs=3", "optimizer.lr=0.01", *SPEED)
        prices, _ = train(out, regression, "prices")
    return {"slow": slow.root, "fast": fast.root, "prices": prices.root}


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def columns(table) -> dict[str, list[str]]:
    """The rendered table as {header: cells}."""
    return {str(c.header): [str(cell) for cell in c.cells] for c in table.columns}


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# -- what differs, and each run's figures ------------------------------------------------------


def test_differing_keys_are_exactly_the_changed_ones(trained):
    runs = load_runs([trained["slow"], trained["fast"]])
    assert [r.name for r in runs] == ["slow", "fast"]
    assert differing_keys(runs) == ["optimizer.lr", "train.epochs"]  # not name, output, seed
    assert runs[0].recipe["optimizer.lr"] == 0.002 and runs[1].recipe["train.epochs"] == 3
    assert runs[0].recipe["optimizer.betas"] == [0.9, 0.999]  # lists stay values
    assert [r.epochs for r in runs] == [2, 3]
    assert all(isinstance(v, float) for v in runs[1].rows[0].values() if v is not None)


def test_the_table_shows_the_differing_values_and_each_reports_headline(trained):
    runs = load_runs([trained["slow"], trained["fast"]])
    cells = columns(compare_table(runs))
    assert list(cells)[:3] == ["run", "optimizer.lr", "train.epochs"]
    assert cells["run"] == ["slow", "fast"]
    assert cells["optimizer.lr"] == ["0.002", "0.01"]
    assert cells["train.epochs"] == ["2", "3"]
    assert cells["epochs"] == ["2", "3"]
    accuracies = [report(trained[n])["accuracy"] for n in ("slow", "fast")]
    assert cells["test accuracy"] == [f"{a:.4f}" for a in accuracies]
    f1 = [report(trained[n])["f1"]["macro"] for n in ("slow", "fast")]
    assert cells["test macro F1"] == [f"{v:.4f}" for v in f1]
    for run, loss, accuracy in zip(runs, cells["best val_loss"], cells["best val_acc"]):
        rows = run.rows
        assert loss == f"{min(r['val_loss'] for r in rows):.4f}"
        assert accuracy == f"{max(r['val_accuracy'] for r in rows):.4f}"


def test_json_holds_the_params_figures_and_headline(trained):
    data = compare_json(load_runs([trained["slow"], trained["fast"]]))
    json.dumps(data, allow_nan=False)  # plain JSON
    assert data["differing_keys"] == ["optimizer.lr", "train.epochs"]
    slow, fast = data["runs"]
    assert slow["name"] == "slow" and slow["path"] == str(trained["slow"])
    assert slow["params"] == {"optimizer.lr": 0.002, "train.epochs": 2}
    assert fast["params"] == {"optimizer.lr": 0.01, "train.epochs": 3}
    assert (slow["epochs"], fast["epochs"]) == (2, 3)
    assert fast["headline"] == {
        "label": "accuracy",
        "value": report(trained["fast"])["accuracy"],
        "split": "test",
    }
    assert fast["best_val_accuracy"] > 0.5 and fast["best_val_loss"] > 0


def test_a_classification_and_a_regression_run_each_show_their_own_headline(trained):
    runs = load_runs([trained["slow"], trained["prices"]])
    keys = differing_keys(runs)
    assert {"data.name", "loss.name", "model.name", "optimizer.lr"} <= set(keys)
    assert "loss.label_smoothing" in keys  # cross_entropy's argument, absent from mse
    assert {"name", "output", "seed", "device"}.isdisjoint(keys)
    cells = columns(compare_table(runs))
    accuracy = report(trained["slow"])["accuracy"]
    mse = report(trained["prices"])["mse"]
    assert cells["final evaluation"] == [f"test accuracy {accuracy:.4f}", f"test mse {mse:.4f}"]
    assert cells["loss.label_smoothing"] == ["0.0", "—"]  # absent in the regression run
    assert cells["best val_acc"][1] == "—"
    headlines = [r["headline"] for r in compare_json(runs)["runs"]]
    assert [(h["label"], h["value"]) for h in headlines] == [("accuracy", accuracy), ("mse", mse)]
    assert "loss.label_smoothing" not in compare_json(runs)["runs"][1]["params"]
    # too many keys for columns: the figures alone, and the keys one per row
    assert list(columns(compare_table(runs, key_columns=False)))[:2] == ["run", "epochs"]
    by_key = {row[0]: row[1:] for row in zip(*columns(keys_table(runs)).values())}
    assert list(by_key) == keys
    assert by_key["loss.name"] == ("cross_entropy", "mse")
    assert by_key["loss.label_smoothing"] == ("0.0", "—")


def test_a_run_without_a_report_shows_a_dash(trained, tmp_path):
    unfinished = copy_run(trained["fast"], tmp_path / "unfinished")
    (unfinished / "report.json").unlink()
    runs = load_runs([trained["slow"], unfinished])
    assert runs[1].report is None
    cells = columns(compare_table(runs))
    assert cells["test accuracy"] == [f"{report(trained['slow'])['accuracy']:.4f}", "—"]
    assert compare_json(runs)["runs"][1]["headline"] is None


def test_runs_sharing_a_folder_name_are_named_by_their_parents(trained, tmp_path):
    first = copy_run(trained["slow"], tmp_path / "x" / "slow")
    second = copy_run(trained["slow"], tmp_path / "y" / "slow")
    runs = load_runs([first, second, trained["fast"]])
    assert [r.name for r in runs] == ["x/slow", "y/slow", "fast"]
    assert differing_keys(runs) == ["optimizer.lr", "train.epochs"]
    deep = [Path("/p/x/run"), Path("/q/x/run"), Path("/q/y/run")]
    assert unique_names(deep) == ["p/x/run", "q/x/run", "y/run"]


def test_differing_keys_tell_true_from_1_and_absent_from_null():
    def run(name: str, recipe: dict) -> ComparedRun:
        return ComparedRun(name, Path(name), {"name": name, **recipe}, [], None)

    runs = [
        run("a", {"x": True, "y": 1, "z": None, "w": [1, 2], "s": "same"}),
        run("b", {"x": 1, "y": 1.0, "w": [1, 2], "s": "same", "new": 0}),
    ]
    assert differing_keys(runs) == ["new", "x", "z"]


# -- the plot -----------------------------------------------------------------------------------


def colour_pixels(image: Image.Image, rgb: tuple[int, int, int]) -> int:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(pixels - rgb).sum(axis=2) < 30).sum())


BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1


def test_the_plot_draws_each_run_on_shared_axes(trained, tmp_path):
    runs = load_runs([trained["slow"], trained["fast"]])
    path = plot_compare(runs, tmp_path / "out" / "compare.png")
    assert path == tmp_path / "out" / "compare.png"
    assert os.listdir(path.parent) == ["compare.png"]  # atomic: no temp file left
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 900 <= width <= 1600 and 1000 <= height <= 1400  # three panels, stacked
        assert colour_pixels(image, BLUE) > 500 and colour_pixels(image, ORANGE) > 500
    assert Path("compare.png") == DEFAULT_OUTPUT


def test_runs_without_accuracy_get_two_panels(trained, tmp_path):
    other = copy_run(trained["prices"], tmp_path / "other")
    runs = load_runs([trained["prices"], other])
    with Image.open(plot_compare(runs, tmp_path / "c.png")) as image:
        width, height = image.size
    assert 900 <= width <= 1600 and 600 <= height < 1000  # train and validation loss only


def test_the_output_must_be_a_png_file(trained, tmp_path):
    runs = load_runs([trained["slow"], trained["fast"]])
    with pytest.raises(UserError, match=r"\.png"):
        plot_compare(runs, tmp_path / "compare.pdf")
    with pytest.raises(UserError, match="is a folder"):
        plot_compare(runs, tmp_path)
    assert not (tmp_path / "compare.pdf").exists()


# -- refusals -----------------------------------------------------------------------------------


def message(paths: list[Path]) -> str:
    with pytest.raises(UserError) as info:
        load_runs(paths)
    return str(info.value)


def test_a_missing_path_is_named(trained, tmp_path):
    missing = tmp_path / "nope"
    assert message([trained["slow"], missing]) == (
        f"{missing} does not exist. Pass run folders (runs/NAME); dltrain runs lists them."
    )


def test_a_file_or_a_plain_folder_is_not_a_run(trained, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("hi")
    assert message([trained["slow"], file]).startswith(f"{file} is a file, not a run folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    text = message([empty, trained["slow"]])
    assert text.startswith(f"{empty} is not a run folder: it has no recipe.yaml and metrics.csv")


def test_a_folder_of_runs_names_the_runs_to_pass(trained):
    parent = trained["slow"].parent
    text = message([parent, trained["slow"]])
    assert text.startswith(f"{parent} is not a run folder but holds 3 runs")
    assert str(trained["fast"]) in text


def test_a_run_without_metrics_yet_says_so(trained, tmp_path):
    started = copy_run(trained["slow"], tmp_path / "started")
    (started / "metrics.csv").unlink()
    text = message([trained["fast"], started])
    assert text.startswith(f"{started} is not a run folder yet: it has no metrics.csv")


def test_fewer_than_two_runs_are_refused(trained):
    text = message([trained["slow"]])
    assert "at least 2 run folders" in text and f"only {trained['slow']} was given" in text
    assert "none was given" in message([])


def test_the_same_folder_twice_is_refused(trained):
    slow = trained["slow"]
    assert "the same run folder is given twice" in message([slow, trained["fast"], slow])
    again = slow.parent / ".." / slow.parent.name / slow.name
    text = message([slow, again])
    assert text.startswith(f"{again}: the same run folder is given twice (as {slow} and {again})")


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("2,abc,0.5,0.8,0.001,1.0,100", "line 3: train_loss is 'abc', not a number"),
        ("2,0.9,0.5", "line 3 has 3 cells where the header has 7"),
    ],
)
def test_a_damaged_metrics_csv_names_the_file_and_line(trained, tmp_path, bad_line, expected):
    damaged = copy_run(trained["slow"], tmp_path / "damaged")
    metrics = damaged / "metrics.csv"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*lines[:2], bad_line]) + "\n")
    assert message([trained["fast"], damaged]) == f"{metrics}: {expected}; the file is damaged."


def test_a_damaged_report_or_recipe_names_the_file(trained, tmp_path):
    bad_report = copy_run(trained["slow"], tmp_path / "bad_report")
    (bad_report / "report.json").write_text('{"accuracy": ')
    assert message([bad_report, trained["fast"]]).startswith(
        f"{bad_report / 'report.json'} is not valid JSON (line 1)"
    )
    bad_recipe = copy_run(trained["slow"], tmp_path / "bad_recipe")
    (bad_recipe / "recipe.yaml").write_text("- just\n- a list\n")
    assert message([trained["fast"], bad_recipe]).startswith(
        f"{bad_recipe / 'recipe.yaml'} does not hold a recipe"
    )


def test_the_command_prints_the_table_and_writes_the_plot(trained, invoke, tmp_path):
    result = invoke("compare", str(trained["slow"]), str(trained["fast"]))
    assert result.exit_code == 0, result.output
    assert "2 recipe keys differ" in result.output and "compare.png" in result.output
    assert Image.open(tmp_path / "compare.png").size[0] > 400
    as_json = invoke("compare", str(trained["slow"]), str(trained["fast"]), "--json", "-o", "c.png")
    assert json.loads(as_json.stdout)["differing_keys"] == ["optimizer.lr", "train.epochs"]
    refused = invoke("compare", str(trained["slow"]))
    assert refused.exit_code == 2 and "at least 2 run folders" in refused.stderr, refused.stderr


def fake_run(folder: Path, recipe: str) -> Path:
    """A finished run's recipe.yaml and metrics.csv (compare reads nothing else)."""
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(recipe)
    (folder / "metrics.csv").write_text(
        "epoch,train_loss,val_loss,val_accuracy,lr,seconds,samples_per_s\n"
        "1,0.5,0.5,0.8,0.01,1,100\n"
    )
    return folder


@pytest.mark.console_width(80)
def test_differing_keys_are_shown_whole_in_a_narrow_terminal(invoke, tmp_path):
    a = fake_run(tmp_path / "a", "model: {name: mlp, hidden: [32]}\ntrain: {ema: {decay: 0.9}}\n")
    b = fake_run(
        tmp_path / "b", "model: {name: mlp, hidden: [32, 32]}\ntrain: {ema: {decay: 0.99}}\n"
    )
    result = invoke("compare", str(a), str(b), "--output", str(tmp_path / "c.png"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("model.hidden" in line and "[32, 32]" in line for line in lines), result.stdout
    assert any("train.ema.decay" in line and "0.99" in line for line in lines), result.stdout
    assert "…" not in result.stdout
