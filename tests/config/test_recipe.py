"""Recipes: loading, defaults, KEY=VALUE overrides, and errors that say where and how to fix.

Every error here must be a UserError (exit code 2) whose message names the key path, and the
file and line it came from (or the override to blame). Nothing here reads data or trains.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from dltrain.config.loading import load_recipe
from dltrain.config.overrides import apply_overrides
from dltrain.config.schema import resolve, to_yaml
from dltrain.errors import UserError

from helpers.cli import REPO

RECIPES = REPO / "recipes"
QUICKSTART = RECIPES / "quickstart.yaml"
MINIMAL = "data:\n  name: digits\nmodel:\n  name: mlp\n"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def user_error(path: Path, overrides: list[str] = ()) -> str:
    """Load a recipe that must fail; return the message after checking the exit code."""
    with pytest.raises(UserError) as info:
        load_recipe(path, list(overrides))
    assert info.value.exit_code == 2
    return str(info.value)


# -- loading and defaults -----------------------------------------------------------------------


def test_quickstart_resolves_with_every_default_filled():
    recipe = load_recipe(QUICKSTART)

    assert recipe.name == "quickstart"
    assert recipe.train.epochs == 30
    # The file's own values survive...
    assert recipe.data.batch_size == 32
    assert recipe.model["dropout"] == 0.2
    assert recipe.optimizer["name"] == "adamw"
    assert recipe.optimizer["lr"] == 0.002
    # ...and the components' defaults are filled in from their signatures.
    assert recipe.optimizer["betas"] == [0.9, 0.999]
    assert recipe.optimizer["eps"] == 1e-8
    assert recipe.model["padding"] == "auto"
    assert recipe.scheduler == {"name": "cosine", "min_lr": 0.0, "warmup_epochs": 0.0}
    assert recipe.loss["label_smoothing"] == 0.0
    # ...as are the fixed sections' defaults.
    assert recipe.data.loader == "auto"
    assert recipe.data.augment == []
    assert recipe.data.normalize == "auto"
    assert recipe.train.precision == "auto"
    assert recipe.train.accumulate == 1


def test_minimal_recipe_gets_contract_defaults_and_file_stem_as_name(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL, name="my-run.yaml"))

    assert recipe.name == "my-run"
    assert (recipe.seed, recipe.device, recipe.output) == (0, "auto", "runs")
    assert recipe.loss["name"] == "auto"  # the task's own: cross_entropy for digits
    assert recipe.optimizer["name"] == "adam"
    assert recipe.optimizer["lr"] == 0.001
    assert recipe.scheduler is None
    assert recipe.train.epochs == 10
    assert recipe.data.val_split == 0.1
    assert recipe.model["hidden"] == [256, 128]


def test_an_explicit_name_wins_over_the_file_stem(tmp_path):
    recipe = load_recipe(write(tmp_path, "name: chosen\n" + MINIMAL, name="stem.yaml"))
    assert recipe.name == "chosen"


def test_component_shorthand_can_be_overridden_inside(tmp_path):
    """`model: mlp` means `model: {name: mlp}`, so `model.hidden=[64]` must reach into it."""
    path = write(tmp_path, "data: {name: digits}\nmodel: mlp\nscheduler: cosine\n")

    recipe = load_recipe(path, ["model.hidden=[64]", "scheduler.warmup_epochs=2"])

    assert recipe.model["name"] == "mlp"
    assert recipe.model["hidden"] == [64]
    assert recipe.scheduler["name"] == "cosine"
    assert recipe.scheduler["warmup_epochs"] == 2.0


# -- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "read", "expected"),
    [
        ("train.epochs=3", lambda r: r.train.epochs, 3),
        ("data.augment=[hflip]", lambda r: r.data.augment, [{"hflip": {"p": 0.5}}]),
        (
            "data.augment=[hflip, {random_crop: {padding: 4}}]",
            lambda r: [next(iter(a)) for a in r.data.augment],
            ["hflip", "random_crop"],
        ),
        ("scheduler=null", lambda r: r.scheduler, None),
        ("optimizer.lr=1e-2", lambda r: r.optimizer["lr"], 0.01),  # YAML reads 1e-2 as text
        ("train.compile=true", lambda r: r.train.compile, True),
        ("train.compile=reduce-overhead", lambda r: r.train.compile, "reduce-overhead"),
        ("train.grad_clip=1.5", lambda r: r.train.grad_clip, 1.5),
        ("data.val_split=0", lambda r: r.data.val_split, 0.0),
        ("seed=7", lambda r: r.seed, 7),
        ("name=other-run", lambda r: r.name, "other-run"),
        ("output=/tmp/elsewhere", lambda r: r.output, "/tmp/elsewhere"),
    ],
)
def test_override_values_are_parsed_as_yaml(override, read, expected):
    recipe = load_recipe(QUICKSTART, [override])
    value = read(recipe)
    assert value == expected
    assert type(value) is type(expected)


def test_override_switches_a_component_and_drops_the_old_ones_arguments():
    recipe = load_recipe(QUICKSTART, ["model.name=resnet18"])
    assert recipe.model == {"name": "resnet18", "zero_init_residual": False}


def test_override_replaces_a_whole_section():
    recipe = load_recipe(QUICKSTART, ["optimizer={name: sgd, lr: 0.1}"])
    assert recipe.optimizer["name"] == "sgd"
    assert recipe.optimizer["lr"] == 0.1
    assert recipe.optimizer["momentum"] == 0.0
    assert "betas" not in recipe.optimizer  # nothing of the file's adamw section is left


def test_override_creates_a_section_that_was_null():
    recipe = load_recipe(
        QUICKSTART, ["scheduler=null", "scheduler.name=step", "scheduler.step_size=5"]
    )
    assert recipe.scheduler == {"name": "step", "step_size": 5, "gamma": 0.1, "warmup_epochs": 0.0}


def test_created_section_with_a_missing_required_argument_blames_the_override_that_named_it():
    message = user_error(QUICKSTART, ["scheduler=null", "scheduler.name=step"])
    assert "override 'scheduler.name=step'" in message
    assert "scheduler.step_size" in message
    assert "missing" in message


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        # The argument's own override, not the later change of the optimizer's name.
        (["optimizer.lr=0", "optimizer.name=sgd"], "optimizer.lr=0"),
        # The name set last (after the section was replaced) made step_size required.
        (
            ["scheduler.name=multistep", "scheduler={name: cosine}", "scheduler.name=step"],
            "scheduler.name=step",
        ),
        # An override that creates an unknown section is to blame for it.
        (["optimzer.lr=0.1"], "optimzer.lr=0.1"),
    ],
)
def test_the_override_to_blame_is_named(overrides, culprit):
    message = user_error(QUICKSTART, overrides)
    assert message.startswith(f"override '{culprit}':")


def test_the_last_override_of_a_key_wins():
    recipe = load_recipe(QUICKSTART, ["train.epochs=3", "train.epochs=5"])
    assert recipe.train.epochs == 5


def test_overrides_do_not_modify_the_mapping_they_are_given():
    raw = {"data": {"name": "digits"}, "model": {"name": "mlp"}}
    result, applied = apply_overrides(raw, ["data.batch_size=8", "model.hidden=[]"])
    assert raw == {"data": {"name": "digits"}, "model": {"name": "mlp"}}
    assert result["data"]["batch_size"] == 8
    assert set(applied) == {"data.batch_size", "model.hidden"}


@pytest.mark.parametrize("override", ["epochs", "=3", "a..b=1", ".a=1", "a.=1", "train epochs=3"])
def test_malformed_override_is_a_user_error_naming_it(override):
    message = user_error(QUICKSTART, [override])
    assert f"override '{override}'" in message
    assert "KEY=VALUE" in message


def test_override_into_a_plain_value_names_the_override_and_the_value():
    message = user_error(QUICKSTART, ["train.epochs.x=1"])
    assert "override 'train.epochs.x=1'" in message
    assert "train.epochs" in message
    assert "not a section" in message


# -- errors name the key path and suggest the fix ---------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lrr=0.1", ["optimizer.lrr", "unknown key", "Did you mean 'lr'"]),
        ("model.name=resnet81", ["model.name", "resnet81", "Did you mean 'resnet18'"]),
        ("optimizer.lr=0", ["optimizer.lr", "greater than 0"]),
        ("optimizer.lr=-1", ["optimizer.lr", "greater than 0"]),
        ("train.epochs=0", ["train.epochs", "greater than or equal to 1"]),
        ("data.val_split=1.0", ["data.val_split", "less than 1"]),
        ("data.val_split=-0.1", ["data.val_split", "greater than or equal to 0"]),
        ("data.batch_size=abc", ["data.batch_size", "integer", "'abc'"]),
        ("epochs=3", ["epochs", "Did you mean 'train.epochs'"]),
        ("batch_size=3", ["batch_size", "Did you mean 'data.batch_size'"]),
        ("optimzer.lr=0.1", ["optimzer", "Did you mean 'optimizer'"]),
        ("data.batchsize=32", ["data.batchsize", "Did you mean 'batch_size'"]),
        ("data.name=no_such_set", ["data.name", "unknown dataset 'no_such_set'"]),
        ("train.precision=fp64", ["train.precision", "'bf16'", "'fp64'"]),
        ("data.loader=fast", ["data.loader", "'resident'"]),
        ("data.augment=[nope]", ["data.augment[0]", "unknown augmentation 'nope'", "hflip"]),
        ("optimizer.betas=[0.9, 1.5]", ["optimizer.betas[1]", "less than 1"]),
        ("optimizer.betas=[0.9]", ["optimizer.betas[1]", "item is missing"]),
        ("device=gpu", ["device", "invalid device 'gpu'", "Did you mean 'cuda'"]),
        ("device=cuda:x", ["device", "cuda:N"]),
        ("model.num_classes=3", ["model.num_classes", "supplied by dltrain"]),
        ("optimizer.params=[]", ["optimizer.params", "supplied by dltrain"]),
        ("data.seed=1", ["data.seed", "supplied by dltrain"]),
    ],
)
def test_bad_override_names_the_key_path_and_the_fix(override, expected):
    message = user_error(QUICKSTART, [override])
    assert f"override '{override}'" in message
    for text in expected:
        assert text in message


def test_error_in_a_file_names_the_file_and_the_line_of_the_key(tmp_path):
    path = write(
        tmp_path,
        """\
        # a recipe with a typo on line 9
        name: typo
        data:
          name: digits
        model:
          name: mlp
        optimizer:
          name: adam
          lrr: 0.1
        """,
    )
    message = user_error(path, ["train.epochs=2"])  # an unrelated override is not blamed
    assert f"{path}:9:" in message
    assert "optimizer.lrr" in message
    assert "Did you mean 'lr'" in message
    assert "override" not in message


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (MINIMAL + "train:\n  epochs: 0\n", 6, "train.epochs"),
        (MINIMAL + "epochs: 3\n", 5, "Did you mean 'train.epochs'"),
        ("data:\n  name: digits\n  augment: [hflip, nope]\nmodel: mlp\n", 3, "data.augment[1]"),
        ("data: {name: digits}\nmodel:\n  name: resnet81\n", 3, "Did you mean 'resnet18'"),
        ("data:\n  name: digits\n  batchsize: 3\nmodel: mlp\n", 3, "Did you mean 'batch_size'"),
        ("data: {name: nope}\nmodel: mlp\n", 1, "unknown dataset 'nope'"),
        ("device: gpu\n" + MINIMAL, 1, "Did you mean 'cuda'"),
        ("data: {name: digits}\nmodel:\n  name: mlp\n  num_classes: 3\n", 4, "supplied by dltrain"),
    ],
)
def test_file_errors_point_at_the_offending_line(tmp_path, text, line, expected):
    path = write(tmp_path, text)
    message = user_error(path)
    assert f"{path}:{line}:" in message
    assert expected in message


@pytest.mark.parametrize(
    ("text", "where", "expected"),
    [
        ("name: x\ndata:\n  name: digits\n  batch_size: 32: 64\nmodel: mlp\n", ":4:17:", "YAML"),
        ("name: x\ndata:\n  name: digits\n\tbatch_size: 32\nmodel: mlp\n", ":4:1:", "'\\t'"),
        (MINIMAL + "optimizer: {name: adam}\noptimizer: {name: sgd}\n", ":6:1:", "duplicate key"),
    ],
    ids=["mapping-in-value", "tab", "duplicate-key"],
)
def test_malformed_yaml_names_file_line_and_column(tmp_path, text, where, expected):
    path = write(tmp_path, text)
    message = user_error(path)
    assert f"{path}{where}" in message
    assert expected in message


def test_duplicate_key_message_says_where_it_was_first_set(tmp_path):
    path = write(tmp_path, "data: {name: digits}\nmodel: {name: mlp, dropout: 0.1, dropout: 0.2}\n")
    message = user_error(path)
    assert f"{path}:2:" in message
    assert "duplicate key 'dropout' (first set on line 2)" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("- data\n- model\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
    ],
    ids=["empty", "comment-only", "list", "scalar"],
)
def test_a_file_that_is_not_a_recipe_mapping_is_refused(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = user_error(path)
    assert str(path) in message
    assert expected in message


def test_missing_file_names_the_path(tmp_path):
    message = user_error(tmp_path / "nope.yaml")
    assert "not found" in message
    assert "nope.yaml" in message


@pytest.mark.parametrize("kind", ["directory", "binary"])
def test_unreadable_file_is_a_user_error(tmp_path, kind):
    path = tmp_path / "recipe.yaml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    message = user_error(path)
    assert str(path) in message


# -- the resolved recipe ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides", [[], ["data.augment=[hflip, {random_crop: {padding: 4}}]", "scheduler=null"]]
)
def test_to_yaml_round_trips(overrides):
    recipe = load_recipe(QUICKSTART, overrides)
    text = to_yaml(recipe)
    assert resolve(yaml.safe_load(text)) == recipe
    # Top-level keys come in the order of the recipe contract.
    assert list(yaml.safe_load(text)) == [
        *("name", "seed", "device", "output", "data", "model"),
        *("loss", "optimizer", "scheduler", "train", "logging"),
    ]


SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_recipes_are_shipped():
    assert QUICKSTART in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_validates_and_round_trips(path):
    recipe = load_recipe(path)
    assert resolve(yaml.safe_load(to_yaml(recipe))) == recipe


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_starts_with_a_comment_saying_how_to_run_it(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path.name} must start with a '#' comment saying what it shows"
    assert f"dltrain fit recipes/{path.name}" in "\n".join(header)


def test_yaml_tags_never_run_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError, match=r"evil.yaml:1:7"):
        load_recipe(path)
    assert not marker.exists()


# -- where relative paths start ----------------------------------------------------------------


def test_paths_in_a_recipe_file_start_at_its_folder_and_overrides_at_the_working_folder(
    tmp_path, monkeypatch
):
    recipes, work = tmp_path / "recipes", tmp_path / "work"
    recipes.mkdir()
    work.mkdir()
    recipe = recipes / "own.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "csv", "train": "data/t.csv", "test": "/abs/x.csv"},
                "model": {"name": "mlp"},
            }
        )
    )
    monkeypatch.chdir(work)
    loaded = load_recipe(recipe)
    assert loaded.data.model_extra["train"] == str(recipes / "data" / "t.csv")
    assert loaded.data.model_extra["test"] == "/abs/x.csv"  # absolute: as written

    overridden = load_recipe(recipe, ["data.train=../mine.csv", "data.path=~/all.csv"])
    assert overridden.data.model_extra["train"] == str(tmp_path / "mine.csv")
    assert overridden.data.model_extra["path"] == str(Path.home() / "all.csv")

    switched = load_recipe(recipe, ["data={name: npz, path: arrays.npz}"])
    assert switched.data.model_extra["path"] == str(work / "arrays.npz")
    # recipe.yaml (and every checkpoint) names the file as seen from anywhere
    assert f"train: {recipes / 'data' / 't.csv'}" in to_yaml(loaded)


@pytest.mark.parametrize("digits", [4_301, 100_000])
def test_an_integer_too_long_to_read_names_its_line_not_pythons_limit(tmp_path, digits):
    path = write(tmp_path, MINIMAL + "train:\n  epochs: 2\n  batch_size: " + "7" * digits + "\n")
    message = user_error(path)
    assert f"recipe.yaml:7:15: a number of {digits:,} digits" in message
    assert "set_int_max_str_digits" not in message
    assert "train.epochs" not in message  # the YAML around it was read as written
    digits_in_override = user_error(write(tmp_path, MINIMAL), ["train.epochs=" + "7" * digits])
    assert "train.epochs" in digits_in_override and "set_int_max" not in digits_in_override
