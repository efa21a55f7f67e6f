"""`rnn`, `lstm`, `gru`: recurrent classifiers/regressors over token ids or float sequences.

One implementation (`RecurrentNet`) serves the three cells. The input is either

* token ids, int64 B×T with 0 = <pad> at the end: embedded (`embedding_size`, the <pad> row fixed
  at zero), then packed with each sequence's length so the recurrence stops at the last real
  token. Padding therefore never changes a prediction: a sequence gives the same logits however
  many trailing pads its batch adds.
* float sequences, B×T×F, all full length (e.g. images as rows, the adding problem): fed as is;
  `embedding_size` is ignored.

The per-step outputs are pooled into one vector per sequence, then dropout and a linear head:

* `last`: the final hidden state of the last layer (`h_n`): for a bidirectional net the forward
  direction's state at the last real step concatenated with the backward direction's state at
  the first step (having read the whole sequence backwards).
* `mean` / `max`: over the real steps only (padded positions are masked out).

Packing needs the lengths on the CPU (`pack_padded_sequence` sorts and slices the batch on the
host), so token input costs one small device→host copy of the B lengths per batch, which also
makes `torch.compile` break the graph there. Float sequences have no padding and skip it.

Initialization: input weights Xavier-uniform, recurrent weights orthogonal per gate (keeps the
recurrence's gain near 1, so gradients neither explode nor vanish early in training), biases
zero except the LSTM forget gate at 1 (Jozefowicz et al. 2015: the cell remembers by default).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dltrain.config.registry import MODELS
from dltrain.models.inputs import refuse_task, require_sequence

Cell = Literal["rnn", "lstm", "gru"]
Positive = Annotated[int, Field(ge=1)]
Dropout = Annotated[float, Field(ge=0, lt=1)]
Pooling = Literal["last", "mean", "max"]

_MODULES: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
_GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # row blocks of weight_ih/weight_hh, one per gate


class RecurrentNet(nn.Module):
    """(Embedding →) stacked (bi)RNN/LSTM/GRU → pooling → dropout → linear head."""

    def __init__(
        self,
        cell: Cell,
        features: int,
        num_classes: int,
        vocab_size: int | None = None,
        layers: int = 1,
        hidden_size: int = 128,
        bidirectional: bool = False,
        dropout: float = 0.0,
        embedding_size: int = 64,
        pooling: Pooling = "last",
        nonlinearity: Literal["tanh", "relu"] = "tanh",
    ):
        """`vocab_size` given: token input (`features` unused); else B×T×`features` floats."""
        super().__init__()
        self.pooling = pooling
        self.directions = 2 if bidirectional else 1
        self.embedding = (
            nn.Embedding(vocab_size, embedding_size, padding_idx=0) if vocab_size else None
        )
        extra = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
        self.rnn = _MODULES[cell](
            embedding_size if vocab_size else features,
            hidden_size,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,  # between layers; torch warns on 1 layer
            **extra,
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden_size * self.directions, num_classes)
        )
        _init_recurrent(self.rnn, cell)

    def forward(self, x: Tensor) -> Tensor:
        if self.embedding is None:  # float steps, all full length
            out, hidden = self.rnn(x)
            return self.head(self._pool(out, hidden, None))
        # Pads are at the end, so a sequence's length is its count of non-pad ids. An all-pad
        # sequence is given length 1 (packing refuses 0): it reads one zero embedding.
        lengths = (x != 0).sum(1).clamp(min=1)
        packed = pack_padded_sequence(
            self.embedding(x), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, hidden = self.rnn(packed)
        return self.head(self._pool(out, hidden, lengths))

    def _pool(
        self,
        out: Tensor | nn.utils.rnn.PackedSequence,
        hidden: Tensor | tuple,
        lengths: Tensor | None,
    ) -> Tensor:
        """One vector per sequence, B × hidden·directions, from real steps only."""
        if self.pooling == "last":
            h_n = hidden[0] if isinstance(hidden, tuple) else hidden  # LSTM: (h_n, c_n)
            # h_n is (layers·directions)×B×H, in the batch's own order even when packing sorted
            # it; the last layer's directions are its final rows.
            last = h_n[-self.directions :]
            return last.transpose(0, 1).reshape(last.size(1), -1)
        if lengths is None:
            return out.mean(1) if self.pooling == "mean" else out.amax(1)
        out, _ = pad_packed_sequence(out, batch_first=True)  # B × longest length × D
        valid = (torch.arange(out.size(1), device=out.device) < lengths[:, None]).unsqueeze(-1)
        if self.pooling == "mean":
            return (out * valid).sum(1) / lengths[:, None].to(out.dtype)
        return out.masked_fill(~valid, float("-inf")).amax(1)


def _init_recurrent(rnn: nn.RNNBase, cell: Cell) -> None:
    """Xavier input weights, orthogonal recurrent weights (per gate), LSTM forget bias 1."""
    gates, hidden = _GATES[cell], rnn.hidden_size
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            if name.startswith("weight_hh"):
                for block in param.chunk(gates):
                    nn.init.orthogonal_(block)
            elif name.startswith("weight_ih"):
                for block in param.chunk(gates):
                    nn.init.xavier_uniform_(block)
            else:  # bias_ih / bias_hh: the two are summed, so set the forget gate in one only
                nn.init.zeros_(param)
                if cell == "lstm" and name.startswith("bias_ih"):
                    param[hidden : 2 * hidden] = 1.0  # gate order: input, forget, cell, output


def _build(
    cell: Cell,
    input_shape: tuple[int, ...],
    num_classes: int,
    input_kind: str | None,
    vocab_size: int | None,
    task: str | None,
    **kwargs,
) -> nn.Module:
    kind = require_sequence(cell, input_shape, input_kind, vocab_size)
    refuse_task(cell, task, "transformer_seq2seq")
    tokens = kind == "tokens"
    return RecurrentNet(
        cell,
        features=1 if tokens else input_shape[1],
        num_classes=num_classes,
        vocab_size=vocab_size if tokens else None,
        **kwargs,
    )


@MODELS.register()
def rnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    input_kind: str | None = None,
    vocab_size: int | None = None,
    task: str | None = None,
    layers: Positive = 1,
    hidden_size: Positive = 128,
    bidirectional: bool = False,
    dropout: Dropout = 0.0,
    embedding_size: Positive = 64,
    pooling: Pooling = "last",
    nonlinearity: Literal["tanh", "relu"] = "tanh",
) -> nn.Module:
    """Elman RNN over token ids or float sequences, pooled (last/mean/max) into a linear head.

    embedding_size applies to token input only (float sequences are fed as they are); dropout
    acts between stacked layers and before the head. Padding never changes a prediction.
    """
    return _build(
        "rnn",
        input_shape,
        num_classes,
        input_kind,
        vocab_size,
        task,
        layers=layers,
        hidden_size=hidden_size,
        bidirectional=bidirectional,
        dropout=dropout,
        embedding_size=embedding_size,
        pooling=pooling,
        nonlinearity=nonlinearity,
    )


@MODELS.register()
def lstm(
    input_shape: tuple[int, ...],
    num_classes: int,
    input_kind: str | None = None,
    vocab_size: int | None = None,
    task: str | None = None,
    layers: Positive = 1,
    hidden_size: Positive = 128,
    bidirectional: bool = False,
    dropout: Dropout = 0.0,
    embedding_size: Positive = 64,
    pooling: Pooling = "last",
) -> nn.Module:
    """LSTM over token ids or float sequences, pooled (last/mean/max) into a linear head.

    embedding_size applies to token input only (float sequences are fed as they are); dropout
    acts between stacked layers and before the head. Padding never changes a prediction.
    """
    return _build(
        "lstm",
        input_shape,
        num_classes,
        input_kind,
        vocab_size,
        task,
        layers=layers,
        hidden_size=hidden_size,
        bidirectional=bidirectional,
        dropout=dropout,
        embedding_size=embedding_size,
        pooling=pooling,
    )


@MODELS.register()
def gru(
    input_shape: tuple[int, ...],
    num_classes: int,
    input_kind: str | None = None,
    vocab_size: int | None = None,
    task: str | None = None,
    layers: Positive = 1,
    hidden_size: Positive = 128,
    bidirectional: bool = False,
    dropout: Dropout = 0.0,
    embedding_size: Positive = 64,
    pooling: Pooling = "last",
) -> nn.Module:
    """GRU over token ids or float sequences, pooled (last/mean/max) into a linear head.

    embedding_size applies to token input only (float sequences are fed as they are); dropout
    acts between stacked layers and before the head. Padding never changes a prediction.
    """
    return _build(
        "gru",
        input_shape,
        num_classes,
        input_kind,
        vocab_size,
        task,
        layers=layers,
        hidden_size=hidden_size,
        bidirectional=bidirectional,
        dropout=dropout,
        embedding_size=embedding_size,
        pooling=pooling,
    )
