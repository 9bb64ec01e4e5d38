"""Tests for the witness exchange and contact state machine (fanny_tui.protocol.handshake).

h11 style: ``ConnectionPair`` joins an initiator and a responder with an in-memory link whose
frames the test delivers, drops, duplicates or replaces at will, and a clock the test moves
(``now`` is passed in: the machine reads no clock); stores are plain dicts. Every legal path is
walked by hand, every illegal local call is checked to raise and change nothing, and a
Hypothesis state machine interleaves deliveries, drops, garbage, time, positions, closes and
stores while checking the invariants of the exchange.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fanny_tui.protocol.contact import ContactSettings, Fix
from fanny_tui.protocol.errors import LocalProtocolError
from fanny_tui.protocol.handshake import (
    MAX_FRAME_INTERVAL_S,
    MIN_DATA_CHANNEL_VERSION,
    TERMINAL,
    ContactEnded,
    Established,
    HandshakeCompleted,
    HandshakeEvent,
    HandshakeFailed,
    HandshakeState,
    PeerSample,
    StoreToken,
    WitnessHandshake,
)
from fanny_tui.protocol.messages import (
    DATA_CHANNEL_VERSION,
    Abort,
    Close,
    Heartbeat,
    PeerHello,
    PeerPosition,
    TokenAck,
    TokenOffer,
    decode_peer_message,
    encode,
)
from fanny_tui.protocol.tokens import craft_token
from tests.helpers import ROLES, handshake_snapshot, other_role, uuid4s

S = HandshakeState
A = "0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69"
B = "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
TOKEN = craft_token(A, B)
LAT, LON = 43.6045, 1.444
METRE = 1 / 111_195.0  # about one metre of latitude, in degrees

SETTINGS = ContactSettings(radius_m=10.0, min_contact_s=0.0, contact_gap_s=10.0,
                           max_contact_s=100.0, max_speed_mps=30.0, position_interval_s=1.0,
                           token_timeout_s=5.0)



def at(north_m: float, accuracy_m: float | None = 3.0) -> Fix:
    """A fix ``north_m`` metres north of the reference point."""
    return Fix(LAT + north_m * METRE, LON, accuracy_m)


def with_(base: ContactSettings = SETTINGS, **changes: float) -> ContactSettings:
    values = {k: getattr(base, k) for k in base.__dataclass_fields__}
    values.update(changes)
    return ContactSettings(**values)


class ConnectionPair:
    """Two machines joined by an in-memory link and a clock (after h11's test helper).

    ``link[role]`` holds the frames travelling towards ``role``; nothing moves until the test
    delivers it. ``events[role]`` accumulates what each machine emitted; ``output_after_end``
    counts outputs a machine produced once it was already terminal (must stay 0).
    """

    def __init__(self, initiator_id: str = A, responder_id: str = B, *,
                 initiator: ContactSettings = SETTINGS,
                 responder: ContactSettings = SETTINGS) -> None:
        self.ids = {"initiator": initiator_id, "responder": responder_id}
        self.machines = {"initiator": WitnessHandshake("initiator", initiator_id, initiator),
                         "responder": WitnessHandshake("responder", responder_id, responder)}
        self.link: dict[str, deque[str | bytes]] = {r: deque() for r in ROLES}
        self.events: dict[str, list[HandshakeEvent]] = {r: [] for r in ROLES}
        self.stores: dict[str, dict[str, int]] = {r: {} for r in ROLES}
        self.output_after_end = 0
        self.now = 0.0

    def __getitem__(self, role: str) -> WitnessHandshake:
        return self.machines[role]

    def step(self, role: str, action: str, *args: Any) -> None:
        """Call ``machine.action(*args)`` and move what it produced onto the link."""
        machine = self.machines[role]
        was_terminal = machine.state in TERMINAL
        getattr(machine, action)(*args)
        frames = machine.data_to_send()
        events = machine.events()
        if was_terminal and (frames or events):
            self.output_after_end += 1
        self.link[other_role(role)].extend(frames)
        self.events[role].extend(events)

    def open(self, role: str) -> None:
        self.step(role, "channel_open", self.now)

    def deliver(self, role: str) -> None:
        """Deliver the oldest frame travelling towards ``role``."""
        self.step(role, "receive_data", self.link[role].popleft(), self.now)

    def fix(self, role: str, fix: Fix | None) -> None:
        self.step(role, "local_fix", fix, self.now)

    def store(self, role: str, new: bool | None = None) -> None:
        """Play the adapter: store the requested token in a dict, report whether it was new."""
        asked = [e for e in self.events[role] if isinstance(e, StoreToken)]
        token = asked[-1].token
        store = self.stores[role]
        was_new = token not in store
        store[token] = store.get(token, 0) + 1
        self.step(role, "token_stored", was_new if new is None else new, self.now)

    def pump(self) -> None:
        """Deliver everything and store when asked, until nothing moves."""
        moved = True
        while moved:
            moved = False
            for role in ROLES:
                if self.link[role]:
                    self.deliver(role)
                    moved = True
                if self[role].state is S.STORING:
                    self.store(role)
                    moved = True

    def start(self) -> None:
        self.open("initiator")
        self.open("responder")
        self.pump()

    def advance(self, seconds: float, *, step: float = 0.5,
                fixes: dict[str, Fix | None] | None = None) -> None:
        """Move the clock by ``seconds`` in steps: fixes, ticks, deliveries, stores."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + step)
            for role in ROLES:
                if fixes and role in fixes:
                    self.fix(role, fixes[role])
                self.step(role, "tick", self.now)
            self.pump()

    def peek(self, role: str) -> Any:
        return decode_peer_message(self.link[role][0])

    def result(self, role: str) -> HandshakeCompleted | HandshakeFailed | None:
        ends = [e for e in self.events[role] if isinstance(e, HandshakeCompleted | HandshakeFailed)]
        assert len(ends) <= 1
        return ends[0] if ends else None

    def ended(self, role: str) -> ContactEnded | None:
        ends = [e for e in self.events[role] if isinstance(e, ContactEnded)]
        assert len(ends) <= 1
        return ends[0] if ends else None

    def kinds(self, role: str) -> list[type]:
        """Types of the frames travelling towards ``role`` (positions and heartbeats left out)."""
        return [type(m) for m in map(decode_peer_message, self.link[role])
                if not isinstance(m, PeerPosition | Heartbeat)]


def hello(contact_id: str = A, **fields: Any) -> PeerHello:
    values: dict[str, Any] = {"version": DATA_CHANNEL_VERSION, "contact_id": contact_id,
                              "min_contact_s": 0.0, "radius_m": 10.0}
    values.update(fields)
    return PeerHello(**values)


# --- construction ----------------------------------------------------------------------------


def test_constructor_rejects_bad_role_and_contact_id() -> None:
    with pytest.raises(ValueError, match="role"):
        WitnessHandshake("boss", A)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contact_id"):
        WitnessHandshake("initiator", A.upper())
    with pytest.raises(ValueError, match="contact_id"):
        WitnessHandshake("initiator", str(uuid.uuid1()))
    machine = WitnessHandshake("responder", B)
    assert machine.state is S.IDLE and machine.token is None
    assert machine.data_to_send() == [] and machine.events() == []


@pytest.mark.parametrize(("field", "value"), [
    ("radius_m", 0.0), ("contact_gap_s", -1.0), ("min_contact_s", -0.5),
    ("position_interval_s", float("nan")), ("max_speed_mps", float("inf")),
])
def test_settings_refuse_bad_values_naming_them(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        with_(**{field: value})


# --- min_contact_s = 0: the paper's behaviour, token at the first witness ---------------------


def test_min_contact_zero_stores_at_the_first_witness_and_keeps_the_channel_open() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    assert pair["initiator"].state is S.AWAIT_HELLO
    assert pair.peek("responder") == hello(A)
    pair.open("responder")
    assert pair.peek("initiator") == hello(B)

    pair.deliver("responder")  # A's hello: the responder waits for the token
    assert pair["responder"].state is S.CONTACT
    assert pair.events["responder"] == [Established(radius_m=10.0, min_contact_s=0.0)]
    # Without a fix the responder sends a heartbeat, never a made-up position.
    assert decode_peer_message(pair.link["initiator"][1]) == Heartbeat()

    pair.deliver("initiator")  # B's hello: with min_contact_s 0 the token goes at once
    assert pair["initiator"].state is S.AWAIT_ACK
    assert pair["initiator"].token == TOKEN
    assert pair.kinds("responder") == [TokenOffer]

    pair.pump()
    assert pair.result("initiator") == HandshakeCompleted(TOKEN, True)
    assert pair.result("responder") == HandshakeCompleted(TOKEN, True)
    assert pair.stores["initiator"] == pair.stores["responder"] == {TOKEN: 1}
    # The contact goes on: the channel stays open, no peer contact ID is kept.
    for role in ROLES:
        assert pair[role].state is S.WITNESSED
        assert pair[role]._peer_contact_id is None
        assert pair.ended(role) is None


def test_the_responder_stores_before_it_acks() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    pair.deliver("responder")
    pair.deliver("initiator")
    pair.deliver("responder")  # hello already read; this is the initiator's heartbeat
    while pair["responder"].state is not S.STORING:
        pair.deliver("responder")
    assert [e for e in pair.events["responder"] if isinstance(e, StoreToken)] == [
        StoreToken(TOKEN)]
    assert TokenAck not in pair.kinds("initiator"), "no ack before the token is stored"
    pair.store("responder")
    assert pair.kinds("initiator") == [TokenAck]


@pytest.mark.parametrize("first", ROLES)
@pytest.mark.parametrize("early_hello", [False, True])
def test_either_side_may_open_first_or_hear_the_peer_before_its_own_open(
        first: str, early_hello: bool) -> None:
    pair = ConnectionPair()
    pair.open(first)
    if early_hello:
        late = other_role(first)
        pair.deliver(late)  # the peer's hello overtakes the late side's own "open"
        assert pair[late].state is not S.IDLE
        with pytest.raises(LocalProtocolError):
            pair[late].channel_open(0.0)
    else:
        pair.open(other_role(first))
    pair.pump()
    assert pair.result("initiator") == HandshakeCompleted(TOKEN, True)
    assert pair.result("responder") == HandshakeCompleted(TOKEN, True)


@pytest.mark.parametrize(("new_i", "new_r"), [(True, False), (False, True), (False, False)])
def test_already_stored_token_completes_with_new_false(new_i: bool, new_r: bool) -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    for _ in range(20):
        for role, new in (("responder", new_r), ("initiator", new_i)):
            if pair[role].state is S.STORING:
                pair.store(role, new)
        for role in ROLES:
            if pair.link[role]:
                pair.deliver(role)
    assert pair.result("initiator") == HandshakeCompleted(TOKEN, new_i)
    assert pair.result("responder") == HandshakeCompleted(TOKEN, new_r)


def test_roles_swapped_give_the_same_token() -> None:
    one, two = ConnectionPair(A, B), ConnectionPair(B, A)
    for pair in (one, two):
        pair.start()
    assert one.result("initiator") == two.result("responder") == HandshakeCompleted(TOKEN, True)


# --- min_contact_s > 0: the token only after the duration within the radius -----------------


def test_token_only_after_min_contact_within_the_radius() -> None:
    pair = ConnectionPair(initiator=with_(min_contact_s=5.0),
                          responder=with_(min_contact_s=5.0))
    fixes = {"initiator": at(0), "responder": at(3)}
    pair.fix("initiator", fixes["initiator"])
    pair.fix("responder", fixes["responder"])
    pair.start()
    assert pair["initiator"].state is S.CONTACT and pair.result("initiator") is None
    pair.advance(4.0, fixes=fixes)
    assert pair.stores == {"initiator": {}, "responder": {}}, "no token before 5 s within"
    samples = [e.sample for e in pair.events["initiator"] if isinstance(e, PeerSample)]
    assert samples and all(s.verdict == "in" for s in samples)
    assert samples[-1].within_s == pytest.approx(4.0)
    assert 2.9 < samples[-1].distance_m < 3.1
    assert samples[-1].bearing_deg == pytest.approx(0.0, abs=0.01)  # the peer is due north
    assert samples[-1].peer_accuracy_m == 3.0
    pair.advance(2.0, fixes=fixes)
    assert pair.result("initiator") == HandshakeCompleted(TOKEN, True)
    assert pair.result("responder") == HandshakeCompleted(TOKEN, True)
    held = pair.result("initiator")
    assert held is not None and held.measures is not None  # type: ignore[union-attr]
    assert held.measures.duration_s >= 5.0  # type: ignore[union-attr]


def test_a_device_that_lost_its_fix_measures_nothing_until_it_has_one_again() -> None:
    """The responder's fix is lost (the adapter feeds None): it makes no sample from the
    initiator's positions, so its time within the radius stops growing; a fix back resumes."""
    pair = ConnectionPair(initiator=with_(min_contact_s=60.0),
                          responder=with_(min_contact_s=60.0))
    fixes: dict[str, Fix | None] = {"initiator": at(0), "responder": at(3)}
    pair.fix("initiator", fixes["initiator"])
    pair.fix("responder", fixes["responder"])
    pair.start()
    pair.advance(4.0, fixes=fixes)

    def responder_samples() -> list[PeerSample]:
        return [e for e in pair.events["responder"] if isinstance(e, PeerSample)]

    before = len(responder_samples())
    assert before and responder_samples()[-1].sample.within_s == pytest.approx(4.0, abs=1.0)
    pair.advance(6.0, fixes={"initiator": at(0), "responder": None})
    assert len(responder_samples()) == before, "a sample against the last known position"
    pair.advance(2.0, fixes=fixes)
    assert len(responder_samples()) > before


def test_a_pair_that_parts_before_min_contact_leaves_nothing_on_either_device() -> None:
    pair = ConnectionPair(initiator=with_(min_contact_s=30.0),
                          responder=with_(min_contact_s=30.0))
    near = {"initiator": at(0), "responder": at(2)}
    pair.fix("initiator", near["initiator"])
    pair.fix("responder", near["responder"])
    pair.start()
    pair.advance(10.0, fixes=near)
    # The responder walks away at walking speed: 1.5 m/s for 60 s.
    for second in range(1, 61):
        pair.advance(1.0, fixes={"initiator": at(0), "responder": at(2 + 1.5 * second)})
        if all(pair[r].state in TERMINAL for r in ROLES):
            break
    assert pair.stores == {"initiator": {}, "responder": {}}
    for role in ROLES:
        ended = pair.ended(role)
        assert ended is not None and ended.token is None
        assert ended.measures.duration_s < 30.0
        assert pair.result(role) is None, "parting is not a failure"
    reasons = {pair.ended(r).reason for r in ROLES}  # type: ignore[union-attr]
    assert "parted" in reasons and reasons <= {"parted", "peer_closed"}
    assert not any(isinstance(e, StoreToken) for r in ROLES for e in pair.events[r])


@pytest.mark.parametrize("strict", ROLES)
def test_the_stricter_setting_of_the_two_wins(strict: str) -> None:
    loose = with_(min_contact_s=0.0, radius_m=25.0)
    tight = with_(min_contact_s=20.0, radius_m=8.0)
    pair = ConnectionPair(initiator=tight if strict == "initiator" else loose,
                          responder=tight if strict == "responder" else loose)
    pair.fix("initiator", at(0))
    pair.fix("responder", at(5))
    pair.start()
    for role in ROLES:
        assert Established(radius_m=8.0, min_contact_s=20.0) in pair.events[role]
    assert pair.result("initiator") is None  # not at the first witness: 20 s are needed
    pair.advance(21.0, fixes={"initiator": at(0), "responder": at(5)})
    assert pair.result("initiator") == HandshakeCompleted(TOKEN, True)


def test_a_single_jump_never_makes_a_contact() -> None:
    """Far apart; one of the peer's fixes jumps next to us (a GPS outlier): rejected."""
    pair = ConnectionPair(initiator=with_(min_contact_s=0.5), responder=with_(min_contact_s=0.5))
    far = {"initiator": at(0), "responder": at(400)}
    pair.fix("initiator", far["initiator"])
    pair.fix("responder", far["responder"])
    pair.start()
    pair.advance(2.0, fixes=far)
    pair.advance(1.0, fixes={"initiator": at(0), "responder": at(1)})  # 399 m in 1 s
    pair.advance(1.0, fixes=far)
    for role in ROLES:
        verdicts = [e.sample.verdict for e in pair.events[role] if isinstance(e, PeerSample)]
        assert verdicts and "in" not in verdicts
    # The jumping device's own meter rejected its outlier: it was neither measured nor sent.
    assert pair["responder"].meter is not None and pair["responder"].meter.rejected >= 1
    # A peer that sends an outlier anyway: the receiver rejects it too.
    pair.now += 1.0
    pair.step("initiator", "receive_data",
              encode(PeerPosition(latitude=at(1).latitude, longitude=LON, accuracy_m=3.0)),
              pair.now)
    assert pair["initiator"].meter is not None and pair["initiator"].meter.rejected == 1
    pair.advance(2.0, fixes=far)
    verdicts = [e.sample.verdict for e in pair.events["initiator"] if isinstance(e, PeerSample)]
    assert "in" not in verdicts
    assert pair.stores == {"initiator": {}, "responder": {}}


def test_an_outlier_held_by_the_adapter_for_many_ticks_never_confirms_itself() -> None:
    """The adapter feeds the device's latest fix at every tick: one outlier fed again and
    again is one fix, not a run of confirmations; the true fixes that follow are taken."""
    pair = ConnectionPair(initiator=with_(min_contact_s=0.5), responder=with_(min_contact_s=0.5))
    far = {"initiator": at(0), "responder": at(400)}
    pair.fix("initiator", far["initiator"])
    pair.fix("responder", far["responder"])
    pair.start()
    pair.advance(2.0, fixes=far)
    pair.advance(5.0, fixes={"initiator": at(0), "responder": at(1)})  # held for 10 ticks
    for role in ROLES:
        verdicts = [e.sample.verdict for e in pair.events[role] if isinstance(e, PeerSample)]
        assert verdicts and "in" not in verdicts
    pair.advance(1.0, fixes={"initiator": at(0), "responder": at(401)})
    last = [e.sample for e in pair.events["initiator"] if isinstance(e, PeerSample)][-1]
    assert 400 < last.distance_m < 402
    assert pair.stores == {"initiator": {}, "responder": {}}


# --- how a contact ends ------------------------------------------------------------------------


def test_parted_after_contact_gap_s_with_the_token_kept() -> None:
    pair = ConnectionPair()
    pair.fix("initiator", at(0))
    pair.fix("responder", at(2))
    pair.start()
    pair.advance(3.0, fixes={"initiator": at(0), "responder": at(2)})
    assert pair.result("initiator") == HandshakeCompleted(TOKEN, True)
    for second in range(1, 41):  # the responder walks away at 2 m/s
        pair.advance(1.0, fixes={"initiator": at(0), "responder": at(2 + 2.0 * second)})
    for role in ROLES:
        ended = pair.ended(role)
        assert ended is not None and ended.token == TOKEN
        assert ended.reason in ("parted", "peer_closed")
        assert pair[role].state is S.CLOSED
        # No position is kept once the contact ended, only the relative measures.
        machine = pair[role]
        assert machine._fix is None and machine.meter is not None
        assert machine.meter._own.last is None and machine.meter._peer.last is None
        assert str(LAT)[:6] not in repr(vars(machine)) + repr(vars(machine.meter))
    assert pair.stores["initiator"] == pair.stores["responder"] == {TOKEN: 1}


def test_max_contact_ends_the_contact() -> None:
    pair = ConnectionPair(initiator=with_(max_contact_s=12.0), responder=with_(max_contact_s=40.0))
    fixes = {"initiator": at(0), "responder": at(1)}
    pair.fix("initiator", fixes["initiator"])
    pair.fix("responder", fixes["responder"])
    pair.start()
    pair.advance(11.0, fixes=fixes)
    assert all(pair[r].state is S.WITNESSED for r in ROLES)
    pair.advance(2.0, fixes=fixes)
    assert pair.ended("initiator").reason == "max_contact"  # type: ignore[union-attr]
    assert pair.ended("responder").reason == "peer_closed"  # type: ignore[union-attr]
    assert pair.ended("initiator").measures.duration_s >= 11.0  # type: ignore[union-attr]


def test_heartbeat_loss_ends_the_contact_as_channel_lost() -> None:
    pair = ConnectionPair()
    pair.start()
    silence = SETTINGS.silence_s
    assert silence == max(3 * SETTINGS.position_interval_s, SETTINGS.contact_gap_s)
    # Heartbeats keep a contact without fixes alive until contact_gap_s parts it; here the
    # responder's frames are lost on the way instead.
    pair.now += 1.0
    for _ in range(int(silence * 2) + 2):
        pair.now += 0.5
        pair.step("initiator", "tick", pair.now)
        pair.link["initiator"].clear()  # everything from the responder is lost
        if pair["initiator"].state in TERMINAL:
            break
    ended = pair.ended("initiator")
    assert ended is not None and ended.reason in ("channel_lost", "parted")
    assert ended.token == TOKEN


def test_heartbeat_loss_without_gap_ends_as_channel_lost() -> None:
    """With a long contact_gap_s and fixes in the radius, only the silence ends it."""
    settings_ = with_(contact_gap_s=50.0, position_interval_s=1.0)
    pair = ConnectionPair(initiator=settings_, responder=settings_)
    pair.fix("initiator", at(0))
    pair.fix("responder", at(1))
    pair.start()
    pair.advance(5.0, fixes={"initiator": at(0), "responder": at(1)})
    start = pair.now
    while pair["initiator"].state not in TERMINAL and pair.now < start + 100:
        pair.now += 1.0
        pair.step("initiator", "tick", pair.now)
        pair.link["initiator"].clear()
    assert pair.ended("initiator").reason == "channel_lost"  # type: ignore[union-attr]
    assert pair.now - start <= settings_.silence_s + 1.0


def test_the_peer_closing_mid_store_ends_after_the_store() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    while pair["responder"].state is not S.STORING:
        pair.deliver("responder") if pair.link["responder"] else pair.deliver("initiator")
    pair.step("responder", "receive_data", encode(Close(reason="stopped")), pair.now)
    assert pair["responder"].state is S.STORING
    pair.store("responder")
    assert pair.result("responder") == HandshakeCompleted(TOKEN, True)
    assert pair.ended("responder").reason == "peer_closed"  # type: ignore[union-attr]


def test_stop_sends_close_stopped() -> None:
    pair = ConnectionPair()
    pair.start()
    pair.step("initiator", "stop", pair.now)
    assert pair.kinds("responder") == [Close]
    pair.pump()
    assert pair.ended("initiator").reason == "stopped"  # type: ignore[union-attr]
    assert pair.ended("responder").reason == "peer_closed"  # type: ignore[union-attr]
    assert pair.ended("responder").token == TOKEN  # type: ignore[union-attr]


def test_ack_that_never_comes_fails_after_token_timeout_s() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    pair.deliver("initiator")  # the responder's hello: the token is sent
    assert pair["initiator"].state is S.AWAIT_ACK
    pair.link["responder"].clear()  # the token is lost
    pair.now = 4.9
    pair.step("initiator", "tick", pair.now)
    assert pair["initiator"].state is S.AWAIT_ACK
    pair.now = 5.0
    pair.step("initiator", "tick", pair.now)
    assert pair.result("initiator") == HandshakeFailed("timeout")
    assert pair.kinds("responder") == [Abort]


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_a_version_below_the_lowest_supported_is_refused(role: str) -> None:
    assert MIN_DATA_CHANNEL_VERSION == 2 == DATA_CHANNEL_VERSION
    machine = WitnessHandshake(role, B)
    machine.channel_open(0.0)
    machine.data_to_send()
    machine.receive_data(encode(hello(A, version=MIN_DATA_CHANNEL_VERSION - 1)), 0.0)
    assert [decode_peer_message(f) for f in machine.data_to_send()] == [
        Abort(reason="unsupported_version")]
    assert HandshakeFailed("unsupported_version") in machine.events()
    assert machine.state is S.FAILED and machine.version is None


@pytest.mark.parametrize("peer_version", [3, 7, 2**31 - 1])
@pytest.mark.parametrize("role", ROLES)
def test_a_higher_version_peer_is_answered_in_version_2(role: str, peer_version: int) -> None:
    """docs/protocol.md, "Versions": the pair speaks min(own, peer's); a v2 side goes on."""
    pair = ConnectionPair()
    peer = other_role(role)
    pair.open(role)
    pair.open(peer)
    # The higher-version peer's hello, as it would send it (same fields, higher version).
    pair.link[role].clear()
    pair.link[role].append(encode(hello(pair.ids[peer], version=peer_version)))
    pair.pump()
    assert pair[role].version == DATA_CHANNEL_VERSION
    assert pair[peer].version == DATA_CHANNEL_VERSION  # its own hello said 2: it speaks 2
    assert pair.result("initiator") == HandshakeCompleted(TOKEN, True)
    assert pair.result("responder") == HandshakeCompleted(TOKEN, True)
    assert pair.stores == {"initiator": {TOKEN: 1}, "responder": {TOKEN: 1}}


@pytest.mark.parametrize("frame", [encode(hello(A)).encode(), b"", bytearray(b"{}")])
def test_a_binary_frame_is_bad_message_whatever_it_holds(frame: bytes) -> None:
    """A binary frame (even valid JSON in UTF-8) is refused: frames are text (PPID 51)."""
    machine = WitnessHandshake("responder", B)
    machine.channel_open(0.0)
    machine.data_to_send()
    machine.receive_data(frame, 0.0)
    assert [decode_peer_message(f) for f in machine.data_to_send()] == [
        Abort(reason="bad_message: binary frame")]
    assert machine.events() == [HandshakeFailed("bad_message"),
                                ContactEnded("aborted", machine.measures(), None)]


@pytest.mark.parametrize("interval", [1.0, MAX_FRAME_INTERVAL_S, 60.0, 3600.0])
def test_frames_leave_at_most_max_frame_interval_apart(interval: float) -> None:
    """docs/protocol.md, "Positions": a peer_position or heartbeat at least every 10 s, even
    with a longer position_interval_s (the broker positions keep that interval)."""
    settings_ = with_(position_interval_s=interval, contact_gap_s=1000.0, max_contact_s=5000.0)
    pair = ConnectionPair(initiator=settings_, responder=settings_)
    pair.start()
    sent_at: list[float] = []
    while pair.now < 100.0:
        pair.now += 0.25
        pair.step("initiator", "tick", pair.now)
        frames = list(pair.link["responder"])
        pair.pump()
        sent_at += [pair.now] * sum(isinstance(decode_peer_message(f), Heartbeat) for f in frames)
    gaps = [b - a for a, b in zip([0.0, *sent_at], sent_at, strict=False)]
    assert pair["initiator"].state is S.WITNESSED
    assert max(gaps) == pytest.approx(min(interval, MAX_FRAME_INTERVAL_S))


def test_same_contact_id_fails_both_sides() -> None:
    pair = ConnectionPair(A, A)
    pair.start()
    assert pair.result("initiator") == HandshakeFailed("same_contact_id")
    assert pair.result("responder") == HandshakeFailed("same_contact_id")
    assert pair.stores == {"initiator": {}, "responder": {}}


def test_wrong_token_is_refused_with_an_abort() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    pair.deliver("responder")
    pair.step("responder", "receive_data", encode(TokenOffer(token="e" * 64)), 0.0)
    assert pair.result("responder") == HandshakeFailed("token_mismatch")
    assert decode_peer_message(pair.link["initiator"][-1]) == Abort(reason="token_mismatch")
    pair.link["responder"].clear()
    pair.pump()
    assert pair.result("initiator") == HandshakeFailed("peer_aborted: token_mismatch")
    assert pair.stores == {"initiator": {}, "responder": {}}


def test_wrong_ack_is_refused_and_the_initiator_stores_nothing() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    pair.deliver("initiator")
    pair.step("initiator", "receive_data", encode(TokenAck(token="f" * 64)), 0.0)
    assert pair.result("initiator") == HandshakeFailed("ack_mismatch")
    assert pair.stores["initiator"] == {}


@pytest.mark.parametrize("failing", ROLES)
def test_store_failure_aborts_the_exchange(failing: str) -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    for _ in range(20):
        if pair[failing].state is S.STORING:
            break
        if pair[other_role(failing)].state is S.STORING:
            pair.store(other_role(failing))
        for role in ROLES:
            if pair.link[role]:
                pair.deliver(role)
    pair.step(failing, "store_failed", "OSError (No space left on device)", 0.0)
    assert pair.result(failing) == HandshakeFailed(
        "store_failed: OSError (No space left on device)")
    assert decode_peer_message(pair.link[other_role(failing)][-1]) == Abort(reason="store_failed")
    pair.pump()
    if failing == "responder":
        assert pair.result("initiator") == HandshakeFailed("peer_aborted: store_failed")
        assert pair.stores["initiator"] == {}
    else:
        # The responder stored first and keeps its token: a token one side holds is harmless.
        assert pair.result("responder") == HandshakeCompleted(TOKEN, True)
        assert pair.ended("responder").reason == "aborted"  # type: ignore[union-attr]
    assert pair.stores[failing] == {}


# --- every state ---------------------------------------------------------------------------


def _machine_in(role: str, state: HandshakeState) -> tuple[ConnectionPair, WitnessHandshake]:
    """A pair whose ``role`` machine is in ``state`` (a non-terminal one)."""
    pair = ConnectionPair()
    if state is S.IDLE:
        return pair, pair[role]
    pair.open(role)
    if state is S.AWAIT_HELLO:
        return pair, pair[role]
    pair.open(other_role(role))
    for _ in range(30):
        if pair[role].state is state:
            return pair, pair[role]
        if pair[role].state is S.STORING:
            pair.store(role)
        elif pair[other_role(role)].state is S.STORING:
            pair.store(other_role(role))
        elif role == "initiator" and state is S.CONTACT:
            # Only a min_contact_s above 0 keeps the initiator in CONTACT.
            pair = ConnectionPair(initiator=with_(min_contact_s=5.0))
            pair.open("initiator")
            pair.open("responder")
            pair.pump()
        elif pair.link[role] and not (role == "initiator" and state is S.AWAIT_ACK
                                       and pair[role].state is S.AWAIT_ACK):
            pair.deliver(role)
        else:
            pair.deliver(other_role(role))
    raise AssertionError(f"cannot reach {state} as {role}")


REACHABLE = [
    ("initiator", S.IDLE), ("initiator", S.AWAIT_HELLO), ("initiator", S.CONTACT),
    ("initiator", S.AWAIT_ACK), ("initiator", S.STORING), ("initiator", S.WITNESSED),
    ("responder", S.IDLE), ("responder", S.AWAIT_HELLO), ("responder", S.CONTACT),
    ("responder", S.STORING), ("responder", S.WITNESSED),
]
HOLDING = {S.WITNESSED}


@pytest.mark.parametrize(("role", "state"), REACHABLE)
def test_reachable_states(role: str, state: HandshakeState) -> None:
    assert _machine_in(role, state)[1].state is state


@pytest.mark.parametrize(("role", "state"), REACHABLE)
@pytest.mark.parametrize("garbage", [b"\xff\xfe", "{", '{"type":"peer_hello"}',
                                     '{"type":"token"}', '{"type":"ack","token":"x"}', "[]", "",
                                     '{"type":"heartbeat","extra":1}'])
def test_bad_message_in_every_state(role: str, state: HandshakeState, garbage: Any) -> None:
    pair, machine = _machine_in(role, state)
    pair.link[other_role(role)].clear()
    pair.step(role, "receive_data", garbage, pair.now)
    sent = [decode_peer_message(f) for f in pair.link[other_role(role)]]
    assert len(sent) == 1 and isinstance(sent[0], Abort)
    assert sent[0].reason.startswith("bad_message: ")
    if state in HOLDING:  # the token stays; only the contact ends
        assert pair.ended(role).reason == "aborted"  # type: ignore[union-attr]
        assert pair.result(role) == HandshakeCompleted(TOKEN, True)
    else:
        assert pair.result(role) == HandshakeFailed("bad_message")
    assert machine.state in TERMINAL
    assert machine._peer_contact_id is None


@pytest.mark.parametrize(("role", "state"), REACHABLE)
def test_peer_abort_in_every_state(role: str, state: HandshakeState) -> None:
    pair, machine = _machine_in(role, state)
    pair.link[other_role(role)].clear()
    pair.step(role, "receive_data", encode(Abort(reason="changed my mind")), pair.now)
    if state in HOLDING:
        assert pair.result(role) == HandshakeCompleted(TOKEN, True)
    else:
        assert pair.result(role) == HandshakeFailed("peer_aborted: changed my mind")
    assert not pair.link[other_role(role)], "an abort is not answered"
    # A side whose channel had opened always reports how the contact ended.
    assert (pair.ended(role) is not None) == (state is not S.IDLE)


@pytest.mark.parametrize(("role", "state"), REACHABLE)
def test_channel_closed_in_every_state(role: str, state: HandshakeState) -> None:
    pair, machine = _machine_in(role, state)
    pair.link[other_role(role)].clear()
    pair.step(role, "channel_closed", pair.now)
    assert not pair.link[other_role(role)], "a closed channel carries nothing"
    if state is S.STORING:
        assert machine.state is S.STORING  # the store decides
        pair.store(role)
        assert pair.ended(role).reason == "channel_lost"  # type: ignore[union-attr]
        return
    if state in (S.CONTACT, S.WITNESSED):
        assert pair.ended(role).reason == "channel_lost"  # type: ignore[union-attr]
        assert not isinstance(pair.result(role), HandshakeFailed)
    else:
        assert pair.result(role) == HandshakeFailed("channel_closed")


@pytest.mark.parametrize(("role", "state"), REACHABLE)
def test_establishment_timeout_acts_only_before_the_hellos(role: str,
                                                           state: HandshakeState) -> None:
    pair, machine = _machine_in(role, state)
    pair.link[other_role(role)].clear()
    before = handshake_snapshot(machine)
    pair.step(role, "timeout", pair.now)
    if state in (S.IDLE, S.AWAIT_HELLO):
        assert pair.result(role) == HandshakeFailed("timeout")
        assert [decode_peer_message(f) for f in pair.link[other_role(role)]] == [
            Abort(reason="timeout")]
    else:
        assert handshake_snapshot(machine) == before


@pytest.mark.parametrize(("role", "state", "message"), [
    ("responder", S.IDLE, TokenOffer(token=TOKEN)),
    ("responder", S.AWAIT_HELLO, TokenAck(token=TOKEN)),
    ("responder", S.AWAIT_HELLO, PeerPosition(latitude=LAT, longitude=LON)),
    ("responder", S.CONTACT, hello(A)),
    ("responder", S.CONTACT, TokenAck(token=TOKEN)),
    ("responder", S.STORING, TokenOffer(token=TOKEN)),
    ("initiator", S.IDLE, TokenAck(token=TOKEN)),
    ("initiator", S.AWAIT_HELLO, TokenOffer(token=TOKEN)),
    ("initiator", S.CONTACT, TokenAck(token=TOKEN)),
    ("initiator", S.AWAIT_ACK, hello(B)),
    ("initiator", S.AWAIT_ACK, TokenOffer(token=TOKEN)),
    ("initiator", S.STORING, TokenAck(token=TOKEN)),
    ("initiator", S.WITNESSED, TokenAck(token=TOKEN)),
])
def test_unexpected_message_fails_with_an_abort(role: str, state: HandshakeState,
                                                message: Any) -> None:
    pair, machine = _machine_in(role, state)
    pair.link[other_role(role)].clear()
    pair.step(role, "receive_data", encode(message), pair.now)
    sent = [decode_peer_message(f) for f in pair.link[other_role(role)]]
    assert len(sent) == 1 and isinstance(sent[0], Abort)
    assert sent[0].reason.startswith("unexpected ")
    if state in HOLDING:
        assert pair.ended(role).reason == "aborted"  # type: ignore[union-attr]
    else:
        assert pair.result(role) == HandshakeFailed("unexpected_message")
    assert machine._peer_contact_id is None


# --- illegal local calls ---------------------------------------------------------------------


def _terminal_machine(role: str, state: HandshakeState) -> WitnessHandshake:
    pair = ConnectionPair()
    pair.open(role)
    if state is S.FAILED:
        pair.step(role, "timeout", 0.0)
    else:
        pair.open(other_role(role))
        pair.pump()
        pair.step(role, "stop", 0.0)
    assert pair[role].state is state
    return pair[role]


ILLEGAL_CALLS: list[tuple[str, tuple[Any, ...], set[HandshakeState]]] = [
    ("channel_open", (0.0,), {S.IDLE}),
    ("token_stored", (True, 0.0), {S.STORING}),
    ("token_stored", (False, 0.0), {S.STORING}),
    ("store_failed", ("disk full", 0.0), {S.STORING}),
]
ALL_STATES = [*REACHABLE, *((r, s) for r in ROLES for s in (S.CLOSED, S.FAILED))]
ILLEGAL_CASES = [
    (role, state, call, args)
    for role, state in ALL_STATES
    for call, args, legal_in in ILLEGAL_CALLS
    if state not in legal_in
]


def test_illegal_cases_cover_every_state_and_call() -> None:
    assert {state for _, state, _, _ in ILLEGAL_CASES} == set(HandshakeState)
    # 15 (role, state) pairs x 4 calls, minus the legal ones: open in IDLE and the three
    # store reports in STORING, for each role.
    assert len(ILLEGAL_CASES) == 15 * 4 - 2 * (1 + 3)


@pytest.mark.parametrize(("role", "state", "call", "args"), ILLEGAL_CASES)
def test_illegal_local_call_raises_and_changes_nothing(
        role: str, state: HandshakeState, call: str, args: tuple[Any, ...]) -> None:
    machine = (_terminal_machine(role, state) if state in TERMINAL
               else _machine_in(role, state)[1])
    assert machine.state is state
    before = handshake_snapshot(machine)
    with pytest.raises(LocalProtocolError, match=state.value):
        getattr(machine, call)(*args)
    assert handshake_snapshot(machine) == before


@pytest.mark.parametrize("state", [S.CLOSED, S.FAILED])
def test_after_the_end_inputs_change_nothing(state: HandshakeState) -> None:
    for role in ROLES:
        machine = _terminal_machine(role, state)
        machine.data_to_send()
        machine.events()
        before = handshake_snapshot(machine)
        for frame in (encode(hello(A)), encode(TokenAck(token=TOKEN)), encode(Abort(reason="x")),
                      encode(Close(reason="parted")), b"\x00garbage"):
            machine.receive_data(frame, 1.0)
        machine.local_fix(at(0), 1.0)
        for call in ("tick", "timeout", "channel_closed", "stop"):
            getattr(machine, call)(1000.0)
        assert handshake_snapshot(machine) == before
        assert machine.data_to_send() == [] and machine.events() == []


# --- random orders without loss: always completes --------------------------------------------


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(uuid4s, min_size=2, max_size=2, unique=True), schedule=st.data())
def test_any_interleaving_without_loss_completes(ids: list[str], schedule: st.DataObject
                                                  ) -> None:
    pair = ConnectionPair(*ids)
    to_open = set(ROLES)
    while True:
        choices: list[tuple[str, str]] = [("open", r) for r in sorted(to_open)]
        choices += [("deliver", r) for r in ROLES if pair.link[r]]
        choices += [("store", r) for r in ROLES if pair[r].state is S.STORING]
        if not choices:
            break
        action, role = schedule.draw(st.sampled_from(choices))
        if action == "open":
            to_open.discard(role)
            if pair[role].state is S.IDLE:
                pair.open(role)
        elif action == "deliver":
            pair.deliver(role)
        else:
            pair.store(role)
    token = craft_token(*ids)
    assert pair.result("initiator") == HandshakeCompleted(token, True)
    assert pair.result("responder") == HandshakeCompleted(token, True)


@settings(max_examples=100, deadline=None)
@given(min_contact=st.floats(0.0, 20.0), distance=st.floats(0.0, 30.0),
       accuracy=st.floats(0.0, 20.0))
def test_token_exactly_when_within_long_enough(min_contact: float, distance: float,
                                               accuracy: float) -> None:
    """Standing still: a token after min_contact_s when the rule says "in", never otherwise
    (except with min_contact_s 0, the paper's token at the first witness)."""
    s = with_(min_contact_s=min_contact, contact_gap_s=5.0)
    pair = ConnectionPair(initiator=s, responder=s)
    fixes = {"initiator": at(0, accuracy), "responder": at(distance, accuracy)}
    pair.fix("initiator", fixes["initiator"])
    pair.fix("responder", fixes["responder"])
    pair.start()
    pair.advance(min_contact + 3.0, fixes=fixes)
    samples = [e.sample for e in pair.events["initiator"] if isinstance(e, PeerSample)]
    within = bool(samples) and samples[0].verdict == "in"
    stored = bool(pair.stores["initiator"]) and bool(pair.stores["responder"])
    assert stored == (within or min_contact == 0.0)


# --- stateful fuzzing: deliveries, duplicates, drops, garbage, time, positions ----------------


forged_frames = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    uuid4s.map(lambda u: encode(hello(u))),
    st.text("0123456789abcdef", min_size=64, max_size=64).flatmap(
        lambda t: st.sampled_from([encode(TokenOffer(token=t)), encode(TokenAck(token=t))])),
    st.text(max_size=20).map(lambda r: encode(Abort(reason=r))),
    st.sampled_from(["parted", "stopped"]).map(lambda r: encode(Close(reason=r))),
    st.floats(-50, 50).map(lambda m: encode(PeerPosition(latitude=LAT + m * METRE,
                                                         longitude=LON, accuracy_m=3.0))),
)


class WitnessExchangeFuzz(RuleBasedStateMachine):
    """Two machines, a hostile link, a clock and an adapter that may fail: invariants hold."""

    pair: ConnectionPair

    @initialize(ids=st.one_of(st.lists(uuid4s, min_size=2, max_size=2, unique=True),
                              uuid4s.map(lambda u: [u, u])),
                min_contact=st.sampled_from([0.0, 2.0]))
    def start(self, ids: list[str], min_contact: float) -> None:
        s = with_(min_contact_s=min_contact, contact_gap_s=4.0, max_contact_s=30.0)
        self.pair = ConnectionPair(*ids, initiator=s, responder=s)
        self.ended: dict[str, tuple[Any, ...] | None] = {r: None for r in ROLES}

    def _guarded(self, role: str, call: str, *args: Any, legal: bool) -> None:
        machine = self.pair[role]
        if legal:
            self.pair.step(role, call, *args)
            return
        before = handshake_snapshot(machine)
        with pytest.raises(LocalProtocolError):
            getattr(machine, call)(*args)
        assert handshake_snapshot(machine) == before

    @rule(role=st.sampled_from(ROLES))
    def open(self, role: str) -> None:
        self._guarded(role, "channel_open", self.pair.now,
                      legal=self.pair[role].state is S.IDLE)

    @precondition(lambda self: any(self.pair.link.values()))
    @rule(role=st.sampled_from(ROLES))
    def deliver(self, role: str) -> None:
        if self.pair.link[role]:
            self.pair.deliver(role)

    @precondition(lambda self: any(self.pair.link.values()))
    @rule(role=st.sampled_from(ROLES), kind=st.sampled_from(["duplicate", "drop", "swap"]))
    def meddle(self, role: str, kind: str) -> None:
        queue = self.pair.link[role]
        if not queue:
            return
        if kind == "duplicate":
            queue.appendleft(queue[0])
        elif kind == "drop":
            queue.popleft()
        elif len(queue) > 1:
            queue[0], queue[1] = queue[1], queue[0]

    @rule(seconds=st.floats(0.1, 6.0), north=st.floats(0.0, 40.0))
    def time_passes(self, seconds: float, north: float) -> None:
        self.pair.advance(seconds, fixes={"initiator": at(0), "responder": at(north)})

    @rule(role=st.sampled_from(ROLES), frame=forged_frames,
          kind=st.sampled_from(["garbage", "timeout", "close", "stop"]))
    def hostile(self, role: str, frame: str | bytes, kind: str) -> None:
        if kind == "garbage":
            self.pair.step(role, "receive_data", frame, self.pair.now)
        elif kind == "timeout":
            self.pair.step(role, "timeout", self.pair.now)
        elif kind == "close":
            self.pair.step(role, "channel_closed", self.pair.now)
        else:
            self.pair.step(role, "stop", self.pair.now)

    @rule(role=st.sampled_from(ROLES), new=st.booleans())
    def store_ok(self, role: str, new: bool) -> None:
        if self.pair[role].state is S.STORING:
            self.pair.store(role, new)
        else:
            self._guarded(role, "token_stored", new, self.pair.now, legal=False)

    @rule(role=st.sampled_from(ROLES))
    def store_fails(self, role: str) -> None:
        self._guarded(role, "store_failed", "disk full", self.pair.now,
                      legal=self.pair[role].state is S.STORING)

    # -- invariants --

    @invariant()
    def one_store_one_outcome_one_end(self) -> None:
        for role in ROLES:
            events = self.pair.events[role]
            stores = [e for e in events if isinstance(e, StoreToken)]
            outcomes = [e for e in events if isinstance(e, HandshakeCompleted | HandshakeFailed)]
            ends = [e for e in events if isinstance(e, ContactEnded)]
            assert len(stores) <= 1 and len(outcomes) <= 1 and len(ends) <= 1
            state = self.pair[role].state
            if ends:
                assert state in TERMINAL and events[-1] is ends[0], "ContactEnded comes last"
            if outcomes and isinstance(outcomes[0], HandshakeCompleted):
                assert stores and stores[0].token == outcomes[0].token
                assert state in (S.WITNESSED, S.CLOSED), "a side holding a token never fails"
                if ends:
                    assert ends[0].token == outcomes[0].token
            if outcomes and isinstance(outcomes[0], HandshakeFailed):
                assert state is S.FAILED
                assert outcomes[0].reason == self.pair[role].failure_reason
            if state is S.FAILED:
                assert outcomes and isinstance(outcomes[0], HandshakeFailed)
            if ends and ends[0].token is None:
                assert not self.pair.stores[role] or state is S.FAILED or not outcomes

    @invariant()
    def nothing_changes_after_the_end(self) -> None:
        assert self.pair.output_after_end == 0
        for role in ROLES:
            machine = self.pair[role]
            if machine.state in TERMINAL:
                now = (machine.state, machine.token, machine.failure_reason,
                       machine.close_reason)
                if self.ended[role] is None:
                    self.ended[role] = now
                assert now == self.ended[role]

    @invariant()
    def peer_contact_id_forgotten_at_the_end(self) -> None:
        for role in ROLES:
            machine = self.pair[role]
            if machine.state in TERMINAL or machine.state is S.WITNESSED:
                assert machine._peer_contact_id is None
                peer_id = self.pair.ids[other_role(role)]
                if peer_id != self.pair.ids[role]:
                    assert peer_id not in repr(vars(machine))

    @invariant()
    def completions_agree(self) -> None:
        done = {r for r in ROLES if isinstance(self.pair.result(r), HandshakeCompleted)}
        ids = self.pair.ids
        if done:
            assert ids["initiator"] != ids["responder"]
        if "initiator" in done:
            # The initiator stores only on the responder's ack, sent only once it had stored.
            assert "responder" in done
        for role in done:
            assert self.pair.stores[role] == {craft_token(*ids.values()): 1}

    @invariant()
    def only_the_true_token_is_ever_stored(self) -> None:
        ids = self.pair.ids
        if ids["initiator"] == ids["responder"]:
            assert not any(self.pair.stores.values())
            return
        token = craft_token(ids["initiator"], ids["responder"])
        for role in ROLES:
            assert set(self.pair.stores[role]) <= {token}


WitnessExchangeFuzz.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestWitnessExchangeFuzz = WitnessExchangeFuzz.TestCase


def test_a_token_that_never_comes_fails_the_responder_when_min_contact_is_zero() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    pair.deliver("responder")  # the initiator's hello; the initiator never hears back
    assert pair["responder"].state is S.CONTACT
    pair.now = SETTINGS.token_timeout_s - 0.1
    pair.step("responder", "tick", pair.now)
    assert pair["responder"].state is S.CONTACT
    pair.now = SETTINGS.token_timeout_s
    pair.step("responder", "tick", pair.now)
    assert pair.result("responder") == HandshakeFailed("timeout")
    assert pair.ended("responder").reason == "aborted"  # type: ignore[union-attr]


def test_with_min_contact_the_responder_waits_for_the_token_until_the_contact_ends() -> None:
    s = with_(min_contact_s=30.0, contact_gap_s=50.0)
    pair = ConnectionPair(initiator=s, responder=s)
    pair.fix("initiator", at(0))
    pair.fix("responder", at(20))  # "out": no token yet, never a timeout
    pair.start()
    pair.advance(40.0, fixes={"initiator": at(0), "responder": at(20)})
    assert pair["responder"].state is S.CONTACT and pair.result("responder") is None
