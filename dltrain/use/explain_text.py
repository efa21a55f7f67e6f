"""`dltrain explain --text` for text models: how much each token pushed the prediction, through
Captum's LayerIntegratedGradients over the model's token embedding (Sundararajan et al. 2017).

The baseline is every token's embedding replaced by `<pad>`'s (the padding mask still reads the
real text, so the model sees a text of the same length that says nothing); a token's attribution
is its integrated gradient summed over the embedding's dimensions, and by completeness a text's
attributions add up to its score minus the baseline's. The score is the predicted class's logit
(or the predicted value, for regression). Shown coloured in the terminal (green for, red
against), and written as an HTML page and JSON.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dltrain.errors import UserError
from dltrain.use.explain import explained_outputs
from dltrain.use.inference import Predictor
from dltrain.use.predict import Samples

IG_STEPS = 64


@dataclass
class TextExplanation:
    """Per text: its tokens, each token's attribution, the prediction."""

    texts: list[dict[str, Any]]  # text, predicted, (probability), tokens [[token, attribution]]
    delta: float  # the largest completeness error over the texts (Captum's delta)
    baseline: str = "<pad> in every position"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "layer_integrated_gradients (token embedding)",
            "baseline": self.baseline,
            "texts": self.texts,
            "max_convergence_delta": self.delta,
        }


def explain_texts(predictor: Predictor, samples: Samples) -> TextExplanation:
    """Per-token attributions of each text's prediction."""
    from captum.attr import LayerIntegratedGradients

    pad = pad_id(predictor.meta)
    ids = _cut_to_longest(samples.x, pad).to(predictor.device)
    targets, predictions = explained_outputs(predictor, samples.x)
    forward = lambda v: predictor.model(predictor.pipeline.eval(v))  # noqa: E731
    explainer = LayerIntegratedGradients(forward, token_embedding(predictor))
    with torch.enable_grad():
        attributions, delta = explainer.attribute(
            ids, baselines=torch.full_like(ids, pad), target=targets, n_steps=IG_STEPS,
            return_convergence_delta=True,
        )  # fmt: skip
    per_token = attributions.sum(dim=-1).detach().cpu()
    names = token_names(predictor.meta)
    texts = []
    for text, prediction, row, scores in zip(
        samples.texts, predictions, ids.cpu().tolist(), per_token, strict=True
    ):
        tokens = [
            [names(i), float(s)] for i, s in zip(row, scores.tolist(), strict=True) if i != pad
        ]
        texts.append({"text": text, **prediction, "tokens": tokens})
    return TextExplanation(texts, float(delta.abs().max()))


def _cut_to_longest(ids: torch.Tensor, pad: int) -> torch.Tensor:
    """The texts without the padding columns all of them have: the baseline (all <pad>) and
    the texts then have one length, whatever a model cuts itself (hf on the CPU)."""
    used = (ids != pad).any(0).nonzero()
    return ids[:, : int(used[-1]) + 1] if len(used) else ids


def token_embedding(predictor: Predictor) -> nn.Module:
    """The layer that turns token ids into vectors: the first nn.Embedding (a Hugging Face
    encoder's word embeddings come first in it)."""
    for module in predictor.model.modules():
        if isinstance(module, nn.Embedding):
            return module
    raise UserError(
        f"explain --text attributes through a token embedding; model "
        f"'{predictor.recipe['model']['name']}' in {predictor.path} has none."
    )


def pad_id(meta: dict[str, Any]) -> int:
    """The padding id: the Hugging Face tokenizer's, else dltrain's vocabulary's (0)."""
    return int(meta.get("pad_id", 0))


def token_names(meta: dict[str, Any]):
    """id → the token's text, from the checkpoint's tokenizer or vocabulary."""
    if "hf_tokenizer" in meta:
        from dltrain.data.hf_tokens import tokenizer_from_files

        tokenizer = tokenizer_from_files(meta["hf_tokenizer"])
        return lambda i: tokenizer.convert_ids_to_tokens(i)
    vocab = meta["vocab"]
    return lambda i: vocab[i] if 0 <= i < len(vocab) else "<unk>"


def html_page(explanation: TextExplanation) -> str:
    """Each text with its tokens on a green (for) / red (against) background by strength."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>dltrain explain</title>",
        "<body style='font-family: sans-serif; max-width: 60em'>",
        f"<p>Integrated gradients over the token embedding · baseline: "
        f"{html.escape(explanation.baseline)} · green pushes towards the prediction, red away.</p>",
    ]
    for text in explanation.texts:
        odds = f" ({text['probability']:.3f})" if "probability" in text else ""
        parts.append(f"<h3>predicted {html.escape(str(text['predicted']))}{odds}</h3><p>")
        top = max((abs(s) for _, s in text["tokens"]), default=0.0) or 1.0
        for token, score in text["tokens"]:
            colour = "42,157,143" if score >= 0 else "231,111,81"
            parts.append(
                f"<span title='{score:+.4f}' style='background: rgba({colour},"
                f"{abs(score) / top:.2f}); padding: 2px'>{html.escape(token)}</span> "
            )
        parts.append("</p>")
    return "\n".join(parts) + "\n</body>\n"


def terminal_markup(text: dict[str, Any]) -> str:
    """One text's tokens as rich markup, coloured by the sign and strength of each one's push."""
    from rich.markup import escape

    top = max((abs(s) for _, s in text["tokens"]), default=0.0) or 1.0
    words = []
    for token, score in text["tokens"]:
        strength = abs(score) / top
        style = ("bold " if strength > 0.5 else "") + ("green" if score >= 0 else "red")
        words.append(f"[{style}]{escape(token)}[/]" if strength > 0.1 else escape(token))
    return " ".join(words)
