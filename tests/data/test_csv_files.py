"""data/csv_files.py: CSV files as spreadsheets export them — the delimiter (`,` `;` tab `|`)
and a decimal comma are read off the file, so the same table in any of these dialects trains
to the same features and targets, predicts the same, and a forced wrong choice is named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from dltrain.config.schema import Recipe
from dltrain.data import csv_tables
from dltrain.data.csv_files import Dialect, sniff
from dltrain.data.prepare import prepare_data
from dltrain.errors import UserError

from helpers.cli import words

DIALECTS = [
    Dialect(",", "."),
    Dialect(";", ","),
    Dialect("\t", "."),
    Dialect("|", ","),
    Dialect(";", "."),
]


def table_rows(n: int = 120) -> list[list[str]]:
    """size (a fraction, some thousands), town (text, one with the delimiter inside, quoted),
    price (the regression target, a fraction)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        size = rng.uniform(20, 2500)
        town = ["Lille", "Paris", "Aix; en, Provence", "Nice"][i % 4]
        rows.append([size, town, 1000.5 + 3 * size])
    return rows


def write(path, rows, dialect: Dialect, crlf: bool = False, bom: bool = False) -> None:
    def cell(value) -> str:
        if isinstance(value, float):
            text = f"{value:.2f}"
            return text.replace(".", ",") if dialect.decimal == "," else text
        return f'"{value}"' if any(c in value for c in ",;|\t") else value

    end = "\r\n" if crlf else "\n"
    lines = [dialect.delimiter.join(["size", "town", "price"])]
    lines += [dialect.delimiter.join(cell(v) for v in row) for row in rows]
    path.write_text(("\ufeff" if bom else "") + end.join(lines) + end, encoding="utf-8")


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.describe())
def test_sniffing_reads_each_dialect_it_is_written_in(tmp_path, dialect):
    write(tmp_path / "t.csv", table_rows(), dialect, crlf=dialect.delimiter == ";", bom=True)
    assert sniff((tmp_path / "t.csv").read_text(encoding="utf-8-sig")) == dialect


def test_a_table_in_any_dialect_trains_on_the_same_features_and_targets(tmp_path):
    prepared = []
    for i, dialect in enumerate(DIALECTS):
        write(tmp_path / f"t{i}.csv", table_rows(), dialect, crlf=i % 2 == 1, bom=i == 3)
        recipe = Recipe.model_validate(
            {
                "name": "t",
                "data": {"name": "csv", "path": str(tmp_path / f"t{i}.csv"), "label": "price"},
                "model": {},
            }
        )
        prepared.append(prepare_data(recipe.data, seed=0))
    first = prepared[0]
    assert first.task == "regression"
    for other in prepared[1:]:
        for name, split in first.splits.items():
            assert torch.equal(split.x, other.splits[name].x), name
            assert torch.equal(split.y, other.splits[name].y), name
        assert other.extra["table"] == first.extra["table"]


def test_a_forced_delimiter_that_is_wrong_is_named_in_the_message(tmp_path):
    write(tmp_path / "t.csv", table_rows(), Dialect(";", ","))
    with pytest.raises(UserError) as info:
        csv_tables.csv(path=str(tmp_path / "t.csv"), label="price", delimiter=",")
    message = words(str(info.value))
    assert "read as comma-separated" in message and "data.delimiter" in message
    forced = csv_tables.csv(path=str(tmp_path / "t.csv"), label="price", delimiter=";", decimal=",")
    assert forced.task == "regression"


def test_a_decimal_comma_file_never_reads_a_dot_as_a_decimal_mark():
    comma = Dialect(";", ",")
    assert comma.number("1.234,5") == 1234.5 and comma.number("2 500,25") == 2500.25
    assert comma.number("-0,5") == -0.5 and comma.number("7") == 7.0
    assert comma.number("3.5") is None  # not this file's way of writing numbers: reported
    assert Dialect().number("3,5") is None and Dialect().number("1e3") == 1000.0


def test_predict_reads_its_input_in_its_own_dialect(tmp_path, invoke):
    write(tmp_path / "train.csv", table_rows(), Dialect(",", "."))
    recipe = tmp_path / "prices.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "csv", "path": "train.csv", "label": "price"},
                "model": {"name": "mlp"},
                "train": {"epochs": 2},
                "device": "cpu",
            }
        )
    )
    assert invoke("fit", str(recipe), "-q").exit_code == 0
    rows = table_rows(8)
    outputs = []
    for i, dialect in enumerate([Dialect(",", "."), Dialect(";", ","), Dialect("\t", ".")]):
        write(tmp_path / f"in{i}.csv", rows, dialect)
        result = invoke("predict", "runs/prices/checkpoints/best.pt", f"in{i}.csv", "--json")
        assert result.exit_code == 0, result.output
        outputs.append([row["prediction"] for row in json.loads(result.stdout)])
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 8
