"""Parameters a model stops training after some epochs: any of its modules may have a
`frozen_at(epoch) -> list[Parameter]` method (speednet's whitening bias, trained for the first
`model.whiten_bias_epochs` epochs only, as the CIFAR-10 speed records do).

A frozen parameter still takes part in the forward and backward passes — DDP expects a gradient
for every parameter at every step, and a compiled graph stays the one it was — but its gradient
is dropped just before each optimizer step, so the optimizer leaves it exactly as it is: no
update, no momentum, no weight decay (torch's optimizers skip parameters without a gradient).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EpochFreeze:
    """Asks the model's modules at each epoch's start which parameters are frozen for it, and
    drops their gradients before every optimizer step of that epoch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.modules = [m for m in model.modules() if callable(getattr(m, "frozen_at", None))]
        self.frozen: list[nn.Parameter] = []
        if self.modules:
            optimizer.register_step_pre_hook(self._drop_gradients)

    def start_epoch(self, epoch: int) -> None:
        self.frozen = [p for m in self.modules for p in m.frozen_at(epoch)]

    def _drop_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for param in self.frozen:
            param.grad = None
