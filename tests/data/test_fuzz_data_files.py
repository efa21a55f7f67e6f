"""Fuzzing the user's own data files: a valid npz, CSV table, text CSV or image folder, then one
change to it — bytes cut, flipped or inserted, a key or column dropped, a value of another type
or shape, NaN, a huge or negative label, an image in another mode or a lie in its header — and
`dltrain check` and `dltrain fit` on it. Every outcome is success or one message with exit 1 or 2:
never "internal error", never a traceback."""

from __future__ import annotations

import csv
import io
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

EXAMPLES = 80  # each checks and fits one tiny model: about a minute in all

Draw = Callable  # hypothesis's data.draw


# -- byte-level damage, for any single file ------------------------------------------------------


def damage_bytes(path: Path, draw: Draw) -> None:
    data = bytearray(path.read_bytes())
    how = draw(st.sampled_from(["truncate", "flip", "insert", "empty"]), label="bytes")
    at = draw(st.integers(0, max(len(data) - 1, 0)), label="at")
    if how == "truncate":
        del data[at:]
    elif how == "flip":
        for i in range(at, min(at + draw(st.integers(1, 16), label="count"), len(data))):
            data[i] ^= 0xFF
    elif how == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=32), label="inserted")
    else:
        data.clear()
    path.write_bytes(bytes(data))


# -- npz -----------------------------------------------------------------------------------------


def npz_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def split(n):
        y = rng.integers(0, 3, size=n)
        return (rng.normal(size=(n, 6)) + y[:, None]).astype(np.float32), y

    (train_x, train_y), (test_x, test_y) = split(48), split(12)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


NPZ_VALUES = {
    "nan": lambda a: np.full(a.shape, np.nan),
    "inf": lambda a: np.full(a.shape, np.inf),
    "text": lambda a: np.full(a.shape, "x"),
    "object": lambda a: np.array([{"a": 1}] * len(a), dtype=object),
    "bool": lambda a: np.ones(a.shape, dtype=bool),
    "complex": lambda a: a.astype(np.complex64),
    "huge": lambda a: np.full(a.shape, 3 * 10**9, dtype=np.int64),
    "negative": lambda a: -np.ones(a.shape, dtype=np.int64),
    "fraction": lambda a: np.full(a.shape, 0.5),
    "flat": lambda a: a.reshape(-1),
    "deeper": lambda a: a.reshape(*a.shape, 1, 1, 1),
    "empty": lambda a: a[:0],
    "one_row_less": lambda a: a[:-1],
    "scalar": lambda a: np.array(7),
}


def damage_npz(folder: Path, draw: Draw) -> Path:
    arrays = npz_arrays(np.random.default_rng(0))
    how = draw(st.sampled_from(["bytes", "drop", "value", "classes", "extra_split"]), label="npz")
    key = draw(st.sampled_from(sorted(arrays)), label="key")
    if how == "drop":
        del arrays[key]
    elif how == "value":
        arrays[key] = NPZ_VALUES[draw(st.sampled_from(sorted(NPZ_VALUES)), label="value")](
            arrays[key]
        )
    elif how == "classes":
        arrays["classes"] = draw(
            st.sampled_from([np.array(["a"]), np.array([1, 2, 3]), np.array([["a", "b", "c"]])]),
            label="classes",
        )
    elif how == "extra_split":
        arrays["val_x"] = arrays["test_x"]  # val_x without val_y
    path = folder / "data.npz"
    np.savez(path, **arrays)
    if how == "bytes":
        damage_bytes(path, draw)
    return path


# -- CSV tables and texts ------------------------------------------------------------------------

CELLS = ["", "nan", "inf", "-inf", "1e400", "abc", "0x1F", " 3 ", "é", "\x00", '"', "1,2"]


def table_rows(rng: np.random.Generator) -> list[list[str]]:
    rows = [["f0", "f1", "label", "f2"]]
    for _ in range(40):
        y = int(rng.integers(0, 3))
        f = rng.normal(size=3) + y
        rows.append([f"{f[0]:.3f}", f"{f[1]:.3f}", f"kind_{y}", f"{f[2]:.3f}"])
    return rows


def text_rows(rng: np.random.Generator) -> list[list[str]]:
    words = {0: ["win", "prize", "free", "now"], 1: ["see", "you", "at", "home"]}
    rows = [["text", "label"]]
    for _ in range(40):
        y = int(rng.integers(0, 2))
        rows.append([" ".join(rng.choice(words[y], size=4)), ["ham", "spam"][y]])
    return rows


def damage_rows(rows: list[list[str]], draw: Draw) -> list[list[str]]:
    how = draw(
        st.sampled_from(["cell", "drop_cell", "add_cell", "no_header", "one_class", "only_header"]),
        label="rows",
    )
    row = draw(st.integers(0, len(rows) - 1), label="row")
    column = draw(st.integers(0, len(rows[0]) - 1), label="column")
    if how == "cell":
        rows[row][column] = draw(st.sampled_from(CELLS) | st.text(max_size=8), label="cell")
    elif how == "drop_cell":
        del rows[row][column]
    elif how == "add_cell":
        rows[row].append("extra")
    elif how == "no_header":
        del rows[0]
    elif how == "one_class":
        label = rows[0].index("label")
        for r in rows[1:]:
            r[label] = rows[1][label]
    else:
        del rows[1:]
    return rows


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as f:
        csv.writer(f).writerows(rows)
    return path


def damage_table(folder: Path, draw: Draw, make_rows=table_rows) -> Path:
    rows = make_rows(np.random.default_rng(0))
    path = folder / "data.csv"
    if draw(st.booleans(), label="bytes instead of cells"):
        damage_bytes(write_csv(path, rows), draw)
    else:
        write_csv(path, damage_rows(rows, draw))
    return path


def damage_texts(folder: Path, draw: Draw) -> Path:
    if draw(st.integers(0, 4), label="latin-1 row") == 0:  # a row saved by another program
        path = write_csv(folder / "data.csv", text_rows(np.random.default_rng(0)))
        path.write_bytes(path.read_bytes() + "caf\xe9,ham\n".encode("latin-1"))
        return path
    return damage_table(folder, draw, text_rows)


# -- image folders -------------------------------------------------------------------------------

MODES = ["L", "LA", "RGBA", "P", "I;16", "I", "F", "1", "CMYK"]


def image_bytes(image: Image.Image) -> bytes:
    """The image in a format that holds its mode (behind a .png name: only content counts)."""
    buffer = io.BytesIO()
    image.save(buffer, format={"CMYK": "JPEG", "I": "TIFF", "F": "TIFF"}.get(image.mode, "PNG"))
    return buffer.getvalue()


def lying_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def damage_images(folder: Path, draw: Draw) -> Path:
    root = folder / "images"
    rng = np.random.default_rng(0)
    files = []
    for c, name in enumerate(["cat", "dog"]):
        for i in range(6):
            pixels = np.clip(rng.normal(60 + 120 * c, 30, size=(10, 10, 3)), 0, 255)
            files.append(root / name / f"{i}.png")
            files[-1].parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(files[-1])
    how = draw(
        st.sampled_from(["bytes", "mode", "lying_header", "not_an_image", "empty_class", "stray"]),
        label="images",
    )
    victim = draw(st.sampled_from(files), label="file")
    if how == "bytes":
        damage_bytes(victim, draw)
    elif how == "mode":
        mode = draw(st.sampled_from(MODES), label="mode")
        victim.write_bytes(image_bytes(Image.new(mode, (7, 5))))
    elif how == "lying_header":
        size = draw(st.sampled_from([(0, 4), (100000, 100000), (2**31 - 1, 1)]), label="size")
        victim.write_bytes(lying_png(*size))
    elif how == "not_an_image":
        victim.write_text("a text file with an image's name")
    elif how == "empty_class":
        for f in (root / "dog").iterdir():
            f.unlink()
    else:
        (root / "stray.png").write_bytes(files[0].read_bytes())  # a file beside the classes
    return root


# -- the recipes ---------------------------------------------------------------------------------

FORMATS = {
    "npz": (damage_npz, {"name": "npz"}, {"name": "mlp", "hidden": [8]}),
    "csv": (damage_table, {"name": "csv", "label": "label"}, {"name": "mlp", "hidden": [8]}),
    "text_csv": (
        damage_texts,
        {"name": "text_csv", "max_length": 8},
        {"name": "lstm", "embedding_size": 8, "hidden_size": 8},
    ),
    "image_folder": (
        damage_images,
        {"name": "image_folder", "image_size": 8},
        {"name": "seed_cnn"},
    ),
}


PREDICTABLE = ("csv", "image_folder")  # formats `dltrain predict` reads as they are


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases in every run: CI is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_damaged_data_file_trains_or_is_refused_with_one_message(invoke, data):
    kind = data.draw(st.sampled_from(sorted(FORMATS)), label="format")
    damage, data_section, model = FORMATS[kind]
    folder = Path(tempfile.mkdtemp(dir=Path.cwd()))
    try:
        path = damage(folder, data.draw)
        recipe = folder / "recipe.yaml"
        section = {**data_section, "path": str(path), "batch_size": 16, "val_split": 0}
        recipe.write_text(
            yaml.safe_dump(
                {
                    "name": "fuzz",
                    "output": str(folder / "runs"),
                    "seed": 0,
                    "device": "cpu",
                    "data": section,
                    "model": model,
                    "optimizer": {"name": "adam", "lr": 0.01},
                    "train": {"epochs": 1},
                }
            )
        )
        commands = [["check", str(recipe)], ["fit", str(recipe), "-q"]]
        for args in commands:
            result = invoke(*args)
            said = result.output
            event(f"{kind} {args[0]}: exit {result.exit_code}")  # --hypothesis-show-statistics
            assert result.exit_code in (0, 1, 2), (kind, args[0], said)
            assert "internal error" not in said and "Traceback" not in said, (kind, said)
            if args[0] == "fit" and result.exit_code == 0 and kind in PREDICTABLE:
                # the trained model, asked about the damaged files themselves
                inputs = [str(f) for f in sorted(path.rglob("*")) if f.is_file()] or [str(path)]
                best = folder / "runs" / "fuzz" / "checkpoints" / "best.pt"
                commands.append(["predict", str(best), *inputs])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
