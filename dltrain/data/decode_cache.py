"""A cache of decoded image folders: the next run of a 50,000-image folder starts in seconds.

An entry is the uint8 N×C×H×W pixels and labels of one split, as `image_folder` decoded them,
keyed by everything that decides them: each file's path, size and modification time, its label,
the image size and the colour mode. Change, add or remove a file and the key changes: a stale
entry is never read (and old entries are simply left behind; delete the folder to reclaim the
space). Entries live in $DLTRAIN_CACHE, else $XDG_CACHE_HOME/dltrain, else ~/.cache/dltrain
(in its images/ folder); DLTRAIN_CACHE=off turns the cache off.

The cache only ever saves time: an entry that cannot be read is decoded again, and one that
cannot be written (a read-only home, a full disk) is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dltrain.system.atomic import atomic_write, atomic_write_text

FORMAT = "1"  # part of every key: a new layout never reads an old entry
CACHE_VARIABLE = "DLTRAIN_CACHE"


def cache_folder() -> Path | None:
    """Where entries live, or None when DLTRAIN_CACHE=off."""
    chosen = os.environ.get(CACHE_VARIABLE)
    if chosen and chosen.lower() in ("off", "0", "no", "false"):
        return None
    if chosen:
        return Path(chosen).expanduser() / "images"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dltrain" / "images"


def file_stamps(files: list[Path]) -> dict[Path, str]:
    """Each file's absolute path, size and modification time: what its key depends on (one
    stat per file; no file is read)."""
    stamps = {}
    for file in files:
        stat = os.stat(file)
        stamps[file] = f"{os.path.abspath(file)}|{stat.st_size}|{stat.st_mtime_ns}"
    return stamps


def entry_key(
    stamps: dict[Path, str],
    files: list[Path],
    labels: list[int],
    size: tuple[int, int],
    grayscale: bool,
) -> str:
    """A digest of everything the decoded pixels of `files` depend on."""
    digest = hashlib.sha256(f"{FORMAT}|{size}|{grayscale}|{len(files)}".encode())
    for file, label in zip(files, labels, strict=True):
        digest.update(f"{stamps[file]}|{label}\n".encode())
    return digest.hexdigest()[:32]


def load(key: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """(pixels, labels, the files skipped as undecodable) of an entry, or None."""
    folder = cache_folder()
    path = folder / f"{key}.npz" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as entry:
            return entry["x"], entry["y"], [str(s) for s in entry["skipped"]]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None  # damaged: decode again (and overwrite it)


def save(key: str, x: np.ndarray, y: np.ndarray, skipped: list[str]) -> None:
    """Write an entry atomically; a failure only costs the next run its head start."""
    folder = cache_folder()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(
            folder / f"{key}.npz",
            lambda f: np.savez(f, x=x, y=y, skipped=np.asarray(skipped, dtype=str)),
            size_hint=x.nbytes,
        )
    except Exception as exc:  # noqa: BLE001 (any failure: the run goes on without the cache)
        warnings.warn(
            f"could not cache the decoded images in {folder} ({exc}); the next run decodes "
            f"them again. Set {CACHE_VARIABLE} to a writable folder, or {CACHE_VARIABLE}=off.",
            stacklevel=2,
        )


def remembered_size(key: str, measure: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """The image size `image_size: auto` chose for these files, measured once (reading every
    header of a large folder takes seconds) and remembered beside the entries."""
    folder = cache_folder()
    path = folder / f"{key}.size" if folder else None
    if path is not None and path.is_file():
        try:
            height, width = (int(v) for v in path.read_text().split())
            return height, width
        except (OSError, ValueError):
            pass  # damaged: measure again
    size = measure()
    if path is not None:
        with contextlib.suppress(Exception):  # only a head start is lost
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, f"{size[0]} {size[1]}\n")
    return size
