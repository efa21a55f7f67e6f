"""Which loss fits which task: the loss each task trains with by default (`loss: auto`), and
the check that a recipe's loss fits its task — made from the recipe alone, before any data is
read, whenever the task is known there (data.task, or a dataset of one task), and again at
build time once a table's task is detected."""

from __future__ import annotations

from typing import Any

from dltrain.config.registry import DATASETS, LOSSES

# What `loss: auto` (the default) becomes once the task is known
TASK_LOSSES = {"classification": "cross_entropy", "regression": "mse", "seq2seq": "cross_entropy"}


def loss_misfit(loss: str, task: str, source: str = "") -> str | None:
    """Why `loss` cannot train a `task` task, or None when it can (or it is not known).
    `source`: where the task comes from, said after it (" (data.task)")."""
    allowed = LOSSES.tasks(loss)
    if allowed is None or task in allowed:
        return None
    return (
        f"'{loss}' does not fit a {task} task{source} (it works for {' and '.join(allowed)}); use "
        f"loss: auto (here {TASK_LOSSES[task]}) or loss: {{name: {TASK_LOSSES[task]}}}."
    )


def known_task(data_task: str, dataset: str) -> str | None:
    """The task a recipe fixes before its data is read: data.task, or its dataset's only one."""
    if data_task != "auto":
        return data_task
    tasks = DATASETS.tasks(dataset) if dataset in DATASETS else None
    return tasks[0] if tasks and len(tasks) == 1 else None


def loss_label(section: dict[str, Any], task: str) -> str:
    """The loss as a run's header says it: 'mse', or 'auto → mse'."""
    name = section["name"]
    return f"auto → {TASK_LOSSES[task]}" if name == "auto" else name


def planned_loss(section: dict[str, Any], data_task: str, dataset: str) -> str:
    """What `dltrain check` says of the loss before any data is read."""
    if section["name"] != "auto":
        return f"loss: {section['name']}"
    task = known_task(data_task, dataset)
    if task:
        return f"loss: auto → {TASK_LOSSES[task]} (a {task} task)"
    by_loss: dict[str, list[str]] = {}
    for each, loss in TASK_LOSSES.items():
        by_loss.setdefault(loss, []).append(each)
    chosen = " or ".join(f"{loss} ({', '.join(tasks)})" for loss, tasks in by_loss.items())
    return f"loss: auto → {chosen}, once the data tells the task"
