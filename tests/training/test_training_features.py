"""Early stopping, L1 regularisation, the event log and TensorBoard, on tiny in-process runs."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from dltrain.errors import RunFailure, UserError
from dltrain.runs.checkpoint import load_checkpoint

from helpers.training import DIGITS, TABULAR, metric_rows, train, weights


def events(run) -> list[dict]:
    return events_in(run.root)


def events_in(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def test_early_stopping_ends_an_over_long_run_and_keeps_the_best_weights(tmp_path):
    rule = "train.early_stopping={monitor: val_loss, patience: 3}"
    run, report = train(tmp_path, DIGITS, "early", "train.epochs=100", "optimizer.lr=0.01", rule)
    rows = metric_rows(run)
    losses = [float(r["val_loss"]) for r in rows]
    best_epoch = losses.index(min(losses)) + 1
    assert len(rows) < 100  # it stopped
    assert len(rows) == best_epoch + 3  # exactly `patience` epochs after the best one
    best = load_checkpoint(run.best_path)
    assert best["epoch"] == best_epoch
    assert report["checkpoint"] == "checkpoints/best.pt"
    assert [e["event"] for e in events(run)].count("early_stop") == 1

    # resuming a run that stopped early trains no more
    before = run.last_path.read_bytes()
    train(
        tmp_path,
        DIGITS,
        "early",
        "train.epochs=100",
        "optimizer.lr=0.01",
        rule,
        resume=run.last_path,
    )
    assert run.last_path.read_bytes() == before


def test_early_stopping_on_accuracy_maximises(tmp_path):
    rule = "train.early_stopping={monitor: val_accuracy, patience: 2, min_delta: 0.5}"
    run, _ = train(tmp_path, DIGITS, "acc", "train.epochs=20", rule)
    # no epoch can beat the first by 0.5 accuracy: it stops after 1 + patience epochs
    assert len(metric_rows(run)) == 3


def test_l1_penalty_shrinks_the_weights(tmp_path):
    plain, _ = train(tmp_path, TABULAR, "plain", "train.epochs=3")
    sparse, _ = train(tmp_path, TABULAR, "l1", "train.epochs=3", "train.l1=0.1")

    def l1(run):
        return sum(w.abs().sum() for k, w in weights(run.last_path).items() if w.dim() > 1)

    assert l1(sparse) < 0.8 * l1(plain)
    # the reported loss is the data loss alone, not the penalty
    assert float(metric_rows(sparse)[-1]["train_loss"]) < 2.0


def test_event_log_tells_the_story_of_a_run(tmp_path):
    run, report = train(tmp_path, DIGITS, "story", "train.epochs=2")
    log = events(run)
    kinds = [e["event"] for e in log]
    assert kinds == ["start", "first_step", "epoch", "checkpoint", "epoch", "checkpoint", "end"]
    assert all(isinstance(e["time"], float) for e in log)
    assert log[1]["seconds"] > 0  # time to first step
    assert log[2]["epoch"] == 1 and "val_loss" in log[2]
    assert log[-1]["accuracy"] == report["accuracy"]


def test_event_log_records_a_failure(tmp_path):
    with pytest.raises(RunFailure):
        train(tmp_path, TABULAR, "nan", "optimizer.lr=1e30")
    log = events_in(tmp_path / "nan")
    assert log[-1]["event"] == "error" and log[-1]["exit_code"] == 1
    assert "non-finite" in log[-1]["message"]


def test_tensorboard_event_files_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    run, _ = train(tmp_path, TABULAR, "tb", "logging.tensorboard=true")
    files = list((run.root / "tensorboard").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.root / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]
    assert "recipe/text_summary" in events.Tags()["tensors"]  # the resolved recipe, as text
    hparams = EventAccumulator(str(run.root / "tensorboard")).Reload().summary_metadata
    assert any("_hparams_" in tag for tag in hparams)  # the settings beside the test figures


def test_tensorboard_missing_is_a_clear_user_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(UserError, match="pip install tensorboard") as error:
        train(tmp_path, TABULAR, "tb", "logging.tensorboard=true")
    assert error.value.exit_code == 2
    assert not (tmp_path / "tb" / "checkpoints").exists()  # refused before training


def test_report_has_ranking_metrics(tmp_path):
    _, report = train(tmp_path, DIGITS, "ranks", "train.epochs=2")
    assert set(report["top_k_accuracy"]) == {"5"}
    assert report["top_k_accuracy"]["5"] >= report["accuracy"]
    assert 0.5 < report["auroc"]["macro"] <= 1 and len(report["auroc"]["per_class"]) == 10
    assert 0 < report["average_precision"]["macro"] <= 1
    assert torch.isfinite(torch.tensor(report["loss"]))


@pytest.mark.slow
def test_train_compile_takes_torch_compiles_modes(tmp_path, monkeypatch):
    # reduce-overhead (CUDA graphs on a GPU) reaches torch.compile as its mode, for the step's
    # whole forward half (model, loss and running loss in one graph) and for evaluation; the
    # compiled run trains to the same weights and running loss as eager within float tolerance
    compiled_what = []
    real_compile = torch.compile

    def recording_compile(model, **options):
        compiled_what.append((type(model).__name__, options.get("mode")))
        return real_compile(model, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    compiled, _ = train(tmp_path, TABULAR, "compiled", "train.compile=reduce-overhead")
    eager, _ = train(tmp_path, TABULAR, "eager")
    assert compiled_what == [("ForwardLoss", "reduce-overhead"), ("Sequential", "reduce-overhead")]
    for name, value in weights(eager.best_path).items():
        assert torch.allclose(weights(compiled.best_path)[name], value, atol=1e-4), name
    for a, b in zip(metric_rows(compiled), metric_rows(eager), strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
    with pytest.raises(UserError, match="train.compile"):
        train(tmp_path, TABULAR, "bad", "train.compile=fastest")
