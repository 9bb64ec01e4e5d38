"""The benchmarks' shared parts: figures, the byte-counting relay, the stall monitor."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from benchmarks.common import (
    ByteCounts,
    Figure,
    LoopStall,
    Timer,
    byte_relay,
    percentile,
    time_methods,
    websocket_parts,
)


def test_figure_ratio_and_json():
    figure = Figure("bytes_per_token", 113.0, 32.0, "B", 1000, "note", "<= 33 B")
    assert figure.ratio == 113.0 / 32.0
    assert figure.as_json() == {"value": 113.0, "floor": 32.0, "ratio": 113.0 / 32.0,
                                "n": 1000, "unit": "B", "target": "<= 33 B", "note": "note"}
    assert Figure("x", 1.0, None, "s", 1).ratio is None
    assert Figure("x", None, 2.0, "s", 1).ratio is None
    assert Figure("x", 1.0, 0.0, "s", 1).ratio is None


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 21)]   # 1..20
    assert percentile(values, 0.95) == 19.0
    assert percentile(values, 0.5) == 10.0
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([], 0.95) != percentile([], 0.95)   # nan


@contextlib.asynccontextmanager
async def _relayed_echo() -> AsyncIterator[tuple[int, ByteCounts]]:
    """A WebSocket echo server on 127.0.0.1 behind :func:`byte_relay`: the relay's port and
    its counts."""
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with (
        serve(echo, "127.0.0.1", 0, compression=None) as server,
        byte_relay(server.sockets[0].getsockname()[1]) as (port, counts),
    ):
        yield port, counts


def _connect(port: int, time_unit: float) -> connect:
    """A WebSocket client to the relay on ``port`` (no proxy, no compression)."""
    return connect(f"ws://127.0.0.1:{port}", proxy=None, compression=None,
                   open_timeout=5 * time_unit)


async def test_byte_relay_counts_what_crosses_it(time_unit):
    async with _relayed_echo() as (port, counts):
        async with _connect(port, time_unit) as ws:
            handshake_down = counts.down
            await ws.send("x" * 1000)
            assert await asyncio.wait_for(ws.recv(), 5 * time_unit) == "x" * 1000
            # 1000 bytes of payload each way, plus the frame headers (and the client's mask)
            assert 1000 < counts.down - handshake_down < 1020
            assert counts.up > 1000
            assert counts.connections == 1
        counts.reset()
        assert (counts.down, counts.up, counts.connections) == (0, 0, 0)


async def test_websocket_parts_cuts_a_captured_connection(time_unit):
    async with _relayed_echo() as (port, counts):
        counts.capture = True
        async with _connect(port, time_unit) as ws:
            await ws.send("x" * 10)
            await asyncio.wait_for(ws.recv(), 5 * time_unit)
            await ws.send(b"y" * 300)      # a 16-bit extended payload length
            await asyncio.wait_for(ws.recv(), 5 * time_unit)
        await asyncio.sleep(0.1 * time_unit)   # the server's close frame crosses the relay
        parts = websocket_parts(bytes(counts.up_raw), bytes(counts.down_raw))
    assert parts.request_fields[:5] == ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key",
                                        "Sec-WebSocket-Version"]
    assert "User-Agent" in parts.request_fields and "Date" in parts.response_fields
    # client frames are masked (4 bytes), server frames are not; 300 needs 2 length bytes
    assert parts.up_frames == [("text", 2 + 4 + 10), ("binary", 4 + 4 + 300), ("close", 8)]
    assert parts.down_frames == [("text", 2 + 10), ("binary", 4 + 300), ("close", 4)]
    assert parts.total == counts.up + counts.down
    host = f"Host: 127.0.0.1:{port}\r\n"
    key_line = len("Sec-WebSocket-Key: ") + 24 + 2
    accept_line = len("Sec-WebSocket-Accept: ") + 28 + 2
    assert parts.minimal_handshake == (
        len("GET / HTTP/1.1\r\n") + len(host) + len("Upgrade: websocket\r\n")
        + len("Connection: Upgrade\r\n") + key_line + len("Sec-WebSocket-Version: 13\r\n")
        + 2 + len("HTTP/1.1 101 \r\n") + len("Upgrade: websocket\r\n")
        + len("Connection: Upgrade\r\n") + accept_line + 2)
    assert parts.minimal_total < parts.total


async def test_loop_stall_sees_a_blocked_loop():
    async with LoopStall() as stall:
        await asyncio.sleep(0.01)
        time.sleep(0.05)   # blocks the event loop on purpose: the stall being measured
        await asyncio.sleep(0.01)
    assert stall.samples > 0
    assert stall.worst_s >= 0.04   # the sleeper cannot wake before the loop is free again


@dataclass(frozen=True)
class _Outcome:
    matched: int


class _Check:
    """Like the store's bulk check object: returned by a store method, fed, then committed."""

    def feed(self, chunk: list[str]) -> int:
        time.sleep(0.01)
        return len(chunk)

    def commit(self) -> _Outcome:
        time.sleep(0.01)
        return _Outcome(1)


class _Store:
    def check(self) -> _Check:
        return _Check()

    def check_all(self, chunks: list[list[str]]) -> _Outcome:
        check = self.check()     # a public method calling another: timed once
        for chunk in chunks:
            check.feed(chunk)
        return check.commit()

    def close(self) -> None:
        time.sleep(0.05)


def test_time_methods_follows_helper_objects_and_counts_nested_calls_once():
    store, timer = _Store(), Timer()
    time_methods(store, timer, skip=frozenset({"close"}))
    check = store.check()
    for _ in range(3):
        check.feed(["a", "b"])
    assert check.commit() == _Outcome(1)     # a frozen result is returned untouched
    assert timer.names == {"check": 1, "check().feed": 3, "check().commit": 1}
    assert timer.seconds >= 0.04             # the three feeds and the commit slept 40 ms
    store.close()                            # skipped: not timed
    assert timer.calls == 5
    assert store.check_all([["a"], ["b"]]) == _Outcome(1)
    assert timer.names["check_all"] == 1 and timer.names["check"] == 1   # nested: not counted
    assert timer.calls == 6 and timer.seconds >= 0.07
