"""`dltrain predict`, `export` and `explain`: from a checkpoint alone, never the training data.

Three tiny checkpoints are trained in-process once for the module: the quickstart (2 epochs,
digits, seed_cnn), a 3-channel image model trained from an .npz file and a tabular MLP trained
from a .csv file; the .npz and .csv files are deleted right after training. Commands run
in-process through typer's CliRunner (exit code and stderr as in a real process); one real
`python -m dltrain predict --json` checks that stdout holds nothing but the JSON.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dltrain.data.digits import digits
from dltrain.errors import UserError
from dltrain.runs.checkpoint import save_checkpoint
from dltrain.use.explain_images import METHODS, explain_image, last_conv
from dltrain.use.inference import Predictor, load_for_inference

from helpers.cli import HELP_PROBE, dltrain
from helpers.training import quickstart_recipe, recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# TorchScript is deprecated upstream (in favour of torch.export) but still loads everywhere.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
    pytest.mark.console_width(200),  # wide: long paths in titles are not wrapped
]


@pytest.fixture(scope="module")
def digits_checkpoint(trained_run) -> Path:
    """The quickstart recipe, 2 epochs (≈ 0.85 test accuracy: enough to recognise digits)."""
    overrides = ("train.epochs=2", "data.batch_size=16", "optimizer.lr=0.005")
    run, _ = trained_run(quickstart_recipe(), "quickstart", "device=cpu", *overrides)
    return run.best_path


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory, trained_run) -> Path:
    """seed_cnn on 3×12×12 uint8 images from an .npz (N×H×W×C) that is deleted afterwards."""
    folder = tmp_path_factory.mktemp("rgb-data")
    rng = np.random.default_rng(0)
    prototypes = rng.integers(0, 256, size=(3, 12, 12, 3))

    def split(n):
        y = rng.integers(0, 3, size=n)
        x = np.clip(prototypes[y] + rng.normal(0, 30, size=(n, 12, 12, 3)), 0, 255)
        return x.astype(np.uint8), y

    (train_x, train_y), (test_x, test_y) = split(96), split(24)
    path = folder / "rgb.npz"
    np.savez(path, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    data = {"name": "npz", "path": str(path), "batch_size": 32, "val_split": 0}
    base = recipe(data, {"name": "seed_cnn"}, lr=0.01, epochs=1)
    run, _ = trained_run(base, "rgb", "device=cpu")
    path.unlink()  # inference must not need the training data
    return run.best_path


TABLE_HEADER = ["f0", "f1", "f2", "species", "f3"]  # the label column sits among the features


@pytest.fixture(scope="module")
def tabular_checkpoint(tmp_path_factory, trained_run) -> Path:
    """An MLP on a 4-feature, 3-class CSV table (label column 'species'), deleted afterwards."""
    folder = tmp_path_factory.mktemp("table-data")
    rows = _table_rows(np.random.default_rng(1), 150)
    path = folder / "table.csv"
    _write_csv(path, TABLE_HEADER, [[*r[:3], f"kind_{y}", r[3]] for r, y in rows])
    data = {"name": "csv", "path": str(path), "label": "species", "val_split": 0}
    base = recipe(data, {"name": "mlp", "hidden": [16]}, lr=0.05, epochs=5)
    run, _ = trained_run(base, "table", "device=cpu")
    path.unlink()
    return run.best_path


def _table_rows(rng, n):
    centres = np.array([[0, 0, 0, 0], [4, 4, 0, 0], [0, 0, 4, 4]], dtype=float)
    ys = rng.integers(0, 3, size=n)
    return [(centres[y] + rng.normal(0, 0.5, size=4), int(y)) for y in ys]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _digit_pngs(folder: Path, count: int) -> list[tuple[Path, str]]:
    """Real test digits saved as 32×32 RGB PNGs (upscaled from 8×8 grey): (file, true class)."""
    test = digits().test
    files = []
    for i in range(count):
        pixels = test.x[i, 0].numpy()
        image = Image.fromarray(pixels).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
        path = folder / f"digit{i}.png"
        image.save(path)
        files.append((path, str(int(test.y[i]))))
    return files


# -- predict ----------------------------------------------------------------------------------


def test_predict_recognises_digit_images_of_another_size(digits_checkpoint, invoke, tmp_path):
    pngs = _digit_pngs(tmp_path, 20)
    result = invoke(
        "predict", str(digits_checkpoint), *(str(p) for p, _ in pngs), "--top-k", "10", "--json"
    )
    assert result.exit_code == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert [p["input"] for p in predictions] == [str(path) for path, _ in pngs]
    correct = 0
    for entry, (_, truth) in zip(predictions, pngs):
        probs = [c["probability"] for c in entry["predictions"]]
        assert sorted(c["class"] for c in entry["predictions"]) == [str(i) for i in range(10)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs == sorted(probs, reverse=True)
        correct += entry["predictions"][0]["class"] == truth
    assert correct >= 14, f"only {correct}/20 digits recognised"


def test_predict_prints_a_table_of_the_top_5_by_default(digits_checkpoint, invoke, tmp_path):
    (png, _), *_ = _digit_pngs(tmp_path, 1)
    result = invoke("predict", str(digits_checkpoint), str(png))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert str(png) in lines[0]
    assert all(word in result.stdout for word in ("rank", "class", "probability"))
    ranks = [line.split()[1] for line in lines if line.startswith("│")]
    assert ranks == ["1", "2", "3", "4", "5"]


def test_predict_over_many_inputs_prints_one_table_or_writes_csv_or_jsonl(
    digits_checkpoint, invoke, tmp_path
):
    np.save(tmp_path / "batch.npy", digits().test.x[:30].numpy())  # 30 samples
    shown = invoke("predict", str(digits_checkpoint), "batch.npy")
    assert shown.exit_code == 0, shown.stderr
    rows = [line for line in shown.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 30 and shown.stdout.count("probability") == 1  # one table, a row each
    written = invoke("predict", str(digits_checkpoint), "batch.npy", "-o", "p.csv")
    assert written.exit_code == 0, written.stderr
    assert "wrote 30 predictions to p.csv" in written.stderr
    assert written.stdout == ""  # the file holds them: not the terminal too
    table = list(csv.DictReader((tmp_path / "p.csv").open()))
    as_json = json.loads(invoke("predict", str(digits_checkpoint), "batch.npy", "--json").stdout)
    assert [r["input"] for r in table] == [p["input"] for p in as_json]
    assert [r["class_1"] for r in table] == [p["predictions"][0]["class"] for p in as_json]
    assert float(table[0]["probability_1"]) == pytest.approx(
        as_json[0]["predictions"][0]["probability"], abs=1e-6
    )
    assert invoke("predict", str(digits_checkpoint), "batch.npy", "-o", "p.jsonl").exit_code == 0
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == as_json

    wrong = invoke("predict", str(digits_checkpoint), "batch.npy", "-o", "p.txt")
    assert wrong.exit_code == 2 and ".csv or .jsonl" in wrong.stderr
    over = invoke("predict", str(digits_checkpoint), "batch.npy", "-o", str(digits_checkpoint))
    assert over.exit_code == 2  # never over a checkpoint


def test_predict_reads_npy_samples_and_batches_like_training(digits_checkpoint, invoke, tmp_path):
    test = digits().test
    np.save(tmp_path / "one.npy", test.x[0].numpy())  # 1×8×8 uint8
    np.save(tmp_path / "batch.npy", test.x[:4].numpy())  # 4×1×8×8 uint8
    np.save(tmp_path / "scaled.npy", test.x[:4].numpy().astype(np.float32) / 255)
    result = invoke(
        "predict",
        str(digits_checkpoint),
        "one.npy",
        "batch.npy",
        "scaled.npy",
        "-k",
        "10",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    names = ["one.npy", *(f"batch.npy[{i}]" for i in range(4))]
    assert [p["input"] for p in out] == names + [f"scaled.npy[{i}]" for i in range(4)]
    expected = load_for_inference(digits_checkpoint).predict_proba(test.x[:4])
    for i in range(4):  # uint8 pixels are scaled by 1/255; floats are taken as already scaled
        for entry in (out[1 + i], out[5 + i]):
            got = {c["class"]: c["probability"] for c in entry["predictions"]}
            assert [got[str(c)] for c in range(10)] == pytest.approx(expected[i].tolist(), abs=1e-6)
    assert [c["class"] for c in out[0]["predictions"]] == [
        c["class"] for c in out[1]["predictions"]
    ]


def test_predict_tabular_rows_from_csv_without_the_training_data(
    tabular_checkpoint, invoke, tmp_path
):
    rows = _table_rows(np.random.default_rng(7), 12)
    # The label column ('species' as in training, or 'label') is ignored wherever it is.
    _write_csv(tmp_path / "a.csv", TABLE_HEADER, [[*r[:3], "?", r[3]] for r, _ in rows])
    _write_csv(tmp_path / "b.csv", ["f0", "f1", "f2", "f3", "label"], [[*r, 0] for r, _ in rows])
    np.save(tmp_path / "c.npy", np.stack([r for r, _ in rows]))
    result = invoke("predict", str(tabular_checkpoint), "a.csv", "b.csv", "c.npy", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out) == 36 and out[0]["input"] == "a.csv[0]" and out[12]["input"] == "b.csv[0]"
    assert all(len(p["predictions"]) == 3 for p in out)  # top-k: min(5, 3 classes)
    top = [p["predictions"][0]["class"] for p in out]
    assert top[:12] == top[12:24] == top[24:]
    truth = [f"kind_{y}" for _, y in rows]
    assert sum(t == y for t, y in zip(top[:12], truth)) >= 10


@pytest.mark.parametrize(
    ("make", "name", "expected"),
    [
        (None, "missing.png", "not found"),
        (lambda p: p.write_bytes(b"not an image"), "broken.png", "cannot decode"),
        (lambda p: np.save(p, np.zeros((2, 8, 8), np.uint8)), "wrong.npy", "shape [2, 8, 8]"),
        (lambda p: p.write_text("hello"), "notes.txt", "unsupported file type"),
        (lambda p: p.write_text("a,b\n1,2\n"), "table.csv", "is a table"),
        (lambda p: np.save(p, np.array(["a"])), "strings.npy", "not numbers"),
    ],
)
def test_bad_image_inputs_exit_2_naming_the_file(
    digits_checkpoint, invoke, tmp_path, make, name, expected
):
    if make:
        make(tmp_path / name)
    result = invoke("predict", str(digits_checkpoint), name)
    assert result.exit_code == 2
    assert name in result.stderr and expected in result.stderr, result.stderr
    assert "Expected an image file" in result.stderr and "[1, 8, 8]" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("header", "row", "expected"),
    [
        (["f0", "f1", "f2"], [1, 2, 3], "no column 'f3'; the model was trained on the columns"),
        (["f0", "f1", "f2", "f3"], [1, "x", 3, 4], "line 2: column 'f1' holds 'x'"),
    ],
)
def test_bad_table_inputs_exit_2_naming_the_file(
    tabular_checkpoint, invoke, tmp_path, header, row, expected
):
    _write_csv(tmp_path / "in.csv", header, [row])
    result = invoke("predict", str(tabular_checkpoint), "in.csv")
    assert result.exit_code == 2
    assert "in.csv" in result.stderr and expected in result.stderr, result.stderr


def test_an_image_for_a_tabular_model_says_what_it_takes(tabular_checkpoint, invoke, tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    result = invoke("predict", str(tabular_checkpoint), "x.png")
    assert result.exit_code == 2
    assert "x.png is an image, but this model takes tabular rows of 4 features" in result.stderr


def test_weights_that_do_not_fit_the_model_are_a_user_error(digits_checkpoint, tmp_path):
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    checkpoint["recipe"]["model"] = {"name": "mlp", "hidden": [8]}
    save_checkpoint(tmp_path / "other.pt", checkpoint)  # a whole checkpoint (its digest)
    with pytest.raises(UserError, match="do not fit the model"):
        load_for_inference(tmp_path / "other.pt")


@pytest.mark.slow
def test_predict_json_stdout_is_only_json_in_a_real_process(digits_checkpoint, tmp_path):
    (png, _), *_ = _digit_pngs(tmp_path, 1)
    proc = dltrain("predict", str(digits_checkpoint), str(png), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["input"] == str(png)
    bad = dltrain("predict", str(digits_checkpoint), "nope.npy", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nope.npy" in bad.stderr


# -- export -----------------------------------------------------------------------------------


def _real_batch(predictor: Predictor, n: int = 7) -> torch.Tensor:
    """n real digits, preprocessed as the exported model expects them."""
    return predictor.preprocess(digits().test.x[:n])


def test_export_torchscript_matches_the_pytorch_model(digits_checkpoint, invoke, tmp_path):
    # a copy: the default output lies beside the checkpoint, and the shared one stays untouched
    digits_checkpoint = Path(shutil.copy(digits_checkpoint, tmp_path / "best.pt"))
    result = invoke("export", str(digits_checkpoint), "--format", "torchscript")
    assert result.exit_code == 0, result.stderr
    path = digits_checkpoint.with_name("best.torchscript.pt")
    assert path.is_file() and str(path) in " ".join(result.stdout.split())
    extra = {"dltrain.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    info = json.loads(extra["dltrain.json"])
    predictor = load_for_inference(digits_checkpoint)
    assert info["classes"] == predictor.classes and info["input_shape"] == [1, 8, 8]
    assert info["mean"] == predictor.meta["mean"] and info["std"] == predictor.meta["std"]
    assert info["kind"] == "image" and info["model"]["name"] == "seed_cnn"
    assert "uint8/255" in info["preprocessing"] and info["dltrain_version"]
    x = _real_batch(predictor)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), predictor.model(x), atol=1e-4, rtol=1e-4)


def test_export_onnx_matches_the_pytorch_model(digits_checkpoint, invoke, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    out = tmp_path / "model.onnx"
    result = invoke("export", str(digits_checkpoint), "--format", "onnx", "--output", str(out))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp files left
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    info = json.loads(props["dltrain.json"])
    predictor = load_for_inference(digits_checkpoint)
    assert info["classes"] == json.loads(props["classes"]) == predictor.classes
    assert json.loads(props["input_shape"]) == [1, 8, 8] and props["kind"] == "image"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 7):  # the batch axis is dynamic
        x = _real_batch(predictor, n)
        (logits,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = predictor.model(x)
        torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)


def test_export_onnx_without_its_packages_says_what_to_install(
    digits_checkpoint, invoke, monkeypatch
):
    import dltrain.use.export

    monkeypatch.setattr(dltrain.use.export, "_installed", lambda package: False)
    result = invoke("export", str(digits_checkpoint), "--format", "onnx")
    assert result.exit_code == 2
    assert "pip install onnx onnxscript" in result.stderr


# -- explain ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "panels"),
    [("integrated_gradients", 2), ("gradcam", 2), ("occlusion", 2), ("all", 4)],
)
def test_explain_writes_a_png(digits_checkpoint, invoke, tmp_path, method, panels):
    (png, _), *_ = _digit_pngs(tmp_path, 1)
    out = tmp_path / f"{method}.png"
    result = invoke("explain", str(digits_checkpoint), str(png), "--method", method, "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert "predicted" in result.stdout and out.name in result.stdout
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as image:
        image.load()
        assert image.width > 300 * panels and image.height > 300


def test_explain_defaults_to_the_current_folder(digits_checkpoint, invoke, tmp_path):
    (png, _), *_ = _digit_pngs(tmp_path, 1)
    result = invoke("explain", str(digits_checkpoint), str(png))  # invoke runs in tmp_path
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / f"explain-{png.stem}.png").read_bytes()[:8] == PNG_MAGIC


def test_attribution_maps_are_unit_scaled_and_complete(digits_checkpoint):
    """Each map in [0, 1] with its maximum 1; integrated gradients give nothing to the black
    pixels (they equal the black baseline) and add up to the score's rise from black."""
    predictor = load_for_inference(digits_checkpoint)
    x = digits().test.x[:1]
    result = explain_image(predictor, x, METHODS)
    probs = predictor.predict_proba(x)[0]
    assert result.predicted == predictor.classes[int(probs.argmax())]
    assert result.probability == pytest.approx(float(probs.max()))
    assert list(result.maps) == list(METHODS)
    for saliency in result.maps.values():
        assert saliency.shape == (8, 8) and saliency.min() >= 0 and saliency.max() == 1
    black = x[0, 0].numpy() == 0
    assert black.any() and (result.maps["integrated_gradients"][black] == 0).all()
    assert result.delta is not None and result.delta < 0.05


def test_gradcam_needs_a_conv_layer(digits_checkpoint):
    predictor = load_for_inference(digits_checkpoint)
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    mlp = Predictor(
        flat, predictor.meta, predictor.recipe, predictor.device, predictor.pipeline, predictor.path
    )
    assert last_conv(flat) is None and isinstance(last_conv(predictor.model), torch.nn.Conv2d)
    x = digits().test.x[:1]
    fallback = explain_image(mlp, x, METHODS)
    assert "gradcam" not in fallback.maps and "Grad-CAM" in fallback.notes[0]
    with pytest.raises(UserError, match="--method integrated_gradients"):
        explain_image(mlp, x, ("gradcam",))


def test_explain_attributes_a_table_row_to_its_columns(tabular_checkpoint, invoke, tmp_path):
    _write_csv(tmp_path / "row.csv", ["f0", "f1", "f2", "f3"], [[1, 2, 3, 4]])
    result = invoke("explain", str(tabular_checkpoint), "row.csv", "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)["rows"]
    assert set(row["attributions"]) == {"f0", "f1", "f2", "f3"}


# -- without the training data ----------------------------------------------------------------


def test_predict_export_explain_work_without_the_training_data(rgb_checkpoint, invoke, tmp_path):
    recipe = torch.load(rgb_checkpoint, weights_only=True)["recipe"]
    assert not Path(recipe["data"]["path"]).exists()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(tmp_path / "photo.jpg")
    Image.new("L", (5, 5), 128).save(tmp_path / "grey.png")  # converted to RGB, as in training
    result = invoke("predict", str(rgb_checkpoint), "photo.jpg", "grey.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert [p["input"] for p in json.loads(result.stdout)] == ["photo.jpg", "grey.png"]
    result = invoke("export", str(rgb_checkpoint), "--format", "torchscript", "-o", "m.pt")
    assert result.exit_code == 0, result.stderr
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    assert scripted(torch.zeros(2, 3, 12, 12)).shape == (2, 3)
    result = invoke("explain", str(rgb_checkpoint), "photo.jpg")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "explain-photo.png").read_bytes()[:8] == PNG_MAGIC


# -- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["predict", "export", "explain"])
def test_help_shows_examples_without_importing_torch(tmp_path, command):
    proc = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Example" in proc.stdout and "TORCH_IMPORTED=False" in proc.stderr
