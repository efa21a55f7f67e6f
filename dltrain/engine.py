"""The fit loop: set up from a recipe, train epoch by epoch, checkpoint, evaluate the best model.

It reads top to bottom: `fit` builds everything, `train_one_epoch` is the update, `evaluate` is
the confusion-matrix pass. Running loss and metrics stay on the device; the host reads them only
when the display refreshes and once per epoch, so the GPU never waits on Python.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dltrain.amp import MixedPrecision
from dltrain.checkpoint import load_checkpoint, rng_state, set_rng_state
from dltrain.data.loaders import Batches, make_batches
from dltrain.data.pipeline import BatchPipeline
from dltrain.data.prepare import PreparedData, prepare_data
from dltrain.devices import resolve_device
from dltrain.errors import RunFailure, UserError
from dltrain.metrics import ConfusionMatrix, classification_report
from dltrain.optim import constant_schedule
from dltrain.progress import Progress
from dltrain.recipe import Recipe, resolve_with_context
from dltrain.registry import LOSSES, MODELS, OPTIMIZERS, SCHEDULERS
from dltrain.run_folder import RunFolder


@dataclass
class TrainState:
    """What advances during a run and must survive a resume."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best: float | None = None  # best monitored value so far
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Setup:
    """Everything built from a recipe that a run needs."""

    recipe: Recipe
    device: torch.device
    data: PreparedData
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    precision: MixedPrecision
    pipeline: BatchPipeline


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_setup(recipe: Recipe, device: str | None = None, meta: dict | None = None) -> Setup:
    """Resolve the device, load the data, build model, loss, numerics and batch pipeline."""
    seed_everything(recipe.seed)
    dev = resolve_device(device or recipe.device)
    # Optimizer state of dead units decays into denormal floats after a few hundred steps, and
    # x86 CPUs compute on denormals ~10× slower: flush them to zero (numerically irrelevant).
    torch.set_flush_denormal(True)
    data = prepare_data(recipe.data, recipe.seed, meta)
    model = MODELS.build(recipe.model, input_shape=data.input_shape, num_classes=data.num_classes)
    channels_last = _use_channels_last(recipe.train.channels_last, dev, data.kind)
    model = model.to(dev, memory_format=torch.channels_last if channels_last else None)
    loss_fn = LOSSES.build(
        recipe.loss, num_classes=data.num_classes, class_counts=data.class_counts()
    ).to(dev)
    pipeline = BatchPipeline(
        data.kind, data.mean, data.std, dev, recipe.data.augment, channels_last
    )
    return Setup(
        recipe, dev, data, model, loss_fn, MixedPrecision(recipe.train.precision, dev), pipeline
    )


def _use_channels_last(choice: str | bool, device: torch.device, kind: str) -> bool:
    # NHWC lets cuDNN use tensor-core convolution kernels; on CPU it mostly costs copies.
    return kind == "image" and (device.type == "cuda" if choice == "auto" else bool(choice))


def fit(recipe: Recipe, run: RunFolder, progress: Progress, resume: Path | None = None) -> dict:
    """Train as the recipe says, write the run folder, and return the test report."""
    s = build_setup(recipe)
    train = recipe.train
    train_batches = _batches(s, "train", shuffle=True)
    val_batches = _batches(s, "val", shuffle=False) if "val" in s.data.splits else None
    model = torch.compile(s.model) if train.compile else s.model
    optimizer = OPTIMIZERS.build(
        recipe.optimizer, params=s.model.parameters(), device_type=s.device.type
    )
    schedule = (
        SCHEDULERS.build(
            recipe.scheduler,
            optimizer=optimizer,
            epochs=train.epochs,
            steps_per_epoch=math.ceil(len(train_batches) / train.accumulate),
        )
        if recipe.scheduler
        else constant_schedule(optimizer)
    )
    state = TrainState()
    if resume is not None:
        state = _restore(load_checkpoint(resume), resume, s, optimizer, schedule)
    run.start(recipe)
    progress.start(recipe, s.device, s.precision.name, train_batches.path, s.model, s.data)

    for epoch in range(state.epoch + 1, train.epochs + 1):
        # train
        started = time.perf_counter()
        progress.epoch_start(epoch, train.epochs, len(train_batches))
        train_loss = train_one_epoch(model, train_batches, s, optimizer, schedule, progress, epoch)
        state.step += math.ceil(len(train_batches) / train.accumulate)
        seconds = time.perf_counter() - started
        if not math.isfinite(train_loss):
            raise RunFailure(
                f"the training loss became {train_loss} in epoch {epoch}; lower optimizer.lr or "
                f"set train.grad_clip. Last good checkpoint: {_last_good(run, state)}."
            )

        # evaluate
        val_loss, val_accuracy = None, None
        if val_batches is not None:
            val_loss, matrix = evaluate(model, val_batches, s)
            val_accuracy = _accuracy(matrix)
        schedule.step_epoch(val_loss)

        # record and checkpoint
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": schedule.last_lr(),
            "seconds": seconds,
            "samples_per_s": train_batches.num_samples / seconds,
        }
        state.epoch = epoch
        state.history.append(row)
        run.write_metrics(state.history)
        improved = _update_best(state, row, train.monitor)
        checkpoint = _checkpoint_state(s, optimizer, schedule, state)
        run.save_last(checkpoint)
        if improved:
            run.save_best(checkpoint)
        progress.epoch_end(row, improved)

    # final evaluation of the best model on the test split (val when there is none)
    # (a run resumed from another folder, or one whose val loss was never finite, may have no
    # best.pt of its own: then its latest weights are what it has)
    final = next(p for p in (run.best_path, run.last_path, resume) if p and Path(p).exists())
    return evaluate_checkpoint(final, run.root, progress, s)


def train_one_epoch(
    model, batches: Batches, s: Setup, optimizer, schedule, progress: Progress, epoch: int
) -> float:
    """One pass over the training data. Returns the mean loss (the epoch's one host sync)."""
    model.train()
    accumulate, grad_clip = s.recipe.train.accumulate, s.recipe.train.grad_clip
    loss_sum = torch.zeros((), device=s.device)
    seen, steps = 0, len(batches)
    for i, (x, y) in enumerate(batches.epoch(epoch)):
        # forward backward update
        with s.precision.autocast():
            loss = s.loss_fn(model(s.pipeline.train(x)), y)
        # a step's gradient is the mean over its micro-batches; the epoch's last group may be short
        group = min(accumulate, steps - i // accumulate * accumulate)
        s.precision.backward(loss / group)
        if (i + 1) % accumulate == 0 or i + 1 == steps:
            s.precision.step(optimizer, s.model.parameters(), grad_clip)
            optimizer.zero_grad(set_to_none=True)
            schedule.step_batch()
        # running totals stay on the device; the display reads them when it refreshes
        loss_sum += loss.detach().float() * len(y)
        seen += len(y)
        progress.step(i + 1, seen, loss_sum, seen)
    return (loss_sum / max(seen, 1)).item()


@torch.inference_mode()
def evaluate(model, batches: Batches, s: Setup) -> tuple[float, torch.Tensor]:
    """Mean loss and the confusion matrix over a split; every sample counted once."""
    model.eval()
    matrix = ConfusionMatrix(s.data.num_classes, s.device)
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    for x, y in batches.epoch(0):
        with s.precision.autocast():
            logits = model(s.pipeline.eval(x))
        loss_sum += s.loss_fn(logits.float(), y).double() * len(y)
        matrix.update(logits.argmax(dim=1), y)
    return (loss_sum / max(batches.num_samples, 1)).item(), matrix.matrix.cpu()


def evaluate_checkpoint(
    checkpoint_path: Path,
    output: Path | None,
    progress: Progress,
    setup: Setup | None = None,
    split: str | None = None,
    device: str | None = None,
    overrides: list[str] = (),
) -> dict:
    """Rebuild (or reuse) a setup, load the checkpoint's weights, and report on a split.

    The report goes to `output` (default: eval-SPLIT beside the checkpoint).
    """
    from dltrain.report import write_report

    checkpoint = load_checkpoint(checkpoint_path)
    if setup is None:
        recipe = resolve_with_context(
            dict(checkpoint["recipe"]), list(overrides), f"checkpoint {checkpoint_path}"
        )
        setup = build_setup(recipe, device, meta=checkpoint["data_meta"])
    _load_weights(setup.model, checkpoint, checkpoint_path)
    split = split or ("test" if "test" in setup.data.splits else "val")
    if split not in setup.data.splits:
        raise UserError(
            f"this dataset has no '{split}' split; choose one of: {', '.join(setup.data.splits)}."
        )
    output = output or Path(checkpoint_path).parent / f"eval-{split}"
    progress.evaluating(split, len(setup.data.splits[split]))
    batches = _batches(setup, split, shuffle=False)
    loss, matrix = evaluate(setup.model, batches, setup)
    report = {
        "split": split,
        "checkpoint": _relative(checkpoint_path, output),
        "loss": loss,
        **classification_report(matrix.numpy(), setup.data.classes),
    }
    write_report(output, report)
    progress.report(report)
    return report


# -- helpers ----------------------------------------------------------------------------------


def _batches(s: Setup, split: str, shuffle: bool) -> Batches:
    data = s.recipe.data
    train = split == "train"
    batch_size = data.batch_size if train else (data.eval_batch_size or 2 * data.batch_size)
    part = s.data.splits[split]
    return make_batches(
        part,
        batch_size,
        s.device,
        loader=data.loader,
        shuffle=shuffle,
        drop_last=train and len(part) > batch_size,
        seed=s.recipe.seed,
        num_workers=data.num_workers,
    )


def _accuracy(matrix: torch.Tensor) -> float:
    total = int(matrix.sum())
    return float(matrix.diagonal().sum()) / total if total else 0.0


def _update_best(state: TrainState, row: dict[str, Any], monitor: str) -> bool:
    """Record the monitored value; True when this epoch is the best so far (and finite)."""
    value = row[monitor] if row[monitor] is not None else row["train_loss"]
    if not math.isfinite(value):
        return False
    better = state.best is None or (
        value > state.best if monitor == "val_accuracy" else value < state.best
    )
    if better:
        state.best, state.best_epoch = value, row["epoch"]
    return better


def _checkpoint_state(s: Setup, optimizer, schedule, state: TrainState) -> dict[str, Any]:
    return {
        "recipe": s.recipe.to_dict(),
        "model": s.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": s.precision.scaler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "rng": rng_state(),
        "metrics": {"best": state.best, "best_epoch": state.best_epoch, "history": state.history},
        "classes": list(s.data.classes),
        "data_meta": s.data.meta(),
    }


def _load_weights(model: torch.nn.Module, checkpoint: dict, path: Path) -> None:
    """Load a checkpoint's weights; weights of another architecture are a user error (exit 2)."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise UserError(
            f"the weights in {path} do not fit this recipe's model: they were trained with "
            f"model {checkpoint['recipe'].get('model')}. Use that model section (drop model.* "
            "overrides)."
        ) from None


def _restore(checkpoint: dict, path: Path, s: Setup, optimizer, schedule) -> TrainState:
    """Load a checkpoint's training state into freshly built objects (resume)."""
    saved, wanted = checkpoint["recipe"]["optimizer"]["name"], s.recipe.optimizer["name"]
    if saved != wanted:  # another optimizer's state loads silently, then fails mid-step
        raise UserError(
            f"optimizer: {path} was trained with '{saved}' but the recipe's optimizer is "
            f"'{wanted}'; resume with the optimizer the run started with."
        )
    _load_weights(s.model, checkpoint, path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    schedule.load_state_dict(checkpoint["scheduler"])
    s.precision.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    metrics = checkpoint["metrics"]
    return TrainState(
        epoch=checkpoint["epoch"],
        step=checkpoint["step"],
        best=metrics["best"],
        best_epoch=metrics["best_epoch"],
        history=list(metrics["history"]),
    )


def _last_good(run: RunFolder, state: TrainState) -> str:
    return str(run.last_path) if state.epoch > 0 and run.last_path.exists() else "none yet"


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)
