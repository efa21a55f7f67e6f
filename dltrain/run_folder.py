"""The run folder `{output}/{name}/`: recipe.yaml, metrics.csv, checkpoints/, reports."""

from __future__ import annotations

import contextlib
import csv
import io
import tempfile
from pathlib import Path
from typing import Any

from dltrain.atomic import atomic_write_text
from dltrain.checkpoint import save_checkpoint
from dltrain.errors import UserError
from dltrain.recipe import Recipe, to_yaml

METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
    "samples_per_s",
]


class RunFolder:
    """Paths of one run and the writes into it; every write is atomic."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.last_path = self.checkpoints / "last.pt"
        self.best_path = self.checkpoints / "best.pt"
        self.recipe_path = self.root / "recipe.yaml"
        self.metrics_path = self.root / "metrics.csv"

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> RunFolder:
        return cls(Path(recipe.output) / recipe.name)

    def check_free_for(self, recipe: Recipe, force: bool, resuming: bool) -> None:
        """Refuse to mix two different runs in one folder, unless --force or --resume."""
        if force or resuming or not self.recipe_path.exists():
            return
        if self.recipe_path.read_text(encoding="utf-8") != to_yaml(recipe):
            raise UserError(
                f"{self.root} already holds a run of a different recipe. Use another name "
                f"(name=... or output=...), --resume auto to continue it, or --force to replace it."
            )

    def ensure_writable(self) -> None:
        """Refuse (exit 2) a run folder that cannot be created or written, before any work.

        Creates the folder and a probe file in it, then removes what it created, so a run that
        fails later (e.g. on a missing data file) leaves no empty folder behind.
        """
        created = [p for p in (self.root, *self.root.parents) if not p.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            blocker = next((p for p in (self.root, *self.root.parents) if p.is_file()), None)
            reason = f"{blocker} is a file, not a folder" if blocker else exc.strerror or exc
            raise UserError(
                f"cannot write the run folder {self.root}: {reason}. Set output=... to a folder "
                "you can write to (or fix its permissions)."
            ) from None
        finally:
            for path in created:  # deepest first
                with contextlib.suppress(OSError):
                    path.rmdir()

    def start(self, recipe: Recipe) -> None:
        """Create the folder and write the resolved recipe."""
        atomic_write_text(self.recipe_path, to_yaml(recipe))

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.csv with one row per finished epoch (small; atomic each time)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: _csv_value(row.get(k)) for k in METRIC_COLUMNS})
        atomic_write_text(self.metrics_path, buffer.getvalue())

    def save_last(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.last_path, state)

    def save_best(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.best_path, state)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value
