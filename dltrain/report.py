"""report.json (the contract of DESIGN.md §4) and report.md (the same, for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dltrain.atomic import atomic_write_text


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """Write report.json and report.md into `folder`, each atomically."""
    folder = Path(folder)
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(folder / "report.md", report_markdown(report))


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables: summary, per-class metrics, confusion matrix."""
    lines = [
        f"# Evaluation on the {report['split']} split",
        "",
        f"Checkpoint `{report['checkpoint']}` · {report['num_samples']:,} samples · "
        f"loss {report['loss']:.4f} · **accuracy {report['accuracy']:.4f}**",
        "",
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


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")
