"""Looking at things without training: `eval`, `devices`, `check`, `list` and `runs`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from dltrain.commands import choices, imports_option, threads_option
from dltrain.commands.training import OVERRIDES_HELP

Split = choices("Split", "test", "val", "train")
# dltrain.config.registry.REGISTRIES' kinds (not imported: --help stays quick)
Kind = choices("Kind", "models", "datasets", "losses", "optimizers", "schedulers", "augmentations")


def evaluate(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint written by dltrain fit.", show_default=False
    ),
    overrides: list[str] = typer.Argument(
        None, help="Recipe overrides, e.g. data.root=/elsewhere.", show_default=False
    ),
    split: Split = typer.Option(
        None, "--split", help="Split to evaluate (default: test; else val; else train)."
    ),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="Folder for report.json/.md (default: eval-SPLIT beside the checkpoint).",
    ),
    device: str = typer.Option(None, "--device", help="Device to use (default: the recipe's)."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
    imports: list[str] = imports_option(),
    force: bool = typer.Option(
        False, "--force", help="Write the report even into a folder that holds a run."
    ),
    threads: str = threads_option("the recipe's train.threads"),
) -> None:
    """Evaluate a checkpoint: everything it needs (recipe, classes, normalisation) is inside it.

    [bold]Examples[/]

      dltrain eval runs/quickstart/checkpoints/best.pt

      dltrain eval best.pt --split val --output reports/ --json
    """
    from dltrain.reporting.progress import Progress
    from dltrain.system.threads import parse_threads
    from dltrain.training.evaluate import evaluate_checkpoint

    console = Console(stderr=True) if as_json else Console()
    report = evaluate_checkpoint(
        checkpoint,
        output,
        Progress(console, quiet=as_json),
        split=split.value if split else None,
        device=device,
        overrides=overrides or [],
        imports=imports or [],
        force=force,
        threads=parse_threads(threads, "--threads") if threads else None,
    )
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        folder = output or checkpoint.parent / f"eval-{report['split']}"
        console.print(f"report written to {folder / 'report.json'}", markup=False)


def devices(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """List every device torch can use here, and which one `device: auto` picks.

    [bold]Example[/]

      dltrain devices --json
    """
    from dltrain.reporting.console_tables import devices_table
    from dltrain.system.devices import describe_devices

    info = describe_devices()
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    console = Console()
    console.print(devices_table(info))
    for note in info["notes"]:
        console.print(f"[dim]· {escape(note)}[/]", highlight=False)
    console.print(f"device: auto → [bold]{info['auto']}[/]", highlight=False)


def check(
    recipe: Path = typer.Argument(..., help="The recipe YAML file.", show_default=False),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    data: bool = typer.Option(
        False,
        "--data",
        help="Also read the data (trains nothing): the splits' sizes, the task, and for a "
        "table what each column became.",
    ),
) -> None:
    """Validate a recipe and print it fully resolved (all defaults filled in). Reads no data
    unless --data.

    [bold]Examples[/]

      dltrain check recipes/quickstart.yaml optimizer.lr=0.01

      dltrain check my_table.yaml --data
    """
    from rich.syntax import Syntax

    from dltrain.config.loading import load_recipe
    from dltrain.config.schema import to_yaml
    from dltrain.config.task_fit import planned_loss
    from dltrain.data.prepare import split_sources

    console = Console()
    resolved = load_recipe(recipe, overrides or [])
    text = to_yaml(resolved)
    if console.is_terminal:
        console.print(Syntax(text, "yaml", background_color="default", word_wrap=True))
    else:  # piped: the exact text, not cropped to a console width, so it stays valid YAML
        sys.stdout.write(text)
    said = Console(stderr=True)
    said.print(split_sources(resolved.data), highlight=False, markup=False, soft_wrap=True)
    loss = planned_loss(resolved.loss, resolved.data.task, resolved.data.name)
    said.print(loss, highlight=False, markup=False, soft_wrap=True)
    if resolved.data.batch_size == "auto":
        from dltrain.training.build import auto_batch_plan

        said.print(auto_batch_plan(), highlight=False, markup=False, soft_wrap=True)
    if data:
        _show_data(resolved, said)
    said.print(f"[green]✓[/] {recipe} is valid", highlight=False)


def _show_data(recipe, console: Console) -> None:
    """check --data: what the data is once read, as fit would read it (nothing trained)."""
    from dltrain.config.task_fit import loss_label
    from dltrain.data.prepare import prepare_data
    from dltrain.data.repeated_rows import repeated_rows_note
    from dltrain.reporting.console_tables import columns_table
    from dltrain.training.build import with_batch_size_resolved

    prepared = prepare_data(recipe.data, recipe.seed, pretrained_on=recipe.model)
    sizes = ", ".join(f"{name} {len(split):,}" for name, split in prepared.splits.items())
    learned = (
        f"{prepared.num_classes} classes" if prepared.task == "classification" else prepared.task
    )
    batch = ""
    if recipe.data.batch_size == "auto":
        rows = len(prepared.splits.get("train", ()))
        size = with_batch_size_resolved(recipe, rows, processes=1).data.batch_size
        batch = f" · batch auto → {size} (in one process)"
    console.print(
        f"data: {sizes} · {learned} · input {tuple(prepared.input_shape)} · loss "
        f"{loss_label(recipe.loss, prepared.task)}{batch}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if "table_columns" in prepared.extra:
        console.print(columns_table(prepared.extra["table_columns"]))
    repeated = repeated_rows_note(prepared.extra.get("repeated_rows", {}), always=True)
    if repeated:
        console.print(repeated, highlight=False, markup=False, soft_wrap=True)


def list_components(
    kind: Kind = typer.Argument(None, help="What to list (default: everything)."),
    pattern: str = typer.Argument(
        "*",
        help="Only names matching this glob; 'timm:convnext*' or 'torchvision:resnet*' lists a "
        "family's models.",
        show_default=False,
    ),
) -> None:
    """List registered components with one-line descriptions and accepted arguments.

    [bold]Examples[/]

      dltrain list models

      dltrain list models 'timm:convnext*'

      dltrain list optimizers
    """
    from dltrain.config.registry import REGISTRIES
    from dltrain.reporting.console_tables import registry_table

    console = Console()
    for name in [kind.value] if kind else list(REGISTRIES):
        console.print(registry_table(REGISTRIES[name], pattern))


def runs(
    folder: Path = typer.Argument(
        Path("runs"), help="Folder to search, at any depth (default: runs).", show_default=False
    ),
    sort: str = typer.Option(
        "test_accuracy",
        "--sort",
        metavar="KEY",
        help="name, model, dataset, epochs, best_val_loss, best_val_accuracy, test_accuracy, "
        "f1_macro or modified (names and best_val_loss ascending, the rest largest first).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """List the runs under a folder: model, dataset, epochs, best validation and test metrics.

    A run is any folder with recipe.yaml and metrics.csv or report.json (fold-k folders of a
    cross-validation included). Missing values show as —.

    [bold]Examples[/]

      dltrain runs

      dltrain runs experiments/ --sort best_val_loss --json
    """
    from dltrain.reporting.console_tables import runs_table
    from dltrain.runs.listing import list_runs

    console = Console()
    if not console.is_terminal:  # piped: whole rows (the table is as wide as it needs), not 80
        console = Console(width=240)
    rows = list_runs(folder, sort)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif not rows:
        console.print(
            f"no runs in {escape(str(folder))} (a run folder holds recipe.yaml and "
            "metrics.csv or report.json). Train one with: dltrain fit RECIPE",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(runs_table(rows, str(folder)))
