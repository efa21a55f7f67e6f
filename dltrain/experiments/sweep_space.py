"""A sweep's search space file: the metric and its direction, the sampler and pruner, and
`params` (dotted recipe keys with float/int ranges or choices), each bound checked against the
recipe's schema before any trial runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dltrain.config.loading import load_recipe
from dltrain.config.messages import recipe_error
from dltrain.config.yaml_text import parse_yaml
from dltrain.errors import UserError

METRICS = ("val_loss", "val_accuracy", "train_loss")


class FloatParam(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("log and step do not combine; drop one")
        return self


class IntParam(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, self.log)
        return self


class CategoricalParam(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["categorical"]
    choices: Annotated[list[Any], Field(min_length=1)]


def _check_range(low: float, high: float, log: bool) -> None:
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0 (got {low})")


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class SearchSpace(BaseModel):
    """A sweep's SPACE.yaml."""

    model_config = ConfigDict(extra="forbid")
    metric: Literal["val_loss", "val_accuracy", "train_loss"] | None = None
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    folds: Annotated[int, Field(ge=2)] | None = None  # the objective: the K-fold mean
    params: Annotated[dict[str, Param], Field(min_length=1)]


def load_space(path: Path) -> SearchSpace:
    """Read and validate SPACE.yaml; every problem is a UserError naming the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"search space file not found: {path}. Check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the search space {path}: {exc}") from None
    raw = parse_yaml(text, str(path))
    params = raw.get("params") if isinstance(raw, dict) else None
    for key, spec in (params or {}).items() if isinstance(params, dict) else ():
        _check_param(path, str(key), spec)
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {recipe_error(exc, SearchSpace)}") from None


PARAM_TYPES = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam}


def _check_param(path: Path, key: str, spec: Any) -> None:
    """One parameter against the model its `type` names, so a problem names the parameter's
    own key (params.lr.low), not the union of every kind of parameter."""
    where = f"{path}: params.{key}"
    kinds = ", ".join(PARAM_TYPES)
    if not isinstance(spec, dict):
        raise UserError(
            f"{where}: give a mapping with type ({kinds}) and its range or choices (got {spec!r})."
        )
    model = PARAM_TYPES.get(spec.get("type"))
    if model is None:
        raise UserError(f"{where}.type: one of {kinds} (got {spec.get('type')!r}).")
    try:
        model.model_validate(spec)
    except ValidationError as exc:
        raise UserError(f"{path}: {recipe_error(exc, model, prefix=f'params.{key}')}") from None


def override(key: str, value: Any) -> str:
    """`key=value` with the value as YAML (what the command line's overrides parse)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def check_space(space: SearchSpace, recipe_path: Path, overrides: list[str]) -> None:
    """Resolve the recipe with every bound and choice of every parameter (no data is read): a
    key the recipe does not have, or a value it refuses, is a UserError naming it now."""
    for key, param in space.params.items():
        values = param.choices if isinstance(param, CategoricalParam) else [param.low, param.high]
        for value in values:
            try:
                load_recipe(recipe_path, [*overrides, override(key, value)])
            except UserError as exc:
                raise UserError(f"search space params.{key} = {value!r}: {exc}") from None


def direction_of(metric: str) -> str:
    return "maximize" if metric.endswith("accuracy") else "minimize"


def optuna_choice(value: Any) -> Any:
    """Optuna keeps None/bool/int/float/str choices; others (lists) travel as YAML text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip()


def recipe_choice(param: CategoricalParam, value: Any) -> Any:
    for choice in param.choices:
        if optuna_choice(choice) == value:
            return choice
    return value
