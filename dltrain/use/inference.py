"""A trained model ready to use, rebuilt from its checkpoint alone (never from the training data).

`dltrain predict`, `export` and `explain` start here. The checkpoint holds the resolved recipe,
the class names, the input kind and shape, the task, the normalisation and the dataset's own
meta such as a text model's vocabulary and tokenizer (`data_meta`), so the dataset the model
was trained on need not exist any more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dltrain.config.kinds import INPUT_KINDS, TASKS
from dltrain.config.registry import MODELS
from dltrain.data.pipeline import BatchPipeline
from dltrain.data.prepare import PreparedData
from dltrain.errors import RecipeError, UserError
from dltrain.models.pretrained import without_pretrained_weights
from dltrain.runs.checkpoint import load_checkpoint, load_weights
from dltrain.system.devices import resolve_device


@dataclass
class Predictor:
    """A model in eval mode plus the preprocessing it was trained with (minus augmentation)."""

    model: nn.Module
    meta: dict[str, Any]  # the checkpoint's data_meta: kind, classes, input_shape, mean, std...
    recipe: dict[str, Any]  # the resolved recipe the model was trained with
    device: torch.device
    pipeline: BatchPipeline
    path: Path

    @property
    def classes(self) -> list[str]:
        """Class names; regression: [target name]; seq2seq: the target vocabulary."""
        return list(self.meta["classes"])

    @property
    def kind(self) -> str:
        """What the user gives: 'image', 'tabular', 'tokens' (token ids, from texts) or
        'sequence' (float steps). Images fed row by row (as_sequence) are still 'image'."""
        return self.meta["kind"]

    @property
    def task(self) -> str:
        """'classification', 'regression' or 'seq2seq' (older checkpoints: classification)."""
        return self.meta.get("task") or "classification"

    @property
    def as_sequence(self) -> str | None:
        return self.meta.get("as_sequence")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One raw sample's shape: [C, H, W] images, [F] tabular, [L] token ids, [T, F] steps."""
        return tuple(self.meta["input_shape"])

    @property
    def model_input_shape(self) -> tuple[int, ...]:
        """One sample's shape as the model takes it (images as rows: [H, C·W])."""
        return _prepared(self.meta).model_input_shape

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """A raw batch as the model saw it in training: uint8 scaled by 1/255, then normalised
        (images as rows: then one step per row); token ids as they are.

        Float batches are taken as already scaled (as in training); nothing is augmented.
        """
        return self.pipeline.eval(x.to(self.device))

    def predict_proba(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N × classes, on the CPU) for a raw batch (classification)."""
        with torch.inference_mode():
            logits = self.model(self.preprocess(batch))
            return torch.softmax(logits.float(), dim=1).cpu()

    def predict_values(self, batch: torch.Tensor) -> torch.Tensor:
        """Predicted values (N, on the CPU) for a raw batch (regression)."""
        with torch.inference_mode():
            return self.model(self.preprocess(batch)).float().reshape(len(batch), -1)[:, 0].cpu()

    def generate(self, batch: torch.Tensor) -> torch.Tensor:
        """Greedy decoding (seq2seq): N × T' target ids on the CPU, `tokens…, eos, pad…`."""
        with torch.inference_mode():
            return self.model.generate(self.preprocess(batch)).cpu()


def load_for_inference(
    checkpoint_path: Path | str, device: str = "cpu", imports: list[str] = ()
) -> Predictor:
    """Rebuild a checkpoint's model with its weights, in eval mode, on `device`.

    The model is built exactly as `dltrain fit` built it (build_model): the same run-time
    arguments, derived from the checkpoint's data_meta. Every way the checkpoint can be unusable
    (missing, not a checkpoint, weights that do not fit the model it names, a component of the
    user's own that `imports` does not provide) is a UserError (exit 2). Nothing the checkpoint
    names is ever imported.
    """
    from dltrain.config.user_imports import import_for_checkpoint

    path = Path(checkpoint_path)
    checkpoint = load_checkpoint(path)
    recipe, meta = dict(checkpoint["recipe"]), dict(checkpoint["data_meta"])
    _check_meta(meta, path)
    section = recipe.get("model")
    if not isinstance(section, dict) or not isinstance(section.get("name"), str):
        raise UserError(f"checkpoint {path} has no model section in its recipe.")
    import_for_checkpoint(recipe, list(imports), f"checkpoint {path}", needed=("model",))
    try:
        section = MODELS.validate(section, "model")  # the checkpoint's section is data: check it
        offline = without_pretrained_weights(section)
        fixed = bool((recipe.get("privacy") or {}).get("fix_model"))  # Opacus' layers
        model = _build_model(offline, meta, fixed)
        if offline is not section and not _fits(model, checkpoint["model"]):
            model = _build_model(section, meta, fixed)  # the pretrained form differs
    except RecipeError as exc:
        raise UserError(f"checkpoint {path}: {exc}") from exc.__cause__
    load_weights(model, checkpoint, path)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    data = _prepared(meta)
    pipeline = BatchPipeline(data.kind, data.mean, data.std, dev, as_sequence=data.as_sequence)
    return Predictor(model, meta, recipe, dev, pipeline, path)


# The data_meta keys PreparedData writes itself; every other key is the dataset's own meta.
_OWN_KEYS = ("kind", "task", "as_sequence", "classes", "input_shape", "mean", "std")


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    task = meta.get("task") or "classification"  # checkpoints from before tasks: classification
    if meta["kind"] not in INPUT_KINDS or task not in TASKS:
        what = f"'{meta['kind']}' input" if meta["kind"] not in INPUT_KINDS else f"a {task} task"
        raise UserError(
            f"checkpoint {path} holds a model for {what}, which this dltrain cannot run "
            f"(input kinds: {', '.join(INPUT_KINDS)}; tasks: {', '.join(TASKS)}). Upgrade dltrain."
        )
    as_sequence = meta.get("as_sequence")
    if as_sequence is not None and (
        as_sequence != "rows" or meta["kind"] != "image" or len(meta["input_shape"]) != 3
    ):
        raise UserError(
            f"checkpoint {path}: its data_meta says as_sequence={as_sequence!r} for "
            f"{meta['kind']} input of shape {meta['input_shape']}, which dltrain cannot feed "
            "(only images, as rows). The checkpoint is damaged; use another one."
        )


def _prepared(meta: dict[str, Any]) -> PreparedData:
    """The checkpoint's data as `fit` described it, without any split: what the model's
    run-time arguments (input kind and shape, vocabulary size, output width) derive from."""
    return PreparedData(
        meta["kind"],
        list(meta["classes"]),
        tuple(meta["input_shape"]),
        list(meta["mean"]),
        list(meta["std"]),
        task=meta.get("task") or "classification",
        extra={k: v for k, v in meta.items() if k not in _OWN_KEYS},
        as_sequence=meta.get("as_sequence"),
    )


def _build_model(section: dict[str, Any], meta: dict[str, Any], fixed: bool) -> nn.Module:
    """The model as build_setup builds it: the same run-time arguments (and, for a private
    run with privacy.fix_model, the same layers Opacus put in)."""
    from dltrain.training.build import build_model

    return build_model(section, _prepared(meta), fix_for_privacy=fixed)


def _fits(model: nn.Module, state: Any) -> bool:
    """Whether a state_dict has exactly the model's keys and shapes."""
    own = model.state_dict()
    return (
        isinstance(state, dict)
        and own.keys() == state.keys()
        and all(getattr(state[k], "shape", None) == v.shape for k, v in own.items())
    )
