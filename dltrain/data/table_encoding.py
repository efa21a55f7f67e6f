"""Feature preprocessing for tables, learned from the training split and kept in the checkpoint.

A table's feature columns arrive from `csv` in a *raw layout* (`RawColumn`s): numeric columns as
floats with NaN for an empty cell; categorical columns as codes into the column's `values` (the
distinct strings of the file the split came from; -1 for a string that file's training part
never had, NaN for an empty cell). `fit_encoding` learns a `TableEncoding` from the rows of the
TRAINING split only (after any validation carve or fold), and `encode` turns every split into
model features, column by column, in the table's column order:

* numeric: the value; an empty cell is imputed with the training median;
* categorical: one-hot over `<unknown>` then the categories (the `max_categories` most frequent
  training values, ties alphabetical); a value never seen in training, or too rare to be kept,
  is `<unknown>`; an empty cell is imputed with the most frequent training value;
* a column that had empty cells in training also gets a 0/1 `<name>_missing` indicator.

Numeric value columns are then standardised with the training mean/std by the batch pipeline
(the `mean`/`std` every checkpoint stores); one-hot and indicator columns stay 0/1.

`encode_cells` applies the same encoding to a table's string cells (what `dltrain predict`
reads), from the checkpoint's `data_meta["table"]` alone.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from dltrain.data.csv_files import Dialect
from dltrain.errors import UserError

UNKNOWN = "<unknown>"
MISSING_SUFFIX = "_missing"
UNSEEN_CODE = -1  # raw layout: a category string absent from the column's values
# Cells that mean "no value", as pandas reads them by default (compared lower-cased)
MISSING_MARKERS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})


def is_missing(cell: str) -> bool:
    """Whether a table cell is empty or a usual "no value" marker (NA, N/A, NaN, null, ...)."""
    return cell.strip().lower() in MISSING_MARKERS


@dataclass
class RawColumn:
    """One feature column as the dataset read it (see the module docstring)."""

    name: str
    kind: Literal["numeric", "categorical"]
    values: list[str] = field(default_factory=list)  # categorical: what the codes index


@dataclass
class ColumnEncoding:
    """How one column becomes features: imputation, one-hot categories, missing indicator."""

    name: str
    kind: Literal["numeric", "categorical"]
    fill: float | str | None  # median / most frequent training value; None: blanks are errors
    indicator: bool = False  # adds a 0/1 '<name>_missing' feature
    categories: list[str] = field(default_factory=list)  # categorical, after <unknown>

    @property
    def width(self) -> int:
        own = 1 + len(self.categories) if self.kind == "categorical" else 1
        return own + int(self.indicator)

    def feature_names(self) -> list[str]:
        if self.kind == "categorical":
            names = [f"{self.name}={value}" for value in (UNKNOWN, *self.categories)]
        else:
            names = [self.name]
        return names + ([self.name + MISSING_SUFFIX] if self.indicator else [])


@dataclass
class TableEncoding:
    """Every feature column's encoding, in the order of the model's input features."""

    columns: list[ColumnEncoding]

    @property
    def width(self) -> int:
        return sum(column.width for column in self.columns)

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    def feature_names(self) -> list[str]:
        return [name for column in self.columns for name in column.feature_names()]

    def scaled_features(self) -> np.ndarray:
        """Which features are numeric values (standardised); one-hot and indicators are not."""
        return np.array(
            [
                column.kind == "numeric" and i == 0
                for column in self.columns
                for i in range(column.width)
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [asdict(column) for column in self.columns]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableEncoding:
        return cls([ColumnEncoding(**column) for column in data["columns"]])

    @classmethod
    def numeric(cls, names: list[str]) -> TableEncoding:
        """Plain numeric columns without imputation (models trained on arrays, not tables)."""
        return cls([ColumnEncoding(name, "numeric", None) for name in names])

    # -- raw layout (training, eval) ----------------------------------------------------------

    def encode(self, raw: np.ndarray, layout: list[RawColumn]) -> np.ndarray:
        """N × raw columns (the dataset's layout) → N × width float32 features."""
        parts = []
        for at, (column, source) in enumerate(zip(self.columns, layout)):
            values = raw[:, at]
            missing = np.isnan(values)
            if column.kind == "numeric":
                parts.append(np.where(missing, column.fill, values)[:, None])
            else:
                parts.append(_one_hot(_category_index(column, source, values), column))
            if column.indicator:
                parts.append(missing[:, None])
        return np.concatenate(parts, axis=1).astype(np.float32)

    # -- string cells (predict) ---------------------------------------------------------------

    def encode_cells(
        self, cells: list[list[str]], where: list[str], dialect: Dialect = Dialect()
    ) -> np.ndarray:
        """Rows of string cells, one per column in `self.columns` order → features.

        `where` names each row in messages (e.g. "input x.csv line 3"); `dialect` says how the
        file writes numbers (a decimal comma). A numeric cell that is not a finite number is a
        UserError; an empty cell (or NA, N/A, NaN, null, None, ?) is imputed when training
        learned a fill value (else a UserError).
        """
        raw = np.empty((len(cells), len(self.columns)), dtype=np.float64)
        layout = []
        for at, column in enumerate(self.columns):
            texts = ["" if is_missing(row[at]) else row[at].strip() for row in cells]
            if column.kind == "categorical":
                index = {value: code for code, value in enumerate(column.categories)}
                raw[:, at] = [np.nan if not t else index.get(t, UNSEEN_CODE) for t in texts]
                layout.append(RawColumn(column.name, "categorical", column.categories))
            else:
                raw[:, at] = [_number(t, column, where[r], dialect) for r, t in enumerate(texts)]
                layout.append(RawColumn(column.name, "numeric"))
        return self.encode(raw, layout)


def cell_notes(encoding: TableEncoding, cells: list[list[str]]) -> str | None:
    """What a prediction's rows hold that training never showed, per column: category values
    it read as <unknown>, and missing cells it imputed (None: nothing of the kind)."""
    unseen: dict[str, Counter] = {}
    missing: Counter = Counter()
    for at, column in enumerate(encoding.columns):
        known = set(column.categories)
        for row in cells:
            if is_missing(row[at]):
                missing[column.name] += 1
            elif column.kind == "categorical" and row[at].strip() not in known:
                unseen.setdefault(column.name, Counter())[row[at].strip()] += 1
    notes = []
    if unseen:
        parts = [
            f"{name}: {sum(seen.values())} ({', '.join(map(repr, list(seen)[:3]))}"
            f"{', …' if len(seen) > 3 else ''})"
            for name, seen in unseen.items()
        ]
        total = sum(sum(seen.values()) for seen in unseen.values())
        notes.append(
            f"{total} values never seen in training, read as {UNKNOWN} ({'; '.join(parts)})"
        )
    if missing:
        parts = [f"{name}: {count}" for name, count in missing.items()]
        notes.append(f"{sum(missing.values())} missing cells, imputed ({', '.join(parts)})")
    return "; ".join(notes) or None


def fit_encoding(
    raw: np.ndarray, layout: list[RawColumn], max_categories: int | None = None
) -> TableEncoding:
    """Learn each column's encoding from the training split's raw rows (N × columns)."""
    columns = []
    for at, source in enumerate(layout):
        values = raw[:, at]
        present = values[~np.isnan(values)]
        indicator = len(present) < len(values)
        if source.kind == "numeric":
            fill = float(np.median(present)) if len(present) else 0.0
            columns.append(ColumnEncoding(source.name, "numeric", fill, indicator))
            continue
        counts = Counter(source.values[int(code)] for code in present if code != UNSEEN_CODE)
        ranked = sorted(counts, key=lambda value: (-counts[value], value))
        kept = ranked[:max_categories] if max_categories else ranked
        fill = ranked[0] if ranked else UNKNOWN
        columns.append(ColumnEncoding(source.name, "categorical", fill, indicator, sorted(kept)))
    return TableEncoding(columns)


def _category_index(column: ColumnEncoding, source: RawColumn, codes: np.ndarray) -> np.ndarray:
    """Raw codes → 0 (<unknown>) or 1 + the category's index; empty cells → the fill's."""
    position = {value: 1 + i for i, value in enumerate(column.categories)}
    # one lookup per distinct value of the source column: vectorised over the rows
    lookup = np.array([position.get(value, 0) for value in source.values] + [0], dtype=np.int64)
    filled = np.where(np.isnan(codes), -2, codes).astype(np.int64)
    index = lookup[np.where(filled < 0, len(source.values), filled)]
    index[filled == -2] = position.get(column.fill, 0)
    return index


def _one_hot(index: np.ndarray, column: ColumnEncoding) -> np.ndarray:
    hot = np.zeros((len(index), 1 + len(column.categories)), dtype=np.float32)
    hot[np.arange(len(index)), index] = 1.0
    return hot


def _number(text: str, column: ColumnEncoding, where: str, dialect: Dialect) -> float:
    """A numeric cell's value; NaN (imputed) for an empty one when the column has a fill."""
    if not text and column.fill is not None:
        return np.nan
    value = dialect.number(text) if text else None
    if value is None or not np.isfinite(value):
        shown = "an empty value" if not text else repr(text)
        raise UserError(
            f"{where}: column '{column.name}' holds {shown}, not a finite number. The model "
            "reads it as a number: fix the value or leave it empty."
            if column.fill is not None
            else f"{where}: column '{column.name}' holds {shown}, not a finite number. "
            "Feature values must be numbers."
        )
    return value
