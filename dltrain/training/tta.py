"""Test-time augmentation (`eval.tta`): a classifier's outputs averaged over views of each image.

Views of a (normalised) N×C×H×W batch, each given to the model, outputs averaged uniformly:
the batch itself; `hflip`: mirrored left-right; `translate`: shifted by TRANSLATE_PIXELS down-
right and up-left (reflection-padded, so no border of zeros appears). With both, the mirrored
batch is shifted too. It applies to the final report and `dltrain eval` (where the weights are
fixed), not to the per-epoch validation that picks best.pt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dltrain.errors import UserError

VIEWS = ("hflip", "translate")
TRANSLATE_PIXELS = 2


class TestTimeAugmented(nn.Module):
    """The model, answering with its mean output over the views of each batch."""

    def __init__(self, model: nn.Module, views: list[str]):
        super().__init__()
        self.model, self.views = model, list(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batches = views_of(x, self.views)
        return torch.stack([self.model(view) for view in batches]).mean(dim=0)


def views_of(x: torch.Tensor, views: list[str]) -> list[torch.Tensor]:
    """The batch and its views, in a fixed order (see the module docstring)."""
    out = [x]
    if "hflip" in views:
        out.append(x.flip(-1))
    if "translate" in views:
        out += [
            _shifted(view, s) for view in list(out) for s in (TRANSLATE_PIXELS, -TRANSLATE_PIXELS)
        ]
    return out


def _shifted(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """x moved by `pixels` along both image axes (positive: down-right), reflection-padded."""
    p = abs(pixels)
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    start = 0 if pixels > 0 else 2 * p
    return padded[..., start : start + x.shape[-2], start : start + x.shape[-1]]


def with_tta(model: nn.Module, views: list[str], model_kind: str) -> nn.Module:
    """`model` behind TestTimeAugmented when `views` are asked for (images only)."""
    check_tta(views, model_kind)
    return TestTimeAugmented(model, views) if views else model


def check_tta(views: list[str], model_kind: str) -> None:
    """UserError for views asked of a model that does not take images (before training)."""
    if views and model_kind != "image":
        raise UserError(
            f"eval.tta: test-time augmentation views ({', '.join(views)}) are image views; "
            f"this model takes {model_kind} input. Set eval.tta=[]."
        )
