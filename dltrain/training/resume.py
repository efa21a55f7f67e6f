"""A training run's state in a checkpoint and back: what last.pt/best.pt hold beyond the
weights (optimizer, schedule, gradient scaler, every random generator, the train state, the
moving average), and `restore`, which puts it into freshly built objects to resume exactly.
The file format itself (save, safe load, digest) is runs/checkpoint.py."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dltrain.errors import UserError, first_line
from dltrain.optim import LrSchedule
from dltrain.runs.checkpoint import load_weights
from dltrain.training.build import Setup
from dltrain.training.ema import WeightAverage
from dltrain.training.privacy import PrivateTraining
from dltrain.training.state import TrainState, check_resumable


def rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain data (safe for weights_only)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(
    setup: Setup,
    optimizer: torch.optim.Optimizer,
    schedule: LrSchedule,
    state: TrainState,
    ema: WeightAverage | None = None,
    privacy: PrivateTraining | None = None,
) -> dict[str, Any]:
    """What last.pt/best.pt hold (save_checkpoint copies the tensors to the CPU: torch cannot
    serialise XLA's lazy tensors, and the copy makes the file load anywhere). With train.ema,
    `model` is the averaged weights (what evaluates) and `ema` the training weights."""
    checkpoint = {
        "recipe": setup.recipe.to_dict(),
        "model": (ema.module if ema else setup.model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": setup.precision.scaler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "rng": rng_state(),
        "metrics": {"best": state.best, "best_epoch": state.best_epoch, "history": state.history},
        "train_state": state.to_dict(),
        "classes": list(setup.data.classes),
        "data_meta": setup.data.meta(),
    }
    if ema is not None:
        checkpoint["ema"] = ema.state_dict()
    if privacy is not None:  # the accountant's history: a resumed run's ε goes on from it
        checkpoint["privacy"] = privacy.state_dict()
    return checkpoint


def restore(
    checkpoint: dict[str, Any],
    path: Path,
    setup: Setup,
    optimizer: torch.optim.Optimizer,
    schedule: LrSchedule,
    ema: WeightAverage | None = None,
    privacy: PrivateTraining | None = None,
) -> TrainState:
    """Load a checkpoint's training state into freshly built objects (resume); a part that
    is missing or does not fit this run is a UserError naming it."""
    check_resumable(checkpoint["recipe"], setup.recipe.to_dict(), str(path))
    load_weights(setup.model, checkpoint, path, setup.recipe.model)
    averaged = (("ema", partial(ema.load_state_dict, checkpoint["model"])),) if ema else ()
    private = (("privacy", privacy.load_state_dict),) if privacy else ()
    parts = (
        *averaged,
        *private,
        ("optimizer", lambda state: _load_optimizer(optimizer, state)),
        ("scheduler", schedule.load_state_dict),
        ("scaler", setup.precision.scaler.load_state_dict),
        ("rng", set_rng_state),
        ("train_state", TrainState.from_dict),
    )
    restored = {}
    for name, load in parts:
        try:
            restored[name] = load(checkpoint[name])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            reason = "it is missing" if name not in checkpoint else first_line(exc)
            raise UserError(
                f"cannot resume from {path}: its {name} state does not fit this run ({reason}). "
                "Resume from another checkpoint, or start a new run."
            ) from None
    return restored["train_state"]


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """load_state_dict, then the check it leaves out: each per-parameter tensor (Adam's
    moments, momentum) has its parameter's shape, else the first step would fail."""
    fresh = [dict(group) for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for built, loaded in zip(fresh, optimizer.param_groups, strict=True):
        for key, value in built.items():  # settings as this run built them: same kinds only
            if key != "params" and not _same_kind(value, loaded.get(key)):
                raise ValueError(f"its {key} is {loaded.get(key)!r}, not like {value!r}")
    for param, values in optimizer.state.items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise ValueError(
                    f"'{key}' has shape {tuple(value.shape)} for a parameter of shape "
                    f"{tuple(param.shape)}"
                )


def _same_kind(built: Any, loaded: Any) -> bool:
    """Whether a saved optimizer setting can stand where this run built `built`."""
    if isinstance(built, bool) or built is None:
        return type(loaded) is type(built)
    if isinstance(built, (int, float)):
        return isinstance(loaded, (int, float)) and not isinstance(loaded, bool)
    if isinstance(built, (tuple, list)):
        return isinstance(loaded, (tuple, list)) and len(loaded) == len(built)
    return isinstance(loaded, type(built))
