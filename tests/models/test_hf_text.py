"""models/hf_text.py and data/hf_tokens.py: a Hugging Face encoder fine-tuned from a recipe on
a text CSV with its own tokenizer — built here, tiny and random, saved with save_pretrained and
loaded back by path (no hub) — learns, resumes bit for bit, and evaluates, predicts and exports
from the run folder alone, offline; a hub id that cannot be reached is one message, at once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

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


def tiny_bert(folder, texts: list[str], seed: int = 0, dropout: float = 0.1) -> None:
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
    transformers.set_seed(seed)  # the same random encoder whatever ran before in this process
    config = transformers.BertConfig(
        vocab_size=fast.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
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
    explained = invoke(
        "explain", "runs/bert/checkpoints/best.pt", "--text", "a superb film", "--json"
    )
    assert explained.exit_code == 0, explained.output  # tokens by the saved tokenizer
    (text,) = json.loads(explained.stdout)["texts"]
    assert [token for token, _ in text["tokens"]] == ["[CLS]", "a", "superb", "film", "[SEP]"]
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


def test_lora_trains_only_its_adapters_and_predicts_from_the_run_folder(tmp_path, invoke, offline):
    """peft's adapters and the head learn; every weight the saved encoder had comes back from
    the run's checkpoint bit for bit; eval and predict rebuild the adapters offline."""
    pytest.importorskip("peft")
    import torch

    texts = reviews(tmp_path / "reviews.csv", rows=320)
    tiny_bert(tmp_path / "tiny-bert", texts)
    recipe = yaml.safe_load((tmp_path / write_recipe(tmp_path, "lora")).read_text())
    recipe["model"]["lora"] = {"r": 8, "alpha": 16}
    recipe["optimizer"]["lr"], recipe["train"]["epochs"] = 0.02, 20
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(recipe))
    fitted = invoke("fit", "lora.yaml", "-q")
    assert fitted.exit_code == 0, fitted.output
    assert json.loads((tmp_path / "runs/lora/report.json").read_text())["accuracy"] >= 0.9

    saved = transformers.BertModel.from_pretrained(tmp_path / "tiny-bert").state_dict()
    weights = torch.load(tmp_path / "runs/lora/checkpoints/best.pt", weights_only=False)["model"]
    adapters = [k for k in weights if ".lora_" in k]
    assert adapters and all(".query." in k or ".value." in k for k in adapters)  # peft's choice
    for key, value in saved.items():  # base_layer: where peft keeps the wrapped layer's own
        module, _, kind = key.rpartition(".")
        trained = weights.get(f"encoder.{key}", weights.get(f"encoder.{module}.base_layer.{kind}"))
        assert torch.equal(trained, value), key

    (tmp_path / "tiny-bert").rename(tmp_path / "gone")
    evaluated = invoke("eval", "runs/lora/checkpoints/best.pt", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] >= 0.9
    for form in ("onnx", "torchscript"):
        exported = invoke("export", "runs/lora/checkpoints/best.pt", "--format", form)
        assert exported.exit_code == 0, exported.output


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"lora": {"r": 4}, "freeze": "backbone"}, "remove model.freeze"),
        ({"lora": {"targets": ["nowhere"]}}, "model.lora.targets names layers of the encoder"),
    ],
)
def test_lora_that_cannot_be_applied_is_refused(tmp_path, invoke, offline, model, message):
    texts = reviews(tmp_path / "reviews.csv")
    tiny_bert(tmp_path / "tiny-bert", texts)
    recipe = yaml.safe_load((tmp_path / write_recipe(tmp_path, "bad")).read_text())
    recipe["model"] |= model
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    refused = invoke("fit", "bad.yaml", "-q")
    assert refused.exit_code == 2, refused.output
    assert message in refused.output and "Traceback" not in refused.output


def test_each_batch_is_cut_to_its_longest_text(tmp_path):
    """The encoder sees the batch's longest text, not the split's, and answers the same."""
    import torch

    from dltrain.models.hf_text import HfClassifier

    tiny_bert(tmp_path, ["a b c d e f g"])
    encoder = transformers.BertModel.from_pretrained(tmp_path).eval()
    seen = []
    encoder.register_forward_pre_hook(
        lambda _, args, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    model = HfClassifier(encoder, 2, pad_id=0, pooling="mean").eval()
    ids = torch.tensor([[2, 7, 8, 3, 0, 0, 0, 0], [2, 9, 3, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        padded, cut = model(ids), model(ids[:, :4])
    assert seen == [(2, 4), (2, 4)]
    torch.testing.assert_close(padded, cut)


def test_ema_accumulation_lr_find_and_a_sweep_take_an_hf_model(tmp_path, invoke, offline):
    """The hf model goes through the paths every model does: a moving average of its weights,
    accumulated micro-batches, the lr range test and a two-trial sweep over its lr."""
    texts = reviews(tmp_path / "reviews.csv")
    tiny_bert(tmp_path / "tiny-bert", texts)
    name = write_recipe(tmp_path, "paths", ema={"decay": 0.9}, accumulate=2)
    fitted = invoke("fit", name, "-q")
    assert fitted.exit_code == 0, fitted.output
    assert json.loads((tmp_path / "runs/paths/report.json").read_text())["accuracy"] >= 0.9

    found = invoke("lr-find", name, "--steps", "60")
    assert found.exit_code == 0, found.output
    assert json.loads((tmp_path / "lr_find.json").read_text())["suggested_lr"] > 0

    space = {"metric": "val_accuracy", "sampler": "random", "pruner": "none",
             "params": {"optimizer.lr": {"type": "float", "low": 0.001, "high": 0.01}}}  # fmt: skip
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    recipe = yaml.safe_load((tmp_path / name).read_text())
    recipe["name"], recipe["data"]["val_split"], recipe["train"] = "search", 0.25, {"epochs": 2}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(recipe))
    swept = invoke("sweep", "sweep.yaml", "space.yaml", "--trials", "2")
    assert swept.exit_code == 0, swept.output
    summary = json.loads((tmp_path / "runs/search/sweep_report.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["complete", "complete"]


@pytest.mark.slow
def test_two_processes_fine_tune_to_the_weights_of_one(tmp_path, offline):
    """DDP over 2 gloo processes (`fit --nproc 2`) ends with the weights one process ends with
    for the same global batch: every trained weight takes part in the loss (BERT's unused
    pooler would stop DDP at its second step), and each half-batch cut to its own longest text
    answers as the whole would. Without dropout, nothing random differs between the two."""
    import torch

    texts = reviews(tmp_path / "reviews.csv")
    tiny_bert(tmp_path / "tiny-bert", texts, dropout=0.0)
    recipe = yaml.safe_load((tmp_path / write_recipe(tmp_path, "one")).read_text())
    recipe["data"] = {**recipe["data"], "global_batch_size": 32}
    del recipe["data"]["batch_size"]
    recipe["train"]["epochs"] = 3
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    for name, launch in (("one", []), ("two", ["--nproc", "2"])):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**recipe, "name": name}))
        done = subprocess.run(
            [sys.executable, "-m", "dltrain", "fit", f"{name}.yaml", "-q", *launch],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout

    def last(name: str) -> dict:
        path = tmp_path / "runs" / name / "checkpoints/last.pt"
        return torch.load(path, weights_only=False)["model"]

    one, two = last("one"), last("two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
