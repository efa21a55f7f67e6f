"""Synthetic sequence tasks with known answers: the adding problem, reversing and sorting digits.

Each is deterministic for its seed (numpy `default_rng`), needs no files, and has a known
solution, so a sequence model's result can be judged: the adding problem's trivial baseline
(always predict 1.0) has MSE 1/6 ≈ 0.167; reverse and sort are solved exactly by a good model.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from dltrain.config.registry import DATASETS
from dltrain.data.base import ArraySplit, DatasetSplits
from dltrain.errors import RecipeError

# Seq2seq vocabularies. Source: <pad> 0, <unk> 1, digits 2..11. Target: <pad> 0, <bos> 1,
# <eos> 2, digits 3..12 (the target vocabulary is the dataset's `classes`).
DIGITS = [str(d) for d in range(10)]
SOURCE_VOCAB = ["<pad>", "<unk>", *DIGITS]
TARGET_VOCAB = ["<pad>", "<bos>", "<eos>", *DIGITS]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SOURCE_DIGIT0, TARGET_DIGIT0 = 2, 3

Size = Annotated[int, Field(ge=1)]


# -- the adding problem ---------------------------------------------------------------------


@DATASETS.register(tasks=("regression",))
def adding(
    length: Annotated[int, Field(ge=2)] = 100,
    train_size: Size = 10000,
    test_size: Size = 1000,
    seed: int = 0,
) -> DatasetSplits:
    """The adding problem (regression): sum the two marked values of a length-T sequence.

    Each step has two channels: a value uniform in [0, 1) and a marker that is 1 at exactly two
    steps, one uniform in the first half (t < T // 2) and one in the second half, else 0 (the
    variant of Le et al. 2015 and Arjovsky et al. 2016, after Hochreiter & Schmidhuber 1997).
    x is float32 N×T×2, y float32 (N,) the sum of the two marked values. Predicting 1.0 always
    gives MSE 1/6 ≈ 0.167: a model must beat that clearly to have learnt the task. The test
    split depends only on seed, length and test_size.
    """
    train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
    return DatasetSplits(
        kind="sequence",
        task="regression",
        classes=["sum"],
        train=_adding_split(np.random.default_rng(train_seed), train_size, length),
        test=_adding_split(np.random.default_rng(test_seed), test_size, length),
        meta={"length": length, "channels": ["value", "marker"]},
    )


def _adding_split(rng: np.random.Generator, n: int, length: int) -> ArraySplit:
    values = rng.random((n, length), dtype=np.float32)
    half = length // 2
    rows = np.arange(n)
    first = rng.integers(0, half, n)
    second = rng.integers(half, length, n)
    markers = np.zeros((n, length), dtype=np.float32)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1)
    y = values[rows, first] + values[rows, second]  # float32, exactly the marked sum
    return ArraySplit(torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)))


# -- digit strings: reverse and sort ----------------------------------------------------------


@DATASETS.register(tasks=("seq2seq",))
def reverse(
    min_length: Size = 1,
    max_length: Size = 10,
    train_size: Size = 20000,
    test_size: Size = 2000,
    seed: int = 0,
) -> DatasetSplits:
    """Seq2seq: reverse a string of random digits ('3071' -> '1703'); lengths min..max_length.

    Lengths are uniform over min_length..max_length (capped by how many distinct strings each
    length has), digits uniform. Every string is distinct, so no test string is in train; asking
    for more strings than exist is an error. x: N×max_length source ids (<pad> 0, <unk> 1,
    digits 2..11) padded with 0; y: N×(max_length+1) target ids (classes: <pad> 0, <bos> 1,
    <eos> 2, digits 3..12), the answer then <eos>, padded with 0.
    """
    return _digit_task("reverse", min_length, max_length, train_size, test_size, seed)


@DATASETS.register(tasks=("seq2seq",))
def sort(
    min_length: Size = 1,
    max_length: Size = 10,
    train_size: Size = 20000,
    test_size: Size = 2000,
    seed: int = 0,
) -> DatasetSplits:
    """Seq2seq: sort a string of random digits ascending ('3071' -> '0137'); lengths min..max.

    Strings are drawn as for `reverse` (uniform lengths, all distinct, no test string in train)
    with the same layout: x N×max_length source ids, y N×(max_length+1) target ids ending in
    <eos>, both padded with 0; classes is the target vocabulary.
    """
    return _digit_task("sort", min_length, max_length, train_size, test_size, seed)


def _digit_task(
    task: str, min_length: int, max_length: int, train_size: int, test_size: int, seed: int
) -> DatasetSplits:
    if min_length > max_length:
        raise RecipeError(
            "data.min_length",
            f"is {min_length} but data.max_length is {max_length}; set min_length <= max_length.",
        )
    n = train_size + test_size
    available = sum(10**length for length in range(min_length, max_length + 1))
    if n > available:
        raise RecipeError(
            "data.train_size",
            f"{task} needs train_size + test_size = {n} distinct digit strings, but only "
            f"{available} exist with lengths {min_length}..{max_length}. Lower "
            "data.train_size / data.test_size or raise data.max_length.",
        )
    rng = np.random.default_rng(seed)
    digits, lengths = _distinct_strings(rng, n, min_length, max_length)
    order = rng.permutation(n)
    digits, lengths = digits[order], lengths[order]
    answers = _reversed(digits, lengths) if task == "reverse" else _sorted(digits)
    x = np.where(digits >= 0, digits + SOURCE_DIGIT0, PAD_ID)
    y = np.zeros((n, max_length + 1), dtype=np.int64)
    y[:, :max_length] = np.where(answers >= 0, answers + TARGET_DIGIT0, PAD_ID)
    y[np.arange(n), lengths] = EOS_ID

    def split(rows: slice) -> ArraySplit:
        return ArraySplit(
            torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(y[rows])),
        )

    return DatasetSplits(
        kind="tokens",
        task="seq2seq",
        classes=list(TARGET_VOCAB),
        train=split(slice(test_size, None)),
        test=split(slice(0, test_size)),
        meta={
            "source_vocab": list(SOURCE_VOCAB),
            "vocab": list(SOURCE_VOCAB),
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "max_target_length": max_length + 1,
            # With these, text.encode_texts turns raw digit strings into model input.
            "tokenizer": {"kind": "char", "lower": False},
            "max_length": max_length,
        },
    )


def _distinct_strings(
    rng: np.random.Generator, n: int, min_length: int, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """n distinct digit strings as an n×max_length array (-1 after the end) and their lengths."""
    counts = _length_counts(rng, n, min_length, max_length)
    digits = np.full((n, max_length), -1, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    start = 0
    for length, count in zip(range(min_length, max_length + 1), counts):
        if count:
            digits[start : start + count, :length] = _distinct_of_length(rng, count, length)
            lengths[start : start + count] = length
            start += count
    return digits, lengths


def _length_counts(rng: np.random.Generator, n: int, min_length: int, max_length: int) -> list:
    """How many strings of each length: uniform over the lengths, each capped by 10**length."""
    capacity = [10**length for length in range(min_length, max_length + 1)]
    counts = np.bincount(rng.integers(0, len(capacity), n), minlength=len(capacity)).tolist()
    while excess := sum(max(c - cap, 0) for c, cap in zip(counts, capacity)):
        counts = [min(c, cap) for c, cap in zip(counts, capacity)]
        open_ = [i for i, (c, cap) in enumerate(zip(counts, capacity)) if c < cap]
        extra = np.bincount(rng.integers(0, len(open_), excess), minlength=len(open_))
        for i, more in zip(open_, extra.tolist()):
            counts[i] += more
    return counts


def _distinct_of_length(rng: np.random.Generator, count: int, length: int) -> np.ndarray:
    """count distinct random digit strings of one length, as a count×length array."""
    space = 10**length
    if space <= max(2 * count, 10**6):  # small space: draw codes without replacement
        codes = rng.choice(space, count, replace=False)
        powers = 10 ** np.arange(length - 1, -1, -1, dtype=np.int64)
        return (codes[:, None] // powers) % 10
    rows = np.empty((0, length), dtype=np.int64)
    while len(rows) < count:  # large space (> 2 count): draws rarely collide
        more = rng.integers(0, 10, (count - len(rows), length))
        rows = np.concatenate([rows, more])
        _, first = np.unique(rows, axis=0, return_index=True)
        rows = rows[np.sort(first)]  # keep draw order: sorting would bias the strings kept
    return rows


def _reversed(digits: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each row's first `length` digits reversed, -1 after."""
    source = lengths[:, None] - 1 - np.arange(digits.shape[1])
    picked = np.take_along_axis(digits, np.clip(source, 0, None), axis=1)
    return np.where(source >= 0, picked, -1)


def _sorted(digits: np.ndarray) -> np.ndarray:
    """Each row's digits sorted ascending, -1 after (padding sorts last as 10)."""
    ordered = np.sort(np.where(digits < 0, 10, digits), axis=1)
    return np.where(ordered == 10, -1, ordered)
