"""`csv`: tabular classification from CSV files, and the CSV table and label handling it shares.

`read_table`, `CsvTable`, `class_names` and `encode_labels` also serve `text_csv`
(dltrain.data.text), which reads and labels its CSV files the same way.
"""

from __future__ import annotations

import csv as csvlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from dltrain.data.base import ArraySplit, DatasetSplits
from dltrain.data.paths import InputPath, existing_path
from dltrain.data.splits import stratified_split
from dltrain.data.tensors import to_tensor
from dltrain.errors import UserError, did_you_mean
from dltrain.registry import DATASETS


@dataclass
class CsvTable:
    """A CSV file's header and non-blank rows, with each row's line number for messages."""

    file: Path
    key: str
    header: list[str]
    rows: list[list[str]]
    lines: list[int]

    def column(self, name: str, key: str) -> int:
        """The index of a column, or a UserError listing the columns and the nearest one."""
        if name not in self.header:
            raise UserError(
                f"{key}: column '{name}' not found in '{self.file}'. Columns: "
                f"{', '.join(self.header)}.{did_you_mean(name, self.header)}"
            )
        return self.header.index(name)


def check_file_choice(path: str | None, train: str | None, test: str | None) -> None:
    """One file to carve a test split from, or a training file (with an optional test file);
    a validation file (data.val) goes with either."""
    if (path is None) == (train is None) or (test is not None and train is None):
        raise UserError(
            "data.path: set either data.path (one CSV file; a test split is carved from it) or "
            "data.train (with an optional data.test), not both and not neither. A validation "
            "file, data.val, goes with either."
        )


@DATASETS.register()
def csv(
    path: InputPath | None = None,
    train: InputPath | None = None,
    test: InputPath | None = None,
    val: InputPath | None = None,
    label: str = "label",
    features: list[str] | None = None,
    test_split: Annotated[float, Field(gt=0, lt=1)] = 0.2,
    seed: int = 0,
) -> DatasetSplits:
    """Tabular classification from CSV files with a header row and numeric feature columns.

    Give `path` (one file; a stratified test split of `test_split` is carved with the run's
    seed) or `train` with an optional `test` file; `val` adds a validation file to either
    (data.val_split is then not used). `label` names the class column (strings or integers);
    `features` the input columns (default: every other column). Classes are the sorted labels
    of the training file, numerically when all are integers.
    """
    check_file_choice(path, train, test)
    main = read_table(path or train, "data.path" if path else "data.train")
    names = _feature_names(main, label, features)
    x, raw = _table_arrays(main, names, label)
    classes, numeric = class_names(raw)
    y = encode_labels(main, raw, classes, numeric)

    def labelled(file: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Another file of the same table: its columns matched by name, the same classes."""
        other = read_table(file, key)
        other_x, other_raw = _table_arrays(other, names, label)
        return other_x, encode_labels(other, other_raw, classes, numeric)

    if path is not None:
        kept, carved = stratified_split(y, test_split, seed)
        train_part, test_part = (x[kept], y[kept]), (x[carved], y[carved])
    else:
        train_part, test_part = (x, y), labelled(test, "data.test") if test else None
    val_part = labelled(val, "data.val") if val else None
    return _tabular(classes, train_part, test_part, val_part)


def _tabular(
    classes: list[str],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> DatasetSplits:
    """DatasetSplits of float32 features; an empty carved test split becomes None (an empty
    validation file stays, to be named as empty)."""
    test_split = (
        ArraySplit(to_tensor(test[0]), to_tensor(test[1])) if test and len(test[1]) else None
    )
    return DatasetSplits(
        kind="tabular",
        classes=classes,
        train=ArraySplit(to_tensor(train[0]), to_tensor(train[1])),
        test=test_split,
        val=ArraySplit(to_tensor(val[0]), to_tensor(val[1])) if val else None,
    )


# What to do about a row of the wrong width, for plain tables and for texts
FIX_THE_ROW = "Fix that row."
QUOTE_THE_TEXTS = 'Quote texts that contain commas or line breaks ("like, this"), or fix that row.'


def read_table(
    path: str, key: str, row_hint: str = FIX_THE_ROW, columns_example: str = ""
) -> CsvTable:
    """Parse a UTF-8 CSV file with a header; rows must have as many values as the header.

    Quoted cells may span lines (texts): a row's line is the one it starts on. Undecodable
    bytes are reported with their line. `row_hint` says how to fix a row of the wrong width;
    `columns_example` (e.g. " (e.g. text,label)") completes the message for a file without
    a header or rows.
    """
    file = existing_path(path, key)
    content = _utf8(file, key)
    rows: list[list[str]] = []
    lines: list[int] = []
    reader = csvlib.reader(io.StringIO(content, newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        while True:
            start = reader.line_num + 1  # a quoted text may span lines: report the first
            row = next(reader, None)
            if row is None:
                break
            if not any(cell.strip() for cell in row):
                continue  # blank lines, often at the end of a file
            if len(row) != len(header):
                raise UserError(
                    f"{key}: '{file}' line {start} has {len(row)} values but the header has "
                    f"{len(header)} columns. {row_hint}"
                )
            rows.append(row)
            lines.append(start)
    except csvlib.Error as exc:
        raise UserError(
            f"{key}: cannot parse '{file}' as CSV near line {reader.line_num} ({exc}). Re-save "
            "it as comma-separated values with a header row, texts quoted where needed."
        ) from None
    if not header or not rows:
        raise UserError(
            f"{key}: '{file}' has no {'header' if not header else 'data rows'}. Expected a "
            f"header row naming the columns{columns_example}, then one row per sample."
        )
    return CsvTable(file, key, header, rows, lines)


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
            f"'{label}'. Add numeric feature columns."
        )
    return names


def _table_arrays(table: CsvTable, names: list[str], label: str) -> tuple[np.ndarray, list[str]]:
    """Features as N×F float32 (numbers only, finite) and the raw label strings."""
    columns = [table.column(name, "data.features") for name in names]
    label_at = table.column(label, "data.label")
    cells = [[row[c] for c in columns] for row in table.rows]
    raw = [row[label_at].strip() for row in table.rows]
    for i, value in enumerate(raw):
        if not value:
            raise UserError(
                f"data.label: '{table.file}' line {table.lines[i]} has an empty "
                f"'{label}' value. Fill it in or drop the row."
            )
    try:
        x = np.array(cells, dtype=np.float64)
        if np.isfinite(x).all():
            return x.astype(np.float32), raw
    except ValueError:
        pass
    _raise_bad_cell(table, names, cells)
    raise AssertionError("unreachable")


def _raise_bad_cell(table: CsvTable, names: list[str], cells: list[list[str]]) -> None:
    """Find the first cell that is not a finite number and report its line and column."""
    for r, row in enumerate(cells):
        for c, value in enumerate(row):
            try:
                ok = np.isfinite(float(value))
            except ValueError:
                ok = False
            if not ok:
                raise UserError(
                    f"{table.key}: '{table.file}' line {table.lines[r]}, column '{names[c]}': "
                    f"{'empty value' if not value.strip() else repr(value)} is not a finite "
                    "number. Feature columns must be numeric: fill in or fix "
                    "the value, drop the row, or leave the column out of data.features."
                )


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
