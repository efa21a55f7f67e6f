"""Which feature columns of a table reach the model, and as what.

Each column's kind is read from the training file: numeric when most of its values are
numbers, else categorical — unless it is dropped, with the reason said: *empty* (no value in
any row), *constant* (one value in every row), *id-like* (a different value in every row:
a text, or integers that number the rows), *text-like* (free text: more than half its values
different, 50 or more of them; texts belong in `text_csv`). `data.columns: {name:
numeric|categorical|drop}` overrides any of it. `column_summary` is the table the run's header
and `dltrain check --data` show: kind, missing count in training, and the encoding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dltrain.data.table_encoding import UNKNOWN, RawColumn, TableEncoding, is_missing

ColumnKind = Literal["numeric", "categorical", "drop"]
MIN_ROWS_FOR_ID = 20  # below this, a value per row is as likely chance as an id
MIN_TEXT_VALUES = 50  # a categorical column this varied (and mostly unique) is free text


_TEXT_LIKE = (
    "text-like: {distinct:,} different values in {rows:,} rows (texts train with text_csv; "
    "data.columns: {{name: categorical}} keeps it)"
)


@dataclass
class Dropped:
    name: str
    why: str


def choose_columns(
    cells: dict[str, list[str]],
    number: Callable[[str], float | None],
    chosen: dict[str, ColumnKind],
) -> tuple[list[RawColumn], list[Dropped]]:
    """The raw layout of the kept columns and the dropped ones, in the file's order. `cells`:
    each feature column's training cells; `number` reads a cell as the file writes numbers;
    `chosen`: the recipe's kinds (data.columns), which win over what is read off the cells."""
    layout, dropped = [], []
    for name, column in cells.items():
        kind, why = chosen.get(name), ""
        if kind is None:
            kind, why = _read_kind(column, number)
        elif kind == "drop":
            why = "data.columns"
        if kind == "drop":
            dropped.append(Dropped(name, why))
        elif kind == "categorical":
            present = {cell.strip() for cell in column if not is_missing(cell)}
            layout.append(RawColumn(name, "categorical", sorted(present)))
        else:
            layout.append(RawColumn(name, "numeric"))
    return layout, dropped


def _read_kind(column: list[str], number: Callable[[str], float | None]) -> tuple[str, str]:
    """A column's kind, and why when it is dropped."""
    present = [cell.strip() for cell in column if not is_missing(cell)]
    if not present:
        return "drop", "empty: no value in any row"
    distinct = set(present)
    if len(distinct) == 1 and len(present) == len(column):
        return "drop", f"constant: {present[0]!r} in every row"
    values = [number(cell) for cell in present]
    numeric = 2 * sum(v is not None for v in values) >= len(present)
    if len(distinct) == len(column) >= MIN_ROWS_FOR_ID:
        if not numeric and 2 * sum(" " in cell for cell in present) > len(present):
            return "drop", _TEXT_LIKE.format(distinct=len(distinct), rows=len(present))
        if not numeric:
            return "drop", "id-like: a different text in every row"
        if _numbers_rows(values):
            return "drop", "id-like: a different integer in every row, numbering the rows"
    if not numeric and len(distinct) >= MIN_TEXT_VALUES and 2 * len(distinct) > len(present):
        return "drop", _TEXT_LIKE.format(distinct=len(distinct), rows=len(present))
    return ("numeric" if numeric else "categorical"), ""


def _numbers_rows(values: list[float | None]) -> bool:
    """Integers that count the rows: a run of consecutive integers in any order, or rising
    with the file's order (ids with gaps)."""
    if any(v is None or not v.is_integer() for v in values):
        return False
    ordered = sorted(values)
    return ordered[-1] - ordered[0] + 1 == len(values) or ordered == values


def column_summary(
    layout: list[RawColumn],
    dropped: list[Dropped],
    encoding: TableEncoding,
    train: np.ndarray,
    order: list[str],
) -> list[dict[str, Any]]:
    """One row per feature column, in `order` (the file's): kind, missing cells in the
    training split, and how it reaches the model (or why it does not)."""
    rows = {}
    for at, (source, column) in enumerate(zip(layout, encoding.columns)):
        missing = int(np.isnan(train[:, at]).sum())
        if column.kind == "numeric":
            kind, encoded = "numeric", "standardised"
            fill = f"median {column.fill:.4g}"
        else:
            kind = f"categorical ({len(source.values):,} levels)"
            encoded = f"one-hot: {len(column.categories):,} + {UNKNOWN}"
            fill = f"most frequent {column.fill!r}"
        if column.indicator:
            encoded += f"; missing → {fill}, + indicator"
        rows[source.name] = _row(source.name, kind, missing, encoded)
    for column in dropped:
        rows[column.name] = _row(column.name, "dropped", None, column.why)
    return [rows[name] for name in order if name in rows]


def _row(name: str, kind: str, missing: int | None, encoding: str) -> dict[str, Any]:
    return {"column": name, "kind": kind, "missing": missing, "encoding": encoding}
