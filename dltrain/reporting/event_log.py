"""The run's log: events.jsonl always (for scripts), TensorBoard event files and an MLflow run
(dltrain.reporting.mlflow_tracking) when the recipe's logging section asks.

events.jsonl has one JSON object per line with at least `event` and `time` (Unix seconds):
start, first_step, epoch, checkpoint, early_stop, interrupted, error, end. Lines are appended
and flushed as they happen, so a crashed run's log still tells what it did.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dltrain.config.schema import MlflowSettings, Recipe, to_yaml
from dltrain.errors import RunFailure, UserError
from dltrain.reporting.mlflow_tracking import MlflowRun, flatten
from dltrain.reporting.report import report_scalars


class RunLog:
    """Writes a run's events; one instance per fit."""

    def __init__(
        self, folder: Path, recipe: Recipe | None = None, device: str = "", enabled: bool = True
    ):
        self.path = Path(folder) / "events.jsonl"
        self.enabled = enabled  # False in the processes of a DDP run other than rank 0
        self._recipe = recipe
        logging = recipe.logging if recipe is not None and enabled else None
        self._tensorboard = (
            _tensorboard_writer(Path(folder) / "tensorboard", recipe)
            if logging and logging.tensorboard
            else None
        )
        self._mlflow = None
        if logging and logging.mlflow:
            settings = logging.mlflow if logging.mlflow is not True else MlflowSettings()
            self._mlflow = MlflowRun(settings, recipe.model_dump(mode="json"), folder, device)

    def event(self, event: str, **fields: Any) -> None:
        """Append one event line (flushed at once)."""
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except OSError as exc:
            raise RunFailure(f"cannot write {self.path}: {exc.strerror or exc}.") from None

    def epoch(self, row: dict[str, Any]) -> None:
        """An epoch's metrics row: to the event log and, when enabled, TensorBoard and MLflow."""
        self.event("epoch", **row)
        if self._mlflow is not None:
            self._mlflow.log_epoch(row)
        if self._tensorboard is None:
            return
        for key, value in row.items():
            if key != "epoch" and value is not None:
                self._tensorboard.add_scalar(key, value, global_step=row["epoch"])
        self._tensorboard.flush()

    def report(self, report: dict[str, Any]) -> None:
        """The final report's figures: MLflow metrics, and TensorBoard's hparams table (the
        recipe's settings beside them); events.jsonl's `end` has the headline."""
        if self._mlflow is not None:
            self._mlflow.log_report(report)
        if self._tensorboard is not None and self._recipe is not None:
            settings = flatten(self._recipe.model_dump(mode="json"))
            hparams = {
                k: v if isinstance(v, int | float | str | bool) else str(v)
                for k, v in settings.items()
            }
            split = report.get("split", "test")
            figures = {f"hparam/{split}_{k}": v for k, v in report_scalars(report).items()}
            self._tensorboard.add_hparams(hparams, figures, run_name=".")

    def close(self, status: str = "FINISHED") -> None:
        """End the log: FINISHED, or FAILED / KILLED for a run that failed or was stopped."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._mlflow is not None:
            self._mlflow.finish(status)
            self._mlflow = None


def _tensorboard_writer(folder: Path, recipe: Recipe):
    """A SummaryWriter; the recipe goes in as text (TensorBoard's 'text' tab)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "logging.tensorboard: true needs the tensorboard package: pip install tensorboard "
            "(or set logging.tensorboard=false)."
        ) from None
    writer = SummaryWriter(log_dir=str(folder))
    writer.add_text("recipe", "```\n" + to_yaml(recipe) + "```")
    return writer
