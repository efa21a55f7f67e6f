"""`model: {name: hf}`: a Hugging Face text encoder (AutoModel) as the backbone of a classifier.

`checkpoint` names a hub id or a folder saved with `save_pretrained`; the texts must be encoded
by its own tokenizer (`data: {name: text_csv, tokenizer: hf}`). The encoder's last hidden states
are pooled — the first token's (`cls`, BERT's [CLS]) or the mean over the real tokens (`mean`)
— and a linear head maps them to the classes. `freeze: embeddings` keeps the token embeddings
as they are, `backbone` the whole encoder (only the head trains). Built from the config that
travels in the checkpoint (data_meta's `hf_config`) when `pretrained` is false — what eval and
predict do, offline, before loading the run's own weights.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from dltrain.config.registry import MODELS
from dltrain.errors import UserError
from dltrain.system.hub import load_pretrained, transformers_module


class HfClassifier(nn.Module):
    """encoder → pooled hidden state → dropout → linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int, pad_id: int, pooling: str):
        super().__init__()
        self.encoder, self.pad_id, self.pooling = encoder, pad_id, pooling
        hidden = encoder.config.hidden_size
        rate = getattr(encoder.config, "hidden_dropout_prob", 0.1) or 0.0
        self.dropout = nn.Dropout(rate)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        mask = ids != self.pad_id
        states = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:  # the mean over real tokens: padding neither counts nor divides
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(self.dropout(pooled))


@MODELS.register(tasks=("classification", "regression"))
def hf(
    checkpoint: str,
    num_classes: int,
    pooling: Literal["cls", "mean"] = "cls",
    freeze: Literal["none", "embeddings", "backbone"] = "none",
    pretrained: bool = True,
    input_kind: str = "tokens",
    data_meta: dict[str, Any] | None = None,
) -> nn.Module:
    """A Hugging Face encoder (hub id or saved folder) with a linear head (the classes, or one
    value for regression); texts encoded by its own tokenizer (data.tokenizer: hf)."""
    meta = data_meta or {}
    if input_kind != "tokens" or "hf_config" not in meta:
        raise UserError(
            "model: hf reads texts encoded by its own tokenizer: use data: {name: text_csv, "
            "tokenizer: hf}."
        )
    transformers = transformers_module("model: {name: hf}")
    if pretrained:
        encoder = load_pretrained(transformers.AutoModel, checkpoint, "model")
    else:  # the checkpoint's own config: its weights go over this at once
        config = dict(meta["hf_config"])
        encoder = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**config))
    model = HfClassifier(encoder, num_classes, int(meta["pad_id"]), pooling)
    _freeze(encoder, freeze)
    return model


def _freeze(encoder: nn.Module, freeze: str) -> None:
    if freeze == "backbone":
        encoder.requires_grad_(False)
    elif freeze == "embeddings":
        encoder.get_input_embeddings().requires_grad_(False)
