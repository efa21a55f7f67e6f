"""models/timm_models.py: timm's image models as `timm:<name>` — trained from an image folder,
resumed bit for bit, served and exported (ONNX, TorchScript) from the run folder with no
network; pretrained weights from a local file (their statistics and size then shape the
input); an unreachable hub said at once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers.training import assert_resumes_bitwise

timm = pytest.importorskip("timm")

MODEL = "timm:test_convnext"  # one of timm's tiny test models (206k parameters)


def bright_and_dark(root, per_class: int = 24, size: int = 32) -> None:
    """root/{bright,dark}/*.png, noisy size×size images: the class is the brightness."""
    rng = np.random.default_rng(0)
    for name, level in (("bright", 190), ("dark", 60)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(level, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def write_recipe(tmp_path, name: str, **model) -> str:
    recipe = {
        "name": name,
        "output": "runs",
        "device": "cpu",
        "data": {"name": "image_folder", "path": "images", "batch_size": 8, "val_split": 0.0},
        "model": {"name": MODEL, **model},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "train": {"epochs": 4},
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    return f"{name}.yaml"


@pytest.fixture
def offline(monkeypatch):
    """No hub: a closed local port as its endpoint, and an empty cache."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("dltrain.models.timm_models._cached_weights", lambda arch: None)


def test_a_timm_model_learns_resumes_bitwise_and_predicts_offline(tmp_path, invoke, offline):
    bright_and_dark(tmp_path / "images")
    fitted = invoke("fit", write_recipe(tmp_path, "convnext"), "-q")
    assert fitted.exit_code == 0, fitted.output
    run = tmp_path / "runs" / "convnext"
    assert json.loads((run / "report.json").read_text())["accuracy"] >= 0.9

    assert_resumes_bitwise(invoke, write_recipe(tmp_path, "halted"), 2, run / "checkpoints/last.pt")

    predicted = invoke(
        "predict", "runs/convnext/checkpoints/best.pt", "images/bright/0.png", "--json"
    )
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)[0]["predictions"][0]["class"] == "bright"
    explained = invoke("explain", "runs/convnext/checkpoints/best.pt", "images/bright/0.png")
    assert explained.exit_code == 0, explained.output  # Captum's maps, Grad-CAM included
    assert "integrated_gradients, gradcam, occlusion written" in explained.output
    for form in ("onnx", "torchscript"):
        exported = invoke(
            "export", "runs/convnext/checkpoints/best.pt", "--format", form, "--output", f"m.{form}"
        )
        assert exported.exit_code == 0, exported.output


def test_pretrained_weights_from_a_file_and_their_statistics(tmp_path, invoke, offline):
    """timm's own state dict (1,000 classes) saved to a file: the backbone starts from it, the
    head is new for 2 classes, and normalize: auto takes the weights' mean and std."""
    bright_and_dark(tmp_path / "images")
    published = timm.create_model("test_convnext", num_classes=1000).state_dict()
    torch.save(published, tmp_path / "convnext.pth")
    fitted = invoke(
        "fit", write_recipe(tmp_path, "tuned", pretrained="convnext.pth", freeze="backbone"),
        "-q", "train.epochs=1",
    )  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    saved = torch.load(tmp_path / "runs/tuned/checkpoints/last.pt", weights_only=True)
    statistics = ("running_", "num_batches_tracked")
    backbone = [k for k in published if not k.startswith("head.fc") and not any(
        s in k for s in statistics
    )]  # fmt: skip
    assert backbone and all(torch.equal(saved["model"][k], published[k]) for k in backbone)
    assert saved["model"]["head.fc.weight"].shape == (2, published["head.fc.weight"].shape[1])
    config = timm.models.get_pretrained_cfg("test_convnext")
    assert saved["data_meta"]["mean"] == pytest.approx(list(config.mean))
    assert saved["data_meta"]["std"] == pytest.approx(list(config.std))
    # image_size: auto (the default) is the size the weights were trained at, not 32×32
    assert saved["data_meta"]["input_shape"] == list(config.input_size) == [3, 160, 160]


def test_pretrained_true_takes_the_cache_offline_and_serves_without_it(
    tmp_path, invoke, offline, monkeypatch
):
    """pretrained: true with no hub: the weights from the local cache; then eval and predict
    from the run folder work with the cache gone too (the checkpoint's weights are used)."""
    bright_and_dark(tmp_path / "images", per_class=8)
    torch.save(timm.create_model("test_convnext").state_dict(), tmp_path / "cached.pth")
    cache = "dltrain.models.timm_models._cached_weights"
    monkeypatch.setattr(cache, lambda arch: str(tmp_path / "cached.pth"))
    fitted = invoke("fit", write_recipe(tmp_path, "hub", pretrained=True), "-q", "train.epochs=1")
    assert fitted.exit_code == 0, fitted.output
    monkeypatch.setattr(cache, lambda arch: None)  # nothing cached, no hub
    evaluated = invoke("eval", "runs/hub/checkpoints/best.pt", "--json")
    predicted = invoke("predict", "runs/hub/checkpoints/best.pt", "images/dark/0.png")
    assert evaluated.exit_code == 0, evaluated.output
    assert predicted.exit_code == 0, predicted.output
    # the images at the size the model was trained at (160×160), as in the fit's own report
    trained = json.loads((tmp_path / "runs/hub/report.json").read_text())
    assert json.loads(evaluated.stdout)["loss"] == pytest.approx(trained["loss"])


def test_an_unreachable_hub_is_one_message_at_once(tmp_path, invoke, offline):
    """Said before any data is read: here the image folder is empty (reading it would fail)."""
    (tmp_path / "images").mkdir()
    refused = invoke("fit", write_recipe(tmp_path, "hub", pretrained=True), "-q")
    assert refused.exit_code == 2, refused.output
    assert "cannot be reached" in refused.output and "model.pretrained" in refused.output
    assert "Traceback" not in refused.output
    missing = invoke("fit", write_recipe(tmp_path, "file", pretrained="nowhere.pth"), "-q")
    assert missing.exit_code == 2 and "is not a file" in missing.output, missing.output


def test_images_too_small_for_the_model_are_refused_before_training(tmp_path, invoke):
    bright_and_dark(tmp_path / "images", per_class=4, size=16)  # convnext shrinks them to 0
    refused = invoke("fit", write_recipe(tmp_path, "small"), "-q")
    assert refused.exit_code == 2, refused.output
    assert "cannot take images of (3, 16, 16)" in refused.output
    assert "data.image_size" in refused.output


def test_list_models_shows_a_familys_members_by_pattern(invoke):
    listed = invoke("list", "models", "timm:test_conv*")
    assert listed.exit_code == 0, listed.output
    assert "timm:test_convnext" in listed.output and "timm:test_vit" not in listed.output
