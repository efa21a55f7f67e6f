"""`dltrain export`: a checkpoint's model as TorchScript or ONNX, for use without dltrain.

The exported graph is the model alone: it maps a *preprocessed* float32 batch to logits
(softmax over dim 1 gives probabilities). Preprocessing is not baked in, so that the same file
serves callers who already hold scaled data; what it is travels with the file as metadata
(TorchScript: the extra file `dltrain.json`; ONNX: metadata_props, `dltrain.json` holding all of
it plus one entry per key):

    x = uint8 / 255                       (images stored as uint8)
    x = (x - mean) / std                  per channel (images) or per feature (tabular)

plus the class names, the input shape, the recipe's model section and the dltrain version.
Files are written atomically (a temp file in the same folder, then a rename).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dltrain import __version__
from dltrain.atomic import atomic_write
from dltrain.errors import RunFailure, UserError
from dltrain.inference import Predictor, load_for_inference

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
PREPROCESSING = "x = uint8/255 (images); (x - mean) / std per channel/feature"
ONNX_INSTALL = "pip install onnx onnxscript"


def default_output(checkpoint: Path, fmt: str) -> Path:
    """Beside the checkpoint, named after it: best.pt → best.onnx / best.torchscript.pt."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])


def export_checkpoint(
    checkpoint: Path, fmt: str, output: Path | None = None
) -> tuple[Path, Predictor]:
    """Export a checkpoint's model; returns where it was written and the loaded predictor."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; use one of: {', '.join(FORMATS)}.")
    if fmt == "onnx":
        check_onnx_available()  # before loading anything: the fix is an install
    predictor = load_for_inference(checkpoint)
    output = Path(output) if output is not None else default_output(checkpoint, fmt)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name, e.g. {output / 'm'}.")
    (export_torchscript if fmt == "torchscript" else export_onnx)(predictor, output)
    return output, predictor


def metadata(predictor: Predictor) -> dict[str, Any]:
    """What a user of the exported file needs to feed it and read its output."""
    meta = predictor.meta
    return {
        "classes": list(meta["classes"]),
        "input_shape": list(meta["input_shape"]),
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "kind": meta["kind"],
        "model": predictor.recipe.get("model"),
        "dltrain_version": __version__,
        "preprocessing": PREPROCESSING,
        "output": "logits (N × classes); softmax over dim 1 gives class probabilities",
    }


def example_input(predictor: Predictor, batch: int = 2) -> torch.Tensor:
    """A preprocessed-looking float batch to trace with (batch 2: ONNX keeps N dynamic)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *predictor.input_shape, generator=generator)
    return x.to(predictor.device)


def export_torchscript(predictor: Predictor, output: Path) -> None:
    """Trace the model (eval mode) and save it with dltrain.json as an extra file."""
    with _quiet():
        traced = torch.jit.trace(predictor.model, example_input(predictor))
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
    info = metadata(predictor)
    entries = {"dltrain.json": json.dumps(info)}
    entries.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    atomic_write(output, lambda f: f.write(proto.SerializeToString()))


def _onnx_to_file(predictor: Predictor, path: str) -> None:
    model, x = predictor.model, example_input(predictor)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    failures = []
    if _installed("onnxscript"):
        try:
            with _quiet():
                torch.onnx.export(
                    model,
                    (x,),
                    path,
                    dynamo=True,
                    external_data=False,  # one self-contained file
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    verbose=False,
                    **names,
                )
            return
        except Exception as exc:  # the model uses something torch.export cannot capture
            failures.append(f"torch.export-based exporter: {_first_line(exc)}")
    try:
        with _quiet():
            torch.onnx.export(
                model,
                (x,),
                path,
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                **names,
            )
    except Exception as exc:
        failures.append(f"TorchScript-based exporter: {_first_line(exc)}")
        raise RunFailure(
            f"cannot export this model to ONNX ({'; '.join(failures)}). Try --format torchscript."
        ) from exc


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
    ):
        warnings.simplefilter("ignore")
        yield


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: blocked (sys.modules entry set to None)
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
