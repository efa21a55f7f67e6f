"""Fixtures shared by every test module: `invoke` (the CLI in-process) and `trained_run` (a
tiny run trained once and shared). Plain helpers are in tests/helpers/ (see tests/README.md)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from helpers.training import one_torch_thread, train


@pytest.fixture(scope="session", autouse=True)
def decode_cache_in_the_tests_own_folder(tmp_path_factory):
    # decoded image folders are cached (dltrain/data/decode_cache.py): never in the user's
    # ~/.cache from a test; the CLI processes tests start inherit the variable
    os.environ["DLTRAIN_CACHE"] = str(tmp_path_factory.mktemp("decode-cache"))


@pytest.fixture(scope="session", autouse=True)
def one_thread_for_every_run():
    # train.threads: auto takes an explicit OMP_NUM_THREADS as given: runs in the tests use
    # one thread without timing steps first (tests/system/test_threads.py unsets it)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # every test on one torch thread (see one_torch_thread); module and session fixtures run
    # before this one, so `trained_run` sets it for its own training
    with one_torch_thread():
        yield


@pytest.fixture
def invoke(request, tmp_path, monkeypatch):
    """Run the CLI in-process (typer's CliRunner) with tmp_path as the working directory.

    The console is 100 columns wide, whatever the terminal; a module or test marked
    `@pytest.mark.console_width(200)` gets a wider one (long paths in titles unwrapped)."""
    from dltrain.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DLTRAIN_DEBUG", raising=False)
    width = request.node.get_closest_marker("console_width")
    runner = CliRunner(env={"COLUMNS": str(width.args[0] if width else 100)})

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args], prog_name="dltrain")
        # Only SystemExit may end a command: anything else would be a traceback for a user.
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        return result

    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """`trained_run(base, name, *overrides)`: `train` into a fresh temporary folder, on one torch
    thread, once per session for the same arguments: (run folder, report). The run is shared:
    a test that writes beside it or changes its files works on a copy."""
    done = {}

    def get(base: dict, name: str, *overrides: str):
        key = (repr(base), name, overrides)
        if key not in done:
            with one_torch_thread():
                done[key] = train(tmp_path_factory.mktemp(name), base, name, *overrides)
        return done[key]

    return get


@pytest.fixture(scope="session")
def postgres_url():
    """The URL of a database on a real PostgreSQL server (helpers/postgres.py), or a skip."""
    from helpers.postgres import missing, postgres_server

    why = missing()
    if why:
        pytest.skip(f"no PostgreSQL server: {why}")
    with postgres_server() as url:
        yield url
