"""Datasets read from the user's own files: NumPy .npz arrays, CSV tables, image folders."""

from __future__ import annotations

import csv as csvlib
import os
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from dltrain.data.base import ArraySplit, DatasetSplits
from dltrain.data.splits import stratified_split
from dltrain.errors import UserError, did_you_mean
from dltrain.registry import DATASETS

# An image folder whose decoded uint8 pixels fit in this many bytes is decoded once up front.
RESIDENT_LIMIT_BYTES = 256 * 1024**2
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})


def _existing(path: str, key: str, want_dir: bool = False) -> Path:
    """`path` as a Path, or a UserError naming the recipe key and the resolved location."""
    resolved = Path(path).expanduser()
    if resolved.is_dir() if want_dir else resolved.is_file():
        return resolved
    what = "folder" if want_dir else "file"
    problem = "not found"
    if resolved.exists():
        problem = "is a file, not a folder" if want_dir else "is a folder, not a file"
    raise UserError(
        f"{key}: {what} '{path}' {problem} (resolved to {resolved.resolve()}). "
        f"Set {key} to the {what}'s location; relative paths start at {Path.cwd()}."
    )


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing `array`'s memory when possible (copies read-only arrays)."""
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


# -- npz ------------------------------------------------------------------------------------

_NPZ_REQUIRED = ("train_x", "train_y", "test_x", "test_y")


@DATASETS.register()
def npz(path: str, layout: Literal["auto", "nchw", "nhwc"] = "auto") -> DatasetSplits:
    """Arrays in a NumPy .npz file: images (N×H×W, N×H×W×C, N×C×H×W) or features (N×F).

    Needs train_x, train_y, test_x, test_y; optional val_x/val_y and `classes` (strings; default
    '0', '1', ... up to the largest label). 2-D x is tabular (cast to float32); 3-D x is
    grayscale images; 4-D x is images laid out per `layout` ('auto' takes NCHW when dim 1 is
    1, 3 or 4, else NHWC when the last dim is). uint8 images stay uint8 (0..255, normalised later);
    float images become float32 and are assumed already scaled. Labels are integers in [0, C).
    """
    file = _existing(path, "data.path")
    arrays = _read_npz(file)
    splits = (
        ["train", "val", "test"] if "val_x" in arrays or "val_y" in arrays else ["train", "test"]
    )
    _check_npz_keys(arrays, file, splits)
    xs = {s: _npz_x(arrays[f"{s}_x"], f"{s}_x", layout, file) for s in splits}
    ys = {s: _npz_y(arrays[f"{s}_y"], f"{s}_y", file) for s in splits}
    for s in splits:
        _check_npz_split(xs, ys, s, file)
    classes = _npz_classes(arrays.get("classes"), ys, file)
    parts = {s: ArraySplit(_to_tensor(xs[s]), _to_tensor(ys[s])) for s in splits}
    kind = "tabular" if xs["train"].ndim == 2 else "image"
    return DatasetSplits(kind=kind, classes=classes, **parts)


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, refusing pickled objects."""
    try:
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array (.npy), not named arrays")
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(
            f"data.path: cannot read '{file}' as an .npz archive ({exc}). Save the arrays with "
            "numpy.savez(path, train_x=..., train_y=..., test_x=..., test_y=...) and plain "
            "(non-object) dtypes; strings in `classes` are fine."
        ) from None


def _check_npz_keys(arrays: dict[str, np.ndarray], file: Path, splits: list[str]) -> None:
    """UserError listing the missing arrays and the ones found."""
    wanted = [f"{s}_{part}" for s in splits for part in ("x", "y")]
    missing = [key for key in wanted if key not in arrays]
    if missing:
        found = ", ".join(arrays) or "none"
        raise UserError(
            f"data.path: '{file}' lacks array(s) {', '.join(missing)} (found: {found}). An npz "
            "dataset needs train_x, train_y, test_x, test_y, and optionally val_x with val_y "
            "and classes."
        )


def _npz_x(x: np.ndarray, key: str, layout: str, file: Path) -> np.ndarray:
    """One x array as N×F float32 or N×C×H×W (uint8 or float32)."""
    if x.ndim == 2:
        if x.dtype.kind not in "biuf":
            raise UserError(
                f"data.path: '{key}' in '{file}' has dtype {x.dtype}; tabular "
                "features must be numeric."
            )
        return x.astype(np.float32, copy=False)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if _nhwc(x, key, layout, file):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise UserError(
            f"data.path: '{key}' in '{file}' has shape {x.shape}; expected N×F (tabular), N×H×W "
            "(grayscale), or N×H×W×C / N×C×H×W (images)."
        )
    return _image_dtype(x, key, file)


def _nhwc(x: np.ndarray, key: str, layout: str, file: Path) -> bool:
    """Whether a 4-D image array is channels-last, from `layout` or guessed from its shape."""
    if layout != "auto":
        return layout == "nhwc"
    if x.shape[1] in (1, 3, 4):
        return False
    if x.shape[-1] in (1, 3, 4):
        return True
    raise UserError(
        f"data.layout: cannot tell where the channels are in '{key}' of shape {x.shape} in "
        f"'{file}' (neither dim 1 nor the last is 1, 3 or 4). Set data.layout to nchw or nhwc."
    )


def _image_dtype(x: np.ndarray, key: str, file: Path) -> np.ndarray:
    """uint8 stays; floats become float32 (taken as already scaled); ints must fit in uint8."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype.kind in "biu" and (x.size == 0 or (x.min() >= 0 and x.max() <= 255)):
        return x.astype(np.uint8)
    raise UserError(
        f"data.path: '{key}' in '{file}' has dtype {x.dtype}"
        + (f" with values {x.min()}..{x.max()}" if x.dtype.kind in "biu" else "")
        + "; images must be uint8 0..255 or floats already scaled. Convert before saving."
    )


def _npz_y(y: np.ndarray, key: str, file: Path) -> np.ndarray:
    """One label array as 1-D int64, or a UserError when it is not integer class indices."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    problem = None
    if y.ndim != 1:
        problem = f"has shape {y.shape}, expected one label per sample (N,)"
    elif y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0)):
        problem = f"has dtype {y.dtype} with non-integer values"
    elif y.size and y.min() < 0:
        problem = f"has negative label {y.min()}"
    if problem:
        raise UserError(
            f"data.path: '{key}' in '{file}' {problem}. Labels must be integer class indices "
            "in [0, number of classes)."
        )
    return y.astype(np.int64)


def _check_npz_split(
    xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], split: str, file: Path
) -> None:
    """Each split has one label per sample and the same per-sample shape as train."""
    x, y = xs[split], ys[split]
    if len(x) != len(y):
        raise UserError(
            f"data.path: '{split}_x' has {len(x)} samples but '{split}_y' has {len(y)} labels "
            f"in '{file}'. Save one label per sample."
        )
    if len(x) == 0 and split == "train":
        raise UserError(f"data.path: 'train_x' in '{file}' is empty. Save some training samples.")
    if x.shape[1:] != xs["train"].shape[1:]:
        raise UserError(
            f"data.path: '{split}_x' samples have shape {x.shape[1:]} but 'train_x' samples have "
            f"{xs['train'].shape[1:]} in '{file}' (after layout conversion). Every split needs "
            "the same sample shape."
        )


def _npz_classes(names: np.ndarray | None, ys: dict[str, np.ndarray], file: Path) -> list[str]:
    """Class names from the `classes` array or '0'..'max label'; every label must index one."""
    top = max((int(y.max()) for y in ys.values() if y.size), default=0)
    if names is None:
        return [str(i) for i in range(top + 1)]
    if names.ndim != 1 or names.dtype.kind not in "USiu":
        raise UserError(
            f"data.path: 'classes' in '{file}' has shape {names.shape} and dtype {names.dtype}; "
            "save it as a 1-D array of strings, e.g. np.array(['cat', 'dog'])."
        )
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    for key, y in ys.items():
        if y.size and y.max() >= len(classes):
            raise UserError(
                f"data.path: '{key}_y' in '{file}' has label {int(y.max())} but 'classes' names "
                f"only {len(classes)} classes; labels must be in [0, {len(classes)}). Fix the "
                "labels or add the missing class names."
            )
    return classes


# -- csv ------------------------------------------------------------------------------------


@dataclass
class _Table:
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


@DATASETS.register()
def csv(
    path: str | None = None,
    train: str | None = None,
    test: str | None = None,
    label: str = "label",
    features: list[str] | None = None,
    test_split: Annotated[float, Field(gt=0, lt=1)] = 0.2,
    seed: int = 0,
) -> DatasetSplits:
    """Tabular classification from CSV files with a header row and numeric feature columns.

    Give `path` (one file; a stratified test split of `test_split` is carved with the run's
    seed) or `train` with an optional `test` file. `label` names the class column (strings or
    integers); `features` the input columns (default: every other column). Classes are the
    sorted labels of the training file, numerically when all are integers.
    """
    if (path is None) == (train is None) or (test is not None and train is None):
        raise UserError(
            "data.path: set either data.path (one CSV file; a test split is carved from it) or "
            "data.train (with an optional data.test), not both and not neither."
        )
    main = _read_table(path or train, "data.path" if path else "data.train")
    names = _feature_names(main, label, features)
    x, raw = _table_arrays(main, names, label)
    classes, numeric = _class_names(raw)
    y = _encode_labels(main, raw, classes, numeric)
    if path is not None:
        kept, carved = stratified_split(y, test_split, seed)
        return _tabular(classes, (x[kept], y[kept]), (x[carved], y[carved]))
    if test is None:
        return _tabular(classes, (x, y), None)
    other = _read_table(test, "data.test")
    test_x, test_raw = _table_arrays(other, names, label)
    return _tabular(classes, (x, y), (test_x, _encode_labels(other, test_raw, classes, numeric)))


def _tabular(
    classes: list[str],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
) -> DatasetSplits:
    """DatasetSplits of float32 features; an empty carved test split becomes None."""
    test_split = (
        ArraySplit(_to_tensor(test[0]), _to_tensor(test[1])) if test and len(test[1]) else None
    )
    return DatasetSplits(
        kind="tabular",
        classes=classes,
        train=ArraySplit(_to_tensor(train[0]), _to_tensor(train[1])),
        test=test_split,
    )


def _read_table(path: str, key: str) -> _Table:
    """Parse a CSV file with a header; rows must have as many values as the header."""
    file = _existing(path, key)
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csvlib.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank lines, often at the end of a file
                if len(row) != len(header):
                    raise UserError(
                        f"{key}: '{file}' line {reader.line_num} has {len(row)} values but the "
                        f"header has {len(header)} columns. Fix that row."
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csvlib.Error) as exc:
        raise UserError(
            f"{key}: cannot parse '{file}' as UTF-8 CSV ({exc}). Re-save it as "
            "UTF-8 comma-separated values with a header row."
        ) from None
    if not header or not rows:
        raise UserError(
            f"{key}: '{file}' has no {'header' if not header else 'data rows'}. "
            "Expected a header row naming the columns, then one row per sample."
        )
    return _Table(file, key, header, rows, lines)


def _feature_names(table: _Table, label: str, features: list[str] | None) -> list[str]:
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


def _table_arrays(table: _Table, names: list[str], label: str) -> tuple[np.ndarray, list[str]]:
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


def _raise_bad_cell(table: _Table, names: list[str], cells: list[list[str]]) -> None:
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


def _class_names(raw: list[str]) -> tuple[list[str], bool]:
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


def _encode_labels(table: _Table, raw: list[str], classes: list[str], numeric: bool) -> np.ndarray:
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


# -- image folders --------------------------------------------------------------------------

_LAYOUT_HELP = (
    "Expected one folder per class: <path>/<class>/<image>, or <path>/train/<class>/<image> "
    "with optional <path>/val/<class>/ and <path>/test/<class>/ (images: "
    + ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
    + ")."
)
# What PIL raises for files it cannot decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@DATASETS.register()
def image_folder(
    path: str,
    image_size: int | tuple[int, int] = 64,
    grayscale: bool = False,
    test_split: Annotated[float, Field(ge=0, lt=1)] = 0.2,
    on_bad_file: Literal["skip", "error"] = "skip",
    seed: int = 0,
) -> DatasetSplits:
    """Images sorted into one folder per class (path/<class>/ or path/train|val|test/<class>/).

    Images are decoded with PIL as RGB (or L with `grayscale`) and resized to `image_size`
    (an int for square, or [height, width]). Without a train/ folder, a stratified test split
    of `test_split` is carved with the run's seed (0 carves none). `on_bad_file` skips
    undecodable files with a warning, or stops with an error.

    A folder whose decoded pixels fit in RESIDENT_LIMIT_BYTES (256 MiB as uint8) is decoded
    once into ArraySplits, so training uses the fast resident-tensor path (no per-epoch decoding
    or DataLoader workers); larger folders become lazy ImageFileSplits decoded per sample.
    """
    root = _existing(path, "data.path", want_dir=True)
    size = _image_size(image_size)
    classes, found = _find_images(root, test_split, seed)
    channels = 1 if grayscale else 3
    total = sum(len(files) for files, _ in found.values()) * channels * size[0] * size[1]
    resident = total <= RESIDENT_LIMIT_BYTES
    splits = {
        name: (_decode_all if resident else ImageFileSplit)(
            files, labels, size, grayscale, on_bad_file
        )
        for name, (files, labels) in found.items()
    }
    return DatasetSplits(kind="image", classes=classes, **splits)


def _image_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) from an int or a pair, each at least 1."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1:
        raise UserError(
            f"data.image_size: must be a positive int or [height, width] of "
            f"positive ints (got {image_size!r})."
        )
    return int(size[0]), int(size[1])


def _find_images(
    root: Path, test_split: float, seed: int
) -> tuple[list[str], dict[str, tuple[list[Path], list[int]]]]:
    """Class names and each split's (files, labels), in class then path order."""
    if not (root / "train").is_dir():
        if (root / "val").is_dir() or (root / "test").is_dir():
            raise UserError(
                f"data.path: '{root}' has val/ or test/ but no train/ folder. " + _LAYOUT_HELP
            )
        classes = _class_folders(root)
        files, labels = _list_images(root, classes, required=True)
        kept, carved = stratified_split(np.asarray(labels), test_split, seed)
        found = {"train": _pick(files, labels, kept)}
        if len(carved):
            found["test"] = _pick(files, labels, carved)
        return classes, found
    classes = _class_folders(root / "train")
    found = {"train": _list_images(root / "train", classes, required=True)}
    for name in ("val", "test"):
        folder = root / name
        if folder.is_dir():
            unknown = sorted(set(_class_folders(folder, allow_empty=True)) - set(classes))
            if unknown:
                raise UserError(
                    f"data.path: '{folder}' has class folder(s) {', '.join(unknown)} that are not "
                    f"in '{root / 'train'}' (classes: {', '.join(classes)}). Rename or remove "
                    "them, or add training images of those classes."
                )
            found[name] = _list_images(folder, classes, required=False)
    return classes, found


def _class_folders(folder: Path, allow_empty: bool = False) -> list[str]:
    """Sorted names of the visible subfolders of `folder`."""
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names and not allow_empty:
        raise UserError(f"data.path: '{folder}' has no class folders. " + _LAYOUT_HELP)
    return names


def _list_images(folder: Path, classes: list[str], required: bool) -> tuple[list[Path], list[int]]:
    """Image files under folder/<class>/ (recursively, sorted) with their class indices."""
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_dir = folder / name
        found = (
            sorted(
                p
                for p in class_dir.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and not p.name.startswith(".")
                and p.is_file()
            )
            if class_dir.is_dir()
            else []
        )
        if required and not found:
            raise UserError(
                f"data.path: class folder '{class_dir}' has no images. Add some or "
                "remove the folder. " + _LAYOUT_HELP
            )
        files += found
        labels += [index] * len(found)
    return files, labels


def _pick(
    files: list[Path], labels: list[int], indices: np.ndarray
) -> tuple[list[Path], list[int]]:
    """The files and labels at `indices`."""
    return [files[i] for i in indices], [labels[i] for i in indices]


def decode_image(file: Path | str, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """Decode one image file to a C×H×W uint8 array of the given (height, width)."""
    with Image.open(file) as image:
        image = image.convert("L" if grayscale else "RGB")
    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.array(image, dtype=np.uint8)
    return pixels[None] if grayscale else pixels.transpose(2, 0, 1)


def _bad_file(file: Path | str, exc: BaseException, on_bad_file: str) -> None:
    """Warn about an undecodable file, or raise a UserError when on_bad_file is 'error'."""
    reason = str(exc) or type(exc).__name__
    if on_bad_file == "error":
        raise UserError(
            f"data.path: cannot decode image '{file}' ({reason}). Fix or delete the file, or set "
            "data.on_bad_file: skip to leave undecodable images out."
        )
    warnings.warn(f"skipping undecodable image {file}: {reason}", stacklevel=2)


def _workers() -> int:
    """Threads for decoding: PIL releases the GIL while decoding and resizing."""
    return min(8, os.cpu_count() or 1)


def _decode_all(
    files: list[Path], labels: list[int], size: tuple[int, int], grayscale: bool, on_bad_file: str
) -> ArraySplit:
    """Decode every file into one N×C×H×W uint8 ArraySplit, leaving out undecodable files."""
    x = np.empty((len(files), 1 if grayscale else 3, *size), dtype=np.uint8)

    def fill(i: int) -> BaseException | None:
        try:
            x[i] = decode_image(files[i], size, grayscale)
        except _DECODE_ERRORS as exc:
            return exc
        return None

    with ThreadPoolExecutor(_workers()) as pool:
        failures = list(pool.map(fill, range(len(files))))
    for file, exc in zip(files, failures, strict=True):
        if exc is not None:
            _bad_file(file, exc, on_bad_file)  # here, not in the threads: warnings in file order
    ok = np.array([exc is None for exc in failures], dtype=bool)
    y = np.asarray(labels, dtype=np.int64)
    if not ok.all():
        x, y = x[ok], y[ok]
    return ArraySplit(torch.from_numpy(x), torch.from_numpy(y))


class ImageFileSplit:
    """A lazy split of image files, decoded and resized on each access (for large folders).

    Files whose header PIL cannot read are handled at construction per `on_bad_file`. A file
    that fails later (e.g. truncated data) raises with 'error'; with 'skip' it is warned about
    once and the next decodable image of the same class is returned in its place, so indices
    and `targets` stay valid.
    """

    def __init__(
        self,
        files: list[Path],
        labels: list[int],
        size: tuple[int, int],
        grayscale: bool,
        on_bad_file: str,
    ):
        with ThreadPoolExecutor(_workers()) as pool:
            failures = list(pool.map(_header_error, files))
        keep = []
        for i, exc in enumerate(failures):
            if exc is None:
                keep.append(i)
            else:
                _bad_file(files[i], exc, on_bad_file)
        self.files = [str(files[i]) for i in keep]  # str: cheap to pickle into DataLoader workers
        self.targets = [int(labels[i]) for i in keep]
        self.size = size
        self.grayscale = grayscale
        self.on_bad_file = on_bad_file
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for j in self._same_class_from(index):
            try:
                return torch.from_numpy(self._decode(j)), self.targets[index]
            except _DECODE_ERRORS as exc:
                # 'error' raises every time; 'skip' warns once per file across epochs.
                if self.on_bad_file == "error" or self.files[j] not in self._warned:
                    self._warned.add(self.files[j])
                    _bad_file(self.files[j], exc, self.on_bad_file)
        raise UserError(
            f"data.path: no image of class {self.targets[index]} could be decoded (all were "
            "skipped as undecodable). Replace the broken files."
        )

    def _decode(self, j: int) -> np.ndarray:
        return np.ascontiguousarray(decode_image(self.files[j], self.size, self.grayscale))

    def _same_class_from(self, index: int) -> Iterator[int]:
        """`index`, then the following indices of the same class, wrapping around."""
        n = len(self.files)
        label = self.targets[index]
        for step in range(n):
            j = (index + step) % n
            if self.targets[j] == label:
                yield j


def _header_error(file: Path) -> BaseException | None:
    """The error PIL raises when opening `file` (reads only the header), or None."""
    try:
        with Image.open(file):
            return None
    except _DECODE_ERRORS as exc:
        return exc
