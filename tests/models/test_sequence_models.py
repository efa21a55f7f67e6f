"""Sequence models (rnn, lstm, gru, transformer, transformer_seq2seq): padding invariance, shapes,
learning, and the errors for input they cannot take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dltrain.models  # noqa: F401  (registers the models)
from dltrain.config.registry import MODELS
from dltrain.errors import UserError

VOCAB = 20  # token ids: 0 <pad>, 1 <unk>, 2.. words
WIDTH = 12  # the dataset's sequence length (input_shape[0])
SEQ2SEQ_META = {"bos_id": 1, "eos_id": 2, "max_target_length": 7}


def build(
    name: str,
    input_shape: tuple[int, ...] = (WIDTH,),
    num_classes: int = 3,
    *,
    input_kind: str | None = "tokens",
    vocab_size: int | None = VOCAB,
    task: str = "classification",
    data_meta: dict | None = None,
    **kwargs,
) -> nn.Module:
    """Validate a model section as a recipe would, then build it with dltrain's run-time args."""
    section = MODELS.validate({"name": name, **kwargs}, "model")
    return MODELS.build(
        section,
        input_shape=input_shape,
        num_classes=num_classes,
        input_kind=input_kind,
        vocab_size=vocab_size,
        task=task,
        data_meta=data_meta or {},
    )


def token_batch(
    n: int, width: int, vocab: int = VOCAB, seed: int = 0, min_length: int = 1, low: int = 2
) -> torch.Tensor:
    """n×width ids in [low, vocab), each row padded with 0s after a random length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, width + 1, (n,), generator=g)
    x = torch.randint(low, vocab, (n, width), generator=g)
    return x.masked_fill(torch.arange(width) >= lengths[:, None], 0)


def assert_padding_invariant(model: nn.Module, x: torch.Tensor, extra: int = 4) -> None:
    """Same logits for x, x with `extra` more trailing pads, and each row trimmed alone."""
    model.eval()
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(model(F.pad(x, (0, extra))), reference, atol=1e-5, rtol=1e-5)
        for i, row in enumerate(x):
            length = max(int((row != 0).sum()), 1)
            alone = model(row[None, :length])
            torch.testing.assert_close(alone, reference[i : i + 1], atol=1e-5, rtol=1e-5)


# -- padding invariance -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_recurrent_padding_invariance(name, bidirectional, pooling):
    torch.manual_seed(0)
    model = build(
        name,
        layers=2,
        hidden_size=16,
        embedding_size=8,
        bidirectional=bidirectional,
        pooling=pooling,
        dropout=0.2,
    )
    x = token_batch(6, WIDTH - 4)
    x[0] = 0  # an all-pad sequence is allowed (read as one pad step)
    assert_padding_invariant(model, x)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_padding_invariance(pooling, positional, norm_first):
    torch.manual_seed(0)
    model = build(
        "transformer",
        d_model=16,
        heads=2,
        layers=2,
        feedforward=32,
        pooling=pooling,
        positional=positional,
        norm_first=norm_first,
    )
    x = token_batch(6, WIDTH - 4)
    x[0] = 0
    assert_padding_invariant(model, x)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_seq2seq_padding_invariance(positional):
    torch.manual_seed(0)
    model = seq2seq_model(positional=positional, d_model=16, heads=2, feedforward=32).eval()
    src = token_batch(5, WIDTH - 4, low=3)
    wide = F.pad(src, (0, 4))
    tgt_in = torch.cat(
        [torch.ones(5, 1, dtype=torch.long), token_batch(5, 4, vocab=9, seed=1, low=3)], 1
    )
    with torch.no_grad():
        memory, pad = model.encode(src)
        memory_wide, pad_wide = model.encode(wide)
        valid = ~pad
        assert torch.equal(pad_wide[:, : src.size(1)], pad) and pad_wide[:, src.size(1) :].all()
        torch.testing.assert_close(
            memory_wide[:, : src.size(1)][valid], memory[valid], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(model(wide, tgt_in), model(src, tgt_in), atol=1e-5, rtol=1e-5)
        # Pads after the end of the decoder input do not change the logits before them.
        longer = model(src, F.pad(tgt_in, (0, 1)))
        torch.testing.assert_close(longer[:, :-1], model(src, tgt_in), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(wide), model.generate(src))


# -- shapes ---------------------------------------------------------------------------------------

CLASSIFIERS = [
    ("rnn", {"nonlinearity": "relu"}),
    ("lstm", {"bidirectional": True, "pooling": "mean"}),
    ("gru", {"layers": 2, "pooling": "max"}),
    ("transformer", {"d_model": 16, "heads": 4}),
    ("transformer", {"d_model": 16, "pooling": "mean", "positional": "learned"}),
]


@pytest.mark.parametrize(("name", "kwargs"), CLASSIFIERS)
def test_float_sequence_shapes(name, kwargs):
    model = build(name, (7, 5), 4, input_kind="sequence", vocab_size=None, **kwargs)
    with torch.no_grad():
        assert model(torch.randn(3, 7, 5)).shape == (3, 4)
        # e.g. 28×28 grayscale images given as 28 rows of 28 features
        rows = build(name, (28, 28), 10, input_kind="sequence", vocab_size=None, **kwargs)
        assert rows(torch.rand(2, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(("name", "kwargs"), CLASSIFIERS)
@pytest.mark.parametrize("input_kind", ["tokens", "sequence"])
def test_regression_output(name, kwargs, input_kind):
    tokens = input_kind == "tokens"
    shape = (WIDTH,) if tokens else (WIDTH, 2)
    model = build(
        name,
        shape,
        1,
        input_kind=input_kind,
        vocab_size=VOCAB if tokens else None,
        task="regression",
        **kwargs,
    )
    x = token_batch(4, WIDTH) if tokens else torch.randn(4, WIDTH, 2)
    with torch.no_grad():
        assert model(x).shape == (4, 1)


def test_input_kind_inferred_from_shape():
    """Called with the shape alone (no input_kind), (T,) + vocab is tokens, (T, F) a sequence."""
    section = MODELS.validate({"name": "gru", "hidden_size": 8}, "model")
    tokens = MODELS.build(section, input_shape=(WIDTH,), num_classes=2, vocab_size=VOCAB)
    steps = MODELS.build(section, input_shape=(WIDTH, 3), num_classes=2)
    assert tokens(token_batch(2, WIDTH)).shape == steps(torch.randn(2, WIDTH, 3)).shape == (2, 2)


def test_seq2seq_shapes_and_generate_layout():
    torch.manual_seed(0)
    model = seq2seq_model(d_model=16, heads=2).eval()
    src = token_batch(4, WIDTH, low=3)
    y = torch.tensor([[5, 6, 2, 0, 0, 0, 0]] * 4)
    tgt_in = model.decoder_input(y)
    assert tgt_in.tolist()[0] == [1, 5, 6, 2, 0, 0, 0]
    assert model(src, tgt_in).shape == (4, 7, 9)
    out = model.generate(src)
    assert out.shape == (4, 7) and out.dtype == torch.int64
    assert model.generate(src, max_length=3).shape == (4, 3)
    for row in out.tolist():  # tokens…, eos, pad…: no bos, no pad before eos, pad after it
        assert 1 not in row
        if 2 in row:
            end = row.index(2)
            assert 0 not in row[:end] and set(row[end + 1 :]) <= {0}
        else:
            assert 0 not in row


def test_learned_positions_refuse_longer_input():
    model = build("transformer", positional="learned", d_model=16).eval()
    with pytest.raises(UserError, match=r"longer than the 13 positions"):
        model(token_batch(2, WIDTH + 3, min_length=WIDTH + 3))
    sinusoidal = build("transformer", d_model=16).eval()
    assert sinusoidal(token_batch(2, WIDTH + 3)).shape == (2, 3)


def test_lstm_initialization():
    lstm = build("lstm", hidden_size=8).rnn
    hidden = 8
    assert torch.equal(lstm.bias_ih_l0[hidden : 2 * hidden], torch.ones(hidden))  # forget gate
    assert lstm.bias_hh_l0.abs().sum() == 0
    for block in lstm.weight_hh_l0.chunk(4):
        torch.testing.assert_close(block @ block.T, torch.eye(hidden), atol=1e-5, rtol=0)


def test_pad_embedding_stays_zero():
    for name in ("lstm", "transformer"):
        model = build(name)
        embedding = next(m for m in model.modules() if isinstance(m, nn.Embedding))
        assert embedding.padding_idx == 0 and embedding.weight[0].abs().sum() == 0


# -- learning -------------------------------------------------------------------------------------


def train(model, batches, loss_fn, steps, lr):
    """Adam on `steps` batches from `batches(step)`; returns the mean loss of the first/last 10."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = batches(step)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[:10]) / 10, sum(losses[-10:]) / 10


SMALL = {
    "rnn": {"hidden_size": 32, "embedding_size": 16},
    "lstm": {"hidden_size": 32, "embedding_size": 16},
    "gru": {"hidden_size": 32, "embedding_size": 16, "bidirectional": True, "pooling": "max"},
    "transformer": {"d_model": 32, "heads": 4, "feedforward": 64, "dropout": 0.0},
}


@pytest.mark.parametrize("name", list(SMALL))
def test_learns_whether_a_token_appears(name):
    """Text-like classification: is token 5 in the (padded, variable-length) sequence?"""
    torch.manual_seed(0)
    x = token_batch(512, 10, vocab=12, seed=1)
    y = (x == 5).any(1).long()
    model = build(name, (10,), 2, vocab_size=12, **SMALL[name])
    lr = 1e-3 if name == "transformer" else 1e-2
    first, last = train(model, lambda s: (x[s % 8 :: 8], y[s % 8 :: 8]), F.cross_entropy, 150, lr)
    assert last < 0.2 * first
    with torch.no_grad():
        assert (model.eval()(x).argmax(1) == y).float().mean() > 0.95


def adding_problem(n: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hochreiter & Schmidhuber's adding problem: sum the two marked values of n×steps×2 input."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, steps, generator=g)
    marked = torch.rand(n, steps, generator=g).argsort(1)[:, :2]
    marks = torch.zeros(n, steps).scatter_(1, marked, 1.0)
    return torch.stack([values, marks], -1), (values * marks).sum(1, keepdim=True)


@pytest.mark.parametrize(
    ("name", "kwargs", "lr"),
    [
        ("rnn", {"hidden_size": 64, "nonlinearity": "relu"}, 3e-3),
        ("lstm", {"hidden_size": 32}, 1e-2),
        ("gru", {"hidden_size": 32}, 1e-2),
        (
            "transformer",
            {"d_model": 32, "feedforward": 64, "dropout": 0.0, "pooling": "mean"},
            2e-3,
        ),
    ],
)
def test_learns_the_adding_problem(name, kwargs, lr):
    """Float-sequence regression: the loss falls well below the target's variance."""
    torch.manual_seed(0)
    x, y = adding_problem(1024, 10)
    model = build(
        name, (10, 2), 1, input_kind="sequence", vocab_size=None, task="regression", **kwargs
    )
    _, last = train(model, lambda s: (x[s % 16 :: 16], y[s % 16 :: 16]), F.mse_loss, 300, lr)
    assert last < 0.25 * y.var()


def seq2seq_model(**kwargs) -> nn.Module:
    """transformer_seq2seq over WIDTH source ids; target ids 0 pad, 1 bos, 2 eos, 3..8 words."""
    return build(
        "transformer_seq2seq", num_classes=9, task="seq2seq", data_meta=SEQ2SEQ_META, **kwargs
    )


def copy_task(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit strings (ids 3..12) of 1..length digits and their copy followed by eos (2)."""
    src = token_batch(n, length, vocab=13, seed=seed, low=3)
    lengths = (src != 0).sum(1)
    y = F.pad(src, (0, 1))
    y[torch.arange(n), lengths] = 2
    return src, y


def test_seq2seq_learns_to_copy_digit_strings():
    torch.manual_seed(0)
    length = 5
    model = build(
        "transformer_seq2seq",
        (length,),
        13,
        vocab_size=13,
        task="seq2seq",
        data_meta={"bos_id": 1, "eos_id": 2, "max_target_length": length + 1},
        d_model=64,
        heads=4,
        feedforward=128,
        dropout=0.0,
    )

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=0)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(200):
        src, y = copy_task(64, length, seed=step + 1)
        loss = loss_fn(model(src, model.decoder_input(y)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.1 * sum(losses[:10])
    src, y = copy_task(500, length, seed=0)  # held out
    predicted = model.eval().generate(src)
    assert predicted.shape == y.shape
    assert (predicted == y).all(1).float().mean() > 0.9


# -- wrong input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build_args", "message"),
    [
        (
            {"name": "transformer", "d_model": 30, "heads": 4},
            r"d_model \(30\) must be divisible by heads \(4\)",
        ),
        (
            {"name": "transformer_seq2seq", "d_model": 10, "heads": 3, "task": "seq2seq"},
            r"d_model \(10\) must be divisible by heads \(3\)",
        ),
        (
            {"name": "transformer_seq2seq"},
            r"'transformer_seq2seq' predicts a token sequence .* task is classification; "
            r"use model: transformer",
        ),
        (
            {
                "name": "transformer_seq2seq",
                "task": "seq2seq",
                "input_shape": (8, 2),
                "input_kind": "sequence",
                "vocab_size": None,
            },
            r"'transformer_seq2seq' takes token ids, but the dataset gives float sequences",
        ),
        (
            {"name": "lstm", "task": "seq2seq"},
            r"'lstm' predicts one label .* task is seq2seq .*use model: transformer_seq2seq",
        ),
        (
            {"name": "rnn", "input_shape": (1, 28, 28), "input_kind": "image", "vocab_size": None},
            r"'rnn' takes token ids or float sequences, but the dataset gives image input "
            r"\(C×H×W\) of shape \(1, 28, 28\); use model: seed_cnn",
        ),
        (
            {
                "name": "transformer",
                "input_shape": (20,),
                "input_kind": "tabular",
                "vocab_size": None,
            },
            r"'transformer' takes .* but the dataset gives tabular input .*; use model: mlp",
        ),
        (
            {"name": "gru", "input_shape": (1, 28, 28), "input_kind": None, "vocab_size": None},
            r"'gru' takes token ids or float sequences, but the dataset gives image input",
        ),
        (
            {"name": "lstm", "vocab_size": None},
            r"'lstm' needs the vocabulary size of token input",
        ),
        (
            {"name": "mlp"},
            r"'mlp' takes tabular or image input, but the dataset gives token ids .* of shape "
            r"\(12,\); use a sequence model: lstm, gru, rnn or transformer",
        ),
        (
            {"name": "mlp", "input_shape": (12, 3), "input_kind": "sequence", "vocab_size": None},
            r"'mlp' takes tabular or image input, but the dataset gives float sequences",
        ),
        (
            {"name": "seed_cnn"},
            r"'seed_cnn' takes image input \(C×H×W\), but the dataset gives token ids .*"
            r"use a sequence model",
        ),
        (
            {
                "name": "resnet18",
                "input_shape": (28, 28),
                "input_kind": "sequence",
                "vocab_size": None,
            },
            r"'resnet18' takes image input .* float sequences",
        ),
        (
            {
                "name": "torchvision:resnet18",
                "input_shape": (28, 28),
                "input_kind": "sequence",
                "vocab_size": None,
            },
            r"'torchvision:resnet18' takes image input .* float sequences",
        ),
    ],
)
def test_wrong_input_is_a_user_error(build_args, message):
    name = build_args.pop("name")
    model_kwargs = {k: v for k, v in build_args.items() if k in ("d_model", "heads")}
    runtime = {k: v for k, v in build_args.items() if k not in model_kwargs}
    if name == "transformer_seq2seq":
        runtime.setdefault("data_meta", SEQ2SEQ_META)
    with pytest.raises(UserError, match=message):
        build(name, **runtime, **model_kwargs)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"name": "lstm", "layers": 0}, r"model\.layers: .*greater than or equal to 1"),
        ({"name": "gru", "dropout": 1.0}, r"model\.dropout: .*less than 1"),
        ({"name": "rnn", "pooling": "first"}, r"model\.pooling: .*'last', 'mean' or 'max'"),
        ({"name": "lstm", "nonlinearity": "relu"}, r"model\.nonlinearity: unknown key"),
        ({"name": "transformer", "pooling": "max"}, r"model\.pooling: .*'cls' or 'mean'"),
        ({"name": "transformer", "positional": "rotary"}, r"model\.positional"),
        ({"name": "transformer", "vocab_size": 100}, r"model\.vocab_size: .*run time"),
        ({"name": "transformer_seq2seq", "layers": 2}, r"model\.layers: unknown key"),
    ],
)
def test_validate_rejects(section, message):
    with pytest.raises(UserError, match=message):
        MODELS.validate(section, "model")


def test_listed_with_descriptions():
    names = MODELS.names()
    for name in ("rnn", "lstm", "gru", "transformer", "transformer_seq2seq"):
        assert name in names
        assert MODELS.summary(name)
    assert "LSTM" in MODELS.summary("lstm")
    assert "encoder–decoder" in MODELS.summary("transformer_seq2seq")
    rnn_args = [a.name for a in MODELS.arguments("rnn")]
    assert rnn_args == [
        "layers",
        "hidden_size",
        "bidirectional",
        "dropout",
        "embedding_size",
        "pooling",
        "nonlinearity",
    ]
    assert "nonlinearity" not in [a.name for a in MODELS.arguments("lstm")]
    runtime = {"input_shape", "num_classes", "input_kind", "vocab_size", "task", "data_meta"}
    for name in names:  # dltrain's run-time arguments are never offered to recipes
        assert not runtime & {a.name for a in MODELS.arguments(name)}
