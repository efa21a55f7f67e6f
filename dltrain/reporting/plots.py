"""Plots for people: training curves and the confusion matrix, as PNG files.

matplotlib is imported inside the functions, so importing dltrain (and `dltrain --help`) never
pays for it. Figures are built with `matplotlib.figure.Figure` and drawn by the Agg canvas
directly, never through pyplot: no global figure registry, no GUI backend, nothing that leaks
from one call to the next or into a user's notebook. Every PNG is written atomically.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dltrain.system.atomic import atomic_write

DPI = 120
SMALL_MATRIX = 20  # up to this many classes, cells carry their counts
MAX_LABEL_CHARS = 18  # longer class names are shortened with an ellipsis on the axes


def write_curves(
    path: Path,
    history: Sequence[dict[str, Any]],
    title: str,
    best: tuple[int, str] | None = None,
) -> Path:
    """Write training curves (loss, validation accuracy, learning rate per epoch) to a PNG.

    `history` holds the rows of metrics.csv (epoch, train_loss, val_loss, val_accuracy, lr, ...);
    val_loss and val_accuracy may be None (a run without validation). `best` is (epoch,
    monitor) of the weights best.pt holds: that point is starred on the monitor's curve.
    Returns `path`.
    """
    figure_class, canvas_class = figure_classes()
    rows = list(history)
    if not rows:
        raise ValueError("no epochs to plot")
    epochs = [int(r["epoch"]) for r in rows]
    val_accuracy = float_column(rows, "val_accuracy")
    has_accuracy = any(math.isfinite(v) for v in val_accuracy)
    # markers make single epochs (and a 1-epoch run) visible; on long runs they only clutter
    marker = "o" if len(epochs) <= 40 else None

    fig, ax = _curve_panels(figure_class, canvas_class, has_accuracy)
    _plot_losses(ax["loss"], epochs, rows, marker)
    if has_accuracy:
        _plot_accuracy(ax["accuracy"], epochs, val_accuracy, marker)
    if best is not None:
        _star_best(ax, rows, epochs, *best)
    _plot_lr(ax["lr"], epochs, float_column(rows, "lr"))
    _share_epoch_axis(list(ax.values()), epochs)
    count = f"{len(epochs)} epoch" + ("" if len(epochs) == 1 else "s")
    fig.suptitle(f"{title}: training curves ({count})", fontsize=13)
    return save_figure(fig, path)


def _curve_panels(figure_class: type, canvas_class: type, has_accuracy: bool) -> tuple[Any, dict]:
    """The figure and its stacked panels by name: loss, accuracy (when measured), lr."""
    panels = ["loss"] + (["accuracy"] if has_accuracy else []) + ["lr"]
    ratios = {"loss": 3.0, "accuracy": 2.2, "lr": 1.6}
    height = 7.0 if has_accuracy else 5.6
    fig = figure_class(figsize=(8, height), dpi=DPI, layout="constrained")
    canvas_class(fig)
    axes = fig.subplots(
        len(panels), 1, sharex=True, gridspec_kw={"height_ratios": [ratios[p] for p in panels]}
    )
    return fig, dict(zip(panels, axes))


def _plot_losses(a: Any, epochs: list[int], rows: list[dict], marker: str | None) -> None:
    """Train and val loss; a log scale when it falls over orders of magnitude."""
    train_loss = float_column(rows, "train_loss")
    val_loss = float_column(rows, "val_loss")
    has_val_loss = any(math.isfinite(v) for v in val_loss)
    a.plot(epochs, train_loss, marker=marker, ms=4, lw=1.8, color="C0", label="train loss")
    if has_val_loss:
        a.plot(epochs, val_loss, marker=marker, ms=4, lw=1.8, color="C1", label="val loss")
    finite_losses = [v for v in train_loss + val_loss if math.isfinite(v)]
    if spans_orders(finite_losses, 20):
        a.set_yscale("log")
        a.set_ylabel("loss (log scale)")
    else:
        a.set_ylabel("loss")
    a.set_title("loss" + ("" if has_val_loss else " (no validation split)"), fontsize=11)
    a.legend(loc="upper right", frameon=True)


def _plot_accuracy(
    a: Any, epochs: list[int], val_accuracy: list[float], marker: str | None
) -> None:
    """Validation accuracy on a 0..1 axis."""
    a.plot(epochs, val_accuracy, marker=marker, ms=4, lw=1.8, color="C2", label="val accuracy")
    low = min(v for v in val_accuracy if math.isfinite(v))
    # the whole 0..1 range unless every value is high: then zoom in to see the differences
    bottom = 0.0 if low < 0.5 else max(0.0, math.floor(low * 10) / 10 - 0.1)
    a.set_ylim(bottom, 1.01)
    a.set_ylabel("val accuracy")
    a.set_title("validation accuracy", fontsize=11)


def _plot_lr(a: Any, epochs: list[int], lr: list[float]) -> None:
    """The learning rate; a log scale when it varies over more than 10x."""
    from matplotlib.ticker import FuncFormatter

    a.plot(epochs, lr, marker="o", ms=3.5, lw=1.4, color="C4")
    positive = [v for v in lr if math.isfinite(v)]
    if positive and min(positive) > 0 and spans_orders(positive, 10):
        a.set_yscale("log")
        a.set_ylabel("lr (log scale)")
    else:
        a.set_ylabel("lr")
        # plain numbers (0.002), not an offset label ("1e-3") far from the ticks
        a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    a.set_title("learning rate", fontsize=11)
    a.set_xlabel("epoch")


def _share_epoch_axis(axes: list[Any], epochs: list[int]) -> None:
    """Grid and whole-epoch ticks on every panel; a little room beside the first and last."""
    from matplotlib.ticker import MaxNLocator

    for a in axes:
        a.grid(True, alpha=0.35)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    pad = max(0.5, 0.02 * (epochs[-1] - epochs[0]))
    axes[-1].set_xlim(epochs[0] - pad, epochs[-1] + pad)
    if len(epochs) == 1:
        axes[-1].set_xticks(epochs)


def _star_best(ax: dict, rows: list[dict], epochs: list[int], epoch: int, monitor: str) -> None:
    """Star the epoch best.pt holds on its monitor's curve, naming both."""
    panel = "accuracy" if monitor == "val_accuracy" else "loss"
    value = float_column(rows, monitor)[epochs.index(epoch)] if epoch in epochs else math.nan
    if panel not in ax or not math.isfinite(value):
        return
    a = ax[panel]
    a.plot([epoch], [value], marker="*", ms=14, color="C3", ls="none", zorder=3)
    # keep the label inside the panel: anchor it on the side away from the nearer edge
    where = (epoch - epochs[0]) / max(epochs[-1] - epochs[0], 1)
    a.annotate(
        f"best.pt: epoch {epoch} ({monitor} {value:.4f})",
        (epoch, value),
        xytext=(0, 14 if panel == "loss" else -16),
        textcoords="offset points",
        ha="right" if where > 0.7 else "left" if where < 0.3 else "center",
        va="bottom" if panel == "loss" else "top",
        fontsize=9,
        color="C3",
    )


def write_confusion_matrix(path: Path, report: dict[str, Any], title: str) -> Path:
    """Write the report's confusion matrix as a row-normalised heatmap PNG.

    Each cell is the fraction of the true class (row) predicted as the column class, so the
    diagonal is per-class recall; a class with no samples keeps a row of zeros. Counts are
    written in the cells when there are at most 20 classes. Returns `path`.
    """
    figure_class, canvas_class = figure_classes()
    import numpy as np

    classes = [str(c) for c in report["classes"]]
    n = len(classes)
    counts = np.asarray(report["confusion_matrix"], dtype=np.int64).reshape(n, n)
    support = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(
        counts, support, out=np.zeros(counts.shape, dtype=float), where=support > 0
    )

    # the figure grows with the class count (about 0.18 in a cell), up to a cap
    side = min(max(6.0, 0.18 * n + 2.5), 22.0)
    fig = figure_class(figsize=(side + 1.2, side), dpi=DPI, layout="constrained")
    canvas_class(fig)
    ax = fig.subplots()
    _draw_heatmap(fig, ax, fraction)
    step = _name_classes(ax, classes, support, side)
    if n <= SMALL_MATRIX:
        _write_counts(ax, counts, fraction)
    _title_matrix(ax, report, title, int(counts.sum()), side, step)
    return save_figure(fig, path)


def _draw_heatmap(fig: Any, ax: Any, fraction: Any) -> None:
    """The row fractions as colours, with a colour bar that says what they mean."""
    from matplotlib.colors import Normalize, PowerNorm

    # many classes spread the errors thin: a square-root colour scale keeps a 2% confusion visible
    large = len(fraction) > SMALL_MATRIX
    norm = PowerNorm(0.5, vmin=0.0, vmax=1.0) if large else Normalize(0.0, 1.0)
    image = ax.imshow(fraction, cmap="Blues", norm=norm, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, shrink=0.8 if large else 1.0)
    bar.set_label(
        "fraction of the true class (row); diagonal = recall"
        + (" · square-root scale" if large else ""),
        fontsize=11 if large else 10,
    )
    if large:
        bar.set_ticks([0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1])


def _name_classes(ax: Any, classes: list[str], support: Any, side: float) -> int:
    """Class names on both axes; returns the step k when only every k-th one fits."""
    n = len(classes)
    large = n > SMALL_MATRIX
    # every class while they fit at a readable size, otherwise every k-th one
    cell_points = (side * 0.8) * 72 / max(n, 1)
    fontsize = 10 if n <= 10 else 9 if n <= SMALL_MATRIX else max(6.0, min(8.0, cell_points * 0.8))
    step = max(1, math.ceil(fontsize * 1.15 / cell_points))
    ticks = list(range(0, n, step))
    labels = [_shorten(classes[i]) for i in ticks]
    # a class absent from the split says so on its row, or its empty row looks like a bug
    row_labels = [
        label + (" (n=0)" if support[i, 0] == 0 else "") for i, label in zip(ticks, labels)
    ]
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    short = max((len(label) for label in labels), default=0) <= 3
    ax.set_xticklabels(
        labels,
        fontsize=fontsize,
        rotation=0 if short else 90 if large else 45,
        ha="right" if not (short or large) else "center",
        rotation_mode="anchor" if not (short or large) else "default",
    )
    ax.set_yticklabels(row_labels, fontsize=fontsize)
    ax.tick_params(length=2 if large else 3.5)
    return step


def _write_counts(ax: Any, counts: Any, fraction: Any) -> None:
    """White lines between the cells, and the counts inside them (small matrices only)."""
    import numpy as np

    n = len(counts)
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.2)
    ax.tick_params(which="minor", length=0)
    text_size = 11 if n <= 10 else 8
    for i in range(n):
        for j in range(n):
            if counts[i, j] == 0 and i != j:
                continue  # empty off-diagonal cells stay blank: errors stand out
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                fontsize=text_size,
                color="white" if fraction[i, j] > 0.5 else "black",
            )


def _title_matrix(
    ax: Any, report: dict[str, Any], title: str, samples: int, side: float, step: int
) -> None:
    """Axis names and a title with the split, sample count, accuracy and class count."""
    n = len(report["classes"])
    # text grows with the figure, so a 20-inch matrix does not carry a 6-inch figure's title
    big = 12 + round(max(0.0, side - 8.0) * 0.4)
    ax.set_xlabel("predicted", fontsize=big - 1)
    ax.set_ylabel("true", fontsize=big - 1)
    shown = "" if step == 1 else f" · every {step}th class named"
    ax.set_title(
        f"{title}: confusion matrix\n{report.get('split', '?')} split · "
        f"{samples:,} samples · accuracy {float(report['accuracy']):.4f} · "
        f"{n} classes{shown}",
        fontsize=big,
    )


# -- helpers, also used by the other plots (compare, lr_find, sweep reports) -------------------


def figure_classes() -> tuple[type, type]:
    """The Figure class and the Agg canvas, importing matplotlib on first use.

    Named for what it replaces: figures are built from these two, never through
    matplotlib.pyplot itself (see the module docstring).
    """
    import matplotlib

    # headless: select Agg unless pyplot is already in use in this process (a notebook), whose
    # backend we must not switch; our figures never go through pyplot either way
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def save_figure(fig: Any, path: Path) -> Path:
    """Write `fig` to `path` as a PNG at DPI, atomically (no half-written image); returns it."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def float_column(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    """A column as floats, with None (and anything unreadable or infinite) as NaN: a gap in the
    line. A row without `key` counts as None."""
    values = []
    for row in rows:
        try:
            value = float(row.get(key))
        except (TypeError, ValueError):
            value = math.nan
        values.append(value if math.isfinite(value) else math.nan)
    return values


def spans_orders(values: Sequence[float], ratio: float) -> bool:
    """Whether `values` (all > 0, at least two) range over more than `ratio` times their
    smallest: when a log scale shows them better than a linear one."""
    positive = [v for v in values if v > 0]
    return (
        len(positive) > 1 and min(v for v in values) > 0 and max(positive) / min(positive) > ratio
    )


def _shorten(name: str) -> str:
    """Shorten a long class name in the middle: both ends usually tell classes apart."""
    if len(name) <= MAX_LABEL_CHARS:
        return name
    head = (MAX_LABEL_CHARS - 1) // 2
    return name[:head] + "…" + name[-(MAX_LABEL_CHARS - 1 - head) :]
