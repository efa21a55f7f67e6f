"""One writer per run folder: an OS file lock held while a command writes there.

The lock is `{output}/.{name}.lock` (beside the run folder, so that replacing the folder never
moves it), taken with filelock: the operating system releases it when its process ends, however
it ends. Beside it, `.{name}.lock.json` says who holds it (pid, host, start time, command), so a
refused second writer can name the holder; a note left by a process that died is taken over with
a warning. Holding is re-entrant within a process: `dltrain fit` takes the lock before its
checks and the training loop takes it again for callers that did not.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import filelock

from dltrain.errors import UserError


class RunInUse(UserError):
    """Another process holds the run folder's lock."""


_held: dict[Path, int] = {}  # run folders this process holds, and how deeply


def lock_path(root: Path) -> Path:
    """The lock file of a run folder."""
    root = Path(root).absolute()
    return root.parent / f".{root.name}.lock"


@contextlib.contextmanager
def holding(root: Path, doing: str) -> Iterator[None]:
    """Hold the run folder's lock while the block runs; another holder is a UserError (exit 2)
    naming it. `doing` says what this process does there (for the other's message)."""
    root = Path(root).absolute()
    if root in _held:
        _held[root] += 1
        try:
            yield
        finally:
            _held[root] -= 1
        return
    lock = filelock.FileLock(lock_path(root), timeout=0)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except filelock.Timeout:
        raise RunInUse(
            f"{root} is in use: {_describe(_holder(root))}. One process writes a run folder at "
            "a time: wait for it to end, or use another name (name=...)."
        ) from None
    except OSError as exc:
        from dltrain.runs.folder import RunFolder

        RunFolder(root).ensure_writable()  # says why the folder cannot be written (exit 2)
        raise UserError(
            f"cannot lock the run folder {root}: {exc.strerror or exc}. Set output=... to a "
            "folder you can write to."
        ) from None
    try:
        previous = _holder(root)
        if previous:  # its OS lock is gone with its process, but the note stayed
            warnings.warn(
                f"taking over {root} from {_describe(previous)}, which ended without releasing "
                "it; its last saved state is kept",
                stacklevel=3,
            )
        _write_holder(root, doing)
        _held[root] = 1
        yield
    finally:
        _held.pop(root, None)
        with contextlib.suppress(OSError):
            _note_path(root).unlink()
        lock.release()


def in_use(root: Path) -> bool:
    """Whether a process (this one or another) holds the run folder's lock now."""
    root = Path(root).absolute()
    if root in _held:
        return True
    if not lock_path(root).exists():
        return False
    lock = filelock.FileLock(lock_path(root), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        return True
    except OSError:
        return False  # cannot even lock it: the run's own checks say why
    lock.release()
    return False


def holding_enclosing_run(path: Path, doing: str) -> contextlib.AbstractContextManager:
    """Hold the lock of the run folder that `path` lies in (none: nothing to hold)."""
    run = _enclosing_run(path)
    return holding(run, doing) if run is not None else contextlib.nullcontext()


def holding_output(folder: Path, doing: str) -> contextlib.AbstractContextManager:
    """Hold the lock of the run folder that the output `folder` lies in, else of `folder`
    itself: one process writes an output folder at a time (a second `eval --output SAME` is
    refused, never left to race the first's recovery of its staged files)."""
    return holding(_enclosing_run(folder) or Path(folder).absolute(), doing)


def _enclosing_run(path: Path) -> Path | None:
    from dltrain.runs.folder import RunFolder

    path = Path(path).absolute()
    return next((f for f in (path, *path.parents) if RunFolder(f).holds_a_run()), None)


def _note_path(root: Path) -> Path:
    return lock_path(root).with_suffix(".lock.json")


def _write_holder(root: Path, doing: str) -> None:
    note = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "doing": doing,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500],
    }
    # advisory (read only for messages, which tolerate a cut note): no fsync, no failure
    with contextlib.suppress(OSError):
        _note_path(root).write_text(json.dumps(note) + "\n", encoding="utf-8")


def _holder(root: Path) -> dict | None:
    try:
        note = json.loads(_note_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def _describe(note: dict | None) -> str:
    if not note:
        return "another process (it left no note of who it is)"
    return (
        f"pid {note.get('pid')} on {note.get('host')}, {note.get('doing', 'writing')} since "
        f"{note.get('started')} ({note.get('command', '')})"
    )
