"""What every dataset factory returns: named splits of one kind of input, with class names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from dltrain.config.kinds import InputKind, Task

if TYPE_CHECKING:  # annotations only: datasets' descriptions need no torch to import
    import torch


@dataclass
class ArraySplit:
    """A split held as tensors: the fast path (can live on the accelerator, no DataLoader).

    x: N×C×H×W for images (uint8 0..255, or float already scaled), N×F float32 for tabular.
    y: N int64 class indices.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def targets(self) -> torch.Tensor:
        return self.y


class LazySplit(Protocol):
    """A split decoded on demand (e.g. image files): a map-style dataset that knows its labels.

    `dataset[i]` returns (x, y) with x laid out like one row of ArraySplit.x.
    """

    targets: list[int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


Split = ArraySplit | LazySplit


@dataclass
class DatasetSplits:
    """A dataset as loaded: train always; val and test when the source has them."""

    kind: InputKind
    classes: list[str]  # class names; regression: [target name]; seq2seq: the target vocabulary
    train: Split
    val: Split | None = None
    test: Split | None = None
    task: Task = "classification"
    # What eval/predict need to rebuild the input from raw data, stored in every checkpoint's
    # data_meta: e.g. {"vocab": [...], "tokenizer": {...}, "max_length": 200} for text,
    # {"source_vocab": [...], "bos_id": 1, "eos_id": 2, "max_target_length": 12} for seq2seq.
    meta: dict = field(default_factory=dict)
