"""`dltrain runs`: find the run folders under a folder and summarise each in one row.

Pure functions over files (no rich, no torch): rendering is in reporting/console_tables.py. A
run folder is any folder holding recipe.yaml and report.json or metrics.csv, found at any depth
(so the fold-k folders of a cross-validation are runs too). Files that are missing or unreadable
leave their values missing (None) rather than failing the listing: a run still training has no
report yet.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from dltrain.errors import UserError, did_you_mean
from dltrain.runs.metrics_csv import best_val_metrics, read_metrics

# The keys of a summary row, in table order; each is a valid --sort key.
COLUMNS = (
    "name",
    "model",
    "dataset",
    "epochs",
    "best_val_loss",
    "best_val_accuracy",
    "test_accuracy",
    "f1_macro",
    "test_mse",  # regression
    "test_r2",
    "exact_match",  # seq2seq
    "epsilon",  # a private run's ε spent (privacy:)
    "modified",
)
ASCENDING = {
    "name",
    "model",
    "dataset",
    "best_val_loss",
    "test_mse",
    "epsilon",
}  # the rest: largest first
# Each task's figures from report.json (on the test split, else the split `report_split` names)
REPORT_FIGURES = {
    "test_accuracy": ("accuracy",),
    "f1_macro": ("f1", "macro"),
    "test_mse": ("mse",),
    "test_r2": ("r2",),
    "exact_match": ("exact_match",),
}
DEFAULT_SORT = "test_accuracy"
SKIPPED_FOLDERS = {"checkpoints", "tensorboard"}  # never hold runs; can be large


def find_runs(folder: Path) -> list[Path]:
    """Every run folder at or below `folder`, sorted by path."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in SKIPPED_FOLDERS and not d.startswith(".")]
        if "recipe.yaml" in files and ("report.json" in files or "metrics.csv" in files):
            found.append(Path(here))
    return sorted(found)


def summarize_run(run: Path, root: Path) -> dict[str, Any]:
    """One run folder as a row: the COLUMNS keys plus `path`, `epochs_planned`, `report_split`.

    The task's figures (`test_accuracy`/`f1_macro`, `test_mse`/`test_r2`, `exact_match`) come
    from report.json, which evaluates the test split (or the validation split when the dataset
    has no test split: `report_split` says which).
    """
    recipe = _read_yaml(run / "recipe.yaml")
    rows = read_metrics(run / "metrics.csv")
    report = _read_json(run / "report.json")
    data, model, train = (_section(recipe, key) for key in ("data", "model", "train"))
    relative = run.relative_to(root).as_posix()
    return {
        "name": root.resolve().name if relative == "." else relative,
        "path": str(run),
        "model": _text(model.get("name")),
        "dataset": _text(data.get("name")),
        "epochs": len(rows),
        "epochs_planned": train.get("epochs") if isinstance(train.get("epochs"), int) else None,
        **best_val_metrics(rows),
        **{key: _finite(_figure(report, path)) for key, path in REPORT_FIGURES.items()},
        "epsilon": _spent_epsilon(report, rows),
        "report_split": _text(report.get("split")),
        "modified": _modified(run),
    }


def _spent_epsilon(report: dict[str, Any], rows: list[dict[str, float | None]]) -> float | None:
    """A private run's ε: the report's (the whole run), else its last epoch's (still training);
    None for a run without privacy."""
    reported = _finite(_figure(report, ("privacy", "epsilon")))
    return reported if reported is not None else (rows[-1].get("epsilon") if rows else None)


def list_runs(folder: Path, sort: str = DEFAULT_SORT) -> list[dict[str, Any]]:
    """Summaries of every run under `folder`, sorted by `sort` (see `sort_runs`).

    A missing folder (or a file) is the user's error; a folder with no runs gives [].
    """
    folder = Path(folder)
    check_sort_key(sort)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(
            f"{folder} {what}. Pass the folder your runs are written to (a recipe's output:, "
            "default runs)."
        )
    return sort_runs([summarize_run(run, folder) for run in find_runs(folder)], sort)


def check_sort_key(key: str) -> None:
    """Refuse an unknown --sort key, suggesting the nearest one."""
    if key not in COLUMNS:
        hint = did_you_mean(key, COLUMNS) or ""
        raise UserError(f"--sort {key}: unknown key.{hint} Choose one of: {', '.join(COLUMNS)}.")


def sort_runs(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Sort by `key`: names and best_val_loss ascending, everything else largest (or newest)
    first; ties by name; runs without the value last."""
    check_sort_key(key)
    by_name = sorted(rows, key=lambda r: r["name"])
    present = [r for r in by_name if r.get(key) is not None]
    missing = [r for r in by_name if r.get(key) is None]
    present.sort(key=lambda r: r[key], reverse=key not in ASCENDING)  # stable: ties stay by name
    return present + missing


# -- reading files, tolerating damage ----------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _figure(report: dict[str, Any], path: tuple[str, ...]) -> Any:
    """report["f1"]["macro"] for ("f1", "macro"); None where any level is missing."""
    value: Any = report
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: Any) -> str | None:
    return str(value) if value is not None else None


def _modified(run: Path) -> str | None:
    """When the run last wrote one of its files (local time, ISO 8601 to the second)."""
    times = []
    for name in ("recipe.yaml", "metrics.csv", "report.json", "checkpoints/last.pt"):
        try:
            times.append((run / name).stat().st_mtime)
        except OSError:
            continue
    if not times:
        return None
    return datetime.fromtimestamp(max(times)).isoformat(timespec="seconds")
