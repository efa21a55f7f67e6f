"""Out of device memory: one handler, one message with a concrete way out (exit 1)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from dltrain.errors import RunFailure


@contextlib.contextmanager
def out_of_memory_is_a_run_failure(
    device: torch.device | str,
    recipe=None,
    precision: str = "fp32",
    eval_batch_size: int | None = None,
    saved: Path | None = None,
) -> Iterator[None]:
    """Turn torch.OutOfMemoryError into a RunFailure that names the setting to change.

    With the run's `recipe`, the remedy names its batch setting: data.batch_size or
    data.global_batch_size in training, data.eval_batch_size when `eval_batch_size` (the batch
    that was evaluated) is given. `saved` is the last checkpoint written, if any.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        kept = f" Last checkpoint: {saved}." if saved is not None and Path(saved).exists() else ""
        raise RunFailure(
            f"{device} ran out of memory{_remedy(recipe, precision, eval_batch_size)}{kept}"
        ) from None


def _remedy(recipe, precision: str, eval_batch_size: int | None) -> str:
    if recipe is None:
        return "; give fewer inputs at once, or use --device cpu."
    data, accumulate = recipe.data, recipe.train.accumulate
    lower_precision = ", or train.precision=bf16" if precision == "fp32" else ""
    if eval_batch_size is not None:
        return (
            f" evaluating batches of {eval_batch_size} (precision {precision}). Use "
            f"data.eval_batch_size={max(1, eval_batch_size // 2)}{lower_precision}."
        )
    if data.global_batch_size is not None:
        return (
            f" with data.global_batch_size={data.global_batch_size} (precision {precision}). "
            f"Keep it and set train.accumulate={accumulate * 2}: each process then takes half "
            f"as many samples at a time{lower_precision}."
        )
    return (
        f" with data.batch_size={data.batch_size} (precision {precision}). Use "
        f"data.batch_size={max(1, data.batch_size // 2)} with train.accumulate={accumulate * 2} "
        f"to keep the same effective batch{lower_precision}."
    )
