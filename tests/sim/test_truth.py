"""Ground truth on synthetic tracks with known answers."""

from __future__ import annotations

import pytest

from fanny_tui.sim.scenario import Track
from fanny_tui.sim.tracks import offset
from fanny_tui.sim.truth import close_intervals, pair, true_contacts, true_pairs

LAT, LON = 43.6045, 1.444


def line(name: str, t0: float, t1: float, start: tuple[float, float],
         end: tuple[float, float]) -> Track:
    """A straight track from ``start`` to ``end`` (east, north metres from LAT/LON)."""
    a, b = offset(LAT, LON, *start), offset(LAT, LON, *end)
    return Track(name, (t0, t1), (a[0], b[0]), (a[1], b[1]))


def test_two_people_standing_5_m_apart_for_10_minutes_is_one_contact():
    a = line("a", 0, 600, (0, 0), (0, 0))
    b = line("b", 0, 600, (5, 0), (5, 0))
    [contact] = true_contacts([b, a], radius_m=10, duration_s=300)
    assert contact.pair == ("a", "b")
    assert (contact.start_s, contact.end_s, contact.duration_s) == (0, 600, 600)
    assert contact.closest_m == pytest.approx(5.0, abs=0.01)


def test_a_passer_by_is_close_for_seconds_only():
    """Walking at 1.4 m/s along a line 3 m from a standing person: within 10 m while
    |x| <= sqrt(10^2 - 3^2) = 9.54 m, i.e. 13.6 s."""
    standing = line("s", 0, 200, (0, 0), (0, 0))
    walker = line("w", 0, 200, (-140, 3), (140, 3))
    [(start, end, closest)] = close_intervals(standing, walker, 10.0)
    assert end - start == pytest.approx(2 * 9.539 / 1.4, abs=1.0)
    assert closest == pytest.approx(3.0, abs=0.05)
    assert true_contacts([standing, walker], 10.0, 300.0) == []
    assert len(true_contacts([standing, walker], 10.0, 10.0)) == 1


def test_people_across_the_street_never_count():
    a = line("a", 0, 900, (0, 9), (0, 9))
    b = line("b", 0, 900, (8, -10), (8, -10))       # 20.6 m
    assert true_contacts([a, b], 10.0, 300.0) == []
    assert len(true_contacts([a, b], 25.0, 300.0)) == 1


def test_a_gap_splits_a_contact_into_two_maximal_intervals():
    a = line("a", 0, 700, (0, 0), (0, 0))
    b = Track("b", (0, 250, 260, 440, 450, 700),
              *zip(*(offset(LAT, LON, e, 0) for e in (2, 2, 50, 50, 2, 2)), strict=True))
    intervals = close_intervals(a, b, 10.0)
    assert [(round(s), round(e)) for s, e, _ in intervals] == [(0, 252), (448, 700)]
    assert true_contacts([a, b], 10.0, 300.0) == []      # neither part lasts 5 minutes
    assert len(true_contacts([a, b], 10.0, 200.0)) == 2
    assert true_pairs(true_contacts([a, b], 10.0, 200.0)) == {("a", "b")}


def test_only_the_time_both_are_present_counts():
    a = line("a", 0, 900, (0, 0), (0, 0))
    b = line("b", 100, 500, (1, 0), (1, 0))
    [contact] = true_contacts([a, b], 10.0, 300.0)
    assert (contact.start_s, contact.end_s) == (100, 500)
    c = line("c", 600, 900, (1, 0), (1, 0))
    assert true_contacts([b, c], 10.0, 0.0) == []      # never present together


def test_only_the_simulated_time_counts():
    # trial: a GPX of 240 s run with [scenario] duration_s = 10 was judged on 240 s of truth
    a = line("a", 0, 600, (0, 0), (0, 0))
    b = line("b", 0, 600, (5, 0), (5, 0))
    assert close_intervals(a, b, 10.0, until_s=10.0) == [(0.0, 10.0, pytest.approx(5.0, abs=0.01))]
    assert true_contacts([a, b], 10.0, 300.0, until_s=10.0) == []
    [cut] = true_contacts([a, b], 10.0, 300.0, until_s=450.5)
    assert (cut.start_s, cut.end_s) == (0.0, 450.5)   # the last simulated second, not 450
    late = line("c", 20, 600, (1, 0), (1, 0))
    assert close_intervals(a, late, 10.0, until_s=10.0) == []


def test_the_radius_is_inclusive():
    a = line("a", 0, 400, (0, 0), (0, 0))
    b = line("b", 0, 400, (0, 10), (0, 10))
    assert len(true_contacts([a, b], 10.0 + 1e-6, 300.0)) == 1
    assert true_contacts([a, b], 9.99, 300.0) == []


def test_pair_names_are_sorted_and_step_is_checked():
    assert pair("b", "a") == ("a", "b") == pair("a", "b")
    a = line("a", 0, 10, (0, 0), (0, 0))
    with pytest.raises(ValueError, match="step_s"):
        close_intervals(a, a, 10.0, step_s=0)
