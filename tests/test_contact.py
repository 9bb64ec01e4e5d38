"""Tests for the narrow contact (fanny_tui.protocol.contact) and the one accuracy rule it shares
with the broker (fanny_tui.protocol.proximity.within_radius): examples and Hypothesis
properties. Pure: no network, no clock (``now`` is passed in)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanny_tui.protocol.contact import (
    JUMP_ACCEPTED,
    JUMP_CONFIRMATIONS,
    JUMP_REPEATED,
    ContactMeasures,
    ContactMeter,
    Fix,
    JumpFilter,
    jump_verdict,
    merge_measures,
)
from fanny_tui.protocol.proximity import (
    bearing_deg,
    combined_accuracy_m,
    haversine_m,
    within_radius,
)

LAT, LON = 43.6045, 1.444
METRE = 1 / 111_195.0  # about one metre of latitude, in degrees

finite = {"allow_nan": False, "allow_infinity": False}
distances = st.floats(0.0, 1_000.0, **finite)
radii = st.floats(0.5, 500.0, **finite)
accuracies = st.none() | st.floats(0.0, 500.0, **finite)


def at(north_m: float, accuracy_m: float | None = 3.0) -> Fix:
    return Fix(LAT + north_m * METRE, LON, accuracy_m)


# --- the accuracy rule -------------------------------------------------------------------------


@pytest.mark.parametrize(("distance", "a", "b", "verdict"), [
    (5.0, 3.0, 4.0, "in"),          # c = 5 m
    (10.0, 3.0, 4.0, "in"),         # on the radius counts
    (14.0, 3.0, 4.0, "uncertain"),  # 14 - 5 = 9 <= 10: the fixes cannot tell
    (15.0, 3.0, 4.0, "uncertain"),  # 15 - 5 = 10: still not beyond
    (15.1, 3.0, 4.0, "out"),
    (2.0, 25.0, 25.0, "uncertain"),  # c = 35.4 m > 3 x 10 m: too vague to say "in"
    (2.0, 21.0, 21.0, "in"),        # c = 29.7 m <= 30 m
    (10.0, None, None, "in"),       # unknown accuracies count as 0
    (10.01, None, None, "out"),
])
def test_rule_examples(distance: float, a: float | None, b: float | None, verdict: str) -> None:
    assert within_radius(distance, 10.0, a, b) == verdict


@given(distance=distances, radius=radii, a=accuracies, b=accuracies)
def test_rule_properties(distance: float, radius: float, a: float | None,
                         b: float | None) -> None:
    verdict = within_radius(distance, radius, a, b)
    c = combined_accuracy_m(a, b)
    assert verdict in ("in", "uncertain", "out")
    if verdict == "in":
        assert distance <= radius and c <= 3 * radius
    if verdict == "out":
        assert distance - c > radius
    assert within_radius(distance, radius, a, b) == within_radius(distance, radius, b, a)


@given(d1=distances, d2=distances, radius=radii, a=accuracies, b=accuracies)
def test_rule_is_monotone_in_distance(d1: float, d2: float, radius: float, a: float | None,
                                      b: float | None) -> None:
    """Moving apart never turns a sample "more within": in > uncertain > out."""
    rank = {"in": 2, "uncertain": 1, "out": 0}
    near, far = sorted((d1, d2))
    assert rank[within_radius(near, radius, a, b)] >= rank[within_radius(far, radius, a, b)]


@given(distance=distances, radius=radii, a=st.floats(0, 100), b=st.floats(0, 100),
       worse=st.floats(0, 100))
def test_worse_accuracy_never_makes_a_sample_in(distance: float, radius: float, a: float,
                                                b: float, worse: float) -> None:
    if within_radius(distance, radius, a + worse, b) == "in":
        assert within_radius(distance, radius, a, b) == "in"


def test_bearing() -> None:
    assert bearing_deg(LAT, LON, LAT + 0.001, LON) == pytest.approx(0.0, abs=1e-6)
    assert bearing_deg(LAT, LON, LAT, LON + 0.001) == pytest.approx(90.0, abs=0.01)
    assert bearing_deg(LAT, LON, LAT - 0.001, LON) == pytest.approx(180.0, abs=1e-6)
    assert bearing_deg(LAT, LON, LAT, LON - 0.001) == pytest.approx(270.0, abs=0.01)
    assert bearing_deg(LAT, LON, LAT, LON) == 0.0


@given(lat1=st.floats(-89, 89), lon1=st.floats(-180, 180), lat2=st.floats(-89, 89),
       lon2=st.floats(-180, 180))
def test_bearing_is_in_range(lat1: float, lon1: float, lat2: float, lon2: float) -> None:
    assert 0.0 <= bearing_deg(lat1, lon1, lat2, lon2) < 360.0


# --- the meter -------------------------------------------------------------------------------


def meter(radius: float = 10.0, gap: float = 10.0, speed: float = 30.0) -> ContactMeter:
    return ContactMeter(radius, gap, speed)


def test_no_sample_without_an_own_fix() -> None:
    m = meter()
    assert m.peer(at(1), 0.0) is None
    assert m.measures() == ContactMeasures()
    m.own(at(0), 0.5)
    sample = m.peer(at(2), 1.0)
    assert sample is not None and sample.verdict == "in" and sample.samples == 1


def test_no_sample_while_this_device_has_lost_its_fix() -> None:
    """A device whose receiver lost the fix does not measure the peer against its last known
    position (it may have walked away: the sim's queue-02 counted 323 s within the radius
    against its peer's 238 s after leaving with no fix); samples resume with a fix, and the
    jump rule keeps its anchor across the loss."""
    m = meter(gap=10.0)
    m.own(at(0), 0.0)
    assert m.peer(at(2), 1.0) is not None
    assert m.own(None, 2.0) is False
    for t in (3.0, 4.0, 5.0):
        assert m.peer(at(2), t) is None
    assert m.within_s == 0.0 and m.measures().samples == 1
    assert m.own(at(0.5), 6.0)                   # the fix is back, 0.5 m from the last one
    sample = m.peer(at(2), 7.0)
    assert sample is not None and sample.verdict == "in" and sample.samples == 2
    assert m.within_s == 6.0
    m.own(None, 8.0)
    assert not m.own(at(5000), 9.0)              # a jump right after the loss is still one
    assert m.peer(at(2), 10.0) is None


def test_duration_bridges_gaps_shorter_than_contact_gap_s() -> None:
    m = meter(gap=10.0)
    m.own(at(0), 0.0)
    for t, north in ((0, 2), (5, 2), (8, 40), (12, 2)):  # an "out" sample at 8 s is bridged
        m.peer(at(north), float(t))
    assert m.within_s == 12.0
    m.peer(at(2), 30.0)  # 18 s since the last "in": a new span starts, worth 0 s so far
    assert m.within_s == 12.0
    m.peer(at(2), 33.0)
    assert m.within_s == 15.0
    measures = m.measures()
    assert measures.duration_s == 15.0 and measures.samples == 6
    assert measures.closest_m == pytest.approx(2.0, abs=0.01)
    assert measures.median_m == pytest.approx(2.0, abs=0.01)


def test_uncertain_samples_never_count() -> None:
    m = meter()
    m.own(at(0, 40.0), 0.0)  # a very vague own fix
    for t in range(10):
        sample = m.peer(at(1, 40.0), float(t))
        assert sample is not None and sample.verdict == "uncertain"
    assert m.within_s == 0.0 and m.last_in is None


def test_jump_filter_rejects_an_outlier_and_accepts_a_real_move_later() -> None:
    f = JumpFilter(max_speed_mps=10.0)
    assert f.accept(at(0), 0.0)
    assert not f.accept(at(200), 1.0)       # 200 m/s
    assert f.accept(at(5), 2.0)             # 2.5 m/s from the last accepted fix
    assert not f.accept(at(200), 3.0)       # 195 m in 1 s
    assert f.accept(at(200), 30.0)          # 195 m in 28 s: plausible by now
    assert f.rejected == 2


def test_a_wrong_first_fix_does_not_hold_off_the_true_ones() -> None:
    """A receiver's first fix 100 km off (cold start), then its true, jittering fixes: the
    third true fix in a row is accepted (not after 100 km / 30 m/s = an hour)."""
    assert JUMP_CONFIRMATIONS == 3
    f = JumpFilter(max_speed_mps=30.0)
    assert f.accept(at(100_000), 0.0)
    assert not f.accept(at(0.0), 1.0)
    assert not f.accept(at(0.0), 2.0)       # the same fix again confirms nothing
    assert not f.accept(at(0.4), 3.0)
    assert f.accept(at(0.2), 4.0)           # three true fixes in a row, each plausible
    assert f.last == at(0.2) and f.rejected == 3
    assert f.accept(at(0.5), 5.0)


def test_one_or_two_jumps_in_a_row_are_never_accepted() -> None:
    f = JumpFilter(max_speed_mps=30.0)
    assert f.accept(at(0), 0.0)
    for t in range(1, 50, 3):               # outliers 500 m off, one or two at a time
        assert not f.accept(at(500), float(t))
        assert not f.accept(at(501), t + 1.0)
        assert f.accept(at(0.1 * t), t + 2.0)
    # A run broken by an implausible member starts again from it.
    assert not f.accept(at(500), 60.0)
    assert not f.accept(at(900), 61.0)      # 400 m from the run's last: a new run
    assert not f.accept(at(901), 62.0)
    assert f.accept(at(902), 63.0)
    # A fix that is plausible by now is accepted at once, whatever the run.
    assert f.accept(at(902 + 29 * 5), 68.0)


def test_a_fix_at_the_same_instant_confirms_no_run() -> None:
    f = JumpFilter(max_speed_mps=30.0)
    assert f.accept(at(0), 0.0)
    assert not f.accept(at(500), 1.0)
    assert not f.accept(at(501), 1.0)       # 1 m in 0 s: implausible after the run's last
    assert not f.accept(at(502), 1.0)
    assert f.last == at(0)


def test_the_jump_rule_is_one_pure_function() -> None:
    """jump_verdict, the rule JumpFilter and the broker both apply: the run's new length,
    0 when accepted, -1 for the run's last position again."""
    def stamped(north_m: float, t: float) -> tuple[float, float, float]:
        return (LAT + north_m * METRE, LON, t)

    def verdict(north_m: float, now: float, anchor, run=None, length=0):  # type: ignore[no-untyped-def]
        return jump_verdict(30.0, LAT + north_m * METRE, LON, now, anchor, run, length)

    assert verdict(500, 0.0, None) == JUMP_ACCEPTED                 # a first fix
    assert verdict(29.9, 1.0, stamped(0, 0.0)) == JUMP_ACCEPTED     # 29.9 m/s
    assert verdict(30.1, 1.0, stamped(0, 0.0)) == 1                 # a new run
    assert verdict(30.1, 0.5, stamped(0, 1.0)) == 1                 # time backwards: 0 s
    assert verdict(501, 2.0, stamped(0, 0.0), stamped(500, 1.0), 1) == 2
    assert verdict(500, 2.0, stamped(0, 0.0), stamped(500, 1.0), 1) == JUMP_REPEATED
    assert verdict(502, 3.0, stamped(0, 0.0), stamped(501, 2.0), 2) == JUMP_ACCEPTED  # 3rd
    assert verdict(900, 2.0, stamped(0, 0.0), stamped(500, 1.0), 2) == 1     # run broken
    assert jump_verdict(30.0, LAT + 600 * METRE, LON, 4.0, stamped(0, 0.0),
                        stamped(599, 3.0), 3, confirmations=5) == 4


@settings(max_examples=500, deadline=None)
@given(st.floats(-90.0, 90.0), st.floats(-180.0, 180.0), st.floats(-0.01, 0.01),
       st.floats(-0.01, 0.01), st.floats(0.0, 100.0), st.floats(0.5, 1000.0))
def test_the_jump_rule_is_the_haversine_against_speed_times_seconds(
        lat: float, lon: float, dlat: float, dlon: float, seconds: float, speed: float) -> None:
    """Whatever shortcut jump_verdict takes, its verdict is the haversine distance against
    ``max_speed_mps`` times the seconds (poles and the antimeridian included)."""
    lat2 = max(-90.0, min(90.0, lat + dlat))
    lon2 = (lon + dlon + 180.0) % 360.0 - 180.0
    plausible = haversine_m(lat, lon, lat2, lon2) <= speed * seconds
    got = jump_verdict(speed, lat2, lon2, seconds, (lat, lon, 0.0), None, 0)
    assert (got == JUMP_ACCEPTED) == plausible


def test_a_filter_forgets_every_position() -> None:
    f = JumpFilter(max_speed_mps=30.0)
    f.accept(at(0), 0.0)
    f.accept(at(500), 1.0)
    f.forget()
    assert f.last is None and not f._run and f.rejected == 1
    assert f.accept(at(500), 2.0)           # a first fix again


@settings(max_examples=200, deadline=None)
@given(far=st.floats(100.0, 5_000.0), jump_at=st.integers(1, 20), samples=st.integers(2, 30))
def test_a_single_jump_never_makes_a_contact(far: float, jump_at: int, samples: int) -> None:
    """A peer far away whose fixes include one outlier right next to us: never "in"."""
    m = meter(speed=30.0)
    m.own(at(0), 0.0)
    for t in range(samples):
        north = 1.0 if t == jump_at else far
        sample = m.peer(at(north), float(t))
        assert sample is None or sample.verdict != "in"
    assert m.within_s == 0.0


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(0.1, 20.0), st.floats(0.0, 60.0)), max_size=40))
def test_meter_properties(steps: list[tuple[float, float]]) -> None:
    """Duration never decreases, never exceeds the time since the first "in", and the
    closest/median distances bound each other."""
    m = meter(radius=15.0, gap=10.0, speed=1e6)
    m.own(at(0), 0.0)
    now, first_in, last = 0.0, None, 0.0
    for dt, north in steps:
        now += dt
        sample = m.peer(at(north), now)
        assert sample is not None
        if sample.verdict == "in" and first_in is None:
            first_in = now
        assert sample.within_s >= last
        last = sample.within_s
        assert sample.within_s <= (0.0 if first_in is None else now - first_in) + 1e-9
    measures = m.measures()
    assert measures.samples == len(steps)
    if steps:
        assert measures.closest_m is not None and measures.median_m is not None
        assert measures.closest_m <= measures.median_m + 1e-9
        assert math.isclose(measures.closest_m,
                            min(haversine_m(LAT, LON, at(n).latitude, LON) for _, n in steps))


def test_merge_measures_for_a_re_meeting() -> None:
    first = ContactMeasures(duration_s=60.0, closest_m=2.0, median_m=4.0, samples=12)
    again = ContactMeasures(duration_s=30.0, closest_m=3.0, median_m=5.0, samples=6)
    assert merge_measures(first, again) == ContactMeasures(90.0, 2.0, 5.0, 18)
    assert merge_measures(ContactMeasures(), again) == again
    assert merge_measures(first, ContactMeasures()) == ContactMeasures(60.0, 2.0, 4.0, 12)
