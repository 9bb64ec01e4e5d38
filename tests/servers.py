"""Real servers for the tests: Debian's redis-server on a free loopback port (issue 8).

:func:`redis_server` (session scope) starts one ``redis-server`` for the whole test run, bound to
127.0.0.1 only, without persistence (``--save '' --appendonly no``: the configuration the
privacy rule asks of an operator, docs/deployment.md), in a temporary directory, and stops it
after the run. :func:`redis_url` (function scope) hands a test that server emptied
(``FLUSHALL``), so that every test starts from nothing and may inspect everything left.
:func:`own_redis` (function scope) starts a ``redis-server`` of the test's own, the same way,
for a test that stops it mid-run (the shared one must keep running).

A missing ``redis-server`` fails the tests that need it, with the command that installs it;
they are never skipped (``./kit test`` installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import TIME_UNIT

REDIS_START_TIMEOUT_S = 10 * TIME_UNIT


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()), None)
    if found is None:
        pytest.fail("redis-server not found: install Debian's redis-server "
                    "(`apt-get install redis-server`, or run `./kit test`, which does)",
                    pytrace=False)
    return found


def start_redis(binary: str, directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server on a free loopback port; return it and its URL once it answers."""
    last_error = ""
    for _ in range(3):                       # a port taken between the probe and the bind
        port = free_loopback_port()
        log = directory / f"redis-{port}.log"
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--logfile", str(log),
             "--daemonize", "no", "--protected-mode", "yes", "--databases", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
                    if client.ping():
                        return process, url
            except redis.exceptions.ConnectionError as exc:
                last_error = str(exc)
            time.sleep(0.05)
        stop_redis(process)
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        if lines:
            last_error = lines[-1]
    pytest.fail(f"redis-server did not start on a loopback port: {last_error}", pytrace=False)


def stop_redis(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def redis_contents(client: redis.Redis) -> dict[str, list[str]]:
    """Every key of ``client``'s database and its values as text (a string's value, a hash's
    field values, a set's or sorted set's members), to inspect what a scenario left behind.
    ``client`` answers text (``decode_responses=True``). A key of another type maps to
    ``["<TYPE>"]``."""
    contents: dict[str, list[str]] = {}
    for key in client.scan_iter(count=1000):
        kind = str(client.type(key))
        values: list[Any]
        if kind == "string":
            values = [client.get(key) or ""]
        elif kind == "hash":
            values = list(client.hgetall(key).values())
        elif kind == "set":
            values = sorted(client.smembers(key))
        elif kind == "zset":
            values = list(client.zrange(key, 0, -1))
        else:
            values = [f"<{kind}>"]
        contents[str(key)] = [str(value) for value in values]
    return contents


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL (``redis://127.0.0.1:PORT/0``) of a redis-server running for the whole test
    run, without persistence; stopped after the run."""
    process, url = start_redis(redis_binary(), tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        stop_redis(process)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The test run's Redis, emptied before the test (and after it)."""
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    yield redis_server
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()


@dataclass
class OwnRedis:
    """A redis-server of one test (:func:`own_redis`), which the test may stop.

    Attributes:
        url: ``redis://127.0.0.1:PORT/0``.
        process: the running server.
    """

    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop the server now (SIGTERM, waited for): its clients' next calls fail."""
        stop_redis(self.process)


@pytest.fixture
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    """A redis-server for this test alone, configured as :func:`redis_server`'s; stopped
    after the test if the test did not stop it."""
    process, url = start_redis(redis_binary(), tmp_path_factory.mktemp("own-redis"))
    server = OwnRedis(url, process)
    try:
        yield server
    finally:
        server.stop()
