"""Rich tables for reports, devices and registries (rendering only, no logic)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from dltrain.registry import Registry


def report_table(report: dict[str, Any]) -> Table:
    """Per-class precision/recall/F1/support and the macro/micro/weighted averages."""
    title = f"{report['split']} split · {escape(report['checkpoint'])}"
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


def registry_table(registry: Registry) -> Table:
    """Names, one-line descriptions and accepted arguments (with defaults) of a registry."""
    table = Table(title=registry.kind, title_justify="left", show_lines=False)
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description")
    table.add_column("arguments")
    for name in registry.names():
        arguments = ", ".join(str(a) for a in registry.arguments(name))
        table.add_row(escape(name), escape(registry.summary(name)), escape(arguments))
    return table
