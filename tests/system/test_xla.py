"""XLA devices through torch_xla, with PJRT_DEVICE=CPU: real XLA graphs, compiled and run on the
CPU. `make test-xla` runs these in .venv-xla (torch_xla pins its own torch); elsewhere they skip.

Each test runs the dltrain CLI in a subprocess, as a user would, so torch_xla's process-wide
runtime never touches the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import pytest

from helpers.cli import QUICKSTART

pytestmark = [
    pytest.mark.xla,
    pytest.mark.skipif(find_spec("torch_xla") is None, reason="needs torch_xla (make test-xla)"),
]


def run(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return done


@pytest.fixture(scope="module")
def quickstart_on_xla(tmp_path_factory):
    """The quickstart recipe, unchanged but for the device, trained by `dltrain fit`."""
    folder = tmp_path_factory.mktemp("xla")
    run("-m", "dltrain", "fit", str(QUICKSTART), "device=xla", f"output={folder}", cwd=folder)
    return folder / "quickstart"


def test_the_quickstart_trains_on_xla_to_the_cpu_accuracy_bar(quickstart_on_xla):
    report = json.loads((quickstart_on_xla / "report.json").read_text())
    assert report["accuracy"] >= 0.95  # the quickstart's bar on the CPU (its recipe says so)
    # the padded last test batch counts only its real rows: each sample once
    assert report["num_samples"] == sum(map(sum, report["confusion_matrix"])) == 359
    start = json.loads((quickstart_on_xla / "events.jsonl").read_text().splitlines()[0])
    assert start["device"].startswith("xla")


def test_an_xla_checkpoint_evaluates_on_plain_cpu(quickstart_on_xla, tmp_path):
    best = quickstart_on_xla / "checkpoints" / "best.pt"
    done = run("-m", "dltrain", "eval", str(best), "--device", "cpu", "--json", cwd=tmp_path)
    again = json.loads(done.stdout)
    report = json.loads((quickstart_on_xla / "report.json").read_text())
    assert again["confusion_matrix"] == report["confusion_matrix"]
    assert again["accuracy"] == pytest.approx(report["accuracy"], abs=1e-12)


def test_devices_lists_the_xla_device_with_its_type(tmp_path):
    done = run("-m", "dltrain", "devices", "--json", cwd=tmp_path)
    devices = json.loads(done.stdout)["devices"]
    xla = [d for d in devices if d["type"] == "xla"]
    assert xla and xla[0]["name"].startswith("CPU")


# Compiles of a 1-epoch and of a 3-epoch run (20 steps an epoch): about equal when every
# training step (and every evaluation batch, padded to one shape) reuses its graph. A per-step
# constant (a slice offset, a host step count in the optimizer) would add a compile per step.
COUNT_COMPILES = textwrap.dedent(
    """
    import sys
    import torch_xla.debug.metrics as metrics
    from dltrain.cli import app
    try:
        app(["fit", sys.argv[1], "device=xla", "--quiet", *sys.argv[2:]])
    except SystemExit as done:
        assert not done.code, done.code
    print("compiles", metrics.metric_data("CompileTime")[0])
    """
)


def test_training_steps_compile_once_not_once_per_step(tmp_path):
    script = tmp_path / "count.py"
    script.write_text(COUNT_COMPILES, encoding="utf-8")

    def compiles(epochs: int) -> int:
        name = f"output={tmp_path}/e{epochs}"
        done = run(str(script), str(QUICKSTART), name, f"train.epochs={epochs}", cwd=tmp_path)
        return int(done.stdout.split("compiles")[-1])

    one, three = compiles(1), compiles(3)
    # 40 more steps and 2 more evaluations; the first step of a later epoch (optimizer state
    # present, running sums fresh) may add one graph, nothing may add one per step
    assert three - one <= 1, (one, three)
    assert one < 20


def test_data_parallel_xla_on_the_cpu_is_refused_not_run_apart(tmp_path):
    # PJRT's CPU client cannot reduce across processes: each process would silently train
    # alone. dltrain says so instead (TPU cores are the multi-process XLA target).
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    command = [sys.executable, "-m", "dltrain", "fit", str(QUICKSTART), "device=xla"]
    command += [f"output={tmp_path}", "--nproc", "2"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "XLA's collectives do not reach across processes" in done.stderr
    assert "Traceback" not in done.stderr
