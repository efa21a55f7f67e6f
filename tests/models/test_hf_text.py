"""models/hf_text.py and data/hf_tokens.py: a Hugging Face encoder fine-tuned from a recipe on
a text CSV with its own tokenizer — built here, tiny and random, saved with save_pretrained and
loaded back by path (no hub) — learns, resumes bit for bit, and evaluates, predicts and exports
from the run folder alone, offline; a hub id that cannot be reached is one message, at once."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from helpers.cli import dltrain
from helpers.training import assert_resumes_bitwise

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

GOOD = ["good", "great", "fine", "lovely", "superb"]
BAD = ["bad", "awful", "poor", "dull", "weak"]
FILLER = ["the", "film", "was", "really", "quite", "plot", "acting", "and", "a"]


def reviews(path, rows: int = 160, seed: int = 0) -> list[str]:
    """label 'pos' when the review holds a good word, 'neg' for a bad one; filler around it."""
    import random

    rng = random.Random(seed)
    texts = []
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            positive = i % 2 == 0
            words = rng.sample(FILLER, 4) + [rng.choice(GOOD if positive else BAD)]
            rng.shuffle(words)
            texts.append(" ".join(words))
            writer.writerow([texts[-1], "pos" if positive else "neg"])
    return texts


def tiny_bert(folder, texts: list[str]) -> None:
    """A 2-layer BERT with hidden size 32 and a WordPiece tokenizer trained on `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
    fast.save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder)


def write_recipe(tmp_path, name: str, checkpoint: str = "tiny-bert", **train) -> str:
    recipe = {
        "name": name,
        "output": "runs",
        "device": "cpu",
        "data": {"name": "text_csv", "path": "reviews.csv", "tokenizer": "hf", "batch_size": 16},
        "model": {"name": "hf", "checkpoint": checkpoint, "pooling": "mean"},
        "optimizer": {"name": "adamw", "lr": 0.002},
        "train": {"epochs": 8, **train},
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    return f"{name}.yaml"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_local_bert_fine_tunes_resumes_bitwise_and_predicts_offline(tmp_path, invoke, offline):
    texts = reviews(tmp_path / "reviews.csv")
    tiny_bert(tmp_path / "tiny-bert", texts)
    fitted = invoke("fit", write_recipe(tmp_path, "bert"), "-q")
    assert fitted.exit_code == 0, fitted.output
    run = tmp_path / "runs" / "bert"
    assert json.loads((run / "report.json").read_text())["accuracy"] >= 0.9

    assert_resumes_bitwise(invoke, write_recipe(tmp_path, "halted"), 3, run / "checkpoints/last.pt")

    (tmp_path / "tiny-bert").rename(tmp_path / "gone")  # the run folder alone from here on
    predicted = invoke(
        "predict", "runs/bert/checkpoints/best.pt", "--text", "the plot was superb",
        "--text", "really awful acting", "--json",
    )  # fmt: skip
    assert predicted.exit_code == 0, predicted.output
    top = [row["predictions"][0]["class"] for row in json.loads(predicted.stdout)]
    assert top == ["pos", "neg"]
    evaluated = invoke("eval", "runs/bert/checkpoints/best.pt", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    for form in ("onnx", "torchscript"):  # as a user runs it: the exporters' own logging shows
        exported = dltrain(
            "export", "runs/bert/checkpoints/best.pt", "--format", form, "--output", f"m.{form}",
            cwd=tmp_path,
        )  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        assert exported.stderr == "", exported.stderr  # nothing but its one line, on stdout


def test_an_unreachable_hub_id_is_one_message_at_once(tmp_path, invoke, offline):
    """Said before any data is read: here reviews.csv is empty (reading it would fail)."""
    (tmp_path / "reviews.csv").write_text("")
    refused = invoke(
        "fit", write_recipe(tmp_path, "hub", checkpoint="google/bert_uncased_L-2_H-128"), "-q"
    )
    assert refused.exit_code == 2, refused.output
    assert "cannot be reached" in refused.output and "save_pretrained" in refused.output
    assert "Traceback" not in refused.output


def test_a_numeric_label_fine_tunes_as_regression_and_answers_in_its_units(
    tmp_path, invoke, offline
):
    """A score with a fraction is a regression target (data.task auto, loss auto → mse); the
    model answers in the score's units."""
    texts = reviews(tmp_path / "labels.csv")
    with open(tmp_path / "reviews.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for text in texts:
            good = any(word in text.split() for word in GOOD)
            writer.writerow([text, "7.5" if good else "2.25"])
    tiny_bert(tmp_path / "tiny-bert", texts)
    fitted = invoke("fit", write_recipe(tmp_path, "score"), "-q")
    assert fitted.exit_code == 0, fitted.output
    report = json.loads((tmp_path / "runs/score/report.json").read_text())
    assert report["task"] == "regression" and report["r2"] > 0.8, report
    predicted = invoke(
        "predict", "runs/score/checkpoints/best.pt", "--text", "a lovely film", "--json"
    )
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)[0]["prediction"] == pytest.approx(7.5, abs=1.0)
