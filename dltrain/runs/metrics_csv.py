"""metrics.csv, one row per epoch: its columns (the one list of them), writing it from a run's
history and reading it back as floats (runs, compare, crossval and sweeps read it)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

# metrics.csv's columns, in order
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
    "samples_per_s",
)
# a private run's (`privacy:`) column after them: the ε spent by the end of each epoch
PRIVATE_COLUMNS = ("epsilon",)


def read_metrics(path: Path) -> list[dict[str, float | None]]:
    """metrics.csv as rows of floats (None for an empty or unreadable cell); [] if missing."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: _number(v) for k, v in row.items() if k} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def best_val_metrics(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    """The lowest val_loss and highest val_accuracy over the epochs (each on its own; None when
    no epoch has a finite value)."""
    losses = [r.get("val_loss") for r in rows]
    accuracies = [r.get("val_accuracy") for r in rows]
    losses = [v for v in losses if v is not None and math.isfinite(v)]
    accuracies = [v for v in accuracies if v is not None and math.isfinite(v)]
    return {
        "best_val_loss": min(losses) if losses else None,
        "best_val_accuracy": max(accuracies) if accuracies else None,
    }


def metrics_csv(history: list[dict[str, Any]]) -> str:
    """metrics.csv: one row per finished epoch."""
    buffer = io.StringIO()
    private = any("epsilon" in row for row in history)
    columns = METRIC_COLUMNS + (PRIVATE_COLUMNS if private else ())
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None
