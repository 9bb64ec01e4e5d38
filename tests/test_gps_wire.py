"""From a real receiver log to the broker's wire: no position before the first real fix.

A real gpsd (gpsfake) replays tr737A+.log, which starts without a fix (RMC status V reporting
90N 0E, GGA quality 0); the engine reads it with its gpsd source and talks to a real broker that
records every frame. Every position the broker ever receives is one of gpsd's own expected
positions for that log (its .chk file), so nothing went on the wire before the first fix, and
never (0, 0) or the no-fix 90N 0E.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from broker.server import BrokerSettings, start_broker
from fanny_tui.config import parse_config
from fanny_tui.gps import GpsdSource
from fanny_tui.protocol.proximity import haversine_m
from tests.gpsfake import GpsFake
from tests.test_gps import NMEA, NOT_MEASURED_LOG, NOT_MEASURED_REASONS, chk_fix_positions

from .helpers import TIME_UNIT, Device, running_device


@contextlib.asynccontextmanager
async def _device_on_gpsd(tmp_path: Path, log: Path, frames: list[tuple[str, str]]
                          ) -> AsyncIterator[Device]:
    """A running device reading a real gpsd (gpsfake replaying ``log`` every 20 ms) and talking
    to a real broker that appends every frame it receives to ``frames`` as (kind, raw)."""
    async with start_broker(BrokerSettings(host="127.0.0.1", port=0,
                                           db_path=tmp_path / "b.db"),
                            recorder=lambda kind, raw: frames.append((kind, raw))) as broker:
        with GpsFake(log, cycle=0.02) as fake:
            config = parse_config({
                "broker": {"url": broker.url, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
                "gps": {"source": "gpsd", "host": "127.0.0.1", "port": fake.port},
                "protocol": {"position_interval_s": 0.1},
            })
            source = GpsdSource("127.0.0.1", fake.port, stale_after_s=30.0)
            async with running_device(config, tmp_path / "dev", source) as device:
                yield device



async def test_no_position_on_the_wire_before_the_receivers_first_fix(tmp_path):
    frames: list[tuple[str, str]] = []
    expected = chk_fix_positions("tr737A+.log")
    assert expected
    async with _device_on_gpsd(tmp_path, NMEA / "tr737A+.log", frames) as device:
        await device.wait_event("broker_connected", timeout=20)
        await device.wait_event("gps_fix", timeout=60)
        await device.wait_for(
            lambda _: any('"type":"position"' in raw for _, raw in frames), timeout=20)
    positions = [json.loads(raw) for kind, raw in frames if json.loads(raw)["type"] == "position"]
    assert positions, "no position reached the broker"
    types = [json.loads(raw)["type"] for _, raw in frames]
    assert types[0] == "hello"
    for message in positions:
        point = (message["latitude"], message["longitude"])
        assert point != (0.0, 0.0)
        assert abs(point[0]) < 89, "the no-fix 90N reached the wire"
        assert min(haversine_m(*point, *p) for p in expected) < 0.5, point


async def test_positions_the_receiver_did_not_measure_never_reach_the_broker(tmp_path):
    """A real gpsd replays the derived log (tests/data/derived): epochs in simulation mode, dead
    reckoning and manual input, each at a position ~100 km from the real ones. The device
    reports each as a loss, tells the broker (position_lost), and no frame the broker receives
    carries one of those positions."""
    frames: list[tuple[str, str]] = []
    async with _device_on_gpsd(tmp_path, NOT_MEASURED_LOG, frames) as device:
        await device.wait_event("broker_connected", timeout=20 * TIME_UNIT)
        for kind in NOT_MEASURED_REASONS.values():
            await device.wait_for(lambda e, kind=kind: e.event == "gps_lost"
                                  and e.reason.startswith(kind),
                                  timeout=30 * TIME_UNIT)
        last_loss = max(i for i, e in enumerate(device.events) if e.event == "gps_lost")
        await device.wait_for(lambda e: e.event == "gps_fix"
                              and device.events.index(e) > last_loss,
                              timeout=20 * TIME_UNIT)
    messages = [json.loads(raw) for _, raw in frames]
    positions = [m for m in messages if m["type"] == "position"]
    assert positions and any(m["type"] == "position_lost" for m in messages)
    for message in positions:
        point = (message["latitude"], message["longitude"])
        assert haversine_m(*point, -37.78479, 175.31490) < 1000, point
