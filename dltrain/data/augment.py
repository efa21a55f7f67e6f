"""Training-time augmentations, applied to whole batches on the batch's device.

Each factory returns a callable `(x: float B×C×H×W or B×F in [0, 1] scale) -> x` that draws its
randomness from torch's generator on that device: no host round-trip, no per-sample Python loop,
so augmentation runs on the GPU at full speed and never stalls the step. They run before
normalisation (padding is black, as in torchvision) and only in training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from dltrain.config.registry import AUGMENTATIONS
from dltrain.errors import UserError

Augment = Callable[[torch.Tensor], torch.Tensor]
Probability = Annotated[float, Field(ge=0, le=1)]


def _needs_images(name: str, input_kind: str) -> None:
    if input_kind != "image":
        raise UserError(
            f"data.augment: '{name}' works on images, but this dataset is {input_kind}; "
            "remove it (gaussian_noise works on any input)."
        )


def _per_sample(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a B-vector to broadcast over the other dimensions of x."""
    return mask.view(-1, *([1] * (x.dim() - 1)))


def _random_flip(p: float, dim: int) -> Augment:
    """Flip each sample along `dim` with probability p (one coin per sample, on the device)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(x.shape[0], device=x.device) < p
        return torch.where(_per_sample(flip, x), x.flip(dim), x)

    return apply


@AUGMENTATIONS.register()
def hflip(input_kind: str, p: Probability = 0.5) -> Augment:
    """Flip each image left-right with probability p."""
    _needs_images("hflip", input_kind)
    return _random_flip(p, dim=-1)


@AUGMENTATIONS.register()
def vflip(input_kind: str, p: Probability = 0.5) -> Augment:
    """Flip each image upside down with probability p."""
    _needs_images("vflip", input_kind)
    return _random_flip(p, dim=-2)


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}


@AUGMENTATIONS.register()
def random_crop(
    input_kind: str,
    padding: Annotated[int, Field(ge=1)] = 4,
    padding_mode: Literal["zeros", "reflect", "replicate"] = "zeros",
    input_shape: tuple[int, ...] = (),
) -> Augment:
    """Pad each image by `padding` pixels (black, mirrored or repeated edges), then crop back to
    its size at a random offset: a random translation by up to `padding` pixels."""
    _needs_images("random_crop", input_kind)
    side = max(input_shape[-2:], default=0)
    if side and padding_mode == "reflect" and padding >= min(input_shape[-2:]):
        raise UserError(
            f"data.augment: random_crop padding {padding} with padding_mode reflect needs "
            f"images larger than the padding (these are {'×'.join(map(str, input_shape[-2:]))});"
            " use a smaller padding or padding_mode: zeros"
        )
    if side and padding > side:  # the padded batch alone would be (2·padding)² per channel
        raise UserError(
            f"data.augment: random_crop padding {padding} is larger than the images "
            f"({'×'.join(map(str, input_shape[-2:]))}); use at most {side} (an eighth of the "
            f"side, here {max(1, side // 8)}, is usual)."
        )

    def apply(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        padded = F.pad(x, (padding,) * 4, mode=_PAD_MODES[padding_mode])
        # One random offset per image; crop with two gathers (rows, then columns), all on device.
        dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
        rows = (
            (torch.arange(h, device=x.device) + dy)
            .view(b, 1, h, 1)
            .expand(b, c, h, w + 2 * padding)
        )
        cols = (torch.arange(w, device=x.device) + dx).view(b, 1, 1, w).expand(b, c, h, w)
        return padded.gather(2, rows).gather(3, cols)

    return apply


@AUGMENTATIONS.register()
def gaussian_noise(input_kind: str, std: Annotated[float, Field(gt=0)] = 0.05) -> Augment:
    """Add Gaussian noise of the given std (in [0, 1] pixel units, or feature units)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x + std * torch.randn_like(x)

    return apply
