"""report.json (the contract of DESIGN.md §4), report.md (the same, for people) and the plots."""

from __future__ import annotations

import json
import numbers
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dltrain.runs.transaction import Transaction, recover, transaction
from dltrain.system.atomic import atomic_write_text

CONFUSION_MATRIX_PNG = "confusion_matrix.png"
CURVES_PNG = "curves.png"


def write_report(
    folder: Path,
    report: dict[str, Any],
    history: Sequence[dict[str, Any]] | None = None,
    title: str | None = None,
) -> None:
    """Write report.json, the plots and report.md into `folder`, all together (one transaction).

    confusion_matrix.png is always drawn, curves.png when the training `history` (the rows of
    metrics.csv) is given; `title` names the run in the plots (default: the folder's name).
    A plot that cannot be drawn never fails the report: it is skipped with a warning, and a
    stale image of that name from an earlier report is removed rather than shown beside it.
    """
    folder = Path(folder)
    title = title or folder.resolve().name
    recover(folder)  # a report cut short before: finish or drop it first
    with transaction(folder) as tx:
        atomic_write_text(tx.staged(folder / "report.json"), json.dumps(report, indent=2) + "\n")
        drawn = _draw_plots(tx, folder, report, history, title)
        embedded = (("training curves", CURVES_PNG), ("confusion matrix", CONFUSION_MATRIX_PNG))
        images = [(alt, name) for alt, name in embedded if name in drawn]
        atomic_write_text(tx.staged(folder / "report.md"), report_markdown(report, images))


def _draw_plots(
    tx: Transaction,
    folder: Path,
    report: dict[str, Any],
    history: Sequence[dict[str, Any]] | None,
    title: str,
) -> list[str]:
    """Stage the report's plots; returns the names drawn. A plot that fails is skipped with a
    warning, and an older image of that name is removed with the commit."""
    from dltrain.reporting.plots import write_confusion_matrix, write_curves

    plots: list[tuple[str, Callable[[Path], Any]]] = []
    if "confusion_matrix" in report:  # classification
        plots.append((CONFUSION_MATRIX_PNG, lambda p: write_confusion_matrix(p, report, title)))
    if history:
        best = (report["epoch"], report["best_by"]) if "best_by" in report else None
        plots.append((CURVES_PNG, lambda p: write_curves(p, history, title, best)))
    drawn, failures = [], []
    for name, draw in plots:
        try:
            draw(tx.staged(folder / name))
            drawn.append(name)
        except Exception as exc:  # plots are extras: no failure of theirs may break a run
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            tx.remove(folder / name)
    if failures:
        warnings.warn("plots skipped: " + "; ".join(failures), stacklevel=3)
    return drawn


def report_markdown(report: dict[str, Any], images: Sequence[tuple[str, str]] = ()) -> str:
    """The report as Markdown: summary, embedded plots, per-class metrics, confusion matrix.

    `images` are (alt text, file name relative to report.md) pairs, shown under the summary.
    """
    if "confusion_matrix" not in report:
        return _scalar_markdown(report, images)
    figures = f"loss {report['loss']:.4f} · **accuracy {report['accuracy']:.4f}**"
    lines = _summary(report, "", figures, images)
    lines += [
        "| average | precision | recall | f1 |",
        "|---|---:|---:|---:|",
    ]
    for average in ("macro", "micro", "weighted"):
        lines.append(
            f"| {average} | {report['precision'][average]:.4f} | "
            f"{report['recall'][average]:.4f} | {report['f1'][average]:.4f} |"
        )
    lines += [
        "",
        "## Per class",
        "",
        "| class | precision | recall | f1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in report["per_class"].items():
        lines.append(
            f"| {_cell(name)} | {m['precision']:.4f} | {m['recall']:.4f} | "
            f"{m['f1']:.4f} | {m['support']} |"
        )
    classes = [_cell(c) for c in report["classes"]]
    lines += [
        "",
        "## Confusion matrix",
        "",
        "Rows: true class; columns: predicted class.",
        "",
        "| true \\ predicted | " + " | ".join(classes) + " |",
        "|---|" + "---:|" * len(classes),
    ]
    for name, row in zip(classes, report["confusion_matrix"]):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def weights_label(report: dict[str, Any]) -> str:
    """Which weights a report is on: 'epoch 18, the best by val_loss', 'epoch 30', or ''."""
    if "epoch" not in report:
        return ""
    best = f", the best by {report['best_by']}" if "best_by" in report else ""
    return f"epoch {report['epoch']}{best}"


def headline_key(report: dict[str, Any]) -> str:
    """The key of the one figure that sums a report up: accuracy, mse (regression) or
    exact_match (seq2seq)."""
    return next((key for key in ("exact_match", "mse") if key in report), "accuracy")


def headline(report: dict[str, Any]) -> tuple[str, float]:
    """That figure as (label, value), e.g. ('exact match', 0.99)."""
    key = headline_key(report)
    return key.replace("_", " "), report[key]


def _scalar_markdown(report: dict[str, Any], images: Sequence[tuple[str, str]]) -> str:
    name, value = headline(report)
    lines = _summary(report, f" ({report.get('task', '')})", f"**{name} {value:.4f}**", images)
    lines += ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in report_scalars(report).items()]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _in_parentheses(text: str) -> str:
    return f" ({text})" if text else ""


def privacy_line(report: dict[str, Any]) -> str:
    """What a private run (`privacy:`) spent, in one line; '' for any other report."""
    spent = report.get("privacy")
    if not spent:
        return ""
    target = f" (target {spent['target_epsilon']:g})" if spent.get("target_epsilon") else ""
    return (
        f"DP-SGD: ε {spent['epsilon']:.3g} spent{target} at δ {spent['delta']:g} · noise σ "
        f"{spent['noise_multiplier']:.3g} · clip {spent['max_grad_norm']:g} · sample rate "
        f"{spent['sample_rate']:.3g} · {spent['steps']:,} steps · {spent['accountant']} accountant"
    )


# names listed in the line on classes never predicted; the rest are counted
LISTED_CLASSES = 5


def unpredicted_classes_line(report: dict[str, Any]) -> str:
    """The classes present in the split that the model predicted for no row, in one line
    with what to do if they matter; '' when every present class was predicted at least once
    (or the report is not a classification's). A model that never predicts the rare classes
    can score well on accuracy while giving them recall 0 — on anes96 `mlp_plr` never
    predicted the three middle party-id classes, 26 % of the rows (bench/RESULTS.md)."""
    matrix = report.get("confusion_matrix")
    if not matrix:
        return ""
    classes = report["classes"]
    present = [sum(row) for row in matrix]
    predicted = [sum(column) for column in zip(*matrix)]
    never = [i for i in range(len(classes)) if present[i] and not predicted[i]]
    if not never:
        return ""
    names = ", ".join(repr(classes[i]) for i in never[:LISTED_CLASSES])
    more = f" and {len(never) - LISTED_CLASSES} more" if len(never) > LISTED_CLASSES else ""
    rows = sum(present[i] for i in never)
    return (
        f"never predicted on the {report['split']} split: {names}{more} ({rows:,} of "
        f"{report['num_samples']:,} rows, {rows / report['num_samples']:.0%}), so "
        f"{'its' if len(never) == 1 else 'their'} recall and F1 are 0. If every class matters "
        "(macro F1), loss: {name: cross_entropy, class_weights: balanced} weighs the rare ones "
        "up, at some cost in accuracy."
    )


def _summary(
    report: dict[str, Any], task: str, figures: str, images: Sequence[tuple[str, str]]
) -> list[str]:
    """report.md's title, its line of figures (and what privacy the run spent), the plots."""
    lines = [
        f"# Evaluation on the {report['split']} split{task}",
        "",
        f"Checkpoint `{report['checkpoint']}`{_in_parentheses(weights_label(report))} · "
        f"{report['num_samples']:,} samples · {figures}",
        "",
    ]
    for said in (privacy_line(report), unpredicted_classes_line(report)):
        if said:
            lines += [said, ""]
    for alt, file in images:
        lines += [f"![{alt}]({file})", ""]
    return lines


# numeric report.json scalars that are not metrics: a count, and the epoch the weights are from
NOT_METRICS = {"num_samples", "epoch"}  # counts and positions, not figures of the split
# said on their own line (privacy_line), not figures of the split either
NOT_SPLIT_FIGURES = {"privacy"}


def report_scalars(report: dict[str, Any]) -> dict[str, float]:
    """A report's scalar metrics, flat: `accuracy`, `loss`, ... and each number one level down
    (`precision_macro`, `f1_weighted`, `top_k_accuracy_5`, `auroc_macro`, ...). Per-class
    values, the confusion matrix and counts are not metrics of the whole split: left out."""
    scalars = {}
    for key, value in report.items():
        if key in NOT_METRICS or key in NOT_SPLIT_FIGURES:
            continue
        if _is_number(value):
            scalars[key] = float(value)
        elif isinstance(value, dict):
            scalars.update({f"{key}_{sub}": float(v) for sub, v in value.items() if _is_number(v)})
    return scalars


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
