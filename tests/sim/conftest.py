"""Fixtures of the simulator tests: a small scenario on disk (GPX 1.1 + TOML)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from fanny_tui.sim.scenario import Track, tracks_to_gpx
from fanny_tui.sim.tracks import offset

LAT, LON = 43.6045, 1.444


def standing(name: str, east_m: float, north_m: float, t0: float, t1: float) -> Track:
    lat, lon = offset(LAT, LON, east_m, north_m)
    return Track(name, (t0, t1), (lat, lat), (lon, lon))


@pytest.fixture
def small_scenario(tmp_path: Path) -> Path:
    """Three devices for 150 s: ``a`` and ``b`` stand 3 m apart all along (a true contact of
    10 m / 60 s, and a close one of 5 m / 60 s), ``c`` stands 300 m away (no contact). Low
    noise, speed 10."""
    tracks = [standing("a", 0, 0, 0, 150), standing("b", 3, 0, 0, 150),
              standing("c", 300, 0, 0, 150)]
    (tmp_path / "small.gpx").write_text(
        tracks_to_gpx(tracks, datetime(2026, 5, 4, 9, 0, tzinfo=UTC)))
    path = tmp_path / "small.toml"
    path.write_text("""
[scenario]
name = "small"
gpx = "small.gpx"
seed = 1
speed = 10
[noise]
sigma_m = 1.0
correlation_s = 30.0
[truth]
radius_m = 10.0
duration_s = 60.0
close_radius_m = 5.0
[protocol]
radius_m = 10.0
position_interval_s = 5.0
""")
    return path
