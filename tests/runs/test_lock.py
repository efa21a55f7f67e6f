"""One run owns its folder: a second writer is refused naming the holder, a lock left by a dead
process is taken over with a note, and an unfinished run is never silently started over."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from dltrain.config.schema import Recipe, to_yaml
from dltrain.errors import UserError
from dltrain.runs.folder import RunFolder, choose_version
from dltrain.runs.lock import holding, lock_path

from helpers.cli import dltrain, interruptible, words
from helpers.training import TABULAR, train

HOLD = """
import sys, time
from pathlib import Path
from dltrain.runs.lock import holding
with holding(Path(sys.argv[1]), "testing"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_in_another_process(root: Path, seconds: float = 60) -> subprocess.Popen:
    """A real second process holding the run folder's lock (returns once it holds it)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD), str(root), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    root = tmp_path / "runs" / "demo"
    holder = hold_in_another_process(root)
    try:
        with pytest.raises(UserError) as refused, holding(root, "training"):
            pass
        message = str(refused.value)
        assert f"{root} is in use" in message and f"pid {holder.pid}" in message
        assert "testing since" in message
    finally:
        holder.kill()
        holder.wait()
    # the OS released the dead holder's lock
    with pytest.warns(UserWarning, match="taking over"), holding(root, "training"):
        assert json.loads(lock_path(root).with_suffix(".lock.json").read_text())["doing"] == (
            "training"
        )


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path):
    root = tmp_path / "runs" / "demo"
    holder = hold_in_another_process(root)
    holder.kill()  # dies holding it: the note stays, the OS lock goes
    holder.wait()
    taking_over = f"taking over {root} from pid {holder.pid}"
    with pytest.warns(UserWarning, match=taking_over), holding(root, "training"):
        pass
    assert not lock_path(root).with_suffix(".lock.json").exists()  # released cleanly


TRY = """
import sys
from pathlib import Path
from dltrain.errors import UserError
from dltrain.runs.lock import holding
try:
    with holding(Path(sys.argv[1]), "trying"):
        print("taken")
except UserError:
    print("refused")
"""


def another_process_can_take(root: Path) -> bool:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(TRY), str(root)], capture_output=True, text=True
    )
    assert done.stdout.strip() in ("taken", "refused"), done.stderr
    return done.stdout.strip() == "taken"


def test_holding_is_reentrant_within_a_process(tmp_path):
    root = tmp_path / "demo"
    with holding(root, "training"):
        with holding(root, "writing a report"):  # the same process again: no refusal
            assert not another_process_can_take(root)
        assert not another_process_can_take(root)  # the inner release kept the outer hold
    assert another_process_can_take(root)  # released at the outermost end


def slow_recipe(folder: Path, epochs: int, train_size: int = 4096) -> Path:
    path = folder / "slow.yaml"
    recipe = {
        "name": "slow",
        "device": "cpu",
        "output": str(folder / "runs"),
        "data": {
            "name": "synthetic",
            "shape": [3, 16, 16],
            "num_classes": 4,
            "train_size": train_size,
            "test_size": 64,
            "batch_size": 32,
        },
        "model": {"name": "seed_cnn"},
        "train": {"epochs": epochs},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_two_concurrent_fits_on_one_folder_the_second_is_refused_at_once(tmp_path):
    # the first trains until this test stops it: it is running whenever the second starts,
    # however slowly a busy machine starts the second
    recipe = slow_recipe(tmp_path, epochs=10_000, train_size=2048)
    first = subprocess.Popen(
        [sys.executable, "-m", "dltrain", "fit", str(recipe), "-q"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,  # the test stops it with SIGINT
    )
    note = lock_path(tmp_path / "runs" / "slow").with_suffix(".lock.json")
    deadline = time.monotonic() + 120
    while not note.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert note.exists(), "the first fit never took the lock"
    second = dltrain("fit", recipe, "--force", cwd=tmp_path)
    assert second.returncode == 2, second.stdout + second.stderr
    # at once, by order rather than by the clock: refused while the first still trains, before
    # it printed anything of its own (no data summary, no model)
    assert first.poll() is None, "the first fit ended before the second was refused"
    assert second.stdout.strip() == ""
    message = words(second.stderr)
    assert "is in use" in message and f"pid {first.pid}" in message
    first.send_signal(signal.SIGINT)  # the refusal touched nothing of the first's run
    out, err = first.communicate(timeout=600)
    assert first.returncode == 130, out + err
    run = RunFolder(tmp_path / "runs" / "slow")
    assert run.last_path.exists()  # its progress saved on the stop, as ever


def test_eval_into_a_run_folder_another_process_writes_is_refused(
    invoke,
    tmp_path,
):
    run, _ = train(tmp_path, TABULAR, "busy", "train.epochs=1")
    holder = hold_in_another_process(run.root)
    try:
        result = invoke("eval", str(run.best_path))
        assert result.exit_code == 2, result.output
        assert f"pid {holder.pid}" in words(result.stderr)
        assert not (run.checkpoints / "eval-test").exists()
    finally:
        holder.kill()
        holder.wait()


def test_two_evals_into_one_output_folder_the_second_is_refused_before_any_work(invoke, tmp_path):
    run, _ = train(tmp_path, TABULAR, "done", "train.epochs=1")
    output = tmp_path / "reports"
    holder = hold_in_another_process(output)  # what a first `eval --output reports` holds
    try:
        result = invoke("eval", str(run.best_path), "--output", str(output))
        assert result.exit_code == 2, result.output
        said = words(result.stderr)
        assert f"{output} is in use" in said and f"pid {holder.pid}" in said
        assert not (output / "report.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # once the first is done, the folder is free again
    assert invoke("eval", str(run.best_path), "--output", str(output)).exit_code == 0
    assert (output / "report.json").exists()


def test_an_unfinished_run_is_never_silently_started_over(invoke, tmp_path):
    recipe = tmp_path / "tab.yaml"
    recipe.write_text(yaml.safe_dump({**TABULAR, "name": "tab", "output": str(tmp_path / "r")}))
    assert invoke("fit", str(recipe), "-q").exit_code == 0
    run = RunFolder(tmp_path / "r" / "tab")
    (run.root / "report.json").unlink()  # as if stopped before its end
    saved = run.last_path.read_bytes()

    again = invoke("fit", str(recipe))
    assert again.exit_code == 2
    message = words(again.stderr)
    assert "unfinished run" in message and f"dltrain fit {recipe} --resume auto" in message
    assert run.last_path.read_bytes() == saved

    resumed = invoke("fit", str(recipe), "--resume", "auto", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert (run.root / "report.json").exists() and run.last_path.read_bytes() == saved
    forced = invoke("fit", str(recipe), "--force", "-q")  # finished: a new start is allowed
    assert forced.exit_code == 0, forced.output


def _fake_run(root: Path, recipe: Recipe, saved: str = "") -> Path:
    """A run folder holding `recipe`, with 'last' (last.pt) and/or 'report' saved."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "recipe.yaml").write_text(to_yaml(recipe))
    if "last" in saved:
        (root / "checkpoints" / "last.pt").write_bytes(b"x")
    if "report" in saved:
        (root / "report.json").write_text("{}")
    return root


def test_a_new_run_takes_the_first_free_number(tmp_path):
    mine = Recipe.model_validate({**TABULAR, "name": "tab"})
    other = Recipe.model_validate({**TABULAR, "name": "tab", "seed": 1})
    base = tmp_path / "tab"
    never = lambda path: False  # noqa: E731 - no other process holds anything

    run, note = choose_version(base, mine, never)
    assert (run.root, note) == (base, None)
    _fake_run(base, mine, "last report")
    run, note = choose_version(base, mine, never)
    assert (
        run.root == tmp_path / "tab-2"
        and note == f"{base} holds a finished run: this run goes to {run.root}"
    )
    _fake_run(tmp_path / "tab-3", other, "last report")  # numbers go on after the highest
    assert choose_version(base, mine, never)[0].root == tmp_path / "tab-4"
    _fake_run(tmp_path / "tab-4", mine)  # a start that saved nothing: used again
    assert choose_version(base, mine, never)[0].root == tmp_path / "tab-4"
    (tmp_path / "tab-4/checkpoints/last.pt").write_bytes(b"x")  # now it is unfinished
    with pytest.raises(UserError, match="tab-4 holds an unfinished run of this recipe"):
        choose_version(base, mine, never)
    # ... unless another process is training it: then it is not ours to continue
    busy = lambda path: path == tmp_path / "tab-4"  # noqa: E731
    assert choose_version(base, mine, busy)[0].root == tmp_path / "tab-5"
    # another recipe's unfinished run is left alone: the next number
    assert choose_version(base, other, never)[0].root == tmp_path / "tab-5"


def test_a_file_named_like_a_version_is_passed_over_and_no_free_folder_is_said(tmp_path):
    mine = Recipe.model_validate({**TABULAR, "name": "tab"})
    base = tmp_path / "tab"
    _fake_run(base, mine, "last report")
    (tmp_path / "tab-2").write_text("not a run folder")
    never = lambda path: False  # noqa: E731
    assert choose_version(base, mine, never)[0].root == tmp_path / "tab-3"
    assert (tmp_path / "tab-2").read_text() == "not a run folder"
    every = lambda path: True  # noqa: E731 - every folder held by another process
    with pytest.raises(UserError, match="no folder for a new run of tab is free"):
        choose_version(base, mine, every)


def test_a_fit_beside_a_running_one_takes_the_next_number_and_resume_auto_the_newest(
    invoke, tmp_path
):
    recipe = tmp_path / "tab.yaml"
    recipe.write_text(yaml.safe_dump({**TABULAR, "name": "tab", "output": str(tmp_path / "r")}))
    holder = hold_in_another_process(tmp_path / "r" / "tab")  # a fit of tab, running
    try:
        beside = invoke("fit", str(recipe), "-q")
    finally:
        holder.kill()
        holder.wait()
    assert beside.exit_code == 0, beside.output
    second = RunFolder(tmp_path / "r" / "tab-2")
    assert (second.root / "report.json").exists()
    (second.root / "report.json").unlink()  # as if stopped before its end
    resumed = invoke("fit", str(recipe), "--resume", "auto", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert (second.root / "report.json").exists()  # tab-2, the newest, was continued
    assert not (tmp_path / "r" / "tab" / "checkpoints").exists()


def test_resume_auto_starts_a_new_run_when_there_is_none_and_refuses_another_recipe(
    invoke,
    tmp_path,
):
    recipe = tmp_path / "tab.yaml"
    recipe.write_text(yaml.safe_dump({**TABULAR, "name": "tab", "output": str(tmp_path / "r")}))
    first = invoke("fit", str(recipe), "--resume", "auto", "-q")
    assert first.exit_code == 0, first.output
    assert "no checkpoint at" in words(first.output) and "starting a new run" in first.output
    run = RunFolder(tmp_path / "r" / "tab")
    saved = run.last_path.read_bytes()

    # --resume does not skip the check that a run folder holds one recipe's run
    other = invoke("fit", str(recipe), "optimizer.lr=0.5", "--resume", "auto")
    assert other.exit_code == 2
    assert "optimizer.lr" in words(other.stderr)
    assert run.last_path.read_bytes() == saved


def test_the_note_says_why_the_named_folder_was_passed_over(tmp_path):
    mine = Recipe.model_validate({**TABULAR, "name": "tab"})
    other = Recipe.model_validate({**TABULAR, "name": "tab", "seed": 1})
    base = tmp_path / "tab"
    never = lambda path: False  # noqa: E731
    busy = lambda path: path == base  # noqa: E731 - the same recipe, started a moment before
    base.mkdir()  # its fit holds the folder but has not written recipe.yaml yet
    assert (
        choose_version(base, mine, busy)[1]
        == f"{base} is in use by another fit: this run goes to {base}-2"
    )
    _fake_run(base, other, "last report")
    assert "holds a run of another recipe" in choose_version(base, mine, never)[1]
    assert "holds a finished run" in choose_version(base, other, never)[1]
    shutil.rmtree(base)
    base.write_text("a file")
    assert (
        choose_version(base, mine, never)[1]
        == f"{base} is a file, not a run folder: this run goes to {base}-2"
    )


def test_resume_auto_continues_the_newest_of_two_unfinished_versions(invoke, tmp_path):
    recipe = tmp_path / "tab.yaml"
    recipe.write_text(yaml.safe_dump({**TABULAR, "name": "tab", "output": str(tmp_path / "r")}))
    assert invoke("fit", str(recipe), "-q").exit_code == 0
    assert invoke("fit", str(recipe), "-q").exit_code == 0  # tab was finished: tab-2
    older, newer = RunFolder(tmp_path / "r" / "tab"), RunFolder(tmp_path / "r" / "tab-2")
    for run in (older, newer):
        (run.root / "report.json").unlink()  # both stopped before their ends
    resumed = invoke("fit", str(recipe), "--resume", "auto", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert (newer.root / "report.json").exists() and not (older.root / "report.json").exists()


def test_resume_auto_of_a_moved_run_folder_continues_it_where_it_now_is(invoke, tmp_path):
    recipe = tmp_path / "tab.yaml"
    recipe.write_text(yaml.safe_dump({**TABULAR, "name": "tab", "output": str(tmp_path / "r")}))
    assert invoke("fit", str(recipe), "-q").exit_code == 0
    (tmp_path / "r" / "tab" / "report.json").unlink()  # stopped before its end
    moved = RunFolder(tmp_path / "archive" / "tab")
    moved.root.parent.mkdir()
    (tmp_path / "r" / "tab").rename(moved.root)
    saved = moved.last_path.read_bytes()

    resumed = invoke("fit", str(moved.recipe_path), "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert "no checkpoint" not in words(resumed.output)
    assert (moved.root / "report.json").exists() and moved.last_path.read_bytes() == saved
    assert not (tmp_path / "r" / "tab").exists()  # nothing started over at the old place
