"""The fit loop: epochs, `train_one_epoch`, checkpoints, the final report.

It reads top to bottom, as nanoGPT's train.py does: `fit` takes a run built by build.py through
its epochs (train, evaluate, record, checkpoint), then reports on the best model;
`train_one_epoch` is one pass over the training data; each update is step.py's `train_step`.
Running loss and metrics stay on the device; the host reads them only when the display
refreshes, when the between-step policy looks (step_policy.py) and once per epoch, so the GPU
never waits on Python.

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
from dltrain.muon import MuonWithOthers
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
from dltrain.system.threads import (
    RECHECK_MIN_EPOCH_SECONDS,
    ThreadChoice,
    choose_threads,
    drifted,
)
from dltrain.training.build import Setup, build_schedule, build_setup, split_batches
from dltrain.training.ema import WeightAverage
from dltrain.training.epoch_freeze import EpochFreeze
from dltrain.training.evaluate import evaluate, report_on_split, report_split
from dltrain.training.privacy import PrivateTraining, make_private
from dltrain.training.resume import checkpoint_state, restore
from dltrain.training.state import TrainState, fallback_note
from dltrain.training.step import Step, train_step
from dltrain.training.step_policy import StepPolicy, check_weights_finite
from dltrain.training.thread_probe import probe_step
from dltrain.training.wrapping import TrainingModules, training_modules


@dataclass
class Training:
    """What one fit drives: the setup plus optimizer, schedule, run folder, display and state."""

    setup: Setup
    modules: TrainingModules  # setup.model in DDP, the step's forward half, what evaluates
    step: Step  # what train_step uses: the modules, optimizer and precision of one update
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
    threads: ThreadChoice | None = None  # train.threads as chosen (timed again on drift)
    thread_baseline_ms: float | None = None  # the first epoch's step time after a choice
    thread_probe_ms: float | None = None  # the start's measured step time, for the first epoch
    privacy: PrivateTraining | None = None  # `privacy:`: Opacus' parts and the ε spent
    freeze: EpochFreeze | None = None  # parameters the model stops training after some epochs

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        """What last.pt/best.pt hold now; refused when the weights became non-finite."""
        check_weights_finite(self.setup.model, epoch, self.run.last_path)  # never save those
        return checkpoint_state(
            self.setup, self.optimizer, self.schedule, self.state, self.ema, self.privacy
        )


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
        training, train_batches, val_batches = _start_training(
            recipe, run, progress, resume, world, device, stop, sample_limit
        )
        return _train_and_report(training, train_batches, val_batches, report_on, after_epoch)


def _train_and_report(
    training: Training,
    train_batches: Batches,
    val_batches: Batches | None,
    report_on: str | None = None,
    after_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict:
    """The epochs, then the report on the best model; how either ends goes to the event log."""
    setup = training.setup
    with (
        _logged_failures(training.log),
        out_of_memory_is_a_run_failure(
            setup.device, setup.recipe, setup.precision.name, saved=training.run.last_path
        ),
    ):
        _train_epochs(training, train_batches, val_batches, after_epoch)
    with _logged_failures(training.log):
        report = _final_report(training, report_on)
    key = headline_key(report)
    training.log.report(report)
    training.log.event(
        "end",
        split=report["split"],
        **{key: report[key]},
        best_epoch=training.state.best_epoch,
        seconds=round(time.perf_counter() - training.started, 3),
    )
    training.log.close()
    return report


def _train_epochs(
    training: Training,
    train_batches: Batches,
    val_batches: Batches | None,
    after_epoch: Callable[[dict[str, Any]], None] | None,
) -> None:
    """The epoch loop: train, evaluate, record and checkpoint, until the last epoch, early
    stopping or a stop request."""
    setup, state, train = training.setup, training.state, training.setup.recipe.train
    for epoch in range(state.epoch + 1, train.epochs + 1):
        if state.stopped_early:
            break
        # train
        if training.freeze is not None:
            training.freeze.start_epoch(epoch)
        train_loss = train_one_epoch(training, train_batches, epoch)

        # evaluate
        validation = None
        if val_batches is not None:
            validation = evaluate(training.modules.evaluate, val_batches, setup)
        training.schedule.step_epoch(validation.loss if validation else None)

        # record, decide, checkpoint
        row = _metrics_row(training, epoch, train_loss, validation)
        _recheck_threads(training, row["seconds"], len(train_batches))
        state.epoch = epoch
        state.start_epoch()
        improved = state.record_epoch(row, train.monitor, train.early_stopping)
        _save_epoch(training, row, improved)

        # a stop request (all processes agree), then the caller's look (a sweep's pruner)
        if setup.world.any(training.stop.requested, setup.device):
            raise Interrupted(training.stop.signum or signal.SIGTERM, str(training.run.last_path))
        if after_epoch is not None:
            after_epoch(row)


def _recheck_threads(training: Training, epoch_seconds: float, steps: int) -> None:
    """train.threads auto: time the counts again when the first epoch's steps drifted far from
    the step time the start's choice measured (a choice made in a lull of the machine's load),
    or a later epoch's from the first epoch's after a choice (the load changed); said and
    logged."""
    choice = training.threads
    if choice is None or choice.how != "auto" or not choice.step_ms:
        return
    if training.privacy is not None:  # the probe's step on a copy would carry Opacus' hooks
        return
    if epoch_seconds < RECHECK_MIN_EPOCH_SECONDS:
        return
    ms_per_step = 1000 * epoch_seconds / max(steps, 1)
    reference = training.thread_baseline_ms or training.thread_probe_ms
    training.thread_probe_ms = None  # once: a data-bound epoch is slower than the probe's step
    if reference is None or not drifted(ms_per_step, reference):
        training.thread_baseline_ms = training.thread_baseline_ms or ms_per_step
        return
    setup = training.setup
    training.threads = choose_threads("auto", setup.device, lambda: probe_step(setup))
    training.thread_baseline_ms = None  # the next epoch's time, at the new choice
    training.progress.note(
        f"steps took {ms_per_step:.1f} ms against {reference:.1f} ms: timed again, "
        f"{training.threads.describe()}"
    )
    training.log.event("threads", ms_per_step=round(ms_per_step, 3), **training.threads.event())


def _final_report(training: Training, report_on: str | None) -> dict:
    """The best model's report on the test split (val when there is none). A stop request
    ends it at the next batch (in one process: under DDP all would have to agree)."""
    setup, run = training.setup, training.run

    def between_batches() -> None:
        training.stop.check(str(run.last_path), "during the final evaluation")

    final, held = _final_checkpoint(setup, run, training.resumed_from)
    if training.privacy is not None:  # the ε the whole run spent (every step counts)
        held = {**held, "privacy": training.privacy.summary()}
    return report_on_split(
        setup,
        final,
        run.root,
        training.progress,
        split=report_on,
        history=training.state.history,
        between_batches=None if setup.world.launched else between_batches,
        held=held,
    )


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
    setup = build_setup(recipe, device, world=world, sample_limit=sample_limit)
    threads = choose_threads(recipe.train.threads, setup.device, lambda: probe_step(setup))
    train_batches = split_batches(setup, "train", shuffle=True)
    val_batches = split_batches(setup, "val", shuffle=False) if "val" in setup.data.splits else None
    optimizer = build_optimizer(recipe.optimizer, setup.model, setup.device.type)
    ema = WeightAverage(setup.model, recipe.train.ema) if recipe.train.ema else None
    privacy = None
    if recipe.privacy is not None:  # after the average's copy: it needs no gradient hooks
        privacy = make_private(recipe, setup.model, train_batches, optimizer)
        train_batches, optimizer = privacy.batches, privacy.optimizer
    schedule = build_schedule(recipe, optimizer, len(train_batches))
    # rank 0's files decide (nodes may not share a disk)
    resume = world.broadcast_object(resume, setup.device)
    state = _restored_state(setup, resume, optimizer, schedule, ema, privacy)
    if world.any(stop.requested, setup.device):  # Ctrl-C while the data and model were prepared
        raise Interrupted(
            stop.signum or signal.SIGTERM, str(resume) if resume else None, "while starting"
        )
    # what ran (batch_size auto as its number) goes to MLflow; recipe.yaml keeps the recipe given
    log = RunLog(run.root, setup.recipe, str(setup.device), enabled=world.is_main)
    if world.is_main:
        run.start(recipe)
    log.event(
        "start",
        run=recipe.name,
        device=str(setup.device),
        processes=world.size,
        precision=setup.precision.name,
        data_path=train_batches.path,
        resumed_from=str(resume) if resume else None,
        epoch=state.epoch,
        step=state.step,
        **threads.event(),
    )
    _say_what_runs(progress, setup, train_batches, val_batches, resume, state)
    progress.note(threads.describe())
    if privacy is not None:
        progress.note(privacy.describe())
    if isinstance(optimizer, MuonWithOthers):  # which layers Muon takes, which the others
        progress.note(optimizer.described)
    modules = training_modules(setup, averaged=ema.module if ema else None)
    step = _optimizer_step(setup, modules, optimizer, schedule, resume)
    training = Training(setup, modules, step, optimizer, schedule, run, progress, log, stop, state)
    training.started, training.resumed_from, training.ema = started, resume, ema
    training.threads, training.thread_probe_ms = threads, threads.chosen_ms()
    training.privacy, training.freeze = privacy, EpochFreeze(setup.model, optimizer)
    return training, train_batches, val_batches


def _restored_state(
    setup: Setup,
    resume: Path | None,
    optimizer: torch.optim.Optimizer,
    schedule: LrSchedule,
    ema: WeightAverage | None,
    privacy: PrivateTraining | None,
) -> TrainState:
    """A new run's state, or a resumed one's with everything its checkpoint holds put back
    (rank 0 reads the file and sends it)."""
    if resume is None:
        return TrainState()
    world = setup.world
    checkpoint = world.broadcast_object(
        load_checkpoint(resume) if world.is_main else None, setup.device
    )
    state = restore(checkpoint, resume, setup, optimizer, schedule, ema, privacy)
    state.keep_totals_on_main(world.is_main)
    return state


def _say_what_runs(
    progress: Progress,
    setup: Setup,
    train_batches: Batches,
    val_batches: Batches | None,
    resume: Path | None,
    state: TrainState,
) -> None:
    """The display's header and its notes: what resumes, a monitor without validation data,
    a report on the training data, the data-parallel layout."""
    recipe, world = setup.recipe, setup.world
    progress.start(
        recipe, setup.device, setup.precision.name, train_batches.path, setup.model, setup.data
    )
    if resume is not None:
        progress.note(_resume_note(resume, state, recipe.train.epochs))
    stopping = recipe.train.early_stopping
    monitors = [recipe.train.monitor] + ([stopping.monitor] if stopping else [])
    note = fallback_note(monitors, has_validation=val_batches is not None)
    if note:
        progress.note(note)
    if report_split(setup.data.splits) == "train":
        progress.note(
            "no test or validation split: the final report is on the training data, which says "
            "little about new data; give data.test or set data.val_split > 0 to hold data out"
        )
    if world.launched:
        progress.data_parallel(world.size, train_batches.batch_size, recipe.train.accumulate)


def _optimizer_step(
    setup: Setup,
    modules: TrainingModules,
    optimizer: torch.optim.Optimizer,
    schedule: LrSchedule,
    resume: Path | None,
) -> Step:
    """What train_step uses in a fit: the (compiled, DDP) modules, the optimizer, the
    schedule's per-step move, and under skip_step a check of each loss that all processes
    agree on (it waits for the device: skip_step's price)."""

    def finite(loss: torch.Tensor) -> bool:
        return not setup.world.any(not bool(loss.isfinite()), setup.device)

    return Step(
        modules.forward_loss,
        modules.model,
        optimizer,
        setup.precision,
        setup.recipe.train.grad_clip,
        keeps=None if modules.loss_module.sums_loss else finite,
        after_update=schedule.step_batch,
        end_step=setup.end_step,
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


def _metrics_row(training: Training, epoch: int, train_loss: float, validation) -> dict[str, Any]:
    """One row of metrics.csv."""
    state = training.state
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": validation.loss if validation else None,
        "val_accuracy": validation.accuracy if validation else None,
        "lr": training.schedule.last_lr(),
        "seconds": state.epoch_seconds,
        "samples_per_s": state.epoch_seen / max(state.epoch_seconds, 1e-9),
        **({"epsilon": training.privacy.epsilon()} if training.privacy else {}),
    }


def _save_epoch(training: Training, row: dict[str, Any], improved: bool) -> None:
    """The end of an epoch: metrics.csv, last.pt and (when the monitor improved) best.pt."""
    run, state, epoch = training.run, training.state, row["epoch"]
    checkpoint = training.checkpoint(epoch)
    if training.setup.world.is_main:
        run.save_epoch(state.history, checkpoint, improved)
    training.log.epoch(row)
    best = str(run.best_path) if improved else None
    training.log.event("checkpoint", epoch=epoch, last=str(run.last_path), best=best)
    training.progress.epoch_end(row, improved)
    if state.stopped_early:
        training.progress.early_stop(epoch, state.best_epoch)
        training.log.event("early_stop", epoch=epoch, best_epoch=state.best_epoch)


def _final_checkpoint(
    setup: Setup, run: RunFolder, resume: Path | None
) -> tuple[Path, dict[str, Any]]:
    """Load the weights to report on on every process: best.pt, else last.pt (a run resumed
    from another folder, or one whose val loss was never finite, may have no best.pt of its
    own), else the checkpoint resumed from. Returns its path and `which_weights` it holds.
    Rank 0 reads the file and sends the weights, so nodes need not share a disk."""
    final, held = None, {}
    if setup.world.is_main:
        final = next(p for p in (run.best_path, run.last_path, resume) if p and Path(p).exists())
        checkpoint = load_checkpoint(final)
        load_weights(setup.model, checkpoint, final)
        held = which_weights(checkpoint)
    setup.world.broadcast_weights_(setup.model)
    return setup.world.broadcast_object((final, held), setup.device)


def train_one_epoch(training: Training, batches: Batches, epoch: int) -> float:
    """One pass over the training data (or the rest of it, on resume). Returns the mean loss.

    Between optimizer steps the policy (step_policy.py) looks, without waiting on the device at
    every step, for a non-finite loss, a due mid-epoch checkpoint and a stop request.
    """
    setup, state, train = training.setup, training.state, training.setup.recipe.train
    training.modules.loss_module.train()
    steps, accumulate, world = len(batches), train.accumulate, setup.world
    policy = StepPolicy(
        world, setup.device, training.stop, training.run.last_path,
        train.checkpoint_every_steps, state.batch,
    )  # fmt: skip
    loss_sum = training.modules.loss_module.loss_sum  # the step adds to it, on the device
    loss_sum.fill_(state.epoch_loss_sum)
    started = time.perf_counter() - state.epoch_seconds
    training.progress.epoch_start(epoch, train.epochs, steps, done=state.batch)
    for i, (x, y) in enumerate(batches.epoch(epoch, start=state.batch), start=state.batch):
        # forward backward, and update on a group's last micro-batch
        steps_now = (i + 1) % accumulate == 0 or i + 1 == steps
        group = min(accumulate, steps - i // accumulate * accumulate)  # the last may be short
        loss = train_step(training.step, x, y, group, steps_now)
        _count_micro_batch(training, loss, loss_sum, len(y), (epoch, i + 1))
        training.progress.step(i + 1, state.epoch_seen * world.size, loss_sum, state.epoch_seen)
        if not steps_now:
            continue
        _after_step(training, i + 1)

        # between steps: non-finite check, mid-epoch checkpoint, stop request
        _between_steps(training, policy, loss_sum, (epoch, i + 1, steps), started)

    # the epoch's end: the last look, and its one host sync
    policy.agree(loss_sum, epoch, steps, steps)
    _settle_epoch_totals(training, loss_sum, started)
    return state.epoch_loss_sum / max(state.epoch_seen, 1)


def _after_step(training: Training, done: int) -> None:
    """Count an optimizer step taken after `done` batches of the epoch; the moving average
    follows the weights (train.ema)."""
    state = training.state
    state.batch, state.step = done, state.step + 1
    if training.ema is not None:
        training.ema.after_step(state.step)
    _note_first_step(training)


def _between_steps(
    training: Training,
    policy: StepPolicy,
    loss_sum: torch.Tensor,
    where: tuple[int, int, int],
    started: float,
) -> None:
    """When the policy says to look (`where`: epoch, batches done, batches in the epoch): all
    processes agree on a non-finite loss (raised) and a stop request; a due mid-epoch
    checkpoint is saved, and a stop request saves one and ends the run."""
    state, (epoch, done, steps) = training.state, where
    save_now = policy.checkpoint_due(state.step) and done < steps
    if not (save_now or policy.check_due(state.step)):
        return
    stop = policy.agree(loss_sum, epoch, done, steps)
    if not (save_now or stop) or done == steps:  # the epoch's end saves anyway
        return
    _settle_epoch_totals(training, loss_sum, started)
    checkpoint = training.checkpoint(epoch)
    if training.setup.world.is_main:
        training.run.save_last(checkpoint)
    if stop:
        training.progress.close()
        raise Interrupted(training.stop.signum or signal.SIGTERM, str(training.run.last_path))
    state.keep_totals_on_main(training.setup.world.is_main)  # as after a resume
    loss_sum.fill_(state.epoch_loss_sum)


def _count_micro_batch(
    training: Training, loss: torch.Tensor | None, loss_sum: torch.Tensor, size: int, where: tuple
) -> None:
    """A micro-batch into the epoch's totals: its samples, and its loss when the step did not
    add it already (skip_step adds only the losses it keeps); a skipped one is said."""
    if loss is None:
        training.progress.skipped(*where)
        return
    if not training.modules.loss_module.sums_loss:
        loss_sum += loss.detach().float() * size
    training.state.epoch_seen += size


def _note_first_step(training: Training) -> None:
    """Log the time to the first optimizer step (and say what torch.compile cost)."""
    if training.stepped:
        return
    training.stepped = True
    seconds = time.perf_counter() - training.started
    training.log.event("first_step", seconds=round(seconds, 3))
    if training.setup.recipe.train.compile:  # compilation happens in the first step
        training.progress.note(f"torch.compile: the first step took {seconds:.1f}s (compiling)")


def _settle_epoch_totals(training: Training, loss_sum: torch.Tensor, started: float) -> None:
    """Read the epoch's loss sum and sample count so far (over all processes) into the state."""
    state, world = training.state, training.setup.world
    state.epoch_seconds = time.perf_counter() - started
    if not world.launched:
        state.epoch_loss_sum = loss_sum.item()
        return
    seen = torch.tensor(float(state.epoch_seen), device=training.setup.device, dtype=torch.float64)
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
