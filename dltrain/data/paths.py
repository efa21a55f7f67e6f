"""Checking the files and folders a recipe names, with errors that say which key to fix."""

from __future__ import annotations

from pathlib import Path

from dltrain.errors import UserError


def existing_path(path: str, key: str, want_dir: bool = False) -> Path:
    """`path` as a Path, or a UserError naming the recipe key and the resolved location."""
    resolved = Path(path).expanduser()
    if resolved.is_dir() if want_dir else resolved.is_file():
        return resolved
    what = "folder" if want_dir else "file"
    problem = "not found"
    if resolved.exists():
        problem = "is a file, not a folder" if want_dir else "is a folder, not a file"
    raise UserError(
        f"{key}: {what} '{path}' {problem} (resolved to {resolved.resolve()}). "
        f"Set {key} to the {what}'s location; relative paths start at {Path.cwd()}."
    )
