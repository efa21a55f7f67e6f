"""The fit loop: set up from a recipe, train epoch by epoch, checkpoint, evaluate the best model.

It reads top to bottom: `fit` builds everything, `train_one_epoch` is the update, `evaluate` is
the confusion-matrix pass. Running loss and metrics stay on the device; the host reads them only
when the display refreshes and once per epoch, so the GPU never waits on Python.

Under torchrun every process runs this same loop on its shard of each batch, with the model in
DistributedDataParallel. Decisions that end or save the run (a stop signal, a non-finite loss)
are agreed by all processes at the same steps, so none is left waiting; rank 0 alone writes
the run folder and prints.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dltrain.amp import MixedPrecision
from dltrain.checkpoint import load_checkpoint, rng_state, set_rng_state
from dltrain.data.loaders import Batches, Shard, make_batches
from dltrain.data.pipeline import BatchPipeline
from dltrain.data.prepare import PreparedData, prepare_data
from dltrain.devices import resolve_device, step_marker
from dltrain.distributed import World, process_device, process_group, world_from_environment
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
# Under DDP the processes must take such decisions at the same step, so they agree every this
# many steps instead (one tiny all-reduce), and before every save.
AGREE_EVERY_STEPS = 50
LAUNCHER_ECHO_SECONDS = 2.0  # see GracefulStop


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
    world: World = field(default_factory=World)
    sync: Any = None  # ends a step on lazy devices (torch_xla.sync); None elsewhere

    def end_step(self) -> None:
        if self.sync is not None:
            self.sync()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_setup(
    recipe: Recipe,
    device: str | torch.device | None = None,
    meta: dict | None = None,
    world: World | None = None,
) -> Setup:
    """Resolve the device, load the data, build model, loss, numerics and batch pipeline.

    Every process of a distributed run builds the same model from the same seed (DDP then
    checks that they agree); the first process of each node prepares the data first, so a
    download happens once per node.
    """
    world = world or World()
    seed_everything(recipe.seed)
    dev = device if isinstance(device, torch.device) else resolve_device(device or recipe.device)
    tune_for_training(dev, recipe.train.cudnn_benchmark, recipe.train.tf32)
    if world.local_rank != 0:
        world.barrier()
    data = prepare_data(recipe.data, recipe.seed, meta)
    if world.local_rank == 0:
        world.barrier()
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
        world,
        step_marker(dev),
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
    model: torch.nn.Module  # what trains: s.model, in DDP and/or torch.compile
    eval_model: torch.nn.Module  # what evaluates: s.model, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    run: RunFolder
    progress: Progress
    log: RunLog
    stop: GracefulStop
    state: TrainState
    started: float = field(default_factory=time.perf_counter)  # for the time to first step
    stepped: bool = False  # has this process taken an optimizer step yet

    @property
    def ddp(self) -> torch.nn.parallel.DistributedDataParallel | None:
        module = getattr(self.model, "_orig_mod", self.model)  # under torch.compile
        return module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else None


def fit(recipe: Recipe, run: RunFolder, progress: Progress, resume: Path | None = None) -> dict:
    """Train as the recipe says, write the run folder, and return the test report.

    Under torchrun this joins the process group first; see the module docstring.
    """
    world = world_from_environment()
    device = resolve_device(process_device(recipe.device, world))
    with process_group(world, device, recipe.distributed):
        return _fit(recipe, run, progress, resume, world, device)


def _fit(
    recipe: Recipe,
    run: RunFolder,
    progress: Progress,
    resume: Path | None,
    world: World,
    device: torch.device,
) -> dict:
    started = time.perf_counter()
    s = build_setup(recipe, device, world=world)
    train_batches = _batches(s, "train", shuffle=True)
    val_batches = _batches(s, "val", shuffle=False) if "val" in s.data.splits else None
    optimizer = OPTIMIZERS.build(
        recipe.optimizer, params=s.model.parameters(), device_type=s.device.type
    )
    schedule = _schedule(recipe, optimizer, len(train_batches))
    state = TrainState()
    # rank 0's files decide (nodes may not share a disk)
    resume = world.broadcast_object(resume, s.device)
    if resume is not None:
        checkpoint = world.broadcast_object(
            load_checkpoint(resume) if world.is_main else None, s.device
        )
        state = _restore(checkpoint, resume, s, optimizer, schedule)
        if not world.is_main:  # rank 0 carries the epoch's saved totals; the others add theirs
            state.epoch_loss_sum, state.epoch_seen = 0.0, 0
    log = RunLog(run.root, tensorboard=recipe.logging.tensorboard, enabled=world.is_main)
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
    if world.launched:
        progress.note(_data_parallel_line(world, train_batches.batch_size, recipe.train.accumulate))
    model, eval_model = _training_models(s)
    t = Training(
        s,
        model,
        eval_model,
        optimizer,
        schedule,
        run,
        progress,
        log,
        GracefulStop(echo_seconds=LAUNCHER_ECHO_SECONDS if world.launched else 0.0),
        state,
        started,
    )

    with t.stop, _logged_failures(log), _out_of_memory_is_a_run_failure(s, run):
        for epoch in range(state.epoch + 1, recipe.train.epochs + 1):
            if state.stopped_early:
                break
            # train
            train_loss = train_one_epoch(t, train_batches, epoch)

            # evaluate
            val_loss, val_accuracy = None, None
            if val_batches is not None:
                validation = evaluate(eval_model, val_batches, s)
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
            improved = _update_best(state, row, recipe.train.monitor)
            _update_early_stopping(state, row, recipe.train.early_stopping)
            _check_weights_finite(t, epoch)
            if world.is_main:
                run.write_metrics(state.history)
                checkpoint = _checkpoint_state(t)
                run.save_last(checkpoint)
                if improved:
                    run.save_best(checkpoint)
            log.epoch(row)
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
            if world.any(t.stop.requested, s.device):
                raise Interrupted(t.stop.signum or signal.SIGTERM, str(run.last_path))

    # final evaluation of the best model on the test split (val when there is none)
    # (a run resumed from another folder, or one whose val loss was never finite, may have no
    # best.pt of its own: then its latest weights are what it has)
    with _logged_failures(log), _out_of_memory_is_a_run_failure(s, run):
        final = _final_checkpoint(s, run, resume)
        report = _report(s, final, run.root, progress, history=state.history)
    log.event(
        "end",
        split=report["split"],
        **{headline(report)[0].replace(" ", "_"): headline(report)[1]},
        best_epoch=state.best_epoch,
        seconds=round(time.perf_counter() - started, 3),
    )
    log.close()
    return report


def _data_parallel_line(world: World, batch_size: int, accumulate: int) -> str:
    per_step = world.size * batch_size * accumulate
    micro = f" × {accumulate} accumulated" if accumulate > 1 else ""
    return (
        f"data parallel: {world.size} processes × batch {batch_size}{micro} "
        f"= {per_step} samples per step"
    )


def _training_models(s: Setup) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The module that trains (DDP under torchrun, compiled on request) and the one that
    evaluates. Evaluation bypasses DDP: each process evaluates its own shard, and DDP's
    forward would wait for the others' (shards may differ by a batch)."""
    model = s.model
    if s.world.launched:
        section = s.recipe.distributed
        if section.sync_batchnorm:
            _use_sync_batchnorm(s)
        if s.pipeline.channels_last:
            # A channels_last weight with a size-1 dim (a first conv on 1-channel images) has
            # strides that differ from its gradient's without any difference in memory
            # layout; DDP's reducer warns about that once, needlessly.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        model = torch.nn.parallel.DistributedDataParallel(
            s.model,
            device_ids=[s.device.index] if s.device.type == "cuda" else None,
            find_unused_parameters=section.find_unused_parameters,
            static_graph=section.static_graph,
            gradient_as_bucket_view=True,  # gradients live in the buckets: no copy per step
        )
    if not s.recipe.train.compile:
        return model, s.model
    compiled = torch.compile(model)
    return compiled, compiled if model is s.model else s.model


def _use_sync_batchnorm(s: Setup) -> None:
    """Batch norm over the whole global batch: SyncBatchNorm in place of BatchNorm (same
    parameters and buffers, so the optimizer and the checkpoints are unchanged)."""
    if s.device.type != "cuda":
        raise UserError(
            f"distributed.sync_batchnorm needs CUDA GPUs (torch's SyncBatchNorm runs only there), "
            f"but this run is on {s.device.type}. Set it to false."
        )
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(s.model)


def _final_checkpoint(s: Setup, run: RunFolder, resume: Path | None) -> Path:
    """Load the weights to report on (best.pt, else last.pt) on every process; rank 0 reads
    the file and sends the weights, so nodes need not share a disk."""
    final = None
    if s.world.is_main:
        final = next(p for p in (run.best_path, run.last_path, resume) if p and Path(p).exists())
        _load_weights(s.model, load_checkpoint(final), final)
    s.world.broadcast_weights_(s.model)
    return s.world.broadcast_object(final, s.device)


def train_one_epoch(t: Training, batches: Batches, epoch: int) -> float:
    """One pass over the training data (or the rest of it, on resume). Returns the mean loss.

    Between optimizer steps it checks, without waiting on the device, for a stop request and a
    due mid-epoch checkpoint. The running loss sum is checked for NaN/inf about once a second
    (under DDP: every AGREE_EVERY_STEPS steps, by all processes together): a non-finite loss
    makes the sum non-finite, so the step itself spends no operation on the check.
    """
    s, state, train = t.s, t.state, t.s.recipe.train
    t.model.train()
    steps, accumulate = len(batches), train.accumulate
    skip_nonfinite = train.on_nonfinite == "skip_step"
    penalised = [p for p in s.model.parameters() if p.dim() > 1]  # L1 on weights, not biases
    loss_sum = torch.tensor(state.epoch_loss_sum, device=s.device)
    checked = state.batch  # batches up to here had finite losses
    started = time.perf_counter() - state.epoch_seconds
    next_check = time.perf_counter() + FINITE_CHECK_SECONDS
    t.progress.epoch_start(epoch, train.epochs, steps, done=state.batch)
    for i, (x, y) in enumerate(batches.epoch(epoch, start=state.batch), start=state.batch):
        # forward backward (under DDP, gradients are averaged over processes on a group's last
        # micro-batch only)
        steps_now = (i + 1) % accumulate == 0 or i + 1 == steps
        with _gradient_sync(t, steps_now), s.precision.autocast():
            loss = s.task.training_loss(t.model, s.pipeline.train(x), y, s.loss_fn)
            objective = loss + train.l1 * _l1_norm(penalised) if train.l1 else loss
        if skip_nonfinite and s.world.any(not bool(loss.isfinite()), s.device):  # syncs a step
            t.progress.skipped(epoch, i + 1)
        else:
            # a step's gradient is the mean over its micro-batches; the last group may be short
            group = min(accumulate, steps - i // accumulate * accumulate)
            with _gradient_sync(t, steps_now):
                s.precision.backward(objective / group if group > 1 else objective)
            # running totals stay on the device; the display reads them when it refreshes
            loss_sum += loss.detach().float() * len(y)
            state.epoch_seen += len(y)
        t.progress.step(i + 1, state.epoch_seen * s.world.size, loss_sum, state.epoch_seen)
        if not steps_now:
            s.end_step()
            continue

        # update
        s.precision.step(t.optimizer, s.model.parameters(), train.grad_clip)
        t.optimizer.zero_grad(set_to_none=True)
        t.schedule.step_batch()
        s.end_step()
        state.batch, state.step = i + 1, state.step + 1
        if not t.stepped:
            t.stepped = True
            seconds = time.perf_counter() - t.started
            t.log.event("first_step", seconds=round(seconds, 3))
            if train.compile:  # compilation happens in the first step: say what it cost
                t.progress.note(f"torch.compile: the first step took {seconds:.1f}s (compiling)")

        # between steps: non-finite check, mid-epoch checkpoint, stop request
        every = train.checkpoint_every_steps
        due = every is not None and state.step % every == 0 and i + 1 < steps
        if not (due or _check_due(t, next_check)):
            continue
        stop = _agreed_check(t, loss_sum, epoch, (checked, i + 1, steps))
        checked, next_check = i + 1, time.perf_counter() + FINITE_CHECK_SECONDS
        if (due or stop) and i + 1 < steps:
            state.epoch_loss_sum, state.epoch_seen = _epoch_totals(t, loss_sum)
            state.epoch_seconds = time.perf_counter() - started
            _check_weights_finite(t, epoch)  # never save non-finite weights
            if s.world.is_main:
                t.run.save_last(_checkpoint_state(t))
            if stop:
                t.progress.close()
                raise Interrupted(t.stop.signum or signal.SIGTERM, str(t.run.last_path))
            if not s.world.is_main:  # rank 0 carries the saved totals (as after a resume)
                state.epoch_loss_sum, state.epoch_seen = 0.0, 0
            loss_sum.fill_(state.epoch_loss_sum)

    _agreed_check(t, loss_sum, epoch, (checked, steps, steps))
    state.epoch_loss_sum, state.epoch_seen = _epoch_totals(t, loss_sum)  # the epoch's host sync
    state.epoch_seconds = time.perf_counter() - started
    return state.epoch_loss_sum / max(state.epoch_seen, 1)


def _gradient_sync(t: Training, steps_now: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() for micro-batches that only accumulate (saves an all-reduce each)."""
    ddp = t.ddp
    return ddp.no_sync() if ddp is not None and not steps_now else contextlib.nullcontext()


def _check_due(t: Training, next_check: float) -> bool:
    """Time for the non-finite/stop check: by the clock alone, or, under DDP, by the step count
    (every process must reach the check at the same step)."""
    if t.s.world.launched:
        return t.state.step % AGREE_EVERY_STEPS == 0
    return t.stop.requested or time.perf_counter() >= next_check


def _agreed_check(t: Training, loss_sum: torch.Tensor, epoch: int, batches) -> bool:
    """Stop the run on a non-finite loss (any process's); return whether a stop was requested
    (on any process). Under DDP this is one all-reduce of two numbers, at the same step."""
    s = t.s
    if not s.world.launched:
        _check_finite(t, not math.isfinite(loss_sum.item()), epoch, batches)
        return t.stop.requested
    stop = torch.tensor(int(t.stop.requested), device=s.device)
    votes = torch.stack([stop, (~loss_sum.isfinite()).long()])
    stop, bad = s.world.all_reduce_max_(votes).tolist()
    _check_finite(t, bool(bad), epoch, batches)
    return stop > 0


def _epoch_totals(t: Training, loss_sum: torch.Tensor) -> tuple[float, int]:
    """The epoch's loss sum and sample count so far, over all processes."""
    s = t.s
    if not s.world.launched:
        return loss_sum.item(), t.state.epoch_seen
    totals = torch.stack(
        [
            loss_sum.double(),
            torch.tensor(float(t.state.epoch_seen), device=s.device, dtype=torch.float64),
        ]
    )
    total_loss, seen = s.world.all_reduce_sum_(totals).tolist()
    return total_loss, int(seen)


def _l1_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Sum of absolute weights, in one fused kernel per dtype (foreach)."""
    return torch.stack(torch._foreach_norm(params, 1)).sum()


def _check_weights_finite(t: Training, epoch: int) -> None:
    """Before a save: a step with a finite loss can still leave NaN/inf weights (one sync)."""
    params = list(t.s.model.parameters())
    if params and not bool(torch.stack([p.isfinite().all() for p in params]).all()):
        last_good = t.run.last_path if t.run.last_path.exists() else None
        raise _on_every_process(
            f"the weights became non-finite in epoch {epoch}; nothing was saved. Lower "
            "optimizer.lr or set train.grad_clip. "
            + (f"Last good checkpoint: {last_good}." if last_good else "No checkpoint was written.")
        )


def _on_every_process(message: str) -> RunFailure:
    """A failure that every process of a DDP run meets at the same step (rank 0 reports it)."""
    failure = RunFailure(message)
    failure.same_on_every_process = True
    return failure


def _check_finite(t: Training, bad: bool, epoch: int, batches: tuple[int, int, int]) -> None:
    """Stop the run when a loss was NaN/inf, naming where (the batches since the last check),
    and what is safe to resume from."""
    if not bad:
        return
    first, last, steps = batches
    where = f"batch {last}" if last - first == 1 else f"batches {first + 1}–{last}"
    last_good = t.run.last_path if t.run.last_path.exists() else None
    raise _on_every_process(
        f"the training loss became non-finite in epoch {epoch} ({where} of {steps}). "
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


def evaluate(model, batches: Batches, s: Setup, keep_scores: bool = False) -> Evaluation:
    """Loss and the task's measures over a split, every sample counted once (over all processes
    under DDP); class scores on request (for AUROC, average precision, top-k: the final report,
    not every epoch)."""
    model.eval()
    accumulator = s.task.evaluator(s.data.num_classes, s.device, keep_scores)
    # torch_xla's lazy tensors do not support inference mode; no_grad is its equivalent there
    with torch.no_grad() if s.device.type == "xla" else torch.inference_mode():
        for i, (x, y) in enumerate(batches.epoch(0)):
            with s.precision.autocast():
                accumulator.update(model, s.pipeline.eval(x), y, s.loss_fn, batches.real_rows(i))
            s.end_step()
        return accumulator.result(s.world)


def evaluate_checkpoint(
    checkpoint_path: Path,
    output: Path | None,
    progress: Progress,
    split: str | None = None,
    device: str | None = None,
    overrides: list[str] = (),
) -> dict:
    """Rebuild the checkpoint's setup, load its weights, and report on a split.

    The report goes to `output` (default: eval-SPLIT beside the checkpoint), with
    confusion_matrix.png.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    recipe = resolve_with_context(
        dict(checkpoint["recipe"]), list(overrides), f"checkpoint {checkpoint_path}"
    )
    setup = build_setup(recipe, device, meta=checkpoint["data_meta"])
    _load_weights(setup.model, checkpoint, checkpoint_path)
    return _report(setup, checkpoint_path, output, progress, split)


def _report(
    s: Setup,
    checkpoint_path: Path,
    output: Path | None,
    progress: Progress,
    split: str | None = None,
    history: list[dict[str, Any]] | None = None,
) -> dict:
    """Evaluate s.model on a split and (rank 0) write report.json/.md and the plots; curves.png
    too when the training `history` is given."""
    from dltrain.report import write_report

    split = split or ("test" if "test" in s.data.splits else "val")
    if split not in s.data.splits:
        raise UserError(
            f"this dataset has no '{split}' split; choose one of: {', '.join(s.data.splits)}."
        )
    output = output or Path(checkpoint_path).parent / f"eval-{split}"
    progress.evaluating(split, len(s.data.splits[split]))
    result = evaluate(s.model, _batches(s, split, shuffle=False), s, keep_scores=True)
    report = {
        "split": split,
        "checkpoint": _relative(checkpoint_path, output),
        "task": s.task.name,
        "loss": result.loss,
        **s.task.report(result, s.data.classes),
    }
    if s.world.is_main:
        write_report(output, report, history=history, title=s.recipe.name)
    progress.report(report)
    return report


# -- helpers ----------------------------------------------------------------------------------


def _batches(s: Setup, split: str, shuffle: bool) -> Batches:
    """A split's batches for this process: its block of every global batch when training, its
    contiguous shard when evaluating (all of it in a single process)."""
    data, world = s.recipe.data, s.world
    train = split == "train"
    per_process = per_process_batch_size(data, world.size, s.recipe.train.accumulate)
    batch_size = per_process if train else (data.eval_batch_size or 2 * per_process)
    part = s.data.splits[split]
    if train and world.launched and len(part) < per_process * world.size:
        raise UserError(
            f"the train split has {len(part)} samples, fewer than one global batch "
            f"({world.size} processes × data.batch_size {per_process}); lower data.batch_size."
        )
    return make_batches(
        part,
        batch_size,
        s.device,
        loader=data.loader,
        shuffle=shuffle,
        # every process must take the same number of equal steps under DDP
        drop_last=train and (world.launched or len(part) > batch_size),
        seed=s.recipe.seed,
        num_workers=data.num_workers,
        shard=Shard(world.rank, world.size, world.local_size),
        pad_last=not train and s.device.type == "xla",  # one static shape: one compiled graph
    )


def per_process_batch_size(data, processes: int, accumulate: int) -> int:
    """data.batch_size, or data.global_batch_size shared out over processes and accumulation."""
    if data.global_batch_size is None:
        return data.batch_size
    share = processes * accumulate
    if data.global_batch_size % share:
        raise UserError(
            f"data.global_batch_size={data.global_batch_size} does not split evenly over "
            f"{processes} process(es) × train.accumulate={accumulate}; use a multiple of {share}."
        )
    return data.global_batch_size // share


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
    """What last.pt/best.pt hold. Tensors on an XLA device are copied to the CPU first (torch
    cannot serialise lazy tensors; the copy also makes the file load anywhere)."""
    s, state = t.s, t.state
    checkpoint = {
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
    return _on_cpu(checkpoint) if s.device.type == "xla" else checkpoint


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


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
