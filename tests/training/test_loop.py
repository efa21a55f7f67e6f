"""The fit loop in-process: reproducibility, exact resume, failures, accumulation, clipping,
bf16, best-checkpoint bookkeeping, the final report, and the run folder's files.

Runs are tiny (the bundled digits or small synthetic data, a few epochs) and write only under
tmp_path.
"""

from __future__ import annotations

import io
import math
import os
import stat

import numpy as np
import pytest
import torch
from rich.console import Console
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)

from dltrain.errors import RunFailure, UserError
from dltrain.reporting.progress import Progress
from dltrain.runs.checkpoint import load_checkpoint
from dltrain.runs.folder import RunFolder
from dltrain.runs.metrics_csv import METRIC_COLUMNS
from dltrain.system.atomic import atomic_write, atomic_write_text
from dltrain.training import loop
from dltrain.training.build import build_setup
from dltrain.training.evaluate import evaluate_checkpoint
from dltrain.training.tasks import Evaluation

from helpers.training import (
    DIGITS,
    TABULAR,
    assert_same_tensors,
    make_recipe,
    metric_rows,
    model_outputs,
    quiet,
    train,
    weights,
)


class StopAfter(Progress):
    """A display that interrupts the run (like Ctrl-C) right after an epoch's checkpoint."""

    def __init__(self, epoch: int):
        super().__init__(Console(file=io.StringIO()))
        self.stop_epoch = epoch

    def epoch_end(self, row, improved):
        super().epoch_end(row, improved)
        if row["epoch"] == self.stop_epoch:
            raise KeyboardInterrupt


# -- reproducibility and resume ---------------------------------------------------------------


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    run_a, report_a = train(tmp_path, DIGITS, "a")
    run_b, report_b = train(tmp_path, DIGITS, "b")
    run_c, _ = train(tmp_path, DIGITS, "c", "seed=4")
    assert_same_tensors(weights(run_a.last_path), weights(run_b.last_path))
    assert metric_rows(run_a) == metric_rows(run_b)
    assert report_a == {**report_b, "checkpoint": report_a["checkpoint"]}
    c = weights(run_c.last_path)
    assert any(not torch.equal(v, c[k]) for k, v in weights(run_a.last_path).items())


@pytest.mark.parametrize(
    ("loader", "scheduler", "how"),
    [
        ("resident", "cosine", "interrupted"),  # stopped after epoch 2 of 4, resumed
        ("resident", "null", "extended"),  # a 2-epoch run continued to epochs=4
        ("workers", "{name: cosine, warmup_epochs: 1}", "interrupted"),
    ],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, loader, scheduler, how):
    settings = [f"data.loader={loader}", "data.num_workers=0", f"scheduler={scheduler}"]
    straight, straight_report = train(tmp_path, DIGITS, "straight", *settings, "train.epochs=4")

    if how == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path, DIGITS, "resumed", *settings, "train.epochs=4", progress=StopAfter(2))
    else:
        train(tmp_path, DIGITS, "resumed", *settings, "train.epochs=2")
    first = RunFolder(tmp_path / "resumed")
    assert load_checkpoint(first.last_path)["epoch"] == 2
    assert len(metric_rows(first)) == 2
    resumed, resumed_report = train(
        tmp_path, DIGITS, "resumed", *settings, "train.epochs=4", resume=first.last_path
    )

    assert_same_tensors(weights(straight.last_path), weights(resumed.last_path))
    assert_same_tensors(weights(straight.best_path), weights(resumed.best_path))
    a, b = load_checkpoint(straight.last_path), load_checkpoint(resumed.last_path)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (4, 4 * (1294 // 64))
    assert a["scheduler"] == b["scheduler"]
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_tensors(x, y)
    assert metric_rows(straight) == metric_rows(resumed)
    assert len(metric_rows(resumed)) == 4
    assert straight_report == resumed_report


def test_resume_with_worker_processes_reproduces_the_uninterrupted_run(tmp_path):
    # Worker processes are persistent: they must not make the resumed epochs draw differently.
    settings = ["data.loader=workers", "data.num_workers=2", "train.epochs=3"]
    straight, _ = train(tmp_path, DIGITS, "straight", *settings)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, DIGITS, "resumed", *settings, progress=StopAfter(1))
    first = RunFolder(tmp_path / "resumed")
    resumed, _ = train(tmp_path, DIGITS, "resumed", *settings, resume=first.last_path)
    assert_same_tensors(weights(straight.last_path), weights(resumed.last_path))
    assert metric_rows(straight) == metric_rows(resumed)


def test_resident_and_worker_paths_train_identically(tmp_path):
    resident, _ = train(tmp_path, DIGITS, "resident", "data.loader=resident")
    workers, _ = train(tmp_path, DIGITS, "workers", "data.loader=workers", "data.num_workers=0")
    assert_same_tensors(weights(resident.last_path), weights(workers.last_path))


def said_by(console: io.StringIO) -> str:
    return " ".join(console.getvalue().split())


def test_resume_of_a_finished_run_only_reports_and_says_so(tmp_path):
    run, report = train(tmp_path, DIGITS, "done")
    before = run.last_path.stat().st_mtime_ns
    console = io.StringIO()
    _, again = train(
        tmp_path, DIGITS, "done", resume=run.last_path, progress=Progress(Console(file=console))
    )
    assert run.last_path.stat().st_mtime_ns == before  # no epoch was trained again
    assert again == report
    said = said_by(console)
    assert "is of a finished run (all 2 epochs done" in said and "nothing to train" in said
    assert "train.epochs=12 --resume auto" in said and "--force" in said


def test_a_resumed_run_says_where_it_continues_from(tmp_path):
    run, _ = train(tmp_path, DIGITS, "on", "train.epochs=1")
    console = io.StringIO()
    progress = Progress(Console(file=console))
    train(tmp_path, DIGITS, "on", "train.epochs=2", resume=run.last_path, progress=progress)
    said = said_by(console)
    assert f"resumed from {run.last_path}: epoch 1 done (step 20); continuing to epoch 2" in said
    assert "(train 1,295, val 143, test 359; 10 classes)" in said


def test_resume_from_another_run_folder_reports_without_a_best_checkpoint_there(tmp_path):
    source, _ = train(tmp_path, DIGITS, "source")
    # Resuming a finished run into a new folder trains nothing, so the folder has no best.pt of
    # its own: the report evaluates the weights it resumed from.
    run, report = train(tmp_path, DIGITS, "copy", resume=source.last_path)
    assert not run.best_path.exists()
    expected = evaluate_checkpoint(source.last_path, tmp_path / "expected", quiet())
    assert report == expected
    assert (run.root / "report.json").is_file() and (run.root / "recipe.yaml").is_file()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.name=mlp", "model.name"),
        ("model.dropout=0.1", r"model.dropout \(0.3 → 0.1\)"),  # same shapes, other math
        ("optimizer.name=sgd", "optimizer.name"),
        ("data.batch_size=16", "data.batch_size"),
    ],
)
def test_resume_with_a_different_recipe_is_refused_naming_the_keys(tmp_path, override, named):
    source, _ = train(tmp_path, DIGITS, "source", "train.epochs=1")
    with pytest.raises(UserError, match=named) as error:
        train(tmp_path, DIGITS, "other", override, "train.epochs=2", resume=source.last_path)
    assert error.value.exit_code == 2 and str(source.last_path) in str(error.value)
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_eval_with_another_model_is_a_user_error(tmp_path):
    source, _ = train(tmp_path, DIGITS, "source", "train.epochs=1")
    with pytest.raises(UserError, match="do not fit this recipe's model"):
        evaluate_checkpoint(
            source.best_path, tmp_path / "eval", quiet(), overrides=["model.name=mlp"]
        )


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimizer.lr=1e30"],  # the weights blow up
        ["data.noise=1e30", "data.normalize=none"],  # the inputs are huge
    ],
)
def test_non_finite_loss_is_a_run_failure_naming_the_epoch(tmp_path, overrides):
    with pytest.raises(RunFailure) as failure:
        train(tmp_path, TABULAR, "nan", *overrides)
    assert failure.value.exit_code == 1
    message = str(failure.value)
    assert "epoch 1 (batch" in message and "optimizer.lr" in message
    assert "No checkpoint was written" in message


class PoisonFrom(Progress):
    """A display that makes every loss NaN from a given epoch on (through the setup's loss)."""

    def __init__(self, epoch: int):
        super().__init__(Console(file=io.StringIO()))
        self.poison_epoch, self.poisoned = epoch, False

    def epoch_start(self, epoch, epochs, steps, done=0):
        super().epoch_start(epoch, epochs, steps, done)
        self.poisoned = epoch >= self.poison_epoch


def test_non_finite_loss_later_points_at_the_last_good_checkpoint(tmp_path, monkeypatch):
    progress = PoisonFrom(3)
    real_build = loop.build_setup

    def poisoned_setup(*args, **kwargs):
        setup = real_build(*args, **kwargs)
        loss_fn = setup.loss_fn
        setup.loss_fn = lambda logits, y: (
            loss_fn(logits, y) * (float("nan") if progress.poisoned else 1.0)
        )
        return setup

    monkeypatch.setattr(loop, "build_setup", poisoned_setup)
    with pytest.raises(RunFailure, match=r"non-finite in epoch 3 \(batch") as failure:
        train(tmp_path, TABULAR, "late", "train.epochs=5", progress=progress)
    run = RunFolder(tmp_path / "late")
    assert str(run.last_path) in str(failure.value)
    assert load_checkpoint(run.last_path)["epoch"] == 2  # the NaN weights were never saved
    assert len(metric_rows(run)) == 2


def test_skip_step_skips_non_finite_batches_and_finishes(tmp_path, monkeypatch):
    real_build = loop.build_setup
    calls = {"n": 0}

    def every_third_nan(*args, **kwargs):
        setup = real_build(*args, **kwargs)
        loss_fn = setup.loss_fn

        def loss(logits, y):
            calls["n"] += 1
            return loss_fn(logits, y) * (float("nan") if calls["n"] % 3 == 0 else 1.0)

        setup.loss_fn = loss
        return setup

    monkeypatch.setattr(loop, "build_setup", every_third_nan)
    run, report = train(tmp_path, TABULAR, "skip", "train.on_nonfinite=skip_step")
    assert all(math.isfinite(float(r["train_loss"])) for r in metric_rows(run))
    for tensor in weights(run.last_path).values():
        assert torch.isfinite(tensor).all()


def test_nan_weights_after_a_finite_loss_are_never_saved(tmp_path, monkeypatch):
    real_build = loop.build_setup

    def poison_the_last_step_of_epoch_2(*args, **kwargs):
        setup = real_build(*args, **kwargs)
        real_step, steps = setup.precision.step, []

        def step(optimizer, params, grad_clip):
            real_step(optimizer, params, grad_clip)
            steps.append(1)
            if len(steps) == 8:  # 4 steps an epoch: the loss of this step was finite
                with torch.no_grad():
                    next(setup.model.parameters()).fill_(float("nan"))

        setup.precision.step = step
        return setup

    monkeypatch.setattr(loop, "build_setup", poison_the_last_step_of_epoch_2)
    with pytest.raises(RunFailure, match="weights became non-finite in epoch 2") as failure:
        train(tmp_path, TABULAR, "nanw", "train.epochs=3")
    run = RunFolder(tmp_path / "nanw")
    assert str(run.last_path) in str(failure.value)
    assert load_checkpoint(run.last_path)["epoch"] == 1


def test_out_of_memory_names_the_batch_size_and_a_smaller_setting(tmp_path, monkeypatch):
    real_build = loop.build_setup

    def no_memory(*args, **kwargs):
        setup = real_build(*args, **kwargs)

        def loss(logits, y):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        setup.loss_fn = loss
        return setup

    monkeypatch.setattr(loop, "build_setup", no_memory)
    with pytest.raises(RunFailure) as failure:
        train(tmp_path, TABULAR, "oom", "data.batch_size=32")
    message = str(failure.value)
    assert failure.value.exit_code == 1
    assert "data.batch_size=32" in message and "data.batch_size=16" in message
    assert "train.accumulate=2" in message


# -- the update: accumulation, clipping, precision --------------------------------------------


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    settings = ["scheduler={name: cosine, warmup_epochs: 0.5}"]
    small, _ = train(
        tmp_path, TABULAR, "acc", *settings, "data.batch_size=16", "train.accumulate=2"
    )
    big, _ = train(tmp_path, TABULAR, "big", *settings, "data.batch_size=32", "train.accumulate=1")
    a, b = weights(small.last_path), weights(big.last_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    assert load_checkpoint(small.last_path)["step"] == load_checkpoint(big.last_path)["step"] == 16
    lr = [row["lr"] for row in metric_rows(small)]
    assert lr == [row["lr"] for row in metric_rows(big)]


def test_a_short_last_accumulation_group_is_averaged_not_shrunk(tmp_path):
    # 48 samples in 3 micro-batches of 16 with accumulate=4: one step whose gradient is the mean
    # over the three micro-batches, i.e. the gradient of one batch of 48.
    settings = ["data.train_size=48", "optimizer.momentum=0"]
    short, _ = train(
        tmp_path, TABULAR, "short", *settings, "data.batch_size=16", "train.accumulate=4"
    )
    whole, _ = train(tmp_path, TABULAR, "whole", *settings, "data.batch_size=48")
    a, b = weights(short.last_path), weights(whole.last_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def test_grad_clip_bounds_every_step(tmp_path):
    settings = ["optimizer.momentum=0", "optimizer.lr=0.5"]
    setup = build_setup(make_recipe(tmp_path, TABULAR, "init"))
    start = torch.cat([p.detach().flatten() for p in setup.model.parameters()])

    def distance(run: RunFolder) -> tuple[float, int]:
        end = torch.cat([v.flatten() for v in weights(run.last_path).values()])
        return float((end - start).norm()), load_checkpoint(run.last_path)["step"]

    clipped, report = train(tmp_path, TABULAR, "clipped", *settings, "train.grad_clip=0.001")
    moved, steps = distance(clipped)
    assert 0 < moved <= steps * 0.5 * 0.001 * (1 + 1e-4)  # each step moves at most lr × clip
    free, _ = train(tmp_path, TABULAR, "free", *settings)
    assert distance(free)[0] > 10 * steps * 0.5 * 0.001
    assert np.isfinite(report["loss"])


class DtypeSpy(Progress):
    """Records the dtype of the model's output during training."""

    def __init__(self):
        super().__init__(Console(file=io.StringIO()))
        self.precision, self.dtypes = None, set()

    def start(self, recipe, device, precision, loader, model, data):
        super().start(recipe, device, precision, loader, model, data)
        self.precision = precision
        model.register_forward_hook(lambda module, args, out: self.dtypes.add(out.dtype))


def test_bf16_on_cpu_trains_in_bf16_and_learns(tmp_path):
    spy = DtypeSpy()
    settings = ["train.epochs=4", "data.noise=0.5"]
    run, report = train(tmp_path, TABULAR, "bf16", "train.precision=bf16", *settings, progress=spy)
    assert spy.precision == "bf16" and spy.dtypes == {torch.bfloat16}
    _, fp32 = train(tmp_path, TABULAR, "fp32", "train.precision=fp32", *settings)
    assert report["accuracy"] > 0.85 and report["accuracy"] > fp32["accuracy"] - 0.05
    assert all(v.dtype == torch.float32 for v in weights(run.best_path).values())  # fp32 master


# -- best checkpoint and report ---------------------------------------------------------------


def scripted_evaluate(monkeypatch, losses, accuracies):
    """Make the per-epoch validation return scripted values (the final report stays real)."""
    real = loop.evaluate
    script = iter(zip(losses, accuracies))

    def evaluate(model, batches, s, keep_scores=False):
        result = real(model, batches, s, keep_scores)
        try:
            loss, accuracy = next(script)
        except StopIteration:
            return result
        fake = torch.zeros_like(result.matrix)
        fake[0, 0], fake[1, 0] = round(accuracy * 100), 100 - round(accuracy * 100)
        return Evaluation(loss, fake)

    monkeypatch.setattr(loop, "evaluate", evaluate)


@pytest.mark.parametrize(
    ("monitor", "best_epochs"),
    [("val_loss", [1, 2, 4]), ("val_accuracy", [1, 3])],
)
def test_best_checkpoint_is_replaced_only_when_the_monitor_improves(
    tmp_path, monkeypatch, monitor, best_epochs
):
    scripted_evaluate(monkeypatch, [0.9, 0.5, 0.7, 0.4, 0.6], [0.5, 0.5, 0.8, 0.7, 0.8])
    saved = []
    real_save_epoch = RunFolder.save_epoch

    def save_epoch(self, history, state, improved):
        if improved:  # best.pt is written with this epoch's save
            saved.append(state["epoch"])
        real_save_epoch(self, history, state, improved)

    monkeypatch.setattr(RunFolder, "save_epoch", save_epoch)
    run, report = train(tmp_path, DIGITS, "best", "train.epochs=5", f"train.monitor={monitor}")
    assert saved == best_epochs
    best, last = load_checkpoint(run.best_path), load_checkpoint(run.last_path)
    assert best["epoch"] == best_epochs[-1] and last["epoch"] == 5
    assert best["metrics"]["best_epoch"] == last["metrics"]["best_epoch"] == best_epochs[-1]
    values = [float(row[monitor]) for row in metric_rows(run)]
    assert best["metrics"]["best"] == pytest.approx(
        min(values) if monitor == "val_loss" else max(values)
    )
    assert report["checkpoint"] == "checkpoints/best.pt"
    assert not any(torch.equal(v, last["model"][k]) for k, v in best["model"].items() if v.ndim)
    # the report, report.md and the console say which epoch best.pt holds, and why
    assert (report["epoch"], report["best_by"]) == (best_epochs[-1], monitor)
    held = f"(epoch {best_epochs[-1]}, the best by {monitor})"
    assert held in (run.root / "report.md").read_text()
    from_last = evaluate_checkpoint(run.last_path, tmp_path / "last", quiet())
    assert from_last["epoch"] == 5 and "best_by" not in from_last  # last.pt: not the best


def test_a_non_finite_validation_loss_never_becomes_best(tmp_path, monkeypatch):
    # NaN compares as neither better nor worse, and -inf as better than anything: neither counts
    scripted_evaluate(monkeypatch, [math.nan, 0.9, -math.inf, 0.5, math.nan], [0.5] * 5)
    run, _ = train(tmp_path, DIGITS, "nan-val", "train.epochs=5")
    best, last = load_checkpoint(run.best_path), load_checkpoint(run.last_path)
    assert best["epoch"] == last["metrics"]["best_epoch"] == 4
    assert last["metrics"]["best"] == 0.5


def test_real_run_best_checkpoint_is_the_lowest_val_loss(tmp_path):
    run, _ = train(tmp_path, DIGITS, "real", "train.epochs=4", "optimizer.lr=0.02")
    rows = metric_rows(run)
    losses = [float(row["val_loss"]) for row in rows]
    best = load_checkpoint(run.best_path)
    assert best["epoch"] == 1 + int(np.argmin(losses))
    assert best["metrics"]["best"] == pytest.approx(min(losses), rel=1e-5)


def test_report_equals_sklearn_on_the_models_predictions(tmp_path):
    run, _ = train(tmp_path, DIGITS, "report", "train.epochs=2", "data.eval_batch_size=50")
    report = evaluate_checkpoint(run.best_path, tmp_path / "val-report", quiet(), split="val")

    outputs, targets = model_outputs(run.best_path, "val")
    predicted, truth = outputs.argmax(1).numpy(), targets.numpy()
    checkpoint = load_checkpoint(run.best_path)
    labels = list(range(10))

    assert report["split"] == "val" and report["num_samples"] == len(truth) > 100
    assert report["classes"] == checkpoint["classes"] == [str(i) for i in labels]
    assert report["confusion_matrix"] == confusion_matrix(truth, predicted, labels=labels).tolist()
    assert report["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            truth, predicted, labels=labels, average=average, zero_division=0
        )
        assert report["precision"][average] == pytest.approx(p, abs=1e-12)
        assert report["recall"][average] == pytest.approx(r, abs=1e-12)
        assert report["f1"][average] == pytest.approx(f, abs=1e-12)
    p, r, f, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    for i, name in enumerate(report["classes"]):
        assert report["per_class"][name]["precision"] == pytest.approx(p[i], abs=1e-12)
        assert report["per_class"][name]["recall"] == pytest.approx(r[i], abs=1e-12)
        assert report["per_class"][name]["f1"] == pytest.approx(f[i], abs=1e-12)
        assert report["per_class"][name]["support"] == support[i]
    assert (tmp_path / "val-report" / "report.json").is_file()
    assert (tmp_path / "val-report" / "report.md").is_file()


# -- the run folder's files -------------------------------------------------------------------


def test_run_folder_files(tmp_path):
    progress = quiet()
    run, report = train(tmp_path, DIGITS, "files", "train.epochs=3", progress=progress)
    lines = run.metrics_path.read_text().splitlines()
    assert lines[0] == ",".join(METRIC_COLUMNS) and len(lines) == 4
    assert [row["epoch"] for row in metric_rows(run)] == ["1", "2", "3"]
    written = sorted(p.name for p in run.root.rglob("*") if p.is_file())
    assert written == [
        "best.pt",
        "confusion_matrix.png",
        "curves.png",
        "events.jsonl",
        "last.pt",
        "metrics.csv",
        "recipe.yaml",
        "report.json",
        "report.md",
    ]
    # Files get the mode an ordinary open() would give them, not mkstemp's owner-only 0600.
    umask = os.umask(0)
    os.umask(umask)
    for path in run.root.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    output = progress.console.file.getvalue()
    assert sum(line.startswith("epoch ") for line in output.splitlines()) == 3
    assert f"accuracy {report['accuracy']:.4f}" in output


def test_an_event_log_that_cannot_be_written_is_a_run_failure_naming_it(tmp_path):
    from dltrain.reporting.event_log import RunLog

    (tmp_path / "events.jsonl").mkdir()  # unwritable as a file, whoever runs the test
    with pytest.raises(RunFailure, match=r"cannot write .*events\.jsonl"):
        RunLog(tmp_path).event("start")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "old")

    def half_then_fail(f):
        f.write(b"new but incomplete")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]  # no temp file left


class NotData:
    """An arbitrary class: a checkpoint holding one must never be unpickled."""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "truncated or not a torch checkpoint"),
        (b"hello world", "truncated or not a torch checkpoint"),  # once escaped as a KeyError
        (b"xyz garbage", "truncated or not a torch checkpoint"),
        ("truncated", "truncated or not a torch checkpoint"),
        ("object", "objects other than tensors"),
        ("not-dltrain", "not a dltrain checkpoint"),
    ],
)
def test_unusable_checkpoints_are_user_errors(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if content == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:1500])
    elif content == "object":
        torch.save({"format": 1, "thing": NotData()}, path)
    elif content == "not-dltrain":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        load_checkpoint(path)
    assert error.value.exit_code == 2
    if content == "object":
        assert "NotData" in str(error.value) and "weights_only=False" not in str(error.value)


def test_without_a_validation_split_val_accuracy_falls_back_to_train_loss_as_a_loss(tmp_path):
    console = io.StringIO()
    progress = Progress(Console(file=console, width=200))
    run, report = train(
        tmp_path,
        TABULAR,
        "fallback",
        "train.epochs=4",
        "train.monitor=val_accuracy",
        "train.early_stopping={monitor: val_accuracy, patience: 1}",
        progress=progress,
    )
    losses = [float(row["train_loss"]) for row in metric_rows(run)]
    assert len(losses) == 4  # early stopping did not fire while the loss fell
    assert losses == sorted(losses, reverse=True)
    assert load_checkpoint(run.best_path)["epoch"] == 4  # the lowest loss, not the highest
    assert (report["epoch"], report["best_by"]) == (4, "train_loss")  # what chose it, truly
    said = console.getvalue()
    assert said.count("val_accuracy falls back to train_loss (lower is better)") == 1
