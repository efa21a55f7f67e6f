"""A recipe file read into a validated `Recipe`: the file checked, its YAML parsed, the `k=v`
overrides applied, the user's `imports:` loaded, input paths anchored to the recipe's folder,
and validation errors pointed at the line (or the override) they come from."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from dltrain.config.overrides import apply_overrides
from dltrain.config.schema import COMPONENT_SECTIONS, DataSection, Recipe, expand_shorthand, resolve
from dltrain.config.user_imports import import_user_modules
from dltrain.config.yaml_text import parse_yaml
from dltrain.errors import RecipeError, UserError


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises UserError with file:line context."""
    path = Path(path)
    text = _read_recipe_text(path)
    raw = parse_yaml(text, str(path))
    raw.setdefault("name", path.stem)
    return resolve_with_context(raw, overrides, str(path), text, base_dir=path.parent)


MAX_RECIPE_BYTES = 4 * 1024**2  # a recipe is a few kB; anything this large is not one


def _read_recipe_text(path: Path) -> str:
    """The recipe file's text: a regular UTF-8 file of sane size, refused fast otherwise (a
    device such as /dev/zero, a folder, a huge file would be read until memory runs out)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path} is not a regular file; give the recipe's .yaml file.")
        if info.st_size > MAX_RECIPE_BYTES:
            raise UserError(
                f"{path} is {info.st_size / 1024**2:.0f} MB; a recipe is a small YAML file (at "
                f"most {MAX_RECIPE_BYTES // 1024**2} MB). Check the path."
            )
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)  # the file may have grown since stat()
        if len(data) > MAX_RECIPE_BYTES:
            raise UserError(f"{path} is larger than {MAX_RECIPE_BYTES // 1024**2} MB.")
        return data.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe file not found: {path}. Check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}") from None


def resolve_with_context(
    raw: dict[str, Any],
    overrides: list[str],
    source: str,
    text: str | None = None,
    base_dir: Path | None = None,
) -> Recipe:
    """Apply overrides and validate; errors say which file line or which override is to blame.

    `base_dir` is where relative `imports:` files are found (the recipe's folder; default: the
    current folder).
    """
    # Expand `model: mlp` first, so that overrides such as `model.hidden=[64]` can reach into it.
    raw, overridden = apply_overrides(expand_shorthand(raw), overrides)
    try:
        # Import first: `model.name=my_model` must find the user's component when overrides
        # switch components below.
        raw = import_user_modules(raw, base_dir)
        raw = anchor_input_paths(raw, overridden, base_dir)
        return resolve(_drop_replaced_arguments(raw, overridden))
    except RecipeError as exc:
        # `from exc.__cause__`: None for most errors; for an import that failed, the user's own
        # exception, so that DLTRAIN_DEBUG=1 shows its traceback.
        culprit = _blamed_override(exc.path, overridden)
        if culprit:
            raise UserError(f"override '{culprit}': {exc}") from exc.__cause__
        line = _line_of(text, exc.path) if text else None
        where = f"{source}:{line}" if line else source
        raise UserError(f"{where}: {exc}") from exc.__cause__


def anchor_input_paths(
    raw: dict[str, Any], overridden: dict[str, str], base_dir: Path | None
) -> dict[str, Any]:
    """Make the dataset's input paths absolute: relative to the recipe file's folder when the
    file says them, to the working folder when an override does (or there is no file). The
    resolved recipe (recipe.yaml, checkpoints) then names the same files from anywhere."""
    from dltrain.config.registry import DATASETS

    data = raw.get("data")
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or name not in DATASETS:
        return raw  # resolve() names the problem
    anchored = dict(data)
    for key in DATASETS.path_arguments(name):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            continue
        from_file = base_dir is not None and not {"data", f"data.{key}"} & overridden.keys()
        start = base_dir if from_file else Path.cwd()
        anchored[key] = os.path.normpath(Path(start).absolute() / Path(value).expanduser())
    return {**raw, "data": anchored}


def _drop_replaced_arguments(raw: dict[str, Any], overridden: dict[str, str]) -> dict[str, Any]:
    """After `data.name=npz` (or model/loss/...), drop the file's arguments of the old component
    that the new one does not take, so switching a component on the command line just works.
    Arguments given as overrides are kept (and still checked)."""
    from dltrain.config.registry import REGISTRIES

    for key in overridden:
        section, _, leaf = key.partition(".")
        registry = REGISTRIES.get(COMPONENT_SECTIONS.get(section, ""))
        body = raw.get(section)
        if leaf != "name" or registry is None or not isinstance(body, dict):
            continue
        if not isinstance(body.get("name"), str) or body["name"] not in registry:
            continue  # the unknown name is reported by validation
        keep = {a.name for a in registry.arguments(body["name"])} | {"name"}
        if section == "data":
            keep |= set(DataSection.model_fields)
        raw[section] = {
            k: v for k, v in body.items() if k in keep or f"{section}.{k}" in overridden
        }
    return raw


def _blamed_override(path: str, overridden: dict[str, str]) -> str | None:
    """The override to blame for an error at `path`, or None when the file is to blame.

    Preferably the last override that set `path` itself or a key inside it (`optimzer.lr=1`
    creates the unknown `optimzer`); else the last one that replaced a parent section or the
    section's name (a changed component name makes its other arguments wrong).
    """
    for key, text in reversed(overridden.items()):
        if key == path or key.startswith(path + "."):
            return text
    section = path.split(".")[0].split("[")[0]
    for key, text in reversed(overridden.items()):
        if path.startswith((key + ".", key + "[")) or key == f"{section}.name":
            return text
    return None


def _line_of(text: str, path: str) -> int | None:
    """The 1-based line of a dotted key path in YAML text (the deepest part that exists)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            key_node = next((k for k, _ in node.value if k.value == part), None)
            if match is None:
                break
            line, node = key_node.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line
