"""Tests for the witness exchange state machine (fanny_tui.protocol.handshake), h11 style.

``ConnectionPair`` joins an initiator and a responder with an in-memory link whose frames the
test delivers, drops, duplicates or replaces at will; stores are plain dicts. Every legal path is
walked by hand, every illegal local call is checked to raise and change nothing, and a Hypothesis
state machine interleaves deliveries, duplicates, drops, garbage, timeouts, closes and stores
while checking the invariants of the exchange.
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

from fanny_tui.protocol.errors import LocalProtocolError
from fanny_tui.protocol.handshake import (
    TERMINAL,
    HandshakeCompleted,
    HandshakeEvent,
    HandshakeFailed,
    HandshakeState,
    StoreToken,
    WitnessHandshake,
)
from fanny_tui.protocol.messages import (
    Abort,
    ContactIdMessage,
    TokenAck,
    TokenOffer,
    decode_peer_message,
    encode,
)
from fanny_tui.protocol.tokens import craft_token

S = HandshakeState
ROLES = ("initiator", "responder")
A = "0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69"
B = "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"

uuid4s = st.uuids(version=4).map(str)


def other(role: str) -> str:
    return "responder" if role == "initiator" else "initiator"


class ConnectionPair:
    """Two machines joined by an in-memory link (after h11's test helper of the same name).

    ``link[role]`` holds the frames travelling towards ``role``; nothing moves until the test
    delivers it. ``events[role]`` accumulates what each machine emitted; ``frames_after_end``
    counts frames a machine produced once it was already in a terminal state (must stay 0).
    """

    def __init__(self, initiator_id: str = A, responder_id: str = B) -> None:
        self.ids = {"initiator": initiator_id, "responder": responder_id}
        self.machines = {"initiator": WitnessHandshake("initiator", initiator_id),
                         "responder": WitnessHandshake("responder", responder_id)}
        self.link: dict[str, deque[str | bytes]] = {r: deque() for r in ROLES}
        self.events: dict[str, list[HandshakeEvent]] = {r: [] for r in ROLES}
        self.stores: dict[str, dict[str, int]] = {r: {} for r in ROLES}
        self.output_after_end = 0

    def __getitem__(self, role: str) -> WitnessHandshake:
        return self.machines[role]

    def step(self, role: str, action: str, *args: Any) -> None:
        """Call ``machine.action(*args)`` and move what it produced onto the link."""
        machine = self.machines[role]
        was_terminal = machine.state in TERMINAL
        getattr(machine, action)(*args)
        self.collect(role, was_terminal)

    def collect(self, role: str, was_terminal: bool = False) -> None:
        machine = self.machines[role]
        frames = machine.data_to_send()
        events = machine.events()
        if was_terminal and (frames or events):
            self.output_after_end += 1
        self.link[other(role)].extend(frames)
        self.events[role].extend(events)

    def open(self, role: str) -> None:
        self.step(role, "channel_open")

    def deliver(self, role: str) -> None:
        """Deliver the oldest frame travelling towards ``role``."""
        self.step(role, "receive_data", self.link[role].popleft())

    def store(self, role: str, new: bool | None = None) -> None:
        """Play the adapter: store the requested token in a dict, report whether it was new."""
        asked = [e for e in self.events[role] if isinstance(e, StoreToken)]
        token = asked[-1].token
        store = self.stores[role]
        was_new = token not in store
        store[token] = store.get(token, 0) + 1
        self.step(role, "token_stored", was_new if new is None else new)

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

    def peek(self, role: str) -> Any:
        return decode_peer_message(self.link[role][0])

    def result(self, role: str) -> HandshakeEvent | None:
        ends = [e for e in self.events[role] if not isinstance(e, StoreToken)]
        assert len(ends) <= 1
        return ends[0] if ends else None


def snapshot(machine: WitnessHandshake) -> tuple[Any, ...]:
    """Everything a call could change, without draining anything."""
    return (machine.state, machine.token, machine.failure_reason, machine._peer_contact_id,
            list(machine._outgoing), list(machine._events))


TOKEN = craft_token(A, B)


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


# --- legal paths -----------------------------------------------------------------------------


def test_happy_path_step_by_step() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    assert pair["initiator"].state is S.AWAIT_PEER_ID
    assert pair.peek("responder") == ContactIdMessage(contact_id=A)
    pair.open("responder")
    assert pair.peek("initiator") == ContactIdMessage(contact_id=B)

    pair.deliver("responder")  # A's ID reaches the responder
    assert pair["responder"].state is S.AWAIT_TOKEN
    pair.deliver("initiator")  # B's ID reaches the initiator: it crafts the token
    assert pair["initiator"].state is S.AWAIT_ACK
    assert pair["initiator"].token == TOKEN
    assert pair.peek("responder") == TokenOffer(token=TOKEN)

    pair.deliver("responder")  # the token: the responder checks it and asks to store it
    assert pair["responder"].state is S.STORING
    assert pair.events["responder"] == [StoreToken(TOKEN)]
    assert not pair.link["initiator"], "no ack before the token is stored"
    pair.store("responder")
    assert pair["responder"].state is S.COMPLETED
    assert pair.peek("initiator") == TokenAck(token=TOKEN)

    pair.deliver("initiator")  # the ack: now the initiator stores
    assert pair["initiator"].state is S.STORING
    pair.store("initiator")
    assert pair.result("initiator") == HandshakeCompleted(TOKEN, True)
    assert pair.result("responder") == HandshakeCompleted(TOKEN, True)
    assert pair.stores["initiator"] == pair.stores["responder"] == {TOKEN: 1}
    assert not pair.link["initiator"] and not pair.link["responder"]
    for role in ROLES:
        assert pair[role]._peer_contact_id is None
        assert pair[role].failure_reason is None


@pytest.mark.parametrize("first", ROLES)
@pytest.mark.parametrize("early_peer_id", [False, True])
def test_either_side_may_open_first_or_hear_the_peer_before_its_own_open(
        first: str, early_peer_id: bool) -> None:
    pair = ConnectionPair()
    pair.open(first)
    if early_peer_id:
        # The peer's contact ID overtakes the late side's own "open" notification.
        late = other(first)
        pair.deliver(late)
        assert pair[late].state is not S.IDLE
        with pytest.raises(LocalProtocolError):
            pair[late].channel_open()
    else:
        pair.open(other(first))
    pair.pump()
    assert pair.result("initiator") == HandshakeCompleted(TOKEN, True)
    assert pair.result("responder") == HandshakeCompleted(TOKEN, True)


@pytest.mark.parametrize(("new_i", "new_r"), [(True, False), (False, True), (False, False)])
def test_already_stored_token_completes_with_new_false(new_i: bool, new_r: bool) -> None:
    pair = ConnectionPair()
    _drive_to(pair, "responder", S.STORING)
    pair.store("responder", new_r)
    pair.deliver("initiator")
    pair.store("initiator", new_i)
    assert pair.result("initiator") == HandshakeCompleted(TOKEN, new_i)
    assert pair.result("responder") == HandshakeCompleted(TOKEN, new_r)


def test_roles_swapped_give_the_same_token() -> None:
    one, two = ConnectionPair(A, B), ConnectionPair(B, A)
    for pair in (one, two):
        pair.open("initiator")
        pair.open("responder")
        pair.pump()
    assert one.result("initiator") == two.result("responder") == HandshakeCompleted(TOKEN, True)


def test_same_contact_id_fails_both_sides() -> None:
    pair = ConnectionPair(A, A)
    pair.open("initiator")
    pair.open("responder")
    pair.pump()
    assert pair.result("initiator") == HandshakeFailed("same_contact_id")
    assert pair.result("responder") == HandshakeFailed("same_contact_id")
    assert pair.stores == {"initiator": {}, "responder": {}}


def test_wrong_token_is_refused_with_an_abort() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    pair.deliver("responder")
    pair.step("responder", "receive_data", encode(TokenOffer(token="e" * 64)))
    assert pair.result("responder") == HandshakeFailed("token_mismatch")
    assert list(pair.link["initiator"])[-1] == encode(Abort(reason="token_mismatch"))
    pair.link["responder"].clear()
    pair.pump()
    assert pair.result("initiator") == HandshakeFailed("peer_aborted: token_mismatch")
    assert pair.stores == {"initiator": {}, "responder": {}}
    assert not any(isinstance(e, StoreToken) for r in ROLES for e in pair.events[r])


def test_wrong_ack_is_refused_and_the_initiator_stores_nothing() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    pair.deliver("responder")
    pair.deliver("initiator")
    pair.step("initiator", "receive_data", encode(TokenAck(token="f" * 64)))
    assert pair.result("initiator") == HandshakeFailed("ack_mismatch")
    assert pair.stores["initiator"] == {}


@pytest.mark.parametrize("failing", ROLES)
def test_store_failure_aborts_the_exchange(failing: str) -> None:
    pair = ConnectionPair()
    _drive_to(pair, failing, S.STORING)
    pair.step(failing, "store_failed", "OSError (No space left on device)")
    assert pair.result(failing) == HandshakeFailed(
        "store_failed: OSError (No space left on device)")
    assert pair.link[other(failing)][-1] == encode(Abort(reason="store_failed"))
    pair.pump()
    if failing == "responder":
        assert pair.result("initiator") == HandshakeFailed("peer_aborted: store_failed")
        assert pair.stores["initiator"] == {}
    else:
        # The responder stored first and keeps its token: a token one side holds is harmless.
        assert pair.result("responder") == HandshakeCompleted(TOKEN, True)
    assert pair.stores[failing] == {}


def _drive_to(pair: ConnectionPair, role: str, state: HandshakeState) -> None:
    """Move ``pair[role]`` into ``state`` along the happy path (not for FAILED)."""
    pair.open("initiator")
    pair.open("responder")
    for _ in range(20):
        if pair[role].state is state:
            return
        if pair[role].state is S.STORING:
            pair.store(role)
        elif pair[other(role)].state is S.STORING:
            pair.store(other(role))
        elif pair.link[role]:
            pair.deliver(role)
        else:
            pair.deliver(other(role))
    raise AssertionError(f"cannot reach {state} as {role}")


REACHABLE = [
    ("initiator", S.IDLE), ("initiator", S.AWAIT_PEER_ID), ("initiator", S.AWAIT_ACK),
    ("initiator", S.STORING), ("initiator", S.COMPLETED),
    ("responder", S.IDLE), ("responder", S.AWAIT_PEER_ID), ("responder", S.AWAIT_TOKEN),
    ("responder", S.STORING), ("responder", S.COMPLETED),
]


def _machine_in(role: str, state: HandshakeState) -> tuple[ConnectionPair, WitnessHandshake]:
    pair = ConnectionPair()
    if state is S.IDLE:
        return pair, pair[role]
    if state is S.AWAIT_PEER_ID:
        pair.open(role)
        return pair, pair[role]
    _drive_to(pair, role, state)
    return pair, pair[role]


@pytest.mark.parametrize(("role", "state"), REACHABLE)
@pytest.mark.parametrize("input_", ["timeout", "channel_closed"])
def test_timeout_and_close_in_every_state(role: str, state: HandshakeState, input_: str) -> None:
    pair, machine = _machine_in(role, state)
    pair.link[other(role)].clear()
    before = snapshot(machine)
    pair.step(role, input_)
    if state is S.COMPLETED:
        assert snapshot(machine) == before
        assert pair.output_after_end == 0
        return
    reason = "timeout" if input_ == "timeout" else "channel_closed"
    assert machine.state is S.FAILED
    assert pair.result(role) == HandshakeFailed(reason)
    assert machine.failure_reason == reason
    # A timeout tells a peer that may still listen; a closed channel cannot carry anything.
    expected = [encode(Abort(reason="timeout"))] if input_ == "timeout" else []
    assert list(pair.link[other(role)]) == expected
    assert machine._peer_contact_id is None


@pytest.mark.parametrize(("role", "state"), REACHABLE)
@pytest.mark.parametrize("garbage", [b"\xff\xfe", "{", '{"type":"hello"}', '{"type":"token"}',
                                     '{"type":"ack","token":"x"}', "[]", ""])
def test_bad_message_in_every_state(role: str, state: HandshakeState, garbage: Any) -> None:
    pair, machine = _machine_in(role, state)
    pair.link[other(role)].clear()
    before = snapshot(machine)
    pair.step(role, "receive_data", garbage)
    if state is S.COMPLETED:
        assert snapshot(machine) == before
        return
    assert pair.result(role) == HandshakeFailed("bad_message")
    sent = [decode_peer_message(f) for f in pair.link[other(role)]]
    assert len(sent) == 1 and isinstance(sent[0], Abort)
    assert sent[0].reason.startswith("bad_message: ")
    assert machine._peer_contact_id is None


@pytest.mark.parametrize(("role", "state"), REACHABLE)
def test_peer_abort_in_every_state(role: str, state: HandshakeState) -> None:
    pair, machine = _machine_in(role, state)
    pair.link[other(role)].clear()
    pair.step(role, "receive_data", encode(Abort(reason="changed my mind")))
    if state is S.COMPLETED:
        assert pair.result(role) == HandshakeCompleted(TOKEN, True)
        return
    assert pair.result(role) == HandshakeFailed("peer_aborted: changed my mind")
    assert not pair.link[other(role)], "an abort is not answered with an abort"


@pytest.mark.parametrize(("role", "state", "message"), [
    ("responder", S.IDLE, TokenOffer(token=TOKEN)),
    ("responder", S.AWAIT_PEER_ID, TokenAck(token=TOKEN)),
    ("responder", S.AWAIT_TOKEN, ContactIdMessage(contact_id=A)),
    ("responder", S.AWAIT_TOKEN, TokenAck(token=TOKEN)),
    ("responder", S.STORING, TokenOffer(token=TOKEN)),
    ("initiator", S.IDLE, TokenAck(token=TOKEN)),
    ("initiator", S.AWAIT_PEER_ID, TokenOffer(token=TOKEN)),
    ("initiator", S.AWAIT_ACK, ContactIdMessage(contact_id=B)),
    ("initiator", S.AWAIT_ACK, TokenOffer(token=TOKEN)),
    ("initiator", S.STORING, TokenAck(token=TOKEN)),
])
def test_unexpected_message_fails_with_an_abort(role: str, state: HandshakeState,
                                                message: Any) -> None:
    pair, machine = _machine_in(role, state)
    pair.link[other(role)].clear()
    pair.step(role, "receive_data", encode(message))
    assert pair.result(role) == HandshakeFailed("unexpected_message")
    sent = [decode_peer_message(f) for f in pair.link[other(role)]]
    assert len(sent) == 1 and isinstance(sent[0], Abort)
    assert sent[0].reason.startswith("unexpected ")
    assert machine._peer_contact_id is None


# --- illegal local calls ---------------------------------------------------------------------


def _failed_machine(role: str) -> tuple[ConnectionPair, WitnessHandshake]:
    pair = ConnectionPair()
    pair.open(role)
    pair.step(role, "timeout")
    return pair, pair[role]


ILLEGAL_CALLS: list[tuple[str, tuple[Any, ...], set[HandshakeState]]] = [
    ("channel_open", (), {S.IDLE}),
    ("token_stored", (True,), {S.STORING}),
    ("token_stored", (False,), {S.STORING}),
    ("store_failed", ("disk full",), {S.STORING}),
]


ILLEGAL_CASES = [
    (role, state, call, args)
    for role, state in [*REACHABLE, ("initiator", S.FAILED), ("responder", S.FAILED)]
    for call, args, legal_in in ILLEGAL_CALLS
    if state not in legal_in
]


def test_illegal_cases_cover_every_state_and_call() -> None:
    assert {state for _, state, _, _ in ILLEGAL_CASES} == set(HandshakeState)
    # 12 (role, state) pairs x 4 calls, minus the legal ones: open in IDLE and the three
    # store reports in STORING, for each role.
    assert len(ILLEGAL_CASES) == 12 * 4 - 2 * (1 + 3)


@pytest.mark.parametrize(("role", "state", "call", "args"), ILLEGAL_CASES)
def test_illegal_local_call_raises_and_changes_nothing(
        role: str, state: HandshakeState, call: str, args: tuple[Any, ...]) -> None:
    _, machine = _failed_machine(role) if state is S.FAILED else _machine_in(role, state)
    assert machine.state is state
    before = snapshot(machine)
    with pytest.raises(LocalProtocolError, match=state.value):
        getattr(machine, call)(*args)
    assert snapshot(machine) == before


def test_after_the_end_inputs_change_nothing() -> None:
    pair = ConnectionPair()
    pair.open("initiator")
    pair.open("responder")
    pair.pump()
    for role in ROLES:
        machine = pair[role]
        before = snapshot(machine)
        for frame in (encode(ContactIdMessage(contact_id=A)), encode(TokenAck(token=TOKEN)),
                      encode(Abort(reason="x")), b"\x00garbage"):
            pair.step(role, "receive_data", frame)
        pair.step(role, "timeout")
        pair.step(role, "channel_closed")
        assert snapshot(machine) == before
    assert pair.output_after_end == 0


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


# --- stateful fuzzing: deliveries, duplicates, drops, garbage, timeouts, closes ---------------


forged_frames = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    uuid4s.map(lambda u: encode(ContactIdMessage(contact_id=u))),
    st.text("0123456789abcdef", min_size=64, max_size=64).flatmap(
        lambda t: st.sampled_from([encode(TokenOffer(token=t)), encode(TokenAck(token=t))])),
    st.text(max_size=20).map(lambda r: encode(Abort(reason=r))),
)


class WitnessExchangeFuzz(RuleBasedStateMachine):
    """Two machines, a hostile link and an adapter that may fail: invariants always hold."""

    pair: ConnectionPair

    @initialize(ids=st.one_of(st.lists(uuid4s, min_size=2, max_size=2, unique=True),
                              uuid4s.map(lambda u: [u, u])))
    def start(self, ids: list[str]) -> None:
        self.pair = ConnectionPair(*ids)
        self.ended: dict[str, tuple[Any, ...] | None] = {r: None for r in ROLES}

    def _guarded(self, role: str, call: str, *args: Any, legal: bool) -> None:
        machine = self.pair[role]
        if legal:
            self.pair.step(role, call, *args)
            return
        before = snapshot(machine)
        with pytest.raises(LocalProtocolError):
            getattr(machine, call)(*args)
        assert snapshot(machine) == before

    @rule(role=st.sampled_from(ROLES))
    def open(self, role: str) -> None:
        self._guarded(role, "channel_open", legal=self.pair[role].state is S.IDLE)

    @precondition(lambda self: any(self.pair.link.values()))
    @rule(role=st.sampled_from(ROLES))
    def deliver(self, role: str) -> None:
        if self.pair.link[role]:
            self.pair.deliver(role)

    @precondition(lambda self: any(self.pair.link.values()))
    @rule(role=st.sampled_from(ROLES))
    def duplicate(self, role: str) -> None:
        if self.pair.link[role]:
            self.pair.link[role].appendleft(self.pair.link[role][0])

    @precondition(lambda self: any(self.pair.link.values()))
    @rule(role=st.sampled_from(ROLES))
    def drop(self, role: str) -> None:
        if self.pair.link[role]:
            self.pair.link[role].popleft()

    @precondition(lambda self: any(len(q) > 1 for q in self.pair.link.values()))
    @rule(role=st.sampled_from(ROLES))
    def swap(self, role: str) -> None:
        queue = self.pair.link[role]
        if len(queue) > 1:
            queue[0], queue[1] = queue[1], queue[0]

    @rule(steps=st.integers(1, 12))
    def honest_progress(self, steps: int) -> None:
        """An honest link and adapter for a while: open, deliver in order, store."""
        for _ in range(steps):
            idle = [r for r in ROLES if self.pair[r].state is S.IDLE]
            storing = [r for r in ROLES if self.pair[r].state is S.STORING]
            if storing:
                self.pair.store(storing[0])
            elif any(self.pair.link.values()):
                self.pair.deliver("initiator" if self.pair.link["initiator"] else "responder")
            elif idle:
                self.pair.open(idle[0])
            else:
                return

    @rule(role=st.sampled_from(ROLES), data=st.data())
    def forge(self, role: str, data: st.DataObject) -> None:
        """A well-formed message with a forged value, of the type the machine waits for."""
        token = data.draw(st.text("0123456789abcdef", min_size=64, max_size=64))
        message = {
            S.IDLE: ContactIdMessage(contact_id=data.draw(uuid4s)),
            S.AWAIT_PEER_ID: ContactIdMessage(contact_id=data.draw(uuid4s)),
            S.AWAIT_TOKEN: TokenOffer(token=token),
            S.AWAIT_ACK: TokenAck(token=token),
        }.get(self.pair[role].state, TokenAck(token=token))
        self.pair.step(role, "receive_data", encode(message))

    # Hostile inputs share one rule so that they do not drown the honest ones.
    @rule(role=st.sampled_from(ROLES), kind=st.sampled_from(["garbage", "timeout", "close"]),
          frame=forged_frames)
    def hostile(self, role: str, kind: str, frame: str | bytes) -> None:
        if kind == "garbage":
            self.pair.step(role, "receive_data", frame)
        elif kind == "timeout":
            self.pair.step(role, "timeout")
        else:
            self.pair.step(role, "channel_closed")

    @rule(role=st.sampled_from(ROLES), new=st.booleans())
    def store_ok(self, role: str, new: bool) -> None:
        storing = self.pair[role].state is S.STORING
        if storing:
            self.pair.store(role, new)
        else:
            self._guarded(role, "token_stored", new, legal=False)

    @rule(role=st.sampled_from(ROLES))
    def store_fails(self, role: str) -> None:
        self._guarded(role, "store_failed", "disk full",
                      legal=self.pair[role].state is S.STORING)

    # -- invariants --

    @invariant()
    def at_most_one_store_and_one_end(self) -> None:
        for role in ROLES:
            events = self.pair.events[role]
            stores = [e for e in events if isinstance(e, StoreToken)]
            ends = [e for e in events if not isinstance(e, StoreToken)]
            assert len(stores) <= 1, "StoreToken emitted twice"
            assert len(ends) <= 1, "more than one end"
            state = self.pair[role].state
            assert (state in TERMINAL) == bool(ends)
            if ends and isinstance(ends[0], HandshakeCompleted):
                assert state is S.COMPLETED, "a failed side never completes"
                assert stores and stores[0].token == ends[0].token
            if ends and isinstance(ends[0], HandshakeFailed):
                assert state is S.FAILED
                assert ends[0].reason == self.pair[role].failure_reason

    @invariant()
    def nothing_changes_after_the_end(self) -> None:
        assert self.pair.output_after_end == 0
        for role in ROLES:
            machine = self.pair[role]
            if machine.state in TERMINAL:
                now = (machine.state, machine.token, machine.failure_reason)
                if self.ended[role] is None:
                    self.ended[role] = now
                assert now == self.ended[role]

    @invariant()
    def peer_contact_id_forgotten_at_the_end(self) -> None:
        for role in ROLES:
            machine = self.pair[role]
            if machine.state in TERMINAL:
                assert machine._peer_contact_id is None
                peer_id = self.pair.ids[other(role)]
                if peer_id != self.pair.ids[role]:
                    assert peer_id not in repr(vars(machine))

    @invariant()
    def completions_agree(self) -> None:
        ends = {r: self.pair.result(r) for r in ROLES}
        done = {r for r, e in ends.items() if isinstance(e, HandshakeCompleted)}
        ids = self.pair.ids
        if done == set(ROLES):
            assert ids["initiator"] != ids["responder"]
            token = craft_token(ids["initiator"], ids["responder"])
            assert ends["initiator"].token == ends["responder"].token == token  # type: ignore[union-attr]
        if "initiator" in done:
            # The initiator stores only on the responder's ack, sent only once it had stored.
            assert "responder" in done
        for role in done:
            assert self.pair.stores[role] == {self.pair[role].token: 1}

    @invariant()
    def only_the_true_token_is_ever_stored(self) -> None:
        ids = self.pair.ids
        if ids["initiator"] == ids["responder"]:
            assert not any(self.pair.stores.values())
            return
        token = craft_token(ids["initiator"], ids["responder"])
        for role in ROLES:
            for event in self.pair.events[role]:
                if isinstance(event, StoreToken | HandshakeCompleted):
                    assert event.token == token
            assert set(self.pair.stores[role]) <= {token}


WitnessExchangeFuzz.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestWitnessExchangeFuzz = WitnessExchangeFuzz.TestCase
