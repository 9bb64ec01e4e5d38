"""Real servers for the tests: Debian's redis-server on a free loopback port (issue 8).

:func:`redis_server` (session scope) starts one ``redis-server`` for the whole test run, bound to
127.0.0.1 only, without persistence (``--save '' --appendonly no``: the configuration the
privacy rule asks of an operator, docs/deployment.md), in a temporary directory, and stops it
after the run. :func:`redis_url` (function scope) hands a test that server emptied
(``FLUSHALL``), so that every test starts from nothing and may inspect everything left.
:func:`own_redis` (function scope) starts a ``redis-server`` of the test's own, the same way,
for a test that stops it mid-run (the shared one must keep running).

Broker processes: :func:`start_broker_process` runs ``fanny-broker serve ARGS`` (the installed
console script, :func:`broker_command`) and waits for its ``listening on URL`` line;
:func:`stop_broker_process` signals it and waits; :func:`broker_processes` runs several (a
region) and stops them after the test, any of which the test may SIGKILL
(:meth:`BrokerProcesses.kill`).

A missing ``redis-server`` fails the tests that need it, with the command that installs it;
they are never skipped (``./kit test`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import TIME_UNIT, console_script, free_port

REDIS_START_TIMEOUT_S = 10 * TIME_UNIT


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
        port = free_port()
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


# --- broker processes ----------------------------------------------------------------------


def broker_command() -> list[str]:
    """The ``fanny-broker`` command: the installed console script, or ``python -c`` running
    :func:`broker.__main__.main` when the script is not installed."""
    return console_script("fanny-broker",
                          "import sys; from broker.__main__ import main; sys.exit(main())")


async def start_broker_process(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``fanny-broker serve ARGS`` in a new session (process group); return it and its
    URL (``ws[s]://127.0.0.1:PORT``) once it says it listens. Fails the test, with its
    stderr, when its first line is anything else."""
    process = await asyncio.create_subprocess_exec(
        *broker_command(), "serve", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    found = re.fullmatch(r"listening on (wss?://127\.0\.0\.1:\d+)\n", line)
    if not found:
        with contextlib.suppress(ProcessLookupError):    # it may have exited already
            os.killpg(process.pid, signal.SIGKILL)
        _, err = await process.communicate()
        raise AssertionError(f"unexpected first line {line!r}; stderr: {err.decode()}")
    return process, found.group(1)


async def stop_broker_process(process: asyncio.subprocess.Process, signum: int
                              ) -> tuple[int, str, float]:
    """Send ``signum``; return the exit status, stderr and how long the stop took, seconds
    (SIGKILLed after 30 s without exiting)."""
    began = time.monotonic()
    process.send_signal(signum)
    try:
        _, err = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return int(process.returncode or 0), err.decode(), time.monotonic() - began


@dataclass
class BrokerProcesses:
    """Broker processes of one test (:func:`broker_processes`).

    Attributes:
        processes: the running ``fanny-broker serve`` processes, in start order.
        urls: their URLs, in the same order.
        killed: the indexes of those the test SIGKILLed.
    """

    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)

    def kill(self, index: int) -> None:
        """SIGKILL the broker ``index`` and its process group now (a crash: nothing flushed)."""
        self.killed.add(index)
        os.killpg(self.processes[index].pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def broker_processes(count: int, *args: str) -> AsyncIterator[BrokerProcesses]:
    """Start ``count`` ``fanny-broker serve ARGS`` processes (a region: the same ``ARGS``,
    each its own port when they say ``--port 0``), one after the other.

    Afterwards (also when the test failed, or a start did) those the test killed are reaped,
    and the others are stopped with SIGTERM: each must exit 0 without a traceback.
    """
    brokers = BrokerProcesses()
    try:
        for _ in range(count):
            process, url = await start_broker_process(*args)
            brokers.processes.append(process)
            brokers.urls.append(url)
        yield brokers
    finally:
        for index, process in enumerate(brokers.processes):
            if index in brokers.killed:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.communicate()
        for index, process in enumerate(brokers.processes):
            if index not in brokers.killed:
                status, err, _ = await stop_broker_process(process, signal.SIGTERM)
                assert status == 0, err
                assert "Traceback" not in err, err
