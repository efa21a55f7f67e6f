"""A run built from a recipe, apart from running it: device, data, model, loss, numerics,
batches, learning-rate schedule and the modules that train and evaluate.

`dltrain fit` builds a Setup and hands it to the loop (engine.py); `dltrain eval` builds one to
evaluate a checkpoint; `predict`, `export` and `explain` rebuild only the model (build_model),
exactly as training built it.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dltrain.config.recipe import Recipe
from dltrain.config.registry import LOSSES, MODELS, SCHEDULERS
from dltrain.data.base import ArraySplit
from dltrain.data.loaders import Batches, Shard, make_batches
from dltrain.data.pipeline import BatchPipeline
from dltrain.data.prepare import PreparedData, first_samples, prepare_data
from dltrain.errors import UserError
from dltrain.optim import LrSchedule, constant_schedule
from dltrain.system.devices import free_memory, resolve_device, step_marker
from dltrain.system.distributed import World
from dltrain.system.host import tune_for_training
from dltrain.training.precision import MixedPrecision
from dltrain.training.step import ForwardLoss
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
    if world.local_rank != 0:
        world.barrier()
    data = prepare_data(recipe.data, recipe.seed, meta, pretrained_on=recipe.model)
    if sample_limit is not None:  # fit --smoke: the first samples of each split only
        data.splits = {
            name: first_samples(split, sample_limit) for name, split in data.splits.items()
        }
    if world.local_rank == 0:
        world.barrier()
    check_tta(recipe.eval.tta, data.model_kind)  # now, not after training
    check_model_fits(recipe.model, data, dev)
    model = build_model(recipe.model, data)
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
        MixedPrecision(recipe.train.precision, dev),
        pipeline,
        task_for(data.task, data.extra),
        world,
        step_marker(dev),
    )


def build_model(section: dict[str, Any], data: PreparedData) -> torch.nn.Module:
    """A model section built for the data: dltrain supplies every run-time argument. A
    regression model with a target scale answers in the target's units (TargetScaled)."""
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
    return TargetScaled(model, scale) if scale else model


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
    shapes_only = section
    if section["name"].startswith("torchvision:"):  # pretrained weights: the shapes of random
        shapes_only = {**section, "weights": None, "freeze": "none"}  # ones, never fetched twice
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


def split_batches(s: Setup, split: str, shuffle: bool) -> Batches:
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


# -- the modules that train and evaluate ------------------------------------------------------


@dataclass
class TrainingModules:
    """The modules a fit drives, built around s.model (see training_modules)."""

    model: torch.nn.Module  # s.model, in DDP under torchrun (compiled there on request)
    forward_loss: torch.nn.Module  # `loss_module`, compiled on request in a single process
    loss_module: ForwardLoss  # the forward half of a step; its loss_sum is the epoch's running loss
    evaluate: torch.nn.Module  # s.model or the averaged weights (train.ema), compiled on request


def training_modules(s: Setup, averaged: torch.nn.Module | None = None) -> TrainingModules:
    """The modules that train (DDP under torchrun, compiled on request) and the one that
    evaluates: s.model, or the `averaged` weights (train.ema). Evaluation bypasses DDP: each
    process evaluates its own shard, and DDP's forward would wait for the others' (shards may
    differ by a batch).

    train.compile compiles the step's whole forward half (ForwardLoss: augmentation, model,
    loss, running loss) as one graph in a single process. Under DDP it compiles the wrapped
    model alone: dynamo then splits its graph at DDP's gradient buckets so their all-reduces
    overlap the backward, which it does for a DDP module it is given, not for one inside."""
    model = _data_parallel(s) if s.world.launched else s.model
    choice = s.recipe.train.compile
    mode = None if choice in (True, "default") else choice
    if choice and s.world.launched:
        model = torch.compile(model, mode=mode)
    penalised = [p for p in s.model.parameters() if p.dim() > 1]  # train.l1: weights, not biases
    loss_module = ForwardLoss(s, model, penalised, sums_loss=s.recipe.train.on_nonfinite == "stop")
    evaluate = averaged or s.model
    if not choice:
        return TrainingModules(model, loss_module, loss_module, evaluate)
    forward_loss = loss_module if s.world.launched else torch.compile(loss_module, mode=mode)
    return TrainingModules(model, forward_loss, loss_module, torch.compile(evaluate, mode=mode))


def _data_parallel(s: Setup) -> torch.nn.parallel.DistributedDataParallel:
    """s.model in DistributedDataParallel, as the recipe's distributed section asks."""
    section = s.recipe.distributed
    if section.sync_batchnorm:
        _use_sync_batchnorm(s)
    if s.pipeline.channels_last:
        # A channels_last weight with a size-1 dim (a first conv on 1-channel images) has
        # strides that differ from its gradient's without any difference in memory
        # layout; DDP's reducer warns about that once, needlessly.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    return torch.nn.parallel.DistributedDataParallel(
        s.model,
        device_ids=[s.device.index] if s.device.type == "cuda" else None,
        find_unused_parameters=section.find_unused_parameters,
        static_graph=section.static_graph,
        gradient_as_bucket_view=True,  # gradients live in the buckets: no copy per step
    )


def _use_sync_batchnorm(s: Setup) -> None:
    """Batch norm over the whole global batch: SyncBatchNorm in place of BatchNorm (same
    parameters and buffers, so the optimizer and the checkpoints are unchanged)."""
    if s.device.type != "cuda":
        raise UserError(
            f"distributed.sync_batchnorm needs CUDA GPUs (torch's SyncBatchNorm runs only there), "
            f"but this run is on {s.device.type}. Set it to false."
        )
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(s.model)
