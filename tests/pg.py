"""A real PostgreSQL server for the tests (Debian's ``postgresql`` package).

Fixtures:

* ``pg_server`` (session): ``initdb`` + ``pg_ctl start`` in a temporary directory,
  listening on 127.0.0.1 on a free port (and a Unix socket in that directory), trust
  authentication on loopback only. Run as the unprivileged ``postgres`` user when the
  tests run as root (CI does; PostgreSQL refuses to run as root). Stopped at the end.
* ``pg_url`` (function): a fresh, empty database on that server; its URL.

:func:`find_postgres_bin` looks in ``PATH`` and ``/usr/lib/postgresql/*/bin``. When no
PostgreSQL is installed the fixtures skip with what to install — ``.ci/run`` installs
the package, so in CI they run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for d in candidates:
        if (d / "initdb").exists() and (d / "pg_ctl").exists() and (d / "postgres").exists():
            return d
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl") and shutil.which("postgres"):
        return Path(initdb).resolve().parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """A running PostgreSQL server of the tests."""

    bin_dir: Path
    data_dir: Path
    port: int
    user: str = "postgres"
    host: str = "127.0.0.1"
    run_as: str | None = None  # unprivileged user when the tests run as root
    log_path: Path | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(psycopg.Error), psycopg.connect(
            self.url(), autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def sql(self, url: str, statement: str) -> list[tuple[object, ...]]:
        """Run one statement on ``url`` (test plumbing: tamper, count)."""
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(statement)
            return list(cur.fetchall()) if cur.description else []


def _run(cmd: list[str], run_as: str | None, **kw: object) -> subprocess.CompletedProcess[str]:
    if run_as:
        cmd = ["runuser", "-u", run_as, "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def start_pg(base: Path, *, durable: bool = False) -> PgServer:
    """initdb + pg_ctl start under ``base`` (created, and handed to the postgres user
    when running as root). The tests' server skips fsync (they test behaviour, not
    durability); ``durable=True`` (benchmarks) keeps PostgreSQL's durable defaults."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    run_as = "postgres" if os.geteuid() == 0 else None
    base.mkdir(parents=True, exist_ok=True)
    if run_as:
        shutil.chown(base, run_as, run_as)
        # every parent must be traversable by the unprivileged user
        for parent in base.parents:
            with contextlib.suppress(OSError):
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
    data = base / "data"
    _run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
         "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
        run_as,
    )  # fmt: skip
    port = _free_port()
    log_path = base / "postgres.log"
    opts = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base}"
        " -c max_connections=200 -c shared_buffers=64MB"
    )
    if not durable:
        opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    _run(
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log_path), "-o", opts, "-w",
         "-t", "60", "start"],
        run_as,
    )  # fmt: skip
    return PgServer(bin_dir, data, port, run_as=run_as, log_path=log_path)


def stop_pg(server: PgServer) -> None:
    with contextlib.suppress(subprocess.CalledProcessError):
        _run(
            [str(server.bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-m", "immediate",
             "-w", "stop"],
            server.run_as,
        )  # fmt: skip


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if find_postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
    # not under pytest's tmp dir: that one is 0700 root on CI, unreachable for 'postgres'
    base = Path(tempfile.mkdtemp(prefix="yigong-pg-"))
    server = start_pg(base)
    deadline = time.monotonic() + 30
    while True:
        try:
            import psycopg

            with psycopg.connect(server.url(), connect_timeout=2):
                break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        yield server
    finally:
        stop_pg(server)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    url = pg_server.create_database()
    try:
        yield url
    finally:
        pg_server.drop_database(url)
