"""A sweep's Optuna study: opened (or continued) on its storage with the space's sampler and
pruner, refused when the storage holds a different search, its trials named and foldered, and
trials left running by a killed process of this machine found again."""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from dltrain.config.loading import load_recipe
from dltrain.config.schema import Recipe
from dltrain.errors import UserError, first_line
from dltrain.experiments.sweep_space import (
    CategoricalParam,
    FloatParam,
    IntParam,
    SearchSpace,
    check_space,
    direction_of,
    load_space,
    optuna_choice,
    override,
    recipe_choice,
)

TRIALS_FOLDER = "trials"


STUDY_FILE = "study.db"


BEST_TEST_FOLDER = "best-test"


INTERRUPTED = "interrupted"  # user attribute of a trial a stop request ended


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
    storage: str | None = None  # --storage as given (None: study.db in the sweep folder)

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
            key: recipe_choice(param, params[key])
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
            storage=open_storage(storage, root),
            study_name=study_name or recipe.name,
            direction=direction_of(metric),
            sampler=_sampler(space, recipe.seed),
            pruner=make_pruner(space, recipe.train.epochs),
            load_if_exists=True,
        )
        _check_same_search(study, space, metric, recipe_path)
    return Sweep(recipe_path, list(overrides), space, recipe, metric, root, study, trials, storage)


def open_storage(url: str | None, root: Path) -> Any:
    """An Optuna storage: the URL given, or SQLite in the sweep folder (which waits for a
    writer of another process instead of failing)."""
    import optuna

    given = url is not None
    if given and url.startswith(JOURNAL):
        return _journal_storage(url)
    url = url or f"sqlite:///{(root / STUDY_FILE).absolute()}"
    engine = {"connect_args": _connect_args(url)}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # a bad URL, a missing driver, a refused connection, a damaged file
        why = first_line(exc, with_type=True)
        if not given:  # the sweep's own file: blame it, not an option the user never gave
            raise UserError(
                f"the sweep's study {root / STUDY_FILE} cannot be opened ({why}): it is damaged "
                "or not an Optuna study. Move it aside to start the search again, or use "
                "another output folder."
            ) from None
        fix = (
            "Install the database's driver: pip install 'psycopg[binary]' for "
            "postgresql+psycopg://user@host/db, pymysql for mysql+pymysql://user@host/db."
            if isinstance(exc, ImportError)
            else "Give a database URL such as sqlite:///study.db or "
            "postgresql+psycopg://user@host/db, its server running and reachable."
        )
        raise UserError(
            f"--storage {url}: cannot open it as an Optuna storage ({why}). {fix}"
        ) from None


# --storage journal:PATH — Optuna's JournalStorage in one append-only file: for clusters with
# a shared filesystem and no database server
JOURNAL = "journal:"


def _journal_storage(url: str) -> Any:
    """Optuna's JournalStorage on the file `url` names (created when missing; its folder must
    exist). Processes on several machines append to it under Optuna's own file lock."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = Path(url[len(JOURNAL) :]).expanduser()
    if not path.parent.is_dir():
        raise UserError(
            f"--storage {url}: the folder {path.parent} does not exist; give a file in a folder "
            "every machine of the sweep can write (a shared filesystem)."
        )
    if path.is_dir():
        raise UserError(f"--storage {url}: {path} is a folder; name a file, e.g. {path}/study.log.")
    if not _starts_like_a_journal(path):  # Optuna would append to it, and fail reading it back
        raise UserError(
            f"--storage {url}: {path} is not an Optuna journal (its first line is not one of "
            "Optuna's records). Name another file, or move this one aside."
        )
    try:
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(path.absolute())))
        storage.get_all_studies()  # replays the file now: a damaged one is said here
        return storage
    except Exception as exc:  # a file that is not Optuna's journal
        why = first_line(exc, with_type=True)
        raise UserError(
            f"--storage {url}: cannot open it as an Optuna journal ({why}). Name another file, "
            "or move this one aside."
        ) from None


def _starts_like_a_journal(path: Path) -> bool:
    """A missing or empty file, or one whose first line is an Optuna journal record."""
    if not path.is_file() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as f:
        first = f.readline()
    try:
        return "op_code" in json.loads(first)
    except (ValueError, TypeError):
        return False


# How long a database server may take to accept a connection: a server that does not answer
# is reported in seconds, not after the operating system's minutes of TCP retries
CONNECT_SECONDS = 10


def _connect_args(url: str) -> dict[str, Any]:
    """The driver's options: SQLite waits for another process's write (processes of one
    machine share its file); a server's driver gives up connecting after CONNECT_SECONDS."""
    scheme = url.partition(":")[0].partition("+")[0]
    if scheme == "sqlite":
        return {"timeout": 60}
    if scheme in ("postgresql", "postgres", "mysql"):
        return {"connect_timeout": CONNECT_SECONDS}
    return {}


def _sampler(space: SearchSpace, seed: int) -> Any:
    import optuna

    # per process: processes sharing a study must not propose the same trials
    seeded = seed * 1_000_003 + os.getpid()
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seeded)
    if space.sampler == "grid":
        return _grid_sampler(optuna)(_grid(space), seed=seeded)
    return optuna.samplers.TPESampler(seed=seeded)


def _grid_sampler(optuna) -> type:
    """Optuna's GridSampler without its call to study.stop() once the grid is used up: that
    call is for Study.optimize and raises outside it, where dltrain asks and tells its trials
    (the last grid point's tell failed, leaving it running); --trials bounds the search."""

    class GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return GridSampler


# The most points a grid search may have: each is a trial (a training run), and Optuna holds
# the whole grid in memory; far past what anyone would run
MAX_GRID_POINTS = 100_000


def _grid(space: SearchSpace) -> dict[str, list[Any]]:
    """Every parameter's values for the grid sampler, counted before any list is built (a
    range of 10^9 integers would take gigabytes)."""
    counts = {key: _grid_count(key, param) for key, param in space.params.items()}
    total = math.prod(counts.values())
    if total > MAX_GRID_POINTS:
        sizes = ", ".join(f"params.{key}: {count:,}" for key, count in counts.items())
        raise UserError(
            f"search space: the grid has {total:,} points ({sizes}), more than "
            f"{MAX_GRID_POINTS:,}; give fewer values (a larger step, fewer choices) or use "
            "sampler: tpe or random."
        )
    return {key: _grid_values(param, counts[key]) for key, param in space.params.items()}


def _grid_count(key: str, param: Any) -> int:
    """How many values a parameter has on the grid; a UserError for one without a finite list."""
    if isinstance(param, CategoricalParam):
        return len(param.choices)
    if isinstance(param, IntParam) and not param.log:
        return (param.high - param.low) // param.step + 1
    if isinstance(param, FloatParam) and param.step is not None:
        return int(math.floor((param.high - param.low) / param.step + 1e-9)) + 1
    raise UserError(
        f"search space params.{key}: the grid sampler needs a finite list of values: "
        "give choices (type: categorical) or a step (without log)."
    )


def _grid_values(param: Any, count: int) -> list[Any]:
    if isinstance(param, CategoricalParam):
        return [optuna_choice(c) for c in param.choices]
    return [param.low + i * param.step for i in range(count)]


def make_pruner(space: SearchSpace, epochs: int) -> Any:
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
