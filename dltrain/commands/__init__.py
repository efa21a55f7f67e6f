"""The command-line commands, one file per group (as torchtune has one per subcommand):
training (fit: one run, --nproc, --folds, --resume), use (predict, export, explain) and
inspection (eval, devices, check, list, runs). cli.py registers them behind one error boundary.

Nothing at module level imports torch, so `dltrain --help` starts fast; each command imports
what it needs when it runs.
"""

from enum import Enum


def choices(name: str, *values: str) -> type[Enum]:
    """A string Enum of `values`: typer shows and checks them as an argument's choices."""
    return Enum(name, {value: value for value in values}, type=str)
