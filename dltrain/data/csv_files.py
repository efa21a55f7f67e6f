"""CSV files as people have them: the delimiter sniffed (`,` `;` tab `|`), decimal commas
recognised (what spreadsheets in much of Europe export: `1,5;2,25`), a BOM, CRLF line ends and
quoted cells spanning lines kept working. One reader for every CSV dltrain reads: training
tables and texts, and `predict`'s input files. `data.delimiter` / `data.decimal` force a choice
the sniffing gets wrong."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
DELIMITER_CHOICES = ("auto", ",", ";", "tab", "|")  # what a recipe writes ("tab": a tab)
SNIFF_LINES = 200  # the first lines decide: a file's dialect is the same throughout

# a number written with a decimal comma, optionally with '.' or ' ' grouping thousands
_COMMA_NUMBER = re.compile(r"[+-]?(\d{1,3}([. ]\d{3})+|\d+),\d+")
_DOT_NUMBER = re.compile(r"[+-]?\d*\.\d+([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Dialect:
    """How a CSV file is written: its delimiter and its decimal mark."""

    delimiter: str = ","
    decimal: str = "."

    def describe(self) -> str:
        """'semicolon-separated, decimal comma': what messages say the file was read as."""
        said = f"{DELIMITERS.get(self.delimiter, repr(self.delimiter))}-separated"
        return said + (", decimal comma" if self.decimal == "," else "")

    def number(self, cell: str) -> float | None:
        """A cell's value as this file writes numbers (None: not a number)."""
        text = cell.strip()
        if self.decimal == ",":
            if "." in text and not _COMMA_NUMBER.fullmatch(text):
                return None  # '3.5' in a decimal-comma file is no number of that file
            text = text.replace(".", "").replace(" ", "").replace(",", ".")
        try:
            return float(text)
        except ValueError:
            return None


def sniff(text: str, delimiter: str = "auto", decimal: str = "auto") -> Dialect:
    """The file's dialect: each part as given, or read off its first lines."""
    sample = "\n".join(text.splitlines()[:SNIFF_LINES])
    chosen = {"tab": "\t"}.get(delimiter, delimiter)
    if chosen == "auto":
        chosen = _sniff_delimiter(sample)
    if decimal == "auto":
        decimal = _sniff_decimal(sample, chosen)
    return Dialect(chosen, decimal)


def _sniff_delimiter(sample: str) -> str:
    """The candidate that splits the most lines into the header's number of columns (more
    than one); ties go to the wider split, then to the comma."""
    best, best_score = ",", (0, 0)
    for candidate in DELIMITERS:
        widths = [len(row) for row in _rows(sample, candidate) if any(c.strip() for c in row)]
        if not widths or widths[0] < 2:
            continue
        consistent = sum(width == widths[0] for width in widths)
        score = (consistent, widths[0])
        if score > best_score:
            best, best_score = candidate, score
    return best


def _sniff_decimal(sample: str, delimiter: str) -> str:
    """A decimal comma when, and only when, the file's numbers are written with one (never in
    a comma-separated file, where an unquoted comma splits the cell)."""
    if delimiter == ",":
        return "."
    cells = [cell.strip() for row in _rows(sample, delimiter)[1:] for cell in row]
    commas = sum(bool(_COMMA_NUMBER.fullmatch(cell)) for cell in cells)
    dots = sum(bool(_DOT_NUMBER.fullmatch(cell)) for cell in cells)
    return "," if commas > 0 and dots == 0 else "."


def _rows(sample: str, delimiter: str) -> list[list[str]]:
    try:
        return list(csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter))
    except csv.Error:  # a quote left open where the sample ends: judge the lines before it
        return []


def reader(text: str, dialect: Dialect):
    """A csv.reader over the whole text in this dialect (its `line_num` counts lines)."""
    return csv.reader(io.StringIO(text, newline=""), delimiter=dialect.delimiter)
