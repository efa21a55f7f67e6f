"""Validation and test rows that repeat a training row's features exactly.

A score on such rows measures how well the model recalls its training rows as much as how it
generalises. Rows that come in groups — a person's visits over several years, a patient's
repeated measurements — do this when a split is carved at random: on statsmodels' randhie 98 %
of a random test split repeats a training row, and a table of the training rows' mean targets
beats every model there (bench/RESULTS.md, "Tables against gradient boosting"). So the run
says it, with both ways on: split by group to measure generalisation, or — to predict for the
same groups — a model whose high-frequency embeddings tell single rows apart (`mlp_plr` with
`frequency_scale: 1`, level with gradient boosting on randhie's random split). Counted on the
raw features, before the encoding (a missing cell matches a missing cell).
"""

from __future__ import annotations

from typing import Any

import torch

# Said in the run's header from this share of a split's rows on; a table of few distinct
# values (a handful of categorical columns) repeats rows without any grouping, so the note
# names grouping as a possible cause, never as a fault.
NOTED_FROM = 0.5


def repeated_rows(train: torch.Tensor, other: torch.Tensor) -> int:
    """How many rows of `other` have exactly the features of some row of `train`."""
    seen = {row.tobytes() for row in train.numpy()}
    return sum(row.tobytes() in seen for row in other.numpy())


def repeated_rows_by_split(splits: dict[str, Any]) -> dict[str, list[int]]:
    """{split: [rows repeating a training row, rows]} for the splits besides train."""
    train = splits["train"].x
    return {
        name: [repeated_rows(train, split.x), len(split)]
        for name, split in splits.items()
        if name != "train" and len(split)
    }


def repeated_rows_note(counts: dict[str, list[int]], always: bool = False) -> str | None:
    """One line on the splits that repeat training rows: for the run's header when half or
    more of a split does (or `always`, for `dltrain check --data`); None when none is to say."""
    said = [
        f"{repeated:,} of {rows:,} {name} rows ({repeated / rows:.0%})"
        for name, (repeated, rows) in counts.items()
        if (always and repeated) or repeated >= NOTED_FROM * rows
    ]
    if not said:
        return None
    return (
        f"{' and '.join(said)} repeat a training row's features exactly: their score measures "
        "recall as much as generalisation. If rows come in groups (one person's visits over "
        "years), then to measure new groups give data.train and data.test (and data.val) files "
        "split by group; to predict for the same groups, a model that tells single rows apart "
        "does better: model: {name: mlp_plr, frequency_scale: 1}."
    )
