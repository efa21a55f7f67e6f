"""`model: {name: hf}`: a Hugging Face text encoder (AutoModel) as the backbone of a classifier.

`checkpoint` names a hub id or a folder saved with `save_pretrained`; the texts must be encoded
by its own tokenizer (`data: {name: text_csv, tokenizer: hf}`). The encoder's last hidden states
are pooled — the first token's (`cls`, BERT's [CLS]) or the mean over the real tokens (`mean`)
— and a linear head maps them to the classes. `freeze: embeddings` keeps the token embeddings
as they are, `backbone` the whole encoder (only the head trains). `lora: {r, alpha, dropout,
targets}` trains low-rank adapters (Hu et al. 2021) that peft puts beside the encoder's own
weights, which stay as they are: a fraction of the parameters to train and to keep in optimizer
state. On the CPU each batch is cut to its longest text before the encoder sees it (the data
holds texts padded to the split's longest); on an accelerator the shape stays fixed, as cutting
needs the batch's lengths on the host at every step. Built from the config that
travels in the checkpoint (data_meta's `hf_config`) when `pretrained` is false — what eval and
predict do, offline, before loading the run's own weights.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from dltrain.config.registry import MODELS
from dltrain.errors import UserError
from dltrain.system.hub import load_pretrained, transformers_module


class Lora(BaseModel):
    """`model.lora`: low-rank adapters on the encoder's linear layers (peft's LoraConfig)."""

    model_config = ConfigDict(extra="forbid")
    r: Annotated[int, Field(ge=1)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # None: peft's own choice for the architecture (BERT: query and value), else every linear
    # layer of the encoder
    targets: list[str] | None = None


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
        ids = self._cut_to_longest(ids)
        mask = ids != self.pad_id
        states = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:  # the mean over real tokens: padding neither counts nor divides
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(self.dropout(pooled))

    def _cut_to_longest(self, ids: Tensor) -> Tensor:
        """The batch without the padding columns every text has (tokenizers pad on the right
        here): attention over the batch's longest text, not the split's. Not while compiling or
        exporting (a fixed shape), nor on an accelerator (reading the length is a sync)."""
        if ids.device.type != "cpu" or torch.compiler.is_compiling() or _exporting():
            return ids
        used = (ids != self.pad_id).any(0).nonzero()
        return ids[:, : int(used[-1]) + 1] if len(used) else ids


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


@MODELS.register(tasks=("classification", "regression"))
def hf(
    checkpoint: str,
    num_classes: int,
    pooling: Literal["cls", "mean"] = "cls",
    freeze: Literal["none", "embeddings", "backbone"] = "none",
    pretrained: bool = True,
    lora: Lora | None = None,
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
    # BERT-like encoders end in a pooler (a dense layer over [CLS]) whose output the head does
    # not read: its weights get no gradient, which DDP refuses at the second step
    pooler = getattr(encoder, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    _freeze(encoder, freeze)
    if lora is not None:
        _add_lora(encoder, lora, freeze)
    return model


def _freeze(encoder: nn.Module, freeze: str) -> None:
    if freeze == "backbone":
        encoder.requires_grad_(False)
    elif freeze == "embeddings":
        encoder.get_input_embeddings().requires_grad_(False)


def _add_lora(encoder: nn.Module, lora: Lora, freeze: str) -> None:
    """peft's adapters into the encoder in place (its own weights frozen by peft)."""
    if freeze != "none":
        raise UserError(
            f"model.freeze: {freeze} with model.lora: LoRA already keeps the encoder's own "
            "weights as they are and trains only its adapters (and the head); remove model.freeze."
        )
    try:
        import peft
    except ImportError:
        raise UserError(
            "model.lora needs peft, which is not installed: pip install 'dltrain[models]'."
        ) from None
    targets = lora.targets or _default_targets(peft, encoder.config.model_type)
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets
    )
    try:
        peft.inject_adapter_in_model(config, encoder)
    except ValueError as error:  # e.g. a target that names no layer of this encoder
        raise UserError(
            f"model.lora: {error} (model.lora.targets names layers of the encoder)"
        ) from None


def _default_targets(peft, model_type: str) -> list[str] | str:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    return known.get(model_type, "all-linear")
