"""Validation and test rows that repeat a training row's features: counted exactly (a missing
cell matches a missing cell), said in the run's header when most of a split does, and always
counted by `check --data`."""

from __future__ import annotations

import csv
import math

import torch
import yaml

from dltrain.data.repeated_rows import repeated_rows, repeated_rows_note

from helpers.cli import words


def test_a_row_repeats_only_when_every_feature_is_the_same_missing_cells_included():
    nan = math.nan
    train = torch.tensor([[1.0, 2.0], [3.0, nan], [5.0, 6.0]], dtype=torch.float64)
    other = torch.tensor(
        [[1.0, 2.0], [3.0, nan], [5.0, 6.000001], [2.0, 1.0], [nan, nan]], dtype=torch.float64
    )
    assert repeated_rows(train, other) == 2


def test_the_note_comes_from_half_of_a_split_on_and_check_counts_any():
    assert repeated_rows_note({"val": [4, 10], "test": [49, 100]}) is None
    note = repeated_rows_note({"val": [4, 10], "test": [50, 100]})
    assert note.startswith("50 of 100 test rows (50%) repeat a training row's features")
    assert "split by group" in note
    said = repeated_rows_note({"val": [4, 10], "test": [0, 100]}, always=True)
    assert said.startswith("4 of 10 val rows (40%) repeat")
    assert repeated_rows_note({"test": [0, 100]}, always=True) is None


def write_visits(path, people: int, years: int) -> None:
    """One row per person and year: the person's features repeat, the visits vary."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["age", "plan", "visits"])
        for year in range(years):
            for person in range(people):
                age, plan = 20 + (person * 7) % 50, ["a", "b", "c"][person % 3]
                writer.writerow([age + person / 100, plan, (person + year) % 5])


def visits_recipe(tmp_path, **data) -> str:
    recipe = tmp_path / "visits.yaml"
    data = {"name": "csv", "label": "visits", "task": "regression", **data}
    recipe.write_text(
        yaml.safe_dump({"data": data, "model": {"name": "mlp"}, "train": {"epochs": 1}})
    )
    return str(recipe)


def test_a_run_on_repeated_rows_says_so_and_one_on_a_split_by_group_does_not(tmp_path, invoke):
    write_visits(tmp_path / "visits.csv", people=40, years=4)
    result = invoke("fit", visits_recipe(tmp_path, path="visits.csv"), "device=cpu")
    assert result.exit_code == 0, result.output
    said = words(result.output)
    assert "of 32 test rows (100%) repeat a training row's features exactly" in said
    assert "give data.train and data.test (and data.val) files split by group" in said
    assert "model: {name: mlp_plr, frequency_scale: 1}" in said

    write_visits(tmp_path / "train.csv", people=30, years=4)
    with open(tmp_path / "train.csv") as f:  # people 30-39, whom training never saw
        rows = list(csv.reader(f))
    write_visits(tmp_path / "all.csv", people=40, years=4)
    with open(tmp_path / "all.csv") as f, open(tmp_path / "test.csv", "w", newline="") as out:
        unseen = [r for r in csv.reader(f) if r[0] == "age" or r not in rows]
        csv.writer(out).writerows(unseen)
    grouped = visits_recipe(tmp_path, train="train.csv", test="test.csv", val_split=0)
    result = invoke("fit", grouped, "device=cpu")
    assert result.exit_code == 0, result.output
    assert "repeat a training row" not in words(result.output)


def test_check_data_counts_the_repeated_rows(tmp_path, invoke):
    write_visits(tmp_path / "visits.csv", people=40, years=4)
    result = invoke("check", visits_recipe(tmp_path, path="visits.csv"), "--data")
    assert result.exit_code == 0, result.output
    said = words(result.stderr)
    assert "of 32 test rows (100%)" in said and "of 13 val rows (100%)" in said
