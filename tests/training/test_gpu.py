"""GPU defaults: resident data on the device, bf16 autocast, channels_last, fused optimizers.

Skipped without CUDA; run on a GPU machine with `python -m pytest tests/training/test_gpu.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dltrain.config.registry import OPTIMIZERS
from dltrain.data.loaders import ResidentBatches
from dltrain.training.build import build_setup, split_batches
from dltrain.training.evaluate import evaluate_checkpoint

from helpers.cli import QUICKSTART
from helpers.training import DIGITS, make_recipe, metric_rows, quiet, recipe, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CIFAR_SHAPED = recipe(
    {
        "name": "synthetic",
        "shape": [3, 32, 32],
        "num_classes": 10,
        "train_size": 4096,
        "test_size": 1024,
        "batch_size": 256,
        "augment": ["hflip", {"random_crop": {}}],
    },
    {"name": "resnet18"},
    epochs=2,
    optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    device="cuda",
)


def test_defaults_on_cuda_are_resident_bf16_channels_last_and_fused(tmp_path):
    recipe = make_recipe(tmp_path, CIFAR_SHAPED, "defaults")
    s = build_setup(recipe)
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert s.precision.name == expected
    assert s.pipeline.channels_last
    conv = next(m for m in s.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)

    batches = split_batches(s, "train", shuffle=True)
    assert isinstance(batches, ResidentBatches)
    assert batches.x.device.type == "cuda" and batches.x.dtype == torch.uint8
    x, y = next(iter(batches.epoch(1)))
    assert x.is_cuda and y.is_cuda
    prepared = s.pipeline.train(x)
    assert prepared.is_contiguous(memory_format=torch.channels_last)

    optimizer = OPTIMIZERS.build(recipe.optimizer, params=s.model.parameters(), device_type="cuda")
    assert optimizer.defaults.get("fused") is True


def test_a_cuda_run_learns_and_evaluates_from_its_checkpoint(tmp_path):
    # real digits (CIFAR_SHAPED's noise prototypes are for shapes and speed, not learning)
    digits = {**DIGITS, "device": "cuda"}
    run, report = train(tmp_path, digits, "cuda-run", "data.augment=[]", "train.epochs=15")
    assert report["accuracy"] > 0.9
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
    assert not isinstance(split_batches(s, "train", shuffle=True), ResidentBatches)
    optimizer = OPTIMIZERS.build(recipe.optimizer, params=s.model.parameters(), device_type="cuda")
    assert not optimizer.defaults.get("fused")


# -- short steps: the compiled forward half as CUDA graphs -------------------------------------


def test_reduce_overhead_replays_the_step_with_its_running_loss_as_cuda_graphs(tmp_path):
    """train.compile=reduce-overhead: the step's forward half (augmentation, model, loss and the
    running loss added in place) is captured as CUDA graphs — none skipped (a mutated input or
    a CPU tensor would make inductor skip them) — and trains like eager."""
    from torch._dynamo.utils import counters

    digits = {**DIGITS, "device": "cuda", "model": {"name": "seed_cnn"}}
    counters.clear()
    graphed, graphed_report = train(tmp_path, digits, "graphs", "train.compile=reduce-overhead")
    skips = dict(counters["inductor"])
    eager, eager_report = train(tmp_path, digits, "eager")
    assert skips.get("cudagraph_skips", 0) == 0, skips
    for a, b in zip(metric_rows(graphed), metric_rows(eager), strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=0.05)
    assert graphed_report["accuracy"] >= eager_report["accuracy"] - 0.03


def test_speednet_with_ema_and_param_groups_learns_on_cuda(tmp_path):
    """The speedrun's parts on a GPU (bf16, channels_last): whitening fitted on the device, a
    second param group, the moving average evaluating."""
    from test_speednet import SYNTHETIC

    run, report = train(
        tmp_path,
        {**SYNTHETIC, "device": "cuda"},
        "speednet",
        "train.epochs=6",
        "optimizer.norms_and_biases={lr_scale: 4}",
        "train.ema={decay: 0.9, warmup: true}",
    )
    assert report["accuracy"] >= 0.85
    saved = torch.load(run.best_path, weights_only=True, map_location="cpu")
    assert saved["ema"]["updates"] > 1


# -- data parallel on a GPU -----------------------------------------------------------------------


def fit_quickstart(tmp_path: Path, name: str, launcher: list[str]) -> dict:
    """The quickstart on cuda, launched by `launcher` (plain python, or torchrun), in a child."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(QUICKSTART.parents[1]), *sys.path])}
    command = [sys.executable, *launcher, "-m", "dltrain", "fit", str(QUICKSTART)]
    command += ["device=cuda", f"name={name}", f"output={tmp_path}", "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / name / "report.json").read_text())


@pytest.mark.slow
def test_one_gpu_ddp_under_torchrun_reaches_the_plain_runs_accuracy(tmp_path):
    """DDP (nccl) in one process via torchrun against the plain run: the same recipe, the same
    accuracy. (GPU kernels are not bitwise deterministic, so equal up to a test sample or two.)"""
    plain = fit_quickstart(tmp_path, "plain", [])
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    ddp = fit_quickstart(tmp_path, "ddp", torchrun)
    print(
        f"\nquickstart on {torch.cuda.get_device_name()}: plain accuracy {plain['accuracy']:.4f}, "
        f"torchrun 1-GPU DDP accuracy {ddp['accuracy']:.4f}"
    )
    events = (tmp_path / "ddp" / "events.jsonl").read_text().splitlines()
    assert json.loads(events[0])["processes"] == 1
    assert ddp["num_samples"] == plain["num_samples"] == 359
    assert ddp["accuracy"] >= 0.95 and abs(ddp["accuracy"] - plain["accuracy"]) <= 2 / 359


@pytest.mark.slow
def test_sync_batchnorm_under_torchrun_trains_and_evaluates_in_one_process(tmp_path):
    recipe = tmp_path / "bn.yaml"
    recipe.write_text(
        "name: bn\ndevice: cuda\ndata: {name: digits}\n"
        "model: {name: mlp, hidden: [64], batch_norm: true}\n"
        "train: {epochs: 8}\ndistributed: {sync_batchnorm: true}\n"
        f"output: {tmp_path}\n",
        encoding="utf-8",
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(QUICKSTART.parents[1]), *sys.path])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=1", "-m", "dltrain", "fit", str(recipe), "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bn" / "report.json").read_text())
    assert report["accuracy"] > 0.9
    # SyncBatchNorm keeps BatchNorm's parameters and buffers: the plain model loads them
    again = evaluate_checkpoint(
        tmp_path / "bn" / "checkpoints" / "best.pt", tmp_path / "e", quiet()
    )
    assert again["confusion_matrix"] == report["confusion_matrix"]
