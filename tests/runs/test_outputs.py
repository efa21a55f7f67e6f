"""runs/outputs.py: no command's --output replaces a run's own file (its recipe, history, events,
reports, plots, checkpoints; a sweep's or a cross-validation's) without --force."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dltrain.errors import UserError
from dltrain.experiments import crossval, sweep_report, sweep_study
from dltrain.reporting import report
from dltrain.reporting.event_log import RunLog
from dltrain.runs.folder import RunFolder
from dltrain.runs.outputs import RUN_FILES, refuse_replacing_run_files, run_owning

from helpers.cli import png
from helpers.training import quickstart_recipe


def made_up_run(root: Path) -> Path:
    """A run folder's files, as training leaves them (contents do not matter here)."""
    (root / "checkpoints").mkdir(parents=True)
    for name in ("recipe.yaml", "metrics.csv", "report.json", "curves.png"):
        (root / name).write_text(name)
    (root / "checkpoints" / "best.pt").write_bytes(b"weights")
    return root


def test_every_file_a_run_writes_is_a_run_file(tmp_path):
    run = RunFolder(tmp_path)
    written = {
        run.recipe_path.name,
        run.metrics_path.name,
        RunLog(tmp_path, None, "cpu", enabled=False).path.name,
        "report.json",
        "report.md",
        report.CURVES_PNG,
        report.CONFUSION_MATRIX_PNG,
        crossval.CV_REPORT,
        sweep_study.STUDY_FILE,
        sweep_report.REPORT_JSON,
        sweep_report.REPORT_MD,
        sweep_report.HISTORY_PNG,
        sweep_report.IMPORTANCE_PNG,
        sweep_report.SLICES_PNG,
    }
    assert written <= RUN_FILES


@pytest.mark.parametrize("name", sorted(RUN_FILES) + ["checkpoints/best.pt", "checkpoints/last.pt"])
def test_a_runs_own_file_is_refused_and_kept(tmp_path, name):
    run = made_up_run(tmp_path / "run")
    target = run / name
    before = target.read_bytes() if target.exists() else None
    with pytest.raises(UserError, match=f"--output {target} is one of the files of the run"):
        refuse_replacing_run_files(target, force=False)
    assert (target.read_bytes() if target.exists() else None) == before
    refuse_replacing_run_files(target, force=True)  # --force: the user's call


@pytest.mark.parametrize(
    "name", ["predictions.csv", "notes.md", "checkpoints/best.onnx", "eval-test/x.png"]
)
def test_other_files_beside_a_run_are_free(tmp_path, name):
    run = made_up_run(tmp_path / "run")
    assert run_owning(run / name) is None
    refuse_replacing_run_files(run / name, force=False)


def test_a_folder_of_reports_or_a_sweep_is_a_run_too(tmp_path):
    reports, sweep = tmp_path / "eval-test", tmp_path / "sweep"
    for folder, marker in ((reports, "report.json"), (sweep, "study.db")):
        folder.mkdir()
        (folder / marker).write_text("")
    assert run_owning(reports / "confusion_matrix.png") == reports.absolute()
    assert run_owning(sweep / "sweep_report.md") == sweep.absolute()
    assert run_owning(tmp_path / "metrics.csv") is None  # a plain folder


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A trained quickstart run, copied: the commands below must leave it as it is."""
    run, _ = trained_run(quickstart_recipe(), "quickstart", "device=cpu", "train.epochs=1")
    return Path(shutil.copytree(run.root, tmp_path / "quickstart"))


def commands(run: Path, image: Path, target: Path) -> dict[str, tuple[str, ...]]:
    best = str(run / "checkpoints" / "best.pt")
    return {
        "predict": ("predict", best, str(image), "--output", str(target)),
        "explain": ("explain", best, str(image), "--output", str(target)),
        "export": ("export", best, "--format", "torchscript", "--output", str(target)),
        "compare": ("compare", str(run), str(run), "--output", str(target)),
    }


@pytest.mark.parametrize(
    "command, name",
    [
        ("predict", "metrics.csv"),
        ("explain", "confusion_matrix.png"),
        ("export", "report.json"),
        ("compare", "curves.png"),
        ("export", "checkpoints/last.pt"),
    ],
)
def test_no_command_output_replaces_a_runs_file(run_copy, invoke, tmp_path, command, name):
    image = tmp_path / "digit.png"
    png(image, (8, 8), 128)
    target = run_copy / name
    before = target.read_bytes()
    result = invoke(*commands(run_copy, image, target)[command])
    assert result.exit_code == 2, result.output
    assert "one of the files of the run" in result.output and "--force" in result.output
    assert target.read_bytes() == before


def test_force_lets_the_user_replace_a_runs_file(run_copy, invoke, tmp_path):
    image = tmp_path / "digit.png"
    png(image, (8, 8), 128)
    target = run_copy / "metrics.csv"
    result = invoke(*commands(run_copy, image, target)["predict"], "--force")
    assert result.exit_code == 0, result.output
    assert target.read_text().startswith("input,class_1,probability_1")
