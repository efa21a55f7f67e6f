"""Defaults that depend on the dataset: what a short recipe for that kind of data gets.

A dataset may register groups of recipe values (`DATASETS.register(recipe_defaults=...)`) that
replace dltrain's general defaults for its recipes. A group applies only when the recipe gives
none of its keys (nor any key it names in `unless`): `train.epochs: 100` without
`train.early_stopping` keeps that meaning, and `data.global_batch_size` keeps replacing
`data.batch_size`. They are filled into the raw recipe before validation, so the resolved
recipe (`dltrain check`, the checkpoint) shows them like any other value.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecipeDefault:
    """Dotted keys and their values, applied together or not at all."""

    values: dict[str, Any]
    unless: tuple[str, ...] = ()  # keys that, when given, mean the same choice was made


def with_dataset_defaults(raw: dict[str, Any], defaults: tuple[RecipeDefault, ...]) -> dict:
    """`raw` with each group of `defaults` filled in where the recipe gives none of its keys."""
    filled = copy.deepcopy(raw)
    for group in defaults:
        if any(_given(filled, key) for key in (*group.values, *group.unless)):
            continue
        for key, value in group.values.items():
            _put(filled, key, copy.deepcopy(value))
    return filled


def _given(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _put(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            return  # a malformed section: validation reports it as the user wrote it
        node = node[part]
    node[last] = value
