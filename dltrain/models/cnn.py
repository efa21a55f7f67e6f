"""`seed_cnn`: the PyTorch CIFAR-10 tutorial CNN, adapted to any image size and class count."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt
from torch import nn

from dltrain.config.registry import MODELS
from dltrain.errors import UserError
from dltrain.models.inputs import refuse_sequences

_KERNEL = 5
_POOL = 2


def require_image(
    model: str,
    input_shape: tuple[int, ...],
    alternative: str = "mlp",
    input_kind: str | None = "image",
) -> None:
    """Raise UserError unless the input is images laid out C×H×W, what conv nets need."""
    refuse_sequences(model, input_shape, input_kind, "image input (C×H×W)")
    if len(input_shape) != 3:
        kind = "tabular" if len(input_shape) == 1 else f"{len(input_shape)}-D"
        raise UserError(
            f"model '{model}' needs image input (C×H×W), but the dataset gives {kind} input "
            f"of shape {tuple(input_shape)}; use model: {alternative}"
        )


def _feature_side(side: int, padding: int) -> int:
    """Side length after the two conv(5)+maxpool(2) stages; <1 means the map vanished."""
    for _ in range(2):
        side = side + 2 * padding - _KERNEL + 1
        if side < 1:
            return 0
        side //= _POOL
    return side


def _resolve_padding(padding: Literal["auto"] | int, height: int, width: int) -> int:
    """The conv padding to use: 'auto' keeps the published 0 when the input is big enough."""
    if padding != "auto":
        return padding
    # Padding 0 is the tutorial net; small inputs (8×8 digits) need 'same' padding (2 for 5×5).
    return 0 if min(_feature_side(height, 0), _feature_side(width, 0)) >= 1 else _KERNEL // 2


@MODELS.register()
def seed_cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    padding: Literal["auto"] | NonNegativeInt = "auto",
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    input_kind: str = "image",
) -> nn.Module:
    """The PyTorch CIFAR-10 tutorial CNN (2 conv + 3 fc layers), sized to the input."""
    require_image("seed_cnn", input_shape, input_kind=input_kind)
    channels, height, width = input_shape
    pad = _resolve_padding(padding, height, width)
    out_h, out_w = _feature_side(height, pad), _feature_side(width, pad)
    if min(out_h, out_w) < 1:
        raise UserError(
            f"model 'seed_cnn' with padding {pad} reduces a {height}×{width} input to nothing; "
            "use padding: auto (or a larger padding), resize the images, or use model: mlp"
        )
    return nn.Sequential(
        nn.Conv2d(channels, 6, _KERNEL, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(_POOL),
        nn.Conv2d(6, 16, _KERNEL, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(_POOL),
        nn.Flatten(),
        # Dropout layers are always present (p=0 is the identity, i.e. the published net) so the
        # state_dict layout does not depend on the dropout setting.
        nn.Dropout(dropout),
        nn.Linear(16 * out_h * out_w, 120),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(84, num_classes),
    )
