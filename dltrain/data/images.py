"""`image_folder`: images sorted into one folder per class, decoded with PIL.

Also the image file extensions and `decode_image`, which `dltrain predict` uses so that images
given for prediction are decoded exactly as the training images were.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from dltrain.config.registry import DATASETS
from dltrain.data import decode_cache
from dltrain.data.base import ArraySplit, DatasetSplits
from dltrain.data.paths import InputPath, existing_path
from dltrain.data.splits import stratified_split
from dltrain.errors import UserError

# An image folder whose decoded uint8 pixels fit in this many bytes is decoded once up front.
RESIDENT_LIMIT_BYTES = 256 * 1024**2
BAR_FROM_IMAGES = 2000  # decoding fewer takes about a second: no bar
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})

_LAYOUT_HELP = (
    "Expected one folder per class: <path>/<class>/<image>, or <path>/train/<class>/<image> "
    "with optional <path>/val/<class>/ and <path>/test/<class>/ (images: "
    + ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
    + ")."
)
# What PIL raises for files it cannot decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@DATASETS.register(tasks=("classification",))
def image_folder(
    path: InputPath,
    image_size: int | tuple[int, int] | Literal["auto"] = "auto",
    grayscale: bool = False,
    test_split: Annotated[float, Field(ge=0, lt=1)] = 0.2,
    on_bad_file: Literal["skip", "error"] = "skip",
    seed: int = 0,
) -> DatasetSplits:
    """Images sorted into one folder per class (path/<class>/ or path/train|val|test/<class>/).

    Images are decoded with PIL as RGB (or L with `grayscale`) and resized to `image_size`
    (an int for square, or [height, width]); `auto` keeps their own size when all share it, else
    takes the most common one and says so. Without a train/ folder, a stratified test split of
    `test_split` is carved with the run's seed (0 carves none). `on_bad_file` skips undecodable
    files with a warning, or stops with an error.

    A folder whose decoded pixels fit in RESIDENT_LIMIT_BYTES (256 MiB as uint8) is decoded
    once, in parallel, into ArraySplits (the fast resident-tensor path: no per-epoch decoding),
    and the decoded arrays are cached (decode_cache.py), so the next run starts in seconds;
    larger folders become lazy ImageFileSplits decoded per sample.
    """
    root = existing_path(path, "data.path", want_dir=True)
    classes, found = _find_images(root, test_split, seed)
    everything = [f for files, _ in found.values() for f in files]
    stamps = decode_cache.file_stamps(everything)
    size = _chosen_size(image_size, stamps, everything, grayscale)
    channels = 1 if grayscale else 3
    total = len(everything) * channels * size[0] * size[1]
    lazy = total > RESIDENT_LIMIT_BYTES
    splits = {
        name: ImageFileSplit(files, labels, size, grayscale, on_bad_file)
        if lazy
        else _decoded(stamps, files, labels, size, grayscale, on_bad_file)
        for name, (files, labels) in found.items()
    }
    return DatasetSplits(kind="image", classes=classes, **splits)


def _chosen_size(
    image_size: int | tuple[int, int] | list[int] | str,
    stamps: dict[Path, str],
    files: list[Path],
    grayscale: bool,
) -> tuple[int, int]:
    if image_size != "auto":
        return _image_size(image_size)
    key = decode_cache.entry_key(stamps, files, [0] * len(files), (0, 0), grayscale)
    return decode_cache.remembered_size(key, lambda: _native_size(files))


def _native_size(files: list[Path]) -> tuple[int, int]:
    """`image_size: auto`: the images' own (height, width) when they all share it, else the
    most common one, said in a warning (read from the headers only)."""
    with ThreadPoolExecutor(_workers()) as pool:
        sizes = Counter(s for s in pool.map(_header_size, files) if s is not None)
    if not sizes:
        return (64, 64)  # nothing decodable: the files are reported when decoded
    (size, count), *others = sizes.most_common()
    if others:
        also = ", ".join(f"{h}×{w} ({n:,})" for (h, w), n in others[:3])
        warnings.warn(
            f"data.image_size: auto found {len(sizes)} image sizes; using the most common, "
            f"{size[0]}×{size[1]} ({count:,} of {sum(sizes.values()):,} images; also {also}"
            f"{', …' if len(others) > 3 else ''}). Set data.image_size to choose another.",
            stacklevel=3,
        )
    return size


def _header_size(file: Path) -> tuple[int, int] | None:
    """(height, width) from the image's header, or None if PIL cannot read it."""
    try:
        with Image.open(file) as image:
            return image.height, image.width
    except _DECODE_ERRORS:
        return None


def _image_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) from an int or a pair, each at least 1."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1:
        raise UserError(
            f"data.image_size: must be a positive int or [height, width] of "
            f"positive ints (got {image_size!r})."
        )
    return int(size[0]), int(size[1])


def _find_images(
    root: Path, test_split: float, seed: int
) -> tuple[list[str], dict[str, tuple[list[Path], list[int]]]]:
    """Class names and each split's (files, labels), in class then path order."""
    if not (root / "train").is_dir():
        if (root / "val").is_dir() or (root / "test").is_dir():
            raise UserError(
                f"data.path: '{root}' has val/ or test/ but no train/ folder. " + _LAYOUT_HELP
            )
        classes = _class_folders(root)
        files, labels = _list_images(root, classes, required=True)
        kept, carved = stratified_split(np.asarray(labels), test_split, seed)
        found = {"train": _pick(files, labels, kept)}
        if len(carved):
            found["test"] = _pick(files, labels, carved)
        return classes, found
    classes = _class_folders(root / "train")
    found = {"train": _list_images(root / "train", classes, required=True)}
    for name in ("val", "test"):
        folder = root / name
        if folder.is_dir():
            unknown = sorted(set(_class_folders(folder, allow_empty=True)) - set(classes))
            if unknown:
                raise UserError(
                    f"data.path: '{folder}' has class folder(s) {', '.join(unknown)} that are not "
                    f"in '{root / 'train'}' (classes: {', '.join(classes)}). Rename or remove "
                    "them, or add training images of those classes."
                )
            found[name] = _list_images(folder, classes, required=False)
    return classes, found


def _class_folders(folder: Path, allow_empty: bool = False) -> list[str]:
    """Sorted names of the visible subfolders of `folder`."""
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names and not allow_empty:
        raise UserError(f"data.path: '{folder}' has no class folders. " + _LAYOUT_HELP)
    return names


def _list_images(folder: Path, classes: list[str], required: bool) -> tuple[list[Path], list[int]]:
    """Image files under folder/<class>/ (recursively, sorted) with their class indices."""
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(_image_files(folder / name))
        if required and not found:
            raise UserError(
                f"data.path: class folder '{folder / name}' has no images. Add some or "
                "remove the folder. " + _LAYOUT_HELP
            )
        files += found
        labels += [index] * len(found)
    return files, labels


def _image_files(folder: Path) -> Iterator[Path]:
    """Visible image files under `folder`, at any depth (os.walk: no stat per file, which
    matters at 50,000 files)."""
    for here, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(here, name)


def _pick(
    files: list[Path], labels: list[int], indices: np.ndarray
) -> tuple[list[Path], list[int]]:
    """The files and labels at `indices`."""
    return [files[i] for i in indices], [labels[i] for i in indices]


def decode_image(file: Path | str, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """Decode one image file to a C×H×W uint8 array of the given (height, width)."""
    with Image.open(file) as image:
        image = image.convert("L" if grayscale else "RGB")
    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.array(image, dtype=np.uint8)
    return pixels[None] if grayscale else pixels.transpose(2, 0, 1)


def _bad_file(file: Path | str, exc: BaseException | str, on_bad_file: str) -> None:
    """Warn about an undecodable file, or raise a UserError when on_bad_file is 'error'."""
    reason = exc if isinstance(exc, str) else str(exc) or type(exc).__name__
    if on_bad_file == "error":
        raise UserError(
            f"data.path: cannot decode image '{file}' ({reason}). Fix or delete the file, or set "
            "data.on_bad_file: skip to leave undecodable images out."
        )
    warnings.warn(f"skipping undecodable image {file}: {reason}", stacklevel=2)


def _workers() -> int:
    """Threads for decoding: PIL releases the GIL while decoding and resizing."""
    return min(8, os.cpu_count() or 1)


def _decoded(
    stamps: dict[Path, str],
    files: list[Path],
    labels: list[int],
    size: tuple[int, int],
    grayscale: bool,
    on_bad_file: str,
) -> ArraySplit:
    """The split decoded into one N×C×H×W uint8 ArraySplit (undecodable files left out): from
    the cache when these very files were decoded before, else decoded now and cached."""
    key = decode_cache.entry_key(stamps, files, labels, size, grayscale)
    cached = decode_cache.load(key)
    if cached is None:
        x, y, skipped = _decode_all(files, labels, size, grayscale)
        decode_cache.save(key, x, y, skipped)
    else:
        x, y, skipped = cached
    for file, reason in (s.split("\t", 1) for s in skipped):  # the same warnings, every run
        _bad_file(file, reason, on_bad_file)
    return ArraySplit(torch.from_numpy(x), torch.from_numpy(y))


def _decode_all(
    files: list[Path], labels: list[int], size: tuple[int, int], grayscale: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every file in parallel threads: pixels and labels of the decodable ones, and
    'file<TAB>reason' for the others. A bar shows progress on a terminal for large folders."""
    x = np.empty((len(files), 1 if grayscale else 3, *size), dtype=np.uint8)

    def fill(i: int) -> str | None:
        try:
            x[i] = decode_image(files[i], size, grayscale)
        except _DECODE_ERRORS as exc:
            return str(exc) or type(exc).__name__
        return None

    with ThreadPoolExecutor(_workers()) as pool, _decoding_bar(len(files)) as advance:
        failures = []
        for failure in pool.map(fill, range(len(files))):
            failures.append(failure)
            advance()
    ok = np.array([f is None for f in failures], dtype=bool)
    y = np.asarray(labels, dtype=np.int64)
    skipped = [f"{file}\t{f}" for file, f in zip(files, failures, strict=True) if f is not None]
    return (x, y, skipped) if ok.all() else (x[ok], y[ok], skipped)


@contextlib.contextmanager
def _decoding_bar(total: int) -> Iterator[Callable[[], None]]:
    """advance() per decoded image; a transient bar on a terminal for folders worth watching."""
    console = Console(stderr=True)
    if total < BAR_FROM_IMAGES or not console.is_terminal:
        yield lambda: None
        return
    with RichProgress(
        TextColumn("decoding images"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("decode", total=total)
        yield lambda: bar.advance(task)


class ImageFileSplit:
    """A lazy split of image files, decoded and resized on each access (for large folders).

    Files whose header PIL cannot read are handled at construction per `on_bad_file`. A file
    that fails later (e.g. truncated data) raises with 'error'; with 'skip' it is warned about
    once and the next decodable image of the same class is returned in its place, so indices
    and `targets` stay valid.
    """

    def __init__(
        self,
        files: list[Path],
        labels: list[int],
        size: tuple[int, int],
        grayscale: bool,
        on_bad_file: str,
    ):
        with ThreadPoolExecutor(_workers()) as pool:
            failures = list(pool.map(_header_error, files))
        keep = []
        for i, exc in enumerate(failures):
            if exc is None:
                keep.append(i)
            else:
                _bad_file(files[i], exc, on_bad_file)
        self.files = [str(files[i]) for i in keep]  # str: cheap to pickle into DataLoader workers
        self.targets = [int(labels[i]) for i in keep]
        self.size = size
        self.grayscale = grayscale
        self.on_bad_file = on_bad_file
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for j in self._same_class_from(index):
            try:
                return torch.from_numpy(self._decode(j)), self.targets[index]
            except _DECODE_ERRORS as exc:
                # 'error' raises every time; 'skip' warns once per file across epochs.
                if self.on_bad_file == "error" or self.files[j] not in self._warned:
                    self._warned.add(self.files[j])
                    _bad_file(self.files[j], exc, self.on_bad_file)
        raise UserError(
            f"data.path: no image of class {self.targets[index]} could be decoded (all were "
            "skipped as undecodable). Replace the broken files."
        )

    def _decode(self, j: int) -> np.ndarray:
        return np.ascontiguousarray(decode_image(self.files[j], self.size, self.grayscale))

    def _same_class_from(self, index: int) -> Iterator[int]:
        """`index`, then the following indices of the same class, wrapping around."""
        n = len(self.files)
        label = self.targets[index]
        for step in range(n):
            j = (index + step) % n
            if self.targets[j] == label:
                yield j


def _header_error(file: Path) -> BaseException | None:
    """The error PIL raises when opening `file` (reads only the header), or None."""
    try:
        with Image.open(file):
            return None
    except _DECODE_ERRORS as exc:
        return exc
