"""A real PostgreSQL server for the tests: Debian's ``postgresql`` binaries, started once per test
session in a temporary directory and stopped after it (issue 8: real servers, never skipped).

The server listens on 127.0.0.1 only, on a free port, with its unix socket in its own directory
and ``trust`` authentication for the one role ``fanny``. ``initdb`` refuses to run as root: as
root, every server command runs as the unprivileged ``postgres`` user (``runuser``), which owns
the directory. ``fsync=off``: the test server's durability is not under test (the boards' is
"acknowledged only after COMMIT", which holds whatever the server's disk does).

``./kit test`` installs Debian's ``postgresql`` when ``initdb`` is missing; without it the
fixture fails (it never skips).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from tests.helpers import free_port

ROLE = "fanny"
"""The superuser role of the test server (trust authentication, loopback only)."""


def _binaries() -> Path:
    """The newest Debian PostgreSQL ``bin`` directory (``/usr/lib/postgresql/N/bin``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        raise RuntimeError("Debian's postgresql is not installed: run ./kit test (it installs "
                           "it), or apt-get install postgresql")
    return Path(found[-1]).parent


class PostgresServer:
    """One running test server. :meth:`new_database` gives each test an empty database.

    Args:
        root: an empty directory for the cluster, the socket and the log.
        port: the loopback TCP port to listen on.
        durable: keep PostgreSQL's default ``fsync`` and ``full_page_writes`` (on), for a
            benchmark that measures commits (benchmarks/region.py); the tests run without.
    """

    def __init__(self, root: Path, port: int, *, durable: bool = False) -> None:
        self.root = root
        self.port = port
        self.durable = durable
        self.bin = _binaries()
        self.data = root / "data"
        self.log = root / "server.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:                   # initdb refuses root: run as postgres
            shutil.chown(root, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as_user, *args], capture_output=True, text=True,
                              timeout=120, cwd=self.root)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): "
                               f"{done.stderr.strip()} {log[-2000:]}")

    def start(self) -> None:
        """initdb, then start the server and wait until it accepts connections."""
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", ROLE, "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.root} -c max_connections=200"
                   + ("" if self.durable else " -c fsync=off -c full_page_writes=off"))
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "-o", options, "start")

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are closed)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        """The ``postgresql://`` URL of ``database`` on this server (TCP, loopback)."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        """Run one statement on the ``postgres`` database, outside a transaction."""
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(sql)

    def new_database(self) -> str:
        """Create an empty database with a random name; returns its URL."""
        name = f"t_{uuid.uuid4().hex}"
        self.admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url`` (its connections are ended first)."""
        name = url.rsplit("/", 1)[1]
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_server(*, durable: bool = False) -> Iterator[PostgresServer]:
    """Start a test server in a fresh temporary directory; stop it and remove it after.
    ``durable``: see :class:`PostgresServer`."""
    root = Path(tempfile.mkdtemp(prefix="fanny-pg-"))
    server = PostgresServer(root, free_port(), durable=durable)
    try:
        server.start()
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
