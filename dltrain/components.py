"""Import every module that registers components, so the registries are complete."""

from __future__ import annotations

import importlib

_MODULES = (
    "dltrain.data.datasets",
    "dltrain.data.augment",
    "dltrain.models",
    "dltrain.losses",
    "dltrain.optim",
)


def load_all() -> None:
    """Fill the registries (cheap after the first call: modules are imported once)."""
    for module in _MODULES:
        importlib.import_module(module)
