"""Shared helpers for tests that run the command line as a user does, and make the files a
user brings (imported by the test modules; the in-process `invoke` fixture is in conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def interruptible() -> None:
    """`preexec_fn` for a child a test stops with SIGINT: Ctrl-C's default, as from a terminal.
    A suite started in the background (`cmd &` without job control) or by some CI runners
    ignores SIGINT, children inherit that, and such a child would run on to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def dltrain(*args: str | Path, cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m dltrain ARGS` as a user would, in `cwd`, and capture its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("DLTRAIN_DEBUG", "FORCE_COLOR")}
    env["NO_COLOR"] = "1"
    # One intra-op thread: on a small machine busy with other work, OpenMP threads spinning
    # while they wait make tiny CPU runs many times slower (results are the same).
    env["OMP_NUM_THREADS"] = "1"
    if debug:
        env["DLTRAIN_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "dltrain", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit 2, the expected words in one message on stderr, no traceback anywhere."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    for text in expected:
        assert text in proc.stderr, proc.stderr


def words(text: str) -> str:
    """Whitespace-normalised text: the console may wrap long lines when piped."""
    return " ".join(text.split())


def one_epoch_fit(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """A 1-epoch quickstart into tmp_path/quickstart."""
    args = ["fit", QUICKSTART, f"output={tmp_path}", "train.epochs=1", "--quiet", *extra]
    return dltrain(*args, cwd=tmp_path)


# `dltrain COMMAND --help` in a fresh interpreter, reporting whether torch got imported.
HELP_PROBE = """
import sys
from dltrain.cli import app
try:
    app(sys.argv[1:] + ["--help"], prog_name="dltrain")
except SystemExit as exc:
    code = exc.code or 0
print("TORCH_IMPORTED=" + str("torch" in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def png(path: Path, size: tuple[int, int], value: int) -> None:
    """A small RGB PNG of one colour (one corner pixel differs), parent folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    pixels[0, 0] = (255 - value, value, 0)
    Image.fromarray(pixels).save(path)


def flat_image_folder(root: Path) -> Path:
    """root/{cat,dog}/*.PNG, five images each of different sizes, and a stray text file."""
    for c, name in enumerate(["cat", "dog"]):
        for i in range(5):
            png(root / name / f"{i}.PNG", (6 + i, 9 - i), 40 * c + i)
    (root / "dog" / "notes.txt").write_text("ignored: not an image")
    return root
