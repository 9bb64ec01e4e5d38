"""Shared test helpers: loopback engines around a real in-process broker, event waiting, fixed
positions and a pair of devices a few metres apart, a broker link that only fails, a TLS broker,
a free loopback port, loopback ports that refuse or never answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from hypothesis import strategies as st

from broker.server import BrokerSettings, RunningBroker, start_broker
from fanny_tui.config import Config, parse_config
from fanny_tui.engine import Engine
from fanny_tui.events import BrokerConnected, BrokerDisconnected, Event, GpsFix
from fanny_tui.gps import FixedSource, PositionSource
from fanny_tui.link import BrokerLink
from fanny_tui.protocol.messages import Hello, Role

if TYPE_CHECKING:
    from fanny_tui.protocol.handshake import WitnessHandshake

TIME_UNIT = float(os.environ.get("FANNY_TIME_UNIT", "1.0"))
"""The tests' one time unit, in seconds: every deadline and wait in a test is a multiple of it.
Set ``FANNY_TIME_UNIT=3`` on a slow or loaded machine to give every deadline three times as long."""

LAT, LON = 43.604500, 1.444000
"""A spot in Toulouse; devices are placed a few metres from it."""

METRE_LAT = 1 / 111_195.0
"""About one metre of latitude, in degrees."""

SESSION_ID = "0f0e0d0c-0b0a-4908-8706-050403020100"
"""A fixed session ID (UUIDv4) for a broker link made by a test."""

uuid4s = st.uuids(version=4).map(str)
"""Hypothesis strategy: session and contact IDs (UUIDv4 text)."""

ROLES: tuple[Role, ...] = get_args(Role)
"""The two roles of a witness handshake (``match.role``): initiator, responder."""


def other_role(role: str) -> str:
    """The peer's role: ``"responder"`` for ``"initiator"`` and the other way round."""
    return "responder" if role == "initiator" else "initiator"


def handshake_snapshot(machine: WitnessHandshake) -> tuple[Any, ...]:
    """Everything a call to a :class:`~fanny_tui.protocol.handshake.WitnessHandshake` could
    change, without draining anything: an illegal input must leave it equal."""
    return (machine.state, machine.token, machine.failure_reason, machine.close_reason,
            machine._peer_contact_id, machine._held, machine._closing,
            list(machine._outgoing), list(machine._events))


def device_config(broker_url: str | list[str], *,
                  positives: dict[str, str] | None = None,
                  broker: dict[str, Any] | None = None,
                  privacy: dict[str, Any] | None = None, **protocol: float) -> Config:
    """Loopback-only device configuration with short intervals for tests: the one builder of
    a test device's configuration.

    ``broker_url``: ``[broker] url`` (one URL or a region's list); ``positives``: name -> URL
    of ``[[positives]]`` brokers polled for positive tokens only; ``broker``: more ``[broker]``
    keys (``ca_file``, ``reconnect_max_s``...); ``privacy``: ``[privacy]`` keys; the other
    keyword arguments: ``[protocol]`` keys (seconds, metres).

    Raises:
        ConfigError: a bad key or value (as :func:`~fanny_tui.config.parse_config`).
    """
    settings = {"radius_m": 15.0, "position_interval_s": 0.3, "poll_interval_s": 1.0,
                "handshake_timeout_s": 10.0}
    settings.update(protocol)
    return parse_config({
        "broker": {"url": broker_url, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
                   **(broker or {})},
        "positives": [{"name": name, "url": url} for name, url in (positives or {}).items()],
        "gps": {"source": "fixed", "latitude": LAT, "longitude": LON},
        "protocol": settings,
        "webrtc": {"host_addresses": ["127.0.0.1"]},
        "privacy": privacy or {},
    })


class MovableSource:
    """A receiver the test moves: the current position every ``interval_s`` seconds."""

    def __init__(self, latitude: float, longitude: float, accuracy_m: float,
                 interval_s: float = 0.1) -> None:
        self.latitude, self.longitude, self.accuracy_m = latitude, longitude, accuracy_m
        self.interval_s = interval_s

    def move_to(self, latitude: float, longitude: float) -> None:
        self.latitude, self.longitude = latitude, longitude

    async def stream(self) -> AsyncIterator[GpsFix]:
        while True:
            yield GpsFix(latitude=self.latitude, longitude=self.longitude,
                         accuracy_m=self.accuracy_m, mode=3, time=datetime.now(UTC))
            await asyncio.sleep(self.interval_s)


@dataclass
class Device:
    """An engine running in this event loop, with every event it emitted."""

    engine: Engine
    data_dir: Path
    events: list[Event] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def of(self, name: str) -> list[Event]:
        return [e for e in self.events if e.event == name]

    async def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 30.0) -> Event:
        """Wait until an event satisfying ``predicate`` was emitted; return it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            if loop.time() > deadline:
                names = [e.event for e in self.events]
                raise AssertionError(f"no matching event within {timeout} s; saw {names}")
            await asyncio.sleep(0.05)

    async def wait_event(self, name: str, timeout: float = 30.0) -> Event:
        return await self.wait_for(lambda e: e.event == name, timeout)


@contextlib.asynccontextmanager
async def running_device(config: Config, data_dir: Path, source: PositionSource | None, *,
                         subscriber: Callable[[Event], None] | None = None
                         ) -> AsyncIterator[Device]:
    """Run an engine for the duration of the block, then stop it cleanly.

    ``source``: its positions (:func:`fixed_at`...), or None for the one ``config.gps`` names.
    ``subscriber``, if given, gets every event from the start too (e.g. to time them)."""
    engine = Engine(config, data_dir, source=source)
    device = Device(engine, data_dir)
    engine.subscribe(device.events.append)
    if subscriber is not None:
        engine.subscribe(subscriber)
    device.task = asyncio.create_task(engine.run())
    try:
        await device.wait_event("session_started", timeout=10)
        yield device
    finally:
        await engine.stop()
        await asyncio.wait_for(device.task, 15)


def fixed_at(north_m: float = 0.0, *, accuracy_m: float = 4.0,
             interval_s: float = 0.2) -> FixedSource:
    """A fixed position ``north_m`` metres north of (:data:`LAT`, :data:`LON`) (WGS84), its
    fix reported ``accuracy_m`` metres accurate every ``interval_s`` seconds."""
    return FixedSource(LAT + north_m * METRE_LAT, LON, accuracy_m, interval_s=interval_s)


@contextlib.asynccontextmanager
async def device_pair(tmp_path: Path, config: Config, config_b: Config | None = None, *,
                      apart_m: float = 3.0, accuracy_m: float = 4.0,
                      names: tuple[str, str] = ("a", "b")) -> AsyncIterator[tuple[Device, Device]]:
    """Two devices ``apart_m`` metres apart, yielded as ``(a, b)``: ``a`` at
    ``fixed_at(0.0)``, ``b`` at ``fixed_at(apart_m)`` (both ``accuracy_m``), each with its
    data directory ``tmp_path / name`` (``names``); ``config`` is a's, ``config_b`` (default
    ``config``) b's. Both run (:func:`running_device`) for the block and stop after it."""
    first, second = names
    async with (
        running_device(config, tmp_path / first, fixed_at(0.0, accuracy_m=accuracy_m)) as a,
        running_device(config if config_b is None else config_b, tmp_path / second,
                       fixed_at(apart_m, accuracy_m=accuracy_m)) as b,
    ):
        yield a, b


def link_config(url: str, ca_file: Path | None = None, **broker: Any) -> Config:
    """A device for broker-link tests (:func:`device_config`): ``[broker] url`` (and
    ``ca_file``, other ``[broker]`` keys), reconnects within 0.1-0.4 s, a poll every 0.5 s."""
    section: dict[str, Any] = {"reconnect_max_s": 0.4}
    if ca_file is not None:
        section["ca_file"] = str(ca_file)
    section.update(broker)
    return device_config(url, broker=section, poll_interval_s=0.5)


@contextlib.asynccontextmanager
async def tls_broker(tmp_path: Path, pki: dict[str, Path], frames: list[str]
                     ) -> AsyncIterator[RunningBroker]:
    """The real broker serving ``wss://127.0.0.1:PORT`` with ``pki``'s certificate (the
    ``pki`` fixture of tests/conftest.py), open declarations; every frame it receives is
    appended to ``frames``."""
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "board.sqlite3",
                              certfile=pki["cert"], keyfile=pki["key"], open_declarations=True,
                              upload_answer_delay_s=0.02)
    async with start_broker(settings, recorder=lambda kind, raw: frames.append(raw)) as broker:
        assert broker.url.startswith("wss://127.0.0.1:")
        yield broker


async def collect_disconnects(url: str, count: int) -> list[BrokerDisconnected]:
    """Run a real :class:`~fanny_tui.link.BrokerLink` to ``url`` until it reported ``count``
    ``broker_disconnected`` events (it must never connect); return them, in order."""
    events: list[Event] = []
    link = BrokerLink(url, Hello(session_id=SESSION_ID, radius_m=10.0),
                      on_message=lambda m: None, on_event=events.append,
                      reconnect_min_s=0.1, reconnect_max_s=0.4)
    task = asyncio.create_task(link.run())
    try:
        while sum(isinstance(e, BrokerDisconnected) for e in events) < count:
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not any(isinstance(e, BrokerConnected) for e in events)
    return [e for e in events if isinstance(e, BrokerDisconnected)][:count]


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (``ip_local_port_range``), first and last port."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(*, udp: bool = False) -> int:
    """A TCP port (a UDP port with ``udp``) free on 127.0.0.1 right now, below the kernel's
    ephemeral range: the one free-port helper of the tests, for a server started later on that
    number (gpsd under gpsfake, ``fanny-broker serve --port``, redis-server, coturn, a device's
    ``[broker] url`` where nothing listens yet).

    Not a port-0 pick: the server binds the number later (gpsd ~0.5 s later), and in that
    window a port from the ephemeral range can go to any other test binding port 0 or to any
    outgoing connection; ports below the range only go to whoever asks for them by number.
    A caller may still lose the port to another test picking the same number: one that can
    should retry (see tests/servers.py ``start_redis``).

    Raises:
        RuntimeError: no free port found in 200 random tries.
    """
    low, _high = _ephemeral_range()
    top = max(low, 20_001)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20_000, top)
        with socket.socket(socket.AF_INET,
                           socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free {'UDP' if udp else 'TCP'} port found on 127.0.0.1")


@contextlib.contextmanager
def loopback_port(*, listening: bool) -> Iterator[int]:
    """A loopback TCP port held by the test for the block: bound only (connections are
    refused) or listening but never accepting (a connection opens, then nothing answers: the
    link waits for its 10 s handshake time-out, and nothing is heard from the broker
    meanwhile). Not a free port (see :func:`free_port`): the port stays taken, so nothing
    else can answer on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    if listening:
        sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


CLIENT_STACK = ("textual", "aiortc", "av", "aioice", "rich", "pynmea2", "gpxpy", "dns",
                "platformdirs")
"""Top-level modules of the field device's stack: the ``tui`` extra's distributions and
aiortc's PyAV and aioice. A broker host installs none of them (issue 8, point 4)."""

_BLOCKER = '''\
"""sitecustomize of a test: these modules cannot be imported, as if not installed."""
import os
import sys

_BLOCKED = frozenset({blocked!r})
_LOG = {log!r}


def _note(line):
    with open(_LOG, "a", encoding="utf-8") as log:
        log.write(line + "\\n")


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            _note(f"refused {{name}}")
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
_note(f"installed in {{os.getpid()}}")
for _name in sorted(_BLOCKED & set(sys.modules)):
    _note(f"already imported {{_name}}")
'''


@dataclass
class ImportBlocker:
    """An environment for Python subprocesses in which some modules cannot be imported.

    ``env`` puts a ``sitecustomize`` on ``PYTHONPATH`` that inserts a ``sys.meta_path``
    finder refusing every module whose top-level name is in ``modules`` (ModuleNotFoundError,
    as for a module that is not installed); every process started with it appends
    ``installed in PID`` to ``log``, and ``refused NAME`` for each refused import.
    """

    modules: tuple[str, ...]
    env: dict[str, str]
    log: Path

    @classmethod
    def make(cls, tmp_path: Path, modules: tuple[str, ...] = CLIENT_STACK) -> ImportBlocker:
        site = tmp_path / "import-blocker"
        site.mkdir()
        log = tmp_path / "import-blocker.log"
        log.touch()
        (site / "sitecustomize.py").write_text(
            _BLOCKER.format(blocked=sorted(modules), log=str(log)), encoding="utf-8")
        return cls(modules, {**os.environ, "PYTHONPATH": str(site)}, log)

    def lines(self) -> list[str]:
        """What the blocked processes noted so far."""
        return self.log.read_text(encoding="utf-8").splitlines()

    def refused(self) -> list[str]:
        """The imports refused so far (``NAME``, in order)."""
        return [line.removeprefix("refused ") for line in self.lines()
                if line.startswith("refused ")]

    def installed_in(self) -> int:
        """How many processes ran with the blocker installed."""
        return sum(line.startswith("installed in ") for line in self.lines())


def console_script(name: str, fallback: str) -> list[str]:
    """The command of the installed console script ``name`` (beside this Python), else
    ``python -c FALLBACK`` (run from the checkout)."""
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-c", fallback]
