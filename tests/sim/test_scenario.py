"""Scenario files: GPX 1.1 tracks, generated walks, TOML tables, one-line errors."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fanny_tui.config import ConfigError
from fanny_tui.protocol.proximity import haversine_m
from fanny_tui.sim.scenario import (
    Track,
    load_scenario,
    tracks_from_gpx,
    tracks_to_gpx,
    walk_track,
)
from fanny_tui.sim.truth import true_contacts, true_pairs

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
START = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
LAT, LON = 43.6045, 1.444

GPX_NO_TIME = """<?xml version="1.0" encoding="UTF-8"?>
<gpx version="1.1" creator="test" xmlns="http://www.topografix.com/GPX/1/1">
<trk><name>alice</name><trkseg>
<trkpt lat="43.6" lon="1.44"><time>2026-05-04T09:00:00Z</time></trkpt>
<trkpt lat="43.6" lon="1.44"></trkpt>
</trkseg></trk></gpx>"""


def two_tracks() -> list[Track]:
    return [Track("alice", (0.0, 60.0, 120.0), (LAT, LAT + 1e-4, LAT + 2e-4), (LON,) * 3),
            Track("bob", (30.0, 90.0), (LAT, LAT), (LON + 1e-4, LON + 2e-4))]


def test_gpx_round_trip_keeps_names_times_and_positions():
    text = tracks_to_gpx(two_tracks(), START)
    assert 'version="1.1"' in text and text.count("<trk>") == 2
    tracks, origin = tracks_from_gpx(text)
    assert origin == START
    for got, want in zip(tracks, two_tracks(), strict=True):
        assert got.name == want.name and got.times_s == want.times_s
        for t in want.times_s:
            assert haversine_m(*got.position_at(t), *want.position_at(t)) < 0.02


def test_positions_are_interpolated_and_absent_outside_the_track():
    alice = two_tracks()[0]
    assert alice.position_at(30.0) == pytest.approx((LAT + 0.5e-4, LON))
    assert alice.position_at(-0.1) is None and alice.position_at(120.1) is None
    assert alice.position_at(120.0) == pytest.approx((LAT + 2e-4, LON))


@pytest.mark.parametrize(("text", "message"), [
    (GPX_NO_TIME, "track 'alice' point 2 has no <time>"),
    ('<gpx version="1.1" xmlns="http://www.topografix.com/GPX/1/1"></gpx>', "no <trk>"),
    ("this is not xml", "not a readable GPX document"),
])
def test_bad_gpx_is_one_line_naming_the_problem(text, message):
    with pytest.raises(ValueError) as caught:
        tracks_from_gpx(text, what="walk.gpx")
    assert message in str(caught.value)
    assert str(caught.value).startswith("walk.gpx: ") and "\n" not in str(caught.value)


def test_duplicate_track_names_are_refused():
    text = tracks_to_gpx([two_tracks()[0], two_tracks()[0]], START)
    with pytest.raises(ValueError, match="two tracks are named 'alice'"):
        tracks_from_gpx(text)


def test_a_walk_has_a_point_a_second_and_stays_within_its_radius():
    walk = walk_track("w", LAT, LON, radius_m=20.0, speed_m_s=1.2, seed=4, start_s=60.0,
                      end_s=660.0)
    assert walk.times_s[0] == 60.0 and walk.times_s[-1] == 660.0 and len(walk.times_s) == 601
    assert max(haversine_m(LAT, LON, a, b)
               for a, b in zip(walk.latitudes, walk.longitudes, strict=True)) <= 20.0
    again = walk_track("w", LAT, LON, radius_m=20.0, speed_m_s=1.2, seed=4, start_s=60.0,
                       end_s=660.0)
    assert again == walk


def write(tmp_path: Path, toml: str, gpx: str | None = None) -> Path:
    if gpx is not None:
        (tmp_path / "tracks.gpx").write_text(gpx)
    path = tmp_path / "case.toml"
    path.write_text(toml)
    return path


def test_a_scenario_with_gpx_and_walks(tmp_path):
    path = write(tmp_path, """
[scenario]
gpx = "tracks.gpx"
seed = 9
speed = 20
[[walk]]
name = "carol"
latitude = 43.6045
longitude = 1.444
radius_m = 5
[noise]
sigma_m = 3
[truth]
duration_s = 60
close_radius_m = 2.5
[protocol]
radius_m = 15
min_contact_s = 30
""", tracks_to_gpx(two_tracks(), START))
    scenario = load_scenario(path)
    assert scenario.name == "case"
    assert [t.name for t in scenario.tracks] == ["alice", "bob", "carol"]
    assert scenario.duration_s == 120.0                 # the GPX span
    assert scenario.tracks[2].end_s == 120.0            # a walk lasts the scenario
    assert (scenario.seed, scenario.speed, scenario.noise.sigma_m) == (9, 20.0, 3.0)
    assert scenario.truth.duration_s == 60.0 and scenario.truth.radius_m == 10.0
    assert scenario.truth.close_radius_m == 2.5
    assert scenario.protocol == {"radius_m": 15.0, "min_contact_s": 30.0}


@pytest.mark.parametrize(("toml", "key"), [
    ('[scenario]\ngpx = "missing.gpx"\n', "scenario.gpx"),
    ("[scenario]\nduration_s = 60\n", "scenario.gpx"),                 # no device at all
    ("[scenario]\nduration_s = 60\n[noise]\nsigma = 3\n", "noise.sigma"),
    ("[scenario]\nduration_s = 60\n[noise]\nsigma_m = -1\n", "noise.sigma_m"),
    ("[scenario]\nduration_s = 60\n[protocol]\nradius_m = 0\n", "protocol.radius_m"),
    ("[scenario]\nduration_s = 60\n[protocol]\nradius = 5\n", "protocol.radius"),
    ("[scenario]\nduration_s = 60\n[[walk]]\nlatitude = 43.6\n", "walk[0].latitude"),
    ("[[walk]]\nlatitude = 43.6\nlongitude = 1.4\n", "walk[0].end_s"),
    ("[[walk]]\nlatitude = 43.6\nlongitude = 1.4\nstart_s = 50\nend_s = 40\n", "walk[0].end_s"),
    ("[scenario]\nduration_s = 60\n[truth]\nclose_radius_m = 0\n", "truth.close_radius_m"),
    ("[scenario]\nduration_s = 60\n[truth]\nradius_m = 5\nclose_radius_m = 6\n",
     "truth.close_radius_m"),
    ("[scenerio]\n", "scenerio"),
    ("[scenario\n", "file"),
])
def test_bad_scenarios_are_one_line_naming_the_file_and_key(tmp_path, toml, key):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: {key}: expected"), text
    assert "\n" not in text


def test_the_street_scenario_holds_what_it_promises():
    scenario = load_scenario(SCENARIOS / "street.toml")
    assert len(scenario.tracks) == 20 and scenario.duration_s == 900.0
    contacts = true_contacts(scenario.tracks, scenario.truth.radius_m,
                             scenario.truth.duration_s)
    assert true_pairs(contacts) == {("couple-1", "couple-2"), ("corner-1", "corner-2"),
                                    ("cafe-1", "cafe-2")}
    assert all(c.duration_s >= 360 for c in contacts)            # 6+ minutes
    # people across the street: 15-30 m apart for minutes, never within 10 m
    across = true_contacts(scenario.tracks, 30.0, 240.0)
    assert {("bus-stop", "terrace-across"), ("shop-window", "waiting-across"),
            ("doorway-north", "doorway-south")} <= true_pairs(across)
    # passers-by are close to others, but for seconds only
    brief = [c for c in true_contacts(scenario.tracks, 10.0, 0.0) if "passer" in c.a + c.b]
    assert len(brief) >= 20 and max(c.duration_s for c in brief) < 60


def test_the_queue_scenario_holds_what_it_promises():
    scenario = load_scenario(SCENARIOS / "queue.toml")
    assert len(scenario.tracks) == 10
    contacts = true_contacts(scenario.tracks, 10.0, 300.0)
    assert len(true_pairs(contacts)) >= 20
    assert min(c.closest_m for c in contacts) >= 1.0
    neighbours = [c for c in contacts if c.closest_m <= 3.0]
    assert len(neighbours) >= 7                                   # people 1-3 m apart
    # its closer tier: the neighbours within 3 m for 5 minutes, the contacts that must count
    assert (scenario.truth.close_radius_m, scenario.truth.duration_s) == (3.0, 300.0)
    close = true_pairs(true_contacts(scenario.tracks, 3.0, 300.0))
    assert close == {(f"queue-{i:02d}", f"queue-{i + 1:02d}") for i in range(3, 10)}
    assert close <= true_pairs(contacts)


def test_the_shipped_gpx_files_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_scenarios",
                                                  ROOT / "tools" / "make_scenarios.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, tracks in (("street", module.street()), ("queue", module.queue())):
        text = tracks_to_gpx(tracks, module.START, creator="fanny-sim tools/make_scenarios.py")
        assert (SCENARIOS / f"{name}.gpx").read_text() == text, name
