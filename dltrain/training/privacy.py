"""Differentially private training (`privacy:` in a recipe): DP-SGD through Opacus.

Opacus does the work: `ModuleValidator` says which layers it cannot train (and `fix` replaces
them), `GradSampleModule` computes each sample's gradient, `DPOptimizer` clips each to
max_grad_norm, sums, adds Gaussian noise and steps, its `UniformWithReplacementSampler` draws
each batch by Poisson sampling (each sample in with probability batch_size / n — what the
privacy analysis assumes), and an accountant (PRV or RDP) turns the steps taken into the ε spent.
`get_noise_multiplier` chooses the noise for a target ε over the run's steps.

dltrain wires them into its own loop: the batches are gathered on the device from the resident
training split (the sampler's rows, seeded by seed and epoch so a resumed epoch draws the same
batches), and the accountant's history travels in the checkpoint, so a resumed run reports the
ε an uninterrupted one would. Everything DP-SGD cannot be combined with is refused before any
data is read (check_privacy_fits), and a model with layers Opacus cannot train is refused after
it is built, before training (private_model). Per-sample gradients are float32: a private run's
`precision: auto` is fp32 (build.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dltrain.config.schema import PrivacySection, Recipe
from dltrain.data.loaders import ResidentBatches
from dltrain.errors import UserError
from dltrain.system.distributed import World


def opacus_module():
    try:
        import opacus
    except ImportError:
        raise UserError(
            "privacy: needs opacus, which is not installed: pip install 'dltrain[privacy]'."
        ) from None
    return opacus


# What DP-SGD cannot be combined with here: (the recipe's setting, why, the fix)
def _conflicts(recipe: Recipe, world: World) -> list[tuple[str, str]]:
    train, data = recipe.train, recipe.data
    found = [
        (world.launched, "data-parallel processes (--nproc, torchrun)",
         "Opacus' distributed DP-SGD is not wired into dltrain: train in one process"),
        (train.accumulate > 1, f"train.accumulate: {train.accumulate}",
         "a Poisson-sampled batch is the unit the privacy analysis counts: raise "
         "data.batch_size instead"),
        (bool(train.compile), "train.compile",
         "Opacus' per-sample gradient hooks do not compile: set train.compile: false"),
        (train.precision in ("bf16", "fp16"), f"train.precision: {train.precision}",
         "per-sample gradients are computed in float32: set train.precision: fp32 (or auto)"),
        (train.grad_clip is not None, "train.grad_clip",
         "each sample's gradient is clipped to privacy.max_grad_norm: remove train.grad_clip"),
        (train.l1 > 0, "train.l1",
         "the L1 penalty's gradient would bypass per-sample clipping: remove train.l1 (the "
         "optimizer's weight_decay is fine)"),
        (recipe.optimizer["name"] == "muon", "optimizer: muon",
         "Opacus clips and noises the gradients of one plain optimizer: choose sgd or adamw"),
        (data.loader == "workers", "data.loader: workers",
         "Poisson batches are gathered from data held in memory: data.loader: auto or resident"),
    ]  # fmt: skip
    return [(what, fix) for hit, what, fix in found if hit]


def check_privacy_fits(recipe: Recipe, world: World) -> None:
    """Refuse, before any work, a private recipe with a setting DP-SGD cannot combine with."""
    if recipe.privacy is None:
        return
    opacus_module()
    conflicts = _conflicts(recipe, world)
    if conflicts:
        what, fix = conflicts[0]
        raise UserError(f"privacy: cannot be combined with {what}: {fix}.")


def private_model(model: torch.nn.Module, settings: PrivacySection) -> None:
    """Refuse a model with layers Opacus cannot train (after privacy.fix_model replaced what
    Opacus' ModuleValidator.fix can), naming them and the fix."""
    replaceable, holding_buffers = _untrainable_layers(model)
    if replaceable:
        kinds = {kind for _, kind in replaceable}
        if kinds <= {"RNN"} or settings.fix_model:
            fix = "use model: gru or lstm with privacy.fix_model: true, or another model"
        else:
            fix = (
                "set privacy.fix_model: true (Opacus' ModuleValidator.fix puts GroupNorm, "
                "DPLSTM, DPGRU or DPMultiheadAttention in their place), or choose a model "
                "without them"
            )
        raise UserError(
            f"privacy: Opacus cannot compute per-sample gradients for {_named(replaceable)} "
            "(batch norm mixes the samples of a batch; recurrent and attention layers need "
            f"Opacus' own versions). To train privately, {fix}."
        )
    if holding_buffers:
        raise UserError(
            f"privacy: {_named(holding_buffers)} holds trainable parameters of its own beside "
            "buffers, for which Opacus computes no per-sample gradients. Choose a model without "
            "such a layer (transformer: model.pooling: mean and positional: sinusoidal; tables: "
            "mlp or mlp_plr)."
        )


def _untrainable_layers(
    model: torch.nn.Module,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(name, layer type) of the layers Opacus' validators refuse, and of each plain nn.RNN
    (Opacus has no fixer for it, and its hooks fail on it); then of the layers with parameters
    of their own beside buffers (Opacus' GradSampleModule.validate)."""
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    replaceable = []
    for name, module in model.named_modules():
        validate = ModuleValidator.VALIDATORS.get(type(module))
        if (validate and validate(module)) or type(module) is torch.nn.RNN:
            replaceable.append((name, type(module).__name__))
    holding_buffers = [
        (name, type(module).__name__)
        for name, module in trainable_modules(model)
        if next(module.buffers(), None) is not None
    ]
    return replaceable, holding_buffers


def _named(layers: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{name or 'the model'} ({kind})" for name, kind in layers[:4])
    return shown + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")


def auto_delta(n_train: int) -> float:
    """delta: auto — 1/n_train rounded down to a power of ten (60,000 samples: 1e-5)."""
    return 10.0 ** math.floor(math.log10(1.0 / n_train))


@dataclass
class PrivateTraining:
    """A private run's Opacus parts and what it reports: the noise, the sample rate, the
    accountant (its history is the ε spent; it travels in the checkpoint)."""

    settings: PrivacySection
    optimizer: torch.optim.Optimizer  # Opacus' DPOptimizer around the run's own
    batches: PoissonBatches
    accountant: Any  # an opacus IAccountant
    noise_multiplier: float
    delta: float
    grad_sample: torch.nn.Module  # keeps the per-sample gradient hooks on the model

    @property
    def sample_rate(self) -> float:
        return self.batches.sample_rate

    def epsilon(self) -> float:
        """The ε spent by the steps taken so far (0 before the first)."""
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(self.delta))

    def summary(self) -> dict[str, Any]:
        """What report.json, the console and the run's logs say about the privacy spent."""
        return {
            "epsilon": self.epsilon(),
            "target_epsilon": self.settings.epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.settings.max_grad_norm,
            "sample_rate": self.sample_rate,
            "accountant": self.settings.accountant,
            "steps": sum(steps for _, _, steps in self.accountant.history),
        }

    def describe(self) -> str:
        """The header's line."""
        target = f"target ε {self.settings.epsilon:g} · " if self.settings.epsilon else ""
        return (
            f"privacy: DP-SGD (Opacus) · {target}δ {self.delta:g} · noise σ "
            f"{self.noise_multiplier:.3f} · clip {self.settings.max_grad_norm:g} · Poisson sample "
            f"rate {self.sample_rate:.4g} · {self.settings.accountant} accountant"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])


class PoissonBatches:
    """The resident training split, each batch drawn by Opacus' Poisson sampler (each sample
    in with probability sample_rate, so batch sizes vary around batch_size), int(1/rate) batches
    an epoch. The sampler is seeded by (seed, epoch): a resumed epoch draws the same batches."""

    def __init__(self, batches: ResidentBatches, seed: int):
        self.x, self.y, self.device = batches.x, batches.y, batches.device
        self.batch_size, self.seed = batches.batch_size, seed  # the expected batch size
        self.num_samples = len(self.y)
        self.sample_rate = min(1.0, self.batch_size / self.num_samples)
        self.steps = int(1 / self.sample_rate)
        self.path = f"{batches.path}, Poisson-sampled"

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        sampler = UniformWithReplacementSampler(
            num_samples=self.num_samples, sample_rate=self.sample_rate, generator=generator,
            steps=self.steps,
        )  # fmt: skip
        for i, rows in enumerate(sampler):
            if i < start:  # drawn all the same: the generator moves as in a whole epoch
                continue
            index = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
            yield self.x.index_select(0, index), self.y.index_select(0, index)


def make_private(
    recipe: Recipe, model: torch.nn.Module, batches, optimizer: torch.optim.Optimizer
) -> PrivateTraining:
    """Opacus' parts around the run's model, optimizer and training batches: per-sample
    gradient hooks, the DP optimizer with the noise for the target ε (or the given noise),
    Poisson batches and the accountant, hooked to every optimizer step."""
    opacus = opacus_module()
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    _quiet_opacus_hints()
    settings = recipe.privacy
    if not isinstance(batches, ResidentBatches):
        raise UserError(
            "privacy: Poisson batches are gathered from data held in memory, but this dataset "
            "is read from files on demand: use a dataset held in memory (csv, text_csv, "
            "mnist, ...)."
        )
    poisson = PoissonBatches(batches, recipe.seed)
    delta = auto_delta(poisson.num_samples) if settings.delta == "auto" else settings.delta
    noise = settings.noise_multiplier or get_noise_multiplier(
        target_epsilon=settings.epsilon, target_delta=delta, sample_rate=poisson.sample_rate,
        steps=recipe.train.epochs * poisson.steps, accountant=settings.accountant,
    )  # fmt: skip
    for module in model.modules():  # an in-place activation would overwrite the output
        if getattr(module, "inplace", False):  # Opacus' backward hooks hold: torch refuses it
            module.inplace = False
    grad_sample = opacus.GradSampleModule(model, batch_first=True, loss_reduction="mean")
    private = opacus.optimizers.DPOptimizer(
        optimizer, noise_multiplier=noise, max_grad_norm=settings.max_grad_norm,
        expected_batch_size=poisson.batch_size, loss_reduction="mean",
    )  # fmt: skip
    accountant = create_accountant(settings.accountant)
    private.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=poisson.sample_rate))
    return PrivateTraining(settings, private, poisson, accountant, noise, delta, grad_sample)


def _quiet_opacus_hints() -> None:
    """Two warnings every private run would print, neither a user's to act on: the RDP
    analysis' hint that a wider range of orders might tighten its bound, and torch's note that
    a full backward hook (Opacus', on the first layer) fires though the input needs no
    gradient."""
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")
