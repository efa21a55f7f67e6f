"""Recipes: YAML → a validated, fully resolved recipe, with dotted KEY=VALUE overrides.

The fixed sections (data, train, top-level keys) are pydantic models. Component sections
(`{name: <registry key>, **kwargs}`) are checked against the registered factory's signature, and
their defaults are filled in, so the resolved recipe says everything the run will do.
Every problem becomes one RecipeError naming the key path; `load_recipe` adds the file and line
(or the override) it came from.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import stat
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dltrain.config.messages import recipe_error
from dltrain.data.base import Task
from dltrain.errors import RecipeError, UserError, did_you_mean

PositiveInt = Annotated[int, Field(ge=1)]

# Every model here (and each component's argument schema, see registry.py) refuses nan and inf
# (allow_inf_nan=False): no recipe value means them, and the resolved recipe, dumped in JSON mode
# for recipe.yaml and checkpoints, would turn them into null, which `eval` could not read back.


class Normalize(BaseModel):
    """Explicit per-channel (images) or per-feature (tabular) mean and std."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    mean: list[float]
    std: list[Annotated[float, Field(gt=0)]]


class Fold(BaseModel):
    """`data.fold: {index: i, of: k}`: validate on part i of k stratified folds of the train
    split (1-based), train on the other k-1. Set by `dltrain fit --folds K` for each fold's run,
    so its recipe.yaml and checkpoints rebuild the same split (eval, resume)."""

    model_config = ConfigDict(extra="forbid")
    index: PositiveInt
    of: Annotated[int, Field(ge=2)]

    @model_validator(mode="after")
    def _index_within(self) -> Fold:
        if self.index > self.of:
            raise ValueError(f"index {self.index} is beyond the {self.of} folds (1 to {self.of})")
        return self


class DataSection(BaseModel):
    """`data:`: the dataset (name + its own arguments) and how batches are made."""

    model_config = ConfigDict(
        extra="allow", allow_inf_nan=False
    )  # the extras are the dataset's own arguments
    name: str
    batch_size: PositiveInt = 64  # per process (under torchrun: each process's share of a step)
    # alternative to batch_size: samples per optimizer step over all processes and accumulated
    # micro-batches; batch_size = global_batch_size / (processes × train.accumulate)
    global_batch_size: PositiveInt | None = None
    eval_batch_size: PositiveInt | None = None  # default: 2 × batch_size (no gradients kept)
    val_split: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # the seed that carves splits (val_split, folds, a dataset's own test carve); default: the
    # run's seed. Fix it to vary the training seed over the same held-out images.
    split_seed: Annotated[int, Field(ge=0, lt=2**32)] | None = None
    augment: list[str | dict[str, dict[str, Any] | None]] = []
    normalize: Literal["auto", "none"] | Normalize = "auto"
    loader: Literal["auto", "resident", "workers"] = "auto"
    as_sequence: Literal["rows"] | None = None  # feed images row by row to sequence models
    task: Literal["auto"] | Task = "auto"  # auto: the dataset's
    num_workers: Annotated[int, Field(ge=0)] | None = None  # default: from the CPU count
    fold: Fold | None = None  # cross-validation fold; replaces val_split and any dataset val split

    @property
    def dataset_args(self) -> dict[str, Any]:
        """The dataset section as the registry sees it: name plus the dataset's arguments."""
        return {"name": self.name, **(self.model_extra or {})}


class EarlyStopping(BaseModel):
    """`train.early_stopping:` stop when the monitored value stops improving."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    monitor: Literal["val_loss", "val_accuracy", "train_loss"] = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"  # auto: max for accuracy, min for losses
    patience: Annotated[int, Field(ge=1)] = 5  # epochs without improvement before stopping
    min_delta: Annotated[float, Field(ge=0)] = 0.0  # smaller changes are no improvement


class EmaSettings(BaseModel):
    """`train.ema:` evaluate (and save as `model`) a moving average of the weights
    (dltrain/training/ema.py)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # the average keeps `decay` of itself at each update: 0.999 averages about the last 1000
    decay: Annotated[float, Field(gt=0, lt=1)] = 0.999
    every_steps: PositiveInt = 1  # update after every N optimizer steps
    warmup: bool = False  # decay min(decay, (1+n)/(10+n)) after n updates (timm's warmup)


class TrainSection(BaseModel):
    """`train:`: the length and numerics of training."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    epochs: PositiveInt = 10
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile: true (its default mode) or a mode: reduce-overhead (CUDA graphs: for short,
    # host-bound steps), max-autotune, max-autotune-no-cudagraphs
    compile: (
        bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    ) = False
    grad_clip: Annotated[float, Field(gt=0)] | None = None
    accumulate: PositiveInt = 1
    monitor: Literal["val_loss", "val_accuracy", "train_loss"] = "val_loss"  # picks best.pt
    early_stopping: EarlyStopping | None = None
    l1: Annotated[float, Field(ge=0)] = 0.0  # L1 penalty on weights (beside weight decay's L2)
    channels_last: Literal["auto"] | bool = "auto"
    cudnn_benchmark: bool = True  # CUDA: autotune convolution kernels for the fixed shapes
    tf32: bool = True  # CUDA: TF32 tensor cores for float32 matmuls/convolutions
    checkpoint_every_steps: PositiveInt | None = None  # also write last.pt mid-epoch
    on_nonfinite: Literal["stop", "skip_step"] = "stop"  # skip_step costs a sync per step
    ema: EmaSettings | None = (
        None  # a moving average of the weights evaluates (dltrain.training.ema)
    )


class EvalSection(BaseModel):
    """`eval:` how the final report (and `dltrain eval`) evaluates."""

    model_config = ConfigDict(extra="forbid")
    # test-time augmentation: outputs averaged over these views of each image (dltrain.training.tta)
    tta: list[Literal["hflip", "translate"]] = []


class DistributedSection(BaseModel):
    """`distributed:` how processes started by torchrun train together (DDP)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    backend: Literal["auto", "nccl", "gloo", "xla"] = "auto"  # auto: nccl/gloo/xla by device
    timeout_s: Annotated[float, Field(gt=0)] = 600.0  # a wait on a lost process gives up then
    find_unused_parameters: bool = False  # for models whose forward skips some parameters
    static_graph: bool = False  # the same parameters are used in every step (lets DDP optimise)
    sync_batchnorm: bool = False  # batch-norm statistics over all processes' blocks (CUDA)


class MlflowSettings(BaseModel):
    """`logging.mlflow:` where an MLflow run goes (see dltrain.reporting.mlflow_tracking)."""

    model_config = ConfigDict(extra="forbid")
    tracking_uri: str | None = None  # default: sqlite:///{output}/mlflow.db
    experiment: str | None = None  # default: the recipe's name
    log_checkpoints: bool = False  # also upload checkpoints/ as artifacts


class LoggingSection(BaseModel):
    """`logging:` where a run's metrics go besides metrics.csv and events.jsonl (always)."""

    model_config = ConfigDict(extra="forbid")
    tensorboard: bool = False  # event files in {run}/tensorboard (needs `pip install tensorboard`)
    mlflow: bool | MlflowSettings = False  # true: MLflow's local store in the output folder


class Recipe(BaseModel):
    """A whole recipe. Component sections are dicts validated against their registries."""

    # coerce_numbers_to_str: `name: 2024` (or name=2024 on the command line) is a fine run name.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)
    imports: list[str] = []  # the user's own component modules (see import_user_modules)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    device: str = "auto"
    output: str = "runs"
    data: DataSection
    model: dict[str, Any]
    loss: dict[str, Any] = {"name": "cross_entropy"}
    optimizer: dict[str, Any] = {"name": "adam"}
    scheduler: dict[str, Any] | None = None
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    distributed: DistributedSection = DistributedSection()
    logging: LoggingSection = LoggingSection()

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what recipe.yaml and checkpoints store).

        Sections and keys that are unset and newer than the first recipes (`imports`,
        `data.fold`, `data.global_batch_size`, `data.split_seed`, `train.ema`, `distributed`,
        `eval`, `logging.mlflow`) are left out, so recipes that use none of them read as before
        (and a run folder of such a recipe still holds "this recipe").
        """
        data = self.model_dump(mode="json")
        if not data["imports"]:
            del data["imports"]
        for key in ("fold", "global_batch_size", "split_seed"):
            if data["data"].get(key) is None:
                data["data"].pop(key, None)
        for section, default in (("distributed", DistributedSection()), ("eval", EvalSection())):
            if data[section] == default.model_dump(mode="json"):
                del data[section]
        if data["train"].get("ema") is None:
            del data["train"]["ema"]
        if data["logging"].get("mlflow") is False:
            del data["logging"]["mlflow"]
        return data


# The recipe sections that name a registered component, and the registry of each
COMPONENT_SECTIONS = {
    "data": "datasets",
    "model": "models",
    "loss": "losses",
    "optimizer": "optimizers",
    "scheduler": "schedulers",
}


# -- loading ----------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises UserError with file:line context."""
    path = Path(path)
    text = _read_recipe_text(path)
    raw = parse_yaml(text, str(path))
    raw.setdefault("name", path.stem)
    return resolve_with_context(raw, overrides, str(path), text, base_dir=path.parent)


MAX_RECIPE_BYTES = 4 * 1024**2  # a recipe is a few kB; anything this large is not one
MAX_YAML_VALUES = 100_000  # values after expanding &anchors/*aliases (a recipe has hundreds)


def _read_recipe_text(path: Path) -> str:
    """The recipe file's text: a regular UTF-8 file of sane size, refused fast otherwise (a
    device such as /dev/zero, a folder, a huge file would be read until memory runs out)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path} is not a regular file; give the recipe's .yaml file.")
        if info.st_size > MAX_RECIPE_BYTES:
            raise UserError(
                f"{path} is {info.st_size / 1024**2:.0f} MB; a recipe is a small YAML file (at "
                f"most {MAX_RECIPE_BYTES // 1024**2} MB). Check the path."
            )
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)  # the file may have grown since stat()
        if len(data) > MAX_RECIPE_BYTES:
            raise UserError(f"{path} is larger than {MAX_RECIPE_BYTES // 1024**2} MB.")
        return data.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe file not found: {path}. Check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}") from None


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one, so a
    second `optimizer:` section would quietly replace the first)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # `<<:` merge keys may legitimately be overridden
            key = (key_node.tag, key_node.value)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key_node.value}' (first set on line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)

    def get_single_node(self):
        """The document's node graph, refused when aliases would expand it past
        MAX_YAML_VALUES (a 'billion laughs' document is small as text but not as data)."""
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            raise _TooLarge(
                f"the YAML expands to more than {MAX_YAML_VALUES:,} values through &anchors "
                "and *aliases (a recipe has a few hundred). Write the values out."
            )
        return node


class _TooLarge(yaml.YAMLError):
    """A document whose aliases expand beyond MAX_YAML_VALUES."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for once every alias is expanded (a cycle: unbounded)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        return MAX_YAML_VALUES + 1  # a recursive structure never ends
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            total += _expanded_size(child, sizes, open_nodes)
            if total > MAX_YAML_VALUES:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes)
            if total > MAX_YAML_VALUES:
                break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse YAML safely into a mapping; syntax errors name the line and column."""
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: builds plain data only
    except _TooLarge as exc:
        raise UserError(f"{source}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise UserError(f"{where}: invalid YAML: {exc.problem}. Fix the syntax there.") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: invalid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # int()'s digit limit; very deep nesting
        raise UserError(f"{source}: cannot read the YAML: {exc}") from None
    if data is None:
        raise UserError(f"{source}: the recipe is empty. See recipes/quickstart.yaml for one.")
    if not isinstance(data, dict):
        raise UserError(
            f"{source}: a recipe must be a mapping of keys (data:, model:, ...), "
            f"not a {type(data).__name__}."
        )
    return data


def resolve_with_context(
    raw: dict[str, Any],
    overrides: list[str],
    source: str,
    text: str | None = None,
    base_dir: Path | None = None,
) -> Recipe:
    """Apply overrides and validate; errors say which file line or which override is to blame.

    `base_dir` is where relative `imports:` files are found (the recipe's folder; default: the
    current folder).
    """
    # Expand `model: mlp` first, so that overrides such as `model.hidden=[64]` can reach into it.
    raw, overridden = apply_overrides(_expand_shorthand(raw), overrides)
    try:
        # Import first: `model.name=my_model` must find the user's component when overrides
        # switch components below.
        raw = import_user_modules(raw, base_dir)
        raw = anchor_input_paths(raw, overridden, base_dir)
        return resolve(_drop_replaced_arguments(raw, overridden))
    except RecipeError as exc:
        # `from exc.__cause__`: None for most errors; for an import that failed, the user's own
        # exception, so that DLTRAIN_DEBUG=1 shows its traceback.
        culprit = _blamed_override(exc.path, overridden)
        if culprit:
            raise UserError(f"override '{culprit}': {exc}") from exc.__cause__
        line = _line_of(text, exc.path) if text else None
        where = f"{source}:{line}" if line else source
        raise UserError(f"{where}: {exc}") from exc.__cause__


def resolve(raw: dict[str, Any]) -> Recipe:
    """Validate a recipe mapping and fill every default, components included. Runs no code:
    the user's modules under `imports:` must be imported before (import_user_modules, as
    resolve_with_context does), so that the components they register can be named."""
    from dltrain.config.registry import DATASETS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS

    raw = _expand_shorthand(raw)
    _check_top_level_keys(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise recipe_error(exc, Recipe) from None
    _check_device_spec(recipe.device)
    _check_dataset_keys(recipe.data, DATASETS)
    data_args = DATASETS.validate(recipe.data.dataset_args, "data")
    resolved_data = {
        **recipe.data.model_dump(exclude=set(recipe.data.model_extra or {})),
        **data_args,
    }
    resolved_data["augment"] = _resolve_augment(recipe.data.augment)
    updates = {
        "data": DataSection.model_validate(resolved_data),
        "model": MODELS.validate(recipe.model, "model"),
        "loss": LOSSES.validate(recipe.loss, "loss"),
        "optimizer": OPTIMIZERS.validate(recipe.optimizer, "optimizer"),
        "scheduler": SCHEDULERS.validate(recipe.scheduler, "scheduler")
        if recipe.scheduler
        else None,
    }
    return recipe.model_copy(update=updates)


def _expand_shorthand(raw: dict[str, Any]) -> dict[str, Any]:
    """`model: mlp` is shorthand for `model: {name: mlp}` (likewise loss, optimizer, scheduler)."""
    return {
        key: {"name": value}
        if key in ("model", "loss", "optimizer", "scheduler") and isinstance(value, str)
        else value
        for key, value in raw.items()
    }


def _check_top_level_keys(raw: dict[str, Any]) -> None:
    """`epochs: 3` at the top level is a misplaced `train.epochs`: say so, not just 'unknown'."""
    sections = {"train": TrainSection, "data": DataSection}
    for key in raw:
        if key in Recipe.model_fields:
            continue
        home = next((name for name, model in sections.items() if key in model.model_fields), None)
        if home:
            raise RecipeError(key, f"unknown top-level key. Did you mean '{home}.{key}'?")


def _check_device_spec(spec: str) -> None:
    """Refuse a malformed device (`gpu`, `cuda:x`) now; whether it exists is known at run time."""
    from dltrain.system.devices import parse_device_spec  # the syntax resolve_device() accepts

    try:
        parse_device_spec(spec)
    except UserError as exc:
        raise RecipeError("device", str(exc)) from None


def _check_dataset_keys(data: DataSection, datasets) -> None:
    """Unknown data keys get a suggestion from both the fixed keys and the dataset's arguments."""
    if data.name not in datasets:
        datasets.validate({"name": data.name}, "data")  # raises the unknown-name error
    dataset_keys = [a.name for a in datasets.arguments(data.name)]
    for key in data.model_extra or {}:
        if key not in dataset_keys and key not in datasets.runtime_args:
            allowed = [*DataSection.model_fields, *dataset_keys]
            hint = did_you_mean(key, allowed) or f" Valid keys: {', '.join(allowed)}."
            raise RecipeError(f"data.{key}", f"unknown key for dataset '{data.name}'.{hint}")


def _resolve_augment(entries: list) -> list[dict[str, dict[str, Any]]]:
    """`[hflip, {random_crop: {padding: 4}}]` → `[{hflip: {...defaults}}, {random_crop: {...}}]`."""
    from dltrain.config.registry import AUGMENTATIONS

    resolved = []
    for i, entry in enumerate(entries):
        where = f"data.augment[{i}]"
        if isinstance(entry, dict):
            if len(entry) != 1:
                raise RecipeError(where, "write one augmentation per entry: {name: {arg: value}}.")
            ((name, kwargs),) = entry.items()
        else:
            name, kwargs = entry, {}
        if name == "normalize":  # torchvision habit; here it applies at evaluation too
            raise RecipeError(
                where,
                "normalize is not an augmentation (augmentations run in training only); set "
                "data.normalize: {mean: [...], std: [...]} (or auto, the default, or none).",
            )
        checked = AUGMENTATIONS.validate({"name": name, **(kwargs or {})}, where)
        resolved.append({checked.pop("name"): checked})
    return resolved


# -- imports: the user's own components --------------------------------------------------------

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def import_user_modules(raw: dict[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    """Import the modules a recipe lists under `imports:`, so their components register.

    This is the only way a recipe runs code, and only modules the user names here. An entry
    ending in `.py` is a file, relative to `base_dir` (default: the current folder); it is
    returned as an absolute path, so a checkpoint's recipe finds it again from anywhere. Other
    entries are dotted module names, found on the Python path or else in `base_dir`.
    Importing again is a no-op. Returns `raw` with the entries so normalised.
    """
    if "imports" not in raw:
        return raw
    entries = raw["imports"]
    if entries is None:  # `imports: null` (or the override imports=null): nothing to import
        return {**raw, "imports": []}
    if not isinstance(entries, list):
        raise RecipeError(
            "imports",
            f"must be a list of module names or .py files (got {entries!r}), e.g. "
            "[my_pkg.models, ./my_models.py].",
        )
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    normalised = []
    for i, entry in enumerate(entries):
        where = f"imports[{i}]"
        if isinstance(entry, str) and entry.strip().endswith(".py"):
            path = Path(entry.strip()).expanduser()
            path = (path if path.is_absolute() else base / path).resolve()
            _import_file(path, where)
            normalised.append(str(path))
        elif isinstance(entry, str) and _MODULE_NAME.match(entry):
            _import_module(entry, base, where)
            normalised.append(entry)
        else:
            raise RecipeError(
                where,
                f"{entry!r} is neither a dotted module name (my_pkg.models) nor a .py file "
                "(./my_models.py).",
            )
    return {**raw, "imports": normalised}


def import_for_checkpoint(
    saved: dict[str, Any],
    imports: list[str],
    source: str,
    needed: tuple[str, ...] = tuple(COMPONENT_SECTIONS),
) -> list[str]:
    """Import the modules the user names for a checkpoint (`--imports`), never the ones the
    checkpoint's recipe lists: a checkpoint is data, and whoever wrote it must not choose what
    code runs here. Returns the imports as normalised (absolute .py paths). A component of the
    `needed` sections that is still unknown is a UserError saying which modules to pass."""
    try:
        normalised = import_user_modules({"imports": list(imports)})["imports"]
    except RecipeError as exc:
        raise UserError(f"--imports: {exc.problem}") from exc.__cause__
    missing = _unknown_components(saved, needed)
    if missing:
        listed = saved.get("imports") if isinstance(saved.get("imports"), list) else []
        written_with = f" (the run that wrote it imported {', '.join(map(str, listed))})"
        example = listed[0] if listed else "my_components.py"
        raise UserError(
            f"{source} uses {', '.join(missing)}, which dltrain does not have"
            f"{written_with if listed else ''}. A checkpoint never runs code: name the module "
            f"yourself, e.g. --imports {example}."
        )
    return normalised


def _unknown_components(saved: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """'model my_net' for each section of a saved recipe naming an unregistered component."""
    from dltrain.config.registry import REGISTRIES

    unknown = []
    for section in sections:
        kind = COMPONENT_SECTIONS[section]
        body = saved.get(section)
        name = body.get("name") if isinstance(body, dict) else None
        if isinstance(name, str) and name not in REGISTRIES[kind]:
            unknown.append(f"{section} '{name}'")
    return unknown


def _import_module(name: str, base: Path, where: str) -> None:
    """Import a dotted module; `base` joins the end of sys.path for this import only, so it
    never shadows an installed module."""
    folder = str(base)
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    try:
        importlib.invalidate_caches()  # the module may have been written after startup
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise RecipeError(
                where,
                f"cannot import module '{name}': not found on the Python path nor in {base}. "
                "Check the name, install its package, or list a file instead (./my_models.py).",
            ) from None
        raise RecipeError(where, _import_failure(name, exc)) from exc
    except (Exception, SystemExit) as exc:  # whatever the user's module raises
        raise RecipeError(where, _import_failure(name, exc)) from exc
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_file(path: Path, where: str) -> None:
    """Import a .py file as the module named by its stem, its folder on sys.path meanwhile (as
    for a script) so it can import its neighbours."""
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        if origin and Path(origin).resolve() == path:
            return  # imported already (a module registers its components once)
        raise RecipeError(
            where,
            f"cannot import {path} as module '{name}': a module of that name is already "
            f"loaded (from {origin or 'Python itself'}). Rename the file.",
        )
    if not path.is_file():
        raise RecipeError(
            where,
            f"file not found: {path}. Relative .py paths start at the recipe's folder.",
        )
    if not name.isidentifier():
        raise RecipeError(
            where, f"'{path.name}' cannot be a module name: use letters, digits and '_'."
        )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import name` would, so its neighbours can import it too
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise RecipeError(where, _import_failure(str(path), exc)) from exc
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_failure(what: str, exc: BaseException) -> str:
    """'importing X raised Error: message (file.py:12). Fix ...' for an import that failed."""
    if isinstance(exc, SyntaxError) and exc.filename:
        at = f"{exc.filename}:{exc.lineno}"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        at = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
    return (
        f"importing '{what}' raised {reason}{f' (at {at})' if at else ''}. Fix that module "
        "(DLTRAIN_DEBUG=1 shows the traceback) or remove it from imports."
    )


# -- overrides --------------------------------------------------------------------------------

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
        parsed = yaml.load(value, Loader=_RecipeLoader) if value.strip() else None
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


def anchor_input_paths(
    raw: dict[str, Any], overridden: dict[str, str], base_dir: Path | None
) -> dict[str, Any]:
    """Make the dataset's input paths absolute: relative to the recipe file's folder when the
    file says them, to the working folder when an override does (or there is no file). The
    resolved recipe (recipe.yaml, checkpoints) then names the same files from anywhere."""
    from dltrain.config.registry import DATASETS

    data = raw.get("data")
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or name not in DATASETS:
        return raw  # resolve() names the problem
    anchored = dict(data)
    for key in DATASETS.path_arguments(name):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            continue
        from_file = base_dir is not None and not {"data", f"data.{key}"} & overridden.keys()
        start = base_dir if from_file else Path.cwd()
        anchored[key] = os.path.normpath(Path(start).absolute() / Path(value).expanduser())
    return {**raw, "data": anchored}


def _drop_replaced_arguments(raw: dict[str, Any], overridden: dict[str, str]) -> dict[str, Any]:
    """After `data.name=npz` (or model/loss/...), drop the file's arguments of the old component
    that the new one does not take, so switching a component on the command line just works.
    Arguments given as overrides are kept (and still checked)."""
    from dltrain.config.registry import REGISTRIES

    for key in overridden:
        section, _, leaf = key.partition(".")
        registry = REGISTRIES.get(COMPONENT_SECTIONS.get(section, ""))
        body = raw.get(section)
        if leaf != "name" or registry is None or not isinstance(body, dict):
            continue
        if not isinstance(body.get("name"), str) or body["name"] not in registry:
            continue  # the unknown name is reported by validation
        keep = {a.name for a in registry.arguments(body["name"])} | {"name"}
        if section == "data":
            keep |= set(DataSection.model_fields)
        raw[section] = {
            k: v for k, v in body.items() if k in keep or f"{section}.{k}" in overridden
        }
    return raw


def _blamed_override(path: str, overridden: dict[str, str]) -> str | None:
    """The override to blame for an error at `path`, or None when the file is to blame.

    Preferably the last override that set `path` itself or a key inside it (`optimzer.lr=1`
    creates the unknown `optimzer`); else the last one that replaced a parent section or the
    section's name (a changed component name makes its other arguments wrong).
    """
    for key, text in reversed(overridden.items()):
        if key == path or key.startswith(path + "."):
            return text
    section = path.split(".")[0].split("[")[0]
    for key, text in reversed(overridden.items()):
        if path.startswith((key + ".", key + "[")) or key == f"{section}.name":
            return text
    return None


def _line_of(text: str, path: str) -> int | None:
    """The 1-based line of a dotted key path in YAML text (the deepest part that exists)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            key_node = next((k for k, _ in node.value if k.value == part), None)
            if match is None:
                break
            line, node = key_node.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, in the order of the recipe contract."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
