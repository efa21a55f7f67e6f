"""A real PostgreSQL server for the tests that need one (sweeps sharing a study across
processes, as across machines): the machine's own `initdb`/`pg_ctl`, a throwaway cluster on a
loopback port, stopped and deleted afterwards. Without PostgreSQL's programs or the psycopg
driver the tests that need it are skipped, saying why (CI's machine has both)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Debian keeps the server programs off PATH, beside psql's version
SEARCH = [os.environ.get("PATH", ""), *map(str, sorted(Path("/usr/lib/postgresql").glob("*/bin")))]


def server_programs() -> tuple[str, str] | None:
    path = os.pathsep.join(SEARCH)
    found = shutil.which("initdb", path=path), shutil.which("pg_ctl", path=path)
    return found if all(found) else None  # type: ignore[return-value]


def missing() -> str | None:
    """Why PostgreSQL cannot be used here, or None."""
    try:
        import psycopg  # noqa: F401 - SQLAlchemy's driver for postgresql+psycopg:// URLs
    except ImportError:
        return "psycopg is not installed (pip install -e .[dev])"
    if server_programs() is None:
        return "PostgreSQL's initdb and pg_ctl are not installed"
    if os.geteuid() == 0 and not _postgres_user():
        return "running as root without a 'postgres' user to run the server as"
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A running server; yields the URL of an empty database on it."""
    initdb, pg_ctl = server_programs()
    # The server refuses to run as root: as root, it runs as the 'postgres' user, in a folder
    # that user can reach (pytest's own temporary folders are root's alone)
    folder = Path(tempfile.mkdtemp(prefix="dltrain-pg-"))
    user = _postgres_user() if os.geteuid() == 0 else None
    as_user = ["runuser", "-u", user.pw_name, "--"] if user else []
    if user:
        os.chmod(folder, 0o755)
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, port = folder / "data", _free_port()
    run = lambda *args: subprocess.run([*as_user, *args], check=True, capture_output=True)  # noqa: E731
    try:
        run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
        try:
            import psycopg

            with psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
            ) as db:
                db.execute("CREATE DATABASE dltrain")
            # the driver named: SQLAlchemy before 2.1 takes postgresql:// as psycopg2
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/dltrain"
        finally:
            subprocess.run(
                [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _postgres_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def new_database(url: str, name: str) -> str:
    """Another empty database on the server of `url` (tests that must not share tables: MLflow
    and Optuna both keep an `alembic_version`); returns its URL."""
    import psycopg

    server, _, _ = url.rpartition("/")
    host_port = server.rpartition("@")[2]
    host, _, port = host_port.partition(":")
    with psycopg.connect(
        host=host, port=int(port), user="postgres", dbname="postgres", autocommit=True
    ) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"
