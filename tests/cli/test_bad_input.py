"""One end-to-end test per kind of bad input: the exit code, one message naming what and where,
no traceback, and nothing good overwritten.

A 1-epoch quickstart run is trained once for the module. Every `fit` with bad input is aimed at
that run's folder with `--force` (which would replace a run, given good input) and every `eval`
at a copy of its checkpoint, and each test checks the run's files kept their exact bytes.
Most commands run in-process (typer's CliRunner: exit code and stderr are the same as a real
process, and an escaping exception fails the test); a real `python -m dltrain` runs where the
process itself matters. Unit-level checks of the same inputs live in config/test_recipe.py,
data/test_datasets_files.py and training/test_loop.py.
"""

from __future__ import annotations

import errno
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dltrain.errors import RunFailure
from dltrain.runs.checkpoint import FORMAT
from dltrain.system.atomic import atomic_write_text

from helpers.cli import QUICKSTART, dltrain, flat_image_folder, one_epoch_fit, words


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path → bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@dataclass
class TrainedRun:
    """The module's good run: `output`/quickstart, and its files as they were after training."""

    output: Path
    root: Path
    files: dict[str, bytes]

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    def assert_unchanged(self) -> None:
        now = snapshot(self.root)
        assert sorted(now) == sorted(self.files)  # nothing added (no temp files), nothing gone
        changed = [name for name, data in now.items() if data != self.files[name]]
        assert not changed, f"overwritten: {changed}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainedRun:
    output = tmp_path_factory.mktemp("trained")
    result = one_epoch_fit(output)
    assert result.returncode == 0, result.stdout + result.stderr
    root = output / "quickstart"
    files = snapshot(root)
    assert {"report.json", "checkpoints/best.pt", "checkpoints/last.pt"} <= set(files)
    return TrainedRun(output, root, files)


@pytest.fixture
def fit_over(invoke, trained):
    """`dltrain fit RECIPE ARGS --force` into the trained run's folder, in-process."""

    def run(recipe: Path | str, *args: str):
        place = ["name=quickstart", f"output={trained.output}"]
        return invoke("fit", str(recipe), *args, *place, "--force", "--quiet")

    return run


def assert_refused(result, *expected: str, code: int = 2) -> None:
    """Exit `code`, every expected fragment in the message on stderr, no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    message = words(result.stderr)
    for text in expected:
        assert text in message, message


# -- recipes and overrides ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("", [], ["recipe.yaml", "the recipe is empty"]),
        ("- data\n- model\n", [], ["recipe.yaml", "must be a mapping", "not a list"]),
        ("just words\n", [], ["recipe.yaml", "must be a mapping", "not a str"]),
        (
            "data:\n  name: digits\n  batch_size: 32: 64\nmodel: mlp\n",
            [],
            ["recipe.yaml:3:17", "invalid YAML"],
        ),
        (
            "data: {name: digits}\nmodel: mlp\noptimizer:\n  name: adam\n  lrr: 0.1\n",
            [],
            ["recipe.yaml:5", "optimizer.lrr", "unknown key", "Did you mean 'lr'"],
        ),
        (
            "data: {name: digits}\nmodel:\n  name: resnet81\n",
            [],
            ["recipe.yaml:3", "model.name", "unknown model 'resnet81'", "Did you mean 'resnet18'"],
        ),
        (
            "data: {name: digits}\nmodel: mlp\nloss: {name: hubert}\n",
            [],
            ["recipe.yaml:3", "loss.name", "unknown loss 'hubert'", "Did you mean 'huber'"],
        ),
        (None, ["data.batch_size=many"], ["override 'data.batch_size=many'", "valid integer"]),
        (None, ["optimizer.lr=-0.1"], ["override 'optimizer.lr=-0.1'", "greater than 0"]),
        (None, ["train epochs=3"], ["override 'train epochs=3'", "KEY=VALUE"]),
    ],
    ids=[
        "empty-yaml",
        "yaml-list",
        "yaml-scalar",
        "yaml-syntax",
        "unknown-key",
        "unknown-component",
        "unknown-loss",
        "wrong-type",
        "out-of-range",
        "override-syntax",
    ],
)
def test_a_wrong_recipe_or_override(fit_over, trained, tmp_path, text, overrides, expected):
    recipe = QUICKSTART
    if text is not None:
        recipe = Path("recipe.yaml")  # relative to tmp_path, the working directory
        (tmp_path / recipe).write_text(text, encoding="utf-8")
    assert_refused(fit_over(recipe, *overrides), *expected)
    trained.assert_unchanged()


def test_resuming_a_run_of_a_different_recipe(invoke, trained):
    # (a new fit of another recipe goes to NAME-2: test_fit_cli's rerun test)
    result = invoke(
        "fit", str(QUICKSTART), f"output={trained.output}", "optimizer.lr=0.01", "--resume", "auto"
    )
    assert_refused(result, "optimizer.lr")
    trained.assert_unchanged()


# -- data files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["npz", "image_folder"])
def test_a_missing_dataset_path(fit_over, trained, tmp_path, dataset):
    missing = tmp_path / "no_such_data"
    result = fit_over(QUICKSTART, f"data.name={dataset}", f"data.path={missing}")
    assert_refused(result, "data.path", str(missing), "not found")
    trained.assert_unchanged()


def test_a_mistyped_data_path_is_reported_before_the_run_folder(invoke, trained, tmp_path):
    # without --force, into a folder holding a different run: the input is what to fix first
    missing = tmp_path / "no_such.npz"
    result = invoke(
        "fit", str(QUICKSTART), f"output={trained.output}", "data.name=npz", f"data.path={missing}"
    )
    assert_refused(result, "data.path", str(missing), "not found")
    assert "different recipe" not in result.output
    trained.assert_unchanged()


def test_an_npz_with_wrong_keys(fit_over, trained, tmp_path):
    x, y = np.zeros((6, 8, 8), np.uint8), np.arange(6) % 2
    np.savez(tmp_path / "data.npz", train_x=x, train_y=y, x_test=x)
    result = fit_over(QUICKSTART, "data.name=npz", f"data.path={tmp_path / 'data.npz'}")
    assert_refused(result, "data.path", "lacks array(s) test_x, test_y", "found: train_x")
    trained.assert_unchanged()


def test_an_npz_with_wrong_shapes(fit_over, trained, tmp_path):
    y = np.arange(6) % 2
    train_x, test_x = np.zeros((6, 8, 8), np.uint8), np.zeros((6, 5, 5), np.uint8)
    np.savez(tmp_path / "data.npz", train_x=train_x, train_y=y, test_x=test_x, test_y=y)
    result = fit_over(QUICKSTART, "data.name=npz", f"data.path={tmp_path / 'data.npz'}")
    assert_refused(result, "data.path", "'test_x' samples have shape (1, 5, 5)", "(1, 8, 8)")
    trained.assert_unchanged()


def test_an_image_folder_with_an_undecodable_file(fit_over, invoke, trained, tmp_path):
    images = flat_image_folder(tmp_path / "images")
    broken = images / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    data = ["data.name=image_folder", f"data.path={images}", "data.image_size=8"]
    tiny = ["model.name=mlp", "model.hidden=[8]", "data.batch_size=4", "train.epochs=1"]

    # Skipped by default, with one warning line naming it: the run goes on without it.
    skipped = invoke("fit", str(QUICKSTART), *data, *tiny, f"output={tmp_path}", "-q")
    assert skipped.exit_code == 0, skipped.output
    output = " ".join(skipped.output.split())
    assert f"warning: skipping undecodable image {broken}" in output
    assert "images.py" not in output  # not Python's file:line warning dump

    # data.on_bad_file=error: exit 2 naming the file and the way out.
    result = fit_over(QUICKSTART, *data, *tiny, "data.on_bad_file=error")
    assert_refused(result, f"cannot decode image '{broken}'", "data.on_bad_file: skip")
    trained.assert_unchanged()


def test_data_whose_classes_do_not_match_the_checkpoint(invoke, trained, tmp_path):
    other = ["data.name=synthetic", "data.num_classes=3", "data.shape=[1,8,8]"]
    result = invoke("eval", str(trained.best), *other, "--output", str(tmp_path / "eval"))
    assert_refused(result, "3 classes", "10 classes", "does not match the checkpoint")
    assert not (tmp_path / "eval").exists()
    trained.assert_unchanged()


# -- where the run is written -------------------------------------------------------------------


@pytest.mark.parametrize(
    "blocker",
    [
        "file",
        pytest.param(
            "read-only",
            marks=pytest.mark.skipif(
                hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere"
            ),
        ),
    ],
)
def test_an_unwritable_output_folder(tmp_path, blocker):
    if blocker == "file":
        output = tmp_path / "runs"
        output.write_text("not a folder")
        expected = f"{output} is a file, not a folder"
    else:
        output = tmp_path / "locked"
        output.mkdir()
        output.chmod(0o555)
        expected = "Permission denied"
    before = snapshot(tmp_path)
    result = dltrain("fit", QUICKSTART, f"output={output}", "train.epochs=1", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    message = words(result.stderr)
    assert f"cannot write the run folder {output / 'quickstart'}" in message
    assert expected in message and "output=" in message
    assert snapshot(tmp_path) == before


def test_a_disk_that_fills_up_during_a_write(fit_over, trained, tmp_path, monkeypatch):
    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # The write itself: the old file stays, the error is a run failure naming the file.
    target = tmp_path / "metrics.csv"
    target.write_text("old")
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", no_space)
        with pytest.raises(RunFailure) as failure:
            atomic_write_text(target, "new")
    assert failure.value.exit_code == 1
    assert str(target) in str(failure.value) and "No space left on device" in str(failure.value)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.csv"]

    # A whole run: exit 1 (not a user error), and the run it was to replace is intact.
    monkeypatch.setattr(os, "fsync", no_space)
    result = fit_over(QUICKSTART, "train.epochs=1")
    assert_refused(result, f"cannot write {trained.root}", "No space left on device", code=1)
    trained.assert_unchanged()


# -- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncated", "truncated or not a torch checkpoint"),
        ("corrupt", "truncated or not a torch checkpoint"),
        ("newer-format", f"format {FORMAT + 1}, newer than this dltrain reads"),
    ],
)
def test_an_unusable_checkpoint(invoke, trained, tmp_path, damage, expected):
    path = tmp_path / "model.pt"
    good = trained.best.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "corrupt":
        path.write_bytes(random.Random(0).randbytes(len(good)))
    else:
        state = torch.load(trained.best, weights_only=True)
        torch.save({**state, "format": FORMAT + 1}, path)
    result = invoke("eval", str(path))
    assert_refused(result, str(path), expected)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no eval-test/ folder
    trained.assert_unchanged()


class WritesAMarker:
    """Unpickling this would call open(marker, 'w'): code running from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_holds_code(trained, tmp_path):
    marker = tmp_path / "code-ran"
    state = torch.load(trained.best, weights_only=True)
    path = tmp_path / "evil.pt"
    torch.save({**state, "metrics": WritesAMarker(marker)}, path)  # else a valid checkpoint

    result = dltrain("eval", path, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    message = words(result.stderr)
    assert f"refusing to load {path}" in message and "objects other than tensors" in message
    assert not marker.exists()  # weights_only=True refused it before anything was called
    assert not (tmp_path / "eval-test").exists()
    trained.assert_unchanged()
