"""Exact resume: stopped at an epoch boundary, mid-epoch, by a signal or by SIGKILL, a run
continues to bitwise-identical weights and metrics (CPU)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from dltrain.errors import RunFailure
from dltrain.reporting.progress import Progress
from dltrain.runs.checkpoint import load_checkpoint, save_checkpoint
from dltrain.runs.folder import RunFolder
from dltrain.system.interrupts import GracefulStop, Interrupted

from helpers.cli import QUICKSTART, interruptible
from helpers.training import (
    DIGITS,
    assert_same_tensors,
    metric_rows,
    mid_epoch_saves,
    train,
    weights,
)


class SignalAt(Progress):
    """A display that sends this process a real signal when a given batch of an epoch is done."""

    def __init__(self, epoch: int, batch: int, signum: int = signal.SIGINT):
        super().__init__(Console(file=io.StringIO()))
        self.at, self.signum, self.epoch = (epoch, batch), signum, 0

    def epoch_start(self, epoch, epochs, steps, done=0):
        super().epoch_start(epoch, epochs, steps, done)
        self.epoch = epoch

    def step(self, done, seen, loss_sum, count):
        super().step(done, seen, loss_sum, count)
        if (self.epoch, done) == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def sigint_as_in_a_terminal():
    # CI may start the suite with SIGINT ignored (a background job); a terminal does not.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_four_epochs_equal_two_plus_two(tmp_path):
    straight, _ = train(tmp_path, DIGITS, "straight", "train.epochs=4")
    train(tmp_path, DIGITS, "resumed", "train.epochs=2")
    first = RunFolder(tmp_path / "resumed")
    resumed, _ = train(tmp_path, DIGITS, "resumed", "train.epochs=4", resume=first.last_path)
    assert_same_tensors(weights(straight.last_path), weights(resumed.last_path))
    assert metric_rows(straight) == metric_rows(resumed)
    assert straight.metrics_path.read_text().count("\n") == 5  # header + 4 epochs


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_epoch_saves_and_the_resume_is_exact(
    tmp_path, signum, sigint_as_in_a_terminal
):
    # Stop in the middle of epoch 2 (batch 7 of 20), as Ctrl-C or a scheduler's SIGTERM would.
    settings = ["train.epochs=3", "scheduler={name: cosine, warmup_epochs: 1}"]
    straight, straight_report = train(tmp_path, DIGITS, "straight", *settings)
    with pytest.raises(Interrupted) as stop:
        train(tmp_path, DIGITS, "resumed", *settings, progress=SignalAt(2, 7, signum))
    assert stop.value.exit_code == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    run = RunFolder(tmp_path / "resumed")
    saved = load_checkpoint(run.last_path)
    assert (saved["epoch"], saved["train_state"]["batch"]) == (1, 7)
    assert len(metric_rows(run)) == 1  # only whole epochs are rows

    resumed, resumed_report = train(tmp_path, DIGITS, "resumed", *settings, resume=run.last_path)
    assert_same_tensors(weights(straight.last_path), weights(resumed.last_path))
    assert_same_tensors(weights(straight.best_path), weights(resumed.best_path))
    assert metric_rows(straight) == metric_rows(resumed)
    assert straight_report == resumed_report


def test_checkpoint_every_steps_writes_mid_epoch_and_resumes_exactly(tmp_path):
    settings = ["train.epochs=2", "train.checkpoint_every_steps=5"]
    straight, _ = train(tmp_path, DIGITS, "straight", *settings)
    saved = mid_epoch_saves(tmp_path, DIGITS, *settings)
    # every 5 steps, 20 steps an epoch: mid-epoch saves after batches 5, 10, 15 of each epoch
    # (the save due at batch 20 is the epoch-end checkpoint)
    assert [batch for batch, _ in saved] == [5, 10, 15, 5, 10, 15]
    # resume from the checkpoint taken after batch 15 of epoch 2
    mid = tmp_path / "mid.pt"
    mid.write_bytes(saved[-1][1])
    resumed, _ = train(tmp_path, DIGITS, "resumed", *settings, resume=mid)
    assert_same_tensors(weights(straight.last_path), weights(resumed.last_path))
    assert metric_rows(straight) == metric_rows(resumed)


def test_second_signal_stops_at_once(sigint_as_in_a_terminal):
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_an_ignored_signal_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGINT)  # ignored, as the caller asked
            assert not stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_failed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _minimal_state(epoch=1))
    real_save = torch.save

    def half_then_disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_disk_full)
    with pytest.raises(RunFailure, match="No space left"):
        save_checkpoint(path, _minimal_state(epoch=2))
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def _minimal_state(epoch: int) -> dict:
    return {
        "recipe": {},
        "model": {"w": torch.ones(3)},
        "data_meta": {
            "kind": "tabular",
            "classes": [],
            "input_shape": [3],
            "mean": [0.0],
            "std": [1.0],
        },
        "classes": [],
        "epoch": epoch,
    }


# -- real processes -------------------------------------------------------------------------


def _dltrain(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    env.pop("DLTRAIN_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "dltrain", "fit", str(QUICKSTART), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        preexec_fn=interruptible,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_gives_the_same_weights(tmp_path):
    settings = ["train.epochs=3", "train.checkpoint_every_steps=3", f"output={tmp_path}"]
    straight = _dltrain(*settings, "name=straight", cwd=tmp_path)
    assert straight.wait(timeout=300) == 0, straight.communicate()

    killed = _dltrain(*settings, "name=killed", cwd=tmp_path)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    _wait_for(last, killed)
    killed.send_signal(signal.SIGKILL)  # no handler can run: only what was written survives
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(last)["step"] >= 3  # the file on disk is whole

    resumed = _dltrain(*settings, "name=killed", "--resume", "auto", cwd=tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out + err
    assert_same_tensors(weights(tmp_path / "straight" / "checkpoints" / "last.pt"), weights(last))


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_a_running_fit_saves_and_prints_the_resume_command(tmp_path, signum, code):
    # A long run (many epochs): the signal lands while it trains.
    proc = _dltrain("train.epochs=500", f"output={tmp_path}", cwd=tmp_path)
    last = tmp_path / "quickstart" / "checkpoints" / "last.pt"
    _wait_for(last, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, out + err
    assert "Traceback" not in out + err
    assert "--resume auto" in out and "dltrain fit" in out
    state = load_checkpoint(last)
    assert 1 <= state["epoch"] < 500


# -- fp16 with a GradScaler, on the CPU ----------------------------------------------------------

FP16 = ["train.epochs=2", "train.precision=fp16", "train.grad_clip=1.0"]


def test_fp16_with_a_grad_scaler_resumes_exactly(tmp_path, sigint_as_in_a_terminal):
    # The path CUDA runs by default on older GPUs: autocast to fp16, scaled loss, unscale, clip.
    straight, straight_report = train(tmp_path, DIGITS, "straight", *FP16)
    with pytest.raises(Interrupted):
        train(tmp_path, DIGITS, "resumed", *FP16, progress=SignalAt(2, 7))
    run = RunFolder(tmp_path / "resumed")
    scaler = load_checkpoint(run.last_path)["scaler"]
    # the scaler's own state travels: its scale, and the clean steps counted towards growing it
    assert scaler["scale"] == 2.0**16 and scaler["_growth_tracker"] == 20 + 7
    resumed, resumed_report = train(tmp_path, DIGITS, "resumed", *FP16, resume=run.last_path)
    assert_same_tensors(weights(straight.last_path), weights(resumed.last_path))
    assert (
        load_checkpoint(straight.last_path)["scaler"]
        == load_checkpoint(resumed.last_path)["scaler"]
    )
    assert metric_rows(straight) == metric_rows(resumed)
    assert straight_report == resumed_report
    losses = [float(row["train_loss"]) for row in metric_rows(straight)]
    assert losses[1] < losses[0]  # and it learns
