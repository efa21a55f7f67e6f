"""The modules a fit drives, wrapped around the model a run built: DistributedDataParallel
under torchrun, the step's forward half (step.ForwardLoss), torch.compile on request, and the
module that evaluates (the model or its moving average)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from dltrain.errors import UserError
from dltrain.training.build import Setup
from dltrain.training.step import ForwardLoss


@dataclass
class TrainingModules:
    """The modules a fit drives, built around setup.model (see training_modules)."""

    model: torch.nn.Module  # setup.model, in DDP under torchrun (compiled there on request)
    forward_loss: torch.nn.Module  # `loss_module`, compiled on request in a single process
    loss_module: ForwardLoss  # the forward half of a step; its loss_sum is the epoch's running loss
    evaluate: (
        torch.nn.Module
    )  # setup.model or the averaged weights (train.ema), compiled on request


def training_modules(setup: Setup, averaged: torch.nn.Module | None = None) -> TrainingModules:
    """The modules that train (DDP under torchrun, compiled on request) and the one that
    evaluates: setup.model, or the `averaged` weights (train.ema). Evaluation bypasses DDP: each
    process evaluates its own shard, and DDP's forward would wait for the others' (shards may
    differ by a batch).

    train.compile compiles the step's whole forward half (ForwardLoss: augmentation, model,
    loss, running loss) as one graph in a single process. Under DDP it compiles the wrapped
    model alone: dynamo then splits its graph at DDP's gradient buckets so their all-reduces
    overlap the backward, which it does for a DDP module it is given, not for one inside."""
    model = _data_parallel(setup) if setup.world.launched else setup.model
    choice = setup.recipe.train.compile
    mode = None if choice in (True, "default") else choice
    if choice:  # inductor's C++ build on a CPU-only machine warns "No CUDA runtime is found,
        # using CUDA_HOME=…" once: nothing a user can act on, and not dltrain's output
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if choice and setup.world.launched:
        model = torch.compile(model, mode=mode)
    train = setup.recipe.train
    sums_loss = train.on_nonfinite == "stop"
    loss_module = ForwardLoss(
        model,
        setup.task,
        setup.loss_fn,
        setup.pipeline,
        setup.precision,
        train.l1,
        sums_loss,
        setup.device,
    )
    evaluate = averaged or setup.model
    if not choice:
        return TrainingModules(model, loss_module, loss_module, evaluate)
    forward_loss = loss_module if setup.world.launched else torch.compile(loss_module, mode=mode)
    return TrainingModules(model, forward_loss, loss_module, torch.compile(evaluate, mode=mode))


def _data_parallel(setup: Setup) -> torch.nn.parallel.DistributedDataParallel:
    """setup.model in DistributedDataParallel, as the recipe's distributed section asks."""
    section = setup.recipe.distributed
    if section.sync_batchnorm:
        _use_sync_batchnorm(setup)
    if setup.pipeline.channels_last:
        # A channels_last weight with a size-1 dim (a first conv on 1-channel images) has
        # strides that differ from its gradient's without any difference in memory
        # layout; DDP's reducer warns about that once, needlessly.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    return torch.nn.parallel.DistributedDataParallel(
        setup.model,
        device_ids=[setup.device.index] if setup.device.type == "cuda" else None,
        find_unused_parameters=section.find_unused_parameters,
        static_graph=section.static_graph,
        gradient_as_bucket_view=True,  # gradients live in the buckets: no copy per step
    )


def _use_sync_batchnorm(setup: Setup) -> None:
    """Batch norm over the whole global batch: SyncBatchNorm in place of BatchNorm (same
    parameters and buffers, so the optimizer and the checkpoints are unchanged)."""
    if setup.device.type != "cuda":
        raise UserError(
            f"distributed.sync_batchnorm needs CUDA GPUs (torch's SyncBatchNorm runs only there), "
            f"but this run is on {setup.device.type}. Set it to false."
        )
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(setup.model)
