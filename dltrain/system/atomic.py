"""Crash-safe file writes: temp file in the same folder, flush + fsync, then rename.

A crash or kill in the middle leaves the previous file intact, because rename within one
file system replaces the old file in a single step.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
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
def atomic_file(path: Path, size_hint: int | None = None) -> Iterator[IO[bytes]]:
    """Open a temp file beside `path` for writing; it replaces `path` only on success.

    `size_hint` (bytes) lets a full disk's message say how much space the file needs.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_failure(path, exc, size_hint) from None
    f = os.fdopen(fd, "wb")
    try:
        os.chmod(tmp, FILE_MODE)
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        written = _position(f)
        f.close()
        _remove_quietly(tmp)
        # torch.save reports a failed write of its own as a RuntimeError ("inline_container")
        if isinstance(exc, RuntimeError) and not _is_torch_write_failure(exc):
            raise
        raise write_failure(path, exc, max(size_hint or 0, written)) from None
    except BaseException:
        f.close()
        _remove_quietly(tmp)
        raise


def write_failure(path: Path, exc: BaseException, needed: int | None = None) -> RunFailure:
    """One message for a write that failed: a full disk says how much space the file needs
    and how much is free; anything else names the reason."""
    free = _free_bytes(path.parent)
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        isinstance(exc, RuntimeError) and free is not None and free < max(needed or 0, 2**20)
    )
    if full:
        size = f"it needs about {_size(needed)}; " if needed else ""
        return RunFailure(
            f"cannot write {path}: {os.strerror(errno.ENOSPC)} — the disk is full ({size}"
            f"{_size(free or 0)} free there). Free some space and run again; the previous "
            "file is intact."
        )
    reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    return RunFailure(
        f"cannot write {path}: {reason}. Free space or fix permissions; the previous file is "
        "intact."
    )


def _is_torch_write_failure(exc: RuntimeError) -> bool:
    text = str(exc)
    return "inline_container" in text or "write failed" in text or "PytorchStreamWriter" in text


def _position(f: IO[bytes]) -> int:
    try:
        return f.tell()
    except (OSError, ValueError):
        return 0


def _free_bytes(folder: Path) -> int | None:
    for place in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(place).free
    return None


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def atomic_write(
    path: Path, write: Callable[[IO[bytes]], None], size_hint: int | None = None
) -> None:
    """Write a file atomically with a callback that writes into the open binary file."""
    with atomic_file(path, size_hint) as f:
        write(f)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
