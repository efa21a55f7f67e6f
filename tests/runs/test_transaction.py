"""Every save is a transaction: killed at any write boundary, a run resumes to exactly the
uninterrupted run's files; --force never leaves a mixed folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from dltrain.runs.checkpoint import load_checkpoint
from dltrain.runs.folder import RunFolder
from dltrain.runs.transaction import JOURNAL, Transaction, recover, transaction

from helpers.training import assert_same_tensors, metric_rows


def test_staged_files_appear_together_on_commit(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    with transaction(tmp_path) as tx:
        tx.staged(a).write_text("new a")
        tx.staged(b).write_text("new b")
        assert a.read_text() == "old a" and not b.exists()  # nothing visible before the commit
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_a_failure_before_the_commit_keeps_every_old_file(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("old a")
    with pytest.raises(RuntimeError), transaction(tmp_path) as tx:
        tx.staged(a).write_text("new a")
        raise RuntimeError("cut")
    assert a.read_text() == "old a" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_recovery_finishes_a_commit_whose_journal_was_written(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    b.write_text("old b")
    tx = Transaction(tmp_path)
    staged_a, staged_b = tx.staged(a), tx.staged(b)
    staged_a.write_text("new a")
    staged_b.write_text("new b")
    journal = [[str(staged_a), str(a)], [str(staged_b), str(b)]]
    (tmp_path / JOURNAL).write_text(json.dumps(journal))
    os.replace(staged_a, a)  # killed after the first rename
    recover(tmp_path)
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_recovery_without_a_journal_drops_staged_and_temp_files(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("old a")
    Transaction(tmp_path).staged(a).write_text("new a")  # staged, never committed
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half")  # a cut write
    recover(tmp_path)
    assert a.read_text() == "old a"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["a.txt"]


# -- a real run, killed at every write boundary of its last epoch's save and its report ---------

KILLED_AT = """
import os, sys
calls, kill_at, log_path = 0, int(sys.argv[1]), sys.argv[2]
real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    global calls
    calls += 1
    if calls == kill_at:
        os._exit(137)  # as SIGKILL: no cleanup, no finally
    with open(log_path, "a") as log:
        log.write(str(dst) + "\\n")
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
from dltrain.cli import main
sys.argv = ["dltrain", *sys.argv[3:]]
main()
"""


def fit_killed_at(call: int, recipe: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`dltrain fit RECIPE` in a process that dies at its call-th rename (0: never); the
    renames it made are listed in cwd/renames.txt."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DLTRAIN_DEBUG", None)
    log = cwd / "renames.txt"
    log.unlink(missing_ok=True)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_AT), str(call), str(log)]
        + ["fit", str(recipe), "-q"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def small_recipe(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    recipe = {
        "name": name,
        "seed": 1,
        "device": "cpu",
        "output": str(folder / "runs"),
        "data": {"name": "digits", "batch_size": 128, "val_split": 0.2},
        "model": {"name": "mlp", "hidden": [32]},
        "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_files(run: RunFolder) -> tuple:
    """What must match the uninterrupted run: weights, best, metrics, report."""
    report = json.loads((run.root / "report.json").read_text())
    return (
        load_checkpoint(run.last_path)["model"],
        load_checkpoint(run.best_path)["model"],
        load_checkpoint(run.best_path)["epoch"],
        metric_rows(run),
        report,
    )


@pytest.mark.slow
def test_killed_at_any_write_boundary_a_resumed_run_ends_exactly_as_the_uninterrupted_one(
    invoke,
    tmp_path,
):
    recipe = small_recipe(tmp_path, "straight")
    straight = fit_killed_at(0, recipe, tmp_path)
    assert straight.returncode == 0, straight.stderr
    renames = (tmp_path / "renames.txt").read_text().splitlines()
    reference = run_files(RunFolder(tmp_path / "runs" / "straight"))
    # every rename of epoch 2's save (its staged files, its journal, its commit), then two in
    # the final report's commit (after its journal, and halfway through its renames)
    root = tmp_path / "runs" / "straight"
    metrics = [i for i, path in enumerate(renames, 1) if path == str(root / "metrics.csv")]
    epoch_2 = range(metrics[0] + 1, metrics[1] + 1)
    report_journal = max(i for i, path in enumerate(renames, 1) if path.endswith(JOURNAL))
    boundaries = [*epoch_2, report_journal + 1, report_journal + 3]
    assert len(epoch_2) >= 7  # last, best and metrics staged, the journal, three renames
    recipe = small_recipe(tmp_path, "killed")
    run = RunFolder(tmp_path / "runs" / "killed")
    for call in boundaries:
        shutil.rmtree(run.root, ignore_errors=True)  # each kill interrupts a fresh run
        killed = fit_killed_at(call, recipe, tmp_path)
        assert killed.returncode == 137, killed.stderr
        resumed = invoke("fit", str(recipe), "--resume", "auto", "-q")
        assert resumed.exit_code == 0, (call, renames[call - 1], resumed.output)
        last, best, best_epoch, metrics, report = run_files(run)
        assert_same_tensors(last, reference[0])
        assert_same_tensors(best, reference[1])
        assert (best_epoch, metrics, report) == reference[2:], renames[call - 1]
        leftovers = [p.name for p in run.root.rglob(".*") if p.is_file()]
        assert leftovers == [], (call, leftovers)


def test_a_failed_force_run_gives_the_folder_back_to_the_run_it_was_to_replace(
    invoke,
    tmp_path,
):
    recipe = small_recipe(tmp_path, "kept")
    assert invoke("fit", str(recipe), "train.epochs=1", "-q").exit_code == 0
    run = RunFolder(tmp_path / "runs" / "kept")
    before = {p.relative_to(run.root): p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    failed = invoke("fit", str(recipe), "train.epochs=1", "data.batch_size=0", "--force")
    assert failed.exit_code == 2  # refused before any work: nothing moved
    broken = invoke("fit", str(recipe), "train.epochs=1", "model.hidden=[-1]", "--force")
    assert broken.exit_code == 2
    after = {p.relative_to(run.root): p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    assert after == before
    assert not run.root.with_name(".kept.replaced").exists()


def test_force_starts_in_an_empty_folder_and_drops_the_old_run_once_the_new_one_saved(
    invoke,
    tmp_path,
):
    recipe = small_recipe(tmp_path, "fresh")
    assert invoke("fit", str(recipe), "train.epochs=1", "-q").exit_code == 0
    run = RunFolder(tmp_path / "runs" / "fresh")
    (run.root / "stray-from-the-old-run.txt").write_text("old")
    assert invoke("fit", str(recipe), "--force", "-q").exit_code == 0
    assert not (run.root / "stray-from-the-old-run.txt").exists()
    events = (run.root / "events.jsonl").read_text()
    assert events.count('"event": "start"') == 1  # the old run's events did not leak in
    assert len(metric_rows(run)) == 2
    assert not run.root.with_name(".fresh.replaced").exists()


def test_force_deletes_the_replaced_run_at_the_new_runs_first_save(invoke, tmp_path):
    from dltrain.runs.planning import planned_run

    recipe = small_recipe(tmp_path, "swap")
    assert invoke("fit", str(recipe), "train.epochs=1", "-q").exit_code == 0
    aside = tmp_path / "runs" / ".swap.replaced"
    with planned_run(recipe, [], None, True, None, "dltrain fit") as plan:
        assert aside.is_dir() and not plan.run.root.exists()  # set aside: the new run is empty
        plan.run.start(plan.recipe)
        assert aside.is_dir()  # nothing saved yet: the old run can still come back
        plan.run.save_last({"epoch": 0})
        assert not aside.exists()  # its disk space back now, not when the new run ends
    assert plan.run.last_path.is_file() and not aside.exists()
