"""Per-batch preprocessing on the batch's device: scale, augment (training only), normalise."""

from __future__ import annotations

from typing import Any

import torch

from dltrain.data.augment import Augment
from dltrain.registry import AUGMENTATIONS


class BatchPipeline:
    """Turns raw batches (uint8 images or float rows) into model input, on the device."""

    def __init__(
        self,
        kind: str,
        mean: list[float],
        std: list[float],
        device: torch.device,
        augment: list[dict[str, dict[str, Any]]] = (),
        channels_last: bool = False,
    ):
        shape = (1, -1, 1, 1) if kind == "image" else (1, -1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(shape)
        self.augments: list[Augment] = [
            AUGMENTATIONS.build({"name": name, **kwargs}, input_kind=kind)
            for entry in augment
            for name, kwargs in entry.items()
        ]
        self.channels_last = channels_last and kind == "image"

    def train(self, x: torch.Tensor) -> torch.Tensor:
        """Training input: scaled, augmented, normalised."""
        x = self._scale(x)
        for augment in self.augments:
            x = augment(x)
        return self._normalise(x)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation input: scaled and normalised, never augmented."""
        return self._normalise(self._scale(x))

    @staticmethod
    def _scale(x: torch.Tensor) -> torch.Tensor:
        # uint8 pixels travel and stay resident at a quarter of float32's size; scale on arrival.
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
