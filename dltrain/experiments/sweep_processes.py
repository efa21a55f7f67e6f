"""`dltrain sweep --nproc K`: each trial is a data-parallel run of K processes.

The sweep process talks to Optuna: it asks for a trial, writes the trial's recipe and runs
`dltrain fit TRIAL.yaml --nproc K` (torchrun's launcher, as any data-parallel fit) in a child
process. Pruning follows Optuna's TorchDistributedTrial pattern: rank 0 of the trial's
processes opens the same study, reports each epoch's metric to the trial and asks the pruner;
its answer is broadcast over the process group, so every rank stops at the same epoch (the
trial then exits PRUNED_EXIT and is told as pruned). Any other failure of the processes — one
lost, a setting refused — fails that trial, and the sweep goes on; a stop request is passed to
the trial's processes, which save and stop.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dltrain.config.schema import Recipe, to_yaml
from dltrain.errors import DltrainError
from dltrain.runs.folder import RunFolder
from dltrain.runs.metrics_csv import read_metrics
from dltrain.system.interrupts import SIGNAL_EXIT_CODES, Interrupted

TRIAL_VARIABLE = "DLTRAIN_SWEEP_TRIAL"  # the trial's study, storage and id, for rank 0
PRUNED_EXIT = 77  # a trial's processes ended by the pruner (between the sweep and its children)


class TrialPrunedStop(DltrainError):
    """The pruner ended this trial; raised on every rank at the same epoch."""

    exit_code = PRUNED_EXIT
    same_on_every_process = True


def train_in_processes(
    sweep: Any, recipe: Recipe, trial_id: int | None, nproc: int, stop: Any
) -> float | None:
    """Train one trial's recipe in `nproc` processes; its best epoch's metric. Raises
    optuna.TrialPruned when the pruner ended it, Interrupted on a stop, DltrainError when
    the processes failed."""
    import optuna

    from dltrain.experiments.sweep_study import best_value

    path = sweep.root / ".trials" / f"{recipe.name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(to_yaml(recipe), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != TRIAL_VARIABLE}
    if trial_id is not None:  # the pruner is on: rank 0 reports to this trial
        env[TRIAL_VARIABLE] = json.dumps(
            {"storage": sweep.storage, "root": str(sweep.root), "trial_id": trial_id,
             "study": sweep.study.study_name, "metric": sweep.metric,
             "space": sweep.space.model_dump(mode="json"), "epochs": recipe.train.epochs}
        )  # fmt: skip
    command = [sys.executable, "-m", "dltrain", "fit", str(path), "--nproc", str(nproc)]
    code = _run(command + ["--quiet", "--report-on", "val"], env, stop)
    path.unlink(missing_ok=True)
    if code == PRUNED_EXIT:
        raise optuna.TrialPruned()
    if code in (SIGNAL_EXIT_CODES[signal.SIGINT], SIGNAL_EXIT_CODES[signal.SIGTERM]):
        raise Interrupted(stop.signum or signal.SIGTERM, None, "during a trial")
    if code:
        raise DltrainError(f"the trial's {nproc} processes failed (exit code {code})")
    return best_value(read_metrics(RunFolder.for_recipe(recipe).metrics_path), sweep.metric)


def _run(command: list[str], env: dict[str, str], stop: Any) -> int:
    """The trial's launcher in a child process; a stop request here is passed on to it."""
    child = subprocess.Popen(command, env=env)
    forwarded = False
    while child.poll() is None:
        if stop.requested and not forwarded:
            child.send_signal(stop.signum)
            forwarded = True
        time.sleep(0.1)
    return child.returncode


def trial_pruning(world: Any, device: Any) -> Callable[[dict[str, Any]], None] | None:
    """In a trial's processes (TRIAL_VARIABLE set): the epoch callback that reports to the
    trial on rank 0 and stops every rank together when the pruner says so; else None."""
    spec = os.environ.get(TRIAL_VARIABLE)
    if not spec:
        return None
    spec = json.loads(spec)
    trial = _open_trial(spec) if world.is_main else None

    def after_epoch(row: dict[str, Any]) -> None:
        prune = False
        value = row.get(spec["metric"])
        if trial is not None and value is not None and math.isfinite(value):
            trial.report(float(value), int(row["epoch"]))
            prune = trial.should_prune()
        if world.broadcast_object(prune, device):
            raise TrialPrunedStop(f"the pruner ended the trial at epoch {row['epoch']}")

    return after_epoch


def _open_trial(spec: dict[str, Any]) -> Any:
    """The sweep's trial, on its study with the sweep's own pruner (what should_prune asks)."""
    import optuna

    from dltrain.experiments.sweep_space import SearchSpace
    from dltrain.experiments.sweep_study import make_pruner, open_storage

    storage = open_storage(spec["storage"], Path(spec["root"]))
    pruner = make_pruner(SearchSpace.model_validate(spec["space"]), spec["epochs"])
    study = optuna.load_study(study_name=spec["study"], storage=storage, pruner=pruner)
    return optuna.trial.Trial(study, spec["trial_id"])
