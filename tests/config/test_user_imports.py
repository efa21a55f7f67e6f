"""`imports:` in recipes: the user's own component modules, imported before validation.

Modules are written under tmp_path with names unique to each test, because registering a
component is process-wide (the registries refuse a name registered twice).
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest
import yaml

from dltrain.config.loading import load_recipe
from dltrain.config.registry import MODELS
from dltrain.config.schema import resolve, to_yaml
from dltrain.errors import UserError

from helpers.cli import QUICKSTART, dltrain, words

_unique = itertools.count()

TINY_MODEL = '''
from torch import nn
from dltrain.config.registry import MODELS


@MODELS.register()
def {name}(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """A one-hidden-layer network from the user's own module."""
    features = 1
    for size in input_shape:
        features *= size
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_classes)
    )
'''


def user_module(folder: Path, body: str = TINY_MODEL) -> tuple[Path, str]:
    """Write a module with a unique name into `folder`; return its file and the model name."""
    index = next(_unique)
    model = f"user_tiny_{index}"
    path = folder / f"user_models_{index}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body).format(name=model), encoding="utf-8")
    return path, model


def recipe_file(folder: Path, imports: list[str], model: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    text = yaml.safe_dump(
        {
            "imports": imports,
            "device": "cpu",
            "data": {"name": "digits", "batch_size": 64},
            "model": {"name": model, "width": 8},
        },
        sort_keys=False,
    )
    path.write_text(text, encoding="utf-8")
    return path


def user_error(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, list(overrides))
    assert info.value.exit_code == 2
    return words(str(info.value))


# -- what works ---------------------------------------------------------------------------------


def test_a_model_from_a_py_file_trains_and_its_checkpoint_evaluates_elsewhere(tmp_path):
    project = tmp_path / "project"
    module, model = user_module(project)
    recipe = recipe_file(project, [f"./{module.name}"], model)

    fit = dltrain("fit", recipe, "train.epochs=1", f"output={tmp_path / 'runs'}", cwd=tmp_path)
    assert fit.returncode == 0, fit.stdout + fit.stderr
    run = tmp_path / "runs" / "recipe"
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["imports"] == [str(module.resolve())]  # absolute: found again from anywhere
    assert saved["model"]["name"] == model

    # `eval` never imports what the checkpoint names: it says which module to pass.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkpoint = run / "checkpoints" / "best.pt"
    refused = dltrain("eval", checkpoint, cwd=elsewhere)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = words(refused.stderr)
    assert f"model '{model}'" in message and f"--imports {module.resolve()}" in message

    # Named by the user with --imports, the module is imported (here in this process).
    from dltrain.reporting.progress import Progress
    from dltrain.training.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        checkpoint, elsewhere / "eval", Progress(quiet=True), imports=[str(module)]
    )
    assert report["num_samples"] > 0
    assert model in MODELS

    # A module that has gone away is named in a clear error, not a traceback.
    module.rename(module.with_suffix(".moved"))
    other = dltrain("eval", checkpoint, "--imports", module, cwd=elsewhere)
    assert other.returncode == 2, other.stdout + other.stderr
    message = words(other.stderr)
    assert "Traceback" not in other.stdout + other.stderr
    assert "--imports" in message and "file not found" in message and module.name in message


def test_a_dotted_module_is_found_beside_the_recipe_and_kept_by_name(tmp_path):
    package = tmp_path / f"user_pkg_{next(_unique)}"
    (package / "__init__.py").parent.mkdir()
    (package / "__init__.py").write_text("")
    module, model = user_module(package)
    dotted = f"{package.name}.{module.stem}"
    recipe = load_recipe(recipe_file(tmp_path, [dotted], model))
    assert recipe.imports == [dotted]
    assert recipe.model == {"name": model, "width": 8}
    # Loading again (eval, resume) is a no-op, not a second registration.
    assert resolve(yaml.safe_load(to_yaml(recipe))) == recipe


def test_recipes_without_imports_do_not_mention_them():
    recipe = load_recipe(QUICKSTART)
    assert recipe.imports == []
    assert "imports" not in recipe.to_dict()


def test_imports_given_as_an_override_are_imported_from_the_recipes_folder(tmp_path):
    module, model = user_module(tmp_path)
    path = recipe_file(tmp_path, [], "mlp")
    recipe = load_recipe(path, [f"imports=[./{module.name}]", f"model.name={model}"])
    assert recipe.model["name"] == model
    assert recipe.imports == [str(module.resolve())]


# -- what fails: exit 2 naming imports[i], the module and the reason ----------------------------


def test_an_unknown_module_is_named(tmp_path):
    module, model = user_module(tmp_path)
    path = recipe_file(tmp_path, [f"./{module.name}", "no_such_pkg_xyz.models"], model)
    message = user_error(path)
    assert f"{path}:" in message
    assert "imports[1]" in message
    assert "'no_such_pkg_xyz.models'" in message and "not found" in message


def test_a_module_that_raises_is_named_with_the_error_and_its_line(tmp_path):
    bad = tmp_path / f"user_broken_{next(_unique)}.py"
    bad.write_text("import os\nraise RuntimeError('no GPU here')\n")
    path = recipe_file(tmp_path, [f"./{bad.name}"], "mlp")
    message = user_error(path)
    assert "imports[0]" in message
    assert str(bad) in message
    assert "RuntimeError: no GPU here" in message and f"{bad}:2" in message


def test_a_module_with_a_missing_dependency_names_the_dependency(tmp_path):
    bad = tmp_path / f"user_needs_{next(_unique)}.py"
    bad.write_text("import no_such_dependency_xyz\n")
    message = user_error(recipe_file(tmp_path, [bad.stem], "mlp"))
    assert "imports[0]" in message and bad.stem in message
    assert "No module named 'no_such_dependency_xyz'" in message


@pytest.mark.parametrize(
    ("imports", "where", "expected"),
    [
        ("my_models", "imports", "must be a list"),
        (["not a module!"], "imports[0]", "neither a dotted module name"),
        ([3], "imports[0]", "neither a dotted module name"),
        (["./missing.py"], "imports[0]", "file not found"),
    ],
)
def test_malformed_imports_are_refused(tmp_path, imports, where, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump({"imports": imports, "data": {"name": "digits"}, "model": "mlp"})
    )
    message = user_error(path)
    assert f"{where}:" in message and expected in message


def test_cli_reports_a_failing_import_in_one_line(invoke, tmp_path):
    path = recipe_file(tmp_path, ["no_such_pkg_xyz"], "mlp")
    result = invoke("check", str(path))
    assert result.exit_code == 2
    assert "imports[0]" in words(result.stderr) and "Traceback" not in result.output
