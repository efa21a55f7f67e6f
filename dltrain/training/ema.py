"""`train.ema`: an exponential moving average of the weights, the model that evaluates.

Fast trainers (and timm, and most published CIFAR/ImageNet recipes) evaluate an average of the
weights of the last few hundred steps rather than the last step's: it sits nearer the middle of
the valley the noisy steps bounce around in, which is worth most at the end of short runs.

The average is a copy of the model updated every `every_steps` optimizer steps with torch's own
EMA update (`torch.optim.swa_utils.get_ema_multi_avg_fn`: one foreach lerp per dtype). The
update is called here rather than through `AveragedModel.update_parameters`, whose step counter
lives on the CPU and is copied to the device at every update: a blocking copy, i.e. a host
sync per step, which dltrain's loop never makes. Batch-norm statistics are averaged with the
weights (use_buffers in swa_utils' terms), so the averaged model evaluates as it is.

In a checkpoint the averaged weights are `model` (what eval, predict, export and the final
report use, unchanged) and the training weights are `ema.training_weights`, so a resumed run
continues both exactly.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dltrain.config.schema import EmaSettings


class WeightAverage:
    """The moving average of a model's weights (and float buffers)."""

    def __init__(self, model: torch.nn.Module, settings: EmaSettings):
        self.source = model
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.settings = settings
        self.updates = 0  # how many times the average took in the weights

    def after_step(self, step: int) -> None:
        """Take in the weights after optimizer step `step` (1-based) when one is due (and after
        the first step, so the average never evaluates the initial weights)."""
        if self.updates == 0 or step % self.settings.every_steps == 0:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        """average ← decay·average + (1 − decay)·weights (a copy, the first time). Integer
        buffers (batch norm's num_batches_tracked) keep their first copy: evaluation never
        reads them, and copying each would cost a kernel per layer per update."""
        by_dtype: dict[torch.dtype, tuple[list, list]] = defaultdict(lambda: ([], []))
        for averaged, current in self._pairs():
            if self.updates == 0:
                averaged.copy_(current)
            elif averaged.is_floating_point():
                by_dtype[averaged.dtype][0].append(averaged)
                by_dtype[averaged.dtype][1].append(current)
        blend = get_ema_multi_avg_fn(self.decay())
        for averaged, current in by_dtype.values():  # foreach takes one dtype a call
            blend(averaged, current, None)
        self.updates += 1

    def decay(self) -> float:
        """This update's decay: `decay`, or with warmup min(decay, (1 + n) / (10 + n)) after n
        updates, so the average does not drag the random initial weights far into training."""
        decay = self.settings.decay
        if not self.settings.warmup:
            return decay
        return min(decay, (1 + self.updates) / (10 + self.updates))

    def _pairs(self) -> zip:
        """(averaged, training) tensors, parameters then buffers, in the same order."""
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [*self.source.parameters(), *self.source.buffers()]
        return zip((t.detach() for t in averaged), (t.detach() for t in current), strict=True)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the averaged weights (its `model`)."""
        return {"training_weights": self.source.state_dict(), "updates": self.updates}

    def load_state_dict(self, averaged: dict[str, Any], state: dict[str, Any]) -> None:
        """Put back a checkpoint's averaged weights (`model`) and training weights."""
        self.module.load_state_dict(averaged)
        self.source.load_state_dict(state["training_weights"])
        updates = state["updates"]
        if not isinstance(updates, int) or updates < 0:
            raise ValueError(f"its update count is {updates!r}")
        self.updates = updates
