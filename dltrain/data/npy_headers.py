"""NumPy files checked by their headers before any array is allocated: an .npy header (alone,
or each member of an .npz) declares a shape and dtype, and numpy allocates that much before it
reads a byte of data. A header that declares more bytes than its file holds is refused, so a
385-byte file cannot ask for terabytes."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np


class DamagedArray(ValueError):
    """A header that its file cannot back (the caller turns it into its own UserError)."""


def check_npy_file(path: Path) -> None:
    """Raise DamagedArray when the .npy file at `path` declares more data than it holds."""
    size = Path(path).stat().st_size
    with open(path, "rb") as stream:
        _check_header(stream, size, Path(path).name)


def check_npz_file(path: Path) -> None:
    """The same for every member of an .npz archive (its size as the archive declares it)."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.filename.endswith(".npy"):
                with archive.open(info) as stream:
                    _check_header(stream, info.file_size, info.filename)


def _check_header(stream: BinaryIO, size: int, name: str) -> None:
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    try:
        reader = readers.get(np.lib.format.read_magic(stream))
        if reader is None:
            return  # another version: np.load reads (or refuses) it itself
        shape, _, dtype = reader(stream)
    except (ValueError, OSError, EOFError, SyntaxError):
        return  # not an array header numpy reads: np.load says so itself
    if dtype.hasobject:
        return  # refused by allow_pickle=False, with numpy's own message
    declared = math.prod(shape) * dtype.itemsize
    available = size - stream.tell()
    if math.prod(d for d in shape if d) * dtype.itemsize > np.iinfo(np.intp).max:
        # numpy refuses such a shape even when a 0 makes it empty: no writer makes one
        raise DamagedArray(
            f"{name} declares a {'×'.join(map(str, shape))} {dtype} array, larger than any "
            "array can be"
        )
    if declared > available:
        raise DamagedArray(
            f"{name} declares a {'×'.join(map(str, shape)) or 'scalar'} {dtype} array "
            f"({declared:,} bytes) but holds {max(available, 0):,} bytes of data"
        )
