"""`digits`: the 8×8 UCI handwritten digits, shipped inside the package (works offline)."""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from dltrain.config.registry import DATASETS
from dltrain.data.base import ArraySplit, DatasetSplits


@DATASETS.register(tasks=("classification",))
def digits() -> DatasetSplits:
    """1,797 real 8×8 handwritten digits (UCI), bundled: 1,438 train / 359 test, 10 classes."""
    with resources.files("dltrain.data.assets").joinpath("digits.npz").open("rb") as f:
        arrays = np.load(f, allow_pickle=False)
        train = _split(arrays["train_x"], arrays["train_y"])
        test = _split(arrays["test_x"], arrays["test_y"])
        classes = [str(c) for c in arrays["classes"]]
    return DatasetSplits(kind="image", classes=classes, train=train, test=test)


def _split(x: np.ndarray, y: np.ndarray) -> ArraySplit:
    # N×8×8 uint8 → N×1×8×8: one grey channel.
    return ArraySplit(torch.from_numpy(x).unsqueeze(1).contiguous(), torch.from_numpy(y).long())
