"""report.json (the contract of DESIGN.md §4), report.md (the same, for people) and the plots."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dltrain.atomic import atomic_write_text

CONFUSION_MATRIX_PNG = "confusion_matrix.png"
CURVES_PNG = "curves.png"


def write_report(
    folder: Path,
    report: dict[str, Any],
    history: Sequence[dict[str, Any]] | None = None,
    title: str | None = None,
) -> None:
    """Write report.json, the plots and report.md into `folder`, each atomically.

    confusion_matrix.png is always drawn, curves.png when the training `history` (the rows of
    metrics.csv) is given; `title` names the run in the plots (default: the folder's name).
    A plot that cannot be drawn never fails the report: it is skipped with a warning, and a
    stale image of that name from an earlier report is removed rather than shown beside it.
    """
    folder = Path(folder)
    title = title or folder.resolve().name
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2) + "\n")

    failures: list[str] = []

    def plot(name: str, draw: Callable[[Path], Any]) -> None:
        try:
            draw(folder / name)
        except Exception as exc:  # plots are extras: no failure of theirs may break a run
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            with contextlib.suppress(OSError):
                (folder / name).unlink(missing_ok=True)

    def confusion_matrix(path: Path) -> None:
        from dltrain.plots import write_confusion_matrix

        write_confusion_matrix(path, report, title)

    def curves(path: Path) -> None:
        from dltrain.plots import write_curves

        write_curves(path, history, title)

    if "confusion_matrix" in report:  # classification
        plot(CONFUSION_MATRIX_PNG, confusion_matrix)
    if history:
        plot(CURVES_PNG, curves)
    if failures:
        warnings.warn("plots skipped: " + "; ".join(failures), stacklevel=2)

    embedded = (("training curves", CURVES_PNG), ("confusion matrix", CONFUSION_MATRIX_PNG))
    images = [(alt, name) for alt, name in embedded if (folder / name).is_file()]
    atomic_write_text(folder / "report.md", report_markdown(report, images))


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


def headline_key(report: dict[str, Any]) -> str:
    """The key of the one figure that sums a report up: accuracy, mse (regression) or
    exact_match (seq2seq)."""
    return next((key for key in ("exact_match", "mse") if key in report), "accuracy")


def headline(report: dict[str, Any]) -> tuple[str, float]:
    """That figure as (label, value), e.g. ('exact match', 0.99)."""
    key = headline_key(report)
    return key.replace("_", " "), report[key]


def scalar_metrics(report: dict[str, Any]) -> dict[str, float]:
    """A regression or seq2seq report's figures (everything numeric but the sample count)."""
    return {
        k: v
        for k, v in report.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "num_samples"
    }


def _scalar_markdown(report: dict[str, Any], images: Sequence[tuple[str, str]]) -> str:
    name, value = headline(report)
    lines = _summary(report, f" ({report.get('task', '')})", f"**{name} {value:.4f}**", images)
    lines += ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in scalar_metrics(report).items()]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _summary(
    report: dict[str, Any], task: str, figures: str, images: Sequence[tuple[str, str]]
) -> list[str]:
    """report.md's title, its line of figures, then the plots."""
    lines = [
        f"# Evaluation on the {report['split']} split{task}",
        "",
        f"Checkpoint `{report['checkpoint']}` · {report['num_samples']:,} samples · {figures}",
        "",
    ]
    for alt, file in images:
        lines += [f"![{alt}]({file})", ""]
    return lines
