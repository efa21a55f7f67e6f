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
  search goes on. Ctrl-C stops the running trial and writes the report of the trials so far;
  that trial does not count (its checkpoints are deleted, its metrics.csv kept), and the next
  run of the command tries its parameters again first, from the start.
- Trials never look at the test split: each run's final report is on its validation split, and
  its value is the best epoch's metric (best.pt is chosen by that metric). Only the best trial
  is evaluated on the test split, once the N trials are done.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dltrain.config.schema import MlflowSettings, Recipe
from dltrain.errors import DltrainError, UserError
from dltrain.experiments.crossval import run_cross_validation
from dltrain.experiments.sweep_processes import train_in_processes
from dltrain.experiments.sweep_report import write_sweep_report
from dltrain.experiments.sweep_space import (
    FloatParam,
    IntParam,
    SearchSpace,
    optuna_choice,
    recipe_choice,
)
from dltrain.experiments.sweep_study import (
    BEST_TEST_FOLDER,
    INTERRUPTED,
    TRIALS_FOLDER,
    Sweep,
    best_value,
    trial_name,
)
from dltrain.reporting.mlflow_tracking import sweep_run
from dltrain.reporting.report import report_scalars
from dltrain.runs.folder import RunFolder
from dltrain.runs.metrics_csv import read_metrics
from dltrain.system.interrupts import Interrupted
from dltrain.training.evaluate import evaluate_checkpoint
from dltrain.training.loop import fit


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """The trial's parameter values, sampled from the space (in its order)."""
    params = {}
    for key, p in space.params.items():
        if isinstance(p, FloatParam):
            params[key] = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            params[key] = trial.suggest_int(key, p.low, p.high, log=p.log, step=p.step)
        else:
            chosen = trial.suggest_categorical(key, [optuna_choice(c) for c in p.choices])
            params[key] = recipe_choice(p, chosen)
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
        except Interrupted as stopped:
            trial.set_user_attr(INTERRUPTED, True)
            sweep.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            sweep.study.enqueue_trial(trial.params)  # tried again first
            _drop_checkpoints(sweep.root / TRIALS_FOLDER / trial_name(trial.number))
            raise Interrupted(
                stopped.signum,
                None,
                f"during trial {trial.number}",
                saved="the trials so far are in the sweep's report",
            ) from None
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


def _drop_checkpoints(trial_folder: Path) -> None:
    """An interrupted trial is run again from its start as a new trial: its checkpoints
    (often the largest files of a sweep) would never be read. Its metrics.csv stays, a record
    of how far it got."""
    for folder in [trial_folder, *trial_folder.glob("fold-*")]:
        shutil.rmtree(RunFolder(folder).checkpoints, ignore_errors=True)


class Pruning:
    """Each epoch's metric to the pruner, which may end the trial (`trial`: whose)."""

    def __init__(self, trial: Any, metric: str):
        self.trial, self.metric = trial, metric

    def __call__(self, row: dict[str, Any]) -> None:
        import optuna

        value = row.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), int(row["epoch"]))
        if self.trial.should_prune():
            raise optuna.TrialPruned()


def _pruning(trial: Any, sweep: Sweep) -> Pruning | None:
    """The pruner's epoch callback for a trial (none with folds, or pruner: none)."""
    if sweep.space.folds or sweep.space.pruner == "none":
        return None
    return Pruning(trial, sweep.metric)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def run_sweep(
    sweep: Sweep, progress: Any, stop: Any, say: Callable[[str], None], nproc: int | None = None
) -> dict:
    """Run the trials (each in `nproc` processes, when given), then (once --trials have ended)
    evaluate the best trial on the test split, and write the report; returns
    sweep_report.json's content."""

    def train(recipe: Recipe, after_epoch: Pruning | None):
        if nproc is None:
            return _train_trial(sweep, recipe, after_epoch, progress, stop)
        trial_id = after_epoch.trial._trial_id if after_epoch else None  # its processes report
        return train_in_processes(sweep, recipe, trial_id, nproc, stop)

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
