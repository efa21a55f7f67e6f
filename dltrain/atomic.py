"""Crash-safe file writes: temp file in the same folder, flush + fsync, then rename.

A crash or kill in the middle leaves the previous file intact, because rename within one
file system replaces the old file in a single step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from dltrain.errors import RunFailure

# mkstemp creates files readable by their owner only; give ours the mode open() would (0o666 less
# the umask), so reports and checkpoints can be shared like any other file. Read once, at import.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Open a temp file beside `path` for writing; it replaces `path` only on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise RunFailure(f"cannot write {path}: {exc.strerror or exc}. Check the folder.") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, FILE_MODE)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise RunFailure(
            f"cannot write {path}: {exc.strerror or exc}. Free space or fix permissions; "
            "the previous file is intact."
        ) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file atomically with a callback that writes into the open binary file."""
    with atomic_file(path) as f:
        write(f)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
