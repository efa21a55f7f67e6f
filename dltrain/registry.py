"""The public path of the registries that users' own components register into (README "Adding
a model, dataset, loss…"): `from dltrain.registry import MODELS`. They live in
dltrain/config/registry.py; this module only re-exports them."""

from dltrain.config.registry import (
    AUGMENTATIONS,
    DATASETS,
    INPUT_PATH,
    LOSSES,
    MODELS,
    OPTIMIZERS,
    REGISTRIES,
    SCHEDULERS,
    Registry,
)

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "INPUT_PATH",
    "LOSSES",
    "MODELS",
    "OPTIMIZERS",
    "REGISTRIES",
    "SCHEDULERS",
    "Registry",
]
