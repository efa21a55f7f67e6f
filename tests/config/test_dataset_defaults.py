"""config/dataset_defaults.py: a dataset's own defaults fill a recipe only where it says
nothing — each group whole or not at all — and show in the resolved recipe."""

from __future__ import annotations

from dltrain.config.dataset_defaults import RecipeDefault, with_dataset_defaults
from dltrain.config.schema import resolve

GROUPS = (
    RecipeDefault({"data.batch_size": 256}, unless=("data.global_batch_size",)),
    RecipeDefault({"train.epochs": 50, "train.early_stopping": {"patience": 8}}),
)


def test_each_group_fills_only_a_recipe_that_gives_none_of_its_keys():
    bare = {"data": {"name": "csv"}}
    assert with_dataset_defaults(bare, GROUPS) == {
        "data": {"name": "csv", "batch_size": 256},
        "train": {"epochs": 50, "early_stopping": {"patience": 8}},
    }
    assert bare == {"data": {"name": "csv"}}  # the recipe given is left as it was
    epochs_given = {"data": {"name": "csv"}, "train": {"epochs": 3}}
    assert with_dataset_defaults(epochs_given, GROUPS)["train"] == {"epochs": 3}  # no stopping
    global_batch = {"data": {"name": "csv", "global_batch_size": 128}}
    assert "batch_size" not in with_dataset_defaults(global_batch, GROUPS)["data"]
    null_train = {"data": {"name": "csv"}, "train": None}
    assert with_dataset_defaults(null_train, GROUPS)["train"]["epochs"] == 50


def test_a_table_recipe_resolves_with_the_table_defaults_and_other_data_without(tmp_path):
    table = resolve(
        {"name": "t", "data": {"name": "csv", "path": str(tmp_path / "t.csv")}, "model": "mlp"}
    )
    assert (table.data.batch_size, table.train.epochs) == ("auto", 50)
    assert table.train.early_stopping.patience == 4
    told = resolve(
        {
            "name": "t",
            "data": {"name": "csv", "path": str(tmp_path / "t.csv")},
            "model": "mlp",
            "train": {"epochs": 4},
        }
    )  # its own epochs: the general batch size those epochs were meant for, no stopping
    assert (told.data.batch_size, told.train.epochs, told.train.early_stopping) == (64, 4, None)
    digits = resolve({"name": "d", "data": {"name": "digits"}, "model": "mlp"})
    assert (digits.data.batch_size, digits.train.epochs, digits.train.early_stopping) == (
        64,
        10,
        None,
    )
