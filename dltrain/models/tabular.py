"""Models for tables that read each column as a column (Gorishniy et al. 2021, "Revisiting
Deep Learning Models for Tabular Data"; 2022, "On Embeddings for Numerical Features").

Every column becomes a d-dimensional token: a numeric value (or a missing indicator) through
periodic embeddings — sin and cos of learned frequencies, then a per-column linear layer and
ReLU ("PLR") — and a categorical column's one-hot group through an embedding table. `mlp_plr`
flattens the tokens into an MLP; `ft_transformer` attends across them and reads out a [CLS]
token. The columns come from the table encoding in `data_meta["table"]` (which input features
are one column's value, its one-hot group, its indicator); input without one (an npz of
numbers) is a numeric column per feature.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from dltrain.config.registry import MODELS
from dltrain.errors import UserError
from dltrain.models.inputs import require_table
from dltrain.models.mlp import HiddenSizes


def feature_groups(data_meta: dict[str, Any] | None, width: int) -> list[tuple[str, slice]]:
    """(kind, the input features it spans) per column, in input order."""
    if not data_meta or "table" not in data_meta:
        return [("numeric", slice(i, i + 1)) for i in range(width)]
    groups, start = [], 0
    for column in data_meta["table"]["columns"]:  # dltrain.data.table_encoding's, as stored
        if column["kind"] == "categorical":
            groups.append(("categorical", slice(start, start + 1 + len(column["categories"]))))
        else:
            groups.append(("numeric", slice(start, start + 1)))
        start = groups[-1][1].stop
        if column["indicator"]:
            groups.append(("numeric", slice(start, start + 1)))
            start += 1
    return groups


class PeriodicEmbeddings(nn.Module):
    """n numeric features → n tokens of size d: ReLU(Linear_j([cos 2πc_j x_j, sin 2πc_j x_j]))
    with k learned frequencies c_j per feature, started at N(0, scale²)."""

    def __init__(self, n: int, d: int, frequencies: int, scale: float):
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(n, frequencies) * scale)
        bound = 1 / math.sqrt(2 * frequencies)
        self.weight = nn.Parameter(torch.empty(n, 2 * frequencies, d).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, d).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B×n → B×n×d
        angles = 2 * math.pi * self.frequencies * x.unsqueeze(-1)
        periodic = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return torch.relu(torch.einsum("bnk,nkd->bnd", periodic, self.weight) + self.bias)


class PiecewiseLinearEmbeddings(nn.Module):
    """n numeric features → n tokens of size d: ReLU(Linear_j(PLE(x_j))), where PLE (Gorishniy
    et al. 2022) encodes x by `bins` quantile bins of the training values: 1 for each bin below
    x, x's position within its own bin, 0 above — the threshold-like view of a value that trees
    split on. The bin edges are a buffer set by `fit` from training inputs (build.py calls it
    through ColumnTokens.fit_to_data) and saved with the weights."""

    def __init__(self, n: int, d: int, bins: int):
        super().__init__()
        # until fitted: even bins over ±2 standard deviations (the inputs are standardised)
        self.register_buffer("edges", torch.linspace(-2, 2, bins + 1).repeat(n, 1))
        bound = 1 / math.sqrt(bins)
        self.weight = nn.Parameter(torch.empty(n, bins, d).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, d).uniform_(-bound, bound))

    def fit(self, values: torch.Tensor) -> None:  # B×n training values
        quantiles = torch.linspace(0, 1, self.edges.shape[1], device=values.device)
        edges = torch.quantile(values.float(), quantiles, dim=0).T  # n×(bins+1)
        # a column with few distinct values repeats edges: keep the bins ordered and non-empty
        steps = torch.diff(edges, dim=1).clamp(min=1e-6)
        self.edges.copy_(torch.cat([edges[:, :1], edges[:, :1] + steps.cumsum(1)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B×n → B×n×d
        low, high = self.edges[:, :-1], self.edges[:, 1:]
        encoded = ((x.unsqueeze(-1) - low) / (high - low)).clamp(0, 1)
        return torch.relu(torch.einsum("bnk,nkd->bnd", encoded, self.weight) + self.bias)


class ColumnTokens(nn.Module):
    """The input features → one d-sized token per column (B×columns×d), in column order;
    numeric columns through `numeric(n)` (PeriodicEmbeddings or PiecewiseLinearEmbeddings)."""

    def __init__(self, groups: list[tuple[str, slice]], d: int, numeric_embeddings):
        super().__init__()
        numeric = [i for i, (kind, _) in enumerate(groups) if kind == "numeric"]
        categorical = [i for i, (kind, _) in enumerate(groups) if kind == "categorical"]
        at = [groups[i][1].start for i in numeric]
        self.register_buffer("numeric_at", torch.tensor(at, dtype=torch.long))
        self.spans = [groups[i][1] for i in categorical]
        # named `periodic` whatever the embedding: the key in checkpoints written before
        # piecewise-linear embeddings existed
        self.periodic = numeric_embeddings(len(numeric)) if numeric else None
        # a linear map of a one-hot group is a lookup in an embedding table (plus the column's
        # own offset, its bias)
        self.tables = nn.ModuleList(nn.Linear(s.stop - s.start, d) for s in self.spans)
        made = numeric + categorical  # tokens are made in this order...
        self.register_buffer("order", torch.tensor([made.index(i) for i in range(len(groups))]))

    def fit_to_data(self, inputs: torch.Tensor) -> None:
        """Embeddings fitted to the training values (piecewise-linear bins) see them here."""
        if self.periodic is not None and hasattr(self.periodic, "fit"):
            self.periodic.fit(inputs.flatten(1)[:, self.numeric_at])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = []
        if self.periodic is not None:
            tokens.append(self.periodic(x[:, self.numeric_at]))
        tokens += [table(x[:, span]).unsqueeze(1) for table, span in zip(self.tables, self.spans)]
        return torch.cat(tokens, dim=1)[:, self.order]  # ...and put back in the columns' order


Dropout = Annotated[float, Field(ge=0, lt=1)]


@MODELS.register()
def mlp_plr(
    input_shape: tuple[int, ...],
    num_classes: int,
    data_meta: dict[str, Any] | None = None,
    hidden: HiddenSizes = (256, 256),
    dropout: Dropout = 0.1,
    d_embedding: Annotated[int, Field(ge=1)] = 24,
    frequencies: Annotated[int, Field(ge=1)] = 48,
    frequency_scale: Annotated[float, Field(gt=0)] = 0.01,
    input_kind: str = "tabular",
) -> nn.Module:
    """MLP over periodic embeddings of numeric columns and embeddings of categorical ones
    (Gorishniy et al. 2022: "MLP-PLR"); for tables."""
    require_table("mlp_plr", input_shape, input_kind)
    groups = feature_groups(data_meta, math.prod(input_shape))
    periodic = lambda n: PeriodicEmbeddings(n, d_embedding, frequencies, frequency_scale)  # noqa: E731
    return _tokens_mlp(ColumnTokens(groups, d_embedding, periodic), len(groups) * d_embedding,
                       hidden, dropout, num_classes)  # fmt: skip


@MODELS.register()
def mlp_ple(
    input_shape: tuple[int, ...],
    num_classes: int,
    data_meta: dict[str, Any] | None = None,
    hidden: HiddenSizes = (256, 256),
    dropout: Dropout = 0.1,
    d_embedding: Annotated[int, Field(ge=1)] = 16,
    bins: Annotated[int, Field(ge=2)] = 32,
    input_kind: str = "tabular",
) -> nn.Module:
    """MLP over piecewise-linear encodings of numeric columns (quantile bins of the training
    values) and embeddings of categorical ones (Gorishniy et al. 2022: "MLP-PLE"); for tables."""
    require_table("mlp_ple", input_shape, input_kind)
    groups = feature_groups(data_meta, math.prod(input_shape))
    piecewise = lambda n: PiecewiseLinearEmbeddings(n, d_embedding, bins)  # noqa: E731
    return _tokens_mlp(ColumnTokens(groups, d_embedding, piecewise), len(groups) * d_embedding,
                       hidden, dropout, num_classes)  # fmt: skip


def _tokens_mlp(
    tokens: ColumnTokens, width: int, hidden: tuple[int, ...], dropout: float, out: int
) -> nn.Module:
    layers: list[nn.Module] = [tokens, nn.Flatten()]
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class FTTransformer(nn.Module):
    def __init__(
        self, tokens: ColumnTokens, d: int, blocks: int, heads: int, dropout: float, out: int
    ):
        super().__init__()
        self.tokens = tokens
        self.cls = nn.Parameter(torch.randn(1, 1, d) / math.sqrt(d))
        layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=d * 4 // 3, dropout=dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.ReLU(), nn.Linear(d, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(x)
        tokens = torch.cat([tokens, self.cls.expand(len(x), -1, -1)], dim=1)
        return self.head(self.encoder(tokens)[:, -1])


@MODELS.register()
def ft_transformer(
    input_shape: tuple[int, ...],
    num_classes: int,
    data_meta: dict[str, Any] | None = None,
    d_token: Annotated[int, Field(ge=8)] = 64,
    blocks: Annotated[int, Field(ge=1)] = 2,
    heads: Annotated[int, Field(ge=1)] = 8,
    dropout: Dropout = 0.1,
    frequencies: Annotated[int, Field(ge=1)] = 16,
    frequency_scale: Annotated[float, Field(gt=0)] = 0.01,
    input_kind: str = "tabular",
) -> nn.Module:
    """FT-Transformer (Gorishniy et al. 2021) over per-column tokens (periodic embeddings for
    numeric columns); for tables. d_token must be a multiple of heads."""
    require_table("ft_transformer", input_shape, input_kind)
    if d_token % heads:
        raise UserError(f"model.d_token ({d_token}) must be a multiple of model.heads ({heads}).")
    groups = feature_groups(data_meta, math.prod(input_shape))
    periodic = lambda n: PeriodicEmbeddings(n, d_token, frequencies, frequency_scale)  # noqa: E731
    tokens = ColumnTokens(groups, d_token, periodic)
    return FTTransformer(tokens, d_token, blocks, heads, dropout, num_classes)
