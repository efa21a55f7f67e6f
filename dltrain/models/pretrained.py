"""What pretrained model families (torchvision:, timm:, hf) tell the rest of dltrain: the input
statistics and image size their weights expect, whether those weights can be had at all (said
before any data is read), and the same model without fetching them (when a checkpoint's own
weights go over them at once)."""

from __future__ import annotations

from typing import Any

from dltrain.models.timm_models import check_timm_weights, timm_input_size, timm_statistics
from dltrain.models.torchvision_models import torchvision_input_size, torchvision_statistics
from dltrain.system.hub import check_checkpoint_available

# Their pretrained form is built differently from the random one (extra input transforms)
_PRETRAINED_FORM_DIFFERS = frozenset({"torchvision:googlenet", "torchvision:inception_v3"})


def pretrained_statistics(section: dict[str, Any], channels: int) -> tuple[list, list] | None:
    """Mean and std per channel that a pretrained model expects, or None (not pretrained)."""
    family = section.get("name", "").partition(":")[0]
    by_family = {"torchvision": torchvision_statistics, "timm": timm_statistics}
    return by_family[family](section, channels) if family in by_family else None


def pretrained_input_size(section: dict[str, Any]) -> tuple[int, int] | None:
    """The image size (height, width) a pretrained model's weights were trained at, or None."""
    family = section.get("name", "").partition(":")[0]
    by_family = {"torchvision": torchvision_input_size, "timm": timm_input_size}
    return by_family[family](section) if family in by_family else None


def check_pretrained_available(section: dict[str, Any]) -> None:
    """Pretrained weights that can be neither found here nor fetched: one message (exit 2)
    before any data is read."""
    name = section.get("name", "")
    if name.startswith("timm:") and section.get("pretrained", False) is not False:
        check_timm_weights(name.partition(":")[2], section["pretrained"])
    elif name == "hf" and section.get("pretrained", True):
        check_checkpoint_available(section["checkpoint"])


def without_pretrained_weights(section: dict[str, Any]) -> dict[str, Any]:
    """The model section to build when a checkpoint's weights replace the pretrained ones right
    away: the same architecture, nothing fetched (so eval and predict work offline)."""
    name = section["name"]
    if name in _PRETRAINED_FORM_DIFFERS:
        return section
    if name.startswith("torchvision:") and section.get("weights") is not None:
        return {**section, "weights": None, "freeze": "none"}
    if name.startswith("timm:") and section.get("pretrained", False) is not False:
        return {**section, "pretrained": False, "freeze": "none"}
    if name == "hf" and section.get("pretrained", True):
        return {**section, "pretrained": False}  # built from the config in the checkpoint
    return section
