"""`dltrain sweep`: a hyperparameter search on Optuna, each trial an ordinary run folder.

The search space is a YAML file (`SearchSpace`): the metric to optimise (default: the recipe's
train.monitor; minimised for losses, maximised for accuracy), the sampler (tpe, random, grid),
the pruner (median, hyperband, none: each epoch's value is reported to it) and `params`, dotted
recipe keys with their ranges. Every key and range is checked against the recipe's schema
before the first trial, by resolving the recipe with each bound and choice as an override.

The sweep folder `{output}/{name}/` holds the Optuna study (`study.db`, SQLite, unless
--storage names another database), `trials/NNN/` (trial NNN's run folder, or its fold-k folders
with `folds: K`) and the report (`sweep_report.json` / `.md`, plots: experiments/sweep_report.py).

- `--trials N` is the total: running the command again continues the study until N trials
  ended (complete, pruned or failed). Several processes, on one machine or many (an RDB
  storage), may run the same command at once: trial numbers come from the storage, and each
  process stops once the trials ended and running reach N.
- A trial that fails (NaN loss, a setting the model refuses) is recorded as failed and the
  search goes on. Ctrl-C finishes the running trial's save and stops; that trial does not
  count, and the next run of the command tries its parameters again first.
- Trials never look at the test split: each run's final report is on its validation split, and
  its value is the best epoch's metric (best.pt is chosen by that metric). Only the best trial
  is evaluated on the test split, once the N trials are done.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import filelock
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dltrain.config.messages import recipe_error
from dltrain.config.recipe import Recipe, load_recipe, parse_yaml
from dltrain.errors import DltrainError, UserError

METRICS = ("val_loss", "val_accuracy", "train_loss")
TRIALS_FOLDER = "trials"
STUDY_FILE = "study.db"
BEST_TEST_FOLDER = "best-test"
INTERRUPTED = "interrupted"  # user attribute of a trial a stop request ended


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


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def _check_range(low: float, high: float, log: bool) -> None:
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0 (got {low})")


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
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {recipe_error(exc, SearchSpace)}") from None


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


def best_value(history: list[dict[str, float | None]], metric: str) -> float | None:
    """The best epoch's value of `metric` (a loss's lowest, an accuracy's highest)."""
    values = [r.get(metric) for r in history]
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return max(values) if direction_of(metric) == "maximize" else min(values)


@dataclass
class Sweep:
    """A sweep being run: its settings, folder and study."""

    recipe_path: Path
    overrides: list[str]
    space: SearchSpace
    recipe: Recipe  # the base recipe (overrides applied)
    metric: str
    root: Path
    study: Any  # optuna.Study
    trials: int

    def trial_recipe(self, number: int, params: dict[str, Any]) -> Recipe:
        """The recipe of trial `number`: the sampled parameters as overrides, its own run
        folder trials/NNN, and best.pt chosen by the sweep's metric."""
        extra = [override(key, value) for key, value in params.items()]
        placed = [
            override("output", str(self.root / TRIALS_FOLDER)),
            override("name", trial_name(number)),
            override("train.monitor", self.metric),
        ]
        return load_recipe(self.recipe_path, [*self.overrides, *extra, *placed])

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's parameters as the recipe takes them (lists that Optuna keeps as text)."""
        return {
            key: _unchoice(param, params[key])
            if isinstance(param, CategoricalParam)
            else params[key]
            for key, param in self.space.params.items()
            if key in params
        }

    def ended(self) -> tuple[int, int]:
        """(trials that ended and count towards --trials, trials running now). A trial left
        running by a process of this machine that is gone (killed) is ended here as
        interrupted, and queued to be tried again."""
        from optuna.trial import TrialState

        ended = running = 0
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state == TrialState.RUNNING and _orphaned(trial):
                self.study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
                self.study.tell(trial.number, state=TrialState.FAIL)
                self.study.enqueue_trial(trial.params)
            elif trial.state == TrialState.RUNNING:
                running += 1
            elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                trial.state == TrialState.FAIL and not trial.user_attrs.get(INTERRUPTED)
            ):
                ended += 1
        return ended, running


def _orphaned(trial: Any) -> bool:
    """Whether a running trial's process (named in its user attributes) is gone from this
    machine. Trials of other machines cannot be checked from here."""
    owner = trial.user_attrs.get("process")
    if not owner or owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def trial_name(number: int) -> str:
    return f"{number:03d}"


def open_sweep(
    recipe_path: Path,
    space_path: Path,
    overrides: list[str],
    trials: int,
    storage: str | None,
    study_name: str | None,
) -> Sweep:
    """Check everything (recipe, data paths, space), then create or load the study."""
    import optuna

    from dltrain.data.paths import check_input_paths

    if trials < 1:
        raise UserError(f"--trials must be at least 1 (got {trials}).")
    recipe = load_recipe(recipe_path, overrides)
    check_input_paths(recipe.data.dataset_args)
    space = load_space(space_path)
    check_space(space, recipe_path, overrides)
    metric = space.metric or recipe.train.monitor
    root = Path(recipe.output) / recipe.name
    if (root / "recipe.yaml").exists():
        raise UserError(
            f"{root} holds a single run, not a sweep; use another name (name=...) or output "
            "(output=...) for the sweep."
        )
    root.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # dltrain says what happens
    # Processes starting together would race to create the database's tables and the study:
    # on one machine they take turns (a file lock in the sweep folder).
    with filelock.FileLock(root / ".study.lock"):
        study = optuna.create_study(
            storage=_storage(storage, root),
            study_name=study_name or recipe.name,
            direction=direction_of(metric),
            sampler=_sampler(space, recipe.seed),
            pruner=_pruner(space, recipe.train.epochs),
            load_if_exists=True,
        )
        _check_same_search(study, space, metric, recipe_path)
    return Sweep(recipe_path, list(overrides), space, recipe, metric, root, study, trials)


def _storage(url: str | None, root: Path) -> Any:
    """An Optuna storage: the URL given, or SQLite in the sweep folder (which waits for a
    writer of another process instead of failing)."""
    import optuna

    url = url or f"sqlite:///{(root / STUDY_FILE).absolute()}"
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # a bad URL, a missing driver, a refused connection
        raise UserError(
            f"--storage {url}: cannot open it as an Optuna storage ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Give a database URL such as "
            "sqlite:///study.db or postgresql://user@host/db (its driver installed)."
        ) from None


def _sampler(space: SearchSpace, seed: int) -> Any:
    import optuna

    # per process: processes sharing a study must not propose the same trials
    seeded = seed * 1_000_003 + os.getpid()
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seeded)
    if space.sampler == "grid":
        return optuna.samplers.GridSampler(_grid(space), seed=seeded)
    return optuna.samplers.TPESampler(seed=seeded)


def _grid(space: SearchSpace) -> dict[str, list[Any]]:
    grid = {}
    for key, param in space.params.items():
        if isinstance(param, CategoricalParam):
            grid[key] = [_choice(c) for c in param.choices]
        elif isinstance(param, IntParam) and not param.log:
            grid[key] = list(range(param.low, param.high + 1, param.step))
        elif isinstance(param, FloatParam) and param.step is not None:
            count = int(math.floor((param.high - param.low) / param.step + 1e-9)) + 1
            grid[key] = [param.low + i * param.step for i in range(count)]
        else:
            raise UserError(
                f"search space params.{key}: the grid sampler needs a finite list of values: "
                "give choices (type: categorical) or a step (without log)."
            )
    return grid


def _pruner(space: SearchSpace, epochs: int) -> Any:
    import optuna

    if space.pruner == "none" or space.folds:
        return optuna.pruners.NopPruner()
    if space.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)


def _check_same_search(study: Any, space: SearchSpace, metric: str, recipe_path: Path) -> None:
    """A study continued by a rerun (or shared by processes) must search the same space."""
    key = {"space": space.model_dump(mode="json"), "metric": metric}
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", key)
        study.set_user_attr("recipe", str(recipe_path))
    elif stored != key:
        raise UserError(
            f"study '{study.study_name}' was started with another search space or metric; "
            "continue it with the same SPACE file, or start a new study with --study NAME."
        )


def _choice(value: Any) -> Any:
    """Optuna keeps None/bool/int/float/str choices; others (lists) travel as YAML text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip()


def _unchoice(param: CategoricalParam, value: Any) -> Any:
    for choice in param.choices:
        if _choice(choice) == value:
            return choice
    return value


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """The trial's parameter values, sampled from the space (in its order)."""
    params = {}
    for key, p in space.params.items():
        if isinstance(p, FloatParam):
            params[key] = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            params[key] = trial.suggest_int(key, p.low, p.high, log=p.log, step=p.step)
        else:
            chosen = trial.suggest_categorical(key, [_choice(c) for c in p.choices])
            params[key] = _unchoice(p, chosen)
    return params


# -- running trials ----------------------------------------------------------------------------


def run_trials(
    sweep: Sweep,
    train: Callable[[Recipe, Callable[[dict[str, Any]], None] | None], float],
    say: Callable[[str], None],
) -> None:
    """Run trials until --trials have ended (this process and any other on the study).

    `train(recipe, after_epoch)` trains one trial's recipe and returns its value; it raises
    DltrainError when the run fails (recorded as a failed trial) and Interrupted on a stop
    request (the trial is marked as interrupted, its parameters queued again, and the stop
    goes on up).
    """
    import optuna

    from dltrain.system.interrupts import Interrupted

    while True:
        ended, running = sweep.ended()
        if ended + running >= sweep.trials:
            return
        trial = sweep.study.ask()
        trial.set_user_attr("process", {"host": socket.gethostname(), "pid": os.getpid()})
        params = suggest(trial, sweep.space)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        say(f"trial {trial.number} ({ended + 1} of {sweep.trials}): {shown}")
        try:
            value = train(sweep.trial_recipe(trial.number, params), _pruning(trial, sweep))
        except optuna.TrialPruned:
            sweep.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            say(f"trial {trial.number}: pruned")
            continue
        except Interrupted:
            trial.set_user_attr(INTERRUPTED, True)
            sweep.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            sweep.study.enqueue_trial(trial.params)  # tried again first
            raise
        except DltrainError as exc:
            trial.set_user_attr("error", str(exc)[:1000])
            sweep.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            say(f"trial {trial.number}: failed ({exc})")
            continue
        if value is None:
            trial.set_user_attr("error", f"no finite {sweep.metric} in any epoch")
            sweep.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            say(f"trial {trial.number}: failed (no finite {sweep.metric})")
            continue
        sweep.study.tell(trial, value)
        best = sweep.study.best_trial
        say(
            f"trial {trial.number}: {sweep.metric} {value:.4f} · best {best.value:.4f} "
            f"(trial {best.number})"
        )


def _pruning(trial: Any, sweep: Sweep) -> Callable[[dict[str, Any]], None] | None:
    """Each epoch's metric to the pruner, which may end the trial (not with folds)."""
    if sweep.space.folds or sweep.space.pruner == "none":
        return None

    def after_epoch(row: dict[str, Any]) -> None:
        import optuna

        value = row.get(sweep.metric)
        if value is None or not math.isfinite(value):
            return
        trial.report(float(value), int(row["epoch"]))
        if trial.should_prune():
            raise optuna.TrialPruned()

    return after_epoch


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def run_sweep(sweep: Sweep, progress: Any, stop: Any, say: Callable[[str], None]) -> dict:
    """Run the trials, then (once --trials have ended) evaluate the best trial on the test
    split, and write the report; returns sweep_report.json's content."""
    from dltrain.experiments.sweep_report import write_sweep_report

    def train(recipe: Recipe, after_epoch: Callable[[dict[str, Any]], None] | None):
        return _train_trial(sweep, recipe, after_epoch, progress, stop)

    with _tracked(sweep):
        run_trials(sweep, train, say)
    ended, running = sweep.ended()
    best_test = None
    if ended >= sweep.trials and running == 0:
        best_test = _evaluate_best(sweep, progress, say)
    return write_sweep_report(sweep, best_test)


def _tracked(sweep: Sweep) -> contextlib.AbstractContextManager:
    """With logging.mlflow: the sweep's parent MLflow run, its trials nested under it."""
    settings = sweep.recipe.logging.mlflow
    if not settings:
        return contextlib.nullcontext()
    from dltrain.config.recipe import MlflowSettings
    from dltrain.reporting.mlflow_tracking import sweep_run

    space = {f"space.{k}": v.model_dump() for k, v in sweep.space.params.items()}
    return sweep_run(
        settings if settings is not True else MlflowSettings(),
        sweep.recipe.model_dump(mode="json"),
        f"sweep {sweep.study.study_name}",
        {"metric": sweep.metric, "trials": sweep.trials, **space},
    )


def _train_trial(
    sweep: Sweep,
    recipe: Recipe,
    after_epoch: Callable[[dict[str, Any]], None] | None,
    progress: Any,
    stop: Any,
) -> float | None:
    """One trial's run (or K fold runs), reported on validation; its value is the best
    epoch's metric (with folds: the mean over the folds)."""
    from dltrain.experiments.crossval import run_cross_validation
    from dltrain.runs.folder import RunFolder
    from dltrain.runs.listing import read_metrics
    from dltrain.training.loop import fit

    if sweep.space.folds:
        run_cross_validation(recipe, sweep.space.folds, progress, report_on="val")
        root = Path(recipe.output) / recipe.name
        values = [
            best_value(read_metrics(folder / "metrics.csv"), sweep.metric)
            for folder in sorted(root.glob("fold-*"))
        ]
        finite = [v for v in values if v is not None]
        return sum(finite) / len(finite) if finite and len(finite) == len(values) else None
    run = RunFolder.for_recipe(recipe)
    fit(recipe, run, progress, stop=stop, report_on="val", after_epoch=after_epoch)
    return best_value(read_metrics(run.metrics_path), sweep.metric)


def _evaluate_best(sweep: Sweep, progress: Any, say: Callable[[str], None]) -> dict | None:
    """The best trial's best.pt (each fold's, with folds) on the test split, into best-test/:
    the only time the sweep looks at it. Its scalar figures (the folds' mean)."""
    from dltrain.experiments.crossval import report_scalars
    from dltrain.training.evaluate import evaluate_checkpoint

    try:
        best = sweep.study.best_trial
    except ValueError:
        say("no trial completed: nothing to evaluate on the test split")
        return None
    run = sweep.root / TRIALS_FOLDER / trial_name(best.number)
    folders = sorted(run.glob("fold-*")) if sweep.space.folds else [run]
    figures = []
    for folder in folders:
        output = sweep.root / BEST_TEST_FOLDER / (folder.name if sweep.space.folds else "")
        try:
            report = evaluate_checkpoint(
                folder / "checkpoints" / "best.pt", output, progress, split="test"
            )
        except UserError as exc:  # e.g. a dataset without a test split
            say(f"best trial {best.number}: not evaluated on a test split ({exc})")
            return None
        figures.append(report_scalars(report))
    keys = [k for k in figures[0] if all(k in f for f in figures)]
    summary = {k: sum(f[k] for f in figures) / len(figures) for k in keys}
    return {"trial": best.number, "split": "test", **summary}
