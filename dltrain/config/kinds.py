"""The one list of input kinds and of tasks: recipes (`data.task`), datasets, checkpoints'
data_meta and the task objects all derive theirs from here. Plain Literals: importing them
costs nothing (no torch)."""

from __future__ import annotations

from typing import Literal, get_args

# image: N×C×H×W (uint8 or float) · tabular: N×F float · tokens: N×T int64 token ids, 0 = <pad>,
# padded at the end · sequence: N×T×F float steps (e.g. the adding problem)
InputKind = Literal["image", "tabular", "tokens", "sequence"]
# classification: y int64 class ids · regression: y float32 (N,) · seq2seq: y int64 N×T' target
# token ids (0 = <pad>, padded at the end; see DatasetSplits.meta for the target vocabulary)
Task = Literal["classification", "regression", "seq2seq"]
INPUT_KINDS: tuple[str, ...] = get_args(InputKind)
TASKS: tuple[str, ...] = get_args(Task)
