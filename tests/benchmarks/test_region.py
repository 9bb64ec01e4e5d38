"""benchmarks/region.py: the walking devices, the CPU accounting, the load generators and the
probes against a real broker (no timing is checked)."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from typing import Any

from benchmarks.region import (
    COLUMN_M,
    RADIUS_M,
    ROW_M,
    WINDOW,
    LoadGenerators,
    Measured,
    Sizes,
    cpu_seconds,
    figures,
    match_latency,
    upload_latency,
    walk,
)
from fanny_tui.protocol.proximity import haversine_m as distance_m
from tests.broker.kit import running


def _partners(index: int, total: int, steps: range) -> set[int]:
    """Devices within the matching radius of device ``index`` at any of ``steps``."""
    met = set()
    for step in steps:
        here = walk(index, total, step)
        for other in range(total):
            if other != index and distance_m(*here, *walk(other, total, step)) <= RADIUS_M:
                met.add(other)
    return met


def test_walking_devices_keep_meeting_new_ones():
    total = 200
    first = _partners(60, total, range(1))
    later = _partners(60, total, range(1, 40))
    assert first                      # a neighbour of the next row is in range at the start
    assert later - first              # and walking on, new ones come in range


def test_density_is_constant_whatever_the_number_of_devices():
    for total in (100, 1000, 10_000):
        lats, lons = zip(*(walk(i, total, 0) for i in range(total)), strict=True)
        height = distance_m(min(lats), lons[0], max(lats), lons[0]) + ROW_M
        width = distance_m(lats[0], min(lons), lats[0], max(lons)) + COLUMN_M
        per_device = width * height / total
        assert 0.8 * ROW_M * COLUMN_M < per_device < 1.3 * ROW_M * COLUMN_M, total


def test_cpu_seconds_counts_reaped_children():
    import os
    me = os.getpid()
    before = cpu_seconds(me, children=True)
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    assert cpu_seconds(me, children=True) > before
    assert cpu_seconds(me) >= 0
    assert cpu_seconds(2**22 + 12345) == 0.0   # no such process


def test_figures_are_ratios_to_the_embedded_broker():
    sizes = Sizes(devices_per_broker=10, seconds=1.0, probes=2, uploads=2)
    embedded = Measured(1, updates=1000, updates_per_broker=[1000], seconds=1.0,
                        broker_cpu_s=0.02, match_s=[0.001, 0.001], upload_s=[0.01, 0.01],
                        upload_broker_cpu_s=0.004)
    region = Measured(2, updates=1500, updates_per_broker=[700, 800], seconds=1.0,
                      broker_cpu_s=0.045, store_cpu_s={"Redis": 0.01, "PostgreSQL": 0.005},
                      match_s=[0.002, 0.002],
                      upload_s=[0.02, 0.02], upload_broker_cpu_s=0.004,
                      upload_store_cpu_s={"Redis": 0.0, "PostgreSQL": 0.004})
    rows = {f.name: f for f in figures(embedded, [region], embedded, 1e5, 1e3, sizes)}
    assert rows["region2_updates_per_s"].ratio == 1.5
    assert rows["region2_updates_per_s_broker"].value == 750
    assert math.isclose(rows["region2_update_cpu_us"].value, 40.0)
    assert math.isclose(rows["region2_update_cpu_us"].ratio, 2.0)
    assert math.isclose(rows["region2_broker_capacity_per_s"].ratio, (1500 / 0.045) / 50_000)
    assert math.isclose(rows["region2_redis_capacity_per_s"].value, 1500 / 0.01)
    assert math.isclose(rows["region2_match_ms"].ratio, 2.0)
    assert math.isclose(rows["region2_upload_cpu_ms"].ratio, 2.0)
    assert rows["pgbench_tps"].value == 1e3 and rows["pgbench_tps"].floor is None
    assert rows["embedded_again_update_cpu_us"].ratio == 1.0


async def _load(url: str, total: int, seconds: float, time_unit: float
                ) -> tuple[LoadGenerators, list[dict[str, Any]]]:
    """Run ``total`` walking devices against the broker at ``url`` for ``seconds`` through
    :class:`LoadGenerators` (started, run, always stopped); the generators and their results."""
    load = LoadGenerators([url], total=total, seconds=seconds)
    try:
        await load.start(timeout_s=60 * time_unit)
        return load, await load.run(timeout_s=60 * time_unit)
    finally:
        await load.stop()


async def test_load_generators_and_probes_on_a_real_broker(tmp_path, time_unit):
    async with running(tmp_path, position_rate_per_s=10_000.0, position_burst=2 * WINDOW,
                       max_connections_per_address=0) as broker:
        load, results = await _load(broker.url, 20, 0.5, time_unit)
        assert len(results) == 2
        assert all(r["refused"] == {} for r in results)
        assert sum(r["updates"][0] for r in results) >= 20 * WINDOW   # every device walked
        assert sum(r["matches"] for r in results) > 0                 # and met others
        assert all(p.returncode == 0 for p in load.procs)

        assert 0 < await match_latency([broker.url], 0) < 30
        assert 0 < await upload_latency(broker.url, random.Random(1)) < 30


async def test_refused_positions_are_not_counted_as_updates(tmp_path, time_unit):
    async with running(tmp_path, position_rate_per_s=1.0, position_burst=2,
                       max_connections_per_address=0) as broker:
        _, results = await _load(broker.url, 4, 0.3, time_unit)
    refused = sum(r["refused"].get("rate_limited", 0) for r in results)
    updates = sum(r["updates"][0] for r in results)
    assert refused > 0
    # every position sent in the run was either counted or refused (whole windows were sent)
    assert (updates + refused) % WINDOW == 0 and updates + refused >= 4 * WINDOW
    assert updates < 4 * WINDOW


def test_the_benchmarks_postgres_is_durable_and_its_cpu_is_counted():
    import psycopg

    from benchmarks.region import postgres_cpu_s, postgres_server

    with postgres_server() as server:
        with psycopg.connect(server.url(), autocommit=True) as db:
            settings = dict(db.execute("SELECT name, setting FROM pg_settings WHERE name IN "
                                       "('fsync', 'full_page_writes')").fetchall())
        assert settings == {"fsync": "on", "full_page_writes": "on"}   # tests/pg.py turns them off
        before = postgres_cpu_s(server)
        with psycopg.connect(server.url(), autocommit=True) as db:   # work in a backend
            db.execute("SELECT sum(i) FROM generate_series(1, 5000000) AS i").fetchone()
            during = postgres_cpu_s(server)
        assert during > before + 0.05                 # the backend's CPU, while it is alive
        # Once a backend has exited, its CPU reaches the postmaster's reaped-children time
        # only now and then on this kernel (seen: the total fell back to the postmaster's
        # own), so the benchmark measures through the brokers' long-lived connections, whose
        # backends live for the whole measurement (benchmarks/region.py, cpu_seconds).
