"""The learning-rate range test (dltrain/experiments/lr_find.py): the ramp, early stopping
on divergence, the suggestion (and that it trains well), every kind of input, the files it
writes and the ones it must not."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dltrain.config.loading import load_recipe, resolve_with_context
from dltrain.errors import UserError
from dltrain.experiments.lr_find import LrFindResult, find_lr, write_lr_find
from dltrain.runs.folder import RunFolder
from dltrain.training.loop import fit

from helpers.cli import REPO
from helpers.training import one_torch_thread, quiet

QUICKSTART = REPO / "recipes/quickstart.yaml"
ADDING = REPO / "recipes/adding_lstm.yaml"
JSON_KEYS = {"suggested_lr", "lrs", "losses", "raw_losses", "start_lr", "end_lr", "steps"}


def _quickstart(output: Path, *overrides: str):
    return load_recipe(QUICKSTART, ["device=cpu", f"output={output}", *overrides])


def _files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> tuple[LrFindResult, Path, list[tuple]]:
    """The default range test (1e-7 → 10, 100 steps) on the quickstart: (result, the recipe's
    output folder, the progress calls)."""
    output = tmp_path_factory.mktemp("quickstart-output")
    calls: list[tuple] = []
    with one_torch_thread():  # module fixtures run before the autouse one
        result = find_lr(_quickstart(output), progress=lambda *a: calls.append(a))
    return result, output, calls


# -- the ramp, the smoothing, the suggestion ---------------------------------------------------


def test_the_ramp_is_exponential_with_one_lr_per_step(quickstart):
    result, _, calls = quickstart
    assert not result.stopped_early  # adamw on the digits saturates at ln(10): no blow-up
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses) == 100
    assert result.lrs[0] == pytest.approx(1e-7) and result.lrs[-1] == pytest.approx(10.0)
    ratios = np.diff(np.log(result.lrs))
    assert ratios == pytest.approx(np.full(99, math.log(1e8) / 99), rel=1e-9)
    # progress was told of every step: (step, steps, lr, raw loss)
    assert [c[0] for c in calls] == list(range(1, 101)) and {c[1] for c in calls} == {100}
    assert [c[2] for c in calls] == result.lrs and [c[3] for c in calls] == result.raw_losses


def test_the_smoothed_loss_is_the_bias_corrected_running_average(quickstart):
    result, _, _ = quickstart
    average, expected = 0.0, []
    for i, loss in enumerate(result.raw_losses):
        average = 0.95 * average + 0.05 * loss
        expected.append(average / (1 - 0.95 ** (i + 1)))
    assert result.losses == pytest.approx(expected, rel=1e-12)
    assert result.losses[0] == pytest.approx(result.raw_losses[0])  # no bias toward 0
    assert all(math.isfinite(v) for v in result.raw_losses)


def test_the_suggestion_lies_strictly_inside_on_the_way_down(quickstart):
    result, _, _ = quickstart
    lrs, losses = result.lrs, result.losses
    assert lrs[0] < result.suggested_lr < lrs[-1]
    assert result.suggested_lr == lrs[result.suggested_index]
    assert 0 < result.suggested_index < len(lrs) - 1
    # below the lr of the lowest smoothed loss, where the curve has started to fall
    lowest = int(np.argmin(losses))
    assert result.suggested_lr < lrs[lowest]
    assert losses[lowest] < losses[result.suggested_index] < max(losses[:10])


def test_a_large_end_lr_stops_early_on_divergence(tmp_path):
    # plain SGD up to lr 10⁴ blows the loss up; adamw would only saturate
    recipe = _quickstart(tmp_path, "optimizer.name=sgd")
    result = find_lr(recipe, start_lr=1e-4, end_lr=1e4, steps=60)
    assert result.stopped_early and 20 < len(result.lrs) < 60
    best = min(result.losses[:-1])
    assert result.losses[-1] > 4.0 * best  # the point that diverged is kept, and ends it
    assert max(result.losses[:-1]) <= 4.0 * min(result.losses[:-2])
    assert result.lrs[0] < result.suggested_lr < result.lrs[-1]
    assert result.suggested_index < len(result.lrs) - 2


def test_a_loss_that_diverges_at_once_is_refused_saying_what_to_change(tmp_path):
    recipe = _quickstart(tmp_path, "optimizer.name=sgd")
    with pytest.raises(UserError, match="start_lr") as error:
        find_lr(recipe, start_lr=1e3, end_lr=1e6, steps=40)
    message = str(error.value)
    assert "diverged at step" in message and "steps" in message and "end_lr" in message


@pytest.mark.parametrize(
    "arguments, problem",
    [
        ({"start_lr": 0.0}, "start_lr"),
        ({"start_lr": 1.0, "end_lr": 0.1}, "end_lr"),
        ({"steps": 3}, "steps"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"diverge": 1.0}, "diverge"),
    ],
)
def test_arguments_out_of_range_are_refused_before_any_work(tmp_path, arguments, problem):
    recipe = _quickstart(tmp_path)  # checked before the data is read
    with pytest.raises(UserError, match=problem):
        find_lr(recipe, **arguments)


# -- the outcome: the suggested lr trains well --------------------------------------------------


def test_the_suggested_lr_trains_the_quickstart_well(quickstart, tmp_path):
    # 5 epochs (of the recipe's 30, cosine schedule) at the suggested lr. The recipe's own lr
    # (0.002) reaches 0.89 in 5 epochs; 0.03 reaches 0.50, and 1e-4 or 0.1 about 0.1: a
    # suggestion too low or at the cliff fails here.
    result, _, _ = quickstart
    recipe = _quickstart(tmp_path, "train.epochs=5", f"optimizer.lr={result.suggested_lr!r}")
    report = fit(recipe, RunFolder.for_recipe(recipe), quiet())
    assert report["accuracy"] >= 0.9, (result.suggested_lr, report["accuracy"])


# -- every kind of input and task ---------------------------------------------------------------


def test_a_sequence_regression_recipe_gives_a_finite_suggestion(tmp_path):
    small = [
        "device=cpu",
        f"output={tmp_path / 'runs'}",
        "data.length=20",
        "data.train_size=512",
        "data.test_size=64",
        "data.batch_size=32",
        "model.hidden_size=16",
    ]
    result = find_lr(load_recipe(ADDING, small), steps=40)
    assert result.name == "adding_lstm" and len(result.lrs) <= 40
    assert math.isfinite(result.suggested_lr)
    assert result.lrs[0] < result.suggested_lr < result.lrs[-1]
    assert all(math.isfinite(v) for v in result.losses)
    assert _files_under(tmp_path / "runs") == []


def test_a_text_csv_recipe_gives_a_finite_suggestion(tmp_path):
    rng = np.random.default_rng(0)
    spam = ["win a free prize now", "call now to claim cash", "free entry txt win"]
    ham = ["see you at lunch", "are we still on for tonight", "ok thanks see you later"]
    lines = ["text,label"]
    for i in range(200):
        texts, label = (spam, "spam") if i % 2 else (ham, "ham")
        lines.append(f'"{texts[rng.integers(len(texts))]}",{label}')
    csv = tmp_path / "sms.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = {
        "name": "sms",
        "seed": 0,
        "device": "cpu",
        "output": str(tmp_path / "runs"),
        "data": {"name": "text_csv", "path": str(csv), "batch_size": 16},
        "model": {"name": "lstm", "embedding_size": 8, "hidden_size": 16},
        "optimizer": {"name": "adam"},
    }
    recipe = resolve_with_context(raw, [], "test recipe")
    result = find_lr(recipe, start_lr=1e-5, end_lr=10.0, steps=50)
    assert math.isfinite(result.suggested_lr)
    assert result.lrs[0] < result.suggested_lr < result.lrs[-1]
    assert result.losses[result.suggested_index] < result.losses[0]  # it learned something
    assert _files_under(tmp_path / "runs") == []


# -- files: what it writes, and what it must not ----------------------------------------------


def test_write_lr_find_writes_the_json_and_the_plot(quickstart, tmp_path):
    result, _, _ = quickstart
    json_path, png_path = write_lr_find(result, tmp_path / "out")
    assert (json_path, png_path) == (tmp_path / "out/lr_find.json", tmp_path / "out/lr_find.png")
    data = json.loads(json_path.read_text())
    assert data.keys() >= JSON_KEYS
    assert data["suggested_lr"] == result.suggested_lr
    assert data["lrs"] == result.lrs and data["losses"] == result.losses
    assert data["raw_losses"] == result.raw_losses
    assert (data["start_lr"], data["end_lr"], data["steps"]) == (1e-7, 10.0, 100)
    assert png_path.stat().st_size > 20_000
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 500
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 50  # a drawing, not a blank canvas
    # atomic writes leave no temp files behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lr_find.json", "lr_find.png"]


def test_no_run_folder_is_created(quickstart):
    _, output, _ = quickstart
    assert _files_under(output) == []


def test_the_command_writes_the_curve_and_prints_the_override(invoke, tmp_path):
    result = invoke(
        "lr-find", str(QUICKSTART), "device=cpu", f"output={tmp_path / 'runs'}", "--steps", "40"
    )
    assert result.exit_code == 0, result.output
    suggested = json.loads((tmp_path / "lr_find.json").read_text())["suggested_lr"]
    assert f"optimizer.lr={suggested:.3g}" in result.output
    assert (tmp_path / "lr_find.png").stat().st_size > 5000
    assert not (tmp_path / "runs").exists()  # no run folder behind
