"""k-fold cross-validation: one recipe trained K times, each time validating on another fold.

`dltrain fit RECIPE --folds K` splits the dataset's train split into K folds, stratified by
class for classification and at random otherwise (`stratified_folds`, with the recipe's seed;
a regression target is one stratum). Fold k's run validates on fold k and trains on the
other K-1; its recipe says so in `data.fold: {index: k, of: K}`, so its recipe.yaml and its
checkpoints rebuild the same split for `eval` and `--resume`. A validation split that the
dataset itself provides is not used. Each fold's run is an ordinary run folder
`{output}/{name}/fold-k/` (output `{output}/{name}`, name `fold-k`), ending as usual with its
best.pt evaluated on the test split; the test split is used for nothing else.

`{output}/{name}/cv_report.json` gathers every scalar metric of the folds' report.json files
(plus the best validation loss and accuracy from each metrics.csv) as mean, sample standard
deviation (ddof=1) and the per-fold values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dltrain.config.schema import Fold, Recipe, to_yaml
from dltrain.errors import UserError
from dltrain.reporting.progress import Progress
from dltrain.reporting.report import report_scalars
from dltrain.runs.folder import RunFolder
from dltrain.runs.metrics_csv import best_val_metrics, read_metrics
from dltrain.system.atomic import atomic_write_text
from dltrain.training.loop import fit

CV_REPORT = "cv_report.json"
# table order: the headline metrics first (classification's, then regression's)
FIRST = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "r2", "mae", "loss")


def fold_name(index: int) -> str:
    """The run name (and folder) of fold `index` (1-based): fold-1, fold-2, ..."""
    return f"fold-{index}"


def cv_root(recipe: Recipe) -> Path:
    """The folder that holds a cross-validation's fold runs and cv_report.json."""
    return Path(recipe.output) / recipe.name


def fold_recipes(recipe: Recipe, folds: int) -> list[Recipe]:
    """The recipe of each fold's run: same settings, `data.fold` set, run folder under cv_root."""
    if folds < 2:
        raise UserError(f"--folds must be at least 2 (got {folds}); leave it out to train once.")
    if recipe.data.fold is not None:
        raise UserError(
            "data.fold is already set in this recipe (it is one fold of a cross-validation); "
            "remove it to cross-validate with --folds, or fit it without --folds."
        )
    root = str(cv_root(recipe))
    return [
        recipe.model_copy(
            update={
                "output": root,
                "name": fold_name(k),
                "data": recipe.data.model_copy(update={"fold": Fold(index=k, of=folds)}),
            }
        )
        for k in range(1, folds + 1)
    ]


def run_cross_validation(
    recipe: Recipe,
    folds: int,
    progress: Progress,
    force: bool = False,
    report_on: str | None = None,
) -> dict[str, Any]:
    """Train one run per fold, then write and return cv_report.json.

    Every fold folder is checked before any training (a different run there is refused unless
    `force`). Running the same command again after an interruption keeps the folds that
    finished (same recipe.yaml and a report.json), continues an unfinished fold from its
    last.pt, and trains the rest; `force` trains every fold afresh. `report_on` ('val' in a
    sweep, which must never look at the test split) is the split of each fold's final report.
    """
    recipes = fold_recipes(recipe, folds)
    root = cv_root(recipe)
    runs = _checked_fold_folders(root, recipes, force, progress)
    reports = [
        _fold_report(k, folds, fold_recipe, run, progress, force, report_on)
        for k, (fold_recipe, run) in enumerate(zip(recipes, runs), start=1)
    ]
    histories = [read_metrics(run.metrics_path) for run in runs]
    cv_report = {
        "folds": folds,
        "split": reports[0].get("split"),
        "seed": recipe.seed,
        "metrics": summarize_folds(reports, histories),
        "runs": _names(folds),
    }
    atomic_write_text(root / CV_REPORT, json.dumps(cv_report, indent=2) + "\n")
    return cv_report


def _checked_fold_folders(
    root: Path, recipes: list[Recipe], force: bool, progress: Progress
) -> list[RunFolder]:
    """The folds' run folders, checked before any training: none may hold a different run
    (unless `force`), each must be writable; stray fold-k folders are noted."""
    if (root / "recipe.yaml").exists() and not force:
        raise UserError(
            f"{root} holds a single run, not a cross-validation; use another name (name=...) "
            "or output (output=...), or --force to put the folds beside it."
        )
    runs = [RunFolder.for_recipe(r) for r in recipes]
    for fold_recipe, run in zip(recipes, runs):
        if not force and run.recipe_path.exists() and not _holds(run, fold_recipe):
            raise UserError(
                f"{run.root} holds a run of a different recipe (another cross-validation?). "
                "Use another name (name=...) or output (output=...), or --force to replace "
                "the folds."
            )
        run.ensure_writable()
    names = _names(len(recipes))
    stale = sorted(p.name for p in root.glob("fold-*") if p.is_dir() and p.name not in names)
    if stale:
        _say(progress, f"[yellow]note:[/] {', '.join(stale)} in {root} are not part of this run")
    return runs


def _fold_report(
    k: int,
    folds: int,
    fold_recipe: Recipe,
    run: RunFolder,
    progress: Progress,
    force: bool,
    report_on: str | None,
) -> dict[str, Any]:
    """Fold k's report: kept when it finished earlier, else trained (continuing its last.pt
    when it was interrupted)."""
    same_recipe = run.recipe_path.exists() and _holds(run, fold_recipe)
    report_path = run.root / "report.json"
    if same_recipe and report_path.exists() and not force:
        _say(progress, f"[bold]fold {k}/{folds}[/]: finished earlier, its report is kept")
        return _read_report(report_path)
    resume = run.last_path if same_recipe and run.last_path.exists() and not force else None
    report_path.unlink(missing_ok=True)  # present again only once this fold's fit finished
    _say(
        progress,
        f"[bold]fold {k}/{folds}[/]: validating on fold {k}, training on the other "
        f"{folds - 1}" + (f" · continuing from {resume}" if resume else ""),
    )
    returned = fit(fold_recipe, run, progress, resume=resume, report_on=report_on)
    # report.json as written (what `eval` reproduces); fit's own dict if it is no mapping
    return _read_report(report_path) or returned


def summarize_folds(
    reports: list[dict[str, Any]], histories: list[list[dict[str, float | None]]]
) -> dict[str, dict[str, Any]]:
    """{metric: {mean, std, values}} over the folds: every scalar metric of the reports, then
    best_val_loss and best_val_accuracy from the histories. A metric missing from any fold is
    left out. std is the sample standard deviation (ddof=1)."""
    per_fold = [
        {**report_scalars(report), **best_val_metrics(history)}
        for report, history in zip(reports, histories)
    ]
    names = list(per_fold[0])
    names = [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]
    summary = {}
    for name in names:
        values = [fold.get(name) for fold in per_fold]
        if any(v is None for v in values):
            continue
        summary[name] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values,
        }
    return summary


def _holds(run: RunFolder, recipe: Recipe) -> bool:
    """Whether the run folder's recipe.yaml is this recipe's."""
    try:
        return run.recipe_path.read_text(encoding="utf-8") == to_yaml(recipe)
    except (OSError, UnicodeDecodeError):
        return False


def _names(folds: int) -> list[str]:
    return [fold_name(k) for k in range(1, folds + 1)]


def _read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}. Re-run with --force to retrain.") from None
    return report if isinstance(report, dict) else {}


def _say(progress: Progress, text: str) -> None:
    if not progress.quiet:
        progress.console.print(text, highlight=False, soft_wrap=True)
