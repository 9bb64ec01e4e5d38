from __future__ import annotations

from datetime import UTC, datetime

from fanny_tui.events import (
    ChannelOpen,
    Contact,
    ContactClosed,
    GpsFix,
    HandshakeFailed,
    MatchFound,
    PeerUpdate,
    TokenStored,
)
from fanny_tui.protocol.proximity import bearing_deg, haversine_m
from fanny_tui.sim.history import History
from fanny_tui.sim.tracks import offset
from tests.sim.conftest import LAT, LON

EXPIRY = datetime(2026, 5, 20, 4, tzinfo=UTC)


class Clock:
    """Scenario seconds set by the test."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def fix(east_m: float, north_m: float) -> GpsFix:
    lat, lon = offset(LAT, LON, east_m, north_m)
    return GpsFix(latitude=lat, longitude=lon, accuracy_m=9.8, mode=3, source="track")


def update(peer: int, mine: GpsFix, theirs: GpsFix, within_s: float = 0.0) -> PeerUpdate:
    return PeerUpdate(
        peer=peer, distance_m=haversine_m(mine.latitude, mine.longitude,
                                          theirs.latitude, theirs.longitude),
        bearing_deg=bearing_deg(mine.latitude, mine.longitude, theirs.latitude, theirs.longitude),
        peer_accuracy_m=9.8, within="in", within_s=within_s, samples=1)


def test_each_match_of_a_pair_is_told_from_both_devices_events():
    clock = Clock()
    history = History(clock, speed=10.0, position_interval_s=5.0)
    a, b, c = (history.recorder(name) for name in ("a", "b", "c"))
    # c stands 1.3 m from a too, but on the other side: only b's fix explains a's sample
    fa, fb, fc = fix(0, 0), fix(1.3, 0), fix(-1.3, 0)
    for device, f in ((a, fa), (b, fb), (c, fc)):
        device(f)
    # match 1 at 10 s: a (initiator, its exchange #1) and b (responder, its #4) open a
    # channel, both store the token; b closes as parted at 90 s, a hears peer_closed
    clock.t = 10.0
    a(MatchFound(peer=1, role="initiator"))
    b(MatchFound(peer=4, role="responder"))
    clock.t = 10.4
    a(ChannelOpen(peer=1))
    b(ChannelOpen(peer=4))
    clock.t = 12.0
    a(update(1, fa, fb))
    b(update(4, fb, fa))
    clock.t = 15.0
    for device, ordinal in ((a, 1), (b, 4)):
        device(TokenStored(peer=ordinal, token="t1", expires_at=EXPIRY))
    clock.t = 90.0
    b(ContactClosed(peer=4, reason="parted", contact=Contact(6.0, 1.2, 3.0, 15),
                    token_stored=True))
    clock.t = 90.2
    a(ContactClosed(peer=1, reason="peer_closed", contact=Contact(6.0, 1.2, 3.0, 15),
                    token_stored=True))
    # match 2 at 400 s: the handshake fails on both sides before any channel or sample
    clock.t = 400.0
    b(MatchFound(peer=5, role="initiator"))
    a(MatchFound(peer=2, role="responder"))
    clock.t = 420.0
    a(HandshakeFailed(peer=2, reason="timeout"))
    b(HandshakeFailed(peer=5, reason="timeout"))
    pairs = history.pairs()
    assert list(pairs) == [("a", "b")]
    first, second = pairs[("a", "b")]
    assert first == {
        "match_s": 10.0, "role": {"a": "initiator", "b": "responder"}, "channel_s": 10.0,
        "failure": None, "token_s": 15.0, "closed": {"a": "peer_closed", "b": "parted"},
        "closed_s": 90.0, "within_s": 60.0, "closest_m": 1.2, "samples": 15}
    assert second["match_s"] == 400.0 and second["failure"] == "timeout"
    assert second["channel_s"] is None and second["closed"] is None
    assert second["role"] == {"a": "responder", "b": "initiator"}


def test_a_side_whose_peer_cannot_be_told_is_left_out_and_one_side_alone_is_named():
    clock = Clock()
    history = History(clock, speed=1.0)
    a, b, c = (history.recorder(name) for name in ("a", "b", "c"))
    for device, f in ((a, fix(0, 0)), (b, fix(2, 0)), (c, fix(0, 2))):
        device(f)
    # b and c both got a responder match at the same second as a's initiator match: which one
    # was a's peer cannot be told, and nothing else says it
    clock.t = 5.0
    a(MatchFound(peer=1, role="initiator"))
    b(MatchFound(peer=1, role="responder"))
    c(MatchFound(peer=1, role="responder"))
    assert history.pairs() == {} and history.unlinked() == 3
    # a sample of a's explained by c's fix alone: the pair a-c, with b's side not known
    clock.t = 100.0
    fa, fc = fix(0, 0.5), fix(0, 2.5)
    a(fa)
    c(fc)
    a(MatchFound(peer=2, role="initiator"))
    clock.t = 101.0
    a(update(2, fa, fc))
    [record] = history.pairs()[("a", "c")]
    assert record["match_s"] == {"a": 100.0} and record["role"] == {"a": "initiator"}
    assert history.unlinked() == 3


def test_a_token_stored_on_both_devices_links_two_sides_without_samples():
    clock = Clock()
    history = History(clock, speed=1.0)
    a, b, c = (history.recorder(name) for name in ("a", "b", "c"))
    clock.t = 30.0
    for device in (a, b, c):
        device(MatchFound(peer=1, role="initiator" if device is a else "responder"))
    a(TokenStored(peer=1, token="t", expires_at=EXPIRY))
    c(TokenStored(peer=1, token="t", expires_at=EXPIRY))
    [record] = history.pairs()[("a", "c")]
    assert record["token_s"] == 30.0 and record["role"] == {"a": "initiator",
                                                             "c": "responder"}
