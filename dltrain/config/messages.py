"""Turn pydantic validation errors into one RecipeError that names the key path."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ValidationError

from dltrain.errors import RecipeError, did_you_mean


def join_path(prefix: str, loc: Iterable[object]) -> str:
    """Join a key-path prefix and a pydantic location into 'a.b.c' (list indexes as 'a[0]')."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at the parent of `loc`, walking nested models."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if current else None
        annotation = field.annotation if field else None
        current = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return list(current.model_fields) if current else []


def recipe_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> RecipeError:
    """The first error of `exc` as a RecipeError with a readable problem and a suggestion."""
    errors = exc.errors(include_url=False)
    # An unknown key is usually a typo of a missing one: report it first, with a suggestion.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = _field_part(tuple(err["loc"]))
    path = join_path(prefix, loc)
    kind = err["type"]
    if len(loc) < len(err["loc"]):  # a union (e.g. `list[float] | 'balanced'`): none matched
        return RecipeError(
            path, f"invalid value {_input_at(errors, loc)!r}: {_union_hint(errors, loc)}."
        )
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(model, loc)
        hint = did_you_mean(key, allowed) or (
            f" Valid keys: {', '.join(allowed)}." if allowed else ""
        )
        return RecipeError(path, f"unknown key.{hint}")
    if kind == "missing":  # a short list for a tuple (`betas: [0.9]`) misses an item, not a key
        what = "item" if isinstance(loc[-1], int) else "key"
        return RecipeError(path, f"required {what} is missing.")
    if kind == "string_pattern_mismatch" and path == "name":
        return RecipeError(
            path,
            f"{err.get('input')!r} cannot name a run folder: use letters, digits, '_', '.' and "
            "'-' (set name: in the recipe, or name=... on the command line).",
        )
    message = err["msg"][0].lower() + err["msg"][1:]
    return RecipeError(path, f"{message} (got {err.get('input')!r}).")


_UNION_TAGS = {"str", "int", "float", "bool", "bytes", "none"}  # plain-type union members


def _field_part(loc: tuple) -> tuple:
    """Cut pydantic's union-member tags (like 'list[constrained-float]', 'str') off a location."""
    for i, part in enumerate(loc):
        if isinstance(part, str) and (not part.isidentifier() or part in _UNION_TAGS):
            return loc[:i]
    return loc


def _input_at(errors: list[dict], loc: tuple) -> object:
    for e in errors:
        if tuple(e["loc"]) == loc or len(e["loc"]) == len(loc) + 1:
            return e.get("input")
    return None


def _union_hint(errors: list[dict], loc: tuple) -> str:
    """'<why not member 1>, or <why not member 2>' for the union members at `loc`."""
    reasons = [
        e["msg"][0].lower() + e["msg"][1:]
        for e in errors
        if tuple(e["loc"][: len(loc)]) == loc and len(e["loc"]) > len(loc)
    ]
    return ", or ".join(dict.fromkeys(reasons))
