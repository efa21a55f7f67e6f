"""A sweep's report: sweep_report.json (best trial, every trial) and sweep_report.md with
three plots: the optimisation history, the parameters' importances (Optuna's PED-ANOVA) and a
slice per parameter (the metric against its values)."""

from __future__ import annotations

import json
import math
import re
import textwrap
import warnings
from pathlib import Path
from typing import Any

from dltrain.experiments.sweep_space import FloatParam, IntParam, direction_of
from dltrain.experiments.sweep_study import TRIALS_FOLDER, Sweep, trial_name
from dltrain.reporting.plots import figure_classes, save_figure
from dltrain.system.atomic import atomic_write_text

REPORT_JSON, REPORT_MD = "sweep_report.json", "sweep_report.md"
HISTORY_PNG, IMPORTANCE_PNG, SLICES_PNG = "history.png", "importances.png", "slices.png"


def sweep_summary(sweep: Sweep, best_test: dict[str, Any] | None) -> dict[str, Any]:
    """What sweep_report.json holds."""
    trials = [
        {
            "number": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "params": sweep.values(t.params),
            "run": f"{TRIALS_FOLDER}/{trial_name(t.number)}",
            **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {}),
            **({"interrupted": True} if t.user_attrs.get("interrupted") else {}),
        }
        for t in sweep.study.get_trials(deepcopy=False)
    ]
    best = _best_trial(sweep)
    return {
        "study": sweep.study.study_name,
        "storage": _without_password(sweep.study._storage),
        "metric": sweep.metric,
        "direction": direction_of(sweep.metric),
        "trials_requested": sweep.trials,
        "folds": sweep.space.folds,
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_params": sweep.values(best.params) if best else None,
        "best_run": f"{TRIALS_FOLDER}/{trial_name(best.number)}" if best else None,
        "best_test": best_test,
        "trials": trials,
    }


def _best_trial(sweep: Sweep) -> Any:
    try:
        return sweep.study.best_trial
    except ValueError:  # no trial completed
        return None


def _without_password(storage: Any) -> str:
    """The storage as --storage names it: a database URL without its password, or
    journal:PATH for Optuna's journal file."""
    backend = getattr(storage, "_backend", None)
    journal = getattr(backend, "_file_path", None)
    if journal is not None:
        return f"journal:{journal}"
    url = str(getattr(storage, "url", "") or getattr(backend, "url", ""))
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def write_sweep_report(sweep: Sweep, best_test: dict[str, Any] | None) -> dict[str, Any]:
    """Write sweep_report.json/.md and the plots into the sweep folder; returns the summary."""
    summary = sweep_summary(sweep, best_test)
    root = sweep.root
    atomic_write_text(root / REPORT_JSON, json.dumps(summary, indent=2) + "\n")
    completed = [t for t in summary["trials"] if t["state"] == "complete"]
    images = []
    if completed:
        images.append(_history(completed, sweep.metric, summary["direction"], root / HISTORY_PNG))
        images.append(_slices(completed, sweep, root / SLICES_PNG))
        importances = _importances(sweep) if len(completed) >= 2 else None  # one: no spread
        if importances:
            note = _importances_note(len(completed))
            images.append(_importance_plot(importances, note, root / IMPORTANCE_PNG))
            summary["importances"] = importances
            summary["importances_note"] = note
            atomic_write_text(root / REPORT_JSON, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(root / REPORT_MD, _markdown(summary, [p.name for p in images]))
    return summary


def _importances(sweep: Sweep) -> dict[str, float] | None:
    """PED-ANOVA importances (Optuna's own default, named so that the label stays true on
    every Optuna version); None when they cannot tell the parameters apart (all equal, as
    with too few trials) — a plot of equal bars would look like a finding."""
    import optuna

    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its advice on too few trials: the note says it
        try:
            found = optuna.importance.get_param_importances(sweep.study, evaluator=evaluator)
        except (ValueError, RuntimeError, ZeroDivisionError):
            return None
    values = {k: float(v) for k, v in found.items()}
    if len(values) > 1 and max(values.values()) - min(values.values()) < 1e-9:
        return None
    return values


# Importances compare the best trials with the rest: below this many completed trials they say
# more about which trials happened to be drawn than about the parameters
MIN_TRIALS_FOR_IMPORTANCES = 10


def _importances_note(completed: int) -> str:
    if completed < MIN_TRIALS_FOR_IMPORTANCES:
        return (
            f"from {completed} completed trials only: a rough guide (importances need "
            f"{MIN_TRIALS_FOR_IMPORTANCES} or more to be trusted)"
        )
    return f"from {completed} completed trials"


def _history(trials: list[dict], metric: str, direction: str, path: Path) -> Path:
    figure_class, canvas_class = figure_classes()
    from matplotlib.ticker import MaxNLocator

    fig = figure_class(figsize=(7, 4))
    canvas_class(fig)
    ax = fig.add_subplot()
    numbers = [t["number"] for t in trials]
    values = [t["value"] for t in trials]
    pick = max if direction == "maximize" else min
    best_so_far = [pick(values[: i + 1]) for i in range(len(values))]
    ax.scatter(numbers, values, label="trial", zorder=3)
    ax.step(numbers, best_so_far, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title="optimisation history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def _slices(trials: list[dict], sweep: Sweep, path: Path) -> Path:
    """One panel per parameter: the metric against the parameter's values."""
    keys = list(sweep.space.params)
    figure_class, canvas_class = figure_classes()
    from matplotlib.ticker import MaxNLocator, NullFormatter

    fig = figure_class(figsize=(3.2 * len(keys) + 1.0, 3.4), layout="constrained")
    canvas_class(fig)
    values = [t["value"] for t in trials]
    numbers = [t["number"] for t in trials]
    colours = {"c": numbers, "cmap": "viridis", "vmin": min(numbers), "vmax": max(numbers)}
    axes = [fig.add_subplot(1, len(keys), i + 1) for i in range(len(keys))]
    for i, (key, ax) in enumerate(zip(keys, axes)):
        param = sweep.space.params[key]
        xs = [t["params"].get(key) for t in trials]
        if isinstance(param, FloatParam | IntParam):
            points = ax.scatter(xs, values, **colours)
            if param.log:  # major ticks labelled only: minor labels overlap in a decade
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            labels = sorted({str(x) for x in xs})
            points = ax.scatter([labels.index(str(x)) for x in xs], values, **colours)
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set(xlabel=key, ylabel=sweep.metric if i == 0 else None)
        ax.grid(alpha=0.3)
    bar = fig.colorbar(points, ax=axes, label="trial number")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle("each parameter against the metric")
    return save_figure(fig, path)


def _importance_plot(importances: dict[str, float], note: str, path: Path) -> Path:
    figure_class, canvas_class = figure_classes()
    fig = figure_class(figsize=(7, 0.6 * len(importances) + 2.0))
    canvas_class(fig)
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (PED-ANOVA)", title="parameter importances")
    fig.text(0.5, 0.01, textwrap.fill(note, 80), ha="center", va="bottom", fontsize="small")
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the note below
    return save_figure(fig, path)


def _markdown(summary: dict[str, Any], images: list[str]) -> str:
    lines = [f"# Sweep `{summary['study']}`", ""]
    best = summary["best_trial"]
    ended = [t for t in summary["trials"] if t["state"] in ("complete", "pruned", "fail")]
    interrupted = sum(1 for t in ended if t.get("interrupted"))  # stopped: they do not count
    lines.append(
        f"{len(ended) - interrupted} trials ended of {summary['trials_requested']} requested"
        + (f" ({interrupted} more interrupted, not counted)" if interrupted else "")
        + " · metric "
        f"`{summary['metric']}` ({summary['direction']}d)"
        + (f" · the mean over {summary['folds']} folds" if summary["folds"] else "")
    )
    lines.append("")
    if best is not None:
        lines.append(f"**Best: trial {best}**, {summary['metric']} {summary['best_value']:.4f}, ")
        lines.append(f"run folder `{summary['best_run']}`: " + _params_text(summary["best_params"]))
        test = summary.get("best_test")
        if test:
            lines += ["", f"Its test figures (the only look at the test split): {_figures(test)}"]
        lines.append("")
    lines += ["| trial | state | value | params |", "|---:|---|---:|---|"]
    for t in sorted(ended, key=lambda t: _sort_key(t, summary["direction"])):
        value = "—" if t["value"] is None else f"{t['value']:.4f}"
        lines.append(f"| {t['number']} | {t['state']} | {value} | {_params_text(t['params'])} |")
    if "importances" in summary:
        lines += ["", f"Parameter importances (PED-ANOVA), {summary['importances_note']}."]
    lines += [""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def _sort_key(trial: dict, direction: str) -> tuple:
    value = trial["value"]
    if value is None:
        return (1, 0.0)
    return (0, -value if direction == "maximize" else value)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(
        f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`" for k, v in params.items()
    )


def _figures(test: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4f}"
        for k, v in test.items()
        if k != "trial"  # which trial, not a figure of it
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    )
