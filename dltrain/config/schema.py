"""The recipe's schema: its sections as pydantic models, and `resolve`, which turns a raw
recipe (plain data) into a validated, fully resolved `Recipe`.

The fixed sections (data, train, top-level keys) are pydantic models. Component sections
(`{name: <registry key>, **kwargs}`) are checked against the registered factory's signature, and
their defaults are filled in, so the resolved recipe says everything the run will do.
Every problem becomes one RecipeError naming the key path; loading.py's `load_recipe` adds the
file and line (or the override) it came from.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dltrain.config.dataset_defaults import with_dataset_defaults
from dltrain.config.kinds import Task
from dltrain.config.messages import recipe_error
from dltrain.config.registry import AUGMENTATIONS, DATASETS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS
from dltrain.config.task_fit import known_task, loss_misfit
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
    """`data.fold: {index: i, of: k}`: validate on part i of k folds of the train split
    (1-based; stratified by class for classification), train on the other k-1. Set by
    `dltrain fit --folds K` for each fold's run, so its recipe.yaml and checkpoints rebuild the
    same split (eval, resume)."""

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
    # per process (under torchrun: each process's share of a step); auto: from the training
    # rows each process reads, once they are known (training/build.py, auto_batch_size)
    batch_size: PositiveInt | Literal["auto"] = 64
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
    # CPU threads of torch's kernels: auto times a few steps at 1 and at every usable core
    # (dltrain.system.threads); N is used as given
    threads: Literal["auto"] | PositiveInt = "auto"
    ema: EmaSettings | None = (
        None  # a moving average of the weights evaluates (dltrain.training.ema)
    )


class PrivacySection(BaseModel):
    """`privacy:` differentially private training, DP-SGD through Opacus
    (dltrain.training.privacy): each sample's gradient clipped to max_grad_norm, Gaussian noise
    added, batches drawn by Poisson sampling, the spent ε tracked by Opacus' accountant."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # the ε to spend over the run's epochs (the noise is chosen for it), or a given noise
    # multiplier; neither: epsilon 8
    epsilon: Annotated[float, Field(gt=0)] | None = None
    noise_multiplier: Annotated[float, Field(gt=0)] | None = None
    delta: Literal["auto"] | Annotated[float, Field(gt=0, lt=1)] = "auto"  # auto: ~1/n_train
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0  # each sample's gradient clipped to it
    accountant: Literal["prv", "rdp"] = "prv"
    # replace the layers Opacus cannot train (BatchNorm → GroupNorm, LSTM → DPLSTM) with
    # Opacus' ModuleValidator.fix; eval and predict rebuild the model the same way
    fix_model: bool = False

    @model_validator(mode="after")
    def _one_budget(self) -> PrivacySection:
        if self.epsilon is not None and self.noise_multiplier is not None:
            raise ValueError(
                "give epsilon (a target: the noise is chosen for it) or noise_multiplier "
                "(the ε it spends is reported), not both"
            )
        if self.epsilon is None and self.noise_multiplier is None:
            self.epsilon = 8.0
        return self


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
    loss: dict[str, Any] = {"name": "auto"}  # the task's own (config/task_fit.py)
    optimizer: dict[str, Any] = {"name": "adam"}
    scheduler: dict[str, Any] | None = None
    train: TrainSection = TrainSection()
    privacy: PrivacySection | None = None  # DP-SGD (dltrain.training.privacy)
    eval: EvalSection = EvalSection()
    distributed: DistributedSection = DistributedSection()
    logging: LoggingSection = LoggingSection()

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what recipe.yaml and checkpoints store).

        Sections and keys that are unset and newer than the first recipes (`imports`,
        `data.fold`, `data.global_batch_size`, `data.split_seed`, `train.ema`, `privacy`,
        `distributed`, `eval`, `logging.mlflow`) are left out, so recipes that use none of
        them read as before (and a run folder of such a recipe still holds "this recipe").
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
        if data["privacy"] is None:
            del data["privacy"]
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


def resolve(raw: dict[str, Any]) -> Recipe:
    """Validate a recipe mapping and fill every default, components included. Runs no code:
    the user's modules under `imports:` must be imported before (import_user_modules, as
    resolve_with_context does), so that the components they register can be named."""
    raw = expand_shorthand(raw)
    _check_top_level_keys(raw)
    data = raw.get("data")
    if isinstance(data, dict):
        raw = with_dataset_defaults(raw, DATASETS.recipe_defaults(data.get("name")))
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
    _check_loss_fits(updates["loss"]["name"], updates["data"])
    return recipe.model_copy(update=updates)


def _check_loss_fits(loss: str, data: DataSection) -> None:
    """A loss that cannot train the task the recipe fixes is refused now, not after the data
    is read (or, worse, after training)."""
    task = known_task(data.task, data.name)
    source = " (data.task)" if data.task != "auto" else f" (dataset '{data.name}')"
    message = loss_misfit(loss, task, source) if task else None
    if message:
        raise RecipeError("loss.name", message)


def expand_shorthand(raw: dict[str, Any]) -> dict[str, Any]:
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
    # the syntax resolve_device() accepts (imported here: system/devices.py imports torch)
    from dltrain.system.devices import parse_device_spec

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


# -- overrides --------------------------------------------------------------------------------


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, in the order of the recipe contract."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
