"""system/slurm.py: a run under SLURM (its variables set, `scontrol` a stand-in that records
its arguments) that gets SIGUSR1 — SLURM's warning before the time limit — saves mid-epoch,
requeues its job and exits 138; the requeued job's `--resume auto` ends exactly as a run that
never stopped. SIGTERM saves without requeueing; outside SLURM, SIGUSR1 is left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.cli import QUICKSTART
from helpers.training import assert_same_tensors, weights

SETTINGS = ["train.epochs=3", "train.checkpoint_every_steps=5"]
RESUME = ["--resume", "auto"]


def slurm_env(tmp_path: Path) -> dict[str, str]:
    """SLURM's variables, and an `scontrol` that writes what it was asked into scontrol.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "SLURM_JOB_ID": "4242"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.pop("DLTRAIN_DEBUG", None)
    return env


def fit(tmp_path: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dltrain", "fit", str(QUICKSTART), *SETTINGS, *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def stopped_mid_run(tmp_path: Path, env: dict, signum: int) -> tuple[subprocess.Popen, str]:
    """A run sent `signum` once its first mid-epoch checkpoint is on disk; its output."""
    proc = fit(tmp_path, env, f"output={tmp_path}", "name=job")
    last = tmp_path / "job" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return proc, out + err


@pytest.mark.slow
def test_sigusr1_saves_requeues_and_the_requeued_job_resumes_exactly(tmp_path):
    env = slurm_env(tmp_path)
    straight = fit(tmp_path, env, f"output={tmp_path}", "name=straight")
    assert straight.wait(timeout=300) == 0, straight.communicate()

    proc, said = stopped_mid_run(tmp_path, env, signal.SIGUSR1)
    assert proc.returncode == 138, said
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert "SLURM job 4242 requeued" in said and "Traceback" not in said

    requeued = fit(tmp_path, env, f"output={tmp_path}", "name=job", "--resume", "auto")
    out, err = requeued.communicate(timeout=300)
    assert requeued.returncode == 0, out + err
    assert_same_tensors(
        weights(tmp_path / "straight/checkpoints/last.pt"),
        weights(tmp_path / "job/checkpoints/last.pt"),
    )


@pytest.mark.slow
def test_sigterm_under_slurm_saves_without_requeueing(tmp_path):
    proc, said = stopped_mid_run(tmp_path, slurm_env(tmp_path), signal.SIGTERM)
    assert proc.returncode == 143, said
    assert not (tmp_path / "scontrol.log").exists() and "--resume auto" in said


def test_outside_slurm_sigusr1_keeps_its_default(monkeypatch):
    from dltrain.system.interrupts import stop_signals

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert signal.SIGUSR1 not in stop_signals()
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert signal.SIGUSR1 in stop_signals()


@pytest.mark.slow
def test_sigusr1_to_the_launcher_of_fit_nproc_reaches_its_processes(tmp_path):
    # the processes run in sessions of their own: only the launcher gets SLURM's signal (as
    # srun's tasks are the launchers), and must pass it on for them to save and requeue
    env = slurm_env(tmp_path)
    proc = fit(tmp_path, env, f"output={tmp_path}", "name=job", "--nproc", "2")
    last = tmp_path / "job" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 138, out + err
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # rank 0, once
    assert "SLURM job 4242 requeued" in out + err and "Traceback" not in out + err

    requeued = fit(tmp_path, env, f"output={tmp_path}", "name=job", "--nproc", "2", *RESUME)
    out, err = requeued.communicate(timeout=300)
    assert requeued.returncode == 0, out + err
    events = [json.loads(line) for line in (tmp_path / "job" / "events.jsonl").open()]
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["step"] > 0 and starts[1]["processes"] == 2
