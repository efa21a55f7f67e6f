"""Per-batch preprocessing on the batch's device: scale, augment (training only), normalise."""

from __future__ import annotations

from typing import Any

import torch

from dltrain.config.registry import AUGMENTATIONS
from dltrain.data.augment import Augment

# Where the per-channel/feature statistics broadcast, by input kind.
_STAT_SHAPES = {"image": (1, -1, 1, 1), "sequence": (1, 1, -1), "tabular": (1, -1)}


class BatchPipeline:
    """Turns raw batches (uint8 images, float rows or steps, token ids) into model input."""

    def __init__(
        self,
        kind: str,
        mean: list[float],
        std: list[float],
        device: torch.device,
        augment: list[dict[str, dict[str, Any]]] = (),
        channels_last: bool = False,
        as_sequence: str | None = None,
        input_shape: tuple[int, ...] = (),
    ):
        self.kind = kind
        shape = _STAT_SHAPES.get(kind, (1, -1))
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
        # data already standardised (tables, synthetic sets): two kernels a batch saved
        self.normalises = any(m != 0 for m in mean) or any(s != 1 for s in std)
        self.augments: list[Augment] = [
            AUGMENTATIONS.build({"name": name, **kwargs}, input_kind=kind, input_shape=input_shape)
            for entry in augment
            for name, kwargs in entry.items()
        ]
        self.as_sequence = as_sequence
        self.channels_last = channels_last and kind == "image" and not as_sequence

    def train(self, x: torch.Tensor) -> torch.Tensor:
        """Training input: scaled, augmented, normalised."""
        if self.kind == "tokens":  # token ids go to the embedding as they are
            return x
        x = self._scale(x)
        for augment in self.augments:
            x = augment(x)
        return self._finish(x)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation input: scaled and normalised, never augmented."""
        return x if self.kind == "tokens" else self._finish(self._scale(x))

    @staticmethod
    def _scale(x: torch.Tensor) -> torch.Tensor:
        # uint8 pixels travel and stay resident at a quarter of float32's size; scale on arrival.
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalises:
            x = (x - self.mean) / self.std
        if self.as_sequence == "rows":  # B×C×H×W → B×H×(C·W): one step per image row
            return x.permute(0, 2, 1, 3).flatten(2)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
