"""broker.state: matching, cooldowns, roles, position expiry, signaling routes, reconnects."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fanny_tui.protocol.proximity as proximity
from broker import Refusal
from broker.state import BrokerState, MatchNotice
from fanny_tui.protocol.errors import LocalProtocolError
from fanny_tui.protocol.proximity import METRES_PER_DEGREE, haversine_m

LAT, LON = 48.8566, 2.3522
A = "11111111-1111-4111-8111-111111111111"
B = "22222222-2222-4222-8222-222222222222"
C = "33333333-3333-4333-8333-333333333333"
D = "44444444-4444-4444-8444-444444444444"


def north(metres: float, lat: float = LAT) -> float:
    """Latitude ``metres`` north of ``lat``."""
    return lat + metres / METRES_PER_DEGREE


def make(**kw: float) -> BrokerState:
    params = {"radius_max_m": 100.0, "cooldown_s": 300.0, "position_timeout_s": 60.0}
    params.update(kw)
    return BrokerState(**params)


def connect_all(state: BrokerState, *sessions: tuple[str, float], now: float = 0.0) -> None:
    for session_id, radius in sessions:
        state.connect(session_id, radius, now)


def pairs(notices: list[MatchNotice]) -> set[tuple[str, str, str]]:
    return {(n.session_id, n.peer_session_id, n.role) for n in notices}


def test_two_sessions_within_radius_match_both_sides_with_deterministic_roles():
    state = make()
    connect_all(state, (B, 20.0), (A, 20.0))
    assert state.update_position(B, LAT, LON, 5.0, 0.0) == []
    notices = state.update_position(A, north(10), LON, None, 1.0)
    # A < B lexicographically: A is the initiator whoever reported last.
    assert pairs(notices) == {(A, B, "initiator"), (B, A, "responder")}


def test_matching_uses_the_smaller_radius_and_caps_at_radius_max():
    state = make(radius_max_m=30.0)
    connect_all(state, (A, 50.0), (B, 10.0))
    state.update_position(A, LAT, LON, None, 0.0)
    assert state.update_position(B, north(20), LON, None, 0.0) == []   # 20 m > min(30, 10)
    assert len(state.update_position(B, north(9), LON, None, 1.0)) == 2
    capped = state.connect(C, 5000.0, 0.0)
    assert capped.radius_m == 30.0
    state.update_position(C, north(25), LON, None, 2.0)   # A sees 25 <= 30, B 16 > 10
    assert state.position_count == 3


def test_no_match_beyond_radius():
    state = make()
    connect_all(state, (A, 50.0), (B, 50.0))
    state.update_position(A, LAT, LON, None, 0.0)
    assert state.update_position(B, north(50.5), LON, None, 0.0) == []
    assert len(state.update_position(B, north(49.5), LON, None, 1.0)) == 2


def test_three_sessions_each_pair_matches_once():
    state = make()
    connect_all(state, (A, 30.0), (B, 30.0), (C, 30.0), (D, 30.0))
    state.update_position(A, LAT, LON, None, 0.0)
    first = state.update_position(B, north(10), LON, None, 0.0)
    second = state.update_position(C, north(20), LON, None, 0.0)
    far = state.update_position(D, north(500), LON, None, 0.0)
    assert pairs(first) == {(A, B, "initiator"), (B, A, "responder")}
    assert pairs(second) == {(A, C, "initiator"), (C, A, "responder"),
                             (B, C, "initiator"), (C, B, "responder")}
    assert [n.peer_session_id for n in second if n.session_id == C] == [B, A]  # by distance
    assert far == []


def test_cooldown_one_match_per_pair():
    state = make(cooldown_s=300.0, position_timeout_s=1000.0)
    connect_all(state, (A, 30.0), (B, 30.0))
    state.update_position(A, LAT, LON, None, 0.0)
    assert len(state.update_position(B, north(5), LON, None, 0.0)) == 2
    assert state.update_position(B, north(6), LON, None, 100.0) == []
    assert state.update_position(A, LAT, LON, None, 299.9) == []
    assert len(state.update_position(A, LAT, LON, None, 300.0)) == 2


def test_position_lost_and_disconnect_drop_the_position():
    state = make()
    connect_all(state, (A, 30.0), (B, 30.0), (C, 30.0))
    state.update_position(A, LAT, LON, None, 0.0)
    assert state.drop_position(A) is True
    assert state.drop_position(A) is False
    assert state.update_position(B, north(5), LON, None, 0.0) == []
    epoch_b = state.connect(D, 30.0, 0.0).epoch
    state.update_position(D, north(50), LON, None, 0.0)
    assert state.disconnect(D, epoch_b) is True
    assert not state.has_position(D) and not state.is_connected(D)
    assert state.update_position(C, north(50), LON, None, 0.0) == []
    assert state.position_count == 2 and state.session_count == 3


def test_a_reused_slot_starts_without_a_fix_and_the_expiry_order_holds():
    # A disconnected session's slot goes to the next session: nothing of the first remains.
    state = make(position_timeout_s=60.0)
    epoch_a = state.connect(A, 30.0, 0.0).epoch
    connect_all(state, (B, 20.0))
    state.update_position(A, LAT, LON, 7.0, 0.0)
    state.update_position(B, north(500), LON, None, 10.0)
    assert state.disconnect(A, epoch_a)
    state.connect(C, 30.0, 20.0)                      # reuses A's slot
    assert not state.has_position(C) and state.position_count == 1
    assert state.update_position(C, north(505), LON, None, 30.0) != []
    assert state.update_position(B, north(500), LON, None, 40.0) == []   # refreshed: newest
    assert state.expire(90.5) == 1                   # C (30 s) is now the oldest, B (40 s) not
    assert state.has_position(B) and not state.has_position(C)
    assert state.expire(100.5) == 1 and state.position_count == 0
    assert state.pair_count == 1 and state.expire(1000.0) == 0 and state.pair_count == 0
    assert not state.expire_pending(1000.0) and state.session_count == 2


def test_stale_position_is_ignored_then_expired():
    state = make(position_timeout_s=60.0)
    connect_all(state, (A, 30.0), (B, 30.0))
    state.update_position(A, LAT, LON, None, 0.0)
    assert state.update_position(B, north(5), LON, None, 60.5) == []   # A is stale
    assert state.has_position(A)
    assert state.expire(61.0) == 1
    assert not state.has_position(A) and state.has_position(B)
    assert state.position_count == 1


def test_expire_forgets_pairs_after_cooldown_and_route_ttl():
    state = make(cooldown_s=10.0, route_ttl_s=20.0, position_timeout_s=1000.0)
    connect_all(state, (A, 30.0), (B, 30.0))
    state.update_position(A, LAT, LON, None, 0.0)
    state.update_position(B, north(5), LON, None, 0.0)
    state.expire(20.0)
    assert state.pair_count == 1
    state.check_route(A, B, 20.0)
    state.expire(20.1)
    assert state.pair_count == 0


def test_routes_only_between_matched_sessions_and_only_for_route_ttl():
    state = make(cooldown_s=300.0, position_timeout_s=1000.0)
    connect_all(state, (A, 30.0), (B, 30.0), (C, 30.0))
    state.update_position(A, LAT, LON, None, 0.0)
    state.update_position(B, north(5), LON, None, 0.0)
    state.check_route(A, B, 1.0)
    state.check_route(B, A, 300.0)
    for source, destination, at in ((A, C, 1.0), (C, A, 1.0), (A, A, 1.0), (A, B, 300.5)):
        with pytest.raises(Refusal) as refused:
            state.check_route(source, destination, at)
        assert refused.value.code == "not_matched"
        assert refused.value.field == "peer_session_id"


def test_route_to_a_disconnected_peer_is_refused():
    state = make()
    connect_all(state, (A, 30.0))
    epoch_b = state.connect(B, 30.0, 0.0).epoch
    state.update_position(A, LAT, LON, None, 0.0)
    state.update_position(B, north(5), LON, None, 0.0)
    state.disconnect(B, epoch_b)
    with pytest.raises(Refusal) as refused:
        state.check_route(A, B, 1.0)
    assert refused.value.code == "peer_unavailable"


def test_reconnect_replaces_the_first_connection():
    state = make()
    first = state.connect(A, 30.0, 0.0)
    state.update_position(A, LAT, LON, None, 0.0)
    second = state.connect(A, 20.0, 1.0)
    assert second.replaced and not first.replaced
    assert not state.has_position(A)               # the old connection's position is gone
    assert state.disconnect(A, first.epoch) is False   # the old handler ending changes nothing
    assert state.is_current(A, second.epoch) and state.session_count == 1
    assert state.disconnect(A, second.epoch) is True
    assert state.session_count == 0


def test_rejected_inputs_change_nothing():
    state = make()
    with pytest.raises(LocalProtocolError):
        state.update_position(A, LAT, LON, None, 0.0)
    state.connect(A, 30.0, 0.0)
    for lat, lon in ((91.0, 0.0), (0.0, 181.0), (math.nan, 0.0), (0.0, math.inf)):
        with pytest.raises(ValueError):
            state.update_position(A, lat, lon, None, 0.0)
    assert state.position_count == 0
    for radius in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="radius_m"):
            state.connect(B, radius, 0.0)
    assert state.session_count == 1
    for name in ("radius_max_m", "cooldown_s", "position_timeout_s", "route_ttl_s"):
        with pytest.raises(ValueError, match=name):
            make(**{name: 0.0})


def test_neighbours_come_from_the_grid_not_a_scan(monkeypatch):
    """With 2 000 sessions spread over a town, one update computes a handful of distances."""
    state = make(radius_max_m=50.0, position_timeout_s=1e9)
    for i in range(2000):
        session_id = f"{i:08d}-0000-4000-8000-000000000000"
        state.connect(session_id, 50.0, 0.0)
        state.update_position(session_id, north(200.0 * (i // 50)), LON + 0.003 * (i % 50),
                              None, 0.0)
    calls = 0
    real = proximity.haversine_m

    def counting(*args: float) -> float:
        nonlocal calls
        calls += 1
        return real(*args)

    monkeypatch.setattr(proximity, "haversine_m", counting)
    state.connect(A, 50.0, 0.0)
    state.update_position(A, north(200.0 * 7), LON + 0.003 * 7, None, 1.0)
    print(f"distances computed for one update among 2001 sessions: {calls}")
    assert 1 <= calls <= 20


def test_state_module_is_pure():
    code = ("import sys, broker.state; bad = {'asyncio', 'socket', 'sqlite3', 'websockets', "
            "'textual', 'aiortc'} & set(sys.modules); print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# --- property: the grid-based matching equals a brute-force haversine check ---------------

CENTRES = [(LAT, LON), (0.0, 0.0), (89.9993, 10.0), (-89.9995, -120.0), (0.3, 179.9996),
           (-33.9, -179.9993), (64.1, 179.9999), (45.0, -180.0)]


def _place(centre: tuple[float, float], dn: float, de: float) -> tuple[float, float]:
    lat = min(90.0, max(-90.0, centre[0] + dn / METRES_PER_DEGREE))
    scale = max(math.cos(math.radians(lat)), 1e-6)
    lon = centre[1] + de / (METRES_PER_DEGREE * scale)
    lon = (lon + 180.0) % 360.0 - 180.0
    return lat, lon


offsets = st.floats(-250.0, 250.0, allow_nan=False)
scenario = st.tuples(
    st.sampled_from(CENTRES),
    st.lists(st.floats(1.0, 120.0), min_size=2, max_size=12),     # radius per session
    st.lists(st.tuples(st.integers(0, 11), offsets, offsets), min_size=1, max_size=40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario)
def test_grid_matching_equals_brute_force(case):
    centre, radii, moves = case
    # Moves of up to 710 m a second: the jump rule (tested below) lets every one through.
    state = BrokerState(radius_max_m=100.0, cooldown_s=1e9, position_timeout_s=1e9,
                        max_speed_mps=1000.0)
    ids = [f"s{i:02d}" for i in range(len(radii))]
    for session_id, radius in zip(ids, radii, strict=True):
        state.connect(session_id, radius, 0.0)
    effective = {s: min(r, 100.0) for s, r in zip(ids, radii, strict=True)}
    where: dict[str, tuple[float, float]] = {}
    matched: set[tuple[str, str]] = set()
    for step, (index, dn, de) in enumerate(moves):
        me = ids[index % len(ids)]
        lat, lon = _place(centre, dn, de)
        got = pairs(state.update_position(me, lat, lon, None, float(step)))
        where[me] = (lat, lon)
        expected: set[tuple[str, str, str]] = set()
        for other, (olat, olon) in where.items():
            pair = (min(me, other), max(me, other))
            if other == me or pair in matched:
                continue
            if haversine_m(lat, lon, olat, olon) <= min(effective[me], effective[other]):
                matched.add(pair)
                expected.add((me, other, "initiator" if me == pair[0] else "responder"))
                expected.add((other, me, "initiator" if other == pair[0] else "responder"))
        assert got == expected


# --- housekeeping without a full scan (issue 7, point 5) -------------------------------------


def test_expire_drops_the_least_recently_updated_first_and_keeps_refreshed_positions():
    state = make(position_timeout_s=60.0, radius_max_m=10.0)
    connect_all(state, (A, 5.0), (B, 5.0), (C, 5.0))
    state.update_position(A, LAT, LON, None, 0.0)
    state.update_position(B, north(1000), LON, None, 10.0)
    state.update_position(C, north(2000), LON, None, 20.0)
    state.update_position(A, LAT, LON, None, 30.0)       # refreshed: moves behind C
    assert state.expire_pending(70.5)
    assert state.expire(70.5) == 1                       # B (10 s) only: A was refreshed
    assert not state.has_position(B) and state.has_position(A) and state.has_position(C)
    assert not state.expire_pending(70.5)
    assert state.expire(80.5) == 1 and not state.has_position(C)
    assert state.expire(90.5) == 1 and state.position_count == 0


def test_expire_with_a_limit_drops_at_most_that_many_then_resumes():
    state = make(position_timeout_s=60.0, radius_max_m=10.0)
    sessions = [f"{n:08x}-0000-4000-8000-000000000000" for n in range(250)]
    for n, session_id in enumerate(sessions):
        state.connect(session_id, 5.0, 0.0)
        state.update_position(session_id, north(50.0 * n), LON, None, float(n) / 1000)
    dropped, calls = 0, 0
    while state.expire_pending(100.0):
        got = state.expire(100.0, limit=100)
        assert 1 <= got <= 100
        dropped, calls = dropped + got, calls + 1
    assert (dropped, calls, state.position_count) == (250, 3, 0)


def test_expire_limit_counts_pairs_too_and_a_rematched_pair_stays():
    state = make(cooldown_s=10.0, position_timeout_s=1000.0)
    connect_all(state, (A, 20.0), (B, 20.0), (C, 20.0))
    state.update_position(A, LAT, LON, None, 0.0)
    assert len(state.update_position(B, north(5), LON, None, 0.0)) == 2     # A-B at 0
    assert len(state.update_position(C, north(5), LON, None, 5.0)) == 4     # A-C, B-C at 5
    assert len(state.update_position(B, north(5), LON, None, 11.0)) == 2    # A-B again at 11
    state.expire(16.0, limit=1)                 # A-C (5 s) first: A-B was refreshed at 11
    assert state.pair_count == 2
    state.expire(16.0)
    assert state.pair_count == 1                # only A-B (11 s) is left
    state.check_route(A, B, 16.0)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_expire_refuses_a_bad_limit(limit):
    with pytest.raises(ValueError, match="limit"):
        make().expire(0.0, limit=limit)


def test_memory_per_live_position_is_bounded():
    import gc
    import tracemalloc
    n = 5000
    sessions = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(n)]
    state = make(radius_max_m=100.0)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, session_id in enumerate(sessions):     # 50 m apart: 3 to 4 per grid cell
            state.connect(session_id, 20.0, 0.0)
            state.update_position(session_id, north(50.0 * (i // 70)),
                                  LON + 50.0 * (i % 70) / METRES_PER_DEGREE, 5.0, 0.0)
        per_position = (tracemalloc.get_traced_memory()[0] - before) / n
        print(f"{per_position:.0f} B per live position")
    finally:
        tracemalloc.stop()
    # A session with its position, session ID text excluded (the caller holds it): ~350 B
    # measured with the coordinates as doubles in the grid's cells and the slot arrays (56 B
    # of them the jump rule's memory).
    assert per_position < 450, per_position


def test_live_positions_and_pairs_are_invisible_to_the_garbage_collector():
    # Issue 7, point 5: a full pass of CPython's cyclic collector walks every tracked object,
    # on the event loop's thread (333-507 ms at 1M positions with one object per session and
    # three per grid cell). The state must add O(1) tracked objects, not one per position.
    import gc
    n = 10_000
    sessions = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(n)]
    state = make(radius_max_m=100.0)
    gc.collect()
    before = len(gc.get_objects())
    for i, session_id in enumerate(sessions):     # pairs 5 m apart, pairs 50 m apart
        state.connect(session_id, 20.0, 0.0)
        state.update_position(session_id, north(50.0 * (i // 140) + 5.0 * (i % 2)),
                              LON + 50.0 * (i // 2 % 70) / METRES_PER_DEGREE, 5.0, 1.0)
    for i, session_id in enumerate(sessions[::3]):   # moved to other cells, refreshed
        state.update_position(session_id, north(50.0 * (i // 70) + 10_000.0),
                              LON + 50.0 * (i % 70) / METRES_PER_DEGREE, None, 1000.0)
    for session_id in sessions[1::3]:                # one implausible jump each: rejected
        state.update_position(session_id, north(90_000.0), LON, None, 1001.0)
    assert (state.position_count, state.pair_count) == (n, n // 2)
    assert state.jumps_rejected == len(sessions[1::3])
    gc.collect()
    growth = len(gc.get_objects()) - before
    assert growth < 0.1 * n, f"{growth} more objects tracked by the collector for {n} positions"


# --- implausible jumps (issue 6, point 1: the devices' rule, jump_verdict) -------------------


def test_a_jump_next_to_a_session_never_makes_a_match_and_keeps_the_old_position():
    state = make(max_speed_mps=30.0)
    connect_all(state, (A, 20.0), (B, 20.0), (C, 20.0))
    state.update_position(A, LAT, LON, 3.0, 0.0)
    state.update_position(B, north(1000), LON, 3.0, 0.0)
    # B's receiver glitches to 2 m from A: 998 m in 1 s. No match, no error, B stays put.
    assert state.update_position(B, north(2), LON, 3.0, 1.0) == []
    assert state.jumps_rejected == 1 and state.position_count == 2
    assert len(state.update_position(C, north(1005), LON, 3.0, 2.0)) == 2   # B is still there
    # B's next fix is back where it was: plausible, accepted, and matched nothing new.
    assert state.update_position(B, north(1001), LON, 3.0, 2.0) == []
    assert state.jumps_rejected == 1
    # A real walk towards A is accepted once the time makes it plausible (30 m/s).
    assert len(state.update_position(B, north(3), LON, 3.0, 40.0)) == 2


def test_three_agreeing_updates_re_anchor_as_on_the_device():
    state = make(max_speed_mps=30.0)
    connect_all(state, (A, 20.0), (B, 20.0))
    state.update_position(A, LAT, LON, 3.0, 0.0)
    state.update_position(B, north(100_000), LON, 3.0, 0.0)    # a wrong first fix (cold start)
    assert state.update_position(B, north(2), LON, 3.0, 1.0) == []
    assert state.update_position(B, north(2), LON, 3.0, 2.0) == []   # the same: confirms nothing
    assert state.update_position(B, north(2.5), LON, 3.0, 3.0) == []
    assert len(state.update_position(B, north(2.2), LON, 3.0, 4.0)) == 2   # the third: anchored
    assert state.jumps_rejected == 3


def test_a_run_broken_by_a_jump_starts_again_and_a_new_connection_afresh():
    state = make(max_speed_mps=30.0)
    connect_all(state, (A, 20.0), (B, 20.0))
    state.update_position(A, LAT, LON, 3.0, 0.0)
    state.update_position(B, north(5000), LON, 3.0, 0.0)
    assert state.update_position(B, north(1), LON, 3.0, 1.0) == []
    assert state.update_position(B, north(900), LON, 3.0, 2.0) == []    # breaks the run
    assert state.update_position(B, north(2), LON, 3.0, 3.0) == []      # a new run: 1
    assert state.update_position(B, north(3), LON, 3.0, 4.0) == []      # 2
    assert len(state.update_position(B, north(4), LON, 3.0, 5.0)) == 2  # 3: anchored
    # A new connection of the session (a reconnect) has no anchor: its first update counts.
    state.connect(B, 20.0, 6.0)
    state.update_position(B, north(7000), LON, 3.0, 6.0)
    assert state.jumps_rejected == 4 and state.has_position(B)
    # A position dropped (position_lost) keeps the anchor of the connection.
    state.drop_position(B)
    assert state.update_position(B, north(1), LON, 3.0, 7.0) == []
    assert not state.has_position(B) and state.jumps_rejected == 5


def test_a_jump_at_the_same_instant_is_rejected_and_bad_coordinates_still_raise():
    state = make()
    connect_all(state, (A, 20.0))
    state.update_position(A, LAT, LON, None, 0.0)
    assert state.update_position(A, north(1), LON, None, 0.0) == []     # 1 m in 0 s
    assert state.update_position(A, LAT, LON, None, 0.0) == []          # not moved: plausible
    assert state.jumps_rejected == 1
    for lat, lon in ((math.nan, LON), (91.0, LON), (LAT, math.inf), (LAT, -180.5)):
        with pytest.raises(ValueError, match="out of range"):
            state.update_position(A, lat, lon, None, 1.0)
    assert state.jumps_rejected == 1


def test_bad_max_speed_is_refused():
    for value in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="max_speed_mps"):
            make(max_speed_mps=value)


fix_steps = st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0, 5.0, 60.0]),
                               st.sampled_from([0.0, 1.0, 20.0, 150.0, 3000.0]),
                               st.booleans()), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(fix_steps)
def test_the_broker_accepts_exactly_what_a_device_filter_accepts(steps):
    """One session's updates (elapsed seconds, metres moved, north or south): the broker
    rejects exactly the fixes the devices' JumpFilter rejects (one rule, jump_verdict)."""
    from fanny_tui.protocol.contact import Fix, JumpFilter

    state = make(max_speed_mps=30.0)
    device = JumpFilter(30.0)
    connect_all(state, (A, 20.0))
    now, metres = 0.0, 0.0
    for elapsed, moved, south in steps:
        now += elapsed
        metres += -moved if south else moved
        before = state.jumps_rejected
        state.update_position(A, north(metres), LON, None, now)
        accepted = device.accept(Fix(north(metres), LON), now)
        assert (state.jumps_rejected == before) == accepted
    assert state.jumps_rejected == device.rejected
