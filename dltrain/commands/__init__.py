"""The command-line commands, one file per group (as torchtune has one per subcommand):
training (fit: one run, --nproc, --folds, --resume), use (predict, export, explain) and
inspection (eval, devices, check, list, runs). cli.py registers them behind one error boundary.

Nothing at module level imports torch, so `dltrain --help` starts fast; each command imports
what it needs when it runs.
"""

from enum import Enum

import typer
from rich.console import Console
from rich.markup import escape


def choices(name: str, *values: str) -> type[Enum]:
    """A string Enum of `values`: typer shows and checks them as an argument's choices."""
    return Enum(name, {value: value for value in values}, type=str)


def imports_option():
    """--imports, for every command that rebuilds a model from a checkpoint."""
    return typer.Option(
        None,
        "--imports",
        metavar="MODULE|FILE.py",
        help="The user's own component modules the model needs (a .py file or a dotted "
        "module; repeatable). Never taken from the checkpoint: a checkpoint runs no code.",
    )


def threads_option(default: str):
    """--threads, for the commands that run a model on the CPU without a recipe of their own."""
    return typer.Option(
        None,
        "--threads",
        metavar="auto|N",
        help=f"CPU threads: auto times a few batches at 1 and at every usable core and keeps the "
        f"faster; N uses N (default: {default}).",
        show_default=False,
    )


def force_option():
    """--force, for every command with an --output: runs/outputs.py refuses the rest."""
    return typer.Option(
        False, "--force", help="Replace --output even if it is a checkpoint or a run's own file."
    )


def exit_stopped(console: Console, stopped: Exception, then: str = "") -> None:
    """A command stopped by a signal (dltrain.system.interrupts.Interrupted): say so truthfully, and
    what to do next (`then`, a line), then exit with the signal's code (130/143)."""
    from dltrain.system.interrupts import exit_at_once_on_signals

    exit_at_once_on_signals()  # the command is ending: another signal must not kill it
    console.print(
        f"[yellow]{escape(str(stopped))}[/]" + (f"\n{escape(then)}" if then else ""),
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(stopped.exit_code) from None
