"""The benchmarks' shared parts: figures, the byte-counting relay, the stall monitor."""

from __future__ import annotations

import asyncio
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from benchmarks.common import Figure, LoopStall, byte_relay, percentile


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


async def test_byte_relay_counts_what_crosses_it(time_unit):
    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, compression=None) as server:
        target = server.sockets[0].getsockname()[1]
        async with byte_relay(target) as (port, counts):
            async with connect(f"ws://127.0.0.1:{port}", proxy=None, compression=None,
                               open_timeout=5 * time_unit) as ws:
                handshake_down = counts.down
                await ws.send("x" * 1000)
                assert await asyncio.wait_for(ws.recv(), 5 * time_unit) == "x" * 1000
                # 1000 bytes of payload each way, plus the frame headers (and the client's mask)
                assert 1000 < counts.down - handshake_down < 1020
                assert counts.up > 1000
                assert counts.connections == 1
            counts.reset()
            assert (counts.down, counts.up, counts.connections) == (0, 0, 0)


async def test_loop_stall_sees_a_blocked_loop():
    async with LoopStall() as stall:
        await asyncio.sleep(0.01)
        time.sleep(0.05)   # blocks the event loop on purpose: the stall being measured
        await asyncio.sleep(0.01)
    assert stall.samples > 0
    assert stall.worst_s >= 0.04   # the sleeper cannot wake before the loop is free again
