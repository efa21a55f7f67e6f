"""What happens between optimizer steps: checks for a non-finite loss, a due mid-epoch
checkpoint and a stop request, without making the device wait at every step.

The running loss sum stays on the device; a NaN/inf loss makes the sum non-finite, so reading
the sum about once a second (a single host sync) checks every step since the last look. Under
DDP the processes must take such decisions at the same step, so they agree every
AGREE_EVERY_STEPS steps instead (one tiny all-reduce), and before every save.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from dltrain.errors import RunFailure
from dltrain.system.distributed import World
from dltrain.system.interrupts import GracefulStop

FINITE_CHECK_SECONDS = 1.0  # how often the loss is checked for NaN/inf (a device sync)
AGREE_EVERY_STEPS = 50


class StepPolicy:
    """The between-step decisions of one epoch: when to look (a clock, or a step count under
    DDP), which batches the last look covered, and the processes' agreement on what it found."""

    def __init__(
        self,
        world: World,
        device: torch.device,
        stop: GracefulStop,
        last_checkpoint: Path,
        checkpoint_every_steps: int | None,
        checked_batches: int,
    ):
        self.world, self.device, self.stop = world, device, stop
        self.last_checkpoint = last_checkpoint
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checked = checked_batches  # batches up to here had finite losses
        self.next_check = time.perf_counter() + FINITE_CHECK_SECONDS

    def checkpoint_due(self, step: int) -> bool:
        """A mid-epoch checkpoint every `train.checkpoint_every_steps` optimizer steps."""
        every = self.checkpoint_every_steps
        return every is not None and step % every == 0

    def check_due(self, step: int) -> bool:
        """Time for the non-finite/stop check: by the clock alone, or, under DDP, by the step
        count (every process must reach the check at the same step)."""
        if self.world.launched:
            return step % AGREE_EVERY_STEPS == 0
        return self.stop.requested or time.perf_counter() >= self.next_check

    def agree(self, loss_sum: torch.Tensor, epoch: int, batch: int, steps: int) -> bool:
        """Stop the run on a non-finite loss (any process's); return whether a stop was
        requested (on any process). Under DDP this is one all-reduce of two numbers."""
        if self.world.launched:
            stop = torch.tensor(int(self.stop.requested), device=self.device)
            votes = torch.stack([stop, (~loss_sum.isfinite()).long()])
            stop_votes, bad = self.world.all_reduce_max_(votes).tolist()
            requested = stop_votes > 0
        else:
            bad, requested = not math.isfinite(loss_sum.item()), self.stop.requested
        if bad:
            raise self._non_finite_loss(epoch, batch, steps)
        self.checked, self.next_check = batch, time.perf_counter() + FINITE_CHECK_SECONDS
        return requested

    def _non_finite_loss(self, epoch: int, batch: int, steps: int) -> RunFailure:
        """Name where (the batches since the last check) and what is safe to resume from."""
        first = self.checked + 1
        where = f"batch {batch}" if batch == first else f"batches {first}–{batch}"
        return failure_on_every_process(
            f"the training loss became non-finite in epoch {epoch} ({where} of {steps}). "
            "Lower optimizer.lr, set train.grad_clip, or set train.on_nonfinite=skip_step. "
            + last_good_checkpoint(self.last_checkpoint)
        )


def check_weights_finite(model: torch.nn.Module, epoch: int, last_checkpoint: Path) -> None:
    """Before a save: a step with a finite loss can still leave NaN/inf weights (one sync)."""
    params = list(model.parameters())
    if params and not bool(torch.stack([p.isfinite().all() for p in params]).all()):
        raise failure_on_every_process(
            f"the weights became non-finite in epoch {epoch}; nothing was saved. Lower "
            "optimizer.lr or set train.grad_clip. " + last_good_checkpoint(last_checkpoint)
        )


def last_good_checkpoint(path: Path) -> str:
    """The sentence that tells where the run can be resumed from after a failure."""
    if path.exists():
        return f"Last good checkpoint: {path}."
    return "No checkpoint was written."


def failure_on_every_process(message: str) -> RunFailure:
    """A failure that every process of a DDP run meets at the same step (rank 0 reports it)."""
    failure = RunFailure(message)
    failure.same_on_every_process = True
    return failure
