"""The command-line commands, one file per group (as torchtune has one per subcommand):
training (fit: one run, --nproc, --folds, --resume), use (predict, export, explain) and
inspection (eval, devices, check, list, runs). cli.py registers them behind one error boundary.

Nothing at module level imports torch, so `dltrain --help` starts fast; each command imports
what it needs when it runs.
"""

from enum import Enum

import typer


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
