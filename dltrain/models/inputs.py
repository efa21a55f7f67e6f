"""Which input kind a model takes, and the UserError when the dataset gives another one.

dltrain passes each factory that names them the dataset's `input_kind` ('image', 'tabular',
'tokens' or 'sequence'), `input_shape` (without the batch axis) and, for token input,
`vocab_size`. When `input_kind` is not passed it is inferred from the shape, so a factory also
works when called with the shape alone.
"""

from __future__ import annotations

from dltrain.errors import UserError

SEQUENCE_MODELS = "lstm, gru, rnn or transformer"

_DESCRIPTIONS = {
    "image": "image input (C×H×W)",
    "tabular": "tabular input (F features)",
    "tokens": "token ids (T per example)",
    "sequence": "float sequences (T steps × F features)",
}


def input_kind_of(
    input_shape: tuple[int, ...], input_kind: str | None, vocab_size: int | None = None
) -> str:
    """`input_kind` if given, else the kind the shape implies (token ids when there is a vocab)."""
    if input_kind is not None:
        return input_kind
    if len(input_shape) == 1:
        return "tokens" if vocab_size is not None else "tabular"
    return {2: "sequence", 3: "image"}.get(len(input_shape), f"{len(input_shape)}-D")


def describe(input_kind: str, input_shape: tuple[int, ...]) -> str:
    """E.g. 'token ids (T per example) of shape (200,)', for error messages."""
    what = _DESCRIPTIONS.get(input_kind, f"{input_kind} input")
    return f"{what} of shape {tuple(input_shape)}"


def refuse_sequences(
    model: str, input_shape: tuple[int, ...], input_kind: str | None, takes: str
) -> None:
    """UserError when a model for images/tabular rows is given token ids or float sequences."""
    if input_kind in ("tokens", "sequence"):
        raise UserError(
            f"model '{model}' takes {takes}, but the dataset gives "
            f"{describe(input_kind, input_shape)}; use a sequence model: {SEQUENCE_MODELS}"
        )


def require_table(model: str, input_shape: tuple[int, ...], input_kind: str | None) -> None:
    """UserError when a table model (per-column embeddings) is given anything but table rows."""
    refuse_sequences(model, input_shape, input_kind, "table rows (csv data)")
    if input_kind_of(input_shape, input_kind) != "tabular":
        raise UserError(
            f"model '{model}' takes table rows (csv data), but the dataset gives "
            f"{describe(input_kind_of(input_shape, input_kind), input_shape)}; use mlp (it "
            "flattens images) or an image model: seed_cnn, resnet18"
        )


def require_sequence(
    model: str,
    input_shape: tuple[int, ...],
    input_kind: str | None,
    vocab_size: int | None,
    kinds: tuple[str, ...] = ("tokens", "sequence"),
) -> str:
    """Check that a sequence model gets token ids (B×T) or float steps (B×T×F); return the kind."""
    kind = input_kind_of(input_shape, input_kind, vocab_size)
    if kind not in kinds:
        takes = " or ".join(_DESCRIPTIONS[k].split(" (")[0] for k in kinds)
        if kind == "image":
            fix = "use model: seed_cnn, resnet18 or mlp (or give the images as sequences of rows)"
        elif kind == "tabular":
            fix = "use model: mlp"
        else:
            fix = f"use model: {SEQUENCE_MODELS}"
        raise UserError(
            f"model '{model}' takes {takes}, but the dataset gives "
            f"{describe(kind, input_shape)}; {fix}"
        )
    expected = 1 if kind == "tokens" else 2
    if len(input_shape) != expected:
        layout = "T (token ids)" if kind == "tokens" else "T×F (steps × features)"
        raise UserError(
            f"model '{model}' needs {kind} input of shape {layout} per example, but the dataset "
            f"gives shape {tuple(input_shape)}"
        )
    if kind == "tokens" and (vocab_size is None or vocab_size < 2):
        raise UserError(
            f"model '{model}' needs the vocabulary size of token input, but the dataset gives "
            f"{vocab_size!r}; a token dataset must give at least <pad> (0) and <unk> (1)"
        )
    return kind


def refuse_task(model: str, task: str | None, alternative: str) -> None:
    """UserError when a per-sequence classifier/regressor is used for a seq2seq task."""
    if task == "seq2seq":
        raise UserError(
            f"model '{model}' predicts one label (or value) per sequence, but this dataset's "
            f"task is seq2seq (a target sequence per example); use model: {alternative}"
        )
