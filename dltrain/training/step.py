"""What a training step differentiates: the task's loss on an augmented batch, plus train.l1.

`ForwardLoss` holds the whole forward half of a step — augmentation and normalisation, the
model, the loss, the L1 penalty and the running sum of the epoch's loss — in one module, so
`train.compile` captures all of it in one graph: with `reduce-overhead` the step's forward
(and, through AOTAutograd, its backward) replays as one CUDA graph instead of dozens of small
kernel launches, which is what host-bound steps (small nets, large GPUs) need. The running
loss is a buffer added to in place: a static input the graph updates, never read by the host
until the display or the epoch's end asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dltrain.training.build import Setup


def loss_and_objective(
    s: Setup, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, penalised: list
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's training loss (the task's, under the run's precision) and the objective
    that is differentiated: the loss plus the train.l1 penalty on the `penalised` weights."""
    l1 = s.recipe.train.l1
    with s.precision.autocast():
        loss = s.task.training_loss(model, s.pipeline.train(x), y, s.loss_fn)
        return loss, loss + l1 * _l1_norm(penalised) if l1 else loss


def _l1_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Sum of absolute weights, in one fused kernel per dtype (foreach)."""
    return torch.stack(torch._foreach_norm(params, 1)).sum()


class ForwardLoss(torch.nn.Module):
    """model → loss → objective for one micro-batch, adding `loss × batch size` to the
    `loss_sum` buffer when `sums_loss` (train.on_nonfinite: stop). With skip_step the caller
    adds only the losses it keeps, after looking at each."""

    def __init__(self, s: Setup, model: torch.nn.Module, penalised: list, sums_loss: bool):
        super().__init__()
        self.model = model
        self.setup, self.penalised, self.sums_loss = s, penalised, sums_loss
        self.register_buffer("loss_sum", torch.zeros((), device=s.device), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, objective = loss_and_objective(self.setup, self.model, x, y, self.penalised)
        if self.sums_loss:
            self.loss_sum += loss.detach().float() * y.shape[0]
        return loss, objective
