"""`transformer` (encoder classifier) and `transformer_seq2seq` (encoder–decoder).

Input conventions (see dltrain/data/base.py): token ids are int64 B×T with 0 = <pad> at the end;
float sequences are B×T×F, all full length.

`transformer`: token ids are embedded (<pad> row fixed at zero) and scaled by √d_model, float
steps projected by a linear layer; positions are added (sinusoidal, or learned for up to
input_shape[0] steps), then a stack of encoder layers. Pooling: `cls` reads the output at a
learned [CLS] vector prepended to every sequence; `mean` averages the real positions. Padded
positions are masked as attention keys (src_key_padding_mask) and left out of the mean, so
padding never changes a prediction. norm_first (pre-LN, with a final LayerNorm) trains stably
without warm-up; norm_first: false is the original post-LN layout.

`transformer_seq2seq`: source token ids → encoder; target token ids (vocabulary of num_classes
ids: 0 <pad>, data_meta['bos_id'] (1), data_meta['eos_id'] (2), ...) → causal decoder attending to
the encoder output (source pads masked) → logits over the target vocabulary.

* `forward(src, tgt_in)` → B×T'×num_classes, teacher forcing: `tgt_in` is the target shifted
  right behind <bos> (`decoder_input(y)` builds it from targets y laid out as
  `tokens…, eos, pad…`), so the logits at position t predict y[:, t].
* `generate(src, max_length=None)` → int64 B×max_length, greedy: the predicted target WITHOUT
  <bos>, INCLUDING <eos>, then pads (0) — the layout of y, so `(generate(x) == y).all(1)` is the
  exact-match accuracy when max_length is y's width (the default, data_meta['max_target_length']).
  <pad> and <bos> are never generated. It runs under no_grad and leaves the train/eval mode as
  it is (call model.eval() first to switch dropout off).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from dltrain.config.registry import MODELS
from dltrain.errors import UserError
from dltrain.models.inputs import refuse_task, require_sequence

Positive = Annotated[int, Field(ge=1)]
Dropout = Annotated[float, Field(ge=0, lt=1)]
Activation = Literal["relu", "gelu"]
Positional = Literal["sinusoidal", "learned"]


def sinusoids(length: int, d_model: int, device: torch.device | None = None) -> Tensor:
    """The fixed positional encodings of Vaswani et al. (2017): length × d_model."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(
        torch.arange(0, d_model, 2, device=device, dtype=torch.float32)
        * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(length, d_model, device=device)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: d_model // 2])  # odd d_model: one cos fewer
    return table


class PositionalEncoding(nn.Module):
    """Adds a position vector to each step of B×T×d input: sinusoidal or learned."""

    def __init__(self, kind: Positional, max_length: int, d_model: int):
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(max_length, d_model) * 0.02)
        else:  # not saved in checkpoints: it is a function of the shape
            self.register_buffer("table", sinusoids(max_length, d_model), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        length = x.size(1)
        table = self.table
        if length > table.size(0):
            if self.kind == "learned":
                raise UserError(
                    f"sequences of {length} steps are longer than the {table.size(0)} positions "
                    "this model has learned (its training data's length); cut them to that "
                    "length, or train with positional: sinusoidal"
                )
            table = sinusoids(length, table.size(1), x.device)
        return x + table[:length].to(x.dtype)


class TokenEmbedding(nn.Embedding):
    """Token embeddings scaled by √d, initialized N(0, 1/d) so the result has unit scale."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__(vocab_size, d_model, padding_idx=0)
        nn.init.normal_(self.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[0].zero_()
        self.scale = math.sqrt(d_model)

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * self.scale


def padding_mask(ids: Tensor) -> Tensor:
    """B×T bool, True at padded positions (the trailing 0s; an all-pad row keeps position 0)."""
    lengths = (ids != 0).sum(1).clamp(min=1)  # never mask every key: softmax would give NaN
    return torch.arange(ids.size(1), device=ids.device) >= lengths[:, None]


def _encoder(
    d_model: int,
    heads: int,
    layers: int,
    feedforward: int,
    dropout: float,
    activation: Activation,
    norm_first: bool,
) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model, heads, feedforward, dropout, activation, batch_first=True, norm_first=norm_first
    )
    # Pre-LN stacks end with a LayerNorm (each layer's output is un-normalized); post-LN ones
    # already end normalized. Nested tensors are a speed path torch disables for pre-LN anyway.
    norm = nn.LayerNorm(d_model) if norm_first else None
    return nn.TransformerEncoder(layer, layers, norm=norm, enable_nested_tensor=False)


class TransformerClassifier(nn.Module):
    """Embedding + positions → encoder layers → [CLS] or mean pooling → dropout → linear head."""

    def __init__(
        self,
        num_classes: int,
        max_length: int,
        vocab_size: int | None = None,
        features: int = 1,
        d_model: int = 128,
        heads: int = 4,
        layers: int = 2,
        feedforward: int = 256,
        dropout: float = 0.1,
        activation: Activation = "gelu",
        positional: Positional = "sinusoidal",
        pooling: Literal["cls", "mean"] = "cls",
        norm_first: bool = True,
    ):
        """`vocab_size` given: token ids; else B×T×`features` float steps."""
        super().__init__()
        self.tokens = vocab_size is not None
        self.embed = (
            TokenEmbedding(vocab_size, d_model) if self.tokens else nn.Linear(features, d_model)
        )
        self.cls = nn.Parameter(torch.randn(1, 1, d_model) * 0.02) if pooling == "cls" else None
        self.positions = PositionalEncoding(positional, max_length + (pooling == "cls"), d_model)
        self.dropout = nn.Dropout(dropout)
        self.encoder = _encoder(
            d_model, heads, layers, feedforward, dropout, activation, norm_first
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        pad = padding_mask(x) if self.tokens else None
        h = self.embed(x)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(h.size(0), -1, -1).to(h.dtype), h], 1)
            pad = F.pad(pad, (1, 0), value=False) if pad is not None else None
        h = self.encoder(self.dropout(self.positions(h)), src_key_padding_mask=pad)
        if self.cls is not None:
            return self.head(h[:, 0])
        if pad is None:
            return self.head(h.mean(1))
        valid = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * valid).sum(1) / valid.sum(1))


class Seq2SeqTransformer(nn.Module):
    """Encoder over source ids, causal decoder over target ids; see the module docstring."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_source_length: int,
        max_target_length: int,
        bos_id: int = 1,
        eos_id: int = 2,
        d_model: int = 128,
        heads: int = 4,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        feedforward: int = 256,
        dropout: float = 0.1,
        activation: Activation = "gelu",
        positional: Positional = "sinusoidal",
        norm_first: bool = True,
    ):
        super().__init__()
        self.bos_id, self.eos_id, self.max_target_length = bos_id, eos_id, max_target_length
        self.source_embed = TokenEmbedding(vocab_size, d_model)
        self.target_embed = TokenEmbedding(num_classes, d_model)
        self.source_positions = PositionalEncoding(positional, max_source_length, d_model)
        # The decoder reads <bos> + all but the last target token: max_target_length steps.
        self.target_positions = PositionalEncoding(positional, max_target_length, d_model)
        self.dropout = nn.Dropout(dropout)
        self.encoder = _encoder(
            d_model, heads, encoder_layers, feedforward, dropout, activation, norm_first
        )
        layer = nn.TransformerDecoderLayer(
            d_model,
            heads,
            feedforward,
            dropout,
            activation,
            batch_first=True,
            norm_first=norm_first,
        )
        norm = nn.LayerNorm(d_model) if norm_first else None
        self.decoder = nn.TransformerDecoder(layer, decoder_layers, norm=norm)
        self.head = nn.Linear(d_model, num_classes)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder output B×T×d_model and the source padding mask (True at pads)."""
        pad = padding_mask(src)
        h = self.dropout(self.source_positions(self.source_embed(src)))
        return self.encoder(h, src_key_padding_mask=pad), pad

    def decode(self, memory: Tensor, memory_pad: Tensor, tgt_in: Tensor) -> Tensor:
        """Logits B×T'×num_classes for decoder input `tgt_in` (<bos> first) given the memory."""
        length = tgt_in.size(1)
        causal = torch.ones(length, length, dtype=torch.bool, device=tgt_in.device).triu(1)
        h = self.dropout(self.target_positions(self.target_embed(tgt_in)))
        h = self.decoder(
            h,
            memory,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt_in == 0,
            memory_key_padding_mask=memory_pad,
            tgt_is_causal=True,
        )
        return self.head(h)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits B×T'×num_classes; position t predicts the target's token t."""
        memory, memory_pad = self.encode(src)
        return self.decode(memory, memory_pad, tgt_in)

    def decoder_input(self, y: Tensor) -> Tensor:
        """Targets `tokens…, eos, pad…` (B×T') → decoder input `bos, tokens…, (eos), pad…`."""
        bos = torch.full_like(y[:, :1], self.bos_id)
        return torch.cat([bos, y[:, :-1]], 1)

    @torch.no_grad()
    def generate(self, src: Tensor, max_length: int | None = None) -> Tensor:
        """Greedy decoding: B×max_length int64, `tokens…, eos, pad…` (no <bos>)."""
        max_length = max_length or self.max_target_length
        memory, memory_pad = self.encode(src)
        batch = src.size(0)
        out = torch.full((batch, 1), self.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(batch, dtype=torch.bool, device=src.device)
        for _ in range(max_length):
            # The decoder reruns on the whole prefix each step (no key/value cache): cheap for
            # the short targets seq2seq tasks here have (O(L²) positions in all).
            logits = self.decode(memory, memory_pad, out)[:, -1].float()
            logits[:, 0] = float("-inf")  # <pad> only ever follows <eos>, set below
            logits[:, self.bos_id] = float("-inf")
            step = logits.argmax(-1).masked_fill(done, 0)
            out = torch.cat([out, step[:, None]], 1)
            done |= step == self.eos_id
            if bool(done.all()):  # one host sync per step, to stop early
                break
        out = out[:, 1:]
        return F.pad(out, (0, max_length - out.size(1)))


def _check_heads(model: str, d_model: int, heads: int) -> None:
    if d_model % heads:
        raise UserError(
            f"model '{model}': d_model ({d_model}) must be divisible by heads ({heads}), as each "
            f"head attends in d_model / heads dimensions; e.g. d_model: {heads * 32} or heads: "
            f"{math.gcd(d_model, heads)}"
        )


@MODELS.register()
def transformer(
    input_shape: tuple[int, ...],
    num_classes: int,
    input_kind: str | None = None,
    vocab_size: int | None = None,
    task: str | None = None,
    d_model: Positive = 128,
    heads: Positive = 4,
    layers: Positive = 2,
    feedforward: Positive = 256,
    dropout: Dropout = 0.1,
    activation: Activation = "gelu",
    positional: Positional = "sinusoidal",
    pooling: Literal["cls", "mean"] = "cls",
    norm_first: bool = True,
) -> nn.Module:
    """Transformer encoder over token ids or float sequences, [CLS]- or mean-pooled.

    d_model must be divisible by heads. Learned positions cover the dataset's sequence length;
    padding is masked, so it never changes a prediction.
    """
    kind = require_sequence("transformer", input_shape, input_kind, vocab_size)
    refuse_task("transformer", task, "transformer_seq2seq")
    _check_heads("transformer", d_model, heads)
    tokens = kind == "tokens"
    return TransformerClassifier(
        num_classes,
        max_length=input_shape[0],
        vocab_size=vocab_size if tokens else None,
        features=1 if tokens else input_shape[1],
        d_model=d_model,
        heads=heads,
        layers=layers,
        feedforward=feedforward,
        dropout=dropout,
        activation=activation,
        positional=positional,
        pooling=pooling,
        norm_first=norm_first,
    )


@MODELS.register()
def transformer_seq2seq(
    input_shape: tuple[int, ...],
    num_classes: int,
    input_kind: str | None = None,
    vocab_size: int | None = None,
    task: str | None = None,
    data_meta: dict[str, Any] | None = None,
    d_model: Positive = 128,
    heads: Positive = 4,
    encoder_layers: Positive = 2,
    decoder_layers: Positive = 2,
    feedforward: Positive = 256,
    dropout: Dropout = 0.1,
    activation: Activation = "gelu",
    positional: Positional = "sinusoidal",
    norm_first: bool = True,
) -> nn.Module:
    """Transformer encoder–decoder for seq2seq tasks: token ids in, a token sequence out.

    Trained with teacher forcing; predicts by greedy decoding up to the dataset's longest
    target. d_model must be divisible by heads.
    """
    name = "transformer_seq2seq"
    if task != "seq2seq":
        raise UserError(
            f"model '{name}' predicts a token sequence per example, but this dataset's task is "
            f"{task or 'classification'}; use model: transformer (one prediction per sequence) "
            "or a seq2seq dataset"
        )
    require_sequence(name, input_shape, input_kind, vocab_size, kinds=("tokens",))
    _check_heads(name, d_model, heads)
    meta = data_meta or {}
    return Seq2SeqTransformer(
        vocab_size,
        num_classes,
        max_source_length=input_shape[0],
        # Fallback for datasets that do not say: the source length plus <eos>.
        max_target_length=int(meta.get("max_target_length", input_shape[0] + 1)),
        bos_id=int(meta.get("bos_id", 1)),
        eos_id=int(meta.get("eos_id", 2)),
        d_model=d_model,
        heads=heads,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        feedforward=feedforward,
        dropout=dropout,
        activation=activation,
        positional=positional,
        norm_first=norm_first,
    )
