"""What `threads: auto` (dltrain.system.threads) times: for fit, one optimizer step on copies
of the run's model and optimizer — fit's own step (training/step.py) on the first training
batch, so the measurement sees the run's real kernels and sizes, while the run's weights,
optimizer state and batches stay untouched —; for eval, the evaluation's forward pass on the
split's first batch."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from dltrain.data.loaders import Batches, make_batches
from dltrain.data.prepare import first_samples
from dltrain.optim import build_optimizer
from dltrain.training.build import Setup, per_process_batch_size
from dltrain.training.step import ForwardLoss, Step, train_step


def probe_step(setup: Setup) -> Callable[[], None]:
    """A closure that runs one full optimizer step on copies, as fit would run it."""
    recipe = setup.recipe
    model = copy.deepcopy(setup.model).train()
    optimizer = build_optimizer(recipe.optimizer, model, setup.device.type)
    forward_loss = ForwardLoss(
        model, setup.task, setup.loss_fn, setup.pipeline, setup.precision, recipe.train.l1,
        sums_loss=False, device=setup.device,
    )  # fmt: skip
    step = Step(forward_loss, model, optimizer, setup.precision, recipe.train.grad_clip)
    size = per_process_batch_size(recipe.data, setup.world.size, recipe.train.accumulate)
    first = first_samples(setup.data.splits["train"], size)
    batches = make_batches(
        first, size, setup.device, loader="auto", shuffle=False, drop_last=False,
        seed=recipe.seed, num_workers=0,
    )  # fmt: skip
    x, y = next(iter(batches.epoch(0)))
    return lambda: train_step(step, x, y, 1, steps_now=True)


def probe_forward(setup: Setup, batches: Batches) -> Callable[[], None]:
    """A closure that runs the evaluation's forward pass on the first of `batches`."""
    x, _ = next(iter(batches.epoch(0)))
    model = setup.model.eval()

    def forward() -> None:
        with torch.inference_mode(), setup.precision.autocast():
            model(setup.pipeline.eval(x))

    return forward
