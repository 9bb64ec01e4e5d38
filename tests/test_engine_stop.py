"""Engine.run's start and stop: the data directory's lock, and a stop that always finishes.

Real engines, real SQLite stores and real flock; no broker is needed (the broker link keeps
retrying a closed loopback port, which is what a device does when its broker is down).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fanny_tui.datadir import DataDirBusy, DataDirLock
from fanny_tui.engine import CANCEL_AGAIN_S, Engine
from fanny_tui.events import GpsFix, GpsLost
from fanny_tui.gps import FixedSource

from .helpers import LAT, LON, TIME_UNIT, device_config, fixed_at, free_port, running_device


class SwallowsOneCancel(FixedSource):
    """A position source that carries on after its first cancellation, as a loop does when
    Python 3.11's ``asyncio.wait_for`` loses a cancel that races with its result."""

    def __init__(self) -> None:
        super().__init__(LAT, LON, 3.0, interval_s=0.05)
        self.swallowed = 0

    async def stream(self) -> AsyncIterator[GpsFix | GpsLost]:
        while True:
            yield GpsFix(latitude=LAT, longitude=LON, accuracy_m=3.0, mode=3)
            try:
                await asyncio.sleep(self.interval_s)
            except asyncio.CancelledError:
                if self.swallowed:
                    raise
                self.swallowed += 1


async def test_stop_finishes_even_when_a_loop_swallowed_its_cancellation(tmp_path):
    source = SwallowsOneCancel()
    config = device_config(f"ws://127.0.0.1:{free_port()}")      # nothing listens there
    async with running_device(config, tmp_path, source) as device:
        await device.wait_event("gps_fix", timeout=5 * TIME_UNIT)
        await device.engine.stop()
        assert device.task is not None
        await asyncio.wait_for(asyncio.shield(device.task), 2 * CANCEL_AGAIN_S + 2 * TIME_UNIT)
    assert source.swallowed == 1


async def test_the_data_directory_is_locked_while_the_engine_runs(tmp_path):
    config = device_config(f"ws://127.0.0.1:{free_port()}")      # nothing listens there
    source = fixed_at(accuracy_m=3.0)
    async with running_device(config, tmp_path, source):
        with pytest.raises(DataDirBusy, match=f"the data directory {tmp_path} is in use by"):
            DataDirLock(tmp_path).acquire()
        second = Engine(config, tmp_path, source=fixed_at(accuracy_m=3.0))
        with pytest.raises(DataDirBusy):
            await asyncio.wait_for(second.run(), 5 * TIME_UNIT)
    with DataDirLock(tmp_path):          # let go when the engine stopped
        pass
