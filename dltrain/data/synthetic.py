"""`synthetic`: learnable random data of any shape, for smoke tests and benchmarks."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from dltrain.config.registry import DATASETS
from dltrain.data.base import ArraySplit, DatasetSplits
from dltrain.errors import RecipeError


@DATASETS.register(tasks=("classification",))
def synthetic(
    seed: int,
    shape: list[Annotated[int, Field(ge=1)]] = [3, 32, 32],  # noqa: B006 (validated copy)
    num_classes: Annotated[int, Field(ge=2)] = 10,
    train_size: Annotated[int, Field(ge=1)] = 2000,
    test_size: Annotated[int, Field(ge=1)] = 500,
    noise: Annotated[float, Field(ge=0)] = 1.0,
) -> DatasetSplits:
    """Class prototypes plus Gaussian noise: [C, H, W] gives uint8 images, [F] tabular rows."""
    if len(shape) not in (1, 3):
        raise RecipeError("data.shape", "must be [C, H, W] (images) or [F] (tabular).")
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=generator)

    def sample(n: int) -> ArraySplit:
        y = torch.randint(num_classes, (n,), generator=generator)
        x = prototypes[y] + noise * torch.randn(n, *shape, generator=generator)
        if len(shape) == 3:  # images: map to 0..255 uint8 like real pixels
            x = (x * 40 + 128).clamp(0, 255).to(torch.uint8)
        return ArraySplit(x, y)

    kind = "image" if len(shape) == 3 else "tabular"
    classes = [f"class_{i}" for i in range(num_classes)]
    return DatasetSplits(
        kind=kind, classes=classes, train=sample(train_size), test=sample(test_size)
    )
