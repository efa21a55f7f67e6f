"""The fit loop: epochs, `train_one_epoch` and `train_step`, checkpoints, the final report.

It reads top to bottom, as nanoGPT's train.py does: `fit` takes a run built by setup.py through
its epochs (train, evaluate, record, checkpoint), then reports on the best model;
`train_one_epoch` is one pass over the training data; `train_step` is the whole update. Running
loss and metrics stay on the device; the host reads them only when the display refreshes, when
the between-step policy looks (step_policy.py) and once per epoch, so the GPU never waits on
Python.

Under torchrun every process runs this same loop on its shard of each batch, with the model in
DistributedDataParallel. Decisions that end or save the run (a stop signal, a non-finite loss)
are agreed by all processes at the same steps, so none is left waiting; rank 0 alone writes
the run folder and prints.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dltrain.config.schema import Recipe
from dltrain.data.loaders import Batches
from dltrain.errors import DltrainError
from dltrain.optim import LrSchedule, build_optimizer
from dltrain.reporting.event_log import RunLog
from dltrain.reporting.progress import Progress
from dltrain.reporting.report import headline_key
from dltrain.runs.checkpoint import load_checkpoint, load_weights, which_weights
from dltrain.runs.folder import RunFolder
from dltrain.runs.lock import holding
from dltrain.system.devices import resolve_device
from dltrain.system.distributed import World, process_device, process_group, world_from_environment
from dltrain.system.interrupts import LAUNCHER_ECHO_SECONDS, GracefulStop, Interrupted
from dltrain.system.out_of_memory import out_of_memory_is_a_run_failure
from dltrain.training.build import Setup, build_schedule, build_setup, split_batches
from dltrain.training.ema import WeightAverage
from dltrain.training.evaluate import evaluate, report_on_split, report_split
from dltrain.training.resume import checkpoint_state, restore
from dltrain.training.state import TrainState, fallback_note
from dltrain.training.step import Step, train_step
from dltrain.training.step_policy import StepPolicy, check_weights_finite
from dltrain.training.wrapping import TrainingModules, training_modules


@dataclass
class Training:
    """What one fit drives: the setup plus optimizer, schedule, run folder, display and state."""

    s: Setup
    modules: TrainingModules  # s.model in DDP, the step's forward half, what evaluates
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    run: RunFolder
    progress: Progress
    log: RunLog
    stop: GracefulStop
    state: TrainState
    started: float = field(default_factory=time.perf_counter)  # for the time to first step
    stepped: bool = False  # has this process taken an optimizer step yet
    resumed_from: Path | None = None
    ema: WeightAverage | None = None  # train.ema: the moving average that evaluates
    step: Step | None = None  # what train_step uses (built by _start_training)

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        """What last.pt/best.pt hold now; refused when the weights became non-finite."""
        check_weights_finite(self.s.model, epoch, self.run.last_path)  # never save those
        return checkpoint_state(self.s, self.optimizer, self.schedule, self.state, self.ema)


def fit(
    recipe: Recipe,
    run: RunFolder,
    progress: Progress,
    resume: Path | None = None,
    stop: GracefulStop | None = None,
    report_on: str | None = None,
    after_epoch: Callable[[dict[str, Any]], None] | None = None,
    sample_limit: int | None = None,
) -> dict:
    """Train as the recipe says, write the run folder, and return the test report.

    Under torchrun this joins the process group first; see the module docstring. SIGINT and
    SIGTERM are stop requests (`stop`, or one of its own) from start to end. `report_on`
    names the split of the final report (default: test, else val); `after_epoch` sees each
    epoch's metrics row once it is saved (a sweep reports it to its pruner, and may raise to
    end the run there: the folder then holds that epoch's consistent state). `sample_limit`
    keeps that many samples of each split (`fit --smoke`: one batch each).
    """
    world = world_from_environment()
    device = resolve_device(process_device(recipe.device, world))
    stop = stop or GracefulStop(echo_seconds=LAUNCHER_ECHO_SECONDS if world.launched else 0.0)
    # rank 0 writes the run folder: it holds its lock (`dltrain fit` took it already)
    owner = holding(run.root, "training") if world.is_main else contextlib.nullcontext()
    with owner, stop, process_group(world, device, recipe.distributed):
        if world.is_main:
            run.recover()  # a save that a crash cut short: finished or undone before reading
        t, train_batches, val_batches = _start_training(
            recipe, run, progress, resume, world, device, stop, sample_limit
        )
        return _train_and_report(t, train_batches, val_batches, resume, report_on, after_epoch)


def _train_and_report(
    t: Training,
    train_batches: Batches,
    val_batches: Batches | None,
    resume: Path | None,
    report_on: str | None = None,
    after_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict:
    """The epochs (train, evaluate, record, checkpoint), then the report on the best model."""
    s, state, recipe, run, world = t.s, t.state, t.s.recipe, t.run, t.s.world
    with (
        _logged_failures(t.log),
        out_of_memory_is_a_run_failure(s.device, recipe, s.precision.name, saved=run.last_path),
    ):
        for epoch in range(state.epoch + 1, recipe.train.epochs + 1):
            if state.stopped_early:
                break
            # train
            train_loss = train_one_epoch(t, train_batches, epoch)

            # evaluate
            validation = (
                None if val_batches is None else evaluate(t.modules.evaluate, val_batches, s)
            )
            t.schedule.step_epoch(validation.loss if validation else None)

            # record, decide, checkpoint
            row = _metrics_row(t, epoch, train_loss, validation)
            state.epoch = epoch
            state.start_epoch()
            improved = state.record_epoch(row, recipe.train.monitor, recipe.train.early_stopping)
            _save_epoch(t, row, improved)
            if world.any(t.stop.requested, s.device):
                raise Interrupted(t.stop.signum or signal.SIGTERM, str(run.last_path))
            if after_epoch is not None:
                after_epoch(row)

    # final evaluation of the best model on the test split (val when there is none); a stop
    # request ends it at the next batch (one process: under DDP all would have to agree)
    def between_batches() -> None:
        t.stop.check(str(run.last_path), "during the final evaluation")

    with _logged_failures(t.log):
        final, held = _final_checkpoint(s, run, resume)
        report = report_on_split(
            s,
            final,
            run.root,
            t.progress,
            split=report_on,
            history=state.history,
            between_batches=None if world.launched else between_batches,
            held=held,
        )
    key = headline_key(report)
    t.log.report(report)
    t.log.event(
        "end",
        split=report["split"],
        **{key: report[key]},
        best_epoch=state.best_epoch,
        seconds=round(time.perf_counter() - t.started, 3),
    )
    t.log.close()
    return report


def _start_training(
    recipe: Recipe,
    run: RunFolder,
    progress: Progress,
    resume: Path | None,
    world: World,
    device: torch.device,
    stop: GracefulStop,
    sample_limit: int | None = None,
) -> tuple[Training, Batches, Batches | None]:
    """Build the run, restore a resumed one, open the run folder and the log, say what runs."""
    started = time.perf_counter()
    s = build_setup(recipe, device, world=world, sample_limit=sample_limit)
    train_batches = split_batches(s, "train", shuffle=True)
    val_batches = split_batches(s, "val", shuffle=False) if "val" in s.data.splits else None
    optimizer = build_optimizer(recipe.optimizer, s.model, s.device.type)
    schedule = build_schedule(recipe, optimizer, len(train_batches))
    ema = WeightAverage(s.model, recipe.train.ema) if recipe.train.ema else None
    state = TrainState()
    resume = world.broadcast_object(resume, s.device)  # rank 0's files decide (nodes may not
    if resume is not None:  # share a disk)
        checkpoint = world.broadcast_object(
            load_checkpoint(resume) if world.is_main else None, s.device
        )
        state = restore(checkpoint, resume, s, optimizer, schedule, ema)
        state.keep_totals_on_main(world.is_main)
    if world.any(stop.requested, s.device):  # Ctrl-C while the data and model were prepared
        raise Interrupted(
            stop.signum or signal.SIGTERM, str(resume) if resume else None, "while starting"
        )
    log = RunLog(run.root, recipe, str(s.device), enabled=world.is_main)
    if world.is_main:
        run.start(recipe)
    log.event(
        "start",
        run=recipe.name,
        device=str(s.device),
        processes=world.size,
        precision=s.precision.name,
        data_path=train_batches.path,
        resumed_from=str(resume) if resume else None,
        epoch=state.epoch,
        step=state.step,
    )
    progress.start(recipe, s.device, s.precision.name, train_batches.path, s.model, s.data)
    if resume is not None:
        progress.note(_resume_note(resume, state, recipe.train.epochs))
    stopping = recipe.train.early_stopping
    monitors = [recipe.train.monitor] + ([stopping.monitor] if stopping else [])
    note = fallback_note(monitors, has_validation=val_batches is not None)
    if note:
        progress.note(note)
    if report_split(s.data.splits) == "train":
        progress.note(
            "no test or validation split: the final report is on the training data, which says "
            "little about new data; give data.test or set data.val_split > 0 to hold data out"
        )
    if world.launched:
        progress.data_parallel(world.size, train_batches.batch_size, recipe.train.accumulate)
    modules = training_modules(s, averaged=ema.module if ema else None)
    training = Training(s, modules, optimizer, schedule, run, progress, log, stop, state, started)
    training.resumed_from, training.ema = resume, ema
    training.step = _optimizer_step(s, modules, optimizer, schedule, resume)
    return training, train_batches, val_batches


def _optimizer_step(
    s: Setup,
    modules: TrainingModules,
    optimizer: torch.optim.Optimizer,
    schedule: LrSchedule,
    resume: Path | None,
) -> Step:
    """What train_step uses in a fit: the (compiled, DDP) modules, the optimizer, the
    schedule's per-step move, and under skip_step a check of each loss that all processes
    agree on (it waits for the device: skip_step's price)."""

    def finite(loss: torch.Tensor) -> bool:
        return not s.world.any(not bool(loss.isfinite()), s.device)

    return Step(
        modules.forward_loss,
        modules.model,
        optimizer,
        s.precision,
        s.recipe.train.grad_clip,
        keeps=None if modules.loss_module.sums_loss else finite,
        after_update=schedule.step_batch,
        end_step=s.end_step,
        resumed_from=resume,
    )


def _resume_note(resume: Path, state: TrainState, epochs: int) -> str:
    """Where a resumed run continues from, or that there is nothing left to train."""
    if state.stopped_early or (state.epoch >= epochs and state.batch == 0):
        why = "stopped early" if state.stopped_early else f"all {epochs} epochs done"
        return (
            f"{resume} is of a finished run ({why}, best epoch {state.best_epoch}): nothing to "
            "train, its report is written again. To train on, raise train.epochs (e.g. "
            f"train.epochs={epochs + 10} --resume auto); to start over, --force."
        )
    where = f", batch {state.batch} of epoch {state.epoch + 1}" if state.batch else ""
    return (
        f"resumed from {resume}: epoch {state.epoch} done{where} (step {state.step}); "
        f"continuing to epoch {epochs}"
    )


def _metrics_row(t: Training, epoch: int, train_loss: float, validation) -> dict[str, Any]:
    """One row of metrics.csv."""
    state = t.state
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": validation.loss if validation else None,
        "val_accuracy": validation.accuracy if validation else None,
        "lr": t.schedule.last_lr(),
        "seconds": state.epoch_seconds,
        "samples_per_s": state.epoch_seen / max(state.epoch_seconds, 1e-9),
    }


def _save_epoch(t: Training, row: dict[str, Any], improved: bool) -> None:
    """The end of an epoch: metrics.csv, last.pt and (when the monitor improved) best.pt."""
    run, state, epoch = t.run, t.state, row["epoch"]
    checkpoint = t.checkpoint(epoch)
    if t.s.world.is_main:
        run.save_epoch(state.history, checkpoint, improved)
    t.log.epoch(row)
    best = str(run.best_path) if improved else None
    t.log.event("checkpoint", epoch=epoch, last=str(run.last_path), best=best)
    t.progress.epoch_end(row, improved)
    if state.stopped_early:
        t.progress.early_stop(epoch, state.best_epoch)
        t.log.event("early_stop", epoch=epoch, best_epoch=state.best_epoch)


def _final_checkpoint(s: Setup, run: RunFolder, resume: Path | None) -> tuple[Path, dict[str, Any]]:
    """Load the weights to report on on every process: best.pt, else last.pt (a run resumed
    from another folder, or one whose val loss was never finite, may have no best.pt of its
    own), else the checkpoint resumed from. Returns its path and `which_weights` it holds.
    Rank 0 reads the file and sends the weights, so nodes need not share a disk."""
    final, held = None, {}
    if s.world.is_main:
        final = next(p for p in (run.best_path, run.last_path, resume) if p and Path(p).exists())
        checkpoint = load_checkpoint(final)
        load_weights(s.model, checkpoint, final)
        held = which_weights(checkpoint)
    s.world.broadcast_weights_(s.model)
    return s.world.broadcast_object((final, held), s.device)


def train_one_epoch(t: Training, batches: Batches, epoch: int) -> float:
    """One pass over the training data (or the rest of it, on resume). Returns the mean loss.

    Between optimizer steps the policy (step_policy.py) looks, without waiting on the device at
    every step, for a non-finite loss, a due mid-epoch checkpoint and a stop request.
    """
    s, state, train = t.s, t.state, t.s.recipe.train
    t.modules.loss_module.train()
    steps, accumulate = len(batches), train.accumulate
    policy = StepPolicy(
        s.world, s.device, t.stop, t.run.last_path, train.checkpoint_every_steps, state.batch
    )
    loss_sum = t.modules.loss_module.loss_sum.fill_(state.epoch_loss_sum)  # the step adds to it
    started = time.perf_counter() - state.epoch_seconds
    t.progress.epoch_start(epoch, train.epochs, steps, done=state.batch)
    for i, (x, y) in enumerate(batches.epoch(epoch, start=state.batch), start=state.batch):
        # forward backward, and update on a group's last micro-batch
        steps_now = (i + 1) % accumulate == 0 or i + 1 == steps
        group = min(accumulate, steps - i // accumulate * accumulate)  # the last may be short
        loss = train_step(t.step, x, y, group, steps_now)
        _count_micro_batch(t, loss, loss_sum, len(y), (epoch, i + 1))
        t.progress.step(i + 1, state.epoch_seen * s.world.size, loss_sum, state.epoch_seen)
        if not steps_now:
            continue
        state.batch, state.step = i + 1, state.step + 1
        if t.ema is not None:
            t.ema.after_step(state.step)
        _note_first_step(t)

        # between steps: non-finite check, mid-epoch checkpoint, stop request
        save_now = policy.checkpoint_due(state.step) and i + 1 < steps
        if not (save_now or policy.check_due(state.step)):
            continue
        stop = policy.agree(loss_sum, epoch, i + 1, steps)
        if (save_now or stop) and i + 1 < steps:
            _settle_epoch_totals(t, loss_sum, started)
            checkpoint = t.checkpoint(epoch)
            if s.world.is_main:
                t.run.save_last(checkpoint)
            if stop:
                t.progress.close()
                raise Interrupted(t.stop.signum or signal.SIGTERM, str(t.run.last_path))
            state.keep_totals_on_main(s.world.is_main)  # as after a resume
            loss_sum.fill_(state.epoch_loss_sum)

    policy.agree(loss_sum, epoch, steps, steps)
    _settle_epoch_totals(t, loss_sum, started)  # the epoch's host sync
    return state.epoch_loss_sum / max(state.epoch_seen, 1)


def _count_micro_batch(
    t: Training, loss: torch.Tensor | None, loss_sum: torch.Tensor, size: int, where: tuple
) -> None:
    """A micro-batch into the epoch's totals: its samples, and its loss when the step did not
    add it already (skip_step adds only the losses it keeps); a skipped one is said."""
    if loss is None:
        t.progress.skipped(*where)
        return
    if not t.modules.loss_module.sums_loss:
        loss_sum += loss.detach().float() * size
    t.state.epoch_seen += size


def _note_first_step(t: Training) -> None:
    """Log the time to the first optimizer step (and say what torch.compile cost)."""
    if t.stepped:
        return
    t.stepped = True
    seconds = time.perf_counter() - t.started
    t.log.event("first_step", seconds=round(seconds, 3))
    if t.s.recipe.train.compile:  # compilation happens in the first step
        t.progress.note(f"torch.compile: the first step took {seconds:.1f}s (compiling)")


def _settle_epoch_totals(t: Training, loss_sum: torch.Tensor, started: float) -> None:
    """Read the epoch's loss sum and sample count so far (over all processes) into the state."""
    state, world = t.state, t.s.world
    state.epoch_seconds = time.perf_counter() - started
    if not world.launched:
        state.epoch_loss_sum = loss_sum.item()
        return
    seen = torch.tensor(float(state.epoch_seen), device=t.s.device, dtype=torch.float64)
    total_loss, total_seen = world.all_reduce_sum_(torch.stack([loss_sum.double(), seen])).tolist()
    state.epoch_loss_sum, state.epoch_seen = total_loss, int(total_seen)


@contextlib.contextmanager
def _logged_failures(log: RunLog) -> Iterator[None]:
    """Record how a run ended badly in events.jsonl, then let the error go on."""
    try:
        yield
    except Interrupted as stop:
        log.event("interrupted", signal=stop.signum, checkpoint=stop.checkpoint)
        log.close("KILLED")
        raise
    except DltrainError as error:
        log.event("error", message=str(error), exit_code=error.exit_code)
        log.close("FAILED")
        raise
    except BaseException as error:
        log.event("error", message=f"{type(error).__name__}: {error}")
        log.close("FAILED")
        raise
