"""The `timm:<name>` family: any of timm's ~1,300 image models, from scratch or pretrained.

Built with timm's own `create_model` (its `in_chans` adapts the stem to 1-channel images, its
`num_classes` sizes the head). `pretrained: true` takes timm's published weights from the
Hugging Face hub (or its local cache), `pretrained: FILE` a state dict saved beside the recipe
(.safetensors, .pth, .bin), loaded by timm as its own. `data.normalize: auto` then uses the
mean and std of the weights' `pretrained_cfg`. An unreachable hub is found in seconds (one
connection attempt), not after the hub client's retries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dltrain.config.registry import MODELS
from dltrain.errors import UserError, first_line
from dltrain.models.cnn import require_image
from dltrain.system.hub import hub_endpoint, hub_reachable

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _members() -> list[str]:
    return _timm("timm:<name>").list_models()  # imported now: only timm recipes need it


def timm_model(
    arch: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    pretrained: bool | str = False,
    freeze: Literal["none", "backbone"] = "none",
    input_kind: str = "image",
) -> nn.Module:
    """A timm model; pretrained: true (timm's weights, from the hub or its cache) or a local
    file; freeze: backbone trains only the classifier."""
    name = f"timm:{arch}"
    if freeze == "backbone" and pretrained is False:
        raise UserError(
            f"model.freeze: backbone keeps the pretrained layers of '{name}' as they are, but "
            "model.pretrained is false (random layers): set model.pretrained: true (or a file) "
            "to fine-tune, or model.freeze: none to train everything"
        )
    require_image(name, input_shape, alternative="mlp", input_kind=input_kind)
    timm = _timm(name)
    settings = {"num_classes": num_classes, "in_chans": input_shape[0]}
    _check_input_size(timm, arch, settings, input_shape)
    source = _source(arch, pretrained)
    model = timm.create_model(arch, pretrained=pretrained is not False, **settings, **source)
    if freeze == "backbone":
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return model


def _check_input_size(timm, arch: str, settings: dict, input_shape: tuple[int, ...]) -> None:
    """A forward pass on the meta device (no memory, no compute): images the model shrinks
    below one pixel, or a ViT's fixed size, are the user's to fix, said before training."""
    with torch.device("meta"):
        probe = timm.create_model(arch, pretrained=False, **settings)
        try:
            probe.eval()(torch.empty(2, *input_shape))
        except (RuntimeError, AssertionError, ValueError) as exc:
            config = timm.models.get_pretrained_cfg(arch)
            wanted = f" (its weights were trained at {tuple(config.input_size)})" if config else ""
            raise UserError(
                f"model 'timm:{arch}' cannot take images of {tuple(input_shape)}{wanted}: "
                f"{first_line(exc)}. Set data.image_size larger (e.g. to that size), or choose "
                "a model made for small images."
            ) from None


def _timm(name: str):
    try:
        import timm
    except ImportError:
        raise UserError(
            f"model '{name}' needs timm, which is not installed: pip install timm (or pip "
            "install 'dltrain[models]')."
        ) from None
    return timm


def check_timm_weights(arch: str, pretrained: bool | str) -> None:
    """The weights `pretrained` names can be had (a file, the hub, or its cache), else the
    UserError that building the model would raise — said before any data is read."""
    _source(arch, pretrained)


def _source(arch: str, pretrained: bool | str) -> dict[str, Any]:
    """Where create_model takes the pretrained weights from: a local file, the hub's cache when
    the hub cannot be reached, else the hub."""
    if pretrained is False:
        return {}
    if pretrained is not True:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UserError(
                f"model.pretrained: '{pretrained}' is not a file; give a state dict saved from "
                f"timm:{arch} (.safetensors, .pth or .bin), true for timm's own weights, or false."
            )
        return {"pretrained_cfg_overlay": {"file": str(path.resolve())}}
    if hub_reachable():
        return {}
    cached = _cached_weights(arch)
    if cached is None:
        endpoint = hub_endpoint()
        raise UserError(
            f"model.pretrained: timm:{arch}'s weights are not in the local Hugging Face cache "
            f"($HF_HOME) and {endpoint} cannot be reached from here. Fetch them on a machine "
            "with network access (the same cache, or timm's save of the state dict) and set "
            "model.pretrained to that file, or use pretrained: false."
        )
    return {"pretrained_cfg_overlay": {"file": cached}}


def _cached_weights(arch: str) -> str | None:
    """The weights file of timm:<arch>'s default pretrained tag in the local hub cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(arch)
    repo = getattr(config, "hf_hub_id", None)
    for filename in WEIGHT_FILES if repo else ():
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def timm_statistics(section: dict[str, Any], channels: int) -> tuple[list, list] | None:
    """The mean and std a pretrained timm model's weights expect (its pretrained_cfg), averaged
    for 1-channel input; None when it is not pretrained."""
    if section.get("pretrained", False) is False:
        return None
    config = _timm(section["name"]).models.get_pretrained_cfg(section["name"].partition(":")[2])
    if config is None:
        return None
    mean, std = list(config.mean), list(config.std)
    if channels == 1:
        return [sum(mean) / 3], [sum(std) / 3]
    return mean, std


def timm_input_size(section: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) of a pretrained timm model's pretrained_cfg; None when not pretrained."""
    if section.get("pretrained", False) is False:
        return None
    config = _timm(section["name"]).models.get_pretrained_cfg(section["name"].partition(":")[2])
    return tuple(config.input_size[1:]) if config is not None else None


MODELS.register_family(
    "timm",
    timm_model,
    _members,
    "Any timm image model, e.g. timm:convnext_atto (pretrained: true or a file to fine-tune).",
)
