"""Text classification data: tokenizer, vocabulary, the text_csv dataset and encode_texts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dltrain.config.registry import DATASETS
from dltrain.data.text import Tokenizer, Vocabulary, encode_texts, pad_sequences, text_csv
from dltrain.errors import RecipeError, UserError

from helpers.cli import REPO

SHARED_SMS = REPO.parent / "shared/data/sms_spam"


def _write(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> str:
    lines = [header] + [f'"{text.replace(chr(34), chr(34) * 2)}",{label}' for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _decode(loaded, row: torch.Tensor) -> list[str]:
    return [loaded.meta["vocab"][i] for i in row.tolist() if i != 0]


# -- tokenizer and vocabulary ---------------------------------------------------------------


def test_word_tokenizer_splits_words_and_punctuation():
    words = Tokenizer("word", lower=True)
    assert words.tokenize("Hello, World!  it's 2x_y\n<pad>") == [
        "hello", ",", "world", "!", "it", "'", "s", "2x_y", "<", "pad", ">",
    ]  # fmt: skip
    assert Tokenizer("word", lower=False).tokenize("Hi THERE") == ["Hi", "THERE"]
    assert words.tokenize("   ") == []


def test_char_tokenizer_keeps_every_character():
    assert Tokenizer("char", lower=False).tokenize("Ab c!") == ["A", "b", " ", "c", "!"]
    assert Tokenizer("char", lower=True).tokenize("Ab") == ["a", "b"]
    with pytest.raises(ValueError):
        Tokenizer("bytes")  # type: ignore[arg-type]


def test_vocabulary_orders_by_frequency_then_alphabetically():
    texts = ["b a c", "c b", "c d e", "zz"]  # c:3, b:2, then a, d, e, zz once each
    vocab = Vocabulary.build(texts, Tokenizer("word"))
    assert vocab.tokens == ["<pad>", "<unk>", "c", "b", "a", "d", "e", "zz"]
    # Row order does not change the vocabulary: only the counts do.
    assert Vocabulary.build(texts[::-1], Tokenizer("word")).tokens == vocab.tokens


def test_vocabulary_min_freq_and_max_size_counting_the_specials():
    texts = ["b a c", "c b", "c d e"]
    assert Vocabulary.build(texts, Tokenizer("word"), min_freq=2).tokens == [
        "<pad>", "<unk>", "c", "b",
    ]  # fmt: skip
    small = Vocabulary.build(texts, Tokenizer("word"), max_size=3)
    assert small.tokens == ["<pad>", "<unk>", "c"] and len(small) == 3
    assert Vocabulary.build(texts, Tokenizer("word"), max_size=2).tokens == ["<pad>", "<unk>"]
    with pytest.raises(ValueError):
        Vocabulary.build(texts, Tokenizer("word"), max_size=1)
    with pytest.raises(ValueError):
        Vocabulary.build(texts, Tokenizer("word"), min_freq=0)


def test_vocabulary_encode_truncates_maps_unknowns_and_empty_text_to_unk():
    vocab = Vocabulary.build(["a b c"], Tokenizer("word"))
    assert vocab.encode("A b zzz c") == [2, 3, 1, 4]  # lower-cased; unseen word -> <unk> 1
    assert vocab.encode("a b c a b", max_length=2) == [2, 3]
    assert vocab.encode("") == [1] and vocab.encode("  \n ") == [1]
    assert vocab.decode([2, 3, 1, 0, 0]) == ["a", "b", "<unk>"]


def test_vocabulary_round_trips_through_a_json_dict():
    vocab = Vocabulary.build(["Hi there", "hi"], Tokenizer("char", lower=False), max_size=5)
    data = json.loads(json.dumps(vocab.to_dict()))
    assert data["tokenizer"] == {"kind": "char", "lower": False}
    again = Vocabulary.from_dict(data)
    assert again.tokens == vocab.tokens and again.tokenizer == vocab.tokenizer
    assert again.encode("Hi you") == vocab.encode("Hi you")
    with pytest.raises(ValueError):
        Vocabulary(["a", "<pad>", "<unk>"])


def test_pad_sequences_pads_at_the_end_and_truncates():
    out = pad_sequences([[5], [1, 2, 3, 4]], 3)
    assert out.dtype == np.int64
    assert out.tolist() == [[5, 0, 0], [1, 2, 3]]


# -- text_csv -------------------------------------------------------------------------------


def test_vocabulary_comes_from_train_only_and_layout(tmp_path):
    train = _write(
        tmp_path / "train.csv",
        [("good movie", "pos"), ("bad bad movie, awful", "neg"), ("fine", "pos")],
    )
    test = _write(tmp_path / "test.csv", [("good unseenword", "neg"), ("", "pos")])
    loaded = text_csv(train=train, test=test)
    assert loaded.kind == "tokens" and loaded.task == "classification"
    assert loaded.classes == ["neg", "pos"]
    assert "unseenword" not in loaded.meta["vocab"]
    vocab = loaded.meta["vocab"]
    assert vocab[:4] == ["<pad>", "<unk>", "bad", "movie"]  # bad:2, movie:2 (alphabetical tie)
    # L = longest training sequence (5 tokens: bad bad movie , awful), pads at the end.
    assert loaded.meta["max_length"] == 5
    assert loaded.train.x.shape == (3, 5) and loaded.train.x.dtype == torch.int64
    assert loaded.train.y.tolist() == [1, 0, 1] and loaded.train.y.dtype == torch.int64
    first = loaded.train.x[0].tolist()
    assert first[2:] == [0, 0, 0] and _decode(loaded, loaded.train.x[0]) == ["good", "movie"]
    assert loaded.test.x.shape == (2, 5)
    assert _decode(loaded, loaded.test.x[0]) == ["good", "<unk>"]  # test-only word -> <unk>
    assert loaded.test.x[1].tolist() == [1, 0, 0, 0, 0]  # empty text -> one <unk>
    assert loaded.meta["tokenizer"] == {"kind": "word", "lower": True}
    assert loaded.meta["text_column"] == "text" and loaded.meta["label_column"] == "label"


def test_max_length_caps_the_sequences_and_test_is_truncated(tmp_path):
    train = _write(tmp_path / "train.csv", [("a b c d e f", "1"), ("a", "0")])
    test = _write(tmp_path / "test.csv", [("a b c d e f g h i", "1")])
    loaded = text_csv(train=train, test=test, max_length=4)
    assert loaded.meta["max_length"] == 4
    assert loaded.train.x.shape == (2, 4) and loaded.test.x.shape == (1, 4)
    assert (loaded.test.x > 0).all()  # truncated, never longer than L
    # Without a cap the test split is cut at the longest *training* sequence.
    loaded = text_csv(train=train, test=test)
    assert loaded.meta["max_length"] == 6 and loaded.test.x.shape == (1, 6)


def test_char_tokenizer_and_case(tmp_path):
    train = _write(tmp_path / "train.csv", [("Ab a", "0"), ("B", "1")])
    loaded = text_csv(train=train, tokenizer="char", lower=False)
    assert loaded.test is None
    assert set(loaded.meta["vocab"][2:]) == {"A", "b", " ", "a", "B"}
    assert _decode(loaded, loaded.train.x[0]) == ["A", "b", " ", "a"]
    lowered = text_csv(train=train, tokenizer="char")
    assert set(lowered.meta["vocab"][2:]) == {"a", "b", " "}
    assert lowered.meta["vocab"][2] == "a"  # a:2, b:2 -> alphabetical


def test_labels_sort_numerically_and_min_freq_max_size(tmp_path):
    train = _write(tmp_path / "train.csv", [("x y", "10"), ("x z", "2"), ("x y w", "2")])
    loaded = text_csv(train=train, min_freq=2)
    assert loaded.classes == ["2", "10"] and loaded.train.y.tolist() == [1, 0, 0]
    assert loaded.meta["vocab"] == ["<pad>", "<unk>", "x", "y"]
    assert text_csv(train=train, max_size=3).meta["vocab"] == ["<pad>", "<unk>", "x"]


def test_single_file_split_is_stratified_deterministic_and_vocab_is_train_only(tmp_path):
    rows = [(f"common word{i}", "spam" if i % 4 == 0 else "ham") for i in range(40)]
    path = _write(tmp_path / "all.csv", rows)
    loaded = text_csv(path=path, test_split=0.25, seed=3)
    assert len(loaded.train) == 30 and len(loaded.test) == 10
    assert torch.bincount(loaded.test.y).tolist() == [8, 2]  # 30 ham, 10 spam, 25% each
    vocab = set(loaded.meta["vocab"])
    train_words = {_decode(loaded, row)[1] for row in loaded.train.x}
    assert train_words <= vocab and len(train_words) == 30
    for row in loaded.test.x:  # every test row's own word was carved out: <unk>
        assert _decode(loaded, row) == ["common", "<unk>"]
    again = text_csv(path=path, test_split=0.25, seed=3)
    assert torch.equal(again.train.x, loaded.train.x) and torch.equal(again.test.y, loaded.test.y)
    assert again.meta == loaded.meta
    other = text_csv(path=path, test_split=0.25, seed=4)
    assert other.meta["vocab"] != loaded.meta["vocab"]


def test_encode_texts_reproduces_the_training_encoding_from_meta_alone(tmp_path):
    texts = ["Hello there!", "", "General Kenobi, you are a bold one", "hello hello"]
    train = _write(tmp_path / "train.csv", [(t, str(i % 2)) for i, t in enumerate(texts)])
    test = _write(tmp_path / "test.csv", [("Hello Grievous", "0")])
    for tokenizer in ("word", "char"):
        loaded = text_csv(train=train, test=test, tokenizer=tokenizer, max_length=20)
        meta = json.loads(json.dumps(loaded.meta))  # as stored in a checkpoint
        encoded = encode_texts(texts, meta)
        assert encoded.dtype == torch.int64
        assert torch.equal(encoded, loaded.train.x)
        assert torch.equal(encode_texts(["Hello Grievous"], meta), loaded.test.x)
    with pytest.raises(UserError, match="not trained on text"):
        encode_texts(["hi"], {"kind": "image"})


def test_quoted_multiline_texts_and_blank_lines(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(
        'label,text\n1,"line one\nline, two"\n\n0,plain\n0,"say ""hi"""\n', encoding="utf-8"
    )
    loaded = text_csv(train=str(path))
    assert len(loaded.train) == 3
    assert _decode(loaded, loaded.train.x[0]) == ["line", "one", "line", ",", "two"]
    assert _decode(loaded, loaded.train.x[2]) == ["say", '"', "hi", '"']


def test_registry_builds_and_validates_text_csv(tmp_path):
    train = _write(tmp_path / "train.csv", [("a b", "0"), ("c", "1")])
    section = DATASETS.validate({"name": "text_csv", "train": train}, "data")
    assert section["max_size"] == 20000 and section["tokenizer"] == "word"
    loaded = DATASETS.build(section, seed=0)
    assert loaded.train.x.shape == (2, 2)
    assert DATASETS.summary("text_csv")
    for bad in ({"max_size": 1}, {"min_freq": 0}, {"max_length": 0}, {"test_split": 1.0}):
        with pytest.raises(RecipeError):
            DATASETS.validate({"name": "text_csv", "train": train, **bad}, "data")


# -- errors ---------------------------------------------------------------------------------


def test_missing_text_column_suggests_the_nearest(tmp_path):
    train = _write(tmp_path / "train.csv", [("a", "0")], header="texts,label")
    with pytest.raises(UserError, match=r"column 'text' not found.*Columns: texts, label.*'texts'"):
        text_csv(train=train)
    with pytest.raises(UserError, match=r"data.label_column: column 'lable'.*'label'"):
        text_csv(train=train, text_column="texts", label_column="lable")
    with pytest.raises(UserError, match="different columns"):
        text_csv(train=train, text_column="label")


def test_label_only_in_test_is_an_error_naming_file_and_line(tmp_path):
    train = _write(tmp_path / "train.csv", [("a", "0"), ("b", "1")])
    test = _write(tmp_path / "test.csv", [("a", "0"), ("c", "2")])
    with pytest.raises(UserError, match=r"data.test: '.*test.csv' line 3 has label '2'"):
        text_csv(train=train, test=test)


def test_empty_files_and_bad_rows(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="has no header"):
        text_csv(train=str(empty))
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="has no data rows"):
        text_csv(path=str(header_only))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('text,label\n"ok",0\nnot, quoted,1\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 3 has 3 values.*Quote texts"):
        text_csv(train=str(ragged))
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text('text,label\n"ok",0\n"multi\nline", \n', encoding="utf-8")
    with pytest.raises(UserError, match="line 3, column 'label': empty label"):
        text_csv(train=str(no_label))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\nok,0\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"line 3 is not valid UTF-8 \(byte 0xe9"):
        text_csv(train=str(latin))
    with pytest.raises(UserError, match="not found"):
        text_csv(train=str(tmp_path / "missing.csv"))
    with pytest.raises(UserError, match="either data.path"):
        text_csv(path=str(latin), train=str(latin))
    with pytest.raises(UserError, match="either data.path"):
        text_csv()


# -- the real SMS spam corpus ---------------------------------------------------------------


@pytest.mark.skipif(not SHARED_SMS.is_dir(), reason="../shared/data/sms_spam is absent")
def test_sms_spam_files_load():
    loaded = text_csv(train=str(SHARED_SMS / "train.csv"), test=str(SHARED_SMS / "test.csv"))
    assert loaded.classes == ["0", "1"]
    assert len(loaded.train) == 4460 and len(loaded.test) == 1114
    assert torch.bincount(loaded.train.y).tolist() == [3862, 598]
    assert torch.bincount(loaded.test.y).tolist() == [965, 149]
    assert 3000 < len(loaded.meta["vocab"]) <= 20000
    length = loaded.meta["max_length"]
    assert 1 <= length <= 200 and loaded.train.x.shape == (4460, length)
    assert (loaded.train.x[:, 0] > 0).all() and (loaded.test.x[:, 0] > 0).all()
    assert int(loaded.train.x.max()) < len(loaded.meta["vocab"])
    unknown = (loaded.test.x == 1).sum() / (loaded.test.x > 0).sum()
    assert unknown < 0.1  # most test words were seen in training


def test_a_validation_file_of_texts_is_the_val_split(tmp_path):
    train = _write(tmp_path / "train.csv", [("free prize now", "spam"), ("see you soon", "ham")])
    val = _write(tmp_path / "val.csv", [("prize soon", "spam"), ("unheard words", "ham")])
    loaded = text_csv(train=train, val=val)
    assert loaded.val.y.tolist() == [1, 0]
    assert loaded.val.x.shape[1] == loaded.train.x.shape[1]  # padded like the training texts
    assert loaded.val.x[1, 0].item() == 1  # <unk>: the vocabulary is the training file's
