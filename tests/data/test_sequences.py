"""Synthetic sequence tasks: the adding problem, reversing and sorting digit strings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dltrain.config.registry import DATASETS
from dltrain.data.sequences import adding, reverse, sort
from dltrain.data.text import encode_texts
from dltrain.errors import RecipeError, UserError

# -- adding ---------------------------------------------------------------------------------


def test_adding_shapes_markers_and_targets():
    loaded = adding(length=20, train_size=500, test_size=100, seed=1)
    assert loaded.kind == "sequence" and loaded.task == "regression"
    assert loaded.classes == ["sum"]
    x, y = loaded.train.x, loaded.train.y
    assert x.shape == (500, 20, 2) and x.dtype == torch.float32
    assert y.shape == (500,) and y.dtype == torch.float32
    assert loaded.test.x.shape == (100, 20, 2)
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert set(markers.unique().tolist()) == {0.0, 1.0}
    assert (markers.sum(1) == 2).all()
    assert (markers[:, :10].sum(1) == 1).all() and (markers[:, 10:].sum(1) == 1).all()
    assert torch.allclose(y, (values * markers).sum(1), atol=1e-6)


def test_adding_baseline_mse_is_one_sixth():
    loaded = adding(seed=0)  # defaults: T = 100, 10000 train, 1000 test
    assert loaded.train.x.shape == (10000, 100, 2) and loaded.test.x.shape == (1000, 100, 2)
    baseline = float(((loaded.test.y - 1.0) ** 2).mean())
    assert abs(baseline - 1 / 6) < 0.01


def test_adding_is_deterministic_and_test_split_ignores_train_size():
    first = adding(length=8, train_size=50, test_size=20, seed=5)
    again = adding(length=8, train_size=50, test_size=20, seed=5)
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.test.y, again.test.y)
    bigger = adding(length=8, train_size=80, test_size=20, seed=5)
    assert torch.equal(first.test.x, bigger.test.x)
    other = adding(length=8, train_size=50, test_size=20, seed=6)
    assert not torch.equal(first.train.x, other.train.x)
    shortest = adding(length=2, train_size=10, test_size=1, seed=0)
    assert (shortest.train.x[..., 1] == 1).all()  # one marker in each half of two steps


# -- reverse and sort -----------------------------------------------------------------------

SOURCE = ["<pad>", "<unk>", *"0123456789"]
TARGET = ["<pad>", "<bos>", "<eos>", *"0123456789"]


def _strings(x: torch.Tensor, vocab: list[str], stop: str) -> list[str]:
    """Rows of ids as strings up to the first `stop` token (or the end)."""
    out = []
    for row in x.tolist():
        chars = [vocab[i] for i in row]
        out.append("".join(chars[: chars.index(stop)] if stop in chars else chars))
    return out


@pytest.mark.parametrize(
    ("factory", "answer"), [(reverse, lambda s: s[::-1]), (sort, lambda s: "".join(sorted(s)))]
)
def test_targets_are_the_answer_then_eos_with_padding(factory, answer):
    loaded = factory(min_length=2, max_length=6, train_size=3000, test_size=300, seed=0)
    assert loaded.kind == "tokens" and loaded.task == "seq2seq"
    assert loaded.classes == TARGET
    assert loaded.meta["source_vocab"] == SOURCE == loaded.meta["vocab"]
    assert loaded.meta["bos_id"] == 1 and loaded.meta["eos_id"] == 2
    assert loaded.meta["max_target_length"] == 7
    for split in (loaded.train, loaded.test):
        x, y = split.x, split.y
        assert x.shape == (len(split), 6) and y.shape == (len(split), 7)
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        lengths = (x > 0).sum(1)
        assert lengths.min() >= 2 and lengths.max() <= 6
        positions = torch.arange(6)
        assert torch.equal(x > 0, positions < lengths[:, None])  # pads only at the end
        assert ((x == 0) | ((x >= 2) & (x <= 11))).all()
        assert (y[torch.arange(len(split)), lengths] == 2).all()  # eos right after the answer
        assert torch.equal(y > 0, torch.arange(7) <= lengths[:, None])
        sources = _strings(x, SOURCE, "<pad>")
        targets = _strings(y, TARGET, "<eos>")
        assert targets == [answer(s) for s in sources]
    # Lengths are uniform over 2..6 (not concentrated on the longest), except that length 2
    # has only 100 distinct strings: all are used and the rest spreads over the other lengths.
    counts = torch.bincount((loaded.train.x > 0).sum(1), minlength=7)
    counts += torch.bincount((loaded.test.x > 0).sum(1), minlength=7)
    assert counts[2] == 100 and counts[3:].min() > 700


@pytest.mark.parametrize("factory", [reverse, sort])
def test_no_test_string_in_train_and_deterministic(factory):
    loaded = factory(seed=0)  # defaults: lengths 1..10, 20000 train, 2000 test
    assert loaded.train.x.shape == (20000, 10) and loaded.test.y.shape == (2000, 11)
    train = _strings(loaded.train.x, SOURCE, "<pad>")
    test = _strings(loaded.test.x, SOURCE, "<pad>")
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    # Length 1 has only 10 strings: its share is capped and the rest spread over other lengths.
    assert sum(len(s) == 1 for s in train + test) == 10
    again = factory(seed=0)
    assert torch.equal(again.train.x, loaded.train.x) and torch.equal(again.test.y, loaded.test.y)
    other = factory(seed=1)
    assert not torch.equal(other.test.x, loaded.test.x)


def test_a_small_space_is_used_up_exactly():
    loaded = reverse(min_length=2, max_length=2, train_size=90, test_size=10, seed=3)
    train = _strings(loaded.train.x, SOURCE, "<pad>")
    test = _strings(loaded.test.x, SOURCE, "<pad>")
    assert sorted(train + test) == [f"{i:02d}" for i in range(100)]


def test_impossible_sizes_and_lengths_are_user_errors():
    with pytest.raises(UserError, match=r"needs train_size \+ test_size = 112 .* only 110 exist"):
        sort(min_length=1, max_length=2, train_size=100, test_size=12)
    sort(min_length=1, max_length=2, train_size=100, test_size=10)  # exactly all 110 is fine
    with pytest.raises(RecipeError, match="data.min_length: is 5 but data.max_length is 3"):
        reverse(min_length=5, max_length=3)
    with pytest.raises(RecipeError):
        DATASETS.validate({"name": "reverse", "min_length": 0}, "data")
    with pytest.raises(RecipeError):
        DATASETS.validate({"name": "adding", "length": 1}, "data")


def test_encode_texts_turns_digit_strings_into_the_source_layout():
    loaded = reverse(min_length=1, max_length=5, train_size=200, test_size=20, seed=0)
    sources = _strings(loaded.test.x, SOURCE, "<pad>")
    assert torch.equal(encode_texts(sources, loaded.meta), loaded.test.x)


def test_sequence_datasets_are_registered_with_descriptions():
    for name in ("adding", "reverse", "sort", "text_csv"):
        assert name in DATASETS.names() and DATASETS.summary(name)
    section = DATASETS.validate({"name": "sort", "max_length": 4, "train_size": 100}, "data")
    loaded = DATASETS.build(section, seed=2)
    assert loaded.train.x.shape == (100, 4) and np.all(loaded.test.y[:, -1].numpy() >= 0)
