"""The `dltrain` command line: the app, the error boundary, and the registration of commands.

The commands live in dltrain/commands/, one file per group; each is registered here behind
`user_facing_errors`, so every failure ends as one message and an exit code. Nothing at module
level imports torch, so `dltrain --help` starts fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from dltrain.commands import experiments, inspection, training, use
from dltrain.errors import DltrainError
from dltrain.system.interrupts import STARTUP, exit_at_once_on_signals

app = typer.Typer(
    name="dltrain",
    help="Train and evaluate PyTorch models from YAML recipes.\n\n"
    "Start with: [bold]dltrain fit recipes/quickstart.yaml[/]",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(asked: bool) -> None:
    if asked:
        from dltrain.system.devices import software_versions  # imports torch: only when asked

        typer.echo(software_versions())
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the versions of dltrain, torch (and its CUDA), torch_xla and Python.",
    ),
) -> None:
    pass


@contextlib.contextmanager
def user_facing_errors() -> Iterator[None]:
    """Turn failures into one message and an exit code; tracebacks only with DLTRAIN_DEBUG=1.

    Messages go to stderr, so `dltrain check r.yaml > resolved.yaml` or `eval --json > r.json`
    never write an error into the file meant for data.
    """
    debug = os.environ.get("DLTRAIN_DEBUG") == "1"
    console = Console(stderr=True)
    # Under torchrun, rank 0 reports the errors every process meets alike; the others name
    # themselves, since their error may be theirs alone (a missing GPU, out of memory).
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    who = "" if rank == "0" else f"rank {rank}: "
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards
            # A skipped image file and the like: one 'warning:' line, not Python's file:line dump.
            warnings.showwarning = lambda message, *_args, **_kwargs: console.print(
                f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True
            )
            yield
    except typer.Exit:  # a command's own exit code (e.g. 130 after an interrupt) passes through
        raise
    except DltrainError as exc:
        if debug:
            raise
        if not (who and exc.same_on_every_process):
            console.print(
                f"[bold red]{who}error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as stop:  # a second signal (StopNow), or one outside dltrain's
        exit_at_once_on_signals()
        console.print(  # handlers: true whenever it comes, since every write is atomic
            f"[yellow]{escape(str(stop) or 'interrupted')}[/] (every file dltrain wrote is "
            "whole: the last complete save is on disk)",
            highlight=False,
        )
        raise typer.Exit(getattr(stop, "exit_code", 130)) from None
    except Exception as exc:
        if debug:
            raise
        console.print(
            f"[bold red]{who}internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
            "Re-run with DLTRAIN_DEBUG=1 to see the traceback, and please report it.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _behind_the_boundary(command: Callable[..., None]) -> Callable[..., None]:
    """The command, run inside user_facing_errors (typer reads the wrapped signature)."""

    @functools.wraps(command)
    def run(*args, **kwargs) -> None:
        with user_facing_errors():
            STARTUP.check(None, "while starting")  # a Ctrl-C while Python was importing
            STARTUP.end()  # the default handlers again; `fit` installs its own at once
            command(*args, **kwargs)

    return run


COMMANDS = {
    "fit": training.fit,
    "eval": inspection.evaluate,
    "devices": inspection.devices,
    "check": inspection.check,
    "list": inspection.list_components,
    "runs": inspection.runs,
    "predict": use.predict,
    "export": use.export,
    "explain": use.explain,
    "compare": experiments.compare,
    "sweep": experiments.sweep,
    "lr-find": experiments.lr_find,
}
for name, command in COMMANDS.items():
    app.command(name=name)(_behind_the_boundary(command))


def main() -> None:
    """Entry point for `python -m dltrain`."""
    app(prog_name="dltrain")


if __name__ == "__main__":
    main()
