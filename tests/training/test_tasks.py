"""Regression and seq2seq end to end through the engine, images as rows, and task mismatches."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from dltrain.errors import UserError
from dltrain.losses import mse
from dltrain.reporting.progress import Progress
from dltrain.training.evaluate import evaluate_checkpoint
from dltrain.training.tasks import Regression

from helpers.training import TINY_SEQ2SEQ, metric_rows, model_outputs, quiet, recipe, train

ADDING = recipe(
    {
        "name": "adding",
        "length": 10,
        "train_size": 512,
        "test_size": 128,
        "batch_size": 32,
        "val_split": 0.1,
        "normalize": "none",
    },
    {"name": "lstm", "hidden_size": 16},
    lr=0.01,
    epochs=3,
    loss={"name": "mse"},
    device="cpu",
)

REVERSE = recipe(
    {
        "name": "reverse",
        "min_length": 1,
        "max_length": 3,
        "train_size": 600,
        "test_size": 100,
        "batch_size": 32,
        "val_split": 0.1,
    },
    TINY_SEQ2SEQ,
    lr=0.003,
    epochs=2,
    loss={"name": "cross_entropy"},
    device="cpu",
)


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


def test_the_regression_report_equals_sklearn_on_the_models_predictions(tmp_path):
    run, report = train(tmp_path, ADDING, "adding", "data.eval_batch_size=50")
    outputs, targets = model_outputs(run.best_path, "test")
    predicted, truth = outputs.squeeze(-1).double().numpy(), targets.double().numpy()
    assert report["num_samples"] == len(truth) == 128
    assert report["mse"] == pytest.approx(mean_squared_error(truth, predicted), rel=1e-9)
    assert report["mae"] == pytest.approx(mean_absolute_error(truth, predicted), rel=1e-9)
    assert report["r2"] == pytest.approx(r2_score(truth, predicted), rel=1e-9)
    assert report["mae"] != pytest.approx(report["mse"])  # two different numbers


class Fixed(torch.nn.Module):
    """A "model" that answers the prediction it was given for each row (x is the row index)."""

    def __init__(self, answers: torch.Tensor):
        super().__init__()
        self.answers = answers

    def forward(self, x):
        return self.answers[x.long()].unsqueeze(-1)


@pytest.mark.parametrize(
    ("offset", "spread", "exact"),
    [
        (0.0, 1.0, False),
        (1e8, 1.0, False),
        (-3e6, 0.01, False),
        (7.0, 0.0, False),
        (7.0, 0.0, True),
    ],
    ids=["centred", "far-from-zero", "negative-narrow", "constant", "constant-exact"],
)
def test_regression_metrics_equal_sklearn_in_batches(offset, spread, exact):
    # targets far from 0 (prices, years) and constant targets, evaluated in uneven batches
    generator = torch.Generator().manual_seed(0)
    truth = offset + spread * torch.randn(103, generator=generator, dtype=torch.float64)
    noise = 0.0 if exact else torch.randn(103, generator=generator, dtype=torch.float64)
    answers = (truth + 0.5 * noise).float()  # what a float32 model would answer
    passing = Regression().evaluator(1, torch.device("cpu"), keep_scores=False)
    loss = mse(task="regression")
    rows = torch.arange(103)
    for batch in rows.split(17):
        passing.update(Fixed(answers), batch, truth[batch].float(), loss)
    metrics = passing.result().metrics
    target, predicted = truth.float().double().numpy(), answers.double().numpy()
    assert metrics["num_samples"] == 103
    assert metrics["mse"] == pytest.approx(
        mean_squared_error(target, predicted), rel=1e-9, abs=1e-12
    )
    assert metrics["mae"] == pytest.approx(
        mean_absolute_error(target, predicted), rel=1e-9, abs=1e-12
    )
    assert metrics["r2"] == pytest.approx(r2_score(target, predicted), rel=1e-6, abs=1e-9)


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
    from dltrain.config.kinds import TASKS
    from dltrain.training.tasks import task_for

    assert [task_for(name, {}).name for name in TASKS] == list(TASKS)


def test_regression_shards_merge_to_the_whole_splits_metrics():
    # under data parallelism each process evaluates a shard; the result must be the whole split's
    generator = torch.Generator().manual_seed(1)
    truth = 5e5 + torch.randn(60, generator=generator)
    answers = truth + torch.randn(60, generator=generator)
    loss = mse(task="regression")

    def evaluated(rows):
        passing = Regression().evaluator(1, torch.device("cpu"), keep_scores=False)
        passing.update(Fixed(answers), rows, truth[rows], loss)
        return passing

    shards = [evaluated(torch.arange(0, 37)), evaluated(torch.arange(37, 60))]

    class TwoProcesses:  # what the collectives of a 2-process World return, done here in one
        def all_reduce_sum_(self, tensor):
            return sum(s.sums for s in shards)

        def gather_rows(self, tensor):
            return torch.stack([s.spread for s in shards])

    merged = shards[0].result(TwoProcesses()).metrics
    whole = evaluated(torch.arange(60)).result().metrics
    assert merged == pytest.approx(whole, rel=1e-9)


def test_the_header_says_what_a_regression_learns(tmp_path):
    console = io.StringIO()
    train(tmp_path, ADDING, "adding", "train.epochs=1", progress=Progress(Console(file=console)))
    header = " ".join(console.getvalue().split())
    assert "test 128; regression of sum)" in header and "classes" not in header
