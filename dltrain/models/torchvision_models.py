"""The `torchvision:<name>` family: every torchvision classification model, optionally pretrained.

These are the ImageNet forms (e.g. a 7×7 stride-2 stem for ResNets): meant for larger images or
fine-tuning. Pretrained weights expect 3-channel input normalized with the ImageNet statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dltrain.config.registry import MODELS
from dltrain.errors import UserError
from dltrain.models.cnn import require_image

# These return (logits, aux logits...) namedtuples in training mode; dltrain needs plain logits.
_AUX_HEADS = frozenset({"googlenet", "inception_v3"})


def _members() -> list[str]:
    """Names of torchvision's classification models (not detection, segmentation, video...)."""
    import torchvision.models  # imported lazily: it is slow and only some recipes need it

    return torchvision.models.list_models(module=torchvision.models)


class GrayToRGB(nn.Module):
    """Feeds 1-channel images to a model built for 3 channels by repeating the channel."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.expand(-1, 3, -1, -1))  # a view: no copy of the batch


def torchvision_model(
    arch: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    weights: str | None = None,
    freeze: Literal["none", "backbone"] = "none",
    input_kind: str = "image",
) -> nn.Module:
    """A torchvision classification model; weights: DEFAULT (or a name) loads pretrained ones,
    and then `data.normalize: auto` uses their statistics; freeze: backbone trains only the
    classifier (its last linear layer)."""
    name = f"torchvision:{arch}"
    if freeze == "backbone" and weights is None:
        raise UserError(
            f"model.freeze: backbone keeps the pretrained layers of '{name}' as they are, but "
            "model.weights is null (random layers): set model.weights: DEFAULT to fine-tune, or "
            "model.freeze: none to train everything"
        )
    require_image(name, input_shape, alternative="mlp", input_kind=input_kind)
    channels = input_shape[0]
    if channels not in (1, 3):
        raise UserError(
            f"model '{name}' takes 3-channel (RGB) or 1-channel (grayscale) images, but the "
            f"dataset gives {channels} channels (input shape {tuple(input_shape)}); use a "
            "dltrain model such as seed_cnn or resnet18, which take any channel count"
        )
    if weights is None:
        model = _from_scratch(arch, num_classes)
    else:
        model = _pretrained(arch, weights, num_classes)
    if freeze == "backbone":
        head = _head(model, arch)[1]
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        head.requires_grad_(True)  # the optimizer steps only this; BatchNorm statistics still adapt
    return GrayToRGB(model) if channels == 1 else model


def torchvision_statistics(section: dict[str, Any], channels: int) -> tuple[list, list] | None:
    """The normalisation a `torchvision:<name>` model's pretrained weights were trained with
    (mean, std per channel; averaged for 1-channel input), or None for any other model."""
    name, weights = section.get("name", ""), section.get("weights")
    if not name.startswith("torchvision:") or weights is None:
        return None
    transforms = _resolve_weights(name.partition(":")[2], weights).transforms()
    mean, std = list(transforms.mean), list(transforms.std)
    if channels == 1:
        return [sum(mean) / 3], [sum(std) / 3]
    return mean, std


def torchvision_input_size(section: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) the pretrained weights' transforms crop to; None without weights."""
    name, weights = section.get("name", ""), section.get("weights")
    if not name.startswith("torchvision:") or weights is None:
        return None
    transforms = _resolve_weights(name.partition(":")[2], weights).transforms()
    crop = getattr(transforms, "crop_size", None)
    return (crop[0], crop[-1]) if crop else None


def _from_scratch(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialized model with a `num_classes`-way head."""
    import torchvision.models

    # init_weights=True keeps torchvision's initialization and silences its FutureWarning.
    extra = {"aux_logits": False, "init_weights": True} if arch in _AUX_HEADS else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)


def _pretrained(arch: str, weights: str, num_classes: int) -> nn.Module:
    """A model with pretrained weights, its classifier replaced when the class count differs."""
    import torchvision.models

    resolved = _resolve_weights(arch, weights)
    extra: dict[str, Any] = {"aux_logits": False} if arch in _AUX_HEADS else {}
    try:
        model = torchvision.models.get_model(arch, weights=resolved, **extra)
    except OSError as exc:  # URLError, HTTPError, timeouts: no network or no such file
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(resolved.url).name
        raise UserError(
            f"the {resolved} weights for model 'torchvision:{arch}' could not be fetched "
            f"({exc}); use weights: null to train from scratch, or download {resolved.url} "
            f"and place it at {cached} (the torch hub cache, under $TORCH_HOME)"
        ) from exc
    _replace_head(model, num_classes, arch)
    return model


def _resolve_weights(arch: str, weights: str) -> Any:
    """The torchvision weights enum member named `weights`, or UserError listing the valid names."""
    import torchvision.models

    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum.verify(weights)
    except (KeyError, ValueError):
        valid = ", ".join(["DEFAULT", *(member.name for member in enum)])  # no aliases
        raise UserError(
            f"model 'torchvision:{arch}' has no weights '{weights}'; use one of: {valid} "
            "(or weights: null to train from scratch)"
        ) from None


def _head(model: nn.Module, arch: str) -> tuple[str, nn.Linear]:
    """The classifier: the model's last nn.Linear, with its qualified name."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            f"model 'torchvision:{arch}' has no linear classifier to replace or train alone; use "
            "weights: null (and freeze: none), or another model"
        )
    return linears[-1]


def _replace_head(model: nn.Module, num_classes: int, arch: str) -> None:
    """Swap the last nn.Linear (the classifier) for a fresh one when the class count differs."""
    qualname, old = _head(model, arch)
    if old.out_features == num_classes:
        return
    parent_name, _, attr = qualname.rpartition(".")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(model.get_submodule(parent_name), attr, new)


MODELS.register_family(
    "torchvision",
    torchvision_model,
    _members,
    "Any torchvision classification model, e.g. torchvision:resnet18 (weights: DEFAULT to "
    "fine-tune).",
)
