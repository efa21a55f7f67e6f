"""Several files of a run folder replaced together: all of them, or none, whenever the process
dies (SIGKILL, power loss, a full disk).

Each new file is first written whole beside its target under a staged name (and fsynced).
Then a journal listing the renames is written atomically, the renames follow, and the journal
is removed. `recover` — run before a run folder is used again — finishes a commit whose journal
exists (every file it names was complete before the journal was written) or, without a
journal, deletes staged files that were never committed, and the temp files of atomic writes
that a kill left behind. After any crash and a recovery, the folder holds the old set of files
or the new one, never a mix: the write-ahead journal of databases, for a handful of files.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from dltrain.system.atomic import atomic_write_text

JOURNAL = ".commit.json"
STAGED = ".staged"  # suffix of a staged file: .{target name}.{id}.staged
TEMP = ".tmp"  # suffix of atomic_write's temp files


class Transaction:
    """Files staged beside their targets, made visible together by `commit`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.renames: list[tuple[Path, Path]] = []  # (staged, target)
        self.removals: list[Path] = []

    def staged(self, target: Path) -> Path:
        """Where to write `target`'s new content (whole and fsynced, e.g. by atomic_write)."""
        target = Path(target)
        path = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{STAGED}")
        self.renames.append((path, target))
        return path

    def remove(self, target: Path) -> None:
        """Delete `target` with the commit (a plot that could not be drawn this time)."""
        self.removals.append(Path(target))

    def commit(self) -> None:
        """Make every staged file visible; a crash from here on is completed by `recover`."""
        written = [(staged, target) for staged, target in self.renames if staged.exists()]
        for folder in {staged.parent for staged, _ in written}:
            _fsync_folder(folder)  # the staged files' names are durable before the journal
        steps = [[str(s), str(t)] for s, t in written] + [[None, str(t)] for t in self.removals]
        journal = self.folder / JOURNAL
        atomic_write_text(journal, json.dumps(steps) + "\n")
        _apply(steps)
        journal.unlink()

    def abort(self) -> None:
        """Delete what was staged; the targets keep their old content."""
        for staged, _ in self.renames:
            with contextlib.suppress(OSError):
                staged.unlink()


@contextlib.contextmanager
def transaction(folder: Path) -> Iterator[Transaction]:
    """Commit the staged files when the block ends, or drop them if it raises."""
    tx = Transaction(folder)
    try:
        yield tx
    except BaseException:
        tx.abort()
        raise
    tx.commit()


def recover(folder: Path) -> None:
    """Finish an interrupted commit in `folder`, or drop what was staged but not committed;
    remove the temp files of interrupted atomic writes (here and in checkpoints/)."""
    folder = Path(folder)
    journal = folder / JOURNAL
    if journal.is_file():
        try:
            steps = json.loads(journal.read_text(encoding="utf-8"))
        except ValueError:
            steps = []  # the journal's own write was cut: nothing was renamed yet
        _apply(steps)
        journal.unlink()
    for place in (folder, folder / "checkpoints"):
        if not place.is_dir():
            continue
        for leftover in place.iterdir():
            name = leftover.name
            if name.startswith(".") and name.endswith((STAGED, TEMP)) and leftover.is_file():
                with contextlib.suppress(OSError):
                    leftover.unlink()


def _apply(steps: list) -> None:
    """Do a journal's renames and removals; each is idempotent, so a commit can be redone."""
    for staged, target in steps:
        if staged is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(target)
        elif os.path.exists(staged):
            os.replace(staged, target)
    for folder in {os.path.dirname(target) for _, target in steps}:
        _fsync_folder(Path(folder))


def _fsync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
