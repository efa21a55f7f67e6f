"""`dltrain explain` for tables: which columns drove each row's prediction, through Captum's
integrated gradients (Sundararajan et al. 2017).

The baseline is the training data's average row: each numeric column at its training mean,
categories and missing-indicators at 0 (no category). A column's attribution is the sum over
the features it became (a one-hot block and its missing indicator summed back to the column),
in the table's own column names; by completeness the attributions of a row add up to its score
minus the baseline's (Captum's convergence delta says how closely). The score is the predicted
class's logit, or the predicted value for regression. Over many rows the global importance of
a column is its mean |attribution|.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from dltrain.data.table_encoding import TableEncoding
from dltrain.use.explain import explained_outputs
from dltrain.use.inference import Predictor
from dltrain.use.predict import Samples

IG_STEPS = 64
BASELINE = "the training average (numeric columns at their mean, no category)"


@dataclass
class TableExplanation:
    """Per row: its prediction and each column's attribution; over all rows: importance."""

    columns: list[str]
    rows: list[dict[str, Any]]  # name, predicted, (probability), attributions {column: value}
    importance: dict[str, float]  # mean |attribution| per column, largest first
    delta: float  # the largest completeness error over the rows (Captum's delta)
    baseline: str = BASELINE

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "integrated_gradients",
            "baseline": self.baseline,
            "importance": self.importance,
            "rows": self.rows,
            "max_convergence_delta": self.delta,
        }


def explain_rows(predictor: Predictor, samples: Samples) -> TableExplanation:
    """Integrated gradients of every row's prediction, summed back to the table's columns."""
    from captum.attr import IntegratedGradients

    x = samples.x.float().to(predictor.device)
    targets, predictions = explained_outputs(predictor, samples.x)
    baseline = torch.tensor(predictor.meta["mean"], dtype=x.dtype, device=x.device)
    forward = lambda v: predictor.model(predictor.pipeline.eval(v))  # noqa: E731
    with torch.enable_grad():
        attributions, delta = IntegratedGradients(forward).attribute(
            x, baselines=baseline.expand_as(x), target=targets, n_steps=IG_STEPS,
            return_convergence_delta=True,
        )  # fmt: skip
    names, spans = column_spans(predictor)
    per_column = torch.stack([attributions[:, span].sum(dim=1) for span in spans], dim=1)
    rows = [
        {**prediction, "attributions": dict(zip(names, map(float, values), strict=True))}
        for prediction, values in zip(predictions, per_column.detach().cpu(), strict=True)
    ]
    mean_abs = per_column.abs().mean(dim=0).detach().cpu().tolist()
    importance = dict(sorted(zip(names, mean_abs, strict=True), key=lambda kv: -kv[1]))
    return TableExplanation(names, rows, importance, float(delta.abs().max()))


def column_spans(predictor: Predictor) -> tuple[list[str], list[slice]]:
    """The table's columns and the features each became (one-hot block, indicator); a model
    trained on numeric arrays: one feature per column (data.features, else f0, f1, ...)."""
    if "table" in predictor.meta:
        spans, start = [], 0
        encoding = TableEncoding.from_dict(predictor.meta["table"])
        for column in encoding.columns:
            spans.append(slice(start, start + column.width))
            start += column.width
        return encoding.names, spans
    width = predictor.input_shape[0]
    names = (predictor.recipe.get("data") or {}).get("features") or [f"f{i}" for i in range(width)]
    return list(names), [slice(i, i + 1) for i in range(width)]


def render_png(explanation: TableExplanation, source: str, show: int = 20) -> bytes:
    """A bar chart: one row's signed attributions, or the importance over many rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    one = len(explanation.rows) == 1
    values = explanation.rows[0]["attributions"] if one else explanation.importance
    ranked = sorted(values.items(), key=lambda kv: -abs(kv[1]))[:show][::-1]
    figure = Figure(figsize=(7.5, 1.2 + 0.32 * len(ranked)), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    colours = ["#2a9d8f" if v >= 0 else "#e76f51" for _, v in ranked]
    ax.barh([name for name, _ in ranked], [v for _, v in ranked], color=colours)
    ax.axvline(0, color="black", linewidth=0.8)
    if one:
        row = explanation.rows[0]
        ax.set_xlabel("attribution to the score (+ for, − against)")
        ax.set_title(
            f"{source}: predicted {row['predicted']!r} · baseline: {explanation.baseline}",
            fontsize=9,
        )
    else:
        ax.set_xlabel("mean |attribution| over the rows")
        ax.set_title(f"{source}: column importance over {len(explanation.rows)} rows", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def ranked_columns(values: dict[str, float], limit: int | None = None) -> list[tuple[str, float]]:
    """Columns by |value|, largest first."""
    return sorted(values.items(), key=lambda kv: -abs(kv[1]))[:limit]
