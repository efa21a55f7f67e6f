"""Checkpoints: plain dicts written atomically, read back only with `weights_only=True`.

A checkpoint is data, not code: loading never unpickles arbitrary objects. It carries the resolved
recipe and the data description, so `dltrain eval` needs nothing else (nanoGPT's model_args idea).
This module owns the file: saving it atomically with a digest of its contents, loading it safely
(every load checks the digest and the required keys), what a report says of its weights, and
loading weights into a model (`load_weights`, for fit, eval and inference alike). What a
training run puts in it and takes back on resume is training/resume.py.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from dltrain import __version__
from dltrain.errors import UserError, first_line
from dltrain.system.atomic import atomic_write

FORMAT = 2  # 2: carries a digest of its contents
REQUIRED_KEYS = ("format", "recipe", "model", "data_meta", "classes")
DIGEST = "digest"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically; adds the format and version keys and the digest of the
    whole contents (tensors as CPU copies: what torch.save writes anyway)."""
    payload = {"format": FORMAT, "dltrain_version": __version__, **on_cpu(state)}
    payload[DIGEST] = contents_digest(payload)
    atomic_write(Path(path), lambda f: torch.save(payload, f), size_hint=_tensor_bytes(payload))


def contents_digest(state: dict[str, Any]) -> str:
    """SHA-256 over every tensor's dtype, shape and bytes and every other value, in order.

    torch.load does not check the zip's CRCs, so flipped bytes in tensor data would load as
    other weights; this digest is what catches them.
    """
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != DIGEST})
    return "sha256:" + digest.hexdigest()


def _tensor_bytes(value: Any) -> int:
    """About what torch.save will write: the bytes of every tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:  # int, float, str, bool, None: repr is exact (floats round-trip)
        digest.update(f"S{type(value).__name__}:{value!r};".encode())


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint safely; every way it can be unusable is a UserError (exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}. Check the path (runs/<name>/checkpoints/).")
    unreadable = (
        f"cannot read checkpoint {path}: it is truncated or not a torch checkpoint"
        "{}. Use another checkpoint, e.g. last.pt or best.pt."
    )
    # torch.save writes a zip archive; anything else (empty, truncated, random bytes) would reach
    # torch's legacy unpickler and fail with whatever error its first bytes happen to cause.
    kind = _archive_kind(path)
    if kind is None:
        raise UserError(unreadable.format(""))
    if kind == "torchscript":  # torch.load would hand it to torch.jit.load, which runs its code
        raise UserError(
            f"{path} is a TorchScript export, not a dltrain checkpoint. Use the checkpoint it "
            "was exported from (runs/<name>/checkpoints/best.pt)."
        )
    _refuse_compressed_members(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise UserError(
            f"refusing to load {path}: it contains objects other than tensors and plain data"
            f"{f' ({found.group(1)})' if found else ''}. dltrain only loads data-only checkpoints."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise UserError(unreadable.format(_reason(exc))) from None
    _check_structure(state, path)
    return _checked(state, path)


def _refuse_compressed_members(path: Path) -> None:
    """torch.save stores every member of its zip uncompressed; a compressed one can only come
    from another writer, and could inflate to any size while being read (a zip bomb)."""
    with zipfile.ZipFile(path) as archive:
        packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise UserError(
            f"{path} is damaged: its member {packed[0]} is compressed, which torch.save never "
            "does. Use another checkpoint (last.pt or best.pt)."
        )


# Bounds of a checkpoint's nested data: dltrain writes a few levels and some thousand values (a
# text model's vocabulary: tens of thousands); only a crafted file has cycles, deeper nesting,
# or shared references that multiply into more nodes than this
MAX_DEPTH = 64
MAX_NODES = 2_000_000


def _check_structure(state: Any, path: Path) -> None:
    """Walk the loaded data once, iteratively, before anything else walks it (the digest, the
    recipe's validation): a cycle, nesting deeper than MAX_DEPTH or more than MAX_NODES values
    (shared references counted each time they are reached) is "damaged", exit 2."""
    stack: list[tuple[Any, int, tuple[int, ...]]] = [(state, 0, ())]
    nodes = 0
    while stack:
        value, depth, parents = stack.pop()
        nodes += 1
        problem = (
            "nests deeper than any checkpoint dltrain writes" if depth > MAX_DEPTH
            else f"holds more than {MAX_NODES:,} values" if nodes > MAX_NODES
            else "holds a value that contains itself" if id(value) in parents
            else None
        )  # fmt: skip
        if problem:
            raise UserError(
                f"{path} is damaged: it {problem}. Use another checkpoint (last.pt or best.pt)."
            )
        if isinstance(value, dict):
            children = [*value.keys(), *value.values()]
        elif isinstance(value, list | tuple):
            children = list(value)
        else:
            continue
        inside = (*parents, id(value))
        stack.extend((child, depth + 1, inside) for child in children)


def _misfit(model: torch.nn.Module, weights: dict[str, Any]) -> str:
    """The first layer whose saved weights do not fit, with both shapes, or a key one side
    lacks ('' when nothing is named: torch's own first line is used)."""
    built = model.state_dict()
    for name, tensor in built.items():
        saved = weights.get(name)
        if saved is None:
            return f"{name} is missing from the checkpoint"
        if isinstance(saved, torch.Tensor) and saved.shape != tensor.shape:
            return (
                f"{name} is {tuple(saved.shape)} in the checkpoint but {tuple(tensor.shape)} in "
                "the model"
            )
    extra = next((name for name in weights if name not in built), None)
    return f"the checkpoint has {extra}, which the model does not" if extra else ""


def refuse_replacing_a_checkpoint(output: Path, source: Path | None, force: bool) -> None:
    """An output path that is the checkpoint being read (`source`), or another checkpoint, is
    refused (exit 2) unless --force: an export or a picture must never replace trained weights.
    (runs/outputs.py guards a run's other files too.)"""
    output = Path(output)
    if force or not output.is_file():
        return
    if source is not None and output.resolve() == Path(source).resolve():
        what = "the checkpoint being read"
    elif _archive_kind(output) == "checkpoint":
        what = "a checkpoint"
    else:
        return
    raise UserError(
        f"--output {output} is {what}; writing there would replace its weights. Choose "
        "another file, or add --force to replace it."
    )


def _archive_kind(path: Path) -> str | None:
    """'checkpoint' for a torch.save zip, 'torchscript' for a TorchScript archive (it holds
    code/), None for anything that is not a zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    return "torchscript" if any("/code/" in name for name in names) else "checkpoint"


def _reason(exc: BaseException) -> str:
    """' (torch's first line)' for a message, unless it is torch's advice to load with
    weights_only=False: dltrain never passes that on (it would let a file run code)."""
    first = first_line(exc)
    return "" if "weights_only" in first or "weights only" in first.lower() else f" ({first})"


def _checked(state: Any, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"{path} is not a dltrain checkpoint (keys {REQUIRED_KEYS} expected).")
    known = type(state["format"]) is int and state["format"] >= 1
    if not known:
        raise UserError(
            f"{path} is damaged: its checkpoint format is {state['format']!r}, which no dltrain "
            f"writes (1 to {FORMAT}). Use another checkpoint (last.pt or best.pt)."
        )
    if state["format"] > FORMAT:
        raise UserError(
            f"{path} has checkpoint format {state['format']}, newer than this dltrain reads "
            f"({FORMAT}); upgrade dltrain (it was written by {state.get('dltrain_version')})."
        )
    if state["format"] >= 2 and state.get(DIGEST) != contents_digest(state):
        what = "has no digest" if DIGEST not in state else "does not match its digest"
        raise UserError(
            f"{path} is corrupted: its contents {what} (saved with it when it was written), "
            "so its weights cannot be trusted. Use another checkpoint (last.pt or best.pt), or "
            "copy it again from where it came from."
        )
    for key, kind in _FIELD_TYPES.items():
        if key in state and not isinstance(state[key], kind):
            raise UserError(
                f"{path} is damaged: its '{key}' is a {type(state[key]).__name__}, not a "
                f"{kind.__name__}. Use another checkpoint (last.pt or best.pt)."
            )
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise UserError(f"{path} is damaged: its 'model' holds values that are not tensors.")
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:  # dltrain never saves such weights (the run stops first)
        raise UserError(
            f"{path} holds non-finite (NaN/inf) weights in {', '.join(bad[:3])}; such a model "
            "predicts nothing. Use another checkpoint (an earlier last.pt or best.pt)."
        )
    _check_data_meta(state["data_meta"], path)
    return state


def _check_data_meta(meta: dict[str, Any], path: Path) -> None:
    """What every use of a checkpoint reads from data_meta: present, and of the right kind."""
    missing = [k for k in _META_KINDS if k not in meta]
    if missing:
        raise UserError(
            f"checkpoint {path} has no {', '.join(missing)} in its data_meta, so its input cannot "
            "be prepared; it was not written by a compatible dltrain fit. Use another checkpoint."
        )
    for key, (kind, item) in _META_KINDS.items():
        value = meta[key]
        if not isinstance(value, kind) or (
            item is not None and not all(isinstance(v, item) and v is not True for v in value)
        ):
            raise UserError(
                f"checkpoint {path} is damaged: its data_meta {key} is {value!r}. Use another "
                "checkpoint."
            )
    stats_ok = all(math.isfinite(v) for v in meta["mean"] + meta["std"])
    if not stats_ok or not all(v > 0 for v in meta["std"]):
        raise UserError(
            f"checkpoint {path} is damaged: its data_meta mean/std ({meta['mean']}, "
            f"{meta['std']}) are not finite numbers with std > 0. Use another checkpoint."
        )
    width = _stat_width(meta)
    if meta["kind"] in ("image", "tabular", "sequence") and not (
        len(meta["mean"]) == len(meta["std"]) and len(meta["mean"]) in (1, width)
    ):
        raise UserError(
            f"checkpoint {path} is damaged: its data_meta mean/std have {len(meta['mean'])}/"
            f"{len(meta['std'])} values for {width} input channels or features. Use another "
            "checkpoint."
        )


def _stat_width(meta: dict[str, Any]) -> int:
    """How many mean/std values the input takes: one per image channel or feature."""
    shape = meta["input_shape"]
    if not shape:
        return 0
    return shape[0] if meta["kind"] == "image" else shape[-1]


# data_meta's keys that every use reads: (type, type of each item)
_META_KINDS = {
    "kind": (str, None),
    "classes": (list, str),
    "input_shape": (list, int),
    "mean": (list, (int, float)),
    "std": (list, (int, float)),
}

# What each field of a checkpoint must be (the optional ones are checked when present)
_FIELD_TYPES = {
    "recipe": dict,
    "model": dict,
    "data_meta": dict,
    "classes": list,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "rng": dict,
    "metrics": dict,
    "train_state": dict,
    "ema": dict,
    "epoch": int,
    "step": int,
}


def on_cpu(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def which_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a report says of the weights it evaluates: their epoch and, when they are the
    run's best, the value that chose them (`best_by`: the monitor, or train_loss when the
    run had no validation split). Empty for a checkpoint that does not say."""
    epoch, metrics = checkpoint.get("epoch"), checkpoint.get("metrics")
    if not isinstance(epoch, int) or epoch < 1:
        return {}
    metrics = metrics if isinstance(metrics, dict) else {}
    history, train = metrics.get("history"), checkpoint["recipe"].get("train")
    monitor = train.get("monitor") if isinstance(train, dict) else None
    known = isinstance(history, list) and len(history) >= epoch and isinstance(monitor, str)
    row = history[epoch - 1] if known else None
    if metrics.get("best_epoch") != epoch or not isinstance(row, dict):
        return {"epoch": epoch}
    return {"epoch": epoch, "best_by": monitor if row.get(monitor) is not None else "train_loss"}


def load_weights(
    model: torch.nn.Module,
    checkpoint: dict[str, Any],
    path: Path,
    built_from: dict[str, Any] | None = None,
) -> None:
    """Load a checkpoint's weights into `model`; weights that do not fit are a UserError.

    `built_from` is the model section the model was built from, when it may differ from the
    one the checkpoint was trained with (`dltrain eval CKPT model.name=...`): the message then
    names that difference, else the checkpoint itself is at fault.
    """
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        trained = checkpoint["recipe"].get("model")
        if built_from is not None and built_from != trained:
            raise UserError(
                f"the weights in {path} do not fit this recipe's model ({built_from}): they were "
                f"trained with model {trained}. Use that model section (drop model.* overrides)."
            ) from None
        raise UserError(
            f"the weights in {path} do not fit the model its recipe names ({trained}): "
            f"{_misfit(model, checkpoint['model']) or first_line(exc)}. "
            "The checkpoint is damaged or was written by different model code; use another "
            "checkpoint."
        ) from None
