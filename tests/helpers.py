"""Shared test helpers: loopback engines around a real in-process broker, event waiting."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fanny_tui.config import Config, parse_config
from fanny_tui.engine import Engine
from fanny_tui.events import Event

TIME_UNIT = float(os.environ.get("FANNY_TIME_UNIT", "1.0"))
"""The tests' one time unit, in seconds: every deadline and wait in a test is a multiple of it.
Set ``FANNY_TIME_UNIT=3`` on a slow or loaded machine to give every deadline three times as long."""

LAT, LON = 43.604500, 1.444000
"""A spot in Toulouse; devices are placed a few metres from it."""

METRE_LAT = 1 / 111_195.0
"""About one metre of latitude, in degrees."""


def device_config(broker_url: str, **protocol: float) -> Config:
    """Loopback-only device configuration with short intervals for tests."""
    settings = {"radius_m": 15.0, "position_interval_s": 0.3, "poll_interval_s": 1.0,
                "handshake_timeout_s": 10.0}
    settings.update(protocol)
    return parse_config({
        "broker": {"url": broker_url, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        "gps": {"source": "fixed", "latitude": LAT, "longitude": LON},
        "protocol": settings,
        "webrtc": {"host_addresses": ["127.0.0.1"]},
    })


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
async def running_device(config: Config, data_dir: Path, source: object, *,
                         subscriber: Callable[[Event], None] | None = None
                         ) -> AsyncIterator[Device]:
    """Run an engine for the duration of the block, then stop it cleanly.

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
