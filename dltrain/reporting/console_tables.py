"""Rich tables for reports, devices and registries (rendering only, no logic)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from dltrain.config.registry import Registry
from dltrain.reporting.report import weights_label


def report_table(report: dict[str, Any]) -> Table:
    """Per-class precision/recall/F1/support and the macro/micro/weighted averages."""
    held = weights_label(report)
    title = f"{report['split']} split · {escape(report['checkpoint'])}" + (
        f" ({held})" if held else ""
    )
    table = Table(title=title, title_justify="left")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, m in report["per_class"].items():
        table.add_row(
            escape(name),
            f"{m['precision']:.4f}",
            f"{m['recall']:.4f}",
            f"{m['f1']:.4f}",
            f"{m['support']:,}",
        )
    table.add_section()
    for average in ("macro", "micro", "weighted"):
        table.add_row(
            f"[bold]{average} avg[/]",
            f"{report['precision'][average]:.4f}",
            f"{report['recall'][average]:.4f}",
            f"{report['f1'][average]:.4f}",
            f"{report['num_samples']:,}",
        )
    return table


def confusion_table(report: dict[str, Any]) -> Table:
    """Rows are true classes, columns predictions; the diagonal is highlighted."""
    table = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
    table.add_column("")
    for name in report["classes"]:
        table.add_column(escape(name), justify="right")
    for i, (name, row) in enumerate(zip(report["classes"], report["confusion_matrix"])):
        cells = [
            f"[bold green]{v}[/]" if i == j else (str(v) if v else "[dim]0[/]")
            for j, v in enumerate(row)
        ]
        table.add_row(escape(name), *cells)
    return table


def devices_table(info: dict[str, Any]) -> Table:
    """One row per device: type, name, memory and the facts that matter for training."""
    table = Table(title=f"devices (torch {info['torch']})", title_justify="left")
    for column in ("device", "name", "memory", "details"):
        table.add_column(column)
    for d in info["devices"]:
        label = d["type"] if d.get("index") is None else f"{d['type']}:{d['index']}"
        if label == info["auto"]:
            label = f"[bold]{label}[/] (auto)"
        table.add_row(label, escape(d.get("name", "")), _memory(d), _details(d))
    return table


def _memory(d: dict[str, Any]) -> str:
    total = d.get("memory_bytes")
    if total is None:
        return ""
    text = f"{total / 2**30:.1f} GiB"
    free = d.get("free_memory_bytes")
    return f"{free / 2**30:.1f} / {text} free" if free is not None else text


def _details(d: dict[str, Any]) -> str:
    if d["type"] == "cpu":
        cores = d.get("usable_cores") or d.get("cores")
        return f"{cores} cores, {d.get('torch_threads')} torch threads"
    if d["type"] == "cuda":
        bf16 = "bf16" if d.get("bf16") else "no bf16"
        return f"compute {d.get('compute_capability')}, {d.get('multiprocessors')} SMs, {bf16}"
    if d["type"] == "xla":
        return f"{d.get('xla_device_type', '')}, {d.get('count', '')} device(s)"
    return ""


def registry_table(registry: Registry, pattern: str = "*") -> Table:
    """Names, one-line descriptions and accepted arguments (with defaults) of a registry's
    components matching `pattern` (a family's members for 'timm:convnext*')."""
    table = Table(title=registry.kind, title_justify="left", show_lines=False)
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description")
    table.add_column("arguments")
    for name in registry.names(pattern):
        arguments = ", ".join(str(a) for a in registry.arguments(name))
        table.add_row(escape(name), escape(registry.summary(name)), escape(arguments))
    return table


def cv_table(cv_report: dict[str, Any]) -> Table:
    """Cross-validation: one row per metric with mean ± std (ddof=1) and each fold's value."""
    split = cv_report.get("split") or "test"
    title = f"{cv_report['folds']}-fold cross-validation ({split} split; best_val_*: validation)"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("mean ± std", justify="right")
    table.add_column("per fold", justify="right")
    for name, m in cv_report["metrics"].items():
        table.add_row(
            escape(name),
            f"{m['mean']:.4f} ± {m['std']:.4f}",
            "  ".join(f"{v:.4f}" for v in m["values"]),
        )
    return table


RUN_HEADERS = {
    "name": "run",
    "model": "model",
    "dataset": "dataset",
    "epochs": "epochs",
    "best_val_loss": "best val_loss",
    "best_val_accuracy": "best val_acc",
    "test_accuracy": "test acc",
    "f1_macro": "macro F1",
    "test_mse": "test MSE",
    "test_r2": "test R²",
    "exact_match": "exact match",
    "epsilon": "ε (DP)",
    "modified": "modified",
}
# shown only when a listed run has them: most listings are of one task, most runs not private
TASK_COLUMNS = {"test_mse", "test_r2", "exact_match", "epsilon"}
REPORT_COLUMNS = {"test_accuracy", "f1_macro", "test_mse", "test_r2", "exact_match"}


def runs_table(rows: list[dict[str, Any]], folder: str) -> Table:
    """`dltrain runs`: one row per run folder (rows from dltrain.runs.listing); '—' when missing."""
    table = Table(title=f"runs in {escape(folder)}", title_justify="left")
    keys = [
        k for k in RUN_HEADERS if k not in TASK_COLUMNS or any(r.get(k) is not None for r in rows)
    ]
    for key in keys:
        left = key in ("name", "model", "dataset", "modified")
        table.add_column(
            RUN_HEADERS[key], justify="left" if left else "right", no_wrap=key == "name"
        )
    for row in rows:
        table.add_row(*(_run_cell(row, key) for key in keys))
    return table


def _run_cell(row: dict[str, Any], key: str) -> str:
    if key in ("name", "model", "dataset"):
        return escape(row[key] or "—")
    if key == "epochs":
        return (
            f"{row['epochs']}/{row['epochs_planned']}"
            if row.get("epochs_planned")
            else str(row["epochs"])
        )
    if key == "modified":
        return row["modified"].replace("T", " ")[:16] if row["modified"] else "—"
    cell = _cell(row[key])
    split = row.get("report_split")
    if key in REPORT_COLUMNS and row[key] is not None and split not in (None, "test"):
        cell += f" ({escape(split)})"  # no test split: the report's split
    return cell


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def predictions_table(prediction: dict[str, Any]) -> Table:
    """One input's top classes: rank, class and probability (the first in bold).

    A sample read from a file of texts is titled with its name and (the start of) its text.
    """
    name = prediction["input"]
    text = prediction.get("text")
    if text is not None and text != name:
        name = f"{name}: {_shortened(text)}"
    # As wide as the title, so that a long file name stays on one line (up to the console's width).
    table = Table(title=escape(name), title_justify="left", min_width=len(name))
    table.add_column("rank", justify="right")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for rank, entry in enumerate(prediction["predictions"], start=1):
        style = "bold" if rank == 1 else ""
        table.add_row(
            str(rank),
            f"[{style}]{escape(entry['class'])}[/]" if style else escape(entry["class"]),
            f"{entry['probability']:.4f}",
        )
    return table


def top_classes_table(results: list[dict[str, Any]]) -> Table:
    """Many inputs of a classifier at a glance: one row each, the top class and its
    probability, then the next ones (compact)."""
    table = Table(title_justify="left")
    table.add_column("input")
    texts = any(r.get("text") is not None and r["text"] != r["input"] for r in results)
    if texts:
        table.add_column("text")
    table.add_column("class")
    table.add_column("probability", justify="right")
    table.add_column("next")
    for result in results:
        first, *rest = result["predictions"]
        cells = [escape(result["input"])]
        if texts:
            cells.append(escape(_shortened(result.get("text") or "")))
        cells += [
            f"[bold]{escape(first['class'])}[/]",
            f"{first['probability']:.4f}",
            " · ".join(f"{escape(e['class'])} {e['probability']:.3f}" for e in rest[:3]),
        ]
        table.add_row(*cells)
    return table


def outputs_table(results: list[dict[str, Any]], key: str, header: str) -> Table:
    """One row per input for regression (`key` 'prediction') and seq2seq ('output'); a text
    column when inputs were read from files of texts."""
    table = Table(title_justify="left")
    table.add_column("input")
    texts = any(r.get("text") is not None and r["text"] != r["input"] for r in results)
    if texts:
        table.add_column("text")
    table.add_column(escape(header), justify="right" if key == "prediction" else "left")
    for result in results:
        value = result[key]
        cells = [escape(result["input"])]
        if texts:
            cells.append(escape(_shortened(result.get("text") or "")))
        if isinstance(value, float):
            cells.append(f"{value:.4f}")
        else:
            cells.append(f"[bold]{escape(value)}[/]" if value else "[dim](empty)[/]")
        table.add_row(*cells)
    return table


def _shortened(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def columns_table(columns: list[dict[str, Any]]) -> Table:
    """A table's feature columns: kind, missing cells in training, and what each became."""
    table = Table(title="columns", title_justify="left")
    for header, justify in (("column", "left"), ("kind", "left"), ("missing", "right")):
        table.add_column(header, justify=justify)
    table.add_column("encoding (or why dropped)", overflow="fold")
    for row in columns:
        missing = "—" if row["missing"] is None else f"{row['missing']:,}"
        style = "dim" if row["kind"] == "dropped" else None
        table.add_row(
            escape(row["column"]), row["kind"], missing, escape(row["encoding"]), style=style
        )
    return table
