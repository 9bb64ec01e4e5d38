"""Helpers for the broker tests: a real broker on port 0, real websockets clients, clocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from broker.server import BrokerSettings, RunningBroker, start_broker
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.protocol.messages import (
    BrokerToClient,
    Error,
    Hello,
    Position,
    PositiveToken,
    Welcome,
    decode_broker_message,
    encode,
)
from fanny_tui.protocol.proximity import METRES_PER_DEGREE

LAT, LON = 48.856613, 2.352222
"""A spot in Paris; test devices are placed metres from it."""

CLIENT_LOGGER = logging.getLogger("tests.broker.client")
CLIENT_LOGGER.disabled = True   # the clients' own frame logs are not the broker's logs


def north(metres: float) -> float:
    """Latitude ``metres`` north of :data:`LAT`."""
    return LAT + metres / METRES_PER_DEGREE


def new_id() -> str:
    return str(uuid.uuid4())


def token(n: int) -> str:
    return f"{n:064x}"


class FakeMonotonic:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeWall:
    """A UTC wall clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


WALL_NOW = datetime(2026, 3, 1, 10, 30, tzinfo=UTC)
EXPIRY = datetime(2026, 3, 14, 4, 0, tzinfo=UTC)


def real_expiry() -> datetime:
    """The expiry a device would give a token witnessed now (real clock)."""
    return expiry_for(datetime.now(UTC))


def positive(n: int, expires_at: datetime = EXPIRY) -> PositiveToken:
    return PositiveToken(token=token(n), expires_at=expires_at)


def settings_for(tmp_path: Path, **overrides: Any) -> BrokerSettings:
    """Test settings: fast housekeeping, open declarations and a short upload answer delay
    unless overridden (the tests of codes and delays set them explicitly)."""
    values: dict[str, Any] = {
        "host": "127.0.0.1", "port": 0, "db_path": tmp_path / "board.sqlite3",
        "housekeeping_interval_s": 0.05, "purge_interval_s": 0.05,
        "open_declarations": True, "upload_answer_delay_s": 0.0,
    }
    values.update(overrides)
    return BrokerSettings(**values)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, *, recorder: Any = None, wall: Any = None,
                  mono: Any = None, **overrides: Any) -> AsyncIterator[RunningBroker]:
    """A real broker on a free loopback port for the duration of the block."""
    async with start_broker(settings_for(tmp_path, **overrides), recorder=recorder,
                            wall_clock=wall, monotonic=mono) as broker:
        yield broker


class Client:
    """A raw WebSocket client of the broker (sends whatever the test says)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.session_id: str | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, url: str, **kwargs: Any) -> AsyncIterator[Client]:
        kwargs.setdefault("max_size", 2**20)
        async with connect(url, proxy=None, compression=None, open_timeout=5,
                           logger=CLIENT_LOGGER, **kwargs) as ws:
            yield cls(ws)

    async def recv_text(self, timeout: float = 5.0) -> str:
        """The next frame as received (to check its exact size)."""
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, str)
        return raw

    async def send(self, message: Any) -> None:
        if isinstance(message, msgspec.Struct):
            await self.ws.send(encode(message))
        elif isinstance(message, dict):
            await self.ws.send(json.dumps(message))
        else:
            await self.ws.send(message)

    async def recv(self, timeout: float = 5.0) -> BrokerToClient:
        return decode_broker_message(await asyncio.wait_for(self.ws.recv(), timeout))

    async def expect(self, kind: type, timeout: float = 5.0) -> Any:
        message = await self.recv(timeout)
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    async def expect_error(self, code: str, field: str | None = None) -> Error:
        error = await self.expect(Error)
        assert error.code == code, error
        assert error.field == field, error
        return error

    async def hello(self, session_id: str | None = None, radius_m: float = 30.0) -> Welcome:
        self.session_id = session_id or new_id()
        await self.send(Hello(session_id=self.session_id, radius_m=radius_m))
        return await self.expect(Welcome)

    async def at(self, metres_north: float, lon: float = LON) -> None:
        await self.send(Position(latitude=north(metres_north), longitude=lon, accuracy_m=4.0))

    async def barrier(self) -> list[BrokerToClient]:
        """Everything the broker sent before the answer to a probe on this session connection.

        The broker handles a connection's frames in order and every message to a client goes
        through one queue, so whatever it decided before the probe is already queued.
        """
        assert self.session_id is not None
        await self.send(Hello(session_id=self.session_id, radius_m=1.0))
        before = []
        while True:
            message = await self.recv()
            if isinstance(message, Error) and message.code == "already_hello":
                return before
            before.append(message)


async def healthz(port: int, ssl: Any = None) -> tuple[int, dict[str, Any]]:
    """GET /healthz over a raw loopback TCP connection (TLS with an ``ssl`` context)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl, server_hostname="127.0.0.1" if ssl else None)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body)


async def eventually(predicate: Any, timeout: float = 5.0) -> None:
    """Wait until ``await predicate()`` is true (bounded; no timing is asserted)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached within the bound")
        await asyncio.sleep(0.02)


async def flood_signals(sender: Any, peer_session_id: str,
                        done: Callable[[], Awaitable[bool]]) -> int:
    """Send 30 kB SDP offers to ``peer_session_id`` in rounds of 50 until ``await done()`` (at
    most 40 rounds, about 60 MB); return how many were sent. For tests of a client that does
    not read (the broker must drop it rather than let its buffers grow)."""
    from fanny_tui.protocol.messages import Signal

    big = "v=0 " + "a" * 30_000
    sent = 0
    for _ in range(40):
        for _ in range(50):
            await sender.send(Signal(peer_session_id=peer_session_id, sdp_type="offer", sdp=big))
        sent += 50
        if await done():
            break
        await asyncio.sleep(0.05)
    return sent
