"""The GPS error model (noise, outliers, fix losses) and the replaying position source."""

from __future__ import annotations

import asyncio
import math
import statistics
import time

import pytest

from fanny_tui.events import GpsFix, GpsLost
from fanny_tui.protocol.proximity import haversine_m
from fanny_tui.sim.scenario import NoiseSpec, Track
from fanny_tui.sim.tracks import (
    ABSENT,
    LOST,
    R95_PER_SIGMA,
    NoiseModel,
    Observation,
    SimClock,
    TrackSource,
    offset,
)
from tests.helpers import TIME_UNIT

LAT, LON = 43.6045, 1.444
STILL = Track("still", (0.0, 100_000.0), (LAT, LAT), (LON, LON))


def errors(observations: list[Observation]) -> tuple[list[float], list[float]]:
    """East and north errors in metres of fixes of :data:`STILL`."""
    east, north = [], []
    for o in observations:
        if o.latitude is None:
            continue
        north.append((o.latitude - LAT) * 111_195.08)
        east.append((o.longitude - LON) * 111_195.08 * math.cos(math.radians(LAT)))
    return east, north


def lag1(values: list[float]) -> float:
    mean = statistics.fmean(values)
    num = sum((a - mean) * (b - mean) for a, b in zip(values, values[1:], strict=False))
    return num / sum((a - mean) ** 2 for a in values)


def test_without_noise_the_fixes_are_the_true_track():
    walk = Track("w", (0.0, 10.0), (LAT, LAT + 0.0001), (LON, LON))
    seen = NoiseModel(NoiseSpec()).observe(walk, 10.0, seed=1)
    assert len(seen) == 11
    for o in seen:
        assert haversine_m(o.latitude, o.longitude, *walk.position_at(o.t_s)) < 1e-6


def test_the_same_seed_gives_the_same_fixes_and_another_seed_others():
    model = NoiseModel(NoiseSpec(sigma_m=5.0, outlier_rate=0.05, loss_rate=0.01))
    first = model.observe(STILL, 600.0, seed="1:a")
    assert first == model.observe(STILL, 600.0, seed="1:a")
    assert first != model.observe(STILL, 600.0, seed="1:b")


def test_correlated_noise_has_the_configured_sigma_and_correlation_time():
    model = NoiseModel(NoiseSpec(sigma_m=5.0, correlation_s=60.0))
    east, north = errors(model.observe(STILL, 60_000.0, seed=7))
    for axis in (east, north):
        assert statistics.pstdev(axis) == pytest.approx(5.0, rel=0.15)
        assert lag1(axis) == pytest.approx(math.exp(-1 / 60), abs=0.01)


def test_white_noise_is_uncorrelated_and_the_95_percent_radius_holds():
    model = NoiseModel(NoiseSpec(sigma_m=4.0, correlation_s=0.0))
    east, north = errors(model.observe(STILL, 20_000.0, seed=3))
    assert abs(lag1(east)) < 0.05
    radii = [math.hypot(e, n) for e, n in zip(east, north, strict=True)]
    within = sum(r <= model.accuracy_m for r in radii) / len(radii)
    assert within == pytest.approx(0.95, abs=0.01)
    assert model.accuracy_m == pytest.approx(4.0 * 2.4477, abs=0.001)
    assert abs(R95_PER_SIGMA - 2.4477) < 1e-4


def test_outliers_jump_the_configured_distance_at_the_configured_rate():
    model = NoiseModel(NoiseSpec(sigma_m=0.0, outlier_rate=0.1, outlier_m=80.0))
    seen = model.observe(STILL, 5000.0, seed=11)
    jumped = [o for o in seen if o.outlier]
    assert len(jumped) / len(seen) == pytest.approx(0.1, abs=0.02)
    for o in jumped:
        assert haversine_m(o.latitude, o.longitude, LAT, LON) == pytest.approx(80.0, abs=0.01)
    for o in seen:
        if not o.outlier:
            assert haversine_m(o.latitude, o.longitude, LAT, LON) < 1e-6


def test_fix_losses_last_the_configured_time_at_the_configured_rate():
    model = NoiseModel(NoiseSpec(loss_rate=0.002, loss_s=20.0))
    seen = model.observe(STILL, 50_000.0, seed=5)
    runs, length = [], 0
    for o in seen:
        if o.reason == LOST:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    assert runs and all(r % 20 == 0 for r in runs)   # back-to-back losses join
    starts = len(runs)
    fixes = sum(o.fix for o in seen)
    assert starts / fixes == pytest.approx(0.002, rel=0.3)


def test_a_device_is_absent_outside_its_track():
    short = Track("s", (10.0, 20.0), (LAT, LAT), (LON, LON))
    seen = NoiseModel(NoiseSpec(sigma_m=3.0)).observe(short, 30.0, seed=1)
    assert [o.fix for o in seen] == [False] * 10 + [True] * 11 + [False] * 10
    assert {o.reason for o in seen if not o.fix} == {ABSENT}


def test_offset_moves_by_metres():
    lat, lon = offset(LAT, LON, 30.0, 40.0)
    assert haversine_m(LAT, LON, lat, lon) == pytest.approx(50.0, rel=1e-4)


async def test_the_source_replays_on_the_scenario_clock():
    observations = [Observation(0.0, LAT, LON), Observation(1.0, None, None, ABSENT),
                    Observation(2.0, None, None, ABSENT), Observation(3.0, LAT, LON + 1e-5),
                    Observation(4.0, None, None, LOST), Observation(5.0, LAT, LON)]
    clock = SimClock(speed=20.0)
    source = TrackSource(observations, clock, accuracy_m=12.2, fix_interval_s=1.0)
    seen: list[object] = []

    async def read() -> None:
        async for item in source.stream():
            seen.append(item)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.05 * TIME_UNIT)
    assert seen == []                                   # nothing before the clock starts
    clock.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5 * TIME_UNIT
    while len(seen) < 6 and loop.time() < deadline:
        await asyncio.sleep(0.02)
    reader.cancel()
    kinds = [type(item).__name__ for item in seen]
    assert kinds == ["GpsFix", "GpsLost", "GpsFix", "GpsLost", "GpsFix", "GpsLost"], kinds
    fix = seen[0]
    assert isinstance(fix, GpsFix)
    assert (fix.source, fix.mode, fix.accuracy_m) == ("track", 3, 12.2)
    assert [item.reason for item in seen if isinstance(item, GpsLost)] == [
        ABSENT, LOST, "end of the scenario"]
    assert clock.now_s() >= 5.0                         # 6 epochs took >= 5 scenario seconds


def test_the_clock_runs_speed_times_faster():
    async def measure() -> tuple[float, float]:
        clock = SimClock(speed=50.0)
        assert clock.now_s() == 0.0
        clock.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await clock.sleep_until(10.0)
        return loop.time() - t0, clock.now_s()
    real, scenario = asyncio.run(measure())
    assert real >= 0.19
    assert scenario >= 10.0
    with pytest.raises(ValueError, match="speed"):
        SimClock(0)


async def test_epochs_the_loop_reaches_too_late_are_skipped_and_counted():
    observations = [Observation(float(k), LAT, LON) for k in range(40)]
    clock = SimClock(speed=100.0)
    source = TrackSource(observations, clock, accuracy_m=1.0, fix_interval_s=1.0)
    stream = source.stream()
    clock.start()
    assert isinstance(await anext(stream), GpsFix)        # epoch 0, on time
    time.sleep(0.2)                                       # block the loop: 20 scenario s
    assert isinstance(await anext(stream), GpsFix)
    assert source.late >= 15
    await stream.aclose()
