"""data/table_columns.py: which columns of a table reach the model and as what — empty,
constant, id-like and text-like columns dropped with the reason, data.columns overriding any
of it, and the table of columns shown by `check --data` and the run's header."""

from __future__ import annotations

import csv

import pytest
import yaml

from dltrain.data.csv_files import Dialect
from dltrain.data.table_columns import MIN_ROWS_FOR_ID, MIN_TEXT_VALUES, choose_columns

from helpers.cli import words


def kinds(cells: dict[str, list[str]], chosen: dict | None = None) -> dict[str, str]:
    layout, dropped = choose_columns(cells, Dialect().number, chosen or {})
    found = {column.name: column.kind for column in layout}
    return found | {column.name: f"drop: {column.why.split(':')[0]}" for column in dropped}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["1.5", "2", "", "NA"] * 10, "numeric"),
        (["red", "blue", "", "red"] * 10, "categorical"),
        (["", "NA", "?"] * 10, "drop: empty"),
        (["7"] * 40, "drop: constant"),
        (["7"] * 39 + [""], "numeric"),  # present or missing says something: kept
        ([str(1000 + i) for i in range(MIN_ROWS_FOR_ID)], "drop: id-like"),
        ([str(i) for i in range(MIN_ROWS_FOR_ID - 1)], "numeric"),  # too few rows to tell
        ([str((i * 7) % 40) for i in range(40)], "drop: id-like"),  # 0..39 shuffled
        ([str(3 * i + (i % 3)) for i in range(40)][::-1], "numeric"),  # distinct, no row count
        ([f"{i * 1.37:.2f}" for i in range(40)], "numeric"),  # distinct fractions: a measure
        ([f"user{i}" for i in range(MIN_ROWS_FOR_ID)], "drop: id-like"),
        ([f"a review of {i} words" for i in range(40)], "drop: text-like"),
        ([f"w{i % MIN_TEXT_VALUES}" for i in range(2 * MIN_TEXT_VALUES - 2)], "drop: text-like"),
        ([f"w{i % 40}" for i in range(120)], "categorical"),  # many levels, each repeated
    ],
)
def test_each_column_kind_is_read_at_its_thresholds(values, expected):
    assert kinds({"c": values}) == {"c": expected}


def test_data_columns_overrides_what_is_read():
    cells = {
        "id": [str(i) for i in range(30)],
        "grade": [str(i % 3) for i in range(30)],
        "city": ["Lille", "Paris"] * 15,
    }
    assert kinds(cells) == {"id": "drop: id-like", "grade": "numeric", "city": "categorical"}
    chosen = {"id": "numeric", "grade": "categorical", "city": "drop"}
    assert kinds(cells, chosen) == {
        "id": "numeric",
        "grade": "categorical",
        "city": "drop: data.columns",
    }


def write_homes(path, rows: int = 120) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "city", "size", "notes", "empty", "const", "band"])
        for i in range(rows):
            size = "" if i % 10 == 0 else f"{20 + (i * 37) % 180:.1f}"
            city = ["Lille", "Paris", "Lyon", ""][i % 4]
            band = "high" if city in ("Lille", "Paris") else "low"
            writer.writerow([1000 + i, city, size, f"flat {i} with a view", "", "x", band])


def test_check_data_shows_what_each_column_became_and_trains_nothing(tmp_path, invoke):
    write_homes(tmp_path / "homes.csv")
    recipe = tmp_path / "homes.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "csv", "path": "homes.csv", "label": "band"},
                "model": {"name": "mlp"},
            }
        )
    )
    result = invoke("check", str(recipe), "--data")
    assert result.exit_code == 0, result.output
    said = words(result.stderr)
    assert "2 classes" in said and "loss auto → cross_entropy" in said
    for shown in (
        "id │ dropped │ — │ id-like: a different integer in every row",
        "city │ categorical (3 levels) │",
        "size │ numeric │",
        "notes │ dropped │ — │ text-like",
        "empty │ dropped │ — │ empty: no value in any row",
        "const │ dropped │ — │ constant: 'x' in every row",
    ):
        assert shown in said, shown
    assert not (tmp_path / "runs").exists()


def test_the_run_header_shows_the_columns_and_an_override_changes_them(tmp_path, invoke):
    write_homes(tmp_path / "homes.csv")
    recipe = tmp_path / "homes.yaml"
    data = {
        "name": "csv",
        "path": "homes.csv",
        "label": "band",
        "columns": {"id": "numeric", "size": "drop"},
    }
    recipe.write_text(
        yaml.safe_dump({"data": data, "model": {"name": "mlp"}, "train": {"epochs": 1}})
    )
    result = invoke("fit", str(recipe), "device=cpu")
    assert result.exit_code == 0, result.output
    said = words(result.output)
    assert "id │ numeric │ 0 │ standardised" in said
    assert "size │ dropped │ — │ data.columns" in said


def test_a_table_with_no_column_left_says_which_went_and_why(tmp_path):
    from dltrain.data import csv_tables
    from dltrain.errors import UserError

    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "y"], *[[i, i % 2] for i in range(30)]])
    with pytest.raises(UserError, match=r"no feature column .* is left \(id: id-like"):
        csv_tables.csv(path=str(tmp_path / "t.csv"), label="y")
