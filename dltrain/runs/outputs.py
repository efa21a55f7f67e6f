"""Where a command may write: the one guard every `--output` passes before anything is written.

A path that is one of a run's own files — in a run folder (recipe.yaml), a folder of reports
(report.json: `eval`'s too), a cross-validation (cv_report.json) or a sweep (study.db,
sweep_report.json) — or its checkpoints/last.pt and best.pt, or a checkpoint anywhere, is
refused (exit 2, the file unchanged) unless --force: a prediction, a picture or an export must
never replace a run's history, report, plots or weights.
"""

from __future__ import annotations

from pathlib import Path

from dltrain.errors import UserError
from dltrain.runs.checkpoint import refuse_replacing_a_checkpoint

# The files dltrain keeps in a run's folder (runs/folder.py, reporting/report.py,
# experiments/crossval.py, sweep_study.py and sweep_report.py write them; a test checks every
# name they write is here)
RUN_FILES = frozenset(
    {
        "recipe.yaml",
        "metrics.csv",
        "events.jsonl",
        "report.json",
        "report.md",
        "curves.png",
        "confusion_matrix.png",
        "cv_report.json",
        "study.db",
        "sweep_report.json",
        "sweep_report.md",
        "history.png",
        "importances.png",
        "slices.png",
        "mlflow.db",
    }
)
# A folder holding one of these is a run's (a training run, reports, folds, a sweep)
RUN_MARKERS = ("recipe.yaml", "report.json", "cv_report.json", "study.db", "sweep_report.json")
CHECKPOINTS, CHECKPOINT_FILES = "checkpoints", frozenset({"last.pt", "best.pt"})


def refuse_replacing_run_files(output: Path, force: bool, source: Path | None = None) -> None:
    """Refuse (UserError, exit 2) an output path that is a run's own file or a checkpoint
    (`source`: the checkpoint being read), unless `force`."""
    if force:
        return
    owner = run_owning(Path(output))
    if owner is not None:
        raise UserError(
            f"--output {output} is one of the files of the run in {owner}; writing there would "
            "replace it. Choose another path, or add --force to replace it."
        )
    refuse_replacing_a_checkpoint(Path(output), source, force)


def run_owning(path: Path) -> Path | None:
    """The run folder whose own file `path` is (whether it exists yet or not), or None."""
    path = path.absolute()
    folder = path.parent
    if (
        folder.name == CHECKPOINTS
        and path.name in CHECKPOINT_FILES
        and is_run_folder(folder.parent)
    ):
        return folder.parent
    if path.name in RUN_FILES and is_run_folder(folder):
        return folder
    return None


def is_run_folder(folder: Path) -> bool:
    """Whether a folder holds a run, its reports, a cross-validation or a sweep."""
    try:
        return any((folder / marker).is_file() for marker in RUN_MARKERS)
    except OSError:  # unreadable: not known to be a run's
        return False
