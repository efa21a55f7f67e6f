"""`dltrain compare RUN_DIR...`: runs side by side, their curves on shared axes in one PNG and
a table of what differs between their recipes, with each run's headline test figure.

The logic only: the command (in commands/) calls `load_runs`, then `compare_table` or
`compare_json`, and `plot_compare`. No torch here, and matplotlib is imported inside
`plot_compare` (through plots.py), so `dltrain --help` never pays for either.

Unlike `dltrain runs`, which tolerates damaged files in a listing, compare is asked about
these runs by name: a path that is not a run folder, or a metrics.csv / recipe.yaml /
report.json that cannot be read, is the user's error (exit 2) naming the file.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape
from rich.table import Table

from dltrain.errors import UserError
from dltrain.reporting.report import headline, headline_key
from dltrain.runs.metrics_csv import METRIC_COLUMNS, best_val_metrics

DEFAULT_OUTPUT = Path("compare.png")
# Recipe keys that differ between any two runs and say nothing about them
IGNORED_KEYS = frozenset({"name", "output"})
MISSING = "—"
SHOWN_CHILD_RUNS = 4  # a folder of runs names this many of them in its message


@dataclass
class ComparedRun:
    """One run folder, read whole: what `compare` shows of it."""

    name: str  # the folder's name, with parent folders when two runs share it
    path: Path  # as given
    recipe: dict[str, Any]  # the resolved recipe, flattened to dotted keys
    rows: list[dict[str, float | None]]  # metrics.csv, one dict per epoch
    report: dict[str, Any] | None  # report.json, None before the final evaluation

    @property
    def epochs(self) -> int:
        """Epochs finished (rows of metrics.csv)."""
        return len(self.rows)

    @property
    def planned_epochs(self) -> int | None:
        value = self.recipe.get("train.epochs")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def best_val_loss(self) -> float | None:
        return best_val_metrics(self.rows)["best_val_loss"]

    @property
    def best_val_accuracy(self) -> float | None:
        return best_val_metrics(self.rows)["best_val_accuracy"]

    @property
    def headline(self) -> tuple[str, float] | None:
        """The report's one figure as (label, value), e.g. ('accuracy', 0.97); None without a
        report (or one without that figure)."""
        if self.report is None:
            return None
        value = self.report.get(headline_key(self.report))
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        label, value = headline(self.report)
        return label, float(value)

    @property
    def report_split(self) -> str:
        """The split report.json evaluates: test, or val/train when the dataset has no test."""
        split = (self.report or {}).get("split")
        return str(split) if split else "test"

    @property
    def f1_macro(self) -> float | None:
        f1 = (self.report or {}).get("f1")
        value = f1.get("macro") if isinstance(f1, dict) else None
        return _finite(value)


# -- reading the runs -------------------------------------------------------------------------


def load_runs(paths: list[Path]) -> list[ComparedRun]:
    """Read each run folder (recipe.yaml, metrics.csv and report.json when there is one).

    Refused (UserError, exit 2): a path that does not exist or is not a run folder, the same
    folder given twice, fewer than two runs, and files that cannot be read (named, with the
    line for metrics.csv).
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        _check_run_folder(path)
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            same = "twice" if str(seen[key]) == str(path) else f"twice (as {seen[key]} and {path})"
            raise UserError(f"{path}: the same run folder is given {same}. Name each run once.")
        seen[key] = path
    if len(paths) < 2:
        given = f"only {paths[0]} was given" if paths else "none was given"
        raise UserError(
            f"compare needs at least 2 run folders; {given}. Pass two or more, e.g. "
            "dltrain compare runs/a runs/b (dltrain runs lists them)."
        )
    names = unique_names([p.resolve() for p in paths])
    return [
        ComparedRun(
            name=name,
            path=path,
            recipe=flatten(_read_recipe(path / "recipe.yaml")),
            rows=read_metrics_strict(path / "metrics.csv"),
            report=_read_report(path / "report.json"),
        )
        for name, path in zip(names, paths)
    ]


def _check_run_folder(path: Path) -> None:
    if not path.exists():
        raise UserError(
            f"{path} does not exist. Pass run folders (runs/NAME); dltrain runs lists them."
        )
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a run folder. Pass run folders (runs/NAME).")
    has_recipe = (path / "recipe.yaml").is_file()
    has_metrics = (path / "metrics.csv").is_file()
    if has_recipe and has_metrics:
        return
    if has_recipe:
        raise UserError(
            f"{path} is not a run folder yet: it has no metrics.csv (no epoch has finished). "
            "Compare it once its first epoch is saved."
        )
    children = _child_runs(path)
    if children:
        shown = " ".join(str(c) for c in children[:SHOWN_CHILD_RUNS])
        more = (
            f" (and {len(children) - SHOWN_CHILD_RUNS} more)"
            if len(children) > SHOWN_CHILD_RUNS
            else ""
        )
        raise UserError(
            f"{path} is not a run folder but holds {len(children)} runs: pass them, e.g. "
            f"dltrain compare {shown}{more}."
        )
    raise UserError(
        f"{path} is not a run folder: it has no recipe.yaml and metrics.csv. Pass run folders "
        "(runs/NAME); dltrain runs lists them."
    )


def _child_runs(folder: Path) -> list[Path]:
    """Run folders right below `folder` (a runs/ folder, a cross-validation's fold-k runs)."""
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []
    return [c for c in children if (c / "recipe.yaml").is_file() and (c / "metrics.csv").is_file()]


def unique_names(paths: list[Path]) -> list[str]:
    """Each folder's name; folders that share one are named with as many parent folders as
    tell them apart ('a/quickstart', 'b/quickstart'). `paths` are distinct, resolved."""
    depth = [1] * len(paths)

    def name(i: int) -> str:
        parts = paths[i].parts
        return "/".join(parts[-depth[i] :]) if len(parts) > 1 else str(paths[i])

    while True:
        counts = Counter(name(i) for i in range(len(paths)))
        clashing = [i for i in range(len(paths)) if counts[name(i)] > 1]
        if not clashing:
            return [name(i) for i in range(len(paths))]
        grown = False
        for i in clashing:
            if depth[i] < len(paths[i].parts) - 1:
                depth[i] += 1
                grown = True
        if not grown:  # cannot happen for distinct paths; the full paths then
            return [str(p) for p in paths]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optimizer': {'lr': 0.1}} → {'optimizer.lr': 0.1}. Lists stay values; an empty
    section stays a key (with {})."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _read_recipe(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; it is not a dltrain recipe.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path} is not valid YAML{where}; it is not a dltrain recipe.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a recipe (a mapping of keys); it is damaged.")
    return data


def read_metrics_strict(path: Path) -> list[dict[str, float | None]]:
    """metrics.csv as rows of floats, an empty cell None. A file that cannot be read, a line
    with the wrong number of cells or a cell that is not a number is a UserError naming the
    file and line. Columns beyond dltrain's own are kept when they hold numbers (None when
    not)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise UserError(f"{path} is empty: it has no header line (epoch,train_loss,…).")
            if "epoch" not in header:
                raise UserError(
                    f"{path}: line 1 has no 'epoch' column ({','.join(header)[:80]}); it is not "
                    "a dltrain metrics.csv."
                )
            rows = []
            for cells in reader:
                line = reader.line_num
                if not cells:
                    continue  # a blank line
                if len(cells) != len(header):
                    raise UserError(
                        f"{path}: line {line} has {len(cells)} cells where the header has "
                        f"{len(header)}; the file is damaged."
                    )
                rows.append(_metric_row(path, line, header, cells))
            return rows
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; it is not a dltrain metrics.csv.") from None
    except csv.Error as exc:
        raise UserError(f"{path}: {exc}; the file is damaged.") from None


def _metric_row(path: Path, line: int, header: list[str], cells: list[str]) -> dict:
    row: dict[str, float | None] = {}
    for column, text in zip(header, cells):
        if not column:
            continue
        text = text.strip()
        try:
            value = float(text) if text else None
        except ValueError:
            if column in METRIC_COLUMNS:
                raise UserError(
                    f"{path}: line {line}: {column} is {text[:40]!r}, not a number; the file "
                    "is damaged."
                ) from None
            value = None  # a column dltrain does not know: not ours to judge
        row[column] = value
    if row.get("epoch") is None:
        raise UserError(f"{path}: line {line} has no epoch number; the file is damaged.")
    return row


def _read_report(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}.") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise UserError(
            f"{path} is not valid JSON{where}. Write it again with dltrain eval "
            f"{path.parent / 'checkpoints' / 'best.pt'}, or delete it."
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a report (a JSON object); it is damaged.")
    return data


# -- what differs -----------------------------------------------------------------------------


def differing_keys(runs: list[ComparedRun]) -> list[str]:
    """The dotted recipe keys whose values are not the same in every run (a key one run has
    and another lacks differs), sorted; `name` and `output` left out."""
    keys = set().union(*(run.recipe for run in runs)) - IGNORED_KEYS
    absent = object()
    differ = []
    for key in keys:
        values = [run.recipe.get(key, absent) for run in runs]
        if any(v is absent for v in values) or not all(_same(values[0], v) for v in values[1:]):
            differ.append(key)
    return sorted(differ)


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind: True is not 1, but 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


# -- the table and --json ---------------------------------------------------------------------


def headline_labels(runs: list[ComparedRun]) -> set[str]:
    """The distinct '<split> <figure>' labels of the runs' reports, e.g. {'test accuracy'}."""
    return {f"{run.report_split} {run.headline[0]}" for run in runs if run.headline is not None}


def compare_table(runs: list[ComparedRun], key_columns: bool = True) -> Table:
    """One row per run: name, the differing recipe keys, epochs done, best val_loss, best
    val_accuracy (when a run has one), the headline figure of report.json ('—' without one)
    and macro F1 (when a run is a classification).

    Runs of different datasets or models differ in dozens of keys, too many columns for a
    terminal: `key_columns=False` leaves them out, for `keys_table` to show them instead.
    """
    keys = differing_keys(runs)
    labels = headline_labels(runs)
    shared_label = next(iter(labels)) if len(labels) == 1 else None
    has_accuracy = any(run.best_val_accuracy is not None for run in runs)
    has_f1 = any(run.f1_macro is not None for run in runs)

    title = f"{len(runs)} runs · " + (
        f"{len(keys)} recipe keys differ" if keys else "the same recipe (but name and output)"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("run", no_wrap=True)
    shown_keys = keys if key_columns else []
    for key in shown_keys:
        table.add_column(escape(key))
    table.add_column("epochs", justify="right")
    table.add_column("best val_loss", justify="right")
    if has_accuracy:
        table.add_column("best val_acc", justify="right")
    table.add_column(escape(shared_label or "final evaluation"), justify="right")
    if has_f1:
        splits = {run.report_split for run in runs if run.f1_macro is not None}
        split = next(iter(splits)) if len(splits) == 1 else ""
        table.add_column(escape(f"{split} macro F1".strip()), justify="right")

    for run in runs:
        cells = [escape(run.name)]
        cells += [escape(_value_text(run.recipe, key)) for key in shown_keys]
        cells.append(_epochs_text(run))
        cells.append(_number(run.best_val_loss))
        if has_accuracy:
            cells.append(_number(run.best_val_accuracy))
        if run.headline is None:
            cells.append(MISSING)
        else:
            label, value = run.headline
            shown = _number(value)
            cells.append(shown if shared_label else f"{escape(run.report_split)} {label} {shown}")
        if has_f1:
            cells.append(_number(run.f1_macro))
        table.add_row(*cells)
    return table


def keys_table(runs: list[ComparedRun]) -> Table:
    """The differing recipe keys the other way round: one row per key, one column per run
    ('—' where a run's recipe lacks the key). For many keys, beside
    `compare_table(runs, key_columns=False)`."""
    keys = differing_keys(runs)
    table = Table(title=f"recipe keys that differ ({len(keys)})", title_justify="left")
    table.add_column("key", no_wrap=True)
    for run in runs:
        table.add_column(escape(run.name))
    for key in keys:
        table.add_row(escape(key), *(escape(_value_text(run.recipe, key)) for run in runs))
    return table


def compare_json(runs: list[ComparedRun]) -> dict[str, Any]:
    """The comparison as data (for --json). A run's `params` hold the differing keys its
    recipe has (a key it lacks is left out); `headline` is None without a report."""
    keys = differing_keys(runs)
    out = []
    for run in runs:
        figure = run.headline
        out.append(
            {
                "name": run.name,
                "path": str(run.path),
                "params": {k: run.recipe[k] for k in keys if k in run.recipe},
                "epochs": run.epochs,
                "best_val_loss": run.best_val_loss,
                "best_val_accuracy": run.best_val_accuracy,
                "headline": None
                if figure is None
                else {"label": figure[0], "value": _finite(figure[1]), "split": run.report_split},
                "f1_macro": run.f1_macro,
            }
        )
    return {"differing_keys": keys, "runs": out}


def _value_text(recipe: dict[str, Any], key: str) -> str:
    """A recipe value as YAML writes it: 0.002, true, null, [32, 64]; '—' when absent."""
    if key not in recipe:
        return MISSING
    value = recipe[key]
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _epochs_text(run: ComparedRun) -> str:
    """'12', or '7/30' for a run that stopped (or is still going) before its planned epochs."""
    planned = run.planned_epochs
    if planned is not None and run.epochs < planned:
        return f"{run.epochs}/{planned}"
    return str(run.epochs)


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.4g}"
    return f"{value:.4f}"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# -- the plot ---------------------------------------------------------------------------------


PANELS = {
    "train_loss": "train loss",
    "val_loss": "validation loss",
    "val_accuracy": "validation accuracy",
}


def plot_compare(runs: list[ComparedRun], path: Path) -> Path:
    """Write the runs' curves to one PNG: train_loss, val_loss (when a run has it) and
    val_accuracy (when a run has it) per epoch, one panel each with the same epoch axis, one
    colour per run and a legend by run name. The two loss panels share their y axis. Written
    atomically; returns `path`."""
    # plots.py (and through it matplotlib) is imported here, never when dltrain starts
    from dltrain.reporting.plots import figure_classes, save_figure

    path = Path(path)
    _check_plot_request(runs, path)
    figure_class, canvas_class = figure_classes()
    panels = [c for c in PANELS if c == "train_loss" or _any_run_has(runs, c)]
    fig, ax = _compare_figure(figure_class, canvas_class, runs, panels)
    epochs_seen = _plot_runs(ax, runs)
    _style_panels(ax, runs)
    axes = list(ax.values())
    axes[-1].set_xlabel("epoch")
    first, last = min(epochs_seen), max(epochs_seen)
    pad = max(0.5, 0.02 * (last - first))
    axes[-1].set_xlim(first - pad, last + pad)

    fig.legend(
        *axes[0].get_legend_handles_labels(),
        loc="outside right upper",
        title="run",
        fontsize=9 if len(runs) <= 12 else 7,
        frameon=True,
    )
    fig.suptitle(f"{len(runs)} runs compared", fontsize=13)
    return save_figure(fig, path)


def _check_plot_request(runs: list[ComparedRun], path: Path) -> None:
    """A UserError, before matplotlib is loaded, for an output that is not a .png file or runs
    with no epoch to plot."""
    if path.is_dir():
        raise UserError(
            f"--output {path} is a folder; name a .png file (e.g. {path / 'compare.png'})."
        )
    if path.suffix.lower() != ".png":
        raise UserError(f"--output {path}: the plot is a PNG; name a file ending in .png.")
    if not any(run.rows for run in runs):
        raise UserError("none of these runs has finished an epoch: there are no curves to plot.")


def _any_run_has(runs: list[ComparedRun], column: str) -> bool:
    """Whether any run has a number in this metrics.csv column (else its panel is left out)."""
    from dltrain.reporting.plots import float_column

    return any(math.isfinite(v) for run in runs for v in float_column(run.rows, column))


def _compare_figure(
    figure_class: type, canvas_class: type, runs: list[ComparedRun], panels: list[str]
) -> tuple[Any, dict[str, Any]]:
    """The figure, wide enough for the legend of run names, and its panels by column."""
    from dltrain.reporting.plots import DPI

    longest = max(len(run.name) for run in runs)
    legend_width = min(0.085 * longest + 0.8, 4.5)  # inches, for names up to ~45 characters
    fig = figure_class(
        figsize=(8 + legend_width, 2.9 * len(panels) + 0.9), dpi=DPI, layout="constrained"
    )
    canvas_class(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    ax = dict(zip(panels, axes))
    if "val_loss" in ax:
        ax["val_loss"].sharey(ax["train_loss"])
    return fig, ax


def _plot_runs(ax: dict[str, Any], runs: list[ComparedRun]) -> list[float]:
    """Each run's curve in every panel, in its own colour; returns the epochs plotted."""
    from dltrain.reporting.plots import float_column

    colours = _colours(len(runs))
    longest_run = max(len(run.rows) for run in runs)
    marker = "o" if longest_run <= 40 else None
    epochs_seen: list[float] = []
    for run, colour in zip(runs, colours):
        epochs = [r["epoch"] for r in run.rows]
        epochs_seen += [e for e in epochs if e is not None]
        label = run.name if run.rows else f"{run.name} (no epochs)"
        for column, a in ax.items():
            a.plot(
                epochs,
                float_column(run.rows, column),
                marker=marker,
                ms=3.5,
                lw=1.7,
                color=colour,
                label=label if column == "train_loss" else None,
            )
    return epochs_seen


def _style_panels(ax: dict[str, Any], runs: list[ComparedRun]) -> None:
    """Titles, grids and y axes: accuracy zoomed when every value is high, losses on a log
    scale when they fall over orders of magnitude."""
    from matplotlib.ticker import MaxNLocator

    from dltrain.reporting.plots import float_column, spans_orders

    losses = [
        v for run in runs for c in ("train_loss", "val_loss") for v in float_column(run.rows, c)
    ]
    finite = [v for v in losses if math.isfinite(v)]
    log_losses = spans_orders(finite, 20)
    for column, a in ax.items():
        a.set_title(PANELS[column], fontsize=11)
        a.grid(True, alpha=0.35)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if column == "val_accuracy":
            low = min(v for run in runs for v in float_column(run.rows, column) if math.isfinite(v))
            bottom = 0.0 if low < 0.5 else max(0.0, math.floor(low * 10) / 10 - 0.1)
            a.set_ylim(bottom, 1.01)
            a.set_ylabel("accuracy")
        else:
            if log_losses:
                a.set_yscale("log")
            a.set_ylabel("loss (log scale)" if log_losses else "loss")
    if "val_loss" not in ax:
        ax["train_loss"].set_title("train loss (no run has a validation split)", fontsize=11)


def _colours(count: int) -> list[Any]:
    """Distinct colours: tab10 up to 10 runs, tab20 up to 20, then evenly along turbo."""
    from matplotlib import colormaps

    if count <= 10:
        return [f"C{i}" for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](i / (count - 1)) for i in range(count)]
