"""A sweep's report: sweep_report.json (best trial, every trial) and sweep_report.md with
three plots: the optimisation history, the parameters' importances (Optuna's fANOVA) and a
slice per parameter (the metric against its values)."""

from __future__ import annotations

import json
import math
import re
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
    url = str(getattr(storage, "url", "") or getattr(getattr(storage, "_backend", None), "url", ""))
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
        importances = _importances(sweep)
        if importances:
            images.append(_importance_plot(importances, root / IMPORTANCE_PNG))
            summary["importances"] = importances
            atomic_write_text(root / REPORT_JSON, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(root / REPORT_MD, _markdown(summary, [p.name for p in images]))
    return summary


def _importances(sweep: Sweep) -> dict[str, float] | None:
    """fANOVA importances (needs two completed trials and a varied parameter)."""
    import optuna

    try:
        return {
            k: float(v) for k, v in optuna.importance.get_param_importances(sweep.study).items()
        }
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None


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
    from matplotlib.ticker import NullFormatter

    fig = figure_class(figsize=(3.2 * len(keys), 3.2))
    canvas_class(fig)
    values = [t["value"] for t in trials]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        param = sweep.space.params[key]
        xs = [t["params"].get(key) for t in trials]
        if isinstance(param, FloatParam | IntParam):
            ax.scatter(xs, values, c=[t["number"] for t in trials], cmap="viridis")
            if param.log:  # major ticks labelled only: minor labels overlap in a decade
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], values)
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set(xlabel=key, ylabel=sweep.metric if i == 0 else None)
        ax.grid(alpha=0.3)
    fig.suptitle("each parameter against the metric (colour: trial number)")
    fig.tight_layout()
    return save_figure(fig, path)


def _importance_plot(importances: dict[str, float], path: Path) -> Path:
    figure_class, canvas_class = figure_classes()
    fig = figure_class(figsize=(6, 0.6 * len(importances) + 1.5))
    canvas_class(fig)
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (fANOVA)", title="parameter importances")
    fig.tight_layout()
    return save_figure(fig, path)


def _markdown(summary: dict[str, Any], images: list[str]) -> str:
    lines = [f"# Sweep `{summary['study']}`", ""]
    best = summary["best_trial"]
    ended = [t for t in summary["trials"] if t["state"] != "running"]
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
