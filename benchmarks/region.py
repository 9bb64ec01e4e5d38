"""A region on several brokers (issue 8, point 5): 1, 2 and 3 broker processes sharing one
Redis and one PostgreSQL, beside the embedded broker (memory + SQLite), in the same run.

Everything runs on this machine, on loopback (127.0.0.1) only, and is started and stopped
here, by the tests' own code (``tests/servers.py``, ``tests/pg.py``): a ``redis-server``
(nothing persisted: ``--save ''``, ``--appendonly no``) and a PostgreSQL cluster (``initdb``
into a temporary directory, trust authentication, default durability: ``fsync`` and
``full_page_writes`` on, as the SQLite board's ``synchronous=FULL``), each on a free port;
each broker is its own process (its own
core, its own event loop): ``python -m broker serve`` (``fanny-broker serve``) with
``--redis URL --postgres URL``, or without them for the embedded broker. Four
configurations, one after the other: the embedded broker alone (a new SQLite board), then 1,
2 and 3 brokers on the shared stores (a fresh PostgreSQL database and an emptied Redis for
each).

Load: two load generator processes (``python -m benchmarks.region load``), each holding half
of the session connections (100 per broker; ``--quick``: 20), spread round-robin over the
brokers, so that neighbours are connected to different brokers. The devices walk along rows
20 m apart (even rows east, odd rows west, 2 m per update, wrapping around), 40 m apart in
a row, the rows' length growing with the number of devices: constant density (1,250 per
square kilometre), and matches keep happening (a device passes a new device of each
neighbouring row every 10 updates; radius 30 m). Each connection sends its positions as fast
as its broker takes them, in windows of 10, each window closed by a barrier (a second
``hello``, answered ``already_hello`` in order: every position before it has been handled).
The broker's per-connection position rate limit is raised for this (``--position-rate-per-s
10000``: one connection stands for many devices' updates; a position refused ``rate_limited``
anyway, or answered with any other error, is not counted and its code is in the note), and so
is its implausible-jump bound (``--max-speed-mps 1e6``: an update 2 m from the one before
would be rejected only within 2 us of it; the devices' 30 m/s would reject nearly every one);
every other setting is the broker's default, but ``--upload-answer-delay-s 0`` (the minimum
answer delay would hide the upload's cost), ``--open-declarations`` (no declaration codes to
issue) and no per-address connection cap.

Figures, for N = 1, 2, 3 brokers on Redis + PostgreSQL (``region{N}_...``), each beside the
same figure of the embedded broker measured in the same run (the floor; ratio = N-broker
region / embedded):

* ``updates_per_s``: position updates handled per second by all brokers together (wall
  clock, from the load generators' start to their last barrier answer).
* ``updates_per_s_broker``: the same per broker process.
* ``update_cpu_us``: CPU time per position update: the brokers' and Redis's together (from
  ``/proc``; the note splits them). The embedded broker's is its own.
* ``broker_capacity_per_s``: position updates one broker process takes per second of one
  core's CPU (1 / the broker process's own CPU time per update): the throughput per broker
  process once it has a core to itself.
* ``redis_capacity_per_s``: position updates ``redis-server`` takes per second of its CPU
  (it runs commands on one thread): the ceiling of a region on one Redis. The note of
  ``update_cpu_us`` gives the Redis scripts and commands run per update (``INFO
  commandstats``).
* ``match_ms``: latency of a position update -> ``match``, median: two fresh sessions on two
  different brokers (the same one for N = 1 and the embedded broker), one holding a position,
  the other sends one 5 m away; the time until the first one receives its ``match`` (across
  brokers: through Redis). Measured with the load stopped; the note gives the p95.
* ``upload_ms``: positive upload -> ack latency, median (100 tokens, padded to 64 KiB, a
  fresh anonymous connection each, alternating brokers; the ack is sent after the commit).
* ``upload_cpu_ms``: CPU time per upload: brokers' and PostgreSQL's (every process of the
  cluster) together; the embedded broker's is its own (SQLite is in its process).

The embedded broker is measured a second time after the regions
(``embedded_again_...``, beside the first): the drift of the machine during the run.

And what the stores take on this machine, measured in the same run on the same servers:
``redis_set_per_s`` (``redis-benchmark -t set``, 20 clients) and ``pgbench_tps``
(``pgbench -N``, 2 clients). The machine has 2 cores shared by everything here (load
generators included): the totals saturate; the CPU cost per update and per upload are the
figures that carry to a larger machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from broker.__main__ import create_board, create_postgres_board
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.protocol.messages import (
    UPLOAD_SIZE_BYTES,
    Error,
    Hello,
    Match,
    Position,
    PositiveAck,
    PositiveToken,
    PositiveUpload,
    Welcome,
    decode_broker_message,
    encode,
    encode_padded,
)
from fanny_tui.protocol.proximity import METRES_PER_DEGREE
from tests.pg import ROLE, PostgresServer

from .common import LOOPBACK, Figure, Scale, percentile
from .connections import server_process

ROOT = Path(__file__).resolve().parents[1]
"""The kit's source tree (the load generators run ``python -m benchmarks.region`` there)."""
ROW_M = 20.0
"""Distance between two rows of walking devices, metres."""
COLUMN_M = 40.0
"""Distance between two devices of a row, metres."""
STEP_M = 2.0
"""How far a device walks between two updates, metres."""
RADIUS_M = 30.0
LAT0, LON0 = 48.80, 2.20
PROBE_LAT = LAT0 + 0.1   # 11 km north of the walking devices: probes never meet them
WINDOW = 10
"""Positions a connection sends before its barrier."""
LOAD_GENERATORS = 2
TOKENS_PER_UPLOAD = 100
POSITION_RATE = 10_000.0
"""The brokers' per-connection position rate here (updates per second; default 10)."""
MAX_SPEED_MPS = 1_000_000.0
"""The brokers' implausible-jump bound here (metres per second; default 30): a connection's
updates, 2 m apart, follow each other within microseconds, and must all be matched."""


def serve_args(db: Path, stores: dict[str, str]) -> list[str]:
    """``python`` arguments of one broker process: ``fanny-broker serve`` as an operator runs
    it, on a free loopback port, with ``stores`` (``{"--redis": URL, "--postgres": URL}`` or
    nothing: the embedded broker) and the changes the module docstring gives."""
    args = ["-m", "broker", "serve", "--host", LOOPBACK, "--port", "0", "--db", str(db),
            "--max-connections-per-address", "0", "--position-rate-per-s", f"{POSITION_RATE:g}",
            "--max-speed-mps", f"{MAX_SPEED_MPS:g}", "--upload-answer-delay-s", "0",
            "--open-declarations", "--log-level", "ERROR"]
    for option, url in stores.items():
        args += [option, url]
    return args


# --- /proc ------------------------------------------------------------------------------------

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 onwards)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads); with ``children``,
    also those of its live children and what the kernel reports of its exited, reaped ones
    (``cutime``/``cstime``: for PostgreSQL's backends that is not always there once they
    exit, so a measurement keeps its connections, and their backends, open). 0 if it is
    gone."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                child = _stat(int(entry.name))
                if child is not None and int(child[1]) == pid:
                    ticks += int(child[11]) + int(child[12])
    return ticks * _TICK_S


# --- the stores ------------------------------------------------------------------------------

def _run(command: Sequence[str], what: str, timeout: float = 60.0) -> str:
    """Run ``command``; its stdout. Raises RuntimeError naming ``what`` with its stderr."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


@dataclass
class RedisServer:
    """A running ``redis-server`` on 127.0.0.1 (see :func:`redis_server`)."""

    url: str
    pid: int

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def flush(self) -> None:
        """Empty it (``FLUSHALL``)."""
        import redis
        with redis.Redis.from_url(self.url) as client:
            client.flushall()

    def reset_stats(self) -> None:
        """Reset its command statistics (``CONFIG RESETSTAT``)."""
        import redis
        with redis.Redis.from_url(self.url) as client:
            client.config_resetstat()

    def commands(self) -> tuple[int, int, float]:
        """Since the last :meth:`reset_stats`: commands run (the Lua scripts' own calls
        included), scripts run (``EVALSHA``, ``EVAL``) and microseconds spent running the
        scripts (Redis's own timing, the commands they call included)."""
        import redis
        with redis.Redis.from_url(self.url) as client:
            stats = client.info("commandstats")
        scripts = [v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")]
        return (sum(int(v["calls"]) for v in stats.values()),
                sum(int(v["calls"]) for v in scripts), sum(float(v["usec"]) for v in scripts))

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """The tests' ``redis-server`` (tests/servers.py: a free loopback port, no RDB, no AOF,
    ``directory`` its working directory), stopped on exit.

    Raises:
        RuntimeError: it is not installed or did not start (the message says why).
    """
    import pytest

    from tests.servers import redis_binary, start_redis, stop_redis

    try:
        process, url = start_redis(redis_binary(), directory)
    except pytest.fail.Exception as exc:   # the tests' way to fail; here, one benchmark fails
        raise RuntimeError(str(exc)) from None
    try:
        yield RedisServer(url, process.pid)
    finally:
        stop_redis(process)


def postgres_cpu_s(server: PostgresServer) -> float:
    """CPU seconds of the whole cluster: postmaster, backends, background workers."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    return cpu_seconds(postmaster, children=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """The tests' PostgreSQL (tests/pg.py: a throw-away cluster on a free loopback port, trust
    authentication, run as ``postgres`` when root), but durable: PostgreSQL's default
    ``fsync`` and ``full_page_writes``, as the SQLite board's ``synchronous=FULL``. Stopped and
    deleted on exit.

    Raises:
        RuntimeError: it is not installed or did not start (the message says why).
    """
    from tests.pg import postgres_server as start

    yield from start(durable=True)


# --- the walking devices (load generator processes) -------------------------------------------

def _row_length(total: int) -> int:
    """Devices per row for ``total`` devices: a roughly square area."""
    return max(2, math.ceil(math.sqrt(total * ROW_M / COLUMN_M)))


def walk(index: int, total: int, step: int) -> tuple[float, float]:
    """WGS84 (latitude, longitude) of device ``index`` of ``total`` after ``step`` steps."""
    per_row = _row_length(total)
    row, col = divmod(index, per_row)
    direction = 1 if row % 2 == 0 else -1
    x = (col * COLUMN_M + direction * STEP_M * step) % (per_row * COLUMN_M)
    y = row * ROW_M
    return (LAT0 + y / METRES_PER_DEGREE,
            LON0 + x / (METRES_PER_DEGREE * math.cos(math.radians(LAT0))))


@dataclass
class _Walker:
    index: int
    broker: int   # index of its broker's URL
    ws: ClientConnection
    step: int = 0
    barrier: asyncio.Queue[str] = field(default_factory=asyncio.Queue)


async def _hello(url: str) -> ClientConnection:
    """A new session connection to ``url`` (a fresh session ID), once ``welcome`` came."""
    ws = await connect(url, proxy=None, compression=None, open_timeout=30, max_queue=None)
    await ws.send(encode(Hello(session_id=str(uuid.uuid4()), radius_m=RADIUS_M)))
    answer = decode_broker_message(await asyncio.wait_for(ws.recv(), 30))
    if not isinstance(answer, Welcome):
        raise RuntimeError(f"the broker answered hello with {answer!r}")
    return ws


async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    """One load generator: connect, report ``ready``, wait for ``go`` on stdin, walk for the
    given seconds, report the counts."""
    urls = [str(u) for u in spec["urls"]]
    first, count, total = int(spec["first"]), int(spec["count"]), int(spec["total"])
    seconds = float(spec["seconds"])
    counts = {"matches": 0}
    refused: dict[str, int] = {}   # error code -> positions refused with it
    sent = [0] * len(urls)
    failed = [0] * len(urls)
    barrier_text = encode(Hello(session_id=str(uuid.uuid4()), radius_m=RADIUS_M))

    async def read(walker: _Walker) -> None:
        with contextlib.suppress(Exception):
            async for raw in walker.ws:
                message = decode_broker_message(raw)
                if isinstance(message, Match):
                    counts["matches"] += 1
                elif isinstance(message, Error) and message.code == "already_hello":
                    walker.barrier.put_nowait(message.code)
                elif isinstance(message, Error):   # the position was not handled
                    failed[walker.broker] += 1
                    refused[message.code] = refused.get(message.code, 0) + 1

    async def window(walker: _Walker, size: int) -> None:
        for _ in range(size):
            lat, lon = walk(walker.index, total, walker.step)
            walker.step += 1
            await walker.ws.send(encode(Position(latitude=lat, longitude=lon, accuracy_m=4.0)))
        await walker.ws.send(barrier_text)
        await asyncio.wait_for(walker.barrier.get(), 60)

    walkers = []
    for index in range(first, first + count):
        ws = await _hello(urls[index % len(urls)])
        walkers.append(_Walker(index, index % len(urls), ws))
    readers = [asyncio.create_task(read(w)) for w in walkers]
    await asyncio.gather(*(window(w, 1) for w in walkers))   # every device has a position
    counts["matches"] = 0
    failed[:] = [0] * len(urls)
    refused.clear()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print("ready", flush=True)
    if (await stdin.readline()).strip() != b"go":
        return {}
    start, cpu_start = time.perf_counter(), time.process_time()
    end = start + seconds

    async def walk_until_end(walker: _Walker) -> None:
        while time.perf_counter() < end:
            await window(walker, WINDOW)
            sent[walker.broker] += WINDOW

    await asyncio.gather(*(walk_until_end(w) for w in walkers))
    elapsed = time.perf_counter() - start
    updates = [s - n for s, n in zip(sent, failed, strict=True)]
    result = {"updates": updates, "refused": refused, "seconds": elapsed, **counts,
              "cpu_s": time.process_time() - cpu_start}
    print(json.dumps(result), flush=True)
    await stdin.readline()   # "stop" (or EOF)
    await asyncio.gather(*(w.ws.close() for w in walkers), return_exceptions=True)
    for task in readers:
        task.cancel()
    return result


class LoadGenerators:
    """The load generator processes of one configuration."""

    def __init__(self, urls: list[str], total: int, seconds: float) -> None:
        self.urls, self.total, self.seconds = urls, total, seconds
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, timeout_s: float) -> None:
        """Start them; return once every one has connected its devices (``ready``)."""
        share = math.ceil(self.total / LOAD_GENERATORS)
        for first in range(0, self.total, share):
            spec = {"urls": self.urls, "first": first, "count": min(share, self.total - first),
                    "total": self.total, "seconds": self.seconds}
            self.procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.region", "load", json.dumps(spec),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT))
        for proc in self.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
            if line.strip() != b"ready":
                raise RuntimeError(f"a load generator failed to start: {line!r}")

    async def run(self, timeout_s: float) -> list[dict[str, Any]]:
        """Say ``go`` to all; their results (each: updates per broker, seconds, matches...)."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        results = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
            if not line:
                raise RuntimeError("a load generator exited without its result")
            results.append(json.loads(line))
        return results

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(ConnectionError):
                    proc.stdin.write(b"stop\n")
                    await proc.stdin.drain()
                    proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# --- probes from this process -----------------------------------------------------------------

async def match_latency(urls: list[str], index: int) -> float:
    """Seconds from a position update on one broker to the ``match`` of the session already
    there on the next broker (the same broker when there is one)."""
    lat = PROBE_LAT
    lon = LON0 + index * 200.0 / (METRES_PER_DEGREE * math.cos(math.radians(PROBE_LAT)))
    waiting = await _hello(urls[(index + 1) % len(urls)])
    mover = await _hello(urls[index % len(urls)])
    try:
        await waiting.send(encode(Position(latitude=lat, longitude=lon, accuracy_m=4.0)))
        await waiting.send(encode(Hello(session_id=str(uuid.uuid4()), radius_m=RADIUS_M)))
        answer = decode_broker_message(await asyncio.wait_for(waiting.recv(), 30))
        if not (isinstance(answer, Error) and answer.code == "already_hello"):
            raise RuntimeError(f"unexpected answer to the barrier: {answer!r}")
        start = time.perf_counter()
        await mover.send(encode(Position(latitude=lat + 5.0 / METRES_PER_DEGREE, longitude=lon,
                                         accuracy_m=4.0)))
        answer = decode_broker_message(await asyncio.wait_for(waiting.recv(), 30))
        elapsed = time.perf_counter() - start
        if not isinstance(answer, Match):
            raise RuntimeError(f"expected a match, got {answer!r}")
        return elapsed
    finally:
        await asyncio.gather(waiting.close(), mover.close(), return_exceptions=True)


async def upload_latency(url: str, rng: random.Random) -> float:
    """Seconds from sending a padded upload of :data:`TOKENS_PER_UPLOAD` fresh tokens on a
    new anonymous connection to its ``positive_ack``."""
    expires = expiry_for(datetime.now(UTC))
    upload = PositiveUpload(upload_id=str(uuid.uuid4()), tokens=[
        PositiveToken(token=rng.randbytes(32).hex(), expires_at=expires)
        for _ in range(TOKENS_PER_UPLOAD)])
    text = encode_padded(upload, UPLOAD_SIZE_BYTES)
    async with connect(url, proxy=None, compression=None, open_timeout=30) as ws:
        start = time.perf_counter()
        await ws.send(text)
        answer = decode_broker_message(await asyncio.wait_for(ws.recv(), 30))
        elapsed = time.perf_counter() - start
    if not (isinstance(answer, PositiveAck) and answer.count == TOKENS_PER_UPLOAD):
        raise RuntimeError(f"the upload was not acknowledged: {answer!r}")
    return elapsed


# --- one configuration ------------------------------------------------------------------------

@dataclass
class Measured:
    """What one configuration gave (times in seconds, CPU in seconds)."""

    brokers: int
    updates: int = 0
    updates_per_broker: list[int] = field(default_factory=list)
    seconds: float = math.nan
    matches: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    redis_calls: int = 0
    redis_scripts: int = 0
    redis_script_usec: float = 0.0
    broker_cpu_s: float = 0.0
    store_cpu_s: dict[str, float] = field(default_factory=dict)
    load_cpu_s: float = 0.0
    match_s: list[float] = field(default_factory=list)
    upload_s: list[float] = field(default_factory=list)
    upload_broker_cpu_s: float = 0.0
    upload_store_cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.updates / self.seconds

    @property
    def update_cpu_us(self) -> float:
        return 1e6 * (self.broker_cpu_s + sum(self.store_cpu_s.values())) / self.updates

    @property
    def capacity_per_s(self) -> float:
        return self.updates / self.broker_cpu_s if self.broker_cpu_s else math.nan

    @property
    def upload_cpu_ms(self) -> float:
        return (1e3 * (self.upload_broker_cpu_s + sum(self.upload_store_cpu_s.values()))
                / len(self.upload_s))


@dataclass
class Sizes:
    devices_per_broker: int
    seconds: float
    probes: int
    uploads: int


async def measure(stores: dict[str, str], count: int, sizes: Sizes, tmp: Path,
                  store_cpu: dict[str, Callable[[], float]], rng: random.Random,
                  redis: RedisServer | None = None) -> Measured:
    """Run ``count`` broker processes on ``stores`` (see :func:`serve_args`) and measure them
    (see the module docstring). ``store_cpu``: the shared stores' names -> their CPU
    seconds; ``redis``: the Redis whose commands per update are counted."""
    got = Measured(count)

    def stores_cpu_s() -> dict[str, float]:
        return {name: cpu() for name, cpu in store_cpu.items()}

    def since(before: dict[str, float]) -> dict[str, float]:
        return {name: cpu - before[name] for name, cpu in stores_cpu_s().items()}

    async with contextlib.AsyncExitStack() as stack:
        dbs = [tmp / f"board-{uuid.uuid4().hex[:12]}.sqlite3" for _ in range(count)]   # new
        if "--postgres" not in stores:
            for db in dbs:   # an empty board: fanny-broker create-board
                create_board(db)
        else:                # the region's board: fanny-broker create-board --postgres URL
            create_postgres_board(stores["--postgres"], if_missing=True)
        started = await asyncio.gather(*(   # all at once; every started one is stopped on exit
            stack.enter_async_context(server_process(*serve_args(db, stores),
                                                     errors=db.with_suffix(".stderr")))
            for db in dbs), return_exceptions=True)
        brokers: list[tuple[int, str]] = []
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
            brokers.append(outcome)
        urls = [url for _, url in brokers]
        pids = [pid for pid, _ in brokers]

        load = LoadGenerators(urls, sizes.devices_per_broker * count, sizes.seconds)
        try:
            await load.start(timeout_s=120)
            cpu0, store0 = sum(cpu_seconds(p) for p in pids), stores_cpu_s()
            if redis is not None:
                redis.reset_stats()
            results = await load.run(timeout_s=sizes.seconds + 120)
            if redis is not None:
                got.redis_calls, got.redis_scripts, got.redis_script_usec = redis.commands()
            got.broker_cpu_s = sum(cpu_seconds(p) for p in pids) - cpu0
            got.store_cpu_s = since(store0)
        finally:
            await load.stop()
        per_broker = [sum(int(r["updates"][i]) for r in results)
                      for i in range(count)]
        got.updates_per_broker = per_broker
        got.updates = sum(per_broker)
        got.seconds = max(float(r["seconds"]) for r in results)
        got.matches = sum(int(r["matches"]) for r in results)
        for r in results:
            for code, n in r["refused"].items():
                got.refused[code] = got.refused.get(code, 0) + int(n)
        got.load_cpu_s = sum(float(r["cpu_s"]) for r in results)

        for i in range(sizes.probes):
            got.match_s.append(await match_latency(urls, i))

        cpu0, store0 = sum(cpu_seconds(p) for p in pids), stores_cpu_s()
        for i in range(sizes.uploads):
            got.upload_s.append(await upload_latency(urls[i % count], rng))
        got.upload_broker_cpu_s = sum(cpu_seconds(p) for p in pids) - cpu0
        got.upload_store_cpu_s = since(store0)
    return got


# --- what the stores take on this machine -------------------------------------------------------

def redis_benchmark(redis: RedisServer, requests: int) -> float:
    """SET requests per second from ``redis-benchmark`` (20 clients, no pipelining)."""
    out = _run(["redis-benchmark", "-h", LOOPBACK, "-p", str(redis.port), "-c", "20",
                "-n", str(requests), "-t", "set", "--csv"], "redis-benchmark")
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0] == "SET":
            return float(cells[1])
    raise RuntimeError(f"redis-benchmark printed no SET figure: {out[-300:]!r}")


def pgbench(postgres: PostgresServer, seconds: int) -> float:
    """Transactions per second of ``pgbench -N`` (2 clients, scale 1) on a new database."""
    database = postgres.new_database().rsplit("/", 1)[1]
    client = [str(postgres.bin / "pgbench"), "-h", LOOPBACK, "-p", str(postgres.port),
              "-U", ROLE]
    _run([*client, "-i", "-q", "-s", "1", database], "pgbench -i", 120)
    out = _run([*client, "-n", "-N", "-c", "2", "-j", "2", "-T", str(seconds), database],
               "pgbench", seconds + 120)
    for line in out.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench printed no tps: {out[-300:]!r}")


# --- the benchmark ----------------------------------------------------------------------------

def _p(values: list[float], q: float) -> float:
    return 1e3 * percentile(values, q)


def _split(cpu_s: dict[str, float], scale: float, unit: str) -> str:
    return " + ".join(f"{name} {scale * s:.2f} {unit}" for name, s in cpu_s.items())


def _refusals(got: Measured) -> str:
    if not got.refused:
        return "no position refused"
    return ("positions refused, not counted as updates: "
            + ", ".join(f"{code} {n}" for code, n in sorted(got.refused.items())))


def figures(embedded: Measured, regions: list[Measured], again: Measured, redis_set: float,
            pg_tps: float, sizes: Sizes) -> list[Figure]:
    """The table rows (see the module docstring); ``again``: the embedded broker measured a
    second time, after the regions (the run's drift)."""
    e = embedded
    drift = "the embedded broker measured again after the regions; peer: the same before them"
    rows = [
        Figure("embedded_again_updates_per_s", again.per_s, e.per_s, "1/s", again.updates,
               drift + " (the machine's drift during the run)"),
        Figure("embedded_again_update_cpu_us", again.update_cpu_us, e.update_cpu_us, "us",
               again.updates, drift),
    ]
    for r in regions:
        n = r.brokers
        where = "across brokers" if n > 1 else "one broker"
        rows += [
            Figure(f"region{n}_updates_per_s", r.per_s, e.per_s, "1/s", r.updates,
                   f"{n} broker(s) on Redis + PostgreSQL, {sizes.devices_per_broker * n} "
                   f"walking devices ({sizes.devices_per_broker} per broker), {r.seconds:.1f} "
                   f"s, {r.matches} matches received ({e.matches} embedded), "
                   f"{_refusals(r)} (embedded: {_refusals(e)}); peer: the embedded broker, "
                   f"{sizes.devices_per_broker} devices; "
                   f"load generators used {r.load_cpu_s:.1f} s CPU (embedded "
                   f"{e.load_cpu_s:.1f} s) on the same 2 cores"),
            Figure(f"region{n}_updates_per_s_broker", r.per_s / n, e.per_s, "1/s",
                   r.updates, "the same per broker process (updates per broker: "
                   + ", ".join(str(u) for u in r.updates_per_broker) + ")"),
            Figure(f"region{n}_update_cpu_us", r.update_cpu_us, e.update_cpu_us, "us",
                   r.updates, f"CPU per position update, brokers "
                   f"{1e6 * r.broker_cpu_s / r.updates:.1f} us + "
                   + _split(r.store_cpu_s, 1e6 / r.updates, "us")
                   + f"; Redis ran {r.redis_scripts / r.updates:.2f} scripts and "
                   f"{r.redis_calls / r.updates:.1f} commands per update (the scripts' own "
                   f"calls included), {r.redis_script_usec / r.updates:.1f} us running the "
                   "scripts; peer: the embedded broker process"),
            Figure(f"region{n}_broker_capacity_per_s", r.capacity_per_s, e.capacity_per_s,
                   "1/s", r.updates, "position updates per CPU-second of one broker process "
                   "(its own CPU only, Redis not included): the throughput of a broker "
                   "process with a core to itself; peer: the embedded broker's"),
            Figure(f"region{n}_redis_capacity_per_s",
                   r.updates / r.store_cpu_s["Redis"] if r.store_cpu_s.get("Redis") else None,
                   None, "1/s", r.updates, "position updates per CPU-second of redis-server "
                   "(one thread): the most one Redis takes, whatever the number of brokers"),
            Figure(f"region{n}_match_ms", _p(r.match_s, 0.5), _p(e.match_s, 0.5), "ms",
                   len(r.match_s), f"position update -> match, median, {where} "
                   f"(p95 {_p(r.match_s, 0.95):.2f} ms; embedded p95 "
                   f"{_p(e.match_s, 0.95):.2f} ms), load stopped"),
            Figure(f"region{n}_upload_ms", _p(r.upload_s, 0.5), _p(e.upload_s, 0.5), "ms",
                   len(r.upload_s), f"positive upload ({TOKENS_PER_UPLOAD} tokens, padded) -> "
                   f"ack, median (p95 {_p(r.upload_s, 0.95):.1f} ms; embedded p95 "
                   f"{_p(e.upload_s, 0.95):.1f} ms); committed to PostgreSQL vs SQLite"),
            Figure(f"region{n}_upload_cpu_ms", r.upload_cpu_ms, e.upload_cpu_ms, "ms",
                   len(r.upload_s), f"CPU per upload: brokers "
                   f"{1e3 * r.upload_broker_cpu_s / len(r.upload_s):.2f} ms + "
                   + _split(r.upload_store_cpu_s, 1e3 / len(r.upload_s), "ms")
                   + "; peer: the embedded broker process (SQLite in it)"),
        ]
    rows += [
        Figure("redis_set_per_s", redis_set, None, "1/s", 1,
               "redis-benchmark -t set -c 20 on the same redis-server (no pipelining)"),
        Figure("pgbench_tps", pg_tps, None, "1/s", 1,
               "pgbench -N -c 2 -j 2, scale 1, on the same PostgreSQL (one commit each, "
               "fsync on)"),
    ]
    return rows


async def run(scale: Scale) -> list[Figure]:
    sizes = Sizes(devices_per_broker=scale.pick(100, 20), seconds=scale.pick(10, 1),
                  probes=scale.pick(50, 5), uploads=scale.pick(50, 5))
    rng = random.Random(8)
    with tempfile.TemporaryDirectory(prefix="fanny-bench-") as name:
        tmp = Path(name)
        embedded = await measure({}, 1, sizes, tmp, {}, rng)
        with redis_server(tmp) as redis, postgres_server() as postgres:
            regions = []
            for count in (1, 2, 3):
                redis.flush()
                stores = {"--redis": redis.url, "--postgres": postgres.new_database()}
                cpu = {"Redis": redis.cpu_s, "PostgreSQL": lambda: postgres_cpu_s(postgres)}
                regions.append(await measure(stores, count, sizes, tmp, cpu, rng, redis))
            redis_set = redis_benchmark(redis, scale.pick(200_000, 10_000))
            pg_tps = pgbench(postgres, scale.pick(10, 1))
        again = await measure({}, 1, sizes, tmp, {}, rng)
    return figures(embedded, regions, again, redis_set, pg_tps, sizes)


def _main(argv: list[str]) -> int:
    """``python -m benchmarks.region load SPEC``: one load generator process."""
    if len(argv) != 2 or argv[0] != "load":
        print("usage: python -m benchmarks.region load SPEC_JSON", file=sys.stderr)
        return 2
    asyncio.run(_load(json.loads(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
