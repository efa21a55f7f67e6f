"""`npz`: a dataset of NumPy arrays saved in one .npz file, as images or tabular features."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

from dltrain.config.registry import DATASETS
from dltrain.data.base import ArraySplit, DatasetSplits
from dltrain.data.npy_headers import check_npz_file
from dltrain.data.paths import InputPath, existing_path
from dltrain.data.tensors import to_tensor
from dltrain.errors import UserError


@DATASETS.register(tasks=("classification",))
def npz(path: InputPath, layout: Literal["auto", "nchw", "nhwc"] = "auto") -> DatasetSplits:
    """Arrays in a NumPy .npz file: images (N×H×W, N×H×W×C, N×C×H×W) or features (N×F).

    Needs train_x, train_y, test_x, test_y; optional val_x/val_y and `classes` (strings; default
    '0', '1', ... up to the largest label). 2-D x is tabular (cast to float32); 3-D x is
    grayscale images; 4-D x is images laid out per `layout` ('auto' takes NCHW when dim 1 is
    1, 3 or 4, else NHWC when the last dim is). uint8 images stay uint8 (0..255, normalised later);
    float images become float32 and are assumed already scaled. Labels are integers in [0, C).
    """
    file = existing_path(path, "data.path")
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
    parts = {s: ArraySplit(to_tensor(xs[s]), to_tensor(ys[s])) for s in splits}
    kind = "tabular" if xs["train"].ndim == 2 else "image"
    return DatasetSplits(kind=kind, classes=classes, **parts)


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, refusing pickled objects."""
    try:
        if zipfile.is_zipfile(file):
            check_npz_file(file)  # before numpy allocates what a header declares
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
    elif y.size and y.max() >= 2**31:
        problem = f"has label {y.max():.0f}, far beyond any number of classes"
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
        samples = sum(y.size for y in ys.values())
        if top + 1 > max(samples, 2):  # checked before a name is made for every class
            raise UserError(
                f"data.path: label {top} in '{file}' would make {top + 1:,} classes for "
                f"{samples:,} samples; labels are class indices 0..K-1. Renumber them (e.g. "
                "np.unique(y, return_inverse=True)) or save a 'classes' array naming them."
            )
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
