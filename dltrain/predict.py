"""`dltrain predict`: class probabilities for files, read the way the model's training data was.

What a file may be depends on the checkpoint's input kind:

- image models: image files (png, jpg, jpeg, bmp, gif, webp) of any size, decoded with PIL,
  converted to the model's channel count (1 → grayscale 'L', 3 → 'RGB') and resized to its
  H×W with bilinear resampling, as uint8 — exactly as `image_folder` decodes training images;
  or `.npy` arrays of one sample (C×H×W) or a batch (N×C×H×W);
- tabular models: `.csv` tables with a header row, one sample per row (a `label` column, or
  the column the recipe named as data.label, is ignored; the recipe's data.features are picked
  by name when it lists them), or `.npy` arrays of one row (F) or a batch (N×F).

`.npy` arrays follow the `npz` dataset's rule: uint8 (and integers within 0..255 for images)
are pixels, scaled by 1/255 as in training; float arrays are taken as they are (already scaled
to [0, 1] for images, raw features for tabular models). Either way the checkpoint's
normalisation is then applied. (Text models would get a reader for .txt files here.)
"""

from __future__ import annotations

import csv as csvlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dltrain.data.files import IMAGE_EXTENSIONS, decode_image
from dltrain.errors import UserError
from dltrain.inference import Predictor

BATCH_SIZE = 256  # samples per forward pass: bounds memory for large .npy / .csv inputs

# What PIL raises for files it cannot decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError)
try:
    from PIL import Image

    _DECODE_ERRORS += (Image.DecompressionBombError,)
except ImportError:  # pragma: no cover - PIL comes with torchvision
    pass


@dataclass
class Samples:
    """The samples read from one input file, each with the name it is reported under."""

    names: list[str]
    x: torch.Tensor  # N × input_shape: uint8 pixels or float32 values


def default_top_k(num_classes: int) -> int:
    """How many classes to show when --top-k is not given."""
    return min(5, num_classes)


def predict_files(
    predictor: Predictor, paths: list[Path], top_k: int | None = None
) -> list[dict[str, Any]]:
    """One {"input", "predictions": [{"class", "probability"}, ...]} per sample, best first.

    Every file is read before any prediction, so a bad file fails before anything is printed.
    """
    k = min(top_k or default_top_k(len(predictor.classes)), len(predictor.classes))
    read = [read_input(path, predictor) for path in paths]
    results = []
    for samples in read:
        for start in range(0, len(samples.names), BATCH_SIZE):
            probs = predictor.predict_proba(samples.x[start : start + BATCH_SIZE])
            top = probs.topk(k, dim=1)
            for i, name in enumerate(samples.names[start : start + BATCH_SIZE]):
                results.append(
                    {
                        "input": name,
                        "predictions": [
                            {"class": predictor.classes[c], "probability": float(p)}
                            for p, c in zip(top.values[i].tolist(), top.indices[i].tolist())
                        ],
                    }
                )
    return results


def read_input(path: Path, predictor: Predictor) -> Samples:
    """Read one input file as the model's input kind; every problem is a UserError naming it."""
    path = Path(path)
    suffix = path.suffix.lower()
    expected = expected_inputs(predictor)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise UserError(f"input {path}: {what}. Expected {expected}.")
    if suffix == ".npy":
        return _read_npy(path, predictor, expected)
    if predictor.kind == "image" and suffix in IMAGE_EXTENSIONS:
        return Samples([str(path)], read_image(path, predictor, expected)[None])
    if predictor.kind == "tabular" and suffix == ".csv":
        return _read_csv(path, predictor, expected)
    # Text models would read .txt files here (tokenised with the checkpoint's vocabulary).
    if suffix in IMAGE_EXTENSIONS or suffix == ".csv":
        kind = "an image" if suffix in IMAGE_EXTENSIONS else "a table"
        problem = f"is {kind}, but this model takes {_kind_words(predictor)}"
    else:
        problem = f"has an unsupported file type ('{path.suffix or 'no extension'}')"
    raise UserError(f"input {path} {problem}. Expected {expected}.")


def expected_inputs(predictor: Predictor) -> str:
    """What this model accepts, for error messages."""
    shape = list(predictor.input_shape)
    if predictor.kind == "image":
        images = "/".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        files = f"an image file ({images}) or " if shape[0] in (1, 3) else ""
        return f"{files}a .npy array of shape {shape} (or [N, {', '.join(map(str, shape))}])"
    return (
        f"a .csv table with a header and {shape[0]} feature columns, or a .npy array of shape "
        f"{shape} (or [N, {shape[0]}])"
    )


def read_image(path: Path, predictor: Predictor, expected: str | None = None) -> torch.Tensor:
    """Decode an image file to C×H×W uint8 at the model's input size (as training did)."""
    channels, height, width = predictor.input_shape
    if channels not in (1, 3):
        raise UserError(
            f"input {path}: this model takes {channels}-channel images, which image files cannot "
            f"hold. Expected {expected or expected_inputs(predictor)}."
        )
    try:
        pixels = decode_image(path, (height, width), grayscale=channels == 1)
    except _DECODE_ERRORS as exc:
        raise UserError(
            f"input {path}: cannot decode the image ({str(exc) or type(exc).__name__}). "
            f"Expected {expected or expected_inputs(predictor)}."
        ) from None
    return torch.from_numpy(np.ascontiguousarray(pixels))


def _kind_words(predictor: Predictor) -> str:
    shape = list(predictor.input_shape)
    if predictor.kind == "image":
        return f"images of shape {shape}"
    return f"tabular rows of {shape[0]} features"


def _read_npy(path: Path, predictor: Predictor, expected: str) -> Samples:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(
            f"input {path}: cannot read it as a .npy array ({str(exc).splitlines()[0]}). "
            f"Expected {expected}."
        ) from None
    shape = predictor.input_shape
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        dtype = getattr(array, "dtype", type(array).__name__)
        raise UserError(f"input {path} holds {dtype} values, not numbers. Expected {expected}.")
    if array.shape == shape:
        array, names = array[None], [str(path)]
    elif array.ndim == len(shape) + 1 and array.shape[1:] == shape and len(array):
        names = [f"{path}[{i}]" for i in range(len(array))]
    else:
        raise UserError(
            f"input {path} holds an array of shape {list(array.shape)}. Expected {expected}."
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise UserError(f"input {path} contains NaN or infinite values. Expected {expected}.")
    if predictor.kind == "image" and array.dtype.kind in "biu":
        # The npz dataset's rule: integer images are uint8 pixels, scaled by 1/255 in training.
        if array.min() < 0 or array.max() > 255:
            raise UserError(
                f"input {path} holds {array.dtype} values {array.min()}..{array.max()}; image "
                "arrays must be uint8 0..255 or floats already scaled to [0, 1]."
            )
        return Samples(names, torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8)))
    return Samples(names, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))


def _read_csv(path: Path, predictor: Predictor, expected: str) -> Samples:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csvlib.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (UnicodeDecodeError, csvlib.Error) as exc:
        raise UserError(
            f"input {path}: cannot parse it as UTF-8 CSV ({exc}). Expected {expected}."
        ) from None
    if not header or not rows:
        missing = "header" if not header else "data rows"
        raise UserError(f"input {path} has no {missing}. Expected {expected}.")
    columns = _feature_columns(path, header, predictor, expected)
    values = np.empty((len(rows), len(columns)), dtype=np.float32)
    for i, (line, row) in enumerate(rows):
        if len(row) != len(header):
            raise UserError(
                f"input {path} line {line} has {len(row)} values but the header has "
                f"{len(header)} columns. Fix that row."
            )
        for j, column in enumerate(columns):
            try:
                values[i, j] = float(row[column])
            except ValueError:
                values[i, j] = np.nan
            if not np.isfinite(values[i, j]):
                raise UserError(
                    f"input {path} line {line}: column '{header[column]}' holds "
                    f"{row[column].strip()!r}, not a finite number. Feature values must be numbers."
                ) from None
    return Samples([f"{path}[{i}]" for i in range(len(rows))], torch.from_numpy(values))


def _feature_columns(path: Path, header: list[str], predictor: Predictor, expected: str):
    """Indices of the feature columns, in the order the model was trained on."""
    data = predictor.recipe.get("data") or {}
    features = data.get("features")
    if features:  # trained on named columns of a CSV: pick them by name
        missing = [name for name in features if name not in header]
        if missing:
            raise UserError(
                f"input {path} has no column {', '.join(map(repr, missing))}; the model was "
                f"trained on the columns {', '.join(features)}. Columns found: "
                f"{', '.join(header)}."
            )
        return [header.index(name) for name in features]
    ignored = {"label", data.get("label") if data.get("name") == "csv" else "label"}
    columns = [i for i, name in enumerate(header) if name not in ignored]
    want = predictor.input_shape[0]
    if len(columns) != want:
        names = ", ".join(header[i] for i in columns)
        raise UserError(
            f"input {path} has {len(columns)} feature columns ({names}) but the model takes "
            f"{want}. Expected {expected}."
        )
    return columns
