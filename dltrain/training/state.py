"""What a run has done so far, and whether a checkpoint may be resumed under a recipe.

Everything here survives a resume: with it, a run stopped at any step boundary continues exactly
as if it had never stopped (same data order, same random draws, same metrics).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dltrain.errors import UserError

# Recipe keys that may differ between a checkpoint and the recipe resuming it: they change where
# or how long the run goes, or how data is fed, but not what the next step computes.
RESUMABLE_CHANGES = (
    "name",
    "output",
    "device",
    "train.epochs",
    "train.checkpoint_every_steps",
    "train.threads",  # how fast the CPU computes it (1 and 2 threads train the same weights)
    "data.loader",
    "data.num_workers",
    "data.eval_batch_size",
    "train.early_stopping",
    "logging",
    "distributed",  # how processes talk, not what they compute
)


@dataclass
class TrainState:
    """Progress counters plus the partial epoch's running totals."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the epoch under way (0 at an epoch boundary)
    step: int = 0  # optimizer steps taken
    epoch_loss_sum: float = 0.0  # the epoch under way: summed loss and samples so far
    epoch_seen: int = 0
    epoch_seconds: float = 0.0
    best: float | None = None  # best monitored value so far, and when
    best_epoch: int | None = None
    early_best: float | None = None  # early stopping: best value and epochs without improving
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The state a checkpoint saved; a field of the wrong type is a TypeError naming it."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        state = cls(**known)
        for name, kinds in _FIELD_KINDS.items():
            value = getattr(state, name)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise TypeError(f"its {name} is {value!r}")
        if not all(isinstance(row, dict) for row in state.history):
            raise TypeError("its history holds rows that are not mappings")
        state.history = list(state.history)
        return state

    def start_epoch(self) -> None:
        """Reset the partial-epoch totals (at an epoch boundary)."""
        self.batch, self.epoch_loss_sum, self.epoch_seen, self.epoch_seconds = 0, 0.0, 0, 0.0

    def keep_totals_on_main(self, is_main: bool) -> None:
        """After a save or a resume the epoch's totals so far are the whole run's: rank 0 carries
        them on and every other process counts from zero, so that summing over the processes at
        the epoch's end counts each sample once."""
        if not is_main:
            self.epoch_loss_sum, self.epoch_seen = 0.0, 0

    def record_epoch(self, row: dict[str, Any], monitor: str, early_stopping) -> bool:
        """Append an epoch's metrics row; update the best value and early stopping. Returns
        whether this epoch is the best so far by `monitor` (and finite)."""
        self.history.append(row)
        if early_stopping is not None:
            self._count_epochs_without_improvement(row, early_stopping)
        value, mode = monitored(row, monitor)
        if not math.isfinite(value) or not improves(value, self.best, mode):
            return False
        self.best, self.best_epoch = value, row["epoch"]
        return True

    def _count_epochs_without_improvement(self, row: dict[str, Any], rule) -> None:
        """Early stopping: mark the run stopped after `patience` epochs without improvement."""
        value, mode = monitored(row, rule.monitor, rule.mode)
        if math.isfinite(value) and improves(value, self.early_best, mode, rule.min_delta):
            self.early_best, self.epochs_without_improvement = value, 0
        else:
            self.epochs_without_improvement += 1
        self.stopped_early = self.epochs_without_improvement >= rule.patience


def monitored(row: dict[str, Any], monitor: str, mode: str = "auto") -> tuple[float, str]:
    """The value an epoch is judged by, and its direction (min/max). Without a validation
    split, val_* fall back to the training loss, judged as a loss (lower is better)."""
    if row[monitor] is None:
        return row["train_loss"], "min"
    return row[monitor], direction(monitor, mode)


def fallback_note(monitors: list[str], has_validation: bool) -> str | None:
    """The one line saying that val_* monitors fall back to train_loss (no validation split)."""
    missing = sorted({m for m in monitors if m.startswith("val_")}) if not has_validation else []
    if not missing:
        return None
    verb = "falls" if len(missing) == 1 else "fall"
    return (
        f"no validation split: {' and '.join(missing)} {verb} back to train_loss (lower is "
        "better) for best.pt and early stopping; set data.val_split > 0 to monitor it"
    )


_NUMBER = (int, float)
_FIELD_KINDS: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "batch": (int,),
    "step": (int,),
    "epoch_loss_sum": _NUMBER,
    "epoch_seen": (int,),
    "epoch_seconds": _NUMBER,
    "best": (*_NUMBER, type(None)),
    "best_epoch": (int, type(None)),
    "early_best": (*_NUMBER, type(None)),
    "epochs_without_improvement": (int,),
    "stopped_early": (bool,),
    "history": (list,),
}


def check_resumable(saved: dict[str, Any], wanted: dict[str, Any], source: str) -> None:
    """Refuse to resume a checkpoint under a recipe that would change the run's math."""
    before, after = _flatten(saved), _flatten(wanted)
    differences = [
        key
        for key in sorted(set(before) | set(after))
        if before.get(key, _MISSING) != after.get(key, _MISSING) and not _may_change(key)
    ]
    if differences:
        shown = ", ".join(
            f"{k} ({before.get(k, 'unset')!r} → {after.get(k, 'unset')!r})" for k in differences[:6]
        )
        more = f" and {len(differences) - 6} more" if len(differences) > 6 else ""
        raise UserError(
            f"cannot resume {source} with this recipe: it differs in {shown}{more}. Resume with "
            f"the recipe the run started with (only {', '.join(RESUMABLE_CHANGES)} may change), "
            "or start a new run."
        )


_MISSING = object()


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than min_delta in the given direction (min/max)."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def direction(monitor: str, mode: str = "auto") -> str:
    """min or max: `auto` maximises accuracies and minimises losses."""
    if mode != "auto":
        return mode
    return "max" if monitor.endswith("accuracy") else "min"
