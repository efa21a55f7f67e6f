"""NumPy arrays as torch tensors for dataset splits, without copying when possible."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing `array`'s memory when possible (copies read-only arrays)."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())
