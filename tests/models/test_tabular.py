"""models/tabular.py: `mlp_plr` and `ft_transformer` read a table column by column — the
tokens follow the table encoding (a one-hot group per categorical column, a token per value
and per missing indicator) — and learn a mixed table through the CLI, checkpoint and all."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from dltrain.data.table_encoding import ColumnEncoding, TableEncoding
from dltrain.models.tabular import (
    ColumnTokens,
    PeriodicEmbeddings,
    PiecewiseLinearEmbeddings,
    feature_groups,
)


def test_groups_follow_the_table_encoding():
    encoding = TableEncoding(
        [
            ColumnEncoding("size", "numeric", 3.0, indicator=True),
            ColumnEncoding("city", "categorical", "A", indicator=False, categories=["A", "B"]),
            ColumnEncoding("rooms", "numeric", 2.0),
        ]
    )
    groups = feature_groups({"table": encoding.to_dict()}, encoding.width)
    names = encoding.feature_names()
    assert [(kind, names[span]) for kind, span in groups] == [
        ("numeric", ["size"]),
        ("numeric", ["size_missing"]),
        ("categorical", ["city=<unknown>", "city=A", "city=B"]),
        ("numeric", ["rooms"]),
    ]
    assert feature_groups(None, 3) == [("numeric", slice(i, i + 1)) for i in range(3)]


def test_a_token_per_column_in_the_columns_order():
    groups = [("numeric", slice(0, 1)), ("categorical", slice(1, 4)), ("numeric", slice(4, 5))]
    tokens = ColumnTokens(groups, 8, lambda n: PeriodicEmbeddings(n, 8, 4, 0.1))
    x = torch.tensor([[0.5, 0.0, 1.0, 0.0, -1.0], [0.5, 0.0, 0.0, 1.0, -1.0]])
    out = tokens(x)
    assert out.shape == (2, 3, 8)
    assert torch.equal(out[0, 0], out[1, 0]) and torch.equal(out[0, 2], out[1, 2])  # same values
    assert not torch.equal(out[0, 1], out[1, 1])  # another category, another embedding
    periodic = PeriodicEmbeddings(2, 8, 4, 0.1)
    assert periodic(torch.zeros(5, 2)).shape == (5, 2, 8)


def _mixed_table(path, rows: int = 400) -> None:
    """city (text, some blank), size (some NA), grade (ints): 'high' when the city is northern
    or the size is large."""
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["city", "size", "grade", "label"])
        for _ in range(rows):
            city, size = rng.choice(["Lille", "Paris", "Lyon", "Nice"]), rng.uniform(20, 80)
            label = "high" if city in ("Lille", "Paris") or size > 60 else "low"
            shown = "NA" if rng.random() < 0.1 else f"{size:.1f}"
            writer.writerow(
                [city if rng.random() > 0.1 else "", shown, int(rng.integers(1, 4)), label]
            )


@pytest.mark.parametrize("model", ["mlp_plr", "mlp_ple", "ft_transformer"])
def test_each_table_model_learns_a_mixed_table_and_its_checkpoint_serves(tmp_path, invoke, model):
    _mixed_table(tmp_path / "homes.csv")
    recipe = tmp_path / "homes.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "csv", "path": "homes.csv", "columns": {"grade": "categorical"}},
                "model": {"name": model},
                "optimizer": {"name": "adamw", "lr": 0.003},
                "train": {"epochs": 12},
                "device": "cpu",
            }
        )
    )
    fitted = invoke("fit", str(recipe), "-q")
    assert fitted.exit_code == 0, fitted.output
    report = json.loads((tmp_path / "runs/homes/report.json").read_text())
    assert report["accuracy"] > 0.85, report["accuracy"]
    evaluated = invoke("eval", "runs/homes/checkpoints/best.pt", "--json")
    assert (
        evaluated.exit_code == 0 and json.loads(evaluated.stdout)["accuracy"] == report["accuracy"]
    )
    (tmp_path / "new.csv").write_text("city,size,grade\nParis,25,2\nNice,79,1\nNice,21,3\n")
    predicted = invoke("predict", "runs/homes/checkpoints/best.pt", "new.csv", "--json")
    assert predicted.exit_code == 0, predicted.output
    classes = [row["predictions"][0]["class"] for row in json.loads(predicted.stdout)]
    assert classes == ["high", "high", "low"]


def test_piecewise_linear_bins_are_the_training_quantiles_and_encode_by_position():
    """Edges: the quantiles of the values fitted on (a constant column still gets ordered,
    non-empty bins); a value fills every bin below it, its own bin by its position in it."""
    embeddings = PiecewiseLinearEmbeddings(2, 4, bins=4)
    skewed = torch.arange(101.0) ** 2  # quantiles 0, 625, 2500, 5625, 10000: not even bins
    values = torch.stack([skewed, torch.full((101,), 3.0)], dim=1)
    embeddings.fit(values)
    torch.testing.assert_close(embeddings.edges[0], torch.tensor([0.0, 625, 2500, 5625, 10000]))
    assert (torch.diff(embeddings.edges[1]) > 0).all()  # the constant column
    low, high = embeddings.edges[0, :-1], embeddings.edges[0, 1:]
    encoded = ((torch.tensor([[-5.0], [1000.0], [50000.0]]) - low) / (high - low)).clamp(0, 1)
    torch.testing.assert_close(encoded[0], torch.zeros(4))
    torch.testing.assert_close(encoded[1], torch.tensor([1.0, 0.2, 0.0, 0.0]))
    torch.testing.assert_close(encoded[2], torch.ones(4))
    assert embeddings(values[:3]).shape == (3, 2, 4)


def test_mlp_ple_bins_come_from_the_training_rows_and_travel_in_the_checkpoint(tmp_path, invoke):
    _mixed_table(tmp_path / "homes.csv")
    recipe = {
        "data": {"name": "csv", "path": "homes.csv", "columns": {"grade": "categorical"}},
        "model": {"name": "mlp_ple"},
        "train": {"epochs": 2},
        "device": "cpu",
    }
    (tmp_path / "homes.yaml").write_text(yaml.safe_dump(recipe))
    assert invoke("fit", "homes.yaml", "-q").exit_code == 0
    saved = torch.load(tmp_path / "runs/homes/checkpoints/last.pt", weights_only=True)
    edges = saved["model"]["0.periodic.edges"]  # size and the missing-value indicators
    assert edges.shape == (3, 33)
    assert not torch.equal(edges[0], torch.linspace(-2, 2, 33))  # fitted, not the initial bins
