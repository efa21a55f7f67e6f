"""speednet and the speedrun recipe: the whitening stem whitens, the net learns, it refuses
images too small for it, and recipes/cifar10_speedrun.yaml trains on real CIFAR-10 JPEGs
(a few hundred, one epoch: the GPU figures come from bench/speedrun.py)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from dltrain.errors import UserError
from dltrain.models.speednet import PatchWhitening, speednet
from dltrain.runs.checkpoint import load_checkpoint

from helpers.cli import REPO, words
from helpers.training import recipe, train

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
RECIPE = REPO / "recipes" / "cifar10_speedrun.yaml"
MUON_RECIPE = REPO / "recipes" / "cifar10_speedrun_muon.yaml"

SYNTHETIC = recipe(
    {
        "name": "synthetic",
        "shape": [3, 12, 12],
        "num_classes": 4,
        "train_size": 600,
        "test_size": 200,
        "noise": 1.5,
        "val_split": 0,
        "batch_size": 50,
    },
    {"name": "speednet", "widths": [8, 16, 16]},
    epochs=3,
    optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": True},
    device="cpu",
)


def _correlated_images(n: int = 64) -> torch.Tensor:
    """Smooth, channel-correlated images: neighbouring pixels and channels move together."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(n, 1, 18, 18, generator=generator)
    smooth = torch.nn.functional.avg_pool2d(base, 3, stride=1)  # 16×16, correlated neighbours
    noise = 0.3 * torch.randn(n, 3, 16, 16, generator=generator)
    return smooth.expand(-1, 3, -1, -1) * torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1) + noise


def test_the_stem_whitens_its_patches():
    images = _correlated_images()
    stem = PatchWhitening(3)
    stem.fit_to_data(images)
    out = stem(images)[:, :12]  # the + copies; the − copies mirror them
    features = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert features.mean(0).abs().max() < 1e-4  # centred by the bias
    covariance = torch.cov(features.T)
    # identity, but for the eps that damps the smallest directions a little
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(stem(images)[:, 12:], -stem(images)[:, :12])
    assert not stem.conv.weight.requires_grad and stem.conv.bias.requires_grad


def test_speednet_learns_and_its_whitening_travels_in_the_checkpoint(tmp_path):
    run, report = train(tmp_path, SYNTHETIC, "speed")
    assert report["accuracy"] >= 0.9
    saved = load_checkpoint(run.best_path)["model"]
    stem = saved["0.conv.weight"].flatten(1)
    # fitted, not torch's random init: the filters are orthogonal directions (rows of V^T / √λ)
    gram = stem[:12] @ stem[:12].T
    off_diagonal = gram - torch.diag(torch.diag(gram))
    assert off_diagonal.abs().max() < 1e-3 * torch.diag(gram).max()
    # BN scales stay fixed at 1 (bn_scale: fixed); their shifts learned
    scales = [v for k, v in saved.items() if k.endswith(".weight") and v.dim() == 1]
    assert scales and all(torch.equal(v, torch.ones_like(v)) for v in scales)


def test_the_whitening_bias_trains_for_its_epochs_then_stays_exactly(tmp_path):
    def stem_bias(name: str, *overrides: str) -> tuple[torch.Tensor, torch.Tensor]:
        run, _ = train(tmp_path, SYNTHETIC, name, *overrides)
        saved = load_checkpoint(run.last_path)["model"]
        return saved["0.conv.bias"], saved["2.0.weight"]

    one_epoch, _ = stem_bias("one", "train.epochs=1", "model.whiten_bias_epochs=1")
    frozen, frozen_conv = stem_bias("frozen", "model.whiten_bias_epochs=1")
    trained, trained_conv = stem_bias("trained")
    # SGD with momentum 0.9: a bias only given a zero gradient would still move
    assert torch.equal(frozen, one_epoch)
    assert not torch.equal(trained, one_epoch)  # without the option it trains on
    assert not torch.equal(frozen_conv, trained_conv)  # and the rest trained in both
    with pytest.raises(UserError, match="model.whiten_bias_epochs: only the whitening stem"):
        speednet(input_shape=(3, 12, 12), num_classes=4, stem="conv", whiten_bias_epochs=2)


def test_speednet_refuses_images_too_small_for_its_pools():
    with pytest.raises(UserError, match="at least 9×9 pixels.*8×8"):
        speednet(input_shape=(1, 8, 8), num_classes=10)
    assert speednet(input_shape=(3, 9, 9), num_classes=10)(torch.zeros(2, 3, 9, 9)).shape == (2, 10)


@pytest.fixture(scope="module")
def few_cifar_jpegs(tmp_path_factory) -> Path:
    """30 JPEGs of each class from the CIFAR-10 archive, in its train/<class>/ layout."""
    if not ARCHIVE.is_file():
        pytest.skip(f"{ARCHIVE} is not here (../shared/data)")
    root = tmp_path_factory.mktemp("cifar")
    taken: dict[str, int] = {}
    with tarfile.open(ARCHIVE) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            label = parts[-2]
            if taken.get(label, 0) < 30:
                taken[label] = taken.get(label, 0) + 1
                archive.extract(member, root, filter="data")
            if len(taken) == 10 and all(v == 30 for v in taken.values()):
                break
    return root


@pytest.mark.parametrize("recipe", [RECIPE, MUON_RECIPE], ids=["sgd", "muon"])
def test_the_speedrun_recipe_trains_on_cifar_jpegs(tmp_path, few_cifar_jpegs, invoke, recipe):
    result = invoke(
        "fit",
        str(recipe),
        f"data.path={few_cifar_jpegs}",
        "data.batch_size=100",
        "train.epochs=1",
        "train.compile=false",  # compiling on 2 CPU cores costs a minute
        f"output={tmp_path}",
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / recipe.stem
    report = json.loads((run / "report.json").read_text())
    assert report["split"] == "val" and report["num_samples"] == 30  # 10% of 300 carved
    saved = load_checkpoint(run / "checkpoints" / "best.pt")
    assert saved["recipe"]["eval"]["tta"] == ["hflip", "translate"]
    assert saved["recipe"]["model"]["name"] == "speednet"
    if recipe == RECIPE:
        assert saved["ema"]["updates"] >= 1  # the average is what `model` holds
    else:  # both optimizers' states, Muon's momentum for each conv as a matrix
        assert set(saved["optimizer"]) == {"muon", "others"}
        assert len(saved["optimizer"]["muon"]["state"]) == 6
        assert "muon: 6 weight matrices" in words(result.output)
