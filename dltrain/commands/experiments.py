"""Many runs: `dltrain compare` (runs side by side), `dltrain lr-find` (a learning rate to start
from) and `dltrain sweep` (a hyperparameter search on Optuna). Torch is imported only inside the
commands, so `--help` stays fast."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement

from dltrain.commands import exit_stopped, force_option

WIDE_TABLE_KEYS = 6  # more differing keys than this: one row per key instead of per run


def compare(
    runs: list[Path] = typer.Argument(
        ..., help="Two or more run folders (runs/NAME).", show_default=False
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="The PNG of the curves (default: compare.png here)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts (and the PNG)."),
    force: bool = force_option(),
) -> None:
    """Compare runs: their curves on shared axes in one PNG, the recipe keys that differ, and
    each run's headline test figure.

    [bold]Examples[/]

      dltrain compare runs/quickstart runs/quickstart-2

      dltrain compare runs/sweep/trials/* --output trials.png --json
    """
    from dltrain.experiments.compare import (
        DEFAULT_OUTPUT,
        compare_json,
        compare_table,
        differing_keys,
        keys_table,
        load_runs,
        plot_compare,
    )
    from dltrain.runs.outputs import refuse_replacing_run_files

    refuse_replacing_run_files(output or DEFAULT_OUTPUT, force)
    loaded = load_runs(list(runs))
    written = plot_compare(loaded, output or DEFAULT_OUTPUT)
    if as_json:
        print(json.dumps({**compare_json(loaded), "plot": str(written)}, indent=2))
        return
    console = Console()
    table = compare_table(loaded)
    # keys in rows when there are many, or when their columns would not fit the terminal: a
    # key cut to `model…` would hide the one thing the table is for
    natural_width = Measurement.get(console, console.options.update(max_width=10**4), table).maximum
    if len(differing_keys(loaded)) > WIDE_TABLE_KEYS or natural_width > console.width:
        console.print(keys_table(loaded))
        console.print(compare_table(loaded, key_columns=False))
    else:
        console.print(table)
    console.print(f"curves: {escape(str(written))}", highlight=False, soft_wrap=True)


def sweep(
    recipe: Path = typer.Argument(..., help="The recipe YAML file.", show_default=False),
    space: Path = typer.Argument(
        ...,
        help="The search space YAML file (metric, sampler, pruner, params).",
        show_default=False,
    ),
    overrides: list[str] = typer.Argument(
        None, help="KEY=VALUE recipe overrides for every trial.", show_default=False
    ),
    trials: int = typer.Option(
        ..., "--trials", metavar="N", help="Trials in all: a rerun continues the study to N."
    ),
    storage: str = typer.Option(
        None,
        "--storage",
        metavar="URL",
        help="An Optuna database URL (default: sqlite study.db in the sweep folder), or "
        "journal:PATH (Optuna's journal file, for a shared filesystem without a database); "
        "processes on several machines sharing one (PostgreSQL, MySQL, a journal) run one study.",
    ),
    study: str = typer.Option(
        None, "--study", metavar="NAME", help="The study's name (default: the recipe's name)."
    ),
    nproc: int = typer.Option(
        None,
        "--nproc",
        metavar="K",
        help="Run each trial data-parallel in K processes (as fit --nproc); rank 0 reports to "
        "the pruner and every rank stops with it.",
        show_default=False,
    ),
) -> None:
    """Search hyperparameters with Optuna: each trial is a run folder in OUTPUT/NAME/trials/.

    Trials are judged on validation only; the best one is then evaluated on the test split.
    Writes OUTPUT/NAME/sweep_report.json and .md with plots. Ctrl-C stops the running trial
    and reports the trials so far; the same command continues the study.

    [bold]Examples[/]

      dltrain sweep recipes/quickstart.yaml space.yaml --trials 20

      dltrain sweep recipe.yaml space.yaml --trials 50 --storage postgresql+psycopg://host/db

      dltrain sweep recipe.yaml space.yaml --trials 20 --nproc 4
    """
    from dltrain.experiments.sweep import run_sweep
    from dltrain.experiments.sweep_report import REPORT_JSON, write_sweep_report
    from dltrain.experiments.sweep_study import open_sweep
    from dltrain.reporting.progress import Progress
    from dltrain.system.interrupts import GracefulStop, Interrupted

    console = Console()
    stop = GracefulStop()
    with stop:
        opened = open_sweep(recipe, space, overrides or [], trials, storage, study)
        _check_trial_processes(nproc, opened)
        say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
        say(
            f"sweep {opened.study.study_name}: {trials} trials, {opened.metric} "
            f"({'higher' if opened.metric.endswith('accuracy') else 'lower'} is better) · "
            f"{opened.root}"
        )
        progress = Progress(Console(stderr=True), live_only=True)
        try:
            summary = run_sweep(opened, progress, stop, say, nproc)
        except Interrupted as stopped:
            write_sweep_report(opened, None)  # the trials so far
            ended, _ = opened.ended()
            exit_stopped(
                console,
                stopped,
                f"{ended} of {trials} trials ended; the same command continues the study (the "
                "interrupted trial is tried again).",
            )
        finally:
            progress.close()
    if summary["best_trial"] is None:
        say(f"no trial completed; see {opened.root / REPORT_JSON}")
        return
    test = summary.get("best_test") or {}
    tested = f" · test accuracy {test['accuracy']:.4f}" if "accuracy" in test else ""
    console.print(
        f"best: trial {summary['best_trial']} · {opened.metric} "
        f"[bold]{summary['best_value']:.4f}[/]{tested} · {escape(str(opened.root / REPORT_JSON))}",
        highlight=False,
        soft_wrap=True,
    )


def _check_trial_processes(nproc: int | None, sweep) -> None:
    from dltrain.errors import UserError

    if nproc is None:
        return
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {nproc}).")
    if sweep.space.folds:
        raise UserError("--nproc does not combine with a space's folds; leave one of them out.")


def lr_find(
    recipe: Path = typer.Argument(..., help="The recipe YAML file.", show_default=False),
    overrides: list[str] = typer.Argument(
        None, help="KEY=VALUE recipe overrides.", show_default=False
    ),
    output: Path = typer.Option(
        Path("."), "--output", "-o", help="Folder for lr_find.png and lr_find.json."
    ),
    steps: int = typer.Option(100, "--steps", min=10, help="Optimizer steps of the ramp."),
    start_lr: float = typer.Option(1e-7, "--start-lr", help="The ramp's first learning rate."),
    end_lr: float = typer.Option(10.0, "--end-lr", help="The ramp's last learning rate."),
) -> None:
    """Find a learning rate: the range test (an exponential lr ramp, stopped when the loss
    diverges) on the recipe's own model, data and optimizer. Leaves no run folder.

    [bold]Examples[/]

      dltrain lr-find recipes/quickstart.yaml

      dltrain lr-find recipes/sms_spam_transformer.yaml --steps 200 --output lr/
    """
    from dltrain.config.loading import load_recipe
    from dltrain.experiments.lr_find import find_lr, write_lr_find

    loaded = load_recipe(recipe, overrides or [])
    console = Console()
    with console.status("lr-find: ramping the learning rate"):
        result = find_lr(loaded, start_lr=start_lr, end_lr=end_lr, steps=steps)
    _, png = write_lr_find(result, output)
    ended = "stopped at divergence" if result.stopped_early else "ramp finished"
    console.print(
        f"lr-find: {len(result.lrs)} steps from {result.lrs[0]:.1e} to {result.lrs[-1]:.1e} "
        f"({ended}) · suggested lr [bold]{result.suggested_lr:.3g}[/] · {escape(str(png))}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"use it: dltrain fit {escape(str(recipe))} optimizer.lr={result.suggested_lr:.3g}",
        highlight=False,
        soft_wrap=True,
    )
