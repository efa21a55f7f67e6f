"""Regression and seq2seq end to end through the engine, images as rows, and task mismatches."""

from __future__ import annotations

import json

import pytest

from dltrain.errors import UserError
from dltrain.evaluate import evaluate_checkpoint

from runs import metric_rows, quiet, train

ADDING = {
    "seed": 0,
    "device": "cpu",
    "data": {
        "name": "adding",
        "length": 10,
        "train_size": 512,
        "test_size": 128,
        "batch_size": 32,
        "val_split": 0.1,
        "normalize": "none",
    },
    "model": {"name": "lstm", "hidden_size": 16},
    "loss": {"name": "mse"},
    "optimizer": {"name": "adam", "lr": 0.01},
    "train": {"epochs": 3},
}

REVERSE = {
    "seed": 0,
    "device": "cpu",
    "data": {
        "name": "reverse",
        "min_length": 1,
        "max_length": 3,
        "train_size": 600,
        "test_size": 100,
        "batch_size": 32,
        "val_split": 0.1,
    },
    "model": {
        "name": "transformer_seq2seq",
        "d_model": 32,
        "heads": 2,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "feedforward": 64,
        "dropout": 0.0,
    },
    "loss": {"name": "cross_entropy"},
    "optimizer": {"name": "adam", "lr": 0.003},
    "train": {"epochs": 2},
}


def test_regression_reports_mse_mae_r2_and_eval_reproduces_it(tmp_path):
    run, report = train(tmp_path, ADDING, "adding")
    assert report["task"] == "regression"
    assert {"mse", "mae", "r2", "num_samples"} <= set(report)
    assert report["num_samples"] == 128 and report["mse"] >= 0 and report["mae"] >= 0
    assert report["mse"] < 1 / 6  # beats always answering 1.0, even after 3 tiny epochs
    assert "confusion_matrix" not in report
    rows = metric_rows(run)
    assert len(rows) == 3 and all(row["val_accuracy"] == "" for row in rows)
    again = evaluate_checkpoint(run.best_path, tmp_path / "eval", quiet())
    assert {k: v for k, v in again.items() if k != "checkpoint"} == {
        k: v for k, v in report.items() if k != "checkpoint"
    }
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["mse"] == report["mse"]
    assert "mse" in (run.root / "report.md").read_text()


def test_seq2seq_reports_exact_match_and_token_accuracy(tmp_path):
    run, report = train(tmp_path, REVERSE, "reverse")
    assert report["task"] == "seq2seq"
    assert 0 <= report["exact_match"] <= report["token_accuracy"] <= 1
    assert report["num_samples"] == 100
    rows = metric_rows(run)
    assert all(0 <= float(row["val_accuracy"]) <= 1 for row in rows)  # exact match per epoch
    again = evaluate_checkpoint(run.best_path, tmp_path / "eval", quiet())
    assert again["exact_match"] == report["exact_match"]


def test_images_as_rows_train_a_recurrent_model(tmp_path):
    digits = {
        "seed": 0,
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64, "as_sequence": "rows"},
        "model": {"name": "gru", "hidden_size": 32},
        "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 3},
    }
    _, report = train(tmp_path, digits, "rows")
    assert report["accuracy"] > 0.6  # learning, after 3 short epochs


@pytest.mark.parametrize(
    ("base", "overrides", "message"),
    [
        (ADDING, ["data.task=classification"], "data.task"),
        (ADDING, ["loss.name=cross_entropy"], "cross_entropy"),
        (ADDING, ["data.as_sequence=rows"], "data.as_sequence"),
        (REVERSE, ["model={name: lstm}"], "transformer_seq2seq"),
    ],
)
def test_a_recipe_that_does_not_fit_the_task_is_a_user_error(tmp_path, base, overrides, message):
    with pytest.raises(UserError, match=message) as error:
        train(tmp_path, base, "wrong", *overrides)
    assert error.value.exit_code == 2


def test_every_declared_task_has_its_own_task_object():
    from dltrain.data.base import TASKS
    from dltrain.tasks import task_for

    assert [task_for(name, {}).name for name in TASKS] == list(TASKS)
