"""train.ema: the moving average is torch's EMA formula exactly, it is what evaluates and what
a checkpoint's `model` holds, and a resumed run continues both weights exactly."""

from __future__ import annotations

import pytest
import torch

from dltrain.config.loading import load_recipe
from dltrain.config.schema import EmaSettings
from dltrain.errors import UserError
from dltrain.runs.checkpoint import load_checkpoint
from dltrain.runs.folder import RunFolder
from dltrain.training.build import build_setup, split_batches
from dltrain.training.ema import WeightAverage
from dltrain.training.evaluate import evaluate

from helpers.training import (
    DIGITS,
    assert_same_tensors,
    metric_rows,
    mid_epoch_saves,
    train,
    weights,
)

EMA = ["train.ema.decay=0.9", "train.ema.every_steps=3"]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _nudge(model: torch.nn.Module, by: float) -> None:
    with torch.no_grad():
        for tensor in [*model.parameters(), model[1].running_mean]:
            tensor.add_(by)
        model[1].num_batches_tracked += 1


def test_the_average_is_the_ema_formula_every_n_steps():
    model = _net()
    average = WeightAverage(model, EmaSettings(decay=0.75, every_steps=2))
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(1, 8):
        _nudge(model, 0.1 * step)
        average.after_step(step)
        if step == 1:  # the first step is taken in whole: the initial weights never evaluate
            expected = {k: model.state_dict()[k].clone() for k in expected}
        elif step % 2 == 0:
            expected = {k: 0.75 * v + 0.25 * model.state_dict()[k] for k, v in expected.items()}
    got = average.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
    assert average.updates == 4  # steps 1, 2, 4, 6
    assert not any(p.requires_grad for p in average.module.parameters())


def test_warmup_follows_timms_schedule():
    average = WeightAverage(_net(), EmaSettings(decay=0.99, warmup=True))
    decays = []
    for n in range(4):
        average.updates = n
        decays.append(average.decay())
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12, 4 / 13])
    average.updates = 10_000
    assert average.decay() == 0.99


def test_the_averaged_weights_evaluate_and_are_the_checkpoints_model(tmp_path):
    run, report = train(tmp_path, DIGITS, "ema", "train.epochs=2", *EMA)
    saved = load_checkpoint(run.best_path)
    trained = saved["ema"]["training_weights"]
    assert saved["ema"]["updates"] == 1 + (2 * 20) // 3  # step 1, then every 3rd of 40 steps
    assert any(not torch.equal(saved["model"][k], trained[k]) for k in trained)
    # the report and the validation column are the averaged model's
    s = build_setup(load_recipe(run.root / "recipe.yaml"), "cpu")
    s.model.load_state_dict(saved["model"])
    validation = evaluate(s.model, split_batches(s, "val", shuffle=False), s)
    best = metric_rows(run)[saved["epoch"] - 1]
    assert float(best["val_loss"]) == pytest.approx(validation.loss, rel=1e-6)
    assert report["checkpoint"].endswith("best.pt")


def test_resume_continues_the_average_exactly(tmp_path):
    straight, _ = train(tmp_path, DIGITS, "straight", "train.epochs=3", *EMA)
    train(tmp_path, DIGITS, "resumed", "train.epochs=1", *EMA)
    first = RunFolder(tmp_path / "resumed")
    resumed, _ = train(tmp_path, DIGITS, "resumed", "train.epochs=3", *EMA, resume=first.last_path)
    for a, b in ((straight.last_path, resumed.last_path), (straight.best_path, resumed.best_path)):
        assert_same_tensors(weights(a), weights(b))
        assert_same_tensors(
            load_checkpoint(a)["ema"]["training_weights"],
            load_checkpoint(b)["ema"]["training_weights"],
        )
    assert metric_rows(straight) == metric_rows(resumed)


def test_resume_mid_epoch_continues_the_average_exactly(tmp_path):
    settings = ["train.epochs=2", "train.checkpoint_every_steps=7", *EMA]
    straight, _ = train(tmp_path, DIGITS, "straight", *settings)
    saved = mid_epoch_saves(tmp_path, DIGITS, *settings)
    mid = tmp_path / "mid.pt"
    mid.write_bytes(saved[-1][1])  # steps 35 (epoch 2, batch 15): not an EMA step (every 3rd)
    resumed, _ = train(tmp_path, DIGITS, "resumed", *settings, resume=mid)
    assert_same_tensors(weights(straight.last_path), weights(resumed.last_path))


def test_a_checkpoint_without_the_average_cannot_resume_an_ema_run(tmp_path):
    plain, _ = train(tmp_path, DIGITS, "plain", "train.epochs=1")
    with pytest.raises(UserError, match="train.ema"):
        train(tmp_path, DIGITS, "ema", "train.epochs=2", *EMA, resume=plain.last_path)


def test_recipes_without_ema_resolve_as_before(tmp_path):
    from helpers.training import make_recipe

    assert "ema" not in make_recipe(tmp_path, DIGITS, "r").to_dict()["train"]
    with_ema = make_recipe(tmp_path, DIGITS, "r", "train.ema.decay=0.99").to_dict()
    assert with_ema["train"]["ema"] == {"decay": 0.99, "every_steps": 1, "warmup": False}
