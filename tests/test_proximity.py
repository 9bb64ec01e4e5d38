"""Tests for fanny_tui.protocol.proximity: the grid's ``near()`` equals a brute-force haversine
scan everywhere, including at the poles and across the antimeridian (paper 3, steps 2-3)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanny_tui.protocol.proximity import (
    EARTH_RADIUS_M,
    METRES_PER_DEGREE,
    Point,
    ProximityGrid,
    coarsest_matching_accuracy_m,
    haversine_m,
    within_radius,
)

finite = {"allow_nan": False, "allow_infinity": False}
latitudes = st.floats(-90, 90, **finite)
longitudes = st.floats(-180, 180, **finite)

# Where trouble lives: anywhere, at and near both poles, on and near the antimeridian.
hotspots = st.one_of(
    st.tuples(latitudes, longitudes),
    st.tuples(st.floats(89.0, 90.0, **finite), longitudes),
    st.tuples(st.floats(-90.0, -89.0, **finite), longitudes),
    st.tuples(latitudes, st.floats(179.0, 180.0, **finite)),
    st.tuples(latitudes, st.floats(-180.0, -179.0, **finite)),
    st.sampled_from([(90.0, 0.0), (-90.0, 0.0), (0.0, 180.0), (0.0, -180.0), (89.99, 180.0),
                     (-89.99, -180.0), (0.0, 0.0)]),
)
cell_sizes = st.sampled_from([1.0, 10.0, 150.0, 1000.0, 10_000.0]) | st.floats(0.5, 20_000)


def wrap_lon(lon: float) -> float:
    lon = (lon + 180.0) % 360.0 - 180.0
    return lon


def clamp_lat(lat: float) -> float:
    return max(-90.0, min(90.0, lat))


@st.composite
def near_point(draw: st.DrawFn, hotspot: tuple[float, float], spread_m: float) -> Point:
    """A point within about ``spread_m`` metres of the hotspot (east-west scaled by latitude)."""
    lat0, lon0 = hotspot
    north = draw(st.floats(-spread_m, spread_m, **finite))
    east = draw(st.floats(-spread_m, spread_m, **finite))
    lat = clamp_lat(lat0 + north / METRES_PER_DEGREE)
    cos = max(math.cos(math.radians(lat)), 1e-9)
    dlon = max(-360.0, min(360.0, east / (METRES_PER_DEGREE * cos)))
    return Point(lat, wrap_lon(lon0 + dlon))


@st.composite
def scenes(draw: st.DrawFn) -> tuple[float, float, list[tuple[str, Point | None]], Point]:
    cell_m = draw(cell_sizes)
    radius_m = cell_m * draw(st.floats(0.01, 1.0, **finite))
    spot = draw(hotspots)
    spread = 3 * cell_m
    ops = draw(st.lists(
        st.tuples(st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
                  st.none() | near_point(spot, spread) | near_point(spot, spread)),
        max_size=60))
    query = draw(near_point(spot, spread))
    return cell_m, radius_m, ops, query


def brute_force(points: dict[str, Point], query: Point, radius_m: float) -> dict[str, float]:
    return {k: d for k, p in points.items()
            if (d := haversine_m(query.latitude, query.longitude, p.latitude, p.longitude))
            <= radius_m}


@settings(max_examples=400, deadline=None)
@given(scenes())
def test_near_equals_brute_force(scene: tuple[float, float, list[tuple[str, Point | None]],
                                              Point]) -> None:
    cell_m, radius_m, ops, query = scene
    grid: ProximityGrid[str] = ProximityGrid(cell_m)
    points: dict[str, Point] = {}
    for key, point in ops:  # puts, moves and removes
        if point is None:
            grid.remove(key)
            points.pop(key, None)
        else:
            grid.put(key, point.latitude, point.longitude)
            points[key] = point
    assert len(grid) == len(points)
    assert all(grid.position(k) == p for k, p in points.items())
    found = list(grid.near(query.latitude, query.longitude, radius_m))
    assert len(found) == len({k for k, _ in found}), "a key reported twice"
    assert dict(found) == brute_force(points, query, radius_m)


@pytest.mark.parametrize(("a", "b"), [
    ((0.0, 179.99995), (0.0, -179.99995)),    # 11 m apart across the antimeridian
    ((0.0, 180.0), (0.0, -180.0)),            # the same meridian, written twice
    ((89.99995, 0.0), (89.99995, 180.0)),     # 11 m apart across the north pole
    ((-90.0, 0.0), (-90.0, 123.0)),           # the south pole, any longitude
    ((45.0, 179.99995), (45.0, -179.99995)),
])
def test_edge_neighbours_are_found(a: tuple[float, float], b: tuple[float, float]) -> None:
    distance = haversine_m(*a, *b)
    assert distance < 15.0
    grid: ProximityGrid[str] = ProximityGrid(15.0)
    grid.put("b", *b)
    assert [k for k, _ in grid.near(*a, 15.0)] == ["b"]


def test_haversine_known_values() -> None:
    assert haversine_m(10.0, 20.0, 10.0, 20.0) == 0.0
    assert haversine_m(0.0, 0.0, 1.0, 0.0) == pytest.approx(METRES_PER_DEGREE)
    assert haversine_m(0.0, 0.0, 0.0, 180.0) == pytest.approx(math.pi * EARTH_RADIUS_M)
    assert haversine_m(90.0, 0.0, -90.0, 0.0) == pytest.approx(math.pi * EARTH_RADIUS_M)
    # Paris (Notre-Dame) to London (St Paul's): about 341 km on the sphere.
    assert haversine_m(48.853, 2.3499, 51.5138, -0.0984) == pytest.approx(341_000, rel=0.01)


@given(latitudes, longitudes, latitudes, longitudes)
def test_haversine_is_symmetric_and_bounded(lat1: float, lon1: float, lat2: float, lon2: float
                                            ) -> None:
    d = haversine_m(lat1, lon1, lat2, lon2)
    assert d == pytest.approx(haversine_m(lat2, lon2, lat1, lon1), abs=1e-6)
    assert 0.0 <= d <= math.pi * EARTH_RADIUS_M + 1e-6


@pytest.mark.parametrize(("lat", "lon"), [(90.1, 0), (-90.1, 0), (0, 180.1), (0, -180.1),
                                          (math.nan, 0), (0, math.nan), (math.inf, 0)])
def test_put_refuses_bad_positions(lat: float, lon: float) -> None:
    grid: ProximityGrid[str] = ProximityGrid(10.0)
    with pytest.raises(ValueError, match="latitude|longitude"):
        grid.put("a", lat, lon)
    assert len(grid) == 0


@pytest.mark.parametrize("cell_m", [0.0, -1.0, math.inf, math.nan])
def test_bad_cell_size(cell_m: float) -> None:
    with pytest.raises(ValueError, match="cell_m"):
        ProximityGrid(cell_m)


@pytest.mark.parametrize("radius_m", [0.0, -1.0, 10.5, math.nan])
def test_radius_must_fit_the_cell(radius_m: float) -> None:
    grid: ProximityGrid[str] = ProximityGrid(10.0)
    with pytest.raises(ValueError, match="radius_m"):
        list(grid.near(0.0, 0.0, radius_m))


def test_remove_and_move() -> None:
    grid: ProximityGrid[str] = ProximityGrid(10.0)
    grid.put("a", 44.0, 5.0)
    grid.put("a", 45.0, 5.0)  # a move, not a second entry
    assert len(grid) == 1 and "a" in grid
    assert list(grid.near(44.0, 5.0, 10.0)) == []
    assert [k for k, _ in grid.near(45.0, 5.0, 10.0)] == ["a"]
    grid.remove("a")
    grid.remove("a")  # absent: no effect
    assert len(grid) == 0 and grid.position("a") is None
    assert grid._rows == {}, "empty cells and rows are dropped"


def test_keys_and_cells_are_invisible_to_the_garbage_collector() -> None:
    # Issue 7, point 5: no object the cyclic collector tracks per key or per cell (a full
    # pass walks every tracked object); 10,000 keys, one cell each, then moved in pairs.
    import gc
    n = 10_000
    grid: ProximityGrid[str] = ProximityGrid(10.0)
    keys = [f"key-{i}" for i in range(n)]
    gc.collect()
    before = len(gc.get_objects())
    for i, key in enumerate(keys):
        grid.put(key, 44.0 + (i // 100) * 0.001, 5.0 + (i % 100) * 0.001)
    for i, key in enumerate(keys[::2]):
        grid.put(key, 45.0 + (i // 100) * 0.001, 5.0 + (i % 100) * 0.001 + 1e-6)
    assert len(grid) == n and [k for k, _ in grid.near(45.0, 5.0, 1.0)] == ["key-0"]
    gc.collect()
    growth = len(gc.get_objects()) - before
    assert growth < 0.1 * n, f"{growth} more objects tracked by the collector for {n} keys"


# --- the vectors of docs/protocol.md, "Distance" and "The accuracy rule" ----------------------

_DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
_NUM = r"(-?\d+(?:\.\d+)?)"
_DISTANCE_ROW = re.compile(rf"^\| {_NUM} \| {_NUM} \| {_NUM} \| {_NUM} \| (\d+\.\d{{3}}) \|$", re.M)
_ACC = r"(\d+(?:\.\d+)?|–)"
_RULE_ROW = re.compile(
    rf"^\| {_NUM} \| {_NUM} \| {_ACC} \| {_ACC} \| `(in|uncertain|out)` \| [^|]+ \|$", re.M)


def _doc_section(heading: str) -> str:
    text = _DOC.read_text(encoding="utf-8")
    return text.split(f"\n### {heading}\n", 1)[1].split("\n### ", 1)[0]


def _distance_vectors() -> list[tuple[float, float, float, float, float]]:
    rows = _DISTANCE_ROW.findall(_doc_section("Distance"))
    return [tuple(float(v) for v in row) for row in rows]  # type: ignore[misc]


def _rule_vectors() -> list[tuple[float, float, float | None, float | None, str]]:
    def accuracy(text: str) -> float | None:
        return None if text == "–" else float(text)
    return [(float(d), float(r), accuracy(a), accuracy(b), verdict)
            for d, r, a, b, verdict in _RULE_ROW.findall(_doc_section("The accuracy rule"))]


def test_the_documented_earth_radius_is_the_one_used() -> None:
    assert "**R = 6,371,008.8 m**" in _doc_section("Distance")
    assert EARTH_RADIUS_M == 6_371_008.8


def test_the_distance_vectors_are_all_read() -> None:
    section = _doc_section("Distance")
    table_rows = [line for line in section.splitlines()
                  if line.startswith("| ") and not line.startswith(("| latitude", "|---"))]
    assert len(table_rows) == len(_distance_vectors()) >= 8


@pytest.mark.parametrize("vector", _distance_vectors(), ids=str)
def test_haversine_matches_the_documented_vectors(
        vector: tuple[float, float, float, float, float]) -> None:
    lat1, lon1, lat2, lon2, metres = vector
    assert haversine_m(lat1, lon1, lat2, lon2) == pytest.approx(metres, abs=0.0005)
    assert haversine_m(lat2, lon2, lat1, lon1) == pytest.approx(metres, abs=0.0005)


def test_the_rule_vectors_are_all_read_and_cover_every_verdict() -> None:
    section = _doc_section("The accuracy rule")
    table_rows = [line for line in section.splitlines()
                  if line.startswith("| ") and line.count("|") == 7 and not line.startswith(
                      ("| d ", "|---"))]
    vectors = _rule_vectors()
    assert len(table_rows) == len(vectors) >= 10
    assert {v[4] for v in vectors} == {"in", "uncertain", "out"}


@pytest.mark.parametrize("vector", _rule_vectors(), ids=str)
def test_within_radius_matches_the_documented_vectors(
        vector: tuple[float, float, float | None, float | None, str]) -> None:
    distance, radius, a, b, verdict = vector
    assert within_radius(distance, radius, a, b) == verdict
    assert within_radius(distance, radius, b, a) == verdict  # symmetric in the two fixes


def test_the_coarsest_matching_accuracy_with_an_equal_peer() -> None:
    # docs/protocol.md, "The accuracy rule": an equal peer past 3 r / sqrt(2) never matches.
    assert coarsest_matching_accuracy_m(10.0) == pytest.approx(21.2132, abs=1e-4)
    assert within_radius(0.0, 10.0, 21.2, 21.2) == "in"
    assert within_radius(0.0, 10.0, 21.3, 21.3) == "uncertain"   # eph 23 m: never in
    assert coarsest_matching_accuracy_m(10.0, 0.0) == pytest.approx(30.0)
    assert coarsest_matching_accuracy_m(10.0, 24.0) == pytest.approx(18.0)
    assert coarsest_matching_accuracy_m(10.0, 30.5) == 0.0      # the peer alone is past it


@given(st.floats(0.5, 1000, **finite), st.none() | st.floats(0, 5000, **finite))
def test_the_coarsest_matching_accuracy_is_the_gate_of_within_radius(
        radius: float, peer: float | None) -> None:
    limit = coarsest_matching_accuracy_m(radius, peer)
    other = limit if peer is None else peer
    if limit > 0:
        assert within_radius(0.0, radius, limit * (1 - 1e-9), other * (1 - 1e-9)) == "in"
    coarser = limit * (1 + 1e-6) + 1e-6
    other = coarser if peer is None else peer
    assert within_radius(0.0, radius, coarser, other) == "uncertain"


@pytest.mark.parametrize("radius, peer", [(0.0, None), (-1.0, None), (math.nan, None),
                                          (10.0, -1.0), (10.0, math.inf)])
def test_the_coarsest_matching_accuracy_refuses_bad_input(radius: float,
                                                          peer: float | None) -> None:
    with pytest.raises(ValueError, match="radius_m|peer_accuracy_m"):
        coarsest_matching_accuracy_m(radius, peer)
