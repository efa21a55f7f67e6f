"""What `dltrain explain` shows and writes for each kind of input: the image's maps as a PNG;
a table's attributions in the terminal (or JSON) and as a bar chart PNG; a text's tokens
coloured in the terminal (or JSON) and as an HTML page. Each file is written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dltrain.errors import UserError
from dltrain.runs.lock import holding_enclosing_run
from dltrain.system.atomic import atomic_write
from dltrain.use import explain_images, explain_tables, explain_text
from dltrain.use.inference import Predictor
from dltrain.use.predict import Samples

ROWS_SHOWN = 10  # a table's rows shown one by one in the terminal; more: the importance only


def show_explanation(
    predictor: Predictor, samples: Samples, method: str, output: Path, as_json: bool,
    console: Console,
) -> None:  # fmt: skip
    """Explain `samples` as their kind asks, print it, write `output`."""
    if predictor.kind == "image":
        _show_image(predictor, samples, method, output, as_json, console)
        return
    if method not in ("all", "integrated_gradients"):
        raise UserError(
            f"--method {method} is for images; tables and texts are explained with "
            "integrated gradients (--method integrated_gradients, or leave it out)."
        )
    if predictor.kind == "tabular":
        _show_table(predictor, samples, output, as_json, console)
    else:
        _show_text(predictor, samples, output, as_json, console)


def _show_image(predictor, samples, method, output, as_json, console) -> None:
    methods = explain_images.METHODS if method == "all" else (method,)
    result = explain_images.explain_image(predictor, samples.x, methods)
    png = explain_images.render_png(result, Path(samples.names[0]).name)
    _write(output, png, "writing an attribution map")
    if as_json:
        said = {"predicted": result.predicted, "probability": result.probability}
        shown = {"methods": list(result.maps), "notes": result.notes, "output": str(output)}
        print(json.dumps({**said, **shown, "max_convergence_delta": result.delta}))
        return
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    odds = "" if result.probability is None else f" ({result.probability:.3f})"
    console.print(
        f"predicted [bold]{escape(result.predicted)}[/]{odds} · "
        f"{', '.join(result.maps)} written to {escape(str(output))}",
        highlight=False,
        soft_wrap=True,
    )


def _show_table(predictor, samples, output, as_json, console) -> None:
    result = explain_tables.explain_rows(predictor, samples)
    for row, name in zip(result.rows, samples.names, strict=True):
        row["input"] = name
    png = explain_tables.render_png(result, Path(samples.names[0].split("[")[0]).name)
    _write(output, png, "writing an attribution chart")
    if as_json:
        print(json.dumps({**result.to_dict(), "output": str(output)}))
        return
    rows = result.rows if len(result.rows) <= ROWS_SHOWN else []
    for row in rows:
        console.print(_row_table(row, result.baseline))
    if len(result.rows) > 1:
        console.print(_importance_table(result))
    console.print(
        f"integrated gradients, baseline: {escape(result.baseline)} · completeness within "
        f"{result.delta:.2g} · chart written to {escape(str(output))}",
        highlight=False,
        soft_wrap=True,
    )


def _row_table(row: dict, baseline: str) -> Table:
    odds = f" ({row['probability']:.3f})" if "probability" in row else ""
    predicted = row["predicted"]
    said = f"{predicted:.4g}" if isinstance(predicted, float) else escape(str(predicted))
    title = f"{escape(row['input'])}: predicted {said}{odds}"
    table = Table(title=title, title_justify="left", min_width=min(len(title), 100))
    table.add_column("column")
    table.add_column("attribution", justify="right")
    for name, value in explain_tables.ranked_columns(row["attributions"]):
        colour = "green" if value >= 0 else "red"
        table.add_row(escape(name), f"[{colour}]{value:+.4f}[/]")
    return table


def _importance_table(result) -> Table:
    title = f"column importance over {len(result.rows)} rows (mean |attribution|)"
    table = Table(title=title, title_justify="left", min_width=len(title))
    table.add_column("column")
    table.add_column("importance", justify="right")
    for name, value in result.importance.items():
        table.add_row(escape(name), f"{value:.4f}")
    return table


def _show_text(predictor, samples, output, as_json, console) -> None:
    result = explain_text.explain_texts(predictor, samples)
    _write(output, explain_text.html_page(result).encode(), "writing token attributions")
    if as_json:
        print(json.dumps({**result.to_dict(), "output": str(output)}))
        return
    for text in result.texts:
        odds = f" ({text['probability']:.3f})" if "probability" in text else ""
        predicted = text["predicted"]
        said = f"{predicted:.4g}" if isinstance(predicted, float) else escape(str(predicted))
        console.print(f"predicted [bold]{said}[/]{odds}: " + explain_text.terminal_markup(text))
    console.print(
        f"integrated gradients over the token embedding, baseline: {escape(result.baseline)} "
        f"(green: for the prediction, red: against) · written to {escape(str(output))}",
        highlight=False,
        soft_wrap=True,
    )


def _write(output: Path, data: bytes, what: str) -> None:
    """Write a file atomically (refused inside a run folder another process is writing)."""
    with holding_enclosing_run(output, what):
        atomic_write(Path(output), lambda f: f.write(data))
