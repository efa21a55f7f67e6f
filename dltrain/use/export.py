"""`dltrain export`: a checkpoint's model as TorchScript or ONNX, for use without dltrain.

The exported graph is the model alone: it maps a *preprocessed* batch to its output — logits
for classifiers (softmax over dim 1 gives probabilities), N × 1 values for regression.
Preprocessing is not baked in, so that the same file serves callers who already hold prepared
data; what it is travels with the file as metadata (TorchScript: the extra file `dltrain.json`;
ONNX: metadata_props, `dltrain.json` holding all of it plus one entry per key):

    x = uint8 / 255                       (images stored as uint8)
    x = (x - mean) / std                  per channel (images) or feature (tabular, steps)

Tables from csv files are first encoded column by column (imputation, one-hot categories,
missing indicators): the metadata's `table` holds that encoding and `feature_names` the
resulting features, so rows can be encoded without dltrain (dltrain.data.table_encoding).
Regression models answer in the target's units (the target scaling is inside the graph).

Text models take int64 token ids (N × max_length, 0 = <pad> at the end): the metadata holds the
vocabulary, the tokenizer and max_length to encode texts with (as dltrain.data.text does).
Images read row by row (data.as_sequence: rows) are exported with the row split inside the
graph, so they take normalised N×C×H×W images like any image model.

Also in the metadata: the class names, the input shape, the task, the recipe's model section
and the dltrain version. Before a file is written, its outputs are compared with the PyTorch
model's on a fresh batch (ONNX: when onnxruntime is installed); a mismatch writes nothing.
Files are written atomically (a temp file in the same folder, then a rename).

Not exported (UserError, exit 2): seq2seq models, which decode step by step (dltrain predict
runs them); and to ONNX, recurrent models (rnn, lstm, gru) over token ids, which pack each
sequence to its length — TorchScript exports them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dltrain import __version__
from dltrain.data.table_encoding import TableEncoding
from dltrain.errors import RunFailure, UserError, first_line
from dltrain.runs.lock import holding_enclosing_run
from dltrain.runs.outputs import refuse_replacing_run_files
from dltrain.system.atomic import atomic_write
from dltrain.use.inference import Predictor, load_for_inference

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
PREPROCESSING = "x = uint8/255 (images); (x - mean) / std per channel/feature"
TOKEN_ENCODING = (
    "none on the ids; to encode a text: lower-case it if tokenizer.lower, split it into tokens "
    "(tokenizer.kind 'word': the regex \\w+|[^\\w\\s]; 'char': each character), map each "
    "token to its index in vocab (unknown: 1 = <unk>; a text without tokens: [1]), cut to "
    "max_length and pad with 0 at the end"
)
TABLE_ENCODING = (
    "each column of table.columns in order becomes features (feature_names): numeric: the "
    "value, an empty cell replaced by fill; categorical: one-hot over ['<unknown>', "
    "*categories] (a value not in categories is '<unknown>'; an empty cell is fill); a column "
    "with indicator true adds 1.0 for an empty cell, else 0.0. Then (x - mean) / std per "
    "feature (mean 0 and std 1 leave one-hot and indicator features as they are)"
)
ONNX_INSTALL = "pip install onnx onnxscript"


def default_output(checkpoint: Path, fmt: str) -> Path:
    """Beside the checkpoint, named after it: best.pt → best.onnx / best.torchscript.pt."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])


def export_checkpoint(
    checkpoint: Path,
    fmt: str,
    output: Path | None = None,
    imports: list[str] = (),
    force: bool = False,
) -> tuple[Path, Predictor]:
    """Export a checkpoint's model; returns where it was written and the loaded predictor.

    The user's own components come from `imports`, never from the checkpoint; an output that
    is a checkpoint or a run's own file is refused unless `force`.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; use one of: {', '.join(FORMATS)}.")
    if fmt == "onnx":
        check_onnx_available()  # before loading anything: the fix is an install
    output = Path(output) if output is not None else default_output(checkpoint, fmt)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name, e.g. {output / 'm'}.")
    refuse_replacing_run_files(output, force, source=checkpoint)
    predictor = load_for_inference(checkpoint, imports=imports)
    check_exportable(predictor, fmt)
    with holding_enclosing_run(output, "exporting"):
        (export_torchscript if fmt == "torchscript" else export_onnx)(predictor, output)
    return output, predictor


def check_exportable(predictor: Predictor, fmt: str) -> None:
    """UserError, naming the model and the reason, for what cannot be exported faithfully."""
    name = _model_name(predictor)
    if predictor.task == "seq2seq":
        raise UserError(
            f"export supports single-pass models; model '{name}' is a seq2seq model, which "
            "decodes step by step (one decoder pass per output token, each fed the tokens "
            "before it) — use the checkpoint with dltrain predict."
        )
    if fmt == "onnx" and predictor.kind == "tokens" and _packs_sequences(predictor.model):
        raise UserError(
            f"model '{name}' cannot be exported to ONNX: over token ids it packs each sequence "
            "to its own length (pack_padded_sequence, so that padding never changes a "
            "prediction), which the ONNX exporters cannot capture faithfully. Use --format "
            "torchscript (checked to match PyTorch)."
        )


def _packs_sequences(model: nn.Module) -> bool:
    from dltrain.models.rnn import RecurrentNet

    return any(isinstance(m, RecurrentNet) and m.embedding is not None for m in model.modules())


def _model_name(predictor: Predictor) -> str:
    section = predictor.recipe.get("model")
    return section.get("name", "?") if isinstance(section, dict) else "?"


class RowsAsSequence(nn.Module):
    """Normalised images N×C×H×W → one step per row, N×H×(C·W) → the sequence model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 2, 1, 3).flatten(2))


def exported_module(predictor: Predictor) -> nn.Module:
    """What goes into the file: the model, behind the row split for images read as rows."""
    model = predictor.model
    return RowsAsSequence(model).eval() if predictor.as_sequence == "rows" else model


def metadata(predictor: Predictor) -> dict[str, Any]:
    """What a user of the exported file needs to feed it and read its output."""
    meta = predictor.meta
    info = {
        "classes": list(meta["classes"]),
        "input_shape": list(meta["input_shape"]),
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "kind": meta["kind"],
        "task": predictor.task,
        "model": predictor.recipe.get("model"),
        "dltrain_version": __version__,
        "input": _input_words(predictor),
        "preprocessing": _preprocessing(predictor),
        "output": _output_words(predictor),
    }
    if predictor.as_sequence:
        info["as_sequence"] = predictor.as_sequence
    if predictor.kind == "tokens":
        keys = ("vocab", "tokenizer", "max_length", "text_column")
        info.update({key: meta[key] for key in keys if key in meta})
    if "table" in meta:
        info["table"] = meta["table"]
        info["feature_names"] = TableEncoding.from_dict(meta["table"]).feature_names()
    return info


def _input_words(predictor: Predictor) -> str:
    shape = ", ".join(["N", *map(str, predictor.input_shape)])
    if predictor.kind == "tokens":
        return (
            f"int64 [{shape}] token ids (0 = <pad>, at the end; 1 = <unk>), encoded with the "
            "tokenizer and vocab in this metadata"
        )
    what = {"image": "images", "tabular": "feature rows", "sequence": "sequences (steps)"}
    return f"float32 [{shape}] {what.get(predictor.kind, 'inputs')}, preprocessed"


def _preprocessing(predictor: Predictor) -> str:
    if predictor.kind == "tokens":
        return TOKEN_ENCODING
    if predictor.kind == "sequence":
        return "x = (x - mean) / std per feature (the last axis)"
    if predictor.as_sequence == "rows":
        return PREPROCESSING + " (the graph then reads the image row by row itself)"
    if "table" in predictor.meta:
        return TABLE_ENCODING
    return PREPROCESSING


def _output_words(predictor: Predictor) -> str:
    if predictor.task == "regression":
        target = predictor.classes[0] if predictor.classes else "value"
        return f"N × 1: the predicted {target}"
    return "logits (N × classes); softmax over dim 1 gives class probabilities"


def summary(predictor: Predictor) -> str:
    """What the exported file takes and gives, in one line (for the command's output)."""
    shape = ", ".join(["N", *map(str, predictor.input_shape)])
    if predictor.kind == "tokens":
        given = f"input int64 token ids [{shape}] (encode texts with the vocab and tokenizer in"
    else:
        given = f"input float32 [{shape}] (scaled and normalised: see"
    if predictor.task == "regression":
        target = predictor.classes[0] if predictor.classes else "value"
        output = f"output the predicted {target} [N, 1]"
    else:
        output = f"output logits over {len(predictor.classes)} classes"
    return f"{given} its dltrain.json metadata) · {output}"


def example_input(predictor: Predictor, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A preprocessed-looking batch to trace with (batch 2: ONNX keeps N dynamic): random
    floats, or for token input random ids with the later rows padded at the end."""
    generator = torch.Generator().manual_seed(seed)
    if predictor.kind == "tokens":
        length = predictor.input_shape[0]
        size = max(len(predictor.meta.get("vocab") or ()), 2)
        x = torch.randint(1, size, (batch, length), generator=generator)
        for row in range(1, batch):  # lengths length, length/2, length/3, ... (at least 1)
            x[row, max(1, length // (row + 1)) :] = 0
    else:
        x = torch.randn(batch, *predictor.input_shape, generator=generator)
    return x.to(predictor.device)


def _check_same(predictor: Predictor, fmt: str, run: Callable[[torch.Tensor], Any]) -> None:
    """Refuse (write nothing) when the exported model's outputs differ from PyTorch's on a
    fresh batch of another size (and, for token input, other lengths) than the traced one."""
    x = example_input(predictor, batch=3, seed=1)
    with torch.no_grad():
        expected = exported_module(predictor)(x).float().cpu()
    got = torch.as_tensor(run(x)).float().cpu()
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):
        difference = (
            f"largest difference {(got - expected).abs().max().item():.3g}"
            if got.shape == expected.shape
            else f"output shape {list(got.shape)} instead of {list(expected.shape)}"
        )
        raise RunFailure(
            f"the {fmt} export of model '{_model_name(predictor)}' does not reproduce the "
            f"PyTorch model ({difference}); nothing was written. Try the other --format."
        )


def export_torchscript(predictor: Predictor, output: Path) -> None:
    """Trace the model (eval mode), check it, and save it with dltrain.json as an extra file."""
    with _quiet():
        traced = torch.jit.trace(exported_module(predictor), example_input(predictor))
        _check_same(predictor, "torchscript", traced)
    extra = {"dltrain.json": json.dumps(metadata(predictor), indent=2)}
    # torch.jit.save warns that TorchScript is deprecated (in favour of torch.export): true, and
    # said once in the README; the file still loads with torch.jit.load anywhere.
    with _quiet():
        atomic_write(output, lambda f: torch.jit.save(traced, f, _extra_files=extra))


def check_onnx_available() -> None:
    """UserError with the install command when the ONNX exporter's packages are missing."""
    if not _installed("onnx"):
        raise UserError(
            "ONNX export needs the onnx and onnxscript packages, which are not installed: "
            f"{ONNX_INSTALL} (or pip install 'dltrain[onnx]'). --format torchscript needs "
            "nothing extra."
        )


def export_onnx(predictor: Predictor, output: Path) -> None:
    """torch.onnx.export with a dynamic batch axis, then the metadata as metadata_props.

    The current exporter (torch.export based) needs onnxscript; without it, or when it cannot
    handle the model, the older TorchScript-based exporter is used.
    """
    check_onnx_available()
    import onnx

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".export", dir=output.parent)
    os.close(fd)
    try:
        _onnx_to_file(predictor, tmp)
        proto = onnx.load(tmp)
    finally:
        for leftover in (tmp, tmp + ".data"):  # .data: weights an exporter put beside the file
            with contextlib.suppress(OSError):
                os.remove(leftover)
    if _installed("onnxruntime"):
        _check_same(predictor, "onnx", _onnx_runner(proto.SerializeToString()))
    info = metadata(predictor)
    entries = {"dltrain.json": json.dumps(info)}
    entries.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    atomic_write(output, lambda f: f.write(proto.SerializeToString()))


def _onnx_runner(model: bytes) -> Callable[[torch.Tensor], Any]:
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x.cpu().numpy()})[0]


def _onnx_to_file(predictor: Predictor, path: str) -> None:
    model, x = exported_module(predictor), example_input(predictor)
    dynamo = {
        "dynamo": True,
        "external_data": False,  # one self-contained file
        "dynamic_shapes": ({0: torch.export.Dim("batch")},),
        "verbose": False,
    }
    traced = {"dynamo": False, "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}
    # torch.export's exporter (it needs onnxscript) first; the TorchScript tracer's if it fails
    exporters = [("torch.export-based exporter", dynamo)] if _installed("onnxscript") else []
    exporters.append(("TorchScript-based exporter", traced))
    failures = []
    for name, options in exporters:
        try:
            with _quiet():
                torch.onnx.export(
                    model, (x,), path, input_names=["input"], output_names=["logits"], **options
                )
            return
        except Exception as exc:  # the model uses something the exporter cannot capture
            failures.append(f"{name}: {first_line(exc, with_type=True)}")
            error = exc
    raise RunFailure(
        f"cannot export this model to ONNX ({'; '.join(failures)}). Try --format torchscript."
    ) from error


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the tracers' and exporters' own warnings and progress prints.

    They speak to PyTorch developers (tracer caveats, exporter deprecations); the result is
    checked by dltrain's tests against the PyTorch model instead.
    """
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        torch.no_grad(),
        _loggers_quiet("onnxscript", "torch.onnx"),  # e.g. onnxscript's constant folding
    ):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _loggers_quiet(*names: str) -> Iterator[None]:
    """Only errors from these loggers while the block runs (their levels put back after)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: blocked (sys.modules entry set to None)
        return False
