"""`mlp`: a fully connected network over the flattened input, for tabular data (or tiny images)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, Field
from torch import nn

from dltrain.config.registry import MODELS
from dltrain.models.inputs import refuse_sequences

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def _positive_sizes(sizes: list[int]) -> list[int]:
    """Pydantic check: every hidden layer has at least one unit."""
    if any(size < 1 for size in sizes):
        raise ValueError("every hidden layer size must be a positive integer")
    return sizes


# A tuple default keeps the function's default immutable (a list one would be shared between
# calls); validate_default turns it into a list, the type a user-given value has after validation.
HiddenSizes = Annotated[list[int], AfterValidator(_positive_sizes), Field(validate_default=True)]


@MODELS.register()
def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: HiddenSizes = (256, 128),
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu",
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    batch_norm: bool = False,
    input_kind: str = "tabular",
) -> nn.Module:
    """Multi-layer perceptron on the flattened input (hidden: [] gives a linear model)."""
    refuse_sequences("mlp", input_shape, input_kind, "tabular or image input")
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        # The bias is redundant before batch norm, which has its own shift.
        layers.append(nn.Linear(width, size, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers += [_ACTIVATIONS[activation](), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
