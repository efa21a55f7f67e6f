"""Fixtures shared by every test module."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner


@pytest.fixture(scope="session", autouse=True)
def decode_cache_in_the_tests_own_folder(tmp_path_factory):
    # decoded image folders are cached (dltrain/data/decode_cache.py): never in the user's
    # ~/.cache from a test; the CLI processes tests start inherit the variable
    os.environ["DLTRAIN_CACHE"] = str(tmp_path_factory.mktemp("decode-cache"))


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # These runs are tiny. With two intra-op threads on a 2-core machine that is also busy with
    # other work, OpenMP's spin-waiting turns 0.05 s epochs into seconds; one thread is steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def invoke(tmp_path, monkeypatch):
    """Run the CLI in-process (typer's CliRunner) with tmp_path as the working directory."""
    from dltrain.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DLTRAIN_DEBUG", raising=False)
    runner = CliRunner(env={"COLUMNS": "100"})  # a fixed console width, whatever the terminal

    def run(*args: str):
        result = runner.invoke(app, list(args), prog_name="dltrain")
        # Only SystemExit may end a command: anything else would be a traceback for a user.
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        return result

    return run
