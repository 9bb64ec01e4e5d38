"""Fuzzing the witness exchange (fanny_tui.protocol.handshake) with an active attacker.

tests/test_handshake.py drives two machines through a lossy link (deliver in order, duplicate
the head, drop the head, swap two, garbage, timeouts, closes, stores). Here the link belongs to
an attacker, Mallory, who also has a contact ID of her own. She may deliver any queued frame
out of order, duplicate or drop any of them, replay any frame either side ever sent to either
side (a side's own frames reflected back to it included), send a side a ``peer_hello`` with its
own contact ID, her contact ID or a random one (and any version), offer or ack tokens crafted
for other pairs (her and one side, two random IDs, a side with itself), send positions,
heartbeats, closes, messages of the broker channels, garbage, deep nesting and aborts; the
adapters time out, close, stop and fail to store, and time passes (``tick``).

Invariants after every step:

* at most one StoreToken, one outcome and one ContactEnded per side; terminal states absorb
  (nothing changes, nothing is sent, no event) and the peer's contact ID is forgotten;
* a side stores only ``craft_token(own ID, an ID that reached it in a peer_hello)``; if no
  contact ID but the real peer's ever reached it, only the real pair's token;
* the responder stores only a token it was offered, the initiator only one it was acked;
  the initiator completes only if the responder stored, unless Mallory forged that very ack;
* every frame a side sends is a valid peer message; it sends only its own contact ID, one
  hello, at most one token or ack, and nothing after its one ``close`` or ``abort``;
* no call raises, except LocalProtocolError for an illegal local call, which changes nothing.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fanny_tui.protocol.contact import Fix
from fanny_tui.protocol.errors import LocalProtocolError
from fanny_tui.protocol.handshake import (
    TERMINAL,
    ContactEnded,
    HandshakeCompleted,
    HandshakeFailed,
    HandshakeState,
    StoreToken,
    WitnessHandshake,
)
from fanny_tui.protocol.messages import (
    DATA_CHANNEL_VERSION,
    Abort,
    Close,
    Error,
    Heartbeat,
    Hello,
    Match,
    PeerHello,
    PeerPosition,
    Position,
    PositivesPoll,
    Signal,
    TokenAck,
    TokenOffer,
    decode_peer_message,
    encode,
)
from fanny_tui.protocol.tokens import craft_token
from tests.fuzz import fuzz_settings, report, tried
from tests.helpers import ROLES, handshake_snapshot, other_role, uuid4s

S = HandshakeState
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)


def self_token(contact_id: str) -> str:
    """What a careless implementation would craft for a device with itself."""
    return hashlib.sha256((contact_id + contact_id).encode("ascii")).hexdigest()


def hello(contact_id: str, version: int = DATA_CHANNEL_VERSION) -> PeerHello:
    return PeerHello(version=version, contact_id=contact_id, min_contact_s=0.0, radius_m=10.0)


WRONG_CHANNEL = [
    encode(Hello(session_id="0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69", radius_m=5.0)),
    encode(Position(latitude=44.0, longitude=5.0)),
    encode(Match(peer_session_id="0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69", role="initiator")),
    encode(Signal(peer_session_id="0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69", sdp_type="offer",
                  sdp="v=0")),
    encode(PositivesPoll()),
    encode(Error(code="bad_message", message="no")),
]
garbage = st.one_of(
    st.sampled_from([b"", "", "null", "[]", "{}", '{"type":"token"}', '{"type":"ack","token":1}',
                     '{"type":"peer_hello","contact_id":"x"}', "\ud800", b"\xff\xfe",
                     '{"type":"contact_id","contact_id":"0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69"}',
                     '{"type":"abort","reason":"\udfff"}',
                     '{"x":' + "[" * 5000 + "]" * 5000 + ',"type":"abort","reason":"r"}',
                     '{"type":"abort","reason":"' + "r" * 201 + '"}',
                     '{"type":"ack","token":"' + "A" * 64 + '"}'] + WRONG_CHANNEL),
    # str with lone surrogates (no UTF-8 form), bytes, text
    st.text(st.sampled_from(["\ud800", "\udc80", "{", "}", '"', "a"]), min_size=1, max_size=20),
    st.binary(max_size=60), st.text(max_size=60),
)


class MalloryLink(RuleBasedStateMachine):
    """Two honest machines, a link owned by an attacker with her own contact ID."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.now = 0.0

    @initialize(ids=st.lists(uuid4s, min_size=3, max_size=3, unique=True))
    def start(self, ids: list[str]) -> None:
        self.ids = {"initiator": ids[0], "responder": ids[1]}
        self.mallory = ids[2]
        self.m = {r: WitnessHandshake(r, self.ids[r]) for r in ROLES}  # type: ignore[arg-type]
        # Frames on their way to each role, with where they come from: "peer" (the other
        # machine sent it), "replay" (a copy of a frame a machine sent), "forged" (Mallory's).
        self.link: dict[str, deque[tuple[str | bytes, str]]] = {r: deque() for r in ROLES}
        self.sent: dict[str, list[str]] = {r: [] for r in ROLES}
        self.events: dict[str, list[Any]] = {r: [] for r in ROLES}
        self.stores: dict[str, dict[str, int]] = {r: {} for r in ROLES}
        self.contact_ids_in: dict[str, set[str]] = {r: set() for r in ROLES}
        self.offers_in: dict[str, set[str]] = {r: set() for r in ROLES}
        self.acks_in: dict[str, dict[str, set[str]]] = {r: {} for r in ROLES}
        self.ended: dict[str, tuple[Any, ...] | None] = {r: None for r in ROLES}
        self.after_end = 0

    # -- plumbing --

    def _step(self, role: str, call: str, *args: Any) -> None:
        machine = self.m[role]
        was_terminal = machine.state in TERMINAL
        getattr(machine, call)(*args)  # anything raised here fails the test
        self.steps += 1
        frames, events = machine.data_to_send(), machine.events()
        if was_terminal and (frames or events):
            self.after_end += 1
        for frame in frames:
            self.sent[role].append(frame)
            self.link[other_role(role)].append((frame, "peer"))
        self.events[role].extend(events)

    def _receive(self, role: str, frame: str | bytes, origin: str) -> None:
        try:
            message = decode_peer_message(frame)
        except Exception:  # noqa: BLE001 - the machine judges it; here only bookkeeping
            message = None
        if isinstance(message, PeerHello):
            self.contact_ids_in[role].add(message.contact_id)
        elif isinstance(message, TokenOffer):
            self.offers_in[role].add(message.token)
        elif isinstance(message, TokenAck):
            self.acks_in[role].setdefault(message.token, set()).add(origin)
        self._step(role, "receive_data", frame, self.now)

    def _illegal(self, role: str, call: str, *args: Any) -> None:
        machine = self.m[role]
        before = handshake_snapshot(machine)
        with pytest.raises(LocalProtocolError):
            getattr(machine, call)(*args)
        assert handshake_snapshot(machine) == before
        self.steps += 1

    def _pair_tokens(self, role: str) -> list[str]:
        own, peer, evil = self.ids[role], self.ids[other_role(role)], self.mallory
        return [craft_token(own, peer), craft_token(own, evil), craft_token(peer, evil),
                self_token(own), self_token(peer)]

    # -- the adapters --

    @rule(role=st.sampled_from(ROLES))
    def open(self, role: str) -> None:
        if self.m[role].state is S.IDLE:
            self._step(role, "channel_open", self.now)
        else:
            self._illegal(role, "channel_open", self.now)

    @rule(role=st.sampled_from(ROLES), new=st.booleans(), fail=st.booleans())
    def store(self, role: str, new: bool, fail: bool) -> None:
        if self.m[role].state is not S.STORING:
            self._illegal(role, "store_failed" if fail else "token_stored",
                          *(("disk full",) if fail else (new,)))
            return
        if fail:
            self._step(role, "store_failed", "OSError (Read-only file system)", self.now)
            return
        token = [e for e in self.events[role] if isinstance(e, StoreToken)][-1].token
        self.stores[role][token] = self.stores[role].get(token, 0) + 1
        self._step(role, "token_stored", new, self.now)

    @rule(steps=st.integers(1, 10), fail_store=st.booleans())
    def honest_progress(self, steps: int, fail_store: bool) -> None:
        for _ in range(steps):
            storing = [r for r in ROLES if self.m[r].state is S.STORING]
            queued = [r for r in ROLES if self.link[r]]
            idle = [r for r in ROLES if self.m[r].state is S.IDLE]
            if storing:
                self.store(storing[0], True, fail_store)
            elif queued:
                frame, origin = self.link[queued[0]].popleft()
                self._receive(queued[0], frame, origin)
            elif idle:
                self._step(idle[0], "channel_open", self.now)
            else:
                return

    # -- Mallory's link --

    @precondition(lambda self: any(self.link.values()))
    @rule(role=st.sampled_from(ROLES), index=st.integers(0, 10))
    def deliver_any(self, role: str, index: int) -> None:
        queue = self.link[role]
        if queue:
            index %= len(queue)
            frame, origin = queue[index]
            del queue[index]
            self._receive(role, frame, origin)

    @precondition(lambda self: any(self.link.values()))
    @rule(role=st.sampled_from(ROLES), index=st.integers(0, 10), where=st.integers(0, 10),
          drop=st.booleans())
    def duplicate_or_drop(self, role: str, index: int, where: int, drop: bool) -> None:
        queue = self.link[role]
        if queue:
            index %= len(queue)
            if drop:
                del queue[index]
            else:
                queue.insert(where % (len(queue) + 1), (queue[index][0], "replay"))

    @precondition(lambda self: any(self.sent.values()))
    @rule(to=st.sampled_from(ROLES), source=st.sampled_from(ROLES), index=st.integers(0, 10))
    def replay(self, to: str, source: str, index: int) -> None:
        """Any frame a side ever sent, to either side (to itself: a reflection)."""
        frames = self.sent[source] or self.sent[other_role(source)]
        self._receive(to, frames[index % len(frames)], "replay")

    @rule(role=st.sampled_from(ROLES), right=st.booleans(), pick=st.integers(0, 4))
    def impersonate(self, role: str, right: bool, pick: int) -> None:
        """Mallory plays the peer, with what she saw on the wire: her own contact ID first,
        then the token the side expects (``right``) or one for another pair."""
        machine = self.m[role]
        wrong = self._pair_tokens(role)[pick]
        if machine.state in (S.IDLE, S.AWAIT_HELLO):
            message: Any = hello(self.mallory)
        elif machine.state is S.CONTACT and role == "responder":
            peer = machine._peer_contact_id
            assert peer is not None
            message = TokenOffer(token=craft_token(self.ids[role], peer) if right else wrong)
        elif machine.state is S.AWAIT_ACK:
            assert machine.token is not None
            message = TokenAck(token=machine.token if right else wrong)
        else:
            message = TokenAck(token=wrong)
        self._receive(role, encode(message), "forged")

    # Everything that ends an exchange at once shares one rule, so it does not drown the
    # rules that move it forward.
    @rule(role=st.sampled_from(ROLES), kind=st.sampled_from(
        ["hello", "token", "garbage", "abort", "close", "position", "timeout",
         "channel_closed", "stop"]),
        which=st.sampled_from(["own", "mallory", "peer", "random"]), random_id=uuid4s,
        offer=st.booleans(), pick=st.integers(0, 5), random_token=hex64, frame=garbage,
        reason=st.text(max_size=30), version=st.sampled_from([DATA_CHANNEL_VERSION, 1, 3]),
        north=st.floats(-1000, 1000))
    def attack(self, role: str, kind: str, which: str, random_id: str, offer: bool, pick: int,
               random_token: str, frame: str | bytes, reason: str, version: int,
               north: float) -> None:
        if kind in ("timeout", "channel_closed", "stop"):
            self._step(role, kind, self.now)  # the adapter's timer, channel gone, app exit
            return
        if kind == "hello":
            contact_id = {"own": self.ids[role], "mallory": self.mallory,
                          "peer": self.ids[other_role(role)], "random": random_id}[which]
            frame = encode(hello(contact_id, version))
        elif kind == "close":
            frame = encode(Close(reason=reason))
        elif kind == "position":
            frame = encode(PeerPosition(latitude=44.0 + north / 111_195.0, longitude=5.0,
                                        accuracy_m=3.0) if pick else Heartbeat())
        elif kind == "token":
            token = [*self._pair_tokens(role), random_token][pick]
            frame = encode(TokenOffer(token=token) if offer else TokenAck(token=token))
        elif kind == "abort":
            frame = encode(Abort(reason=reason))
        self._receive(role, frame, "forged")

    @rule(seconds=st.floats(0.0, 40.0), role=st.sampled_from(ROLES), north=st.floats(0, 50))
    def time_passes(self, seconds: float, role: str, north: float) -> None:
        """The adapter's clock: a fix of this device, then a tick."""
        self.now += seconds
        fix = Fix(44.0 + north / 111_195.0, 5.0, 3.0)
        self._step(role, "local_fix", fix, self.now)
        self._step(role, "tick", self.now)

    # -- invariants --

    @invariant()
    def one_store_one_end_and_consistent_states(self) -> None:
        for role in ROLES:
            events = self.events[role]
            stores = [e for e in events if isinstance(e, StoreToken)]
            outcomes = [e for e in events if isinstance(e, HandshakeCompleted | HandshakeFailed)]
            ended = [e for e in events if isinstance(e, ContactEnded)]
            assert len(stores) <= 1, "StoreToken emitted twice"
            assert len(outcomes) <= 1, "more than one outcome"
            assert len(ended) <= 1, "more than one end"
            machine = self.m[role]
            failed = [e for e in outcomes if isinstance(e, HandshakeFailed)]
            assert (machine.state in TERMINAL) == bool(ended or failed)
            if outcomes and isinstance(outcomes[0], HandshakeCompleted):
                assert machine.state in (S.WITNESSED, S.CLOSED)
                assert stores and stores[0].token == outcomes[0].token == machine.token
                if ended:
                    assert ended[0].token == machine.token
            if failed:
                assert machine.state is S.FAILED
                assert failed[0].reason == machine.failure_reason
            if ended and not (outcomes and isinstance(outcomes[0], HandshakeCompleted)):
                assert ended[0].token is None
            if machine.state is S.STORING:
                assert stores and stores[0].token == machine.token
            assert all(count == 1 for count in self.stores[role].values()), "stored twice"

    @invariant()
    def terminal_states_absorb(self) -> None:
        assert self.after_end == 0, "a finished side produced frames or events"
        for role in ROLES:
            machine = self.m[role]
            if machine.state in TERMINAL:
                now = (machine.state, machine.token, machine.failure_reason,
                       machine.close_reason)
                if self.ended[role] is None:
                    self.ended[role] = now
                assert now == self.ended[role]
                assert machine._peer_contact_id is None

    @invariant()
    def only_tokens_of_the_ids_it_was_given(self) -> None:
        for role in ROLES:
            own, peer = self.ids[role], self.ids[other_role(role)]
            stored = {e.token for e in self.events[role]
                      if isinstance(e, StoreToken | HandshakeCompleted)}
            allowed = {craft_token(own, p) for p in self.contact_ids_in[role] if p != own}
            assert stored <= allowed
            if self.contact_ids_in[role] <= {peer}:
                assert stored <= {craft_token(own, peer)}
            assert set(self.stores[role]) <= stored

    @invariant()
    def stores_only_what_was_offered_or_acked(self) -> None:
        for role in ROLES:
            stored = {e.token for e in self.events[role] if isinstance(e, StoreToken)}
            if role == "responder":
                assert stored <= self.offers_in[role]
            else:
                assert stored <= set(self.acks_in[role])
        initiator_end = [e for e in self.events["initiator"]
                         if isinstance(e, HandshakeCompleted)]
        if initiator_end:
            token = initiator_end[0].token
            if "forged" not in self.acks_in["initiator"].get(token, set()):
                # Every ack it heard for this token was the responder's own (or a copy of it),
                # and the responder acks only what it has stored.
                assert token in self.stores["responder"]

    @invariant()
    def sends_only_valid_frames_about_itself(self) -> None:
        for role in ROLES:
            kinds: list[str] = []
            for frame in self.sent[role]:
                message = decode_peer_message(frame)  # never an invalid frame
                kinds.append(type(message).__name__)
                if isinstance(message, PeerHello):
                    assert message.contact_id == self.ids[role], "sent someone else's ID"
                    assert message.version == DATA_CHANNEL_VERSION
            assert kinds.count("PeerHello") <= 1
            ends = [k for k in kinds if k in ("Abort", "Close")]
            assert len(ends) <= 1 and (not ends or kinds[-1] == ends[0]), "sent after its end"
            own = "TokenOffer" if role == "initiator" else "TokenAck"
            assert kinds.count(own) <= 1
            assert ("TokenAck" if role == "initiator" else "TokenOffer") not in kinds


def test_mallory_link() -> None:
    name = "handshake.mallory_link"
    runs = 0

    class Counted(MalloryLink):
        def teardown(self) -> None:
            nonlocal runs
            runs += 1
            tried(name, self.steps)

    steps = 50
    run_state_machine_as_test(Counted, settings=fuzz_settings(4, stateful_step_count=steps))
    report(name, f"rules applied, in {runs} runs of up to {steps}")


# --- the attacks one by one, by hand --------------------------------------------------------

A = "0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69"
B = "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
C = "c0ffee00-1234-4abc-8def-0123456789ab"


def drain(machine: WitnessHandshake) -> tuple[list[Any], list[Any]]:
    return [decode_peer_message(f) for f in machine.data_to_send()], machine.events()


@pytest.mark.parametrize("role", ROLES)
def test_own_frames_reflected_fail_without_storing(role: str) -> None:
    machine = WitnessHandshake(role, A)  # type: ignore[arg-type]
    machine.channel_open(0.0)
    (own_hello,), _ = drain(machine)
    machine.receive_data(encode(own_hello), 0.0)  # its own contact ID comes back
    sent, events = drain(machine)
    assert HandshakeFailed("same_contact_id") in events
    assert sent == [Abort(reason="same_contact_id")]


@pytest.mark.parametrize("token", [craft_token(B, C), craft_token(A, C), self_token(B),
                                   self_token(A)])
def test_responder_refuses_a_token_for_another_pair(token: str) -> None:
    responder = WitnessHandshake("responder", B)
    responder.channel_open(0.0)
    responder.receive_data(encode(hello(A)), 0.0)
    responder.receive_data(encode(TokenOffer(token=token)), 0.0)
    sent, events = drain(responder)
    assert HandshakeFailed("token_mismatch") in events
    assert sent[-1] == Abort(reason="token_mismatch")
    assert responder.token is None


@pytest.mark.parametrize("token", [craft_token(B, C), craft_token(A, C), self_token(A)])
def test_initiator_refuses_an_ack_for_another_pair(token: str) -> None:
    initiator = WitnessHandshake("initiator", A)
    initiator.channel_open(0.0)
    initiator.receive_data(encode(hello(B)), 0.0)
    initiator.receive_data(encode(TokenAck(token=token)), 0.0)
    _, events = drain(initiator)
    assert HandshakeFailed("ack_mismatch") in events


def test_a_recorded_exchange_replayed_to_a_third_device_stores_nothing() -> None:
    """Mallory records A's frames to B and plays them to C: C crafts no token with A."""
    initiator, responder = WitnessHandshake("initiator", A), WitnessHandshake("responder", B)
    initiator.channel_open(0.0)
    responder.channel_open(0.0)
    to_b = initiator.data_to_send()
    responder.receive_data(to_b[0], 0.0)
    initiator.receive_data(responder.data_to_send()[0], 0.0)
    recorded = to_b + initiator.data_to_send()  # peer_hello(A), token(A, B)
    victim = WitnessHandshake("responder", C)
    victim.channel_open(0.0)
    for frame in recorded:
        victim.receive_data(frame, 0.0)
    _, events = drain(victim)
    assert HandshakeFailed("token_mismatch") in events
    assert not any(isinstance(e, StoreToken) for e in events)


def test_a_version_below_2_is_refused_and_a_higher_one_spoken_as_2() -> None:
    """docs/protocol.md, "Versions": effective version = min(own, peer's), abort below 2."""
    responder = WitnessHandshake("responder", B)
    responder.channel_open(0.0)
    responder.receive_data(encode(hello(A, version=1)), 0.0)
    sent, events = drain(responder)
    assert sent[-1] == Abort(reason="unsupported_version")
    assert HandshakeFailed("unsupported_version") in events
    responder = WitnessHandshake("responder", B)
    responder.channel_open(0.0)
    responder.receive_data(encode(hello(A, version=3)), 0.0)
    sent, events = drain(responder)
    assert not any(isinstance(m, Abort) for m in sent)
    assert responder.version == DATA_CHANNEL_VERSION and responder.state is HandshakeState.CONTACT
