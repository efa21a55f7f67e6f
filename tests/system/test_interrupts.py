"""Signals at any moment end with 130/143 and a true sentence about what is saved: during
start-up, twice in 10 ms, and during the final evaluation."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from dltrain.reporting.progress import Progress
from dltrain.runs.folder import RunFolder
from dltrain.system.interrupts import Interrupted
from dltrain.training.loop import fit

from helpers.cli import QUICKSTART, interruptible
from helpers.training import DIGITS, make_recipe

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def start_fit(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    env.pop("DLTRAIN_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "dltrain", "fit", str(QUICKSTART), f"output={tmp_path}", *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=interruptible,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_a_signal_during_start_up_stops_cleanly_and_says_nothing_was_saved(tmp_path, delay):
    proc = start_fit(tmp_path, "train.epochs=200")
    time.sleep(delay)  # importing torch, reading the recipe, loading the data, building
    last = tmp_path / "quickstart" / "checkpoints" / "last.pt"
    saved_before = last.exists()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, out, err)  # never SIGABRT (-6)
    assert "Traceback" not in out + err and "Abort" not in out + err
    said = " ".join((out + err).split())
    if last.exists():  # the signal landed once training had started: what it saved is named
        assert f"progress saved to {last}" in said
    else:
        assert not saved_before and "nothing was saved" in said
        assert "last.pt holds" not in said


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_two_signals_ten_milliseconds_apart_stop_at_once_and_say_so(tmp_path, signum):
    proc = start_fit(tmp_path, "train.epochs=500")
    last = tmp_path / "quickstart" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signum)
    time.sleep(0.01)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CODES[signum], (proc.returncode, out, err)
    said = " ".join((out + err).split())
    assert "Traceback" not in said
    # either the second signal stopped it at once, or the first one's save finished before it
    assert f"a second {signum.name}" in said or f"stopped by {signum.name}" in said, said


class SignalWhenEvaluating(Progress):
    """A display that sends the process a SIGTERM as the final evaluation starts."""

    def evaluating(self, split: str, size: int) -> None:
        super().evaluating(split, size)
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_during_the_final_evaluation_ends_it_naming_what_is_saved(tmp_path):
    recipe = make_recipe(tmp_path, DIGITS, "final", "train.epochs=1", "data.eval_batch_size=16")
    run = RunFolder.for_recipe(recipe)
    progress = SignalWhenEvaluating(Console(file=io.StringIO()))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        fit(recipe, run, progress)
    assert stopped.value.exit_code == 143
    message = str(stopped.value)
    assert "during the final evaluation" in message and f"saved to {run.last_path}" in message
    assert run.last_path.exists() and not (run.root / "report.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler was put back


PROGRAM_ENDING = """
import atexit, signal
from dltrain.system.interrupts import STARTUP, exit_at_once_on_signals
# registered first, so it runs last: what the interpreter's own teardown will find
atexit.register(lambda: print([signal.getsignal(s) is signal.SIG_IGN for s in (15, 2)]))
STARTUP.program = True
exit_at_once_on_signals()
"""


def test_signals_are_ignored_once_an_ending_program_has_said_everything():
    # Python's shutdown puts the default handlers back after the atexit hooks: a SIGTERM landing
    # then killed the process (-15) after it had said how to resume, instead of exiting 143
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM_ENDING], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[True, True]"
