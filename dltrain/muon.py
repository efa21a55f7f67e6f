"""`optimizer: {name: muon}`: torch's own Muon for the hidden layers' weight matrices, a second
optimizer (`others`) for every other trainable parameter — one recipe section, one optimizer.

Muon (Jordan et al. 2024) orthogonalises each weight matrix's (Nesterov) momentum with a few
Newton–Schulz iterations before stepping along it: the update behind the CIFAR-10 and nanoGPT
speed records. It is made for the ≥2-D weights of hidden conv and linear layers; biases, norm
layers, embeddings, other lone tensors and the classifier head — the model's last linear layer,
in the order the model defines its layers — train with `others` (sgd, adamw...: its own lr,
momentum, weight decay), as the records do.

torch.optim.Muon takes 2-D parameters only. A conv's filters (out, in, kh, kw) are stepped as
the matrix (out, in·kh·kw), as Keller Jordan's reference does: through a 2-D copy, refreshed
from the filters before each step and written back after it, so the filters may have any memory
layout (channels_last on a GPU) and the checkpoint's momentum is the same whatever the layout.

`MuonWithOthers` is one torch Optimizer over both: its param groups are Muon's, then the others'
(the same group dicts), so a schedule multiplies every group by one factor (their lr ratio
stays), lr-find ramps them together, and the checkpoint holds both states. Muon's group is the
main one (the lr a schedule's absolute settings refer to); `cycle_momentum` does not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator, Field
from torch import nn
from torch.optim import Optimizer

from dltrain.config.registry import OPTIMIZERS
from dltrain.errors import RecipeError, UserError
from dltrain.optim import optimizer_over

MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
WHERE = "optimizer.others"


@dataclass
class FilterBank:
    """A conv's filters (≥3-D) and the 2-D copy Muon steps in their place."""

    param: torch.Tensor
    matrix: torch.Tensor

    @classmethod
    def of(cls, param: torch.Tensor) -> FilterBank:
        matrix = (
            param.detach().reshape(param.shape[0], -1).clone(memory_format=torch.contiguous_format)
        )
        return cls(param, matrix)

    def before_step(self) -> None:
        """The filters' current values and gradient, as the matrix (reshape follows the
        logical order, so any memory layout gives the same matrix)."""
        self.matrix.copy_(self.param.detach().reshape(self.matrix.shape))
        grad = self.param.grad
        self.matrix.grad = None if grad is None else grad.reshape(self.matrix.shape)

    def after_step(self) -> None:
        self.param.detach().copy_(self.matrix.view(self.param.shape))
        self.matrix.grad = None


class MuonWithOthers(Optimizer):
    """Muon over the weight matrices (filter banks stepped as matrices), `others` over the
    rest; both stepped by one `step()`, saved by one `state_dict()`."""

    # fp16's GradScaler unscales and checks the gradients of param_groups, which for filter
    # banks are set only inside step(): refused (training/step.py) rather than stepped unscaled
    supports_gradient_scaling = False

    def __init__(
        self,
        muon: Optimizer,
        others: Optimizer,
        banks: list[FilterBank],
        renormalize: bool,
        described: str,
    ):
        self.muon, self.others, self.banks = muon, others, banks
        self.renormalize, self.described = renormalize, described
        # the same group dicts as the two optimizers': a schedule's change reaches them
        super().__init__(muon.param_groups + others.param_groups, defaults={})

    @property
    def state(self) -> dict:  # type: ignore[override]
        """The two optimizers' per-parameter states, to read (Muon's keyed by the matrices it
        steps). A new dict: looking up the optimizers' own defaultdicts would add entries."""
        return {**self.muon.state, **self.others.state}

    @state.setter
    def state(self, value: Any) -> None:
        """Optimizer's own bookkeeping sets an empty state; the two optimizers hold theirs."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MuonWithOthers.step takes no closure")
        for bank in self.banks:
            bank.before_step()
        if self.renormalize:
            _renormalize(self.muon)
        self.muon.step()
        for bank in self.banks:
            bank.after_step()
        self.others.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.others.zero_grad(set_to_none)
        for bank in self.banks:
            if bank.param.grad is not None:
                bank.param.grad = None if set_to_none else bank.param.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "others": self.others.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.others.load_state_dict(state_dict["others"])
        # loading replaces each optimizer's group dicts: look at the new ones
        self.param_groups = self.muon.param_groups + self.others.param_groups


def _renormalize(muon: Optimizer) -> None:
    """Scale each matrix to the norm √rows before its step (airbench94_muon): for a layer
    followed by batch norm the scale is free, and a fixed one keeps Muon's fixed-size steps
    from shrinking relative to a growing weight."""
    for group in muon.param_groups:
        for matrix in group["params"]:
            norm = matrix.norm().clamp_min(torch.finfo(matrix.dtype).tiny)
            matrix.mul_(math.sqrt(matrix.shape[0]) / norm)


def _shape(layer: nn.Linear) -> str:
    return f"{type(layer).__name__} {layer.in_features}→{layer.out_features}"


def split_for_muon(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], str | None]:
    """(Muon's weights, the others, the head's name): the trainable ≥2-D weights of linear and
    conv layers except the head — the last linear layer — for Muon; every other trainable
    parameter for `others`, in model.parameters() order (the layout depends on the model
    alone, so a resumed run's optimizer states load into it)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MATRIX_LAYERS)]
    linear = [name for name, m in layers if isinstance(m, nn.Linear)]
    head = linear[-1] if linear else None
    chosen = {
        id(m.weight)
        for name, m in layers
        if name != head and m.weight.requires_grad and m.weight.ndim >= 2
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    return (
        [p for p in trainable if id(p) in chosen],
        [p for p in trainable if id(p) not in chosen],
        head,
    )


def _others_section(value: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.others`, checked like an optimizer section of its own."""
    section = {"name": value} if isinstance(value, str) else value
    if not isinstance(section, dict):
        raise RecipeError(WHERE, "must be an optimizer section, e.g. {name: sgd, lr: 0.05}.")
    if section.get("name") == "muon":
        raise RecipeError(
            f"{WHERE}.name", "cannot be muon: it trains what Muon does not; choose sgd or adamw."
        )
    return OPTIMIZERS.validate(section, WHERE)


# `optimizer.others` is checked as an optimizer section when the recipe is: errors name its keys
OthersSection = Annotated[dict[str, Any] | str, BeforeValidator(_others_section)]


@OPTIMIZERS.register()
def muon(
    model: nn.Module,
    lr: Annotated[float, Field(gt=0)] = 0.02,
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.95,
    nesterov: bool = True,
    weight_decay: Annotated[float, Field(ge=0)] = 0.0,
    ns_steps: Annotated[int, Field(ge=1, le=99)] = 5,
    adjust_lr: Literal["original", "match_rms_adamw", "spectral_unclamped"] = "original",
    renormalize: bool = False,
    others: OthersSection = "adamw",
    device_type: str = "cpu",
) -> Optimizer:
    """Muon (torch.optim.Muon) for hidden conv/linear weights; `others` (an optimizer section)
    for biases, norms, embeddings and the head. weight_decay is decoupled (lr × wd per step);
    adjust_lr scales the lr by the matrix's shape (torch's choices); renormalize scales each
    matrix to norm √rows before its step, as airbench94_muon does. Needs torch >= 2.9."""
    if not hasattr(torch.optim, "Muon"):
        raise UserError(
            f"optimizer 'muon' needs torch.optim.Muon, which torch {torch.__version__} lacks "
            "(it came in torch 2.9); upgrade torch, or choose sgd or adamw."
        )
    matrices, rest, head = split_for_muon(model)
    if not matrices:
        raise UserError(
            "optimizer 'muon': this model has no hidden conv or linear weights for Muon (only "
            f"its head{f' {head!r}' if head else ''}); choose sgd or adamw."
        )
    banks = [FilterBank.of(p) for p in matrices if p.ndim > 2]
    stepped = {id(b.param): b.matrix for b in banks}
    inner = torch.optim.Muon(
        [stepped.get(id(p), p) for p in matrices],
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        ns_steps=ns_steps,
        adjust_lr_fn=adjust_lr,
    )
    section = others if isinstance(others, dict) else _others_section(others)
    rest_optimizer = optimizer_over(section, rest, device_type)
    described = (
        f"muon: {len(matrices)} weight matrices ({sum(p.numel() for p in matrices):,} "
        f"parameters); {section['name']}: {len(rest)} other tensors"
        + (f", the head {head!r} ({_shape(model.get_submodule(head))}) among them" if head else "")
    )
    return MuonWithOthers(inner, rest_optimizer, banks, renormalize, described)
