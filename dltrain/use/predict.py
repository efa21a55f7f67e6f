"""`dltrain predict`: predictions for files and texts, read the way the model's training data was.

What an input may be depends on the checkpoint's input kind:

- image models (also those that read images row by row, data.as_sequence: rows): image files
  (png, jpg, jpeg, bmp, gif, webp) of any size, decoded with PIL, converted to the model's
  channel count (1 → grayscale 'L', 3 → 'RGB') and resized to its H×W with bilinear
  resampling, as uint8 — exactly as `image_folder` decodes training images; or `.npy` arrays of
  one sample (C×H×W) or a batch (N×C×H×W);
- tabular models: `.csv` tables with a header row, one sample per row, encoded as the training
  table was (`dltrain.data.table_encoding`, from the checkpoint alone: the feature columns
  picked by name, empty cells imputed, categories one-hot, unseen ones as `<unknown>`; other
  columns, such as the label, are ignored); models trained on arrays take the columns other
  than `label`; or `.npy` arrays of already encoded rows (F) or a batch (N×F);
- float sequence models (e.g. the adding problem): `.npy` arrays of one sequence (T×F) or a
  batch (N×T×F);
- text models (token input): texts given on the command line (`--text`, repeatable), `.txt`
  files (one text per line; blank lines are skipped) or `.csv` tables with a header (the text
  column the model was trained on, data.text_column, default `text`). Texts are tokenised and
  encoded with the vocabulary stored in the checkpoint (`dltrain.data.text.encode_texts`):
  unknown tokens become <unk>, and texts are cut or padded to the training length. `.npy`
  arrays of token ids (L or N×L integers) are taken as already encoded.

`.npy` arrays follow the `npz` dataset's rule: uint8 (and integers within 0..255 for images)
are pixels, scaled by 1/255 as in training; float arrays are taken as they are (already scaled
to [0, 1] for images, raw values otherwise). Either way the checkpoint's normalisation is then
applied.

What comes out depends on the task: classification gives the top classes with probabilities,
regression the predicted value, seq2seq the greedily decoded target sequence (as a string: the
target tokens up to <eos>, joined without spaces for character tokens, with spaces for words).
A seq2seq source longer than the model's source length is refused (cutting it would change the
answer), and tokens outside the source vocabulary are warned about.
"""

from __future__ import annotations

import csv as csvlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dltrain.data.csv_files import reader as csv_reader
from dltrain.data.csv_files import sniff
from dltrain.data.images import IMAGE_EXTENSIONS, decode_image
from dltrain.data.npy_headers import check_npy_file
from dltrain.data.table_encoding import TableEncoding, cell_notes
from dltrain.data.text import PAD_ID, Vocabulary, encode_texts
from dltrain.errors import UserError
from dltrain.system.threads import ThreadChoice, choose_threads
from dltrain.use.inference import Predictor

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
    """The samples read from one input, each with the name it is reported under."""

    names: list[str]
    x: torch.Tensor  # N × input_shape: uint8 pixels, float32 values or int64 token ids
    texts: list[str] | None = None  # text models: the raw texts, reported with the predictions


def default_top_k(num_classes: int) -> int:
    """How many classes to show when --top-k is not given."""
    return min(5, num_classes)


def predict_files(
    predictor: Predictor,
    paths: list[Path],
    top_k: int | None = None,
    texts: list[str] = (),
    threads: str | int = "auto",
) -> tuple[list[dict[str, Any]], ThreadChoice]:
    """One result per sample: the files' samples first, then the `texts` (text models); and the
    CPU thread count used (`threads`: auto times a batch at 1 and at every usable core when
    there are enough batches to repay it, as fit does).

    classification: {"input", "predictions": [{"class", "probability"}, ...]}, best first;
    regression: {"input", "prediction": value}; seq2seq: {"input", "output": decoded string}.
    Samples read from text also carry {"text": the raw text}.

    Every input is read before any prediction, so a bad one fails before anything is printed.
    """
    if top_k is not None and predictor.task != "classification":
        raise UserError(
            f"--top-k: this is a {predictor.task} model; it predicts "
            f"{'one value' if predictor.task == 'regression' else 'a sequence'} per input, not "
            "classes. Leave --top-k out."
        )
    read = [read_input(path, predictor) for path in paths]
    if texts:
        read.append(read_texts(list(texts), predictor))
    if not read:
        texts_too = " and no --text" if predictor.kind == "tokens" else ""
        raise UserError(
            f"nothing to predict: no input files{texts_too}. Expected {expected_inputs(predictor)}."
        )
    batches = sum(math.ceil(len(samples.names) / BATCH_SIZE) for samples in read)
    first = read[0].x[:BATCH_SIZE]
    probe = lambda: lambda: _predict_batch(predictor, first, top_k)  # noqa: E731
    choice = choose_threads(threads, predictor.device, probe, work_steps=batches)
    results = []
    for samples in read:
        for start in range(0, len(samples.names), BATCH_SIZE):
            part = slice(start, start + BATCH_SIZE)
            outputs = _predict_batch(predictor, samples.x[part], top_k)
            texts_part = samples.texts[part] if samples.texts is not None else None
            for i, (name, output) in enumerate(zip(samples.names[part], outputs)):
                result: dict[str, Any] = {"input": name}
                if texts_part is not None:
                    result["text"] = texts_part[i]
                results.append({**result, **output})
    return results, choice


def _predict_batch(
    predictor: Predictor, x: torch.Tensor, top_k: int | None
) -> list[dict[str, Any]]:
    """The task's output for each sample of a raw batch."""
    if predictor.task == "regression":
        return [{"prediction": float(v)} for v in predictor.predict_values(x).tolist()]
    if predictor.task == "seq2seq":
        return [{"output": decode_target(ids, predictor)} for ids in predictor.generate(x).tolist()]
    classes = predictor.classes
    k = min(top_k or default_top_k(len(classes)), len(classes))
    top = predictor.predict_proba(x).topk(k, dim=1)
    return [
        {
            "predictions": [
                {"class": classes[c], "probability": float(p)}
                for p, c in zip(values.tolist(), indices.tolist())
            ]
        }
        for values, indices in zip(top.values, top.indices)
    ]


def decode_target(ids: list[int], predictor: Predictor) -> str:
    """Generated target ids as a string: the target vocabulary's tokens up to <eos>, without
    <pad> and <bos>; joined without spaces for character tokens, with spaces for words."""
    meta = predictor.meta
    bos, eos = meta.get("bos_id", 1), meta.get("eos_id", 2)
    vocabulary = predictor.classes
    tokens = []
    for i in ids:
        if i == eos:
            break
        if i not in (PAD_ID, bos) and 0 <= i < len(vocabulary):
            tokens.append(vocabulary[i])
    chars = (meta.get("tokenizer") or {}).get("kind") == "char"
    return ("" if chars else " ").join(tokens)


def read_texts(texts: list[str], predictor: Predictor, names: list[str] | None = None) -> Samples:
    """Texts (from --text, or a file's lines or rows named by `names`) encoded for the model."""
    where = names or texts
    if predictor.kind != "tokens":
        first = f"input {where[0]}" if names else "--text"
        raise UserError(
            f"{first}: this model takes {_kind_words(predictor)}, not texts. "
            f"Expected {expected_inputs(predictor)}."
        )
    if predictor.task == "seq2seq":
        _check_sources(texts, where, predictor)
    return Samples(list(where), encode_texts(texts, predictor.meta), list(texts))


def _check_sources(texts: list[str], names: list[str], predictor: Predictor) -> None:
    """Seq2seq sources must fit the model: cutting one would change the answer (refused);
    tokens it never saw are read as <unk> (warned about)."""
    meta = predictor.meta
    if not all(key in meta for key in ("vocab", "tokenizer", "max_length")):
        return  # encode_texts says what is missing
    vocab = Vocabulary.from_dict(meta)
    length = int(meta["max_length"])
    for text, name in zip(texts, names):
        tokens = vocab.tokenizer.tokenize(text)
        if len(tokens) > length:
            raise UserError(
                f"input {name!r} has {len(tokens)} tokens, but this model reads sources of at "
                f"most {length} (its training length). Shorten it or split it."
            )
        unknown = sorted({t for t in tokens if t not in vocab.index})
        if unknown:
            warnings.warn(
                f"input {name!r}: {', '.join(map(repr, unknown))} not in the model's source "
                "vocabulary; read as <unk>.",
                stacklevel=2,
            )


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
    if predictor.kind == "tokens" and suffix in (".txt", ".csv"):
        read = _read_text_lines if suffix == ".txt" else _read_text_column
        names, texts = read(path, predictor, expected)
        return read_texts(texts, predictor, names)
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
    if predictor.kind == "tokens":
        ids = f"a .npy array of token ids of shape {shape} (or [N, {shape[0]}])"
        if "vocab" not in predictor.meta:
            return ids
        column = predictor.meta.get("text_column", "text")
        return (
            f"a text given with --text, a .txt file (one text per line), a .csv table with a "
            f"'{column}' column, or {ids}"
        )
    if predictor.kind == "sequence":
        return f"a .npy array of shape {shape} (or [N, {', '.join(map(str, shape))}])"
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
    if predictor.kind == "tokens":
        return "texts (token ids)" if "vocab" in predictor.meta else "token ids"
    if predictor.kind == "sequence":
        return f"float sequences of shape {shape} (steps × features)"
    return f"tabular rows of {shape[0]} features"


def _read_npy(path: Path, predictor: Predictor, expected: str) -> Samples:
    try:
        check_npy_file(path)  # before numpy allocates what the header declares
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
    if predictor.kind == "tokens":
        return Samples(names, _token_ids(path, array, predictor, expected))
    if predictor.kind == "image" and array.dtype.kind in "biu":
        # The npz dataset's rule: integer images are uint8 pixels, scaled by 1/255 in training.
        if array.min() < 0 or array.max() > 255:
            raise UserError(
                f"input {path} holds {array.dtype} values {array.min()}..{array.max()}; image "
                "arrays must be uint8 0..255 or floats already scaled to [0, 1]."
            )
        return Samples(names, torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8)))
    return Samples(names, torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))


def _token_ids(path: Path, array: np.ndarray, predictor: Predictor, expected: str) -> torch.Tensor:
    """An integer array as int64 token ids, each within the model's vocabulary."""
    if array.dtype.kind not in "iu":
        raise UserError(
            f"input {path} holds {array.dtype} values; token ids are integers. Expected {expected}."
        )
    size = len(predictor.meta["vocab"]) if "vocab" in predictor.meta else None
    low, high = int(array.min()), int(array.max())
    if low < 0 or (size is not None and high >= size):
        within = f"0..{size - 1}" if size is not None else ">= 0"
        raise UserError(
            f"input {path} holds token ids {low}..{high}; this model's ids are {within} "
            "(0 = <pad>, at the end)."
        )
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))


def _read_text_file(path: Path, expected: str) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"input {path} is not valid UTF-8 (byte offset {exc.start}). Re-save it as UTF-8. "
            f"Expected {expected}."
        ) from None
    except OSError as exc:
        raise UserError(f"input {path}: cannot read it ({exc.strerror or exc}).") from None


def _read_text_lines(
    path: Path, predictor: Predictor, expected: str
) -> tuple[list[str], list[str]]:
    """A .txt file: one text per line, blank lines skipped; samples named file.txt[i]."""
    texts = [line for line in _read_text_file(path, expected).splitlines() if line.strip()]
    if not texts:
        raise UserError(f"input {path} holds no text (one text per line). Expected {expected}.")
    return [f"{path}[{i}]" for i in range(len(texts))], texts


def _read_text_column(
    path: Path, predictor: Predictor, expected: str
) -> tuple[list[str], list[str]]:
    """A .csv table: the text column the model was trained on (other columns are ignored)."""
    column = predictor.meta.get("text_column", "text")
    text = _read_text_file(path, expected)
    reader = csv_reader(text, sniff(text, decimal="."))
    try:
        header = [name.strip() for name in next(reader, [])]
        rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except csvlib.Error as exc:
        raise UserError(
            f"input {path}: cannot parse it as CSV ({exc}). Expected {expected}."
        ) from None
    if column not in header:
        found = ", ".join(header) if any(header) else "none"
        raise UserError(
            f"input {path} has no '{column}' column (the text column the model was trained "
            f"on). Columns found: {found}."
        )
    if not rows:
        raise UserError(f"input {path} has no data rows. Expected {expected}.")
    at = header.index(column)
    for line, row in rows:
        if len(row) != len(header):
            raise UserError(
                f"input {path} line {line} has {len(row)} values but the header has "
                f"{len(header)} columns. Quote texts that contain commas, or fix that row."
            )
    return [f"{path}[{i}]" for i in range(len(rows))], [row[at] for _, row in rows]


def _read_csv(path: Path, predictor: Predictor, expected: str) -> Samples:
    """A table's rows encoded as in training: the checkpoint's table encoding (imputation,
    categories, indicators) picks its columns by name; other columns are ignored."""
    text = _read_text_file(path, expected)
    dialect = sniff(text)  # the input's own: a spreadsheet's export may differ from training's
    try:
        reader = csv_reader(text, dialect)
        header = [name.strip() for name in next(reader, [])]
        rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except csvlib.Error as exc:
        raise UserError(
            f"input {path}: cannot parse it as CSV ({exc}). Expected {expected}."
        ) from None
    if not header or not rows:
        missing = "header" if not header else "data rows"
        raise UserError(f"input {path} has no {missing}. Expected {expected}.")
    encoding = _table_encoding(path, header, predictor, expected)
    columns = [header.index(name) for name in encoding.names]
    for line, row in rows:
        if len(row) != len(header):
            raise UserError(
                f"input {path} line {line} has {len(row)} values but the header has "
                f"{len(header)} columns (read as {dialect.describe()}). Fix that row."
            )
    cells = [[row[c] for c in columns] for _, row in rows]
    where = [f"input {path} line {line}" for line, _ in rows]
    values = encoding.encode_cells(cells, where, dialect)
    noted = cell_notes(encoding, cells) if "table" in predictor.meta else None
    if noted:
        warnings.warn(f"input {path}: {noted}", stacklevel=2)
    return Samples([f"{path}[{i}]" for i in range(len(rows))], torch.from_numpy(values))


def _table_encoding(
    path: Path, header: list[str], predictor: Predictor, expected: str
) -> TableEncoding:
    """The checkpoint's table encoding; for a model trained on numeric arrays (or by an
    older dltrain), plain numeric columns: the recipe's data.features, or every column but
    the label."""
    meta, data = predictor.meta, predictor.recipe.get("data") or {}
    if "table" in meta:
        encoding = TableEncoding.from_dict(meta["table"])
        names = encoding.names
    else:
        names = data.get("features") or [
            name for name in header if name not in ("label", data.get("label", "label"))
        ]
        encoding = TableEncoding.numeric(names)
    missing = [name for name in names if name not in header]
    if missing:
        raise UserError(
            f"input {path} has no column {', '.join(map(repr, missing))}; the model was "
            f"trained on the columns {', '.join(names)}. Columns found: {', '.join(header)}."
        )
    if "table" not in meta and len(names) != predictor.input_shape[0]:
        raise UserError(
            f"input {path} has {len(names)} feature columns ({', '.join(names)}) but the model "
            f"takes {predictor.input_shape[0]}. Expected {expected}."
        )
    return encoding


# -- predictions as a file ---------------------------------------------------------------------

PREDICTION_FORMATS = (".csv", ".jsonl")


def check_predictions_path(path: Path) -> None:
    """A .csv or .jsonl file (checked before any work)."""
    if Path(path).suffix.lower() not in PREDICTION_FORMATS:
        raise UserError(
            f"--output {path}: write predictions to a .csv or .jsonl file (one row or JSON "
            "object per input)."
        )


def write_predictions(path: Path, results: list[dict[str, Any]]) -> None:
    """Write the results to `path`: .csv (one row per input; for classifiers class_1,
    probability_1, … best first) or .jsonl (one JSON object per input, as --json's)."""
    from dltrain.system.atomic import atomic_write_text

    check_predictions_path(path)
    if Path(path).suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in results)
    else:
        text = _csv_text(results)
    atomic_write_text(Path(path), text)


def _csv_text(results: list[dict[str, Any]]) -> str:
    texts = any(r.get("text") is not None for r in results)
    header = ["input"] + (["text"] if texts else [])
    ranks = max((len(r.get("predictions", ())) for r in results), default=0)
    for rank in range(1, ranks + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    value_key = next((k for k in ("prediction", "output") if results and k in results[0]), None)
    if value_key:
        header.append(value_key)
    buffer = io.StringIO()
    writer = csvlib.writer(buffer)
    writer.writerow(header)
    for r in results:
        row = [r["input"]] + ([r.get("text") or ""] if texts else [])
        for entry in r.get("predictions", ()):
            row += [entry["class"], f"{entry['probability']:.6f}"]
        row += [""] * (len(header) - len(row) - (1 if value_key else 0))
        if value_key:
            row.append(r[value_key])
        writer.writerow(row)
    return buffer.getvalue()
