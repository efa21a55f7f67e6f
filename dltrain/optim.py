"""Optimizers (registered in OPTIMIZERS) and learning-rate schedules (in SCHEDULERS).

`build_optimizer` builds the recipe's optimizer over the model's trainable parameters. Every
optimizer section also accepts `norms_and_biases: {lr_scale, weight_decay}`: the parameters with
fewer than 2 dimensions (biases, norm layers' weights and biases) then form a second param group
with lr × lr_scale and their own weight decay (no decay on them, as timm does; a higher lr, as
fast CIFAR trainers give batch-norm biases). Schedules keep each group's ratio to the first
(main) group's lr: they multiply every group's lr by one factor, and their absolute settings
(cosine's and plateau's min_lr, onecycle's max_lr) are the main group's, scaled for the others.

Every scheduler factory returns an `LrSchedule`, the one object the fit loop drives: `step_batch()`
after each optimizer step and `step_epoch(val_loss)` after each epoch's validation. Step, multistep
and cosine schedules are per-step LambdaLR multipliers computed from the step count alone, so they
are smooth (warmup ramps per step) and resume exactly from a saved step count. Warmup is linear:
over W warmup steps the lr is base * (t + 1) / W at step t, reaching base at the last one.
"""

from __future__ import annotations

import bisect
import copy
import inspect
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from dltrain.config.registry import OPTIMIZERS, SCHEDULERS
from dltrain.errors import UserError

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Decay = Annotated[float, Field(ge=0, lt=1)]  # a moving-average coefficient (beta, alpha)
Betas = tuple[Decay, Decay]
Fused = bool | Literal["auto"]
Gamma = Annotated[float, Field(gt=0, le=1)]
Params = Iterable[Any]  # tensors, or param-group dicts as torch optimizers accept

# -- optimizers -------------------------------------------------------------------------------


FUSED_BY_DEFAULT = ("cuda", "cpu")


def _fused_devices() -> list[str]:
    """Device types with fused optimizer kernels in this PyTorch build."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # private helper; fall back to what every recent release supports
        return ["cuda", "cpu"]
    return list(_get_fused_kernels_supported_devices())


def fused_kwargs(cls: type[Optimizer], fused: Fused, device_type: str) -> dict[str, bool]:
    """The `fused=` keyword for optimizer class `cls`, or a UserError for an impossible request."""
    supported = "fused" in inspect.signature(cls).parameters
    if fused == "auto":
        # One kernel for the whole update instead of several per parameter: on CUDA and on the
        # CPU alike it is the faster step (bench/RESULTS.md: Adam 1.3x on a small MLP's step,
        # 6x on 4M parameters on the CPU). Other devices keep torch's default.
        return {"fused": True} if supported and device_type in FUSED_BY_DEFAULT else {}
    if not fused:
        return {}
    if not supported:
        raise UserError(
            f"optimizer.fused: {cls.__name__} has no fused implementation in this PyTorch; "
            "set fused: auto or false."
        )
    if device_type not in _fused_devices():
        raise UserError(
            f"optimizer.fused: fused {cls.__name__} does not run on '{device_type}' devices; "
            "set fused: auto (uses it where available) or false."
        )
    return {"fused": True}


def _make(
    cls: type[Optimizer], params: Params, fused: Fused, device_type: str, **kwargs: Any
) -> Optimizer:
    lazy = _lazy_kwargs(cls, device_type)
    optimizer = cls(params, **kwargs, **fused_kwargs(cls, fused, device_type), **lazy)
    if lazy:
        _avoid_zero_lr(optimizer)
    return optimizer


def _lazy_kwargs(cls: type[Optimizer], device_type: str) -> dict[str, bool]:
    """On XLA, keep the step count (and the bias corrections computed from it) on the device:
    as host numbers they would be constants of the step's graph, which would then differ, and
    compile again, at every step."""
    if device_type == "xla" and "capturable" in inspect.signature(cls).parameters:
        return {"capturable": True}
    return {}


@OPTIMIZERS.register()
def sgd(
    params: Params,
    lr: Positive = 0.01,
    momentum: NonNegative = 0.0,
    nesterov: bool = False,
    weight_decay: NonNegative = 0.0,
    fused: Fused = "auto",
    device_type: str = "cpu",
) -> Optimizer:
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""
    if nesterov and momentum == 0:
        raise UserError(
            "optimizer.nesterov: Nesterov momentum needs momentum > 0; "
            "set optimizer.momentum (e.g. 0.9) or nesterov: false."
        )
    return _make(
        torch.optim.SGD,
        params,
        fused,
        device_type,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
    )


@OPTIMIZERS.register()
def adam(
    params: Params,
    lr: Positive = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: Positive = 1e-8,
    weight_decay: NonNegative = 0.0,
    amsgrad: bool = False,
    fused: Fused = "auto",
    device_type: str = "cpu",
) -> Optimizer:
    """Adam; weight_decay is a classic L2 penalty added to the gradient (see adamw)."""
    return _make(
        torch.optim.Adam,
        params,
        fused,
        device_type,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
    )


@OPTIMIZERS.register()
def adamw(
    params: Params,
    lr: Positive = 1e-3,
    betas: Betas = (0.9, 0.999),
    eps: Positive = 1e-8,
    weight_decay: NonNegative = 0.01,
    amsgrad: bool = False,
    fused: Fused = "auto",
    device_type: str = "cpu",
) -> Optimizer:
    """AdamW: Adam with decoupled weight decay (the usual default for deep nets)."""
    return _make(
        torch.optim.AdamW,
        params,
        fused,
        device_type,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
    )


@OPTIMIZERS.register()
def rmsprop(
    params: Params,
    lr: Positive = 0.01,
    alpha: Decay = 0.99,
    momentum: NonNegative = 0.0,
    eps: Positive = 1e-8,
    weight_decay: NonNegative = 0.0,
    centered: bool = False,
    fused: Fused = "auto",
    device_type: str = "cpu",
) -> Optimizer:
    """RMSprop: gradients scaled by a running RMS of their recent magnitudes."""
    return _make(
        torch.optim.RMSprop,
        params,
        fused,
        device_type,
        lr=lr,
        alpha=alpha,
        momentum=momentum,
        eps=eps,
        weight_decay=weight_decay,
        centered=centered,
    )


@OPTIMIZERS.register()
def adagrad(
    params: Params,
    lr: Positive = 0.01,
    weight_decay: NonNegative = 0.0,
    eps: Positive = 1e-10,
    fused: Fused = "auto",
    device_type: str = "cpu",
) -> Optimizer:
    """Adagrad: per-parameter lrs shrinking with the sum of past squared gradients."""
    return _make(
        torch.optim.Adagrad, params, fused, device_type, lr=lr, weight_decay=weight_decay, eps=eps
    )


# -- param groups (any optimizer) --------------------------------------------------------------


class NormsAndBiases(BaseModel):
    """`optimizer.norms_and_biases`: the settings of the parameters with fewer than 2 dims."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    lr_scale: Positive = 1.0  # their lr is the optimizer's lr times this
    weight_decay: NonNegative | None = None  # None: the optimizer's weight_decay


OPTIMIZERS.add_common_argument("norms_and_biases", NormsAndBiases)


def build_optimizer(section: dict[str, Any], model: torch.nn.Module, device_type: str) -> Optimizer:
    """The optimizer of a validated `optimizer:` section over the model's parameters, in
    model.parameters() order (the layout depends on the model alone, so a resumed run's
    optimizer state loads into it): all of them, or with `norms_and_biases` the trainable
    ones in two groups (frozen ones too without it, as checkpoints written before
    norms_and_biases hold them)."""
    if section.get("norms_and_biases") is not None and section["name"] == "muon":
        raise UserError(
            "optimizer.norms_and_biases: muon trains biases and norms with its second "
            "optimizer; give them their settings in optimizer.others (which takes "
            "norms_and_biases for them, apart from the head)."
        )
    split = section.get("norms_and_biases") is not None
    params = [p for p in model.parameters() if p.requires_grad or not split]
    return optimizer_over(section, params, device_type, model=model)


def optimizer_over(
    section: dict[str, Any], params: list[torch.Tensor], device_type: str, **runtime: Any
) -> Optimizer:
    """The optimizer of a validated section over `params`: one param group, or with
    `norms_and_biases` two — those with >= 2 dims, then those with fewer (may be empty: the
    layout stays) — the second with its own lr scale and weight decay."""
    settings = section.get("norms_and_biases")
    if settings is None:
        groups = [{"params": params}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2]},
        ]
    optimizer = OPTIMIZERS.build(section, params=groups, device_type=device_type, **runtime)
    if settings is not None:
        _set_norms_and_biases(optimizer, NormsAndBiases.model_validate(settings), section)
    return optimizer


def _set_norms_and_biases(optimizer: Optimizer, settings: NormsAndBiases, section: dict) -> None:
    """Give the second param group lr × lr_scale and its own weight decay. Set after the
    optimizer is built, from the group settings it filled in, so that any optimizer works
    whatever its factory's arguments are called."""
    main, small = optimizer.param_groups
    where = f"optimizer.norms_and_biases: optimizer '{section['name']}'"
    if "lr" not in main:
        raise UserError(f"{where} has no lr to scale; remove norms_and_biases.")
    small["lr"] = main["lr"] * settings.lr_scale
    if settings.weight_decay is not None:
        if "weight_decay" not in main:
            raise UserError(f"{where} has no weight_decay; remove norms_and_biases.weight_decay.")
        small["weight_decay"] = settings.weight_decay


# Capturable Adam divides by the learning rate, so an lr of exactly 0 (the end of a cosine
# schedule) turns weights whose moments are 0 into NaN. A step at this lr instead changes
# nothing a float32 weight can show.
NEGLIGIBLE_LR = 1e-12


def _avoid_zero_lr(optimizer: Optimizer) -> None:
    """Step with NEGLIGIBLE_LR where the schedule says 0, then put the 0 back."""
    zeroed: list[dict] = []

    def before(opt, args, kwargs):
        zeroed[:] = [g for g in opt.param_groups if g["lr"] == 0]
        for group in zeroed:
            group["lr"] = NEGLIGIBLE_LR

    def after(opt, args, kwargs):
        for group in zeroed:
            group["lr"] = 0.0

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)


# -- the schedule object ----------------------------------------------------------------------


class LrSchedule:
    """The learning-rate policy of one run, driven by the fit loop per batch and per epoch.

    It combines at most two torch schedulers: `per_batch`, stepped after each optimizer step
    (while the step count is at most `batch_limit`, when given), and `plateau`, stepped with the
    validation loss after each epoch once `plateau_from` steps have passed (the warmup).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        name: str = "constant",
        *,
        per_batch: LRScheduler | None = None,
        batch_limit: int | None = None,
        plateau: ReduceLROnPlateau | None = None,
        plateau_from: int = 0,
    ):
        self.optimizer = optimizer
        self.name = name
        self.steps = 0
        self._per_batch = per_batch
        self._batch_limit = batch_limit
        self._plateau = plateau
        self._plateau_from = plateau_from

    def step_batch(self) -> None:
        """Advance the schedule by one optimizer step."""
        self.steps += 1
        within = self._batch_limit is None or self.steps <= self._batch_limit
        if self._per_batch is not None and within:
            self._per_batch.step()

    def step_epoch(self, val_loss: float | None) -> None:
        """End an epoch: a plateau schedule compares `val_loss` with its best (None: no-op)."""
        if self._plateau is None or val_loss is None or self.steps < self._plateau_from:
            return
        self._plateau.step(float(val_loss))

    def last_lr(self) -> float:
        """The current lr of the optimizer's first param group (the main one; the second,
        norms_and_biases, keeps its ratio to it)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Plain data (loadable with torch.load(weights_only=True)); save the optimizer's too."""
        return copy.deepcopy(
            {
                "name": self.name,
                "steps": self.steps,
                "per_batch": self._per_batch.state_dict() if self._per_batch else None,
                "plateau": self._plateau.state_dict() if self._plateau else None,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state (the optimizer's state, holding the lrs, loads apart)."""
        if state.get("name") != self.name:
            raise UserError(
                f"scheduler: the checkpoint's lr schedule is '{state.get('name')}' but the "
                f"recipe's is '{self.name}'; resume with the scheduler the run started with."
            )
        state = copy.deepcopy(state)  # torch schedulers keep references into the dict
        self.steps = int(state["steps"])
        if self._per_batch is not None:
            self._per_batch.load_state_dict(state["per_batch"])
        if self._plateau is not None:
            self._plateau.load_state_dict(state["plateau"])


def constant_schedule(optimizer: Optimizer) -> LrSchedule:
    """A schedule that keeps the optimizer's lr (for `scheduler: null`)."""
    return LrSchedule(optimizer, "constant")


# -- step multipliers (pure functions of the step index t; bound with functools.partial) -------


def warmup_factor(t: int, warmup_steps: int) -> float:
    """Linear warmup: (t + 1) / W during the first W steps, then 1."""
    return min(1.0, (t + 1) / warmup_steps) if warmup_steps else 1.0


def step_factor(
    t: int, steps_per_epoch: int, step_size: int, gamma: float, warmup_steps: int
) -> float:
    """gamma ** (epoch // step_size), with the epoch counted from the step index."""
    epoch = t // steps_per_epoch
    return warmup_factor(t, warmup_steps) * gamma ** (epoch // step_size)


def multistep_factor(
    t: int, steps_per_epoch: int, milestones: list[int], gamma: float, warmup_steps: int
) -> float:
    """gamma ** (number of milestones reached by the current epoch)."""
    epoch = t // steps_per_epoch
    return warmup_factor(t, warmup_steps) * gamma ** bisect.bisect_right(milestones, epoch)


def cosine_factor(t: int, total_steps: int, min_ratio: float, warmup_steps: int) -> float:
    """Warmup, then half a cosine from 1 down to min_ratio at the last step (total_steps - 1)."""
    if t < warmup_steps:
        return warmup_factor(t, warmup_steps)
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (t - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- scheduler factories ----------------------------------------------------------------------


def _total_steps(epochs: int, steps_per_epoch: int) -> int:
    if epochs < 1 or steps_per_epoch < 1:
        # dltrain computes both; zero means an empty training split slipped through.
        raise ValueError(f"need epochs, steps_per_epoch >= 1; got {epochs}, {steps_per_epoch}")
    return epochs * steps_per_epoch


def _warmup_steps(warmup_epochs: float, epochs: int, steps_per_epoch: int) -> int:
    """Warmup length in steps (at least 1 when asked for), leaving steps for the schedule."""
    if warmup_epochs == 0:
        return 0
    steps = max(1, round(warmup_epochs * steps_per_epoch))
    if steps >= _total_steps(epochs, steps_per_epoch):
        raise UserError(
            f"scheduler.warmup_epochs: {warmup_epochs} epochs of warmup leave no steps for the "
            f"schedule in a {epochs}-epoch run; set it below {epochs}."
        )
    return steps


def _lambda_schedule(optimizer: Optimizer, name: str, factor: Callable[[int], float]) -> LrSchedule:
    # The partial objects hold no state of their own, so LambdaLR's state is plain numbers.
    return LrSchedule(optimizer, name, per_batch=LambdaLR(optimizer, factor))


@SCHEDULERS.register()
def step(
    optimizer: Optimizer,
    epochs: int,
    steps_per_epoch: int,
    step_size: Annotated[int, Field(ge=1)],
    gamma: Gamma = 0.1,
    warmup_epochs: NonNegative = 0.0,
) -> LrSchedule:
    """Multiply the lr by gamma every step_size epochs (after an optional linear warmup)."""
    warmup = _warmup_steps(warmup_epochs, epochs, steps_per_epoch)
    factor = partial(
        step_factor,
        steps_per_epoch=steps_per_epoch,
        step_size=step_size,
        gamma=gamma,
        warmup_steps=warmup,
    )
    return _lambda_schedule(optimizer, "step", factor)


@SCHEDULERS.register()
def multistep(
    optimizer: Optimizer,
    epochs: int,
    steps_per_epoch: int,
    milestones: list[Annotated[int, Field(ge=1)]],
    gamma: Gamma = 0.1,
    warmup_epochs: NonNegative = 0.0,
) -> LrSchedule:
    """Multiply the lr by gamma at each milestone epoch (after an optional linear warmup)."""
    warmup = _warmup_steps(warmup_epochs, epochs, steps_per_epoch)
    factor = partial(
        multistep_factor,
        steps_per_epoch=steps_per_epoch,
        milestones=sorted(milestones),
        gamma=gamma,
        warmup_steps=warmup,
    )
    return _lambda_schedule(optimizer, "multistep", factor)


@SCHEDULERS.register()
def cosine(
    optimizer: Optimizer,
    epochs: int,
    steps_per_epoch: int,
    min_lr: NonNegative = 0.0,
    warmup_epochs: NonNegative = 0.0,
) -> LrSchedule:
    """Cosine decay per step from the optimizer's lr to min_lr at the last step (after warmup)."""
    total = _total_steps(epochs, steps_per_epoch)
    warmup = _warmup_steps(warmup_epochs, epochs, steps_per_epoch)
    base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
    if min_lr > base_lrs[0]:
        raise UserError(
            f"scheduler.min_lr: {min_lr} is above the optimizer's lr ({base_lrs[0]}); "
            "set it lower (0 decays all the way)."
        )
    # min_lr is the main group's floor: one factor for every group keeps their lr ratios.
    factor = partial(
        cosine_factor,
        total_steps=total,
        min_ratio=min(1.0, min_lr / base_lrs[0]) if base_lrs[0] else 0.0,
        warmup_steps=warmup,
    )
    return LrSchedule(optimizer, "cosine", per_batch=LambdaLR(optimizer, factor))


def _per_group(optimizer: Optimizer, value: float) -> list[float]:
    """`value`, an absolute lr setting of the main (first) group, scaled for each group by its
    lr's ratio to the main group's, so a schedule keeps the groups' lr ratios."""
    main, *others = [float(g["lr"]) for g in optimizer.param_groups]
    return [value] + [value * (lr / main) if main else value for lr in others]


def _has_momentum(optimizer: Optimizer) -> bool:
    defaults = optimizer.defaults
    return "betas" in defaults or defaults.get("momentum", 0) > 0


@SCHEDULERS.register()
def onecycle(
    optimizer: Optimizer,
    epochs: int,
    steps_per_epoch: int,
    max_lr: Positive | None = None,
    pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.3,
    div_factor: Positive = 25.0,
    final_div_factor: Positive = 1e4,
    anneal_strategy: Literal["cos", "linear"] = "cos",
    cycle_momentum: bool = True,
) -> LrSchedule:
    """One-cycle policy: rise to max_lr over pct_start of the steps, then anneal far below."""
    total = _total_steps(epochs, steps_per_epoch)
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    peak = _per_group(optimizer, max_lr) if max_lr is not None else lrs  # ratios kept either way
    scheduler = OneCycleLR(
        optimizer,
        max_lr=peak,
        total_steps=total,
        pct_start=pct_start,
        anneal_strategy=anneal_strategy,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        # Cycling momentum would switch it on for plain SGD and fail for Adagrad.
        cycle_momentum=cycle_momentum and _has_momentum(optimizer),
    )
    # OneCycleLR refuses to step past its last step; the lr stays at its final value instead.
    return LrSchedule(optimizer, "onecycle", per_batch=scheduler, batch_limit=total - 1)


@SCHEDULERS.register()
def plateau(
    optimizer: Optimizer,
    epochs: int,
    steps_per_epoch: int,
    factor: Annotated[float, Field(gt=0, lt=1)] = 0.1,
    patience: Annotated[int, Field(ge=0)] = 10,
    min_lr: NonNegative = 0.0,
    threshold: NonNegative = 1e-4,
    mode: Literal["min", "max"] = "min",
    warmup_epochs: NonNegative = 0.0,
) -> LrSchedule:
    """Multiply the lr by factor after patience epochs without validation-loss improvement."""
    warmup = _warmup_steps(warmup_epochs, epochs, steps_per_epoch)
    ramp = LambdaLR(optimizer, partial(warmup_factor, warmup_steps=warmup)) if warmup else None
    # min_lr floors the main group; the others' floors keep their ratio to it.
    reduce = ReduceLROnPlateau(
        optimizer,
        mode=mode,
        factor=factor,
        patience=patience,
        threshold=threshold,
        min_lr=_per_group(optimizer, min_lr),
    )
    # The ramp stops at the end of warmup, so it never undoes a reduction made afterwards.
    return LrSchedule(
        optimizer,
        "plateau",
        per_batch=ramp,
        batch_limit=warmup,
        plateau=reduce,
        plateau_from=warmup,
    )
