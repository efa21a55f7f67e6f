"""`speednet`: a small conv-BN net sized for training CIFAR-10-like images fast on one GPU.

It follows the ideas of the public CIFAR-10 speed records (Page's ResNet-9 for DAWNBench,
hlb-CIFAR10, airbench), written for dltrain:

- a frozen first layer that whitens 2×2 patches (`PatchWhitening`): its filters are the
  eigenvectors of the training patches' covariance, scaled by 1/sqrt(eigenvalue), in + and −
  copies so the GELU after it keeps both signs. It is fitted to a sample of the training
  images before training (setup.fit_to_training_data calls `fit_to_data`), and saved with the
  weights, so eval/predict/export load it like any weight. Decorrelated inputs are what lets
  large-batch SGD take big steps from the first epoch.
- three groups of conv3×3 → max-pool → BN → GELU → conv3×3 → BN → GELU, widths 64/256/256:
  three pools bring 31×31 to 3×3, and a global max-pool and a bias-free linear layer classify.
- batch norm without a learned scale (`bn_scale: fixed`, the default): convs followed by BN are
  scale-invariant, so the scale only duplicates what the conv weights already express; the
  learned shift stays. BN's running statistics follow the batches quickly (momentum 0.4).
- convs start as an identity on their first input channels (`identity_init`), so the net
  starts close to passing its input through, and the logits are scaled down (`logit_scale`),
  which keeps the early softmax from saturating at large learning rates.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from dltrain.config.registry import MODELS
from dltrain.errors import UserError
from dltrain.models.cnn import require_image

_PATCH = 2  # the whitening stem's kernel: 2×2 patches, 12 dimensions for RGB
_POOLS = 3  # one 2×2 max-pool per conv group


class PatchWhitening(nn.Module):
    """A conv over `patch`×`patch` patches whose frozen filters whiten them (+ and − copies);
    only its bias learns. Call `fit_to_data` with training images before training."""

    def __init__(
        self, channels: int, patch: int = _PATCH, eps: float = 5e-4, bias_epochs: int | None = None
    ):
        super().__init__()
        dims = channels * patch * patch
        self.conv = nn.Conv2d(channels, 2 * dims, patch, bias=True)
        self.conv.weight.requires_grad_(False)
        nn.init.zeros_(self.conv.bias)
        self.eps = eps
        self.bias_epochs = bias_epochs  # None: the bias trains every epoch

    def frozen_at(self, epoch: int) -> list[nn.Parameter]:
        """The bias stops training after `bias_epochs` epochs (training/epoch_freeze.py)."""
        frozen = self.bias_epochs is not None and epoch > self.bias_epochs
        return [self.conv.bias] if frozen else []

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)

    @torch.no_grad()
    def fit_to_data(self, images: Tensor) -> None:
        """Set the filters from `images` (N×C×H×W, as the model sees them: scaled and
        normalised): eigenvectors of the patch covariance over sqrt(eigenvalue + eps)."""
        weight = self.conv.weight
        dims = weight.shape[1] * weight.shape[2] * weight.shape[3]
        mean, covariance = _patch_moments(images, weight.shape[-1], dims)
        values, vectors = torch.linalg.eigh(covariance)
        filters = vectors.T / (values.clamp_min(0) + self.eps).sqrt().unsqueeze(1)
        filters = torch.cat([filters, -filters]).view_as(weight)
        weight.copy_(filters.to(weight.dtype))
        # centre the patches: the bias removes the filters' response to the mean patch
        self.conv.bias.copy_(-(filters.flatten(1) @ mean).to(self.conv.bias.dtype))


def _patch_moments(images: Tensor, patch: int, dims: int) -> tuple[Tensor, Tensor]:
    """Mean and covariance (float64) of every `patch`×`patch` patch of `images`, a chunk of
    images at a time (5,000 CIFAR images hold 4.8M patches)."""
    total = torch.zeros(dims, dtype=torch.float64, device=images.device)
    outer = torch.zeros(dims, dims, dtype=torch.float64, device=images.device)
    count = 0
    for chunk in images.split(500):
        patches = F.unfold(chunk.float(), patch).transpose(1, 2).reshape(-1, dims).double()
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    return mean, outer / count - torch.outer(mean, mean)


class _Conv(nn.Conv2d):
    """A bias-free 3×3 conv ('same' padding), optionally starting as an identity on its first
    input channels (the rest as torch initialises them)."""

    def __init__(self, c_in: int, c_out: int, identity_init: bool):
        super().__init__(c_in, c_out, 3, padding=1, bias=False)
        if identity_init:
            with torch.no_grad():
                nn.init.dirac_(self.weight[: min(c_in, c_out)])


def _norm(width: int, bn_scale: str) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(width, momentum=0.4, eps=1e-12)
    if bn_scale == "fixed":
        norm.weight.requires_grad_(False)  # stays 1: see the module docstring
    return norm


def _group(c_in: int, width: int, bn_scale: str, identity_init: bool) -> nn.Sequential:
    """conv → 2×2 max-pool → BN → GELU → conv → BN → GELU (pooling before the first BN
    normalises the quarter-size map: the same result for a quarter of the work)."""
    return nn.Sequential(
        _Conv(c_in, width, identity_init),
        nn.MaxPool2d(2),
        _norm(width, bn_scale),
        nn.GELU(),
        _Conv(width, width, identity_init),
        _norm(width, bn_scale),
        nn.GELU(),
    )


class ScaledLinear(nn.Linear):
    """A bias-free linear classifier whose outputs are multiplied by a fixed `scale`."""

    def __init__(self, c_in: int, c_out: int, scale: float):
        super().__init__(c_in, c_out, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale


@MODELS.register()
def speednet(
    input_shape: tuple[int, ...],
    num_classes: int,
    # validate_default: the tuple default becomes the list a recipe's value is (else pydantic
    # warns when the resolved recipe is written)
    widths: Annotated[
        list[PositiveInt], Field(min_length=_POOLS, max_length=_POOLS, validate_default=True)
    ] = (64, 256, 256),
    stem: Literal["whiten", "conv"] = "whiten",
    bn_scale: Literal["fixed", "learn"] = "fixed",
    identity_init: bool = True,
    logit_scale: Annotated[float, Field(gt=0)] = 1 / 9,
    whiten_bias_epochs: PositiveInt | None = None,
    input_kind: str = "image",
) -> nn.Module:
    """A fast CIFAR-sized conv-BN net (whitened 2×2 patches, 3 conv groups of `widths`); 2M
    parameters at the default widths. Needs images of at least 9×9 pixels.
    whiten_bias_epochs: the whitening layer's bias trains for that many epochs, then stays."""
    require_image("speednet", input_shape, alternative="seed_cnn", input_kind=input_kind)
    channels, height, width = input_shape
    smallest = _PATCH - 1 + 2**_POOLS  # a 1×1 map left after the last pool
    if min(height, width) < smallest:
        raise UserError(
            f"model 'speednet' needs images of at least {smallest}×{smallest} pixels (three "
            f"2×2 pools after a 2×2 stem), but these are {height}×{width}; resize them "
            "(data.image_size) or use model: seed_cnn"
        )
    if whiten_bias_epochs is not None and stem != "whiten":
        raise UserError(
            "model.whiten_bias_epochs: only the whitening stem has that bias; set "
            "model.stem: whiten, or remove whiten_bias_epochs."
        )
    first = (
        PatchWhitening(channels, bias_epochs=whiten_bias_epochs)
        if stem == "whiten"
        else nn.Conv2d(channels, 2 * channels * _PATCH * _PATCH, _PATCH)
    )
    stem_width = first.out_channels
    ins = [stem_width, *widths[:-1]]
    return nn.Sequential(
        first,
        nn.GELU(),
        *(_group(c_in, w, bn_scale, identity_init) for c_in, w in zip(ins, widths, strict=True)),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        ScaledLinear(widths[-1], num_classes, logit_scale),
    )
