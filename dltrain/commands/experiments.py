"""Many runs: `dltrain compare` (runs side by side), `dltrain lr-find` (a learning rate to start
from) and `dltrain sweep` (a hyperparameter search on Optuna). Torch is imported only inside the
commands, so `--help` stays fast."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

WIDE_TABLE_KEYS = 6  # more differing keys than this: one row per key instead of per run


def compare(
    runs: list[Path] = typer.Argument(
        ..., help="Two or more run folders (runs/NAME).", show_default=False
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="The PNG of the curves (default: compare.png here)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts (and the PNG)."),
) -> None:
    """Compare runs: their curves on shared axes in one PNG, the recipe keys that differ, and
    each run's headline test figure.

    [bold]Examples[/]

      dltrain compare runs/quickstart runs/quickstart-2

      dltrain compare runs/sweep/trials/* --output trials.png --json
    """
    from dltrain.compare import (
        DEFAULT_OUTPUT,
        compare_json,
        compare_table,
        differing_keys,
        keys_table,
        load_runs,
        plot_compare,
    )

    loaded = load_runs(list(runs))
    written = plot_compare(loaded, output or DEFAULT_OUTPUT)
    if as_json:
        print(json.dumps({**compare_json(loaded), "plot": str(written)}, indent=2))
        return
    console = Console()
    if len(differing_keys(loaded)) > WIDE_TABLE_KEYS:
        console.print(keys_table(loaded))
        console.print(compare_table(loaded, key_columns=False))
    else:
        console.print(compare_table(loaded))
    console.print(f"curves: {escape(str(written))}", highlight=False, soft_wrap=True)
