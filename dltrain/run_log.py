"""The run's log: events.jsonl always (for scripts), TensorBoard event files when asked.

events.jsonl has one JSON object per line with at least `event` and `time` (Unix seconds):
start, first_step, epoch, checkpoint, early_stop, interrupted, error, end. Lines are appended
and flushed as they happen, so a crashed run's log still tells what it did.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dltrain.errors import RunFailure, UserError


class RunLog:
    """Writes a run's events; one instance per fit."""

    def __init__(self, folder: Path, tensorboard: bool = False, enabled: bool = True):
        self.path = Path(folder) / "events.jsonl"
        self.enabled = enabled  # False in the processes of a DDP run other than rank 0
        self._tensorboard = (
            _tensorboard_writer(Path(folder) / "tensorboard") if tensorboard and enabled else None
        )

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
        """An epoch's metrics row: to the event log and, when enabled, to TensorBoard."""
        self.event("epoch", **row)
        if self._tensorboard is None:
            return
        for key, value in row.items():
            if key != "epoch" and value is not None:
                self._tensorboard.add_scalar(key, value, global_step=row["epoch"])
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "logging.tensorboard: true needs the tensorboard package: pip install tensorboard "
            "(or set logging.tensorboard=false)."
        ) from None
    return SummaryWriter(log_dir=str(folder))
