"""`dltrain explain`: why a model predicted what it did, for each kind of input, through Captum.

The checkpoint alone says what the model reads; the input is read as `predict` reads it, then:
images → attribution maps over the image (explain_images.py, PNG); table rows → each column's
attribution, or the columns' importance over many rows (explain_tables.py: a table in the
terminal, JSON, a bar chart PNG); texts → each token's attribution (explain_text.py: coloured in
the terminal, JSON, an HTML page). Float sequences and seq2seq models are refused with the
reason: a step's attribution to a generated sequence is not one score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dltrain.errors import UserError
from dltrain.use.inference import Predictor
from dltrain.use.predict import Samples, read_input, read_texts


def captum_module():
    try:
        import captum
    except ImportError:
        raise UserError(
            "explain attributes through Captum, which is not installed: pip install "
            "'dltrain[explain]'."
        ) from None
    return captum


def explainable_kind(predictor: Predictor) -> str:
    """'image', 'tabular' or 'tokens'; a model explain cannot attribute is refused."""
    if predictor.task == "seq2seq":
        raise UserError(
            f"explain attributes one score (a class or a value); {predictor.path} holds a "
            "seq2seq model, whose output is a generated sequence. Use dltrain predict for it."
        )
    if predictor.kind == "sequence":
        raise UserError(
            f"explain supports images, table rows and texts; {predictor.path} holds a model of "
            f"float sequences (input shape {list(predictor.input_shape)}), whose steps have no "
            "names to attribute to. Use dltrain predict for it."
        )
    captum_module()
    return predictor.kind


def read_samples(
    predictor: Predictor, source: Path | None, texts: list[str] | None
) -> tuple[Samples, str]:
    """What to explain, read as predict reads it, and the stem its outputs are named after."""
    kind = explainable_kind(predictor)
    if texts:
        if source is not None:
            raise UserError("give an input file or --text, not both.")
        return read_texts(list(texts), predictor), "text"
    if source is None:
        what = (
            '--text "..." (or a .txt/.csv file of texts)' if kind == "tokens" else "an input file"
        )
        raise UserError(f"explain needs {what} to explain.")
    samples = read_input(Path(source), predictor)
    if kind == "image" and len(samples.names) != 1:
        raise UserError(
            f"input {source} holds {len(samples.names)} samples; explain takes one image "
            f"(or a .npy array of shape {list(predictor.input_shape)})."
        )
    return samples, Path(source).stem


def default_output(stem: str, kind: str) -> Path:
    """explain-<input stem>.png (images, tables) or .html (texts), in the current folder."""
    return Path(f"explain-{stem}.{'html' if kind == 'tokens' else 'png'}")


def explained_outputs(predictor: Predictor, x: torch.Tensor) -> tuple[Any, list[dict[str, Any]]]:
    """What the attributions explain for a batch: Captum's target (each sample's predicted
    class; the one output for regression) and each prediction as shown."""
    if predictor.task == "regression":
        return 0, [{"predicted": v} for v in predictor.predict_values(x).tolist()]
    probs = predictor.predict_proba(x)
    targets = probs.argmax(dim=1).tolist()
    return targets, [
        {"predicted": predictor.classes[t], "probability": float(p[t])}
        for t, p in zip(targets, probs, strict=True)
    ]
