"""`csv`: tables (classification or regression) from CSV files, and the CSV table and label
handling it shares.

`read_table`, `CsvTable`, `class_names` and `encode_labels` also serve `text_csv`
(dltrain.data.text), which reads and labels its CSV files the same way.
"""

from __future__ import annotations

import csv as csvlib
import functools
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from dltrain.config.dataset_defaults import RecipeDefault
from dltrain.config.registry import DATASETS
from dltrain.data.base import ArraySplit, DatasetSplits
from dltrain.data.csv_files import Dialect, reader, sniff
from dltrain.data.paths import InputPath, existing_path
from dltrain.data.splits import random_split, stratified_split
from dltrain.data.table_columns import ColumnKind, Dropped, choose_columns
from dltrain.data.table_encoding import UNSEEN_CODE, RawColumn, is_missing
from dltrain.data.tensors import to_tensor
from dltrain.errors import UserError, did_you_mean


@dataclass
class CsvTable:
    """A CSV file's header and non-blank rows, with each row's line number for messages."""

    file: Path
    key: str
    header: list[str]
    rows: list[list[str]]
    lines: list[int]
    dialect: Dialect = Dialect()

    def column(self, name: str, key: str) -> int:
        """The index of a column, or a UserError listing the columns and the nearest one."""
        if name not in self.header:
            raise UserError(
                f"{key}: column '{name}' not found in '{self.file}' (read as "
                f"{self.dialect.describe()}; data.delimiter sets another). Columns: "
                f"{', '.join(self.header)}.{did_you_mean(name, self.header)}"
            )
        return self.header.index(name)

    def number(self, cell: str) -> float | None:
        """A cell's finite value as this file writes numbers, or None."""
        value = self.dialect.number(cell)
        return value if value is not None and np.isfinite(value) else None


def check_file_choice(path: str | None, train: str | None, test: str | None) -> None:
    """One file to carve a test split from, or a training file (with an optional test file);
    a validation file (data.val) goes with either."""
    if (path is None) == (train is None) or (test is not None and train is None):
        raise UserError(
            "data.path: set either data.path (one CSV file; a test split is carved from it) or "
            "data.train (with an optional data.test), not both and not neither. A validation "
            "file, data.val, goes with either."
        )


# What a short table recipe gets (bench/RESULTS.md, "Tables against gradient boosting": over
# dltrain's general defaults — batch 64, 10 epochs — these were as good or better on all eight
# tables measured, and 2-3x faster to train on the larger ones; `auto` makes about 16 steps an
# epoch, 32 to 1,024 rows a step, training/build.py). One group:
# measured together, and a recipe that sets its own epochs keeps the general batch size its
# epochs were meant for.
TABLE_DEFAULTS = (
    RecipeDefault(
        {"data.batch_size": "auto", "train.epochs": 50, "train.early_stopping": {"patience": 4}},
        unless=("data.global_batch_size",),
    ),
)


@DATASETS.register(recipe_defaults=TABLE_DEFAULTS)
def csv(
    path: InputPath | None = None,
    train: InputPath | None = None,
    test: InputPath | None = None,
    val: InputPath | None = None,
    label: str = "label",
    features: list[str] | None = None,
    categorical: list[str] | None = None,
    columns: dict[str, ColumnKind] | None = None,
    max_categories: Annotated[int, Field(ge=1)] = 100,
    test_split: Annotated[float, Field(gt=0, lt=1)] = 0.2,
    seed: int = 0,
    task: str = "auto",
    delimiter: Literal["auto", ",", ";", "tab", "|"] = "auto",
    decimal: Literal["auto", ".", ","] = "auto",
) -> DatasetSplits:
    """A table of features and one label column, from CSV files with a header row.

    Give `path` (one file; a test split of `test_split` is carved with the run's seed,
    stratified by class for classification) or `train` with an optional `test` file; `val`
    adds a validation file to either (data.val_split is then not used). `label` names the
    target column, `features` the input columns (default: every other column).

    data.task auto reads the label column (see `_task_of`): text labels are classes, numbers
    with a fraction or many distinct integers a regression target.

    Feature columns are numeric, or categorical when they hold text; empty, constant, id-like
    and text-like ones are dropped (dltrain.data.table_columns); `columns: {name: numeric|
    categorical|drop}` (or `categorical: [..]`) overrides that. Empty cells (NA, NaN, null,
    ?) are missing; rows without a label are left out. The preprocessing is learned from the
    training split (dltrain.data.table_encoding). Each file's `delimiter` and `decimal` mark
    are read off its first lines unless given.
    """
    check_file_choice(path, train, test)
    read = functools.partial(_labelled_table, label=label, delimiter=delimiter, decimal=decimal)
    main = read(path or train, "data.path" if path else "data.train")
    names = _feature_names(main, label, features)
    layout, dropped = _layout(main, names, _chosen_kinds(names, categorical, columns))
    chosen, classes, targets = label_targets(main, label, task)

    def labelled(table: CsvTable) -> tuple[np.ndarray, np.ndarray]:
        """A file's raw features (columns matched by name) and its encoded targets."""
        return _raw_features(table, layout), targets(table, _label_values(table, label))

    x, y = labelled(main)
    if path is not None:
        carve = stratified_split if chosen == "classification" else random_split
        kept, carved = carve(y, test_split, seed)
        train_part, test_part = (x[kept], y[kept]), (x[carved], y[carved])
    else:
        train_part = (x, y)
        test_part = labelled(read(test, "data.test")) if test else None
    val_part = labelled(read(val, "data.val")) if val else None
    meta = {"table_layout": _layout_meta(layout, dropped, names, max_categories)}
    return _tabular(classes, chosen, meta, train_part, test_part, val_part)


def _labelled_table(file: str, key: str, label: str, delimiter: str, decimal: str) -> CsvTable:
    """A table file's rows that have a label (see _labelled_rows)."""
    return _labelled_rows(read_table(file, key, delimiter=delimiter, decimal=decimal), label)


def _layout_meta(
    layout: list[RawColumn], dropped: list[Dropped], names: list[str], max_categories: int
) -> dict[str, Any]:
    """What prepare_data needs to encode the table and to show its columns."""
    return {
        "columns": [asdict(c) for c in layout],
        "dropped": [asdict(d) for d in dropped],
        "features": names,
        "max_categories": max_categories,
    }


def _chosen_kinds(
    names: list[str], categorical: list[str] | None, columns: dict[str, ColumnKind] | None
) -> dict[str, ColumnKind]:
    """The kinds the recipe gives columns (data.categorical, data.columns), each a feature."""
    _check_named(names, "data.categorical", categorical or [])
    _check_named(names, "data.columns", list(columns or {}))
    return {**dict.fromkeys(categorical or (), "categorical"), **(columns or {})}


def label_targets(
    table: CsvTable, label: str, task: str
) -> tuple[str, list[str], Callable[[CsvTable, list[str]], np.ndarray]]:
    """The task (data.task, or read off the label column), the classes and the encoding of
    labels into targets; a single class is refused (there is nothing to learn)."""
    raw_labels = _label_values(table, label)
    chosen = _task_of(table, label, raw_labels, task)
    classes, targets = _label_encoding(chosen, label, raw_labels)
    if chosen == "classification" and len(classes) < 2:
        raise UserError(
            f"data.label: every labelled row of '{table.file}' has the class "
            f"'{classes[0]}': there is nothing to tell apart. Add rows of other classes, or "
            "check data.label names the column you mean."
        )
    return chosen, classes, targets


def _label_encoding(
    task: str, label: str, raw_labels: list[str]
) -> tuple[list[str], Callable[[CsvTable, list[str]], np.ndarray]]:
    """The classes, and how a file's raw labels become targets: class indices over the main
    file's classes, or for regression the numbers themselves (one output, named `label`)."""
    if task == "classification":
        classes, numeric = class_names(raw_labels)
        return classes, functools.partial(encode_labels, classes=classes, numeric=numeric)
    return [label], _regression_targets


def _tabular(
    classes: list[str],
    task: str,
    meta: dict[str, Any],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> DatasetSplits:
    """DatasetSplits of raw features (the table_encoding layout); an empty carved test split
    becomes None (an empty validation file stays, to be named as empty)."""

    def split(part: tuple[np.ndarray, np.ndarray]) -> ArraySplit:
        # float64: raw values keep their digits until the encoding makes them float32 features
        return ArraySplit(to_tensor(part[0]), to_tensor(part[1]))

    return DatasetSplits(
        kind="tabular",
        classes=classes,
        train=split(train),
        test=split(test) if test and len(test[1]) else None,
        val=split(val) if val else None,
        task=task,
        meta=meta,
    )


# What to do about a row of the wrong width, for plain tables and for texts
FIX_THE_ROW = "Fix that row."
QUOTE_THE_TEXTS = 'Quote texts that contain commas or line breaks ("like, this"), or fix that row.'


def read_table(
    path: str,
    key: str,
    row_hint: str = FIX_THE_ROW,
    columns_example: str = "",
    delimiter: str = "auto",
    decimal: str = "auto",
) -> CsvTable:
    """Parse a UTF-8 CSV file with a header; rows must have as many values as the header.

    The delimiter and decimal mark are sniffed unless given (data/csv_files.py). Quoted cells
    may span lines (texts): a row's line is the one it starts on. Undecodable bytes are
    reported with their line. `row_hint` says how to fix a row of the wrong width;
    `columns_example` (e.g. " (e.g. text,label)") completes the message for a file without
    a header or rows.
    """
    file = existing_path(path, key)
    content = _utf8(file, key)
    dialect = sniff(content, delimiter, decimal)
    rows: list[list[str]] = []
    lines: list[int] = []
    parsed = reader(content, dialect)
    try:
        header = [name.strip() for name in next(parsed, [])]
        while True:
            start = parsed.line_num + 1  # a quoted text may span lines: report the first
            row = next(parsed, None)
            if row is None:
                break
            if not any(cell.strip() for cell in row):
                continue  # blank lines, often at the end of a file
            if len(row) != len(header):
                raise UserError(
                    f"{key}: '{file}' line {start} has {len(row)} values but the header has "
                    f"{len(header)} columns (read as {dialect.describe()}; data.delimiter "
                    f"sets another). {row_hint}"
                )
            rows.append(row)
            lines.append(start)
    except csvlib.Error as exc:
        raise UserError(
            f"{key}: cannot parse '{file}' as CSV near line {parsed.line_num} ({exc}). Re-save "
            "it as comma-separated values with a header row, texts quoted where needed."
        ) from None
    if not header or not rows:
        raise UserError(
            f"{key}: '{file}' has no {'header' if not header else 'data rows'}. Expected a "
            f"header row naming the columns{columns_example}, then one row per sample."
        )
    return CsvTable(file, key, header, rows, lines, dialect)


def _utf8(file: Path, key: str) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{key}: '{file}' line {line} is not valid UTF-8 (byte {data[exc.start]:#04x} at "
            f"offset {exc.start}). Re-save the file as UTF-8."
        ) from None


def _feature_names(table: CsvTable, label: str, features: list[str] | None) -> list[str]:
    """The feature columns: the given ones (each must exist) or all except the label."""
    table.column(label, "data.label")
    if features is None:
        names = [name for name in table.header if name != label]
    else:
        names = list(features)
        for name in names:
            table.column(name, "data.features")
        if label in names:
            raise UserError(f"data.features: lists the label column '{label}'. Remove it.")
    if not names:
        raise UserError(
            f"data.features: '{table.file}' has no feature columns besides "
            f"'{label}'. Add feature columns."
        )
    return names


def _check_named(names: list[str], key: str, named: list[str]) -> None:
    """Each column a recipe key names (data.categorical, data.columns) is a feature column."""
    for name in named:
        if name not in names:
            raise UserError(
                f"{key}: '{name}' is not a feature column (features: "
                f"{', '.join(names)}).{did_you_mean(name, names)}"
            )


def _layout(
    table: CsvTable, names: list[str], chosen: dict[str, ColumnKind]
) -> tuple[list[RawColumn], list[Dropped]]:
    """The kept feature columns' raw layout and the dropped ones (dltrain.data.table_columns),
    read from the training file; at least one column must be left."""
    cells = {
        name: [row[table.column(name, "data.features")] for row in table.rows] for name in names
    }
    layout, dropped = choose_columns(cells, table.number, chosen)
    if not layout:
        reasons = "; ".join(f"{d.name}: {d.why}" for d in dropped)
        raise UserError(
            f"data.features: no feature column of '{table.file}' is left ({reasons}). Keep one "
            "with data.columns: {name: numeric} (or categorical)."
        )
    return layout, dropped


def _raw_features(table: CsvTable, layout: list[RawColumn]) -> np.ndarray:
    """N × columns float64 in the raw layout of dltrain.data.table_encoding: numbers, or
    category codes (-1: a value the training file lacks); NaN for a missing cell."""
    raw = np.empty((len(table.rows), len(layout)), dtype=np.float64)
    for c, column in enumerate(layout):
        at = table.column(column.name, "data.features")
        codes = {value: code for code, value in enumerate(column.values)}
        for r, row in enumerate(table.rows):
            cell = row[at].strip()
            if is_missing(cell):
                raw[r, c] = np.nan
            elif column.kind == "categorical":
                raw[r, c] = codes.get(cell, UNSEEN_CODE)
            elif (value := table.number(cell)) is not None:
                raw[r, c] = value
            else:
                raise UserError(
                    f"{table.key}: '{table.file}' line {table.lines[r]}, column '{column.name}': "
                    f"{cell!r} is not a finite number, and the column is numeric. Fix the "
                    "value, leave the cell empty (a missing value), or make the column "
                    f"categorical (data.columns: {{{column.name}: categorical}})."
                )
    return raw


def _labelled_rows(table: CsvTable, label: str) -> CsvTable:
    """The rows that have a label: a blank, NA, NaN, null, None or ? label is no class (and
    no target) — those rows are left out of training and evaluation, and their count said."""
    at = table.column(label, "data.label")
    keep = [i for i, row in enumerate(table.rows) if not is_missing(row[at])]
    if len(keep) == len(table.rows):
        return table
    kept = set(keep)
    left_out = [line for i, line in enumerate(table.lines) if i not in kept]
    if not keep:
        raise UserError(
            f"data.label: no row of '{table.file}' has a '{label}' value (all {len(left_out)} "
            "are blank or NA). Check data.label names the label column."
        )
    shown = ", ".join(map(str, left_out[:5])) + (", …" if len(left_out) > 5 else "")
    warnings.warn(
        f"{table.key}: {len(left_out)} of {len(table.rows)} rows of '{table.file}' have no "
        f"'{label}' value (blank or NA; line{'s' if len(left_out) > 1 else ''} {shown}): left "
        "out of training and evaluation",
        stacklevel=2,
    )
    return replace(table, rows=[table.rows[i] for i in keep], lines=[table.lines[i] for i in keep])


def _label_values(table: CsvTable, label: str) -> list[str]:
    """The label column's cells (every row has one: see _labelled_rows)."""
    at = table.column(label, "data.label")
    return [row[at].strip() for row in table.rows]


MANY_CLASSES = 20  # integer labels with more distinct values (and few rows each) are quantities


def _task_of(table: CsvTable, label: str, raw: list[str], requested: str) -> str:
    """The task the label column asks for (data.task auto), or the one the recipe names.

    Text labels are classes; numbers with a fraction (a price) are a regression target, and
    so are integers with more distinct values than classes usually have (over MANY_CLASSES)
    unless they are class ids as encoders write them — 0..K-1 or 1..K, no gaps: counts (visits,
    items) and years are quantities. Class ids with many rows each are classes; with few rows
    each (over a tenth of the rows are distinct) they are a question to answer with data.task."""
    if requested not in ("auto", "classification", "regression"):
        raise UserError(
            f"data.task: 'csv' tables are classification or regression; data.task={requested} "
            "is not possible for them. Use data.task=auto."
        )
    if requested != "auto":
        return requested
    numbers = [table.number(value) for value in raw]
    if any(n is None for n in numbers):
        return "classification"  # text labels are class names
    if any(not n.is_integer() for n in numbers):
        return "regression"
    distinct = sorted({int(n) for n in numbers})
    if len(distinct) <= MANY_CLASSES:
        return "classification"
    consecutive = distinct == list(range(distinct[0], distinct[0] + len(distinct)))
    if not (consecutive and distinct[0] in (0, 1)):
        return "regression"
    if len(distinct) <= len(raw) // 10:
        return "classification"
    raise UserError(
        f"data.task: label '{label}' in '{table.file}' holds {len(distinct)} distinct "
        f"integers ({distinct[0]}..{distinct[-1]}) over {len(raw)} rows: class ids with "
        "few rows each, or a quantity? Set data.task: classification or data.task: "
        "regression."
    )


def _regression_targets(table: CsvTable, raw: list[str]) -> np.ndarray:
    """The label column as float32 targets; a cell that is not a number is a UserError."""
    y = np.empty(len(raw), dtype=np.float32)
    for i, value in enumerate(raw):
        number = table.number(value)
        if number is None:
            raise UserError(
                f"data.label: '{table.file}' line {table.lines[i]} has label {value!r}, which "
                "is not a finite number; a regression target must be one. Fix or drop the "
                "row, or set data.task: classification."
            )
        y[i] = number
    return y


def class_names(raw: list[str]) -> tuple[list[str], bool]:
    """Sorted unique labels (numerically when all are integers) and whether they are integers."""
    try:
        return [str(v) for v in sorted({int(v) for v in raw})], True
    except ValueError:
        return sorted(set(raw)), False


def _canonical(label: str) -> str:
    """An integer label in canonical form ('07' and '7' are the same class); others as is."""
    try:
        return str(int(label))
    except ValueError:
        return label


def encode_labels(table: CsvTable, raw: list[str], classes: list[str], numeric: bool) -> np.ndarray:
    """Class indices of the raw labels; a label absent from `classes` is a UserError."""
    index = {name: i for i, name in enumerate(classes)}
    y = np.empty(len(raw), dtype=np.int64)
    for i, value in enumerate(raw):
        key = _canonical(value) if numeric else value
        if key not in index:
            raise UserError(
                f"{table.key}: '{table.file}' line {table.lines[i]} has label '{value}', which "
                f"is not in the training data (classes: {', '.join(classes)}). Drop those rows "
                "or add examples of that class to the training file."
            )
        y[i] = index[key]
    return y
