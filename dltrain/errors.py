"""The two kinds of failure dltrain reports, each with its exit code.

Every message a user sees for a failure says what is wrong, where, and how to fix it. The CLI
catches these and prints the message alone, without a traceback (unless DLTRAIN_DEBUG=1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DltrainError(Exception):
    """A failure with a message meant for the user."""

    exit_code = 1
    # True when every process of a distributed run fails alike (agreed decisions): rank 0 alone
    # then prints it
    same_on_every_process = False


class UserError(DltrainError):
    """The user's input is wrong: recipe, override, CLI argument, data file, checkpoint."""

    exit_code = 2


class RunFailure(DltrainError):
    """Something failed while running: non-finite loss, out of memory, I/O error."""

    exit_code = 1


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the nearest choice, or '' when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[m] for m in difflib.get_close_matches(word.lower(), lowered, n=1)]
    return f" Did you mean '{close[0]}'?" if close else ""


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """An exception's message cut to its first line, for a one-line message (its type's name
    when it says nothing; `with_type`: 'ValueError: …')."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if with_type else text.splitlines()[0]


class RecipeError(UserError):
    """A problem at one key path of a recipe; config/loading.py adds the file and line."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)
