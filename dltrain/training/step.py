"""One optimizer step, whole: `train_step` runs it for a micro-batch, and both the fit loop and
lr-find call it. With training/precision.py (autocast, gradient scaling, clipping) this file is
all a reader needs to follow an update.

`ForwardLoss` holds the step's whole forward half — augmentation and normalisation, the model,
the loss, the train.l1 penalty and the running sum of the epoch's loss — in one module, so
`train.compile` captures all of it in one graph: with `reduce-overhead` the step's forward
(and, through AOTAutograd, its backward) replays as one CUDA graph instead of dozens of small
kernel launches, which is what host-bound steps (small nets, large GPUs) need. The running loss
is a buffer added to in place: a static input the graph updates, never read by the host until
the display or the epoch's end asks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dltrain.data.pipeline import BatchPipeline
from dltrain.errors import UserError, first_line
from dltrain.training.precision import MixedPrecision


def l1_penalised(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters train.l1 penalises: weights (more than one dimension), not biases or
    norm scales. The one place that chooses them."""
    return [p for p in model.parameters() if p.dim() > 1]


def _l1_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Sum of absolute weights, in one fused kernel per dtype (foreach)."""
    return torch.stack(torch._foreach_norm(params, 1)).sum()


class ForwardLoss(torch.nn.Module):
    """augment → model → loss → objective for one micro-batch. The objective is what is
    differentiated: the task's loss plus train.l1 × the L1 norm of the weights. With
    `sums_loss` (train.on_nonfinite: stop) it adds `loss × batch size` to the `loss_sum`
    buffer; with skip_step the caller adds only the losses it keeps, after looking at each."""

    def __init__(
        self,
        model: torch.nn.Module,
        task: Any,  # training/tasks.py: Classification, Regression or Seq2Seq
        loss_fn: torch.nn.Module,
        pipeline: BatchPipeline,
        precision: MixedPrecision,
        l1: float,
        sums_loss: bool,
        device: torch.device,
    ):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.task, self.pipeline, self.precision = task, pipeline, precision
        self.l1, self.penalised, self.sums_loss = l1, l1_penalised(model), sums_loss
        self.register_buffer("loss_sum", torch.zeros((), device=device), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.precision.autocast():
            loss = self.task.training_loss(self.model, self.pipeline.train(x), y, self.loss_fn)
            objective = loss + self.l1 * _l1_norm(self.penalised) if self.l1 else loss
        if self.sums_loss:  # one in-place kernel: the step's only bookkeeping on the device
            self.loss_sum.add_(loss.detach().float(), alpha=y.shape[0])
        return loss, objective


@dataclass
class Step:
    """What an optimizer step uses. `model` is the trained module (in DDP under torchrun);
    `forward_loss` its ForwardLoss, compiled on request."""

    forward_loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    precision: MixedPrecision
    grad_clip: float | None = None
    # train.on_nonfinite=skip_step: whether a micro-batch's loss is kept (all processes agree);
    # None: every loss is kept and nothing here waits for the device
    keeps: Callable[[torch.Tensor], bool] | None = None
    after_update: Callable[[], None] = lambda: None  # the schedule's per-step move
    end_step: Callable[[], None] = lambda: None  # lazy devices run the step's graph (XLA)
    resumed_from: Path | None = None  # until the first update after a resume: blamed on it
    parameters: list[torch.Tensor] = field(init=False)
    data_parallel: torch.nn.parallel.DistributedDataParallel | None = field(init=False)

    def __post_init__(self) -> None:
        if self.precision.scaler.is_enabled() and not getattr(
            self.optimizer, "supports_gradient_scaling", True
        ):
            raise UserError(
                "train.precision: fp16 needs gradient "
                "scaling, which optimizer muon cannot take (its filters step through copies "
                "the scaler does not see); set train.precision: bf16, or fp32 where the GPU "
                "has no bf16."
            )
        # looked up once: on steps of a millisecond, the per-step Python is what a step costs
        self.parameters = list(self.model.parameters())
        self.data_parallel = data_parallel_module(self.model)


def train_step(
    step: Step, x: torch.Tensor, y: torch.Tensor, group: int, steps_now: bool
) -> torch.Tensor | None:
    """The whole update for one micro-batch: forward, backward (the gradient is the mean over
    the `group` micro-batches of a step) and, when `steps_now`, the optimizer step. Returns the
    micro-batch's loss, or None when skip_step dropped it. Nothing here waits for the device,
    unless train.on_nonfinite=skip_step must look at each loss."""
    # forward backward (DDP all-reduces the gradients on a group's last micro-batch only)
    with _gradient_sync(step.data_parallel, steps_now):
        loss, objective = step.forward_loss(x, y)
    kept = step.keeps is None or step.keeps(loss)
    if kept:
        with _gradient_sync(step.data_parallel, steps_now):
            step.precision.backward(objective / group if group > 1 else objective)
    if steps_now:  # update on a group's last micro-batch
        _update(step)
    step.end_step()
    return loss if kept else None


def _update(step: Step) -> None:
    """The optimizer step, gradients cleared, the schedule moved on."""
    if step.resumed_from is None:
        step.precision.step(step.optimizer, step.parameters, step.grad_clip)
    else:
        with _blamed_on_checkpoint(step.resumed_from):
            step.precision.step(step.optimizer, step.parameters, step.grad_clip)
        step.resumed_from = None
    step.optimizer.zero_grad(set_to_none=True)
    step.after_update()


def data_parallel_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The DistributedDataParallel module a (maybe compiled) model is, or None."""
    module = getattr(model, "_orig_mod", model)  # under torch.compile
    return module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else None


_NO_CONTEXT = contextlib.nullcontext()


def _gradient_sync(
    ddp: torch.nn.parallel.DistributedDataParallel | None, steps_now: bool
) -> contextlib.AbstractContextManager:
    """DDP's no_sync() for micro-batches that only accumulate (saves an all-reduce each)."""
    return ddp.no_sync() if ddp is not None and not steps_now else _NO_CONTEXT


@contextlib.contextmanager
def _blamed_on_checkpoint(resumed_from: Path):
    """The first optimizer step after a resume: a saved optimizer state that loads but cannot
    step (a damaged checkpoint) is the checkpoint's fault, said so (exit 2)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (
        KeyError,
        TypeError,
        ValueError,
        IndexError,
        AttributeError,
        RuntimeError,
        AssertionError,
    ) as exc:
        raise UserError(
            f"cannot resume from {resumed_from}: its optimizer state fails on the first step "
            f"({type(exc).__name__}: {first_line(exc)}). Resume from another checkpoint, or "
            "start a new run."
        ) from None
