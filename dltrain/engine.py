"""The fit loop: set up from a recipe, train epoch by epoch, checkpoint, evaluate the best model.

It reads top to bottom: `fit` builds everything, `train_one_epoch` is the update, `evaluate` is
the confusion-matrix pass. Running loss and metrics stay on the device; the host reads them only
when the display refreshes and once per epoch, so the GPU never waits on Python.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
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
from dltrain.errors import DltrainError, RunFailure, UserError
from dltrain.host import tune_for_training
from dltrain.interrupts import GracefulStop, Interrupted
from dltrain.optim import LrSchedule, constant_schedule
from dltrain.progress import Progress
from dltrain.recipe import Recipe, resolve_with_context
from dltrain.registry import LOSSES, MODELS, OPTIMIZERS, SCHEDULERS
from dltrain.report import headline
from dltrain.run_folder import RunFolder
from dltrain.run_log import RunLog
from dltrain.tasks import Classification, Evaluation, Regression, Seq2Seq, task_for
from dltrain.train_state import TrainState, check_resumable, direction, improves

FINITE_CHECK_SECONDS = 1.0  # how often the loss is checked for NaN/inf (a device sync)


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
    task: Classification | Regression | Seq2Seq


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_setup(recipe: Recipe, device: str | None = None, meta: dict | None = None) -> Setup:
    """Resolve the device, load the data, build model, loss, numerics and batch pipeline."""
    seed_everything(recipe.seed)
    dev = resolve_device(device or recipe.device)
    tune_for_training(dev, recipe.train.cudnn_benchmark, recipe.train.tf32)
    data = prepare_data(recipe.data, recipe.seed, meta)
    model = build_model(recipe.model, data)
    channels_last = _use_channels_last(recipe.train.channels_last, dev, data.model_kind)
    model = model.to(dev, memory_format=torch.channels_last if channels_last else None)
    loss_fn = LOSSES.build(
        recipe.loss,
        num_classes=data.num_classes,
        class_counts=data.class_counts(),
        task=data.task,
    ).to(dev)
    pipeline = BatchPipeline(
        data.kind, data.mean, data.std, dev, recipe.data.augment, channels_last, data.as_sequence
    )
    return Setup(
        recipe,
        dev,
        data,
        model,
        loss_fn,
        MixedPrecision(recipe.train.precision, dev),
        pipeline,
        task_for(data.task, data.extra),
    )


def build_model(section: dict[str, Any], data: PreparedData) -> torch.nn.Module:
    """A model section built for the data: dltrain supplies every run-time argument."""
    return MODELS.build(
        section,
        input_shape=data.model_input_shape,
        num_classes=data.num_classes,
        input_kind=data.model_kind,
        vocab_size=data.vocab_size,
        task=data.task,
        data_meta=data.meta(),
    )


def _use_channels_last(choice: str | bool, device: torch.device, kind: str) -> bool:
    # NHWC lets cuDNN use tensor-core convolution kernels; on CPU it mostly costs copies.
    return kind == "image" and (device.type == "cuda" if choice == "auto" else bool(choice))


@dataclass
class Training:
    """What one fit drives: the setup plus optimizer, schedule, run folder, display and state."""

    s: Setup
    model: torch.nn.Module  # s.model, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    run: RunFolder
    progress: Progress
    log: RunLog
    stop: GracefulStop
    state: TrainState
    started: float = field(default_factory=time.perf_counter)  # for the time to first step
    stepped: bool = False  # has this process taken an optimizer step yet


def fit(recipe: Recipe, run: RunFolder, progress: Progress, resume: Path | None = None) -> dict:
    """Train as the recipe says, write the run folder, and return the test report."""
    started = time.perf_counter()
    s = build_setup(recipe)
    train_batches = _batches(s, "train", shuffle=True)
    val_batches = _batches(s, "val", shuffle=False) if "val" in s.data.splits else None
    optimizer = OPTIMIZERS.build(
        recipe.optimizer, params=s.model.parameters(), device_type=s.device.type
    )
    schedule = _schedule(recipe, optimizer, len(train_batches))
    state = TrainState()
    if resume is not None:
        state = _restore(load_checkpoint(resume), resume, s, optimizer, schedule)
    log = RunLog(run.root, tensorboard=recipe.logging.tensorboard)  # may refuse: before writes
    run.start(recipe)
    log.event(
        "start",
        run=recipe.name,
        device=str(s.device),
        precision=s.precision.name,
        data_path=train_batches.path,
        resumed_from=str(resume) if resume else None,
        epoch=state.epoch,
        step=state.step,
    )
    progress.start(recipe, s.device, s.precision.name, train_batches.path, s.model, s.data)
    model = torch.compile(s.model) if recipe.train.compile else s.model
    t = Training(s, model, optimizer, schedule, run, progress, log, GracefulStop(), state, started)

    with t.stop, _logged_failures(log), _out_of_memory_is_a_run_failure(s, run):
        for epoch in range(state.epoch + 1, recipe.train.epochs + 1):
            if state.stopped_early:
                break
            # train
            train_loss = train_one_epoch(t, train_batches, epoch)

            # evaluate
            val_loss, val_accuracy = None, None
            if val_batches is not None:
                validation = evaluate(model, val_batches, s)
                val_loss, val_accuracy = validation.loss, validation.accuracy
            schedule.step_epoch(val_loss)

            # record, decide, checkpoint
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": schedule.last_lr(),
                "seconds": state.epoch_seconds,
                "samples_per_s": state.epoch_seen / max(state.epoch_seconds, 1e-9),
            }
            state.epoch = epoch
            state.start_epoch()
            state.history.append(row)
            run.write_metrics(state.history)
            log.epoch(row)
            improved = _update_best(state, row, recipe.train.monitor)
            _update_early_stopping(state, row, recipe.train.early_stopping)
            _check_weights_finite(t, epoch)
            checkpoint = _checkpoint_state(t)
            run.save_last(checkpoint)
            if improved:
                run.save_best(checkpoint)
            log.event(
                "checkpoint",
                epoch=epoch,
                last=str(run.last_path),
                best=str(run.best_path) if improved else None,
            )
            progress.epoch_end(row, improved)
            if state.stopped_early:
                progress.early_stop(epoch, state.best_epoch)
                log.event("early_stop", epoch=epoch, best_epoch=state.best_epoch)
            if t.stop.requested:
                raise Interrupted(t.stop.signum, str(run.last_path))

    # final evaluation of the best model on the test split (val when there is none)
    # (a run resumed from another folder, or one whose val loss was never finite, may have no
    # best.pt of its own: then its latest weights are what it has)
    final = next(p for p in (run.best_path, run.last_path, resume) if p and Path(p).exists())
    with _logged_failures(log), _out_of_memory_is_a_run_failure(s, run):
        report = evaluate_checkpoint(final, run.root, progress, s, history=state.history)
    log.event(
        "end",
        split=report["split"],
        **{headline(report)[0].replace(" ", "_"): headline(report)[1]},
        best_epoch=state.best_epoch,
        seconds=round(time.perf_counter() - started, 3),
    )
    log.close()
    return report


def train_one_epoch(t: Training, batches: Batches, epoch: int) -> float:
    """One pass over the training data (or the rest of it, on resume). Returns the mean loss.

    Between optimizer steps it checks, without waiting on the device, for a stop request and a
    due mid-epoch checkpoint; the loss is checked for NaN/inf about once a second.
    """
    s, state, train = t.s, t.state, t.s.recipe.train
    t.model.train()
    steps, accumulate = len(batches), train.accumulate
    skip_nonfinite = train.on_nonfinite == "skip_step"
    penalised = [p for p in s.model.parameters() if p.dim() > 1]  # L1 on weights, not biases
    loss_sum = torch.tensor(state.epoch_loss_sum, device=s.device)
    first_bad = torch.tensor(-1, device=s.device)  # first batch with a non-finite loss
    started = time.perf_counter() - state.epoch_seconds
    next_check = time.perf_counter() + FINITE_CHECK_SECONDS
    t.progress.epoch_start(epoch, train.epochs, steps, done=state.batch)
    for i, (x, y) in enumerate(batches.epoch(epoch, start=state.batch), start=state.batch):
        # forward backward
        with s.precision.autocast():
            loss = s.task.training_loss(t.model, s.pipeline.train(x), y, s.loss_fn)
            objective = loss + train.l1 * _l1_norm(penalised) if train.l1 else loss
        finite = torch.isfinite(loss)
        if skip_nonfinite and not finite:  # opt-in: this check waits for the device each step
            t.progress.skipped(epoch, i + 1)
        else:
            # a step's gradient is the mean over its micro-batches; the last group may be short
            group = min(accumulate, steps - i // accumulate * accumulate)
            s.precision.backward(objective / group if group > 1 else objective)
            # running totals stay on the device; the display reads them when it refreshes
            loss_sum += loss.detach().float() * len(y)
            first_bad = torch.where(finite | (first_bad >= 0), first_bad, i)
            state.epoch_seen += len(y)
        t.progress.step(i + 1, state.epoch_seen, loss_sum, state.epoch_seen)
        if (i + 1) % accumulate and i + 1 < steps:
            continue

        # update
        s.precision.step(t.optimizer, s.model.parameters(), train.grad_clip)
        t.optimizer.zero_grad(set_to_none=True)
        t.schedule.step_batch()
        state.batch, state.step = i + 1, state.step + 1
        if not t.stepped:
            t.stepped = True
            seconds = time.perf_counter() - t.started
            t.log.event("first_step", seconds=round(seconds, 3))
            if train.compile:  # compilation happens in the first step: say what it cost
                t.progress.note(f"torch.compile: the first step took {seconds:.1f}s (compiling)")

        # between steps: non-finite check, mid-epoch checkpoint, stop request
        if time.perf_counter() >= next_check:
            _check_finite(t, first_bad, epoch, steps)
            next_check = time.perf_counter() + FINITE_CHECK_SECONDS
        every = train.checkpoint_every_steps
        due = every is not None and state.step % every == 0
        if (due or t.stop.requested) and i + 1 < steps:
            state.epoch_loss_sum = loss_sum.item()
            state.epoch_seconds = time.perf_counter() - started
            _check_finite(t, first_bad, epoch, steps)  # never save non-finite weights
            _check_weights_finite(t, epoch)
            t.run.save_last(_checkpoint_state(t))
            if t.stop.requested:
                t.progress.close()
                raise Interrupted(t.stop.signum, str(t.run.last_path))

    state.epoch_loss_sum = loss_sum.item()  # the epoch's one host sync (plus the check below)
    state.epoch_seconds = time.perf_counter() - started
    _check_finite(t, first_bad, epoch, steps)
    return state.epoch_loss_sum / max(state.epoch_seen, 1)


def _l1_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Sum of absolute weights, in one fused kernel per dtype (foreach)."""
    return torch.stack(torch._foreach_norm(params, 1)).sum()


def _check_weights_finite(t: Training, epoch: int) -> None:
    """Before a save: a step with a finite loss can still leave NaN/inf weights (one sync)."""
    params = list(t.s.model.parameters())
    if params and not bool(torch.stack([p.isfinite().all() for p in params]).all()):
        last_good = t.run.last_path if t.run.last_path.exists() else None
        raise RunFailure(
            f"the weights became non-finite in epoch {epoch}; nothing was saved. Lower "
            "optimizer.lr or set train.grad_clip. "
            + (f"Last good checkpoint: {last_good}." if last_good else "No checkpoint was written.")
        )


def _check_finite(t: Training, first_bad: torch.Tensor, epoch: int, steps: int) -> None:
    """Stop the run when a loss was NaN/inf, naming where, and what is safe to resume from."""
    bad = int(first_bad)
    if bad < 0:
        return
    last_good = t.run.last_path if t.run.last_path.exists() else None
    raise RunFailure(
        f"the training loss became non-finite in epoch {epoch}, batch {bad + 1} of {steps}. "
        "Lower optimizer.lr, set train.grad_clip, or set train.on_nonfinite=skip_step. "
        + (f"Last good checkpoint: {last_good}." if last_good else "No checkpoint was written.")
    )


@contextlib.contextmanager
def _out_of_memory_is_a_run_failure(s: Setup, run: RunFolder) -> Iterator[None]:
    """A device out-of-memory error becomes one message with a concrete way out (exit 1)."""
    try:
        yield
    except torch.OutOfMemoryError:
        data, train = s.recipe.data, s.recipe.train
        smaller = max(1, data.batch_size // 2)
        saved = f" Last checkpoint: {run.last_path}." if run.last_path.exists() else ""
        raise RunFailure(
            f"{s.device} ran out of memory with data.batch_size={data.batch_size} "
            f"(precision {s.precision.name}). Use data.batch_size={smaller} with "
            f"train.accumulate={train.accumulate * 2} to keep the same effective batch"
            + ("" if s.precision.name != "fp32" else ", or train.precision=bf16")
            + f".{saved}"
        ) from None


def _schedule(recipe: Recipe, optimizer, batches_per_epoch: int) -> LrSchedule:
    if not recipe.scheduler:
        return constant_schedule(optimizer)
    return SCHEDULERS.build(
        recipe.scheduler,
        optimizer=optimizer,
        epochs=recipe.train.epochs,
        steps_per_epoch=math.ceil(batches_per_epoch / recipe.train.accumulate),
    )


@torch.inference_mode()
def evaluate(model, batches: Batches, s: Setup, keep_scores: bool = False) -> Evaluation:
    """Loss and the task's measures over a split, every sample counted once; class scores on
    request (for AUROC, average precision, top-k: the final report, not every epoch)."""
    model.eval()
    accumulator = s.task.evaluator(s.data.num_classes, s.device, keep_scores)
    for x, y in batches.epoch(0):
        with s.precision.autocast():
            accumulator.update(model, s.pipeline.eval(x), y, s.loss_fn)
    return accumulator.result(batches.num_samples)


def evaluate_checkpoint(
    checkpoint_path: Path,
    output: Path | None,
    progress: Progress,
    setup: Setup | None = None,
    split: str | None = None,
    device: str | None = None,
    overrides: list[str] = (),
    history: list[dict[str, Any]] | None = None,
) -> dict:
    """Rebuild (or reuse) a setup, load the checkpoint's weights, and report on a split.

    The report goes to `output` (default: eval-SPLIT beside the checkpoint), with
    confusion_matrix.png, and curves.png when the training `history` is given.
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
    result = evaluate(setup.model, batches, setup, keep_scores=True)
    report = {
        "split": split,
        "checkpoint": _relative(checkpoint_path, output),
        "task": setup.task.name,
        "loss": result.loss,
        **setup.task.report(result, setup.data.classes),
    }
    write_report(output, report, history=history, title=setup.recipe.name)
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


def _update_best(state: TrainState, row: dict[str, Any], monitor: str) -> bool:
    """Record the monitored value; True when this epoch is the best so far (and finite)."""
    value = _monitored(row, monitor)
    if not math.isfinite(value) or not improves(value, state.best, direction(monitor)):
        return False
    state.best, state.best_epoch = value, row["epoch"]
    return True


def _update_early_stopping(state: TrainState, row: dict[str, Any], rule) -> None:
    """Count epochs without improvement; mark the run stopped after `patience` of them."""
    if rule is None:
        return
    value = _monitored(row, rule.monitor)
    mode = direction(rule.monitor, rule.mode)
    if math.isfinite(value) and improves(value, state.early_best, mode, rule.min_delta):
        state.early_best, state.epochs_without_improvement = value, 0
    else:
        state.epochs_without_improvement += 1
    state.stopped_early = state.epochs_without_improvement >= rule.patience


def _monitored(row: dict[str, Any], monitor: str) -> float:
    # without a validation split, val_* fall back to the training loss
    return row[monitor] if row[monitor] is not None else row["train_loss"]


@contextlib.contextmanager
def _logged_failures(log: RunLog) -> Iterator[None]:
    """Record how a run ended badly in events.jsonl, then let the error go on."""
    try:
        yield
    except Interrupted as stop:
        log.event("interrupted", signal=stop.signum, checkpoint=stop.checkpoint)
        raise
    except DltrainError as error:
        log.event("error", message=str(error), exit_code=error.exit_code)
        raise
    except BaseException as error:
        log.event("error", message=f"{type(error).__name__}: {error}")
        raise


def _checkpoint_state(t: Training) -> dict[str, Any]:
    s, state = t.s, t.state
    return {
        "recipe": s.recipe.to_dict(),
        "model": s.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.schedule.state_dict(),
        "scaler": s.precision.scaler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "rng": rng_state(),
        "metrics": {"best": state.best, "best_epoch": state.best_epoch, "history": state.history},
        "train_state": state.to_dict(),
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
    check_resumable(checkpoint["recipe"], s.recipe.to_dict(), str(path))
    _load_weights(s.model, checkpoint, path)
    optimizer.load_state_dict(checkpoint["optimizer"])
    schedule.load_state_dict(checkpoint["scheduler"])
    s.precision.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    return TrainState.from_dict(checkpoint["train_state"])


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)
