"""Crowds (issue 7, point 6): twenty devices within 10 m of each other, every pair (190) stores
its token on both devices. Headless engines in one process, FixedSources, a real broker and
real aiortc peers on loopback.

Each device takes part in 19 exchanges with 8 handshake slots: the wait for a slot has a
deadline and an order (see ``Engine._exchange``), so an exchange does not start after its peer
gave up, and both sides of a pair favour the same pairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time

import pytest

from fanny_tui.gps import FixedSource
from tests.broker.kit import running
from tests.helpers import LAT, LON, METRE_LAT, TIME_UNIT, device_config, running_device

DEVICES = 20
RING_M = 4.0
"""Devices on a ring of this radius: any two are at most 8 m apart."""


def place(n: int) -> tuple[float, float]:
    angle = 2 * math.pi * n / DEVICES
    north, east = RING_M * math.sin(angle), RING_M * math.cos(angle)
    return LAT + north * METRE_LAT, LON + east * METRE_LAT / math.cos(math.radians(LAT))


@pytest.mark.timeout(int(180 * TIME_UNIT))
async def test_twenty_devices_within_ten_metres_every_pair_stores_its_token(tmp_path):
    async with running(tmp_path, cooldown_s=300.0, position_rate_per_s=10.0) as broker:
        # Position updates every 0.3 s: the 190 pairs match within about a second.
        config = device_config(broker.url, position_interval_s=0.3, handshake_timeout_s=20.0,
                               radius_m=15.0)
        async with contextlib.AsyncExitStack() as stack:
            start = time.monotonic()
            devices = []
            for n in range(DEVICES):
                latitude, longitude = place(n)
                devices.append(await stack.enter_async_context(running_device(
                    config, tmp_path / f"d{n}", FixedSource(latitude, longitude, 4.0,
                                                            interval_s=1.0))))

            def holders() -> dict[str, set[int]]:
                found: dict[str, set[int]] = {}
                for n, device in enumerate(devices):
                    for event in device.of("token_stored"):
                        found.setdefault(event.token, set()).add(n)
                return found

            def pairs_done() -> set[frozenset[int]]:
                return {frozenset(h) for h in holders().values() if len(h) == 2}

            all_pairs = {frozenset(p) for p in itertools.combinations(range(DEVICES), 2)}
            deadline = start + 150 * TIME_UNIT
            while pairs_done() != all_pairs and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            elapsed = time.monotonic() - start
            done = pairs_done()
            failures = sum(len(d.of("handshake_failed")) for d in devices)
            reasons = sorted({e.reason for d in devices for e in d.of("handshake_failed")})
            print(f"crowd of {DEVICES}: {len(done)}/{len(all_pairs)} pairs hold their token "
                  f"on both devices after {elapsed:.1f} s; {failures} failed exchanges {reasons}")
            # Every token is on exactly two devices, and the stores hold what the events said.
            assert all(len(h) == 2 for h in holders().values())
            assert done == all_pairs, f"missing pairs: {sorted(map(sorted, all_pairs - done))}"
            for n, device in enumerate(devices):
                stored = {t.token for t in device.engine.snapshot().tokens}
                assert {tok for tok, h in holders().items() if n in h} <= stored
