"""`KEY=VALUE` overrides from the command line: dotted keys into the raw recipe, values parsed
as YAML, remembering which keys were overridden so errors can blame the override."""

from __future__ import annotations

import re
from typing import Any

import yaml

from dltrain.config.yaml_text import RecipeLoader
from dltrain.errors import UserError

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=VALUE` → (['a', 'b'], VALUE parsed as YAML)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise UserError(
            f"override '{text}': expected KEY=VALUE with a dotted key, e.g. train.epochs=3."
        )
    try:
        parsed = yaml.load(value, Loader=RecipeLoader) if value.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):
        # Not YAML (e.g. an unbalanced bracket), or beyond PyYAML (an integer over int()'s
        # digit limit, very deep nesting): take it as a plain string.
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], dict]:
    """Return a copy of `raw` with overrides set, and {dotted key: override text}."""
    import copy

    result = copy.deepcopy(raw)
    applied = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                parent = ".".join(keys[: depth + 1])
                raise UserError(
                    f"override '{text}': {parent} is a value ({child!r}), not a section; "
                    f"set it whole instead, e.g. {parent}=..."
                )
            node = child
        node[keys[-1]] = value
        applied.pop(".".join(keys), None)  # keep `applied` in the order overrides took effect
        applied[".".join(keys)] = text
    return result, applied
