"""Checking the files and folders a recipe names, with errors that say which key to fix.

The rule: a relative path written in a recipe file starts at the recipe file's folder; one given
on the command line (an override) starts at the working folder (`recipe.anchor_input_paths`
makes both absolute). Dataset arguments typed `InputPath` are such paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from dltrain.config.registry import INPUT_PATH
from dltrain.errors import UserError

InputPath = Annotated[str, INPUT_PATH]

WHERE_RELATIVE_PATHS_START = (
    "a relative path in a recipe file starts at the recipe's folder, on the command line at "
    "the working folder"
)


def existing_path(path: str, key: str, want_dir: bool | None = False) -> Path:
    """`path` as a Path, or a UserError naming the recipe key and the resolved location.
    `want_dir`: a folder (True), a file (False) or either (None)."""
    resolved = Path(path).expanduser()
    wanted = {True: resolved.is_dir, False: resolved.is_file, None: resolved.exists}[want_dir]
    if wanted():
        return resolved
    what = {True: "folder", False: "file", None: "path"}[want_dir]
    problem = "not found"
    if resolved.exists():
        problem = "is a file, not a folder" if want_dir else "is a folder, not a file"
    raise UserError(
        f"{key}: {what} '{path}' {problem} (resolved to {resolved.resolve()}). "
        f"Set {key} to the {what}'s location; {WHERE_RELATIVE_PATHS_START}."
    )


def check_input_paths(dataset: dict) -> None:
    """Every file or folder the dataset section names exists: checked before the run folder
    (a mistyped path is the problem to report, not what the run folder holds)."""
    from dltrain.config.registry import DATASETS

    for key in DATASETS.path_arguments(dataset["name"]):
        if dataset.get(key):
            existing_path(dataset[key], f"data.{key}", want_dir=None)
