"""The classic torchvision image datasets, loaded whole into memory as uint8 tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.error import URLError

import numpy as np
import torch

from dltrain.config.registry import DATASETS
from dltrain.data.base import ArraySplit, DatasetSplits
from dltrain.errors import UserError

if TYPE_CHECKING:
    from torchvision.datasets import VisionDataset


@dataclass(frozen=True)
class _Source:
    """How to find and name one torchvision dataset."""

    cls: str  # the class in torchvision.datasets: imported when loaded (torchvision's import
    # costs about a second, which every command would pay for naming these datasets)
    folder: str  # where torchvision keeps the files, relative to root
    classes: tuple[str, ...] | None = None  # None: use the dataset's own `.classes`


_SOURCES = {
    "cifar10": _Source("CIFAR10", "cifar-10-batches-py"),
    "cifar100": _Source("CIFAR100", "cifar-100-python"),
    # MNIST's own class names are '0 - zero', ...; the digit alone reads better in reports.
    "mnist": _Source("MNIST", "MNIST/raw", tuple(str(i) for i in range(10))),
    "fashion_mnist": _Source("FashionMNIST", "FashionMNIST/raw"),
}


@DATASETS.register(tasks=("classification",))
def cifar10(root: str = "data", download: bool = False) -> DatasetSplits:
    """CIFAR-10: 60,000 32x32 colour images of 10 object classes (torchvision)."""
    return load_torchvision("cifar10", root, download)


@DATASETS.register(tasks=("classification",))
def cifar100(root: str = "data", download: bool = False) -> DatasetSplits:
    """CIFAR-100: 60,000 32x32 colour images of 100 object classes (torchvision)."""
    return load_torchvision("cifar100", root, download)


@DATASETS.register(tasks=("classification",))
def mnist(root: str = "data", download: bool = False) -> DatasetSplits:
    """MNIST: 70,000 28x28 grayscale handwritten digits 0-9 (torchvision)."""
    return load_torchvision("mnist", root, download)


@DATASETS.register(tasks=("classification",))
def fashion_mnist(root: str = "data", download: bool = False) -> DatasetSplits:
    """Fashion-MNIST: 70,000 28x28 grayscale images of 10 clothing classes (torchvision)."""
    return load_torchvision("fashion_mnist", root, download)


def load_torchvision(name: str, root: str, download: bool) -> DatasetSplits:
    """Load a torchvision dataset named in `_SOURCES` as uint8 train/test ArraySplits."""
    source = _SOURCES[name]
    expected = Path(root) / source.folder
    if not download and not expected.exists():
        raise UserError(
            f"{name} not found under '{root}' (expected {expected}). Put the dataset there, "
            "set data.root to where it is, or pass data.download=true to fetch it."
        )
    train_set = _open(name, source, root, expected, train=True, download=download)
    test_set = _open(name, source, root, expected, train=False, download=False)
    classes = list(source.classes or train_set.classes)
    return DatasetSplits(
        kind="image", classes=classes, train=_to_split(train_set), test=_to_split(test_set)
    )


def _open(
    name: str, source: _Source, root: str, expected: Path, train: bool, download: bool
) -> VisionDataset:
    """Construct the torchvision dataset, turning its failures into one UserError."""
    from torchvision import datasets

    try:
        return getattr(datasets, source.cls)(root, train=train, download=download)
    except (URLError, OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if download:
            raise UserError(
                f"data.download: fetching {name} into '{root}' failed: {reason}. Check the "
                f"network, or fetch the files elsewhere and place them at {expected} "
                "(set data.root to its parent folder) with data.download=false."
            ) from None
        raise UserError(
            f"{name} under '{root}' is incomplete or corrupt ({reason}). Replace {expected} "
            "with a complete copy, or delete it and pass data.download=true to fetch it again."
        ) from None


def _to_split(dataset: VisionDataset) -> ArraySplit:
    """The dataset's images as N×C×H×W uint8 and its labels as int64, without rescaling."""
    data = dataset.data
    if isinstance(data, np.ndarray):  # CIFAR: N×H×W×C numpy
        x = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    else:  # MNIST family: N×H×W tensor
        x = data.unsqueeze(1).contiguous()
    y = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return ArraySplit(x=x.to(torch.uint8), y=y)
