"""A run built from a recipe, apart from running it: device, data, model, loss, numerics,
batches and learning-rate schedule (the modules wrapped around them to train: wrapping.py).

`dltrain fit` builds a Setup and hands it to the loop (loop.py); `dltrain eval` builds one to
evaluate a checkpoint; `predict`, `export` and `explain` rebuild only the model (build_model),
exactly as training built it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dltrain.config.registry import LOSSES, MODELS, SCHEDULERS
from dltrain.config.schema import Recipe
from dltrain.data.base import ArraySplit
from dltrain.data.loaders import Batches, Shard, make_batches
from dltrain.data.pipeline import BatchPipeline
from dltrain.data.prepare import PreparedData, first_samples, prepare_data
from dltrain.errors import UserError
from dltrain.models.pretrained import check_pretrained_available, without_pretrained_weights
from dltrain.optim import LrSchedule, constant_schedule
from dltrain.system.devices import free_memory, resolve_device, step_marker
from dltrain.system.distributed import World
from dltrain.system.host import tune_for_training
from dltrain.training.precision import MixedPrecision
from dltrain.training.privacy import check_privacy_fits, private_model
from dltrain.training.tasks import Classification, Regression, Seq2Seq, TargetScaled, task_for
from dltrain.training.tta import check_tta


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
        """Mark the end of a step: on XLA this compiles and runs the step's graph."""
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
    sample_limit: int | None = None,
) -> Setup:
    """Resolve the device, load the data, build model, loss, numerics and batch pipeline.

    Every process of a distributed run builds the same model from the same seed (DDP then
    checks that they agree); the first process of each node prepares the data first, so a
    download happens once per node. `sample_limit` keeps the first samples of each split.
    """
    world = world or World()
    seed_everything(recipe.seed)
    dev = device if isinstance(device, torch.device) else resolve_device(device or recipe.device)
    tune_for_training(dev, recipe.train.cudnn_benchmark, recipe.train.tf32)
    check_pretrained_available(recipe.model)  # said before any data is read
    check_privacy_fits(recipe, world)
    data = _prepared_once_per_node(recipe, meta, world, sample_limit)
    recipe = with_batch_size_resolved(recipe, len(data.splits.get("train", ())), world.size)
    check_tta(recipe.eval.tta, data.model_kind)  # now, not after training
    check_model_fits(recipe.model, data, dev)
    model = _model_for(recipe, data)
    channels_last = use_channels_last(recipe.train.channels_last, dev, data.model_kind)
    model = model.to(dev, memory_format=torch.channels_last if channels_last else None)
    loss_fn = LOSSES.build(
        recipe.loss,
        num_classes=data.num_classes,
        class_counts=data.class_counts(),
        task=data.task,
    ).to(dev)
    pipeline = BatchPipeline(
        data.kind,
        data.mean,
        data.std,
        dev,
        recipe.data.augment,
        channels_last,
        data.as_sequence,
        data.input_shape,
    )
    fit_to_training_data(model, data, pipeline, dev)
    return Setup(
        recipe,
        dev,
        data,
        model,
        loss_fn,
        MixedPrecision("fp32" if recipe.privacy else recipe.train.precision, dev),
        pipeline,
        task_for(data.task, data.extra),
        world,
        step_marker(dev),
    )


def _prepared_once_per_node(
    recipe: Recipe, meta: dict | None, world: World, sample_limit: int | None
) -> PreparedData:
    """The recipe's data, prepared by each node's first process before the others read it."""
    if world.local_rank != 0:
        world.barrier()
    data = prepare_data(recipe.data, recipe.seed, meta, pretrained_on=recipe.model)
    if sample_limit is not None:  # fit --smoke: the first samples of each split only
        data.splits = {k: first_samples(v, sample_limit) for k, v in data.splits.items()}
    if world.local_rank == 0:
        world.barrier()
    return data


def _model_for(recipe: Recipe, data: PreparedData) -> torch.nn.Module:
    """The recipe's model; with `privacy:`, as Opacus can train it (fixed on request), or
    refused before training with the layers it cannot."""
    privacy = recipe.privacy
    model = build_model(recipe.model, data, fix_for_privacy=bool(privacy and privacy.fix_model))
    if privacy is not None:
        private_model(model, privacy)
    return model


def build_model(
    section: dict[str, Any], data: PreparedData, fix_for_privacy: bool = False
) -> torch.nn.Module:
    """A model section built for the data: dltrain supplies every run-time argument. A
    regression model with a target scale answers in the target's units (TargetScaled).
    `fix_for_privacy` (privacy.fix_model): the layers Opacus cannot train replaced by its
    ModuleValidator.fix, as fit trained them (eval and predict rebuild it so too)."""
    model = MODELS.build(
        section,
        input_shape=data.model_input_shape,
        num_classes=data.num_classes,
        input_kind=data.model_kind,
        vocab_size=data.vocab_size,
        task=data.task,
        data_meta=data.meta(),
    )
    scale = data.extra.get("target_scale") if data.task == "regression" else None
    model = TargetScaled(model, scale) if scale else model
    if fix_for_privacy:
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    return model


# How many training samples a model's data-fitted layers (speednet's whitening) see
FIT_SAMPLES = 5000


def fit_to_training_data(
    model: torch.nn.Module, data: PreparedData, pipeline: BatchPipeline, device: torch.device
) -> None:
    """Layers that set themselves from the data before training (a `fit_to_data(inputs)`
    method: speednet's patch whitening) see the first FIT_SAMPLES training inputs as the model
    will (scaled and normalised, not augmented). Resumed and evaluated models then load their
    saved weights over this, so it changes nothing there."""
    fitting = [m for m in model.modules() if callable(getattr(m, "fit_to_data", None))]
    if not fitting or "train" not in data.splits:
        return
    sample = first_samples(data.splits["train"], FIT_SAMPLES)
    x = sample.x if isinstance(sample, ArraySplit) else torch.stack([x for x, _ in sample])
    inputs = pipeline.eval(x.to(device))
    for module in fitting:
        module.fit_to_data(inputs)


def check_model_fits(section: dict[str, Any], data: PreparedData, device: torch.device) -> None:
    """Refuse (exit 2) a model whose weights alone exceed the device's free memory, before
    allocating them: built first on the meta device, which allocates nothing."""
    shapes_only = without_pretrained_weights(section)  # the shapes alone: nothing fetched
    try:
        with torch.device("meta"):
            probe = build_model(shapes_only, data)
    except Exception:  # a factory that needs real tensors to build: nothing to tell here
        return
    weights = sum(p.numel() * p.element_size() for p in probe.parameters())
    free = free_memory(device)
    if free is None or weights <= free:
        return
    count = sum(p.numel() for p in probe.parameters())
    raise UserError(
        f"model {section['name']} has {count:,} parameters: its weights alone need "
        f"{weights / 1e9:.1f} GB (training needs about 4× that: gradients and optimizer state), "
        f"but {device} has {free / 1e9:.1f} GB free. Make the model smaller "
        f"({_size_keys(section)})."
    )


def _size_keys(section: dict[str, Any]) -> str:
    """The model section's size settings as they are now, e.g. 'model.hidden=[1000000000]'."""
    sizes = [f"model.{k}={v}" for k, v in section.items() if k != "name" and _looks_like_size(v)]
    return ", ".join(sizes) or "see `dltrain list models` for its arguments"


def _looks_like_size(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def use_channels_last(choice: str | bool, device: torch.device, kind: str) -> bool:
    """Whether images train in NHWC memory layout (`train.channels_last`, auto: on CUDA)."""
    # NHWC lets cuDNN use tensor-core convolution kernels; on CPU it mostly costs copies.
    return kind == "image" and (device.type == "cuda" if choice == "auto" else bool(choice))


# -- batches and schedule ---------------------------------------------------------------------


def split_batches(setup: Setup, split: str, shuffle: bool) -> Batches:
    """A split's batches for this process: its block of every global batch when training, its
    contiguous shard when evaluating (all of it in a single process)."""
    data, world = setup.recipe.data, setup.world
    train = split == "train"
    per_process = per_process_batch_size(data, world.size, setup.recipe.train.accumulate)
    batch_size = per_process if train else (data.eval_batch_size or 2 * per_process)
    part = setup.data.splits[split]
    if train and world.launched and len(part) < per_process * world.size:
        raise UserError(
            f"the train split has {len(part)} samples, fewer than one global batch "
            f"({world.size} processes × data.batch_size {per_process}); lower data.batch_size."
        )
    return make_batches(
        part,
        batch_size,
        setup.device,
        loader=data.loader,
        shuffle=shuffle,
        # every process must take the same number of equal steps under DDP
        drop_last=train and (world.launched or len(part) > batch_size),
        seed=setup.recipe.seed,
        num_workers=data.num_workers,
        shard=Shard(world.rank, world.size, world.local_size),
        pad_last=not train and setup.device.type == "xla",  # one static shape: one compiled graph
    )


# data.batch_size: auto (the table default, data/csv_tables.py), measured on the tables in
# bench/RESULTS.md: about AUTO_STEPS steps an epoch, in powers of two from AUTO_SMALLEST to
# AUTO_LARGEST. A fixed 256 made a small table's epoch one step, so 50 epochs were 50 steps and
# early stopping's patience a handful (star98, 218 training rows: R² 0.10 on one split, 0.68
# at 16 steps an epoch); on randhie's 14,500 rows a batch of 1,024 trained the same R² as 256
# in half the time (a small network's step costs about twice as much for four times the rows).
# Larger batches were not measured.
AUTO_STEPS, AUTO_SMALLEST, AUTO_LARGEST = 16, 32, 1024


def auto_batch_size(rows: int) -> int:
    """The power of two nearest `rows / AUTO_STEPS`, kept within AUTO_SMALLEST..AUTO_LARGEST,
    and never more than the rows there are (under DDP a global batch must fit the split)."""
    nearest = 2 ** round(math.log2(max(rows / AUTO_STEPS, 1)))
    size = min(max(nearest, AUTO_SMALLEST), AUTO_LARGEST)
    return min(size, rows) if rows > 0 else size


def auto_batch_plan() -> str:
    """What `data.batch_size: auto` will become, for `dltrain check` (before the data is read)."""
    return (
        f"data.batch_size: auto → about {AUTO_STEPS} steps an epoch once the training rows are "
        f"known: a power of two from {AUTO_SMALLEST} to {AUTO_LARGEST:,} a process"
    )


def with_batch_size_resolved(recipe: Recipe, train_rows: int, processes: int) -> Recipe:
    """`recipe` with `data.batch_size: auto` made a number (what the checkpoint keeps)."""
    if recipe.data.batch_size != "auto":
        return recipe
    size = auto_batch_size(train_rows // processes)
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"batch_size": size})})


def per_process_batch_size(data, processes: int, accumulate: int) -> int:
    """data.batch_size, or data.global_batch_size shared out over processes and accumulation
    (an unresolved `auto`, before the data is read: the smallest it can become)."""
    if data.global_batch_size is None:
        return AUTO_SMALLEST if data.batch_size == "auto" else data.batch_size
    share = processes * accumulate
    if data.global_batch_size % share:
        raise UserError(
            f"data.global_batch_size={data.global_batch_size} does not split evenly over "
            f"{processes} process(es) × train.accumulate={accumulate}; use a multiple of {share}."
        )
    return data.global_batch_size // share


def build_schedule(recipe: Recipe, optimizer, batches_per_epoch: int) -> LrSchedule:
    """The recipe's learning-rate schedule, stepping once per optimizer step (constant: none)."""
    if not recipe.scheduler:
        return constant_schedule(optimizer)
    return SCHEDULERS.build(
        recipe.scheduler,
        optimizer=optimizer,
        epochs=recipe.train.epochs,
        steps_per_epoch=math.ceil(batches_per_epoch / recipe.train.accumulate),
    )
