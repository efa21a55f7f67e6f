"""Test-time augmentation (eval.tta): the views are exact, the output is their mean, and the
report of `dltrain eval` with TTA is what the averaged model gives on the split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dltrain.config.schema import Recipe
from dltrain.errors import UserError
from dltrain.runs.checkpoint import load_checkpoint
from dltrain.training.build import build_setup
from dltrain.training.evaluate import evaluate_checkpoint
from dltrain.training.tta import TestTimeAugmented, views_of, with_tta

from helpers.training import DIGITS, TABULAR, quiet, train


def test_the_views_are_the_image_mirrored_and_shifted_by_two_pixels():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    itself, mirrored = views_of(x, ["hflip"])
    assert torch.equal(itself, x) and torch.equal(mirrored, x.flip(-1))
    views = views_of(x, ["hflip", "translate"])
    assert len(views) == 6
    down_right, up_left = views[2], views[3]  # the image's two shifts
    assert torch.equal(down_right[..., 2:, 2:], x[..., :-2, :-2])
    assert torch.equal(up_left[..., :-2, :-2], x[..., 2:, 2:])
    assert torch.equal(views[4][..., 2:, 2:], x.flip(-1)[..., :-2, :-2])  # the mirror's shift
    assert all(v.shape == x.shape for v in views)


def test_the_output_is_the_mean_over_the_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(3, 3, 8, 8)
    model(x)  # materialise the lazy layer
    averaged = TestTimeAugmented(model, ["hflip", "translate"])(x)
    by_hand = sum(model(v) for v in views_of(x, ["hflip", "translate"])) / 6
    assert torch.allclose(averaged, by_hand, atol=1e-6)
    # a mirror-symmetric model (global average pooling) is unchanged by hflip
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    assert torch.allclose(TestTimeAugmented(pooled, ["hflip"])(x), pooled(x), atol=1e-6)


def test_eval_with_tta_reports_what_the_averaged_model_gives(tmp_path):
    run, _ = train(tmp_path, DIGITS, "digits", "train.epochs=1")
    plain = evaluate_checkpoint(run.best_path, tmp_path / "plain", quiet())
    tta = evaluate_checkpoint(
        run.best_path, tmp_path / "tta", quiet(), overrides=["eval.tta=[hflip, translate]"]
    )
    checkpoint = load_checkpoint(run.best_path)
    s = build_setup(Recipe.model_validate(checkpoint["recipe"]), meta=checkpoint["data_meta"])
    s.model.load_state_dict(checkpoint["model"])
    model = TestTimeAugmented(s.model, ["hflip", "translate"]).eval()
    test = s.data.splits["test"]
    with torch.no_grad():
        predicted = model(s.pipeline.eval(test.x)).argmax(dim=1)
    assert tta["accuracy"] == pytest.approx(float((predicted == test.y).float().mean()))
    assert tta["loss"] != plain["loss"]  # the views change the answers


def test_tta_on_rows_of_features_is_refused_before_training(tmp_path):
    with pytest.raises(UserError, match="eval.tta: test-time augmentation views"):
        with_tta(nn.Linear(4, 2), ["hflip"], "tabular")
    assert Recipe.model_validate({**TABULAR, "name": "t"}).eval.tta == []
    with pytest.raises(UserError, match="this model takes tabular input"):
        train(tmp_path, TABULAR, "t", "eval.tta=[hflip]")
    assert not (tmp_path / "t" / "checkpoints").exists()
