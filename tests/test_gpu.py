"""GPU defaults: resident data on the device, bf16 autocast, channels_last, fused optimizers.

Skipped without CUDA; run on a GPU machine with `python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from dltrain.data.loaders import ResidentBatches
from dltrain.engine import _batches, build_setup
from dltrain.registry import OPTIMIZERS

from runs import make_recipe, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CIFAR_SHAPED = {
    "seed": 0,
    "device": "cuda",
    "data": {
        "name": "synthetic",
        "shape": [3, 32, 32],
        "num_classes": 10,
        "train_size": 4096,
        "test_size": 1024,
        "batch_size": 256,
        "augment": ["hflip", {"random_crop": {}}],
    },
    "model": {"name": "resnet18"},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    "train": {"epochs": 2},
}


def test_defaults_on_cuda_are_resident_bf16_channels_last_and_fused(tmp_path):
    recipe = make_recipe(tmp_path, CIFAR_SHAPED, "defaults")
    s = build_setup(recipe)
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert s.precision.name == expected
    assert s.pipeline.channels_last
    conv = next(m for m in s.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)

    batches = _batches(s, "train", shuffle=True)
    assert isinstance(batches, ResidentBatches)
    assert batches.x.device.type == "cuda" and batches.x.dtype == torch.uint8
    x, y = next(iter(batches.epoch(1)))
    assert x.is_cuda and y.is_cuda
    prepared = s.pipeline.train(x)
    assert prepared.is_contiguous(memory_format=torch.channels_last)

    optimizer = OPTIMIZERS.build(recipe.optimizer, params=s.model.parameters(), device_type="cuda")
    assert optimizer.defaults.get("fused") is True


def test_a_cuda_run_learns_and_evaluates_from_its_checkpoint(tmp_path):
    run, report = train(tmp_path, CIFAR_SHAPED, "cuda-run")
    assert report["accuracy"] > 0.5  # 10 learnable prototypes: far above chance (0.1)
    state = torch.load(run.best_path, weights_only=True, map_location="cpu")
    assert all(t.device.type == "cpu" for t in state["model"].values())


def test_each_default_can_be_turned_off(tmp_path):
    recipe = make_recipe(
        tmp_path,
        CIFAR_SHAPED,
        "off",
        "train.precision=fp32",
        "train.channels_last=false",
        "optimizer.fused=false",
        "data.loader=workers",
        "data.num_workers=0",
    )
    s = build_setup(recipe)
    assert s.precision.name == "fp32" and not s.pipeline.channels_last
    assert not isinstance(_batches(s, "train", shuffle=True), ResidentBatches)
    optimizer = OPTIMIZERS.build(recipe.optimizer, params=s.model.parameters(), device_type="cuda")
    assert not optimizer.defaults.get("fused")
