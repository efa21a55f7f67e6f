"""`dltrain predict`, `export` and `explain` for sequence models, from the checkpoint alone.

Four tiny checkpoints are trained in-process once for the module (each a few seconds on one CPU
thread): an LSTM spam classifier on a generated text CSV (deleted right after training), a GRU
on the adding problem (regression), a transformer_seq2seq that reverses digit strings, and a GRU
that reads digit images row by row (data.as_sequence: rows). Commands run in-process through
typer's CliRunner, as in test_predict_export_explain.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dltrain.data.digits import digits
from dltrain.data.text import encode_texts
from dltrain.errors import UserError
from dltrain.runs.checkpoint import save_checkpoint
from dltrain.use.explain_images import METHODS, explain_image
from dltrain.use.export import export_checkpoint
from dltrain.use.inference import load_for_inference

from helpers.training import TINY_SEQ2SEQ, recipe

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
    pytest.mark.console_width(200),
]

SPAM = [
    "win a free prize now",
    "claim your free prize today",
    "free prize waiting, call now",
    "you won a free prize click here",
    "urgent free prize offer",
    "free prize winner text back",
]
HAM = [
    "see you at lunch",
    "meeting moved to monday",
    "call me when you get home",
    "thanks for the notes",
    "are we still on for dinner",
    "the train is late again",
    "happy birthday to you",
    "can you pick up milk",
]
TAILS = ["ok", "now", "today", "x", "please", ""]


def _write_sms(path: Path) -> None:
    """The same 160 labelled messages every time (columns 'message' and 'kind')."""
    rng = np.random.default_rng(0)
    lines = ["message,kind"]
    for i in range(160):
        texts, label = (SPAM, "spam") if i % 2 else (HAM, "ham")
        text = f"{texts[rng.integers(len(texts))]} {TAILS[rng.integers(len(TAILS))]}".strip()
        lines.append(f'"{text}",{label}')
    path.write_text("\n".join(lines) + "\n")


def _trained(trained_run, name: str, base: dict) -> tuple[Path, dict]:
    run, report = trained_run(base, name, "device=cpu")
    return run.best_path, report


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, trained_run):
    """(checkpoint, the CSV's path (deleted), fit's report) of a small LSTM spam classifier."""
    csv = tmp_path_factory.mktemp("sms-data") / "sms.csv"
    _write_sms(csv)
    data = {
        "name": "text_csv",
        "path": str(csv),
        "text_column": "message",
        "label_column": "kind",
        "batch_size": 16,
    }
    model = {"name": "lstm", "hidden_size": 16, "embedding_size": 8}
    checkpoint, report = _trained(trained_run, "sms", recipe(data, model, lr=0.01, epochs=3))
    csv.unlink()  # predict and export must not need the training data
    return checkpoint, csv, report


@pytest.fixture(scope="module")
def text_checkpoint(text_run) -> Path:
    return text_run[0]


@pytest.fixture(scope="module")
def adding_checkpoint(trained_run) -> Path:
    """A GRU on the adding problem with 10 steps (regression)."""
    data = {
        "name": "adding",
        "length": 10,
        "train_size": 512,
        "test_size": 64,
        "batch_size": 32,
        "val_split": 0,
    }
    model = {"name": "gru", "hidden_size": 16}
    base = recipe(data, model, lr=0.01, epochs=2, loss={"name": "mse"})
    return _trained(trained_run, "adding", base)[0]


@pytest.fixture(scope="module")
def reverse_checkpoint(trained_run) -> Path:
    """A small transformer_seq2seq reversing digit strings of 1..4 digits."""
    data = {
        "name": "reverse",
        "min_length": 1,
        "max_length": 4,
        "train_size": 3000,
        "test_size": 200,
        "batch_size": 64,
        "val_split": 0,
    }
    return _trained(trained_run, "reverse", recipe(data, TINY_SEQ2SEQ, lr=0.003, epochs=6))[0]


@pytest.fixture(scope="module")
def rows_checkpoint(trained_run) -> Path:
    """A GRU reading 8×8 digit images one row per step (≈ 0.95 test accuracy)."""
    data = {"name": "digits", "as_sequence": "rows", "batch_size": 32, "val_split": 0}
    base = recipe(data, {"name": "gru", "hidden_size": 32}, lr=0.01, epochs=3)
    return _trained(trained_run, "rows", base)[0]


def _top(entry: dict) -> str:
    return entry["predictions"][0]["class"]


# -- text classification ------------------------------------------------------------------------


def test_text_model_predicts_texts_txt_and_csv_without_the_training_data(
    text_run, invoke, tmp_path
):
    checkpoint, csv, _ = text_run
    assert not csv.exists()
    (tmp_path / "inbox.txt").write_text("you won a free prize\n\n  \nsee you at dinner\n")
    (tmp_path / "inbox.csv").write_text(
        'id,message\n1,"claim the free prize, today"\n2,thanks for lunch\n'
    )
    result = invoke(
        "predict",
        checkpoint,
        "inbox.txt",
        "inbox.csv",
        "--text",
        "FREE PRIZE now",
        "-t",
        "call me at home",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert [p["input"] for p in out] == [
        "inbox.txt[0]",
        "inbox.txt[1]",  # blank lines are skipped
        "inbox.csv[0]",
        "inbox.csv[1]",
        "FREE PRIZE now",
        "call me at home",
    ]
    assert [p["text"] for p in out][:4] == [
        "you won a free prize",
        "see you at dinner",
        "claim the free prize, today",
        "thanks for lunch",
    ]
    assert [_top(p) for p in out] == ["spam", "ham", "spam", "ham", "spam", "ham"]
    for entry in out:
        probs = [c["probability"] for c in entry["predictions"]]
        assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=1e-5)

    table = invoke("predict", checkpoint, "--text", "free prize")
    assert table.exit_code == 0, table.stderr
    assert "free prize" in table.stdout and "spam" in table.stdout and "rank" in table.stdout


def test_text_ids_in_npy_predict_like_the_texts(text_checkpoint, invoke, tmp_path):
    predictor = load_for_inference(text_checkpoint)
    texts = ["urgent free prize", "happy birthday"]
    np.save(tmp_path / "ids.npy", encode_texts(texts, predictor.meta).numpy())
    by_ids = invoke("predict", text_checkpoint, "ids.npy", "--json")
    by_text = invoke("predict", text_checkpoint, "--text", texts[0], "--text", texts[1], "--json")
    assert by_ids.exit_code == by_text.exit_code == 0, by_ids.stderr + by_text.stderr
    ids, text = json.loads(by_ids.stdout), json.loads(by_text.stdout)
    assert [p["input"] for p in ids] == ["ids.npy[0]", "ids.npy[1]"]
    assert [p["predictions"] for p in ids] == [p["predictions"] for p in text]


@pytest.mark.parametrize(
    ("make", "args", "expected"),
    [
        (lambda d: (d / "t.csv").write_text("text,x\nhi,1\n"), ["t.csv"], "no 'message' column"),
        (lambda d: Image.new("L", (4, 4)).save(d / "x.png"), ["x.png"], "is an image"),
        (lambda d: np.save(d / "f.npy", np.zeros(8)), ["f.npy"], "token ids are integers"),
        (lambda d: np.save(d / "big.npy", np.full(8, 10**6)), ["big.npy"], "ids are 0.."),
        (lambda d: None, ["missing.txt"], "not found"),
        (lambda d: (d / "empty.txt").write_text("\n \n"), ["empty.txt"], "holds no text"),
        (lambda d: None, [], "nothing to predict"),
    ],
)
def test_bad_text_inputs_exit_2_saying_what_the_model_takes(
    text_checkpoint, invoke, tmp_path, make, args, expected
):
    make(tmp_path)
    result = invoke("predict", text_checkpoint, *args)
    assert result.exit_code == 2, result.stdout
    assert expected in result.stderr, result.stderr
    if args:
        assert args[0] in result.stderr
    if expected in ("is an image", "not found", "nothing to predict"):
        assert "--text" in result.stderr and ".txt file" in result.stderr


def test_text_eval_from_the_checkpoint_reproduces_the_fit_report(text_run, invoke, tmp_path):
    checkpoint, csv, fitted = text_run
    _write_sms(csv)  # eval needs the data (the same file, back where the recipe says)
    try:
        result = invoke("eval", checkpoint, "--json", "--output", tmp_path / "eval")
    finally:
        csv.unlink()
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["split"] == fitted["split"] == "test"
    assert report["confusion_matrix"] == fitted["confusion_matrix"]
    assert report["accuracy"] == fitted["accuracy"] >= 0.9
    assert report["loss"] == pytest.approx(fitted["loss"], rel=1e-6)


def test_a_checkpoint_from_before_tasks_is_a_classifier(text_checkpoint, tmp_path):
    checkpoint = torch.load(text_checkpoint, weights_only=True)
    for key in ("task", "as_sequence"):
        del checkpoint["data_meta"][key]
    del checkpoint["digest"]  # as written then: the first format, without a digest
    torch.save({**checkpoint, "format": 1}, tmp_path / "old.pt")
    predictor = load_for_inference(tmp_path / "old.pt")
    assert predictor.task == "classification" and predictor.kind == "tokens"
    x = encode_texts(["free prize"], predictor.meta)
    assert predictor.classes[int(predictor.predict_proba(x).argmax())] == "spam"


def test_unknown_input_kinds_and_tasks_ask_for_a_newer_dltrain(text_checkpoint, tmp_path):
    for key, value in (("kind", "graph"), ("task", "detection")):
        checkpoint = torch.load(text_checkpoint, weights_only=True)
        checkpoint["data_meta"][key] = value
        save_checkpoint(tmp_path / "future.pt", checkpoint)  # a whole checkpoint (its digest)
        with pytest.raises(UserError, match=f"{value}.*Upgrade dltrain"):
            load_for_inference(tmp_path / "future.pt")


def test_text_lstm_exports_to_torchscript_matching_pytorch(text_checkpoint, tmp_path):
    path, predictor = export_checkpoint(text_checkpoint, "torchscript", tmp_path / "m.pt")
    extra = {"dltrain.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    info = json.loads(extra["dltrain.json"])
    assert info["kind"] == "tokens" and info["task"] == "classification"
    assert info["vocab"] == predictor.meta["vocab"] and info["tokenizer"]["kind"] == "word"
    assert info["max_length"] == predictor.input_shape[0] and "int64" in info["input"]
    # Texts of several lengths in one batch, and a batch size other than the traced one.
    texts = ["free prize", "are we still on for dinner tonight", "x", "call now", "ok"]
    x = encode_texts(texts, predictor.meta)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), predictor.model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scripted(x[:1]), predictor.model(x[:1]), atol=1e-5, rtol=1e-5)


def test_text_lstm_onnx_export_is_refused_naming_the_model(text_checkpoint, invoke, tmp_path):
    pytest.importorskip("onnx")
    result = invoke("export", text_checkpoint, "--format", "onnx", "-o", "m.onnx")
    assert result.exit_code == 2
    assert "model 'lstm' cannot be exported to ONNX" in result.stderr
    assert "pack_padded_sequence" in result.stderr and "--format torchscript" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_explain_takes_texts_and_refuses_sequences_and_seq2seq(
    text_checkpoint, adding_checkpoint, reverse_checkpoint, invoke, tmp_path
):
    """A text model's tokens are attributed (coloured, and an HTML page); float steps have no
    names and a generated sequence is not one score: each is refused with the reason."""
    (tmp_path / "a.txt").write_text("free prize\n")
    explained = invoke("explain", text_checkpoint, "a.txt")
    assert explained.exit_code == 0, explained.output
    assert "free" in explained.stdout and (tmp_path / "explain-a.html").exists()
    np.save(tmp_path / "s.npy", np.zeros((10, 2), np.float32))
    (tmp_path / "d.txt").write_text("123\n")
    for checkpoint, given, reason in (
        (adding_checkpoint, "s.npy", "float sequences"),
        (reverse_checkpoint, "d.txt", "seq2seq model"),
    ):
        result = invoke("explain", checkpoint, given)
        assert result.exit_code == 2
        assert reason in result.stderr and "Use dltrain predict" in result.stderr


# -- regression: the adding problem -------------------------------------------------------------


def _adding_inputs(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = np.zeros((n, 10, 2), np.float32)
    x[:, :, 0] = rng.random((n, 10))
    x[:, 2, 1] = x[:, 7, 1] = 1.0
    return x, x[:, 2, 0] + x[:, 7, 0]


def test_adding_model_predicts_a_value_per_sequence(adding_checkpoint, invoke, tmp_path):
    x, _ = _adding_inputs(4)
    np.save(tmp_path / "one.npy", x[0])
    np.save(tmp_path / "batch.npy", x)
    result = invoke("predict", adding_checkpoint, "one.npy", "batch.npy", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert [p["input"] for p in out] == ["one.npy", *(f"batch.npy[{i}]" for i in range(4))]
    assert all(set(p) == {"input", "prediction"} for p in out)
    predictor = load_for_inference(adding_checkpoint)
    expected = predictor.predict_values(torch.from_numpy(x)).tolist()
    assert [p["prediction"] for p in out[1:]] == pytest.approx(expected, abs=1e-6)
    assert out[0]["prediction"] == pytest.approx(expected[0], abs=1e-6)
    assert all(0.0 < p["prediction"] < 2.5 for p in out)  # sums of two values in [0, 1)

    table = invoke("predict", adding_checkpoint, "batch.npy")
    assert table.exit_code == 0, table.stderr
    assert "predicted sum" in table.stdout and "batch.npy[3]" in table.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--text", "12"], "--text: this model takes float sequences of shape [10, 2]"),
        (["wrong.npy"], "shape [10, 3]. Expected a .npy array of shape [10, 2]"),
        (["wrong.npy", "-k", "2"], "--top-k: this is a regression model"),
    ],
)
def test_bad_inputs_for_a_sequence_regressor_exit_2(
    adding_checkpoint, invoke, tmp_path, args, expected
):
    np.save(tmp_path / "wrong.npy", np.zeros((10, 3), np.float32))
    result = invoke("predict", adding_checkpoint, *args)
    assert result.exit_code == 2 and expected in result.stderr, result.stderr


def test_adding_model_exports_to_torchscript_matching_pytorch(adding_checkpoint, invoke):
    result = invoke("export", adding_checkpoint, "--format", "torchscript", "-o", "m.pt")
    assert result.exit_code == 0, result.stderr
    assert "predicted sum" in result.stdout
    extra = {"dltrain.json": ""}
    scripted = torch.jit.load("m.pt", _extra_files=extra)
    info = json.loads(extra["dltrain.json"])
    assert info["task"] == "regression" and info["input_shape"] == [10, 2]
    predictor = load_for_inference(adding_checkpoint)
    x = predictor.preprocess(torch.from_numpy(_adding_inputs(5)[0]))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), predictor.model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_adding_model_exports_to_onnx_matching_pytorch(adding_checkpoint, invoke, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    result = invoke("export", adding_checkpoint, "--format", "onnx", "-o", "m.onnx")
    assert result.exit_code == 0, result.stderr
    predictor = load_for_inference(adding_checkpoint)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = predictor.preprocess(torch.from_numpy(_adding_inputs(5)[0]))
    (values,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = predictor.model(x)
    torch.testing.assert_close(torch.from_numpy(values), expected, atol=1e-5, rtol=1e-5)


# -- seq2seq: reversing digit strings -----------------------------------------------------------


def test_reverse_model_decodes_digit_strings(reverse_checkpoint, invoke, tmp_path):
    sources = ["123", "3071", "9", "4682", "50", "777", "1234", "865", "21", "9031"]
    (tmp_path / "sources.txt").write_text("\n".join(sources[:3]) + "\n")
    args = [a for s in sources for a in ("--text", s)]
    result = invoke("predict", reverse_checkpoint, "sources.txt", *args, "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert [p["input"] for p in out] == [f"sources.txt[{i}]" for i in range(3)] + sources
    assert all(set(p) == {"input", "text", "output"} for p in out)
    outputs = [p["output"] for p in out]
    assert all(re.fullmatch(r"[0-9]{1,5}", o) for o in outputs), outputs
    assert outputs[:3] == outputs[3:6]  # the same sources from a file and from --text
    reversed_ = sum(o == s[::-1] for o, s in zip(outputs[3:], sources))
    assert reversed_ >= 8, f"only {reversed_}/10 reversed: {outputs[3:]}"

    table = invoke("predict", reverse_checkpoint, "--text", "123")
    assert table.exit_code == 0, table.stderr
    assert "output" in table.stdout and "123" in table.stdout


def test_seq2seq_sources_must_fit_the_model(reverse_checkpoint, invoke):
    long = invoke("predict", reverse_checkpoint, "--text", "12345")
    assert long.exit_code == 2
    assert "has 5 tokens, but this model reads sources of at most 4" in long.stderr
    odd = invoke("predict", reverse_checkpoint, "--text", "1a", "--json")
    assert odd.exit_code == 0, odd.stderr
    assert "'a' not in the model's source vocabulary" in odd.stderr
    assert re.fullmatch(r"[0-9]*", json.loads(odd.stdout)[0]["output"])


def test_seq2seq_export_is_refused(reverse_checkpoint, invoke, tmp_path):
    for fmt in ("torchscript", "onnx"):
        result = invoke("export", reverse_checkpoint, "--format", fmt, "-o", "m")
        assert result.exit_code == 2, result.stdout
        assert "export supports single-pass models" in result.stderr
        assert "'transformer_seq2seq'" in result.stderr and "dltrain predict" in result.stderr
    assert list(tmp_path.iterdir()) == []


# -- images read row by row ---------------------------------------------------------------------


def _digit_pngs(folder: Path, count: int) -> list[tuple[Path, str]]:
    """Real test digits saved as 16×16 PNGs (upscaled from 8×8 grey): (file, true class)."""
    test = digits().test
    files = []
    for i in range(count):
        image = Image.fromarray(test.x[i, 0].numpy()).resize((16, 16), Image.Resampling.BILINEAR)
        path = folder / f"digit{i}.png"
        image.save(path)
        files.append((path, str(int(test.y[i]))))
    return files


def test_rows_model_predicts_and_explains_image_files(rows_checkpoint, invoke, tmp_path):
    pngs = _digit_pngs(tmp_path, 20)
    result = invoke("predict", rows_checkpoint, *(p for p, _ in pngs), "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    correct = sum(_top(entry) == truth for entry, (_, truth) in zip(out, pngs))
    assert correct >= 14, f"only {correct}/20 digits recognised"

    explained = invoke("explain", rows_checkpoint, pngs[0][0], "-o", "e.png")
    assert explained.exit_code == 0, explained.stderr
    assert "Grad-CAM needs a convolutional model" in explained.stdout
    assert (tmp_path / "e.png").is_file()
    gradcam = invoke("explain", rows_checkpoint, pngs[0][0], "--method", "gradcam")
    assert gradcam.exit_code == 2 and "--method integrated_gradients" in gradcam.stderr

    predictor = load_for_inference(rows_checkpoint)
    result = explain_image(predictor, digits().test.x[:1], METHODS)
    assert list(result.maps) == ["integrated_gradients", "occlusion"]
    assert result.maps["integrated_gradients"].shape == (8, 8)


def test_rows_model_exports_taking_images(rows_checkpoint, tmp_path):
    path, predictor = export_checkpoint(rows_checkpoint, "torchscript", tmp_path / "m.pt")
    extra = {"dltrain.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    info = json.loads(extra["dltrain.json"])
    assert info["as_sequence"] == "rows" and info["input_shape"] == [1, 8, 8]
    images = digits().test.x[:6]
    x = (images.float() / 255 - torch.tensor(info["mean"]).view(1, -1, 1, 1)) / torch.tensor(
        info["std"]
    ).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = predictor.model(predictor.preprocess(images))
        torch.testing.assert_close(scripted(x), expected, atol=1e-5, rtol=1e-5)
