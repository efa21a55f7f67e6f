"""The learning-rate range test (Leslie Smith, "Cyclical Learning Rates for Training Neural
Networks", 2017; the "LR finder" of fastai and Lightning), behind `dltrain lr-find`.

The run is built from the recipe exactly as `fit` builds it (build_setup: seed, device, data,
model, loss, precision, batch pipeline; the optimizer from its registry), then trained, with
fit's own step (training/step.py train_step), for at most `steps` optimizer steps while the
learning rate grows exponentially from `start_lr` to `end_lr`: lr_i = start_lr · (end_lr /
start_lr)^(i / (steps − 1)) (the main param group's; a `norms_and_biases` group keeps its
lr_scale × that). Each step's loss is recorded along with an exponentially smoothed,
bias-corrected loss (as in Adam's moments):

    avg_i = (1 − smoothing) · avg_{i−1} + smoothing · loss_i
    smoothed_i = avg_i / (1 − (1 − smoothing)^(i+1))

The test stops early when the smoothed loss exceeds `diverge` × the best smoothed loss so far,
or when a loss is not finite. The model and optimizer are then thrown away: nothing is written to
any run folder. `write_lr_find` writes the curve (lr_find.json, lr_find.png) where it is told.

The suggestion (`suggest_index`): the lr at the steepest descent of the smoothed loss, i.e. the
most negative gradient of the loss with respect to log10(lr), taken over the points before
divergence, after the first few, up to the smoothed loss's lowest point. The gradient is that
of a lag-free smoothing (a least-squares line through the raw losses within ±0.4 decades of
each lr), not of the running average above, whose lag would put the steepest point at the
bottom of the curve, just before the loss blows up. The suggestion lies strictly inside the
explored range, on the descending part of the curve: where training makes the fastest progress,
typically several times below the lr at which the loss is lowest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dltrain.config.schema import Recipe
from dltrain.errors import UserError
from dltrain.optim import build_optimizer
from dltrain.reporting.plots import DPI, figure_classes
from dltrain.system.atomic import atomic_write, atomic_write_text
from dltrain.system.threads import choose_threads
from dltrain.training.build import Setup, build_setup, split_batches
from dltrain.training.step import ForwardLoss, Step, train_step
from dltrain.training.thread_probe import probe_step

# The suggestion (suggest_index): the loss's slope at each point is fitted over ±WINDOW_DECADES
# of lr; the first SKIP_SHARE of the points (at least 1, at most MAX_SKIP) are skipped; at least
# MIN_POINTS candidates must remain, out of at least MIN_STEPS points before divergence.
WINDOW_DECADES = 0.4
SKIP_SHARE = 0.1
MAX_SKIP = 10
MIN_POINTS = 3
MIN_STEPS = 10

Progress = Callable[[int, int, float, float], None]  # (step, steps, lr, raw loss)


@dataclass
class LrFindResult:
    """The curve of one range test: one lr and one loss per optimizer step taken."""

    lrs: list[float]
    losses: list[float]  # smoothed (bias-corrected exponential average)
    raw_losses: list[float]
    suggested_lr: float
    stopped_early: bool  # diverged (or a non-finite loss) before `steps`
    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100
    name: str = ""  # the recipe's name, for the plot's title
    suggested_index: int = -1  # the suggestion's index into lrs and losses

    def to_json(self) -> dict[str, Any]:
        return {
            "suggested_lr": self.suggested_lr,
            "lrs": list(self.lrs),
            "losses": list(self.losses),
            "raw_losses": list(self.raw_losses),
            "start_lr": self.start_lr,
            "end_lr": self.end_lr,
            "steps": self.steps,
            "stopped_early": self.stopped_early,
            "name": self.name,
        }


def find_lr(
    recipe: Recipe,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    smoothing: float = 0.05,
    diverge: float = 4.0,
    progress: Progress | None = None,
) -> LrFindResult:
    """Run the learning-rate range test on the recipe's model and training data.

    One process, eager: train.compile is not applied (compiling would cost more than the test)
    and no process group is joined; precision, accumulation, grad_clip, l1 and channels-last
    are as in fit. The scheduler plays no part: the ramp sets the lr.

    `progress`, when given, is called after every step as progress(step, steps, lr, loss), step
    counting from 1 and loss the step's raw loss. Raises UserError for arguments out of range,
    and when the loss diverged before enough points were taken to suggest an lr.
    """
    _check_arguments(start_lr, end_lr, steps, smoothing, diverge)
    setup = build_setup(recipe)  # seeds python, numpy and torch from the recipe
    choose_threads(recipe.train.threads, setup.device, lambda: probe_step(setup))
    step = _eager_step(setup)
    set_lr = _lr_setter(step.optimizer)
    micro_batches = _cycle(split_batches(setup, "train", shuffle=True))
    setup.model.train()
    curve = _Curve(smoothing, diverge)
    for i in range(steps):
        lr = ramp_lr(start_lr, end_lr, steps, i)
        set_lr(lr)
        value = _step_loss(step, micro_batches, recipe.train.accumulate, setup.device)
        if not math.isfinite(value):
            curve.stopped_early = i + 1 < steps
            break
        curve.add(lr, value)
        if progress is not None:
            progress(i + 1, steps, lr, value)
        if curve.diverges():
            curve.stopped_early, curve.diverged_at = i + 1 < steps, i
            break
    return _result(recipe.name, curve, start_lr, end_lr, steps)


def _eager_step(setup: Setup) -> Step:
    """fit's optimizer step (training/step.py) on the plain model: no DDP, no compile; the
    loss is read here after each step, so ForwardLoss keeps no running sum."""
    train = setup.recipe.train
    optimizer = build_optimizer(setup.recipe.optimizer, setup.model, setup.device.type)
    forward_loss = ForwardLoss(
        setup.model, setup.task, setup.loss_fn, setup.pipeline, setup.precision, train.l1,
        sums_loss=False, device=setup.device,
    )  # fmt: skip
    return Step(
        forward_loss, setup.model, optimizer, setup.precision, train.grad_clip,
        end_step=setup.end_step,
    )  # fmt: skip


def _lr_setter(optimizer: torch.optim.Optimizer) -> Callable[[float], None]:
    """Sets the main param group's lr; the others (norms_and_biases) keep their ratio to it."""
    main_lr = optimizer.param_groups[0]["lr"]
    ratios = [group["lr"] / main_lr for group in optimizer.param_groups]

    def set_lr(lr: float) -> None:
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio

    return set_lr


def _step_loss(step: Step, micro_batches: Iterator, accumulate: int, device: torch.device) -> float:
    """One optimizer step, fit's own (train_step): `accumulate` micro-batches, the update on
    the last. Returns its loss (the mean over the micro-batches)."""
    loss_sum = torch.zeros((), device=device)
    for k in range(accumulate):
        x, y = next(micro_batches)
        loss = train_step(step, x, y, accumulate, steps_now=k + 1 == accumulate)
        loss_sum += loss.detach().float()
    # One host read per step: the divergence test needs each loss before the next step. fit
    # never does this (the GPU would wait on Python at every step); a diagnostic of a hundred
    # steps may.
    return loss_sum.item() / accumulate


@dataclass
class _Curve:
    """The range test's points as they are taken, smoothed as the module docstring says."""

    smoothing: float
    diverge: float
    lrs: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    average: float = 0.0
    best: float = math.inf
    stopped_early: bool = False  # before the last step: diverged or a non-finite loss
    diverged_at: int | None = None  # the index of the point that diverged

    def add(self, lr: float, value: float) -> None:
        self.average = (1 - self.smoothing) * self.average + self.smoothing * value
        corrected = self.average / (1 - (1 - self.smoothing) ** (len(self.raw) + 1))
        self.lrs.append(lr)
        self.raw.append(value)
        self.smoothed.append(corrected)

    def diverges(self) -> bool:
        """Whether the newest smoothed loss is over `diverge` × the best before it; if not, it
        counts toward the best. (The losses dltrain trains with are >= 0; for one that is not,
        no ratio test.)"""
        current = self.smoothed[-1]
        if len(self.smoothed) > 1 and self.best > 0 and current > self.diverge * self.best:
            return True
        self.best = min(self.best, current)
        return False


def _result(name: str, curve: _Curve, start_lr: float, end_lr: float, steps: int) -> LrFindResult:
    """The curve with its suggestion, taken over the points before divergence (all of them,
    less the one that diverged); UserError when there is none."""
    usable = len(curve.lrs) - (curve.diverged_at is not None)
    index = suggest_index(curve.lrs[:usable], curve.raw[:usable])
    if index is None:
        if curve.diverged_at is not None or len(curve.lrs) < steps:  # ratio test, not finite
            stop = len(curve.lrs) + (curve.diverged_at is None)  # 1-based step
            why = f"it diverged at step {stop} of {steps}"
        else:
            stop = curve.smoothed.index(min(curve.smoothed)) + 1
            why = f"it was lowest at step {stop} of {steps}, and rose after"
        raise UserError(
            f"lr-find: the loss did not fall for long enough to suggest a learning rate: {why} "
            f"(lr {ramp_lr(start_lr, end_lr, steps, stop - 1):.3g}). Start lower (start_lr, now "
            f"{start_lr:g}; e.g. {start_lr / 100:g}) or ramp more slowly (more steps, now "
            f"{steps}, or a lower end_lr, now {end_lr:g})."
        )
    return LrFindResult(
        lrs=curve.lrs,
        losses=curve.smoothed,
        raw_losses=curve.raw,
        suggested_lr=curve.lrs[index],
        stopped_early=curve.stopped_early,
        start_lr=start_lr,
        end_lr=end_lr,
        steps=steps,
        name=name,
        suggested_index=index,
    )


def ramp_lr(start_lr: float, end_lr: float, steps: int, i: int) -> float:
    """The lr of step i (0-based) of an exponential ramp: start_lr at 0, end_lr at steps − 1."""
    return start_lr * (end_lr / start_lr) ** (i / max(steps - 1, 1))


def suggest_index(lrs: list[float], raw_losses: list[float]) -> int | None:
    """The index of the suggested lr among the points taken before divergence (an exponential
    ramp): where the loss falls fastest against log10(lr) on its way down to its lowest point.

    The loss is smoothed without lag for this: at each point k, a straight line is fitted by
    least squares to the raw losses within ±WINDOW_DECADES of lr_k (at least 2 points each
    side); its slope is the gradient at k and its value at k (the window's mean) the smoothed
    loss. Candidates are the points whose whole window lies before divergence, after the first
    few (SKIP_SHARE, at most MAX_SKIP), up to the lowest smoothed loss; the most negative slope
    wins. None when fewer than MIN_POINTS candidates remain.

    Why not the running average's gradient: the bias-corrected exponential average lags, and
    its gradient a·(loss_k − average_{k−1}) is most negative where the raw loss sits furthest
    below its past, i.e. near the loss's lowest point, just before it blows up, which is too
    high an lr to train with.
    """
    n = len(lrs)
    if n < MIN_STEPS:
        return None
    decades = math.log10(lrs[-1] / lrs[0])
    h = max(2, round(WINDOW_DECADES * (n - 1) / decades)) if decades > 0 else 2
    logs = [math.log10(lr) for lr in lrs]
    slope, level = {}, {}
    for k in range(h, n - h):
        xs, ys = logs[k - h : k + h + 1], raw_losses[k - h : k + h + 1]
        x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
        spread = sum((x - x_mean) ** 2 for x in xs)
        slope[k] = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / spread
        level[k] = y_mean
    if not level:
        return None
    lowest = min(level, key=lambda k: (level[k], k))
    skip = min(MAX_SKIP, max(1, int(n * SKIP_SHARE)))
    candidates = [k for k in slope if skip <= k <= lowest]
    if len(candidates) < MIN_POINTS:
        return None
    return min(candidates, key=lambda k: (slope[k], k))


def write_lr_find(result: LrFindResult, folder: Path) -> tuple[Path, Path]:
    """Write lr_find.json and lr_find.png into `folder` (created if needed), each atomically.
    Returns their paths (json, png)."""
    folder = Path(folder)
    json_path, png_path = folder / "lr_find.json", folder / "lr_find.png"
    atomic_write_text(json_path, json.dumps(result.to_json(), indent=2) + "\n")
    _plot(result, png_path)
    return json_path, png_path


# -- helpers ----------------------------------------------------------------------------------


def _check_arguments(
    start_lr: float, end_lr: float, steps: int, smoothing: float, diverge: float
) -> None:
    problems = []
    if not (math.isfinite(start_lr) and start_lr > 0):
        problems.append(f"start_lr must be a positive number (got {start_lr})")
    if not (math.isfinite(end_lr) and end_lr > start_lr):
        problems.append(f"end_lr must be larger than start_lr (got {end_lr} ≤ {start_lr})")
    if steps < MIN_STEPS:
        problems.append(f"steps must be at least {MIN_STEPS} (got {steps}); 100 is usual")
    if not 0 < smoothing <= 1:
        problems.append(f"smoothing must be in (0, 1] (got {smoothing}); 0.05 is usual")
    if not diverge > 1:
        problems.append(f"diverge must be larger than 1 (got {diverge}); 4 is usual")
    if problems:
        raise UserError("lr-find: " + "; ".join(problems) + ".")


def _cycle(batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches, epoch after epoch (each in its own seeded order), for ever."""
    epoch = 1
    while True:
        empty = True
        for batch in batches.epoch(epoch):
            empty = False
            yield batch
        if empty:
            raise UserError("the train split has no batches: give it some samples.")
        epoch += 1


def _plot(result: LrFindResult, path: Path) -> Path:
    """Loss against lr (log x axis): the raw losses faintly, the smoothed curve, the suggestion
    starred and labelled; the y axis spans the smoothed curve (raw spikes, and a blow-up much
    taller than the descent, are cut off)."""
    figure_class, canvas_class = figure_classes()
    from matplotlib.ticker import ScalarFormatter

    fig = figure_class(figsize=(8, 5), dpi=DPI, layout="constrained")
    canvas_class(fig)
    a = fig.subplots()
    lrs, losses, raw = result.lrs, result.losses, result.raw_losses
    a.plot(lrs, raw, lw=0.8, alpha=0.35, color="C0", label="loss per step")
    a.plot(lrs, losses, lw=2.0, color="C0", label="smoothed loss")
    index = result.suggested_index if 0 <= result.suggested_index < len(lrs) else None
    if index is None and result.suggested_lr in lrs:
        index = lrs.index(result.suggested_lr)
    if index is not None:
        lr, loss = lrs[index], losses[index]
        a.plot([lr], [loss], marker="*", ms=15, color="C3", ls="none", zorder=3)
        a.axvline(lr, color="C3", lw=0.8, ls="--", alpha=0.6)
        where = (math.log(lr) - math.log(lrs[0])) / max(math.log(lrs[-1] / lrs[0]), 1e-12)
        a.annotate(
            f"suggested lr {lr:.3g}\n(steepest descent)",
            (lr, loss),
            xytext=(8 if where < 0.7 else -8, 14),
            textcoords="offset points",
            ha="left" if where < 0.7 else "right",
            va="bottom",
            fontsize=10,
            color="C3",
            bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "none", "alpha": 0.8},
        )
    a.set_xscale("log")
    finite = [v for v in losses if math.isfinite(v)]
    if finite:
        # the whole smoothed curve, unless its blow-up would flatten the rest: then up to twice
        # the height of its descent (from the highest point before the suggestion to the lowest)
        low, high = min(finite), max(finite)
        before = [v for v in losses[: (index or 0) + 1] if math.isfinite(v)] or finite
        high = min(high, max(before) + (max(before) - low))
        pad = 0.08 * (high - low) if high > low else 0.1 * max(abs(high), 1e-12)
        a.set_ylim(low - pad, high + 2 * pad)
    a.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))  # 2.305, not +2.3 offsets
    a.set_xlabel("learning rate (log scale)")
    a.set_ylabel("training loss")
    a.grid(True, which="major", alpha=0.35)
    a.grid(True, which="minor", alpha=0.12)
    a.legend(loc="upper left", frameon=True)
    ended = "stopped early: the loss diverged" if result.stopped_early else "all steps taken"
    title = f"{result.name}: " if result.name else ""
    fig.suptitle(f"{title}learning-rate range test", fontsize=13)
    a.set_title(
        f"{len(lrs)} of {result.steps} steps, lr {result.start_lr:.3g} → {result.end_lr:.3g} "
        f"({ended})",
        fontsize=10,
    )
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path
