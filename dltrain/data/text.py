"""`text_csv`: text classification from CSV files, with a tokenizer and a vocabulary.

Conventions (also what `encode_texts` reproduces from a checkpoint's data_meta):

* Tokenizer: `word` splits on the regex `\\w+|[^\\w\\s]` (runs of letters, digits and underscores;
  every other non-space character is a token of its own; whitespace separates and is dropped),
  `char` makes each character a token, whitespace included. `lower` lower-cases first.
* Vocabulary: built from the TRAINING split only. Id 0 is `<pad>`, id 1 is `<unk>`, then the
  tokens seen at least `min_freq` times, most frequent first, ties in alphabetical (code point)
  order, so the vocabulary depends only on the token counts, never on the row order.
  `max_size` counts the two specials: it is the size of the whole id table (embedding rows).
  Tokens left out, or never seen in training, encode as `<unk>`.
* Encoding: a text with no tokens (empty, or only whitespace for `word`) encodes as one
  `<unk>`, so every sequence has length >= 1. Sequences are truncated to L and padded with 0
  (`<pad>`) at the end, where L = min(max_length, longest encoded training sequence).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from dltrain.config.registry import DATASETS
from dltrain.data import hf_tokens
from dltrain.data.base import ArraySplit, DatasetSplits
from dltrain.data.csv_tables import (
    QUOTE_THE_TEXTS,
    CsvTable,
    check_file_choice,
    label_targets,
    read_table,
)
from dltrain.data.paths import InputPath
from dltrain.data.splits import random_split, stratified_split
from dltrain.errors import UserError
from dltrain.system.hub import load_pretrained, transformers_module

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Tokenizer:
    """Splits a text into string tokens: words and punctuation (`word`) or characters (`char`)."""

    kind: Literal["char", "word"] = "word"
    lower: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("char", "word"):
            raise ValueError(f"tokenizer kind must be 'char' or 'word', got {self.kind!r}")

    def tokenize(self, text: str) -> list[str]:
        if self.lower:
            text = text.lower()
        return list(text) if self.kind == "char" else WORD_PATTERN.findall(text)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "lower": self.lower}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        return cls(kind=data["kind"], lower=bool(data["lower"]))


class Vocabulary:
    """Token strings ↔ ids, with `<pad>` = 0 and `<unk>` = 1, plus the tokenizer that feeds it."""

    def __init__(self, tokens: Sequence[str], tokenizer: Tokenizer | None = None):
        tokens = list(tokens)
        if tokens[:2] != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}; got {tokens[:2]!r}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary lists each token once")
        self.tokens = tokens
        self.tokenizer = tokenizer or Tokenizer()
        self.index = {token: i for i, token in enumerate(tokens)}

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        tokenizer: Tokenizer,
        min_freq: int = 1,
        max_size: int | None = None,
    ) -> Vocabulary:
        """The vocabulary of `texts` (the training split): see the module docstring for order."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size < 2:
            raise ValueError(f"max_size counts <pad> and <unk>, so must be >= 2, got {max_size}")
        counts = Counter(token for text in texts for token in tokenizer.tokenize(text))
        ranked = sorted(
            (t for t, n in counts.items() if n >= min_freq and t not in (PAD, UNK)),
            key=lambda t: (-counts[t], t),
        )
        if max_size is not None:
            ranked = ranked[: max_size - 2]
        return cls([PAD, UNK, *ranked], tokenizer)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of `text`, truncated to `max_length`; a text without tokens is [<unk>]."""
        ids = [self.index.get(token, UNK_ID) for token in self.tokenizer.tokenize(text)]
        ids = ids or [UNK_ID]
        return ids if max_length is None else ids[:max_length]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Token strings of ids, `<pad>` left out."""
        return [self.tokens[i] for i in ids if i != PAD_ID]

    def to_dict(self) -> dict[str, Any]:
        """{"vocab": tokens in id order, "tokenizer": {...}}: the keys of a text data_meta."""
        return {"vocab": list(self.tokens), "tokenizer": self.tokenizer.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(data["vocab"], Tokenizer.from_dict(data["tokenizer"]))


def pad_sequences(sequences: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """An N×length int64 array: each sequence truncated to `length`, padded with 0 at the end."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, ids in zip(out, sequences):
        ids = ids[:length]
        row[: len(ids)] = ids
    return out


def encode_texts(texts: list[str], meta: dict[str, Any]) -> torch.Tensor:
    """Raw texts as the N×L int64 ids a text model was trained on, from its data_meta alone."""
    if "hf_tokenizer" in meta:
        return hf_tokens.encode_with_meta(texts, meta)
    missing = [key for key in ("vocab", "tokenizer", "max_length") if key not in meta]
    if missing:
        raise UserError(
            f"the checkpoint's data_meta lacks {', '.join(missing)}: it was not trained on text "
            "(token input), so raw text cannot be encoded for it. Pass the input it was trained "
            "on instead."
        )
    vocab = Vocabulary.from_dict(meta)
    length = int(meta["max_length"])
    return torch.from_numpy(pad_sequences([vocab.encode(t, length) for t in texts], length))


# -- the dataset ----------------------------------------------------------------------------


@DATASETS.register()
def text_csv(
    path: InputPath | None = None,
    train: InputPath | None = None,
    test: InputPath | None = None,
    val: InputPath | None = None,
    text_column: str = "text",
    label_column: str = "label",
    tokenizer: Literal["char", "word", "hf"] = "word",
    lower: bool = True,
    min_freq: Annotated[int, Field(ge=1)] = 1,
    max_size: Annotated[int, Field(ge=2)] | None = 20000,
    max_length: Annotated[int, Field(ge=1)] = 200,
    test_split: Annotated[float, Field(gt=0, lt=1)] = 0.2,
    seed: int = 0,
    delimiter: Literal["auto", ",", ";", "tab", "|"] = "auto",
    model: dict[str, Any] | None = None,
    saved_meta: dict[str, Any] | None = None,
    task: str = "auto",
) -> DatasetSplits:
    """Texts from CSV files: a text column and a label, as word or char tokens, or
    (`tokenizer: hf`, with `model: {name: hf}`) the model's own tokenizer. The label is a class,
    or a number to predict (regression), read off the column as for csv tables (data.task).

    Give `path` (one file; a stratified test split of `test_split` is carved with the run's
    seed) or `train` with an optional `test` file, and optionally a `val` file (data.val_split
    is then not used); each needs a header row. Quoted texts may span lines; the `delimiter`
    is sniffed unless given. Classes: the sorted training labels (numerically if integers).
    The vocabulary (`<pad>` 0, `<unk>` 1, then by frequency; `max_size` counts the specials;
    tokens seen fewer than `min_freq` times are `<unk>`) comes from the training split only.
    Texts become token ids padded with 0 at the end to L = min(max_length, longest training
    text); an empty text is one `<unk>`.
    """
    check_file_choice(path, train, test)
    _check_distinct_columns(text_column, label_column)
    read = functools.partial(_read_text_table, delimiter=delimiter)
    main = read(path or train, "data.path" if path else "data.train")
    texts, raw = _texts_and_labels(main, text_column, label_column)
    chosen, classes, targets = label_targets(main, label_column, task)
    y = targets(main, raw)

    def labelled(file: str, key: str) -> tuple[list[str], np.ndarray]:
        """Another file's texts, and its labels as the training file's targets."""
        other = read(file, key)
        other_texts, other_raw = _texts_and_labels(other, text_column, label_column)
        return other_texts, targets(other, other_raw)

    if path is not None:
        (train_texts, train_y), test_part = _carved(texts, y, chosen, test_split, seed)
    else:
        train_texts, train_y = texts, y
        test_part = labelled(test, "data.test") if test else ([], y[:0])
    val_part = labelled(val, "data.val") if val else (None, None)
    columns = {"text_column": text_column, "label_column": label_column}
    parts = (train_texts, train_y), test_part, val_part
    if tokenizer == "hf":
        splits = _hf_token_splits(classes, model, max_length, parts, columns, saved_meta)
    else:
        vocab = Vocabulary.build(train_texts, Tokenizer(tokenizer, lower), min_freq, max_size)
        splits = _token_splits(classes, vocab, max_length, *parts, columns=columns)
    return replace(splits, task=chosen)


def _carved(texts: list[str], y: np.ndarray, task: str, fraction: float, seed: int) -> tuple:
    """(train texts, targets), (test texts, targets): a test split carved from one file,
    stratified by class (a regression target has none: at random)."""
    carve = stratified_split if task == "classification" else random_split
    kept, carved = carve(y, fraction, seed)
    return ([texts[i] for i in kept], y[kept]), ([texts[i] for i in carved], y[carved])


def _hf_token_splits(
    classes: list[str],
    model: dict[str, Any] | None,
    max_length: int,
    parts: tuple,
    columns: dict,
    saved_meta: dict[str, Any] | None,
) -> DatasetSplits:
    """The splits as the Hugging Face model's tokenizer encodes them (data/hf_tokens.py), to
    L = min(max_length, the longest training text) — or, read again for a checkpoint, with the
    tokenizer and L that the checkpoint holds (no hub, no model folder needed)."""
    if not model or model.get("name") != "hf":
        raise UserError(
            "data.tokenizer: hf encodes texts with a Hugging Face model's own tokenizer; use it "
            "with model: {name: hf, checkpoint: <hub id or folder>}, or tokenizer: word."
        )
    (train_texts, train_y), (test_texts, test_y), (val_texts, val_y) = parts
    if saved_meta and "hf_tokenizer" in saved_meta:
        tokenizer = hf_tokens.tokenizer_from_files(saved_meta["hf_tokenizer"])
        longest = int(saved_meta["max_length"])
        keys = ("hf_tokenizer", "hf_config", "pad_id", "max_length")
        meta = {key: saved_meta[key] for key in keys}
    else:
        transformers = transformers_module("data.tokenizer: hf")
        checkpoint = model["checkpoint"]
        tokenizer = load_pretrained(transformers.AutoTokenizer, checkpoint, "tokenizer")
        encoded = tokenizer(train_texts, truncation=True, max_length=max_length)["input_ids"]
        longest = max(len(ids) for ids in encoded)
        meta = hf_tokens.hf_meta(checkpoint, tokenizer, longest)

    def split(texts: list[str], labels: np.ndarray) -> ArraySplit:
        y = torch.from_numpy(np.ascontiguousarray(labels))  # class ids, or float targets
        return ArraySplit(hf_tokens.encode(tokenizer, texts, longest), y)

    return DatasetSplits(
        kind="tokens",
        task="classification",
        classes=classes,
        train=split(train_texts, train_y),
        test=split(test_texts, test_y) if test_texts else None,
        val=split(val_texts, val_y) if val_texts is not None else None,
        meta={**meta, **columns},
    )


def _check_distinct_columns(text_column: str, label_column: str) -> None:
    """The text and the label must be two columns: a model shown its label learns nothing."""
    if text_column == label_column:
        raise UserError(
            f"data.text_column: '{text_column}' is also data.label_column. The text and the "
            "label must be different columns."
        )


def _token_splits(
    classes: list[str],
    vocab: Vocabulary,
    max_length: int,
    train: tuple[list[str], np.ndarray],
    test: tuple[list[str], np.ndarray],
    val: tuple[list[str] | None, np.ndarray | None],
    columns: dict[str, str],
) -> DatasetSplits:
    """The splits' texts as token ids padded to L = min(max_length, longest training sequence).

    An empty test split becomes None; a validation file, even an empty one, stays a split. The
    meta holds the vocabulary, L and `columns`, all that `encode_texts` needs later.
    """
    train_texts, train_y = train
    train_ids = [vocab.encode(t, max_length) for t in train_texts]
    length = max(len(ids) for ids in train_ids)  # >= 1: every text encodes to >= 1 token

    def split(ids: list[list[int]], labels: np.ndarray) -> ArraySplit:
        x = torch.from_numpy(pad_sequences(ids, length))
        return ArraySplit(x, torch.from_numpy(np.ascontiguousarray(labels)))

    test_texts, test_y = test
    test_part = None
    if test_texts:
        test_part = split([vocab.encode(t, length) for t in test_texts], test_y)
    val_texts, val_y = val
    val_part = None
    if val_texts is not None:
        val_part = split([vocab.encode(t, length) for t in val_texts], val_y)
    return DatasetSplits(
        kind="tokens",
        task="classification",
        classes=classes,
        train=split(train_ids, train_y),
        test=test_part,
        val=val_part,
        meta={**vocab.to_dict(), "max_length": length, **columns},
    )


def _read_text_table(path: str, key: str, delimiter: str = "auto") -> CsvTable:
    """A CSV file of texts and labels (texts may contain commas and span lines, quoted)."""
    return read_table(
        path, key, QUOTE_THE_TEXTS, " (e.g. text,label)", delimiter=delimiter, decimal="."
    )


def _texts_and_labels(
    table: CsvTable, text_column: str, label_column: str
) -> tuple[list[str], list[str]]:
    """The raw texts and stripped label strings; an empty label is a UserError."""
    text_at = table.column(text_column, "data.text_column")
    label_at = table.column(label_column, "data.label_column")
    texts = [row[text_at] for row in table.rows]
    raw = [row[label_at].strip() for row in table.rows]
    for i, value in enumerate(raw):
        if not value:
            raise UserError(
                f"{table.key}: '{table.file}' line {table.lines[i]}, column '{label_column}': "
                "empty label. Fill it in or drop the row."
            )
    return texts, raw
