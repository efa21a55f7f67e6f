"""training/build.py: `data.batch_size: auto` becomes a number from the training rows each
process reads — in the run, in its header and in its checkpoint — before any step is taken."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dltrain.config.schema import resolve
from dltrain.training.build import per_process_batch_size, with_batch_size_resolved

from helpers.cli import words


def _table(path: Path, rows: int) -> Path:
    """A learnable regression table: y = 2·a − b + noise."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=rows), rng.normal(size=rows)
    y = 2 * a - b + 0.1 * rng.normal(size=rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "y"])
        writer.writerows(zip(a.round(4), b.round(4), y.round(4), strict=True))
    return path


def _recipe(folder: Path, rows: int) -> Path:
    _table(folder / "t.csv", rows)
    recipe = {
        "name": "t",
        "output": "runs",
        "device": "cpu",
        "seed": 0,
        # epochs of its own: the table defaults' group is not applied, auto is asked for
        "data": {"name": "csv", "train": "t.csv", "label": "y", "batch_size": "auto"},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"epochs": 1, "threads": 1},
    }
    path = folder / "t.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    ("rows", "batch"),
    [(3_000, 128), (13_000, 1024)],  # 2,700 and 11,700 training rows after val_split 0.1
)
def test_auto_batch_size_follows_the_training_rows_and_is_what_the_run_used(
    tmp_path, invoke, rows, batch
):
    result = invoke("fit", _recipe(tmp_path, rows))
    assert result.exit_code == 0, result.output
    assert f"· batch {batch} ·" in result.output
    checkpoint = torch.load(tmp_path / "runs/t/checkpoints/last.pt", weights_only=False)
    assert checkpoint["recipe"]["data"]["batch_size"] == batch  # eval and resume read this
    train_rows = rows - rows // 10
    assert checkpoint["step"] == train_rows // batch  # full batches only (drop_last)
    assert invoke("eval", tmp_path / "runs/t/checkpoints/best.pt").exit_code == 0
    # the run folder keeps the recipe as given: --resume auto finds it, resolves auto the same
    resumed = invoke("fit", _recipe(tmp_path, rows), "train.epochs=2", "--resume", "auto")
    assert resumed.exit_code == 0 and "resumed from" in resumed.output, resumed.output
    checkpoint = torch.load(tmp_path / "runs/t/checkpoints/last.pt", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["step"]) == (2, 2 * (train_rows // batch))


def test_auto_is_resolved_per_process_and_a_given_size_is_kept(tmp_path):
    def recipe(batch_size):
        data = {"name": "csv", "path": str(tmp_path / "t.csv"), "batch_size": batch_size}
        return resolve({"name": "t", "data": data, "model": "mlp"})

    auto = recipe("auto")
    assert with_batch_size_resolved(auto, 0, 1).data.batch_size == 32  # rows not known
    assert with_batch_size_resolved(auto, 300, 1).data.batch_size == 32  # never below 32
    assert with_batch_size_resolved(auto, 20, 1).data.batch_size == 20  # nor past the rows
    assert with_batch_size_resolved(auto, 2_700, 1).data.batch_size == 128  # 169 a sixteenth
    assert with_batch_size_resolved(auto, 6_000, 1).data.batch_size == 512  # 375
    assert with_batch_size_resolved(auto, 12_000, 2).data.batch_size == 512  # 6,000 a process
    assert with_batch_size_resolved(auto, 12_000, 1).data.batch_size == 1024
    assert with_batch_size_resolved(auto, 10**7, 1).data.batch_size == 1024  # never above
    assert auto.data.batch_size == "auto"  # the recipe given is left as it was
    assert with_batch_size_resolved(recipe(48), 10**6, 1).data.batch_size == 48
    # before the data is read (fit --smoke's one batch): the smallest auto can become
    assert per_process_batch_size(auto.data, 1, 1) == 32


def test_check_says_what_auto_will_become_and_with_the_data_what_it_became(tmp_path, invoke):
    recipe = _recipe(tmp_path, 13_000)
    plan = words(invoke("check", recipe).output)
    assert "data.batch_size: auto → about 16 steps an epoch" in plan
    assert "a power of two from 32 to 1,024 a process" in plan
    read = invoke("check", recipe, "--data")
    assert "batch auto → 1024 (in one process)" in words(read.output)
