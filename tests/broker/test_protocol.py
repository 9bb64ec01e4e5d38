"""Tests for the broker's sans-I/O connection core (broker.protocol): no sockets, no loop.

h11 style, like tests/test_handshake.py: ``Harness`` plays the adapter -- it feeds frames at a
clock the test moves and answers the store calls itself (or from the real, pure
:class:`~broker.state.BrokerState`). Every refusal, limit and deadline is checked here; the
socket tests (test_server.py, test_abuse.py...) keep checking the adapter's own part (queues,
closes, the recorder, the stores). A Hypothesis test feeds random input sequences and checks
that nothing but LocalProtocolError is ever raised, that an illegal input changes nothing, and
the invariants of the kinds.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import Refusal
from broker.protocol import (
    CLOSE_POLICY,
    CLOSE_REPLACED,
    CLOSE_TRY_AGAIN,
    INTERNAL_ERROR,
    Action,
    Admission,
    Announce,
    Attach,
    BrokerConnection,
    CheckDecoy,
    Close,
    Connect,
    ConnectionKind,
    ConnectionLimits,
    Disconnect,
    DropPosition,
    Op,
    Post,
    ReadBoard,
    Record,
    RelaySignal,
    Send,
    StoreUpload,
    StreamBoard,
    TokenBucket,
    UpdatePosition,
)
from broker.server import BrokerSettings
from broker.state import BrokerState, MatchNotice
from fanny_tui.protocol.batch import BATCH_FORMAT
from fanny_tui.protocol.codes import code_hash, format_code
from fanny_tui.protocol.errors import LocalProtocolError
from fanny_tui.protocol.messages import (
    ACK_SIZE_BYTES,
    PROTOCOL_VERSION,
    Error,
    Hello,
    Match,
    Position,
    PositionLost,
    PositiveAck,
    Positives,
    PositivesPoll,
    PositiveUpload,
    Signal,
    Welcome,
    decode_broker_message,
    encode,
)

from .kit import LAT, LON, new_id, north, positive

K = ConnectionKind
A = "0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69"
B = "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
T0 = 1000.0
LIMITS = ConnectionLimits(first_message_timeout_s=30.0, upload_answer_delay_s=1.0,
                          position_rate_per_s=10.0, position_burst=3, poll_rate_per_s=0.5,
                          poll_burst=2, signal_rate_per_s=1.0, signal_burst=2, poll_limit=100,
                          position_timeout_s=60.0, open_declarations=False,
                          announce_positives=True)
SDP = "v=0\r\n"

DOCUMENTED_CODES = {
    "bad_message", "unknown_type", "unknown_field", "too_many_tokens", "hello_required",
    "already_hello", "unsupported_protocol", "wrong_connection", "rate_limited", "not_matched",
    "peer_unavailable", "code_required", "code_invalid", "code_expired", "code_used",
    "expiry_out_of_window", "duplicate_token", "upload_conflict", "too_many_connections",
    "unavailable", "internal_error",
}
"""The refusal codes of broker/server.py's docstring (and docs/protocol.md)."""


def upload(code: str | None = None, decoy: bool = False, n: int = 1) -> PositiveUpload:
    return PositiveUpload(upload_id=str(uuid.uuid4()), tokens=[positive(i) for i in range(n)],
                          code=code, decoy=decoy)


def position(metres: float = 0.0) -> Position:
    return Position(latitude=north(metres), longitude=LON, accuracy_m=4.0)


def sent(actions: list[Action]) -> list[Any]:
    """The messages of the ``Send`` actions, decoded."""
    return [decode_broker_message(a.frame) for a in actions if isinstance(a, Send)]


class Harness:
    """One connection core, a clock the test moves, and the adapter's part played by hand."""

    def __init__(self, limits: ConnectionLimits = LIMITS, *, record: bool = False) -> None:
        self.now = T0
        self.conn = BrokerConnection(limits, self.now, record=record)

    def feed(self, message: Any) -> list[Action]:
        """Feed a message struct, a dict (as JSON), or a raw text/binary frame."""
        if isinstance(message, msgspec.Struct):
            frame: str | bytes = encode(message)
        elif isinstance(message, dict):
            frame = msgspec.json.encode(message).decode()
        else:
            frame = message
        self.conn.receive_frame(frame, self.now)
        return self.conn.actions()

    def refusal(self, message: Any) -> Error:
        """Feed ``message``; it must be answered by exactly one ``error`` and nothing else."""
        actions = self.feed(message)
        assert len(actions) == 1 and isinstance(actions[0], Send), actions
        error = decode_broker_message(actions[0].frame)
        assert isinstance(error, Error) and actions[0].error == error.code
        assert error.code in DOCUMENTED_CODES
        return error

    def session(self, session_id: str = A, epoch: int = 7) -> None:
        assert self.feed(Hello(session_id=session_id, radius_m=30.0)) == [
            Connect(session_id, 30.0, self.now)]
        self.conn.connected(epoch, 30.0)
        self.conn.actions()

    def anonymous(self) -> None:
        assert self.feed(PositivesPoll()) == [ReadBoard(0, LIMITS.poll_limit)]
        self.conn.board_read([], 0, False)
        self.conn.actions()

    def snapshot(self) -> dict[str, Any]:
        return _snapshot(self.conn)


def _snapshot(conn: BrokerConnection) -> dict[str, Any]:
    state = copy.copy(vars(conn))
    state["_actions"] = list(conn._actions)
    for name in ("_positions", "_polls", "_signals"):
        bucket = state.pop(name)
        state[name] = (bucket.level, bucket.at)
    return state


# --- kinds: the first accepted message decides ----------------------------------------------


def test_hello_makes_a_session_connection_once_the_store_registered_it():
    h = Harness()
    assert h.conn.kind is K.NEW and h.conn.deadline == T0 + 30.0
    assert h.feed(Hello(session_id=A, radius_m=250.0)) == [Connect(A, 250.0, T0)]
    assert h.conn.kind is K.GREETING and h.conn.awaiting is Op.CONNECT
    h.conn.connected(3, 100.0)
    actions = h.conn.actions()
    assert actions[0] == Attach(A)
    assert sent(actions) == [Welcome(radius_m=100.0, position_timeout_s=60.0)]
    assert h.conn.kind is K.SESSION and h.conn.session_id == A and h.conn.epoch == 3
    assert h.conn.deadline is None and h.conn.awaiting is None


def test_a_hello_of_another_protocol_is_refused_and_the_connection_stays_new():
    h = Harness()
    error = h.refusal(Hello(session_id=A, radius_m=30.0, protocol=PROTOCOL_VERSION + 1))
    assert (error.code, error.field) == ("unsupported_protocol", "protocol")
    assert h.conn.kind is K.NEW and h.conn.deadline == T0 + 30.0


@pytest.mark.parametrize("message", [position(), PositionLost(),
                                     Signal(peer_session_id=B, sdp_type="offer", sdp=SDP)])
def test_session_messages_before_hello_are_refused(message):
    h = Harness()
    error = h.refusal(message)
    assert (error.code, error.field) == ("hello_required", "type")
    assert h.conn.kind is K.NEW


def test_a_poll_makes_an_anonymous_connection():
    h = Harness()
    assert h.feed(PositivesPoll(cursor=5)) == [ReadBoard(5, 100)]
    assert h.conn.kind is K.ANONYMOUS and h.conn.deadline is None
    token = positive(1)
    h.conn.board_read([token], 9, True)
    assert sent(h.conn.actions()) == [Positives(cursor=9, tokens=[token], more=True)]


def test_a_batch_poll_streams_the_board():
    h = Harness()
    assert h.feed(PositivesPoll(cursor=5, accept=[BATCH_FORMAT])) == [StreamBoard(5)]
    assert h.conn.awaiting is Op.STREAM
    h.conn.board_streamed()
    assert h.conn.actions() == [] and h.conn.awaiting is None


def test_an_upload_makes_an_anonymous_connection():
    h = Harness()
    first = upload()
    assert h.feed(first) == [StoreUpload(first, None, code_required=True)]
    assert h.conn.kind is K.ANONYMOUS


@pytest.mark.parametrize("message", [Hello(session_id=A, radius_m=30.0), position(),
                                     PositionLost(),
                                     Signal(peer_session_id=B, sdp_type="offer", sdp=SDP)])
def test_session_messages_are_refused_on_an_anonymous_connection(message):
    h = Harness()
    h.anonymous()
    error = h.refusal(message)
    assert (error.code, error.field) == ("wrong_connection", "type")
    assert h.conn.kind is K.ANONYMOUS and h.conn.session_id is None


def test_a_second_hello_is_refused():
    h = Harness()
    h.session()
    error = h.refusal(Hello(session_id=B, radius_m=1.0))
    assert (error.code, error.field) == ("already_hello", "type")
    assert h.conn.session_id == A


def test_polls_are_refused_on_a_session_connection():
    h = Harness()
    h.session()
    error = h.refusal(PositivesPoll())
    assert (error.code, error.field) == ("wrong_connection", "type")


def test_an_upload_on_a_session_connection_is_refused_late_and_at_the_acks_size():
    h = Harness()
    h.session()
    [answer] = h.feed(upload())
    assert isinstance(answer, Send) and answer.error == "wrong_connection"
    assert answer.not_before == T0 + 1.0
    assert len(answer.frame.encode()) == ACK_SIZE_BYTES


# --- frames that do not decode --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["new", "session", "anonymous"])
def test_a_binary_frame_is_refused_on_every_kind(kind):
    h = Harness()
    if kind == "session":
        h.session()
    elif kind == "anonymous":
        h.anonymous()
    before = h.conn.kind
    assert h.refusal(b'{"type": "hello"}').code == "bad_message"
    assert h.conn.kind is before


@pytest.mark.parametrize(("frame", "code", "field"), [
    ("not json", "bad_message", None),
    ('{"type": "teleport"}', "unknown_type", "type"),
    ('{"type": "position_lost", "extra": 1}', "unknown_field", "extra"),
    ('{"type": "position", "latitude": 91, "longitude": 0}', "bad_message", "latitude"),
])
def test_undecodable_frames_are_refused_with_their_code_and_field(frame, code, field):
    h = Harness()
    error = h.refusal(frame)
    assert (error.code, error.field) == (code, field)
    assert h.conn.kind is K.NEW


def test_more_than_500_tokens_is_too_many_tokens_answered_late_and_padded():
    h = Harness()
    [answer] = h.feed(upload(n=501))
    assert isinstance(answer, Send) and answer.error == "too_many_tokens"
    assert answer.not_before == T0 + 1.0 and len(answer.frame.encode()) == ACK_SIZE_BYTES
    error = decode_broker_message(answer.frame)
    assert isinstance(error, Error) and error.field == "tokens"
    assert h.conn.kind is K.NEW   # a refused first message decides nothing


def test_a_malformed_upload_is_answered_late_and_at_the_acks_size():
    h = Harness()
    [answer] = h.feed({"type": "positive_upload", "upload_id": "x", "tokens": []})
    assert answer.not_before == T0 + 1.0 and len(answer.frame.encode()) == ACK_SIZE_BYTES
    assert answer.error == "bad_message"


# --- limits ---------------------------------------------------------------------------------


def test_positions_are_rate_limited_by_a_token_bucket():
    h = Harness()
    h.session()
    for _ in range(LIMITS.position_burst):
        [action] = h.feed(position())
        assert isinstance(action, UpdatePosition) and action.now == T0
        h.conn.matched([])
        assert h.conn.actions() == []
    error = h.refusal(position())
    assert error.code == "rate_limited" and error.field is None
    h.now += 1 / LIMITS.position_rate_per_s     # one token back
    assert isinstance(h.feed(position())[0], UpdatePosition)
    h.conn.matched([])
    assert h.refusal(position()).code == "rate_limited"


def test_polls_are_rate_limited_and_a_refused_poll_still_makes_the_connection_anonymous():
    h = Harness(replace(LIMITS, poll_burst=1))
    h.anonymous()
    assert h.refusal(PositivesPoll()).code == "rate_limited"
    h.now += 1 / LIMITS.poll_rate_per_s
    assert h.feed(PositivesPoll()) == [ReadBoard(0, 100)]

    fresh = Harness(replace(LIMITS, poll_burst=1))
    fresh.now += 0.1          # not yet a token back after the first poll of another kind
    fresh.conn._polls.take(fresh.now)
    assert fresh.refusal(PositivesPoll()).code == "rate_limited"
    assert fresh.conn.kind is K.ANONYMOUS


def test_signals_are_rate_limited_and_relayed_as_from_the_sender():
    h = Harness()
    h.session(A)
    signal = Signal(peer_session_id=B, sdp_type="offer", sdp=SDP)
    for _ in range(LIMITS.signal_burst):
        [action] = h.feed(signal)
        assert isinstance(action, RelaySignal) and (action.source, action.destination) == (A, B)
        assert decode_broker_message(action.frame) == Signal(peer_session_id=A,
                                                             sdp_type="offer", sdp=SDP)
        h.conn.relayed()
        assert h.conn.actions() == []
    assert h.refusal(signal).code == "rate_limited"


def test_token_bucket_refills_at_its_rate_up_to_its_burst_and_never_from_the_past():
    bucket = TokenBucket(2.0, 2, now=0.0)
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.0)
    assert bucket.take(0.5) and not bucket.take(0.5)
    assert bucket.take(100.0) and bucket.take(100.0) and not bucket.take(100.0)
    assert not bucket.take(50.0) and not bucket.take(100.0)   # going back refills nothing


def test_admission_counts_the_global_cap_and_each_address():
    admission = Admission(max_connections=3, max_per_address=2)
    assert admission.admit("a") is None and admission.admit("a") is None
    assert "this address" in (admission.admit("a") or "")
    assert admission.admit("b") is None
    assert "full" in (admission.admit("c") or "")
    assert admission.admitted == 3 and admission.addresses == 2
    admission.release("a")
    assert admission.admit("c") is None
    for address in ("a", "b", "c"):
        admission.release(address)
    assert admission.admitted == 0 and admission.addresses == 0
    with pytest.raises(LocalProtocolError):
        admission.release("a")


def test_admission_with_no_caps_keeps_no_address():
    admission = Admission(0, 0)
    for _ in range(1000):
        assert admission.admit("a") is None
    assert admission.admitted == 1000 and admission.addresses == 0


def test_a_connection_over_a_cap_is_refused_and_closed():
    h = Harness()
    h.conn.refuse_connection("the broker is full: retry later")
    actions = h.conn.actions()
    [error] = sent(actions)
    assert error.code == "too_many_connections"
    assert actions[-1] == Close(CLOSE_POLICY, "too many connections", flush=True)
    assert h.conn.kind is K.CLOSED
    with pytest.raises(LocalProtocolError):
        h.conn.refuse_connection("again")


# --- the first-message deadline -------------------------------------------------------------


def test_a_connection_without_a_valid_first_message_is_closed_at_its_deadline():
    h = Harness()
    h.refusal(position())      # refused: the deadline still runs
    h.conn.tick(T0 + 29.9)
    assert h.conn.actions() == [] and h.conn.kind is K.NEW
    h.conn.tick(T0 + 30.0)
    assert h.conn.actions() == [Close(CLOSE_POLICY, "no valid first message", flush=True)]
    assert h.conn.kind is K.CLOSED and h.conn.deadline is None
    assert h.feed(Hello(session_id=A, radius_m=30.0)) == []   # frames after the end: ignored


@pytest.mark.parametrize("kind", ["session", "anonymous"])
def test_no_deadline_once_the_kind_is_decided(kind):
    h = Harness()
    h.session() if kind == "session" else h.anonymous()
    assert h.conn.deadline is None
    h.conn.tick(T0 + 1e9)
    assert h.conn.actions() == [] and h.conn.kind is not K.CLOSED


# --- uploads --------------------------------------------------------------------------------


def test_an_upload_is_acked_with_its_count_after_the_delay_and_announced():
    h = Harness()
    first = upload(n=3)
    h.feed(first)
    h.now += 0.2
    h.conn.upload_done(3)
    [answer, announce] = h.conn.actions()
    assert isinstance(answer, Send) and answer.not_before == T0 + 1.0
    assert len(answer.frame.encode()) == ACK_SIZE_BYTES
    ack = decode_broker_message(answer.frame)
    assert isinstance(ack, PositiveAck) and (ack.upload_id, ack.count) == (first.upload_id, 3)
    assert announce == Announce()


def test_an_upload_of_known_tokens_is_acked_but_not_announced():
    h = Harness()
    h.feed(upload())
    h.conn.upload_done(0)
    assert [type(a) for a in h.conn.actions()] == [Send]


def test_no_announcement_when_announcements_are_off():
    h = Harness(replace(LIMITS, announce_positives=False))
    h.feed(upload())
    h.conn.upload_done(1)
    assert [type(a) for a in h.conn.actions()] == [Send]


def test_the_declaration_code_is_hashed_and_required_unless_declarations_are_open():
    code = format_code(bytes(10))
    h = Harness()
    first = upload(code=code)
    assert h.feed(first) == [StoreUpload(first, code_hash(code), code_required=True)]
    h.conn.upload_done(1)
    h.conn.actions()
    second = upload()
    assert h.feed(second) == [StoreUpload(second, None, code_required=True)]
    opened = Harness(replace(LIMITS, open_declarations=True))
    third = upload()
    assert opened.feed(third) == [StoreUpload(third, None, code_required=False)]


def test_a_malformed_code_is_refused_code_invalid_without_a_store_call():
    h = Harness()
    [answer] = h.feed(upload(code="not a code"))
    assert isinstance(answer, Send) and answer.error == "code_invalid"
    assert answer.not_before == T0 + 1.0 and len(answer.frame.encode()) == ACK_SIZE_BYTES
    assert h.conn.awaiting is None and h.conn.kind is K.ANONYMOUS


def test_a_decoy_is_only_checked_and_acked_like_a_real_upload_but_never_announced():
    h = Harness()
    decoy = upload(code="whatever the code", decoy=True, n=2)
    assert h.feed(decoy) == [CheckDecoy(decoy.tokens)]
    h.conn.upload_done(2)
    [answer] = h.conn.actions()
    assert len(answer.frame.encode()) == ACK_SIZE_BYTES and answer.not_before == T0 + 1.0
    ack = decode_broker_message(answer.frame)
    assert isinstance(ack, PositiveAck) and ack.count == 2


@pytest.mark.parametrize("answer", ["refused", "unavailable", "failed"])
def test_every_answer_to_an_upload_is_late_and_padded(answer):
    h = Harness()
    h.feed(upload())
    if answer == "refused":
        h.conn.refused(Refusal("this declaration code was already used", code="code_used",
                               field="code"))
    else:
        getattr(h.conn, answer)()
    [send] = h.conn.actions()
    assert isinstance(send, Send) and send.not_before == T0 + 1.0
    assert len(send.frame.encode()) == ACK_SIZE_BYTES
    assert send.error == {"refused": "code_used", "unavailable": "unavailable",
                          "failed": "internal_error"}[answer]
    assert h.conn.awaiting is None


def test_a_board_that_cannot_be_read_is_unavailable():
    h = Harness()
    h.feed(PositivesPoll())
    h.conn.unavailable()
    [error] = sent(h.conn.actions())
    assert error.code == "unavailable" and "read" in error.message


def test_a_long_refusal_is_cut_to_fit_the_acks_size():
    h = Harness()
    h.feed(upload())
    h.conn.refused(Refusal("x" * 500, code="duplicate_token", field="tokens[499].token"))
    [send] = h.conn.actions()
    assert len(send.frame.encode()) == ACK_SIZE_BYTES
    error = decode_broker_message(send.frame)
    assert isinstance(error, Error) and error.message.endswith("...")


# --- sessions: matches, signals, the end ----------------------------------------------------


def test_matches_are_posted_to_both_sessions():
    h = Harness()
    h.session(A)
    h.feed(position())
    h.conn.matched([MatchNotice(A, B, "initiator"), MatchNotice(B, A, "responder")])
    assert h.conn.actions() == [
        Post(A, encode(Match(peer_session_id=B, role="initiator"))),
        Post(B, encode(Match(peer_session_id=A, role="responder")))]


def test_position_lost_drops_the_position():
    h = Harness()
    h.session(A)
    assert h.feed(PositionLost()) == [DropPosition(A)]
    assert h.conn.awaiting is None


def test_a_signal_to_a_peer_connected_nowhere_is_peer_unavailable():
    h = Harness()
    h.session(A)
    h.feed(Signal(peer_session_id=B, sdp_type="answer", sdp=SDP))
    h.conn.peer_gone()
    [error] = sent(h.conn.actions())
    assert (error.code, error.field) == ("peer_unavailable", "peer_session_id")


def test_a_signal_without_a_route_is_refused_by_the_store():
    h = Harness()
    h.session(A)
    h.feed(Signal(peer_session_id=B, sdp_type="offer", sdp=SDP))
    h.conn.refused(Refusal("no recent match with this peer: signal refused",
                           code="not_matched", field="peer_session_id"))
    [error] = sent(h.conn.actions())
    assert (error.code, error.field) == ("not_matched", "peer_session_id")
    assert h.conn.kind is K.SESSION


def test_a_replaced_connection_closes_at_once_and_still_forgets_its_epoch_at_the_end():
    h = Harness()
    h.session(A, epoch=4)
    h.conn.replaced()
    assert h.conn.actions() == [Close(CLOSE_REPLACED, "replaced by a newer connection",
                                      flush=False)]
    assert h.conn.kind is K.CLOSED
    h.conn.replaced()                     # twice: nothing more
    assert h.conn.actions() == []
    h.conn.connection_lost()
    assert h.conn.actions() == [Disconnect(A, 4)]   # a stale epoch: the store ignores it
    h.conn.connection_lost()
    assert h.conn.actions() == []


def test_a_replaced_connection_still_posts_the_matches_of_its_last_position():
    h = Harness()
    h.session(A)
    h.feed(position())
    h.conn.replaced()
    h.conn.actions()
    h.conn.matched([MatchNotice(B, A, "responder")])
    assert h.conn.actions() == [Post(B, encode(Match(peer_session_id=A, role="responder")))]


def test_a_connection_that_ends_while_its_hello_is_registered_undoes_the_registration():
    h = Harness()
    h.feed(Hello(session_id=A, radius_m=30.0))
    h.conn.connection_lost()
    assert h.conn.actions() == [] and h.conn.kind is K.CLOSED
    h.conn.connected(9, 30.0)
    assert h.conn.actions() == [Disconnect(A, 9)]
    assert h.conn.awaiting is None and h.conn.session_id is None


def test_an_anonymous_connection_ends_without_a_store_call():
    h = Harness()
    h.anonymous()
    h.conn.connection_lost()
    assert h.conn.actions() == [] and h.conn.kind is K.CLOSED


def test_a_hello_the_store_failed_on_leaves_the_connection_new():
    h = Harness()
    h.feed(Hello(session_id=A, radius_m=30.0))
    h.conn.failed()
    assert h.conn.actions() == [Send(INTERNAL_ERROR, error="internal_error")]
    assert h.conn.kind is K.NEW and h.conn.deadline == T0 + 30.0 and h.conn.session_id is None
    assert h.feed(Hello(session_id=A, radius_m=30.0)) == [Connect(A, 30.0, T0)]


def test_a_hello_the_store_is_unavailable_for_is_refused_unavailable_and_stays_new():
    """Redis down at hello: ``unavailable`` (the device's link retries, or fails over)."""
    h = Harness()
    h.feed(Hello(session_id=A, radius_m=30.0))
    h.conn.unavailable()
    [send] = h.conn.actions()
    error = decode_broker_message(send.frame)
    assert isinstance(error, Error) and send.error == "unavailable"
    assert (error.code, error.field) == ("unavailable", None) and "retry" in error.message
    assert h.conn.kind is K.NEW and h.conn.session_id is None and h.conn.awaiting is None
    assert h.feed(Hello(session_id=A, radius_m=30.0)) == [Connect(A, 30.0, T0)]


@pytest.mark.parametrize("frame", [position(), Signal(peer_session_id=B, sdp_type="offer",
                                                     sdp=SDP)])
def test_a_session_message_the_store_is_unavailable_for_closes_the_session(frame):
    """The device says hello again: its session is registered anew once the store is back."""
    h = _session()
    [call] = [a for a in h.feed(frame) if not isinstance(a, Record)]
    assert isinstance(call, UpdatePosition | RelaySignal)
    h.conn.unavailable()
    send, close = h.conn.actions()
    error = decode_broker_message(send.frame)
    assert isinstance(error, Error) and (error.code, error.field) == ("unavailable", None)
    assert close == Close(CLOSE_TRY_AGAIN, "store unavailable: say hello again")
    assert h.conn.kind is K.CLOSED and h.conn.awaiting is None
    h.conn.connection_lost()
    assert h.conn.actions() == [Disconnect(A, 7)]


def test_a_store_action_without_answer_that_failed_closes_only_a_session():
    h = _session()
    h.feed(PositionLost())
    h.conn.actions()
    h.conn.store_unavailable()
    send, close = h.conn.actions()
    assert decode_broker_message(send.frame).code == "unavailable"
    assert close.code == CLOSE_TRY_AGAIN and h.conn.kind is K.CLOSED
    for other in (Harness(), _anonymous(), h):
        before = other.snapshot()
        other.conn.store_unavailable()
        assert other.conn.actions() == [] and other.snapshot() == before


def test_the_recorder_sees_every_frame_with_the_kind_of_its_connection():
    h = Harness(record=True)
    bad = h.feed(position())
    assert bad[0] == Record("unknown", encode(position()))
    hello = Hello(session_id=A, radius_m=30.0)
    assert h.feed(hello)[0] == Record("session", encode(hello))
    h.conn.connected(1, 30.0)
    h.conn.actions()
    assert h.feed(b"\x00")[0] == Record("session", b"\x00")
    other = Harness(record=True)
    poll = PositivesPoll()
    assert other.feed(poll)[0] == Record("anonymous", encode(poll))
    assert Harness().feed(poll) == [ReadBoard(0, 100)]     # no recorder: no Record


def test_two_cores_on_the_real_state_match_and_signal():
    """The adapter's loop, played by hand over the pure BrokerState: a match and a relay."""
    state = BrokerState(radius_max_m=100.0, cooldown_s=300.0, position_timeout_s=60.0)
    a, b = Harness(), Harness()
    ids = {id(a): new_id(), id(b): new_id()}
    posted: dict[str, list[Any]] = {ids[id(a)]: [], ids[id(b)]: []}

    def run(h: Harness, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Connect):
                connected = state.connect(action.session_id, action.radius_m, action.now)
                h.conn.connected(connected.epoch, connected.radius_m)
            elif isinstance(action, UpdatePosition):
                h.conn.matched(state.update_position(action.session_id, action.latitude,
                                                     action.longitude, action.accuracy_m,
                                                     action.now))
            elif isinstance(action, RelaySignal):
                state.check_route(action.source, action.destination, action.now)
                posted[action.destination].append(decode_broker_message(action.frame))
                h.conn.relayed()
            elif isinstance(action, Post):
                posted[action.session_id].append(decode_broker_message(action.frame))
            run(h, h.conn.actions())

    for h in (a, b):
        run(h, h.feed(Hello(session_id=ids[id(h)], radius_m=30.0)))
    run(a, a.feed(Position(latitude=LAT, longitude=LON, accuracy_m=3.0)))
    run(b, b.feed(Position(latitude=north(5.0), longitude=LON, accuracy_m=3.0)))
    assert [type(m) for m in posted[ids[id(a)]]] == [Match]
    assert [type(m) for m in posted[ids[id(b)]]] == [Match]
    run(a, a.feed(Signal(peer_session_id=ids[id(b)], sdp_type="offer", sdp=SDP)))
    assert posted[ids[id(b)]][-1] == Signal(peer_session_id=ids[id(a)], sdp_type="offer",
                                            sdp=SDP)


def test_limits_come_from_the_brokers_settings(tmp_path):
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "b.sqlite3",
                              position_burst=7, poll_limit=12, open_declarations=True)
    limits = ConnectionLimits.from_settings(settings)
    assert (limits.position_burst, limits.poll_limit, limits.open_declarations) == (7, 12, True)
    assert limits.first_message_timeout_s == settings.first_message_timeout_s
    # one home for each default: BrokerSettings; the core's limits have none of their own
    assert [f.name for f in fields(ConnectionLimits) if f.default is not MISSING] == []


# --- illegal inputs -------------------------------------------------------------------------


def test_a_frame_while_a_store_answer_is_due_is_illegal_and_changes_nothing():
    h = Harness()
    h.session()
    h.feed(position())
    before = h.snapshot()
    with pytest.raises(LocalProtocolError):
        h.feed(position())
    assert h.snapshot() == before and h.conn.actions() == []


@pytest.mark.parametrize(("call", "args"), [
    ("connected", (1, 30.0)), ("matched", ([],)), ("relayed", ()), ("peer_gone", ()),
    ("upload_done", (1,)), ("board_read", ([], 0, False)), ("board_streamed", ()),
    ("refused", (Refusal("no", code="not_matched"),)), ("unavailable", ()), ("failed", ()),
    ("replaced", ()),
])
def test_an_answer_nobody_waits_for_is_illegal_and_changes_nothing(call, args):
    for h in (Harness(), _anonymous(), _session()):
        before = h.snapshot()
        if call == "replaced" and h.conn.kind is K.SESSION:
            continue
        with pytest.raises(LocalProtocolError):
            getattr(h.conn, call)(*args)
        assert h.snapshot() == before


def _anonymous() -> Harness:
    h = Harness()
    h.anonymous()
    return h


def _session() -> Harness:
    h = Harness()
    h.session()
    return h


def test_the_wrong_answer_is_illegal_and_changes_nothing():
    h = Harness()
    h.feed(Hello(session_id=A, radius_m=30.0))
    before = h.snapshot()
    for call, args in (("matched", ([],)), ("upload_done", (1,)), ("relayed", ()),
                       ("refused", (Refusal("no", code="not_matched"),))):
        with pytest.raises(LocalProtocolError):
            getattr(h.conn, call)(*args)
        assert h.snapshot() == before


# --- random sequences (Hypothesis) ----------------------------------------------------------

_SESSION_IDS = [A, B]
_FRAMES: list[Any] = [
    Hello(session_id=A, radius_m=30.0), Hello(session_id=B, radius_m=5.0, protocol=2),
    position(), position(3.0), PositionLost(),
    Signal(peer_session_id=B, sdp_type="offer", sdp=SDP),
    upload(), upload(code=format_code(bytes(10))), upload(code="bad"),
    upload(decoy=True), PositivesPoll(), PositivesPoll(cursor=3, accept=[BATCH_FORMAT]),
]
_RAW: list[Any] = ["", "{}", "[1]", '{"type": "positive_upload"}', b"\x01\x02",
                   '{"type": "hello", "session_id": "x"}', '{"type": "nope"}']
_ANSWERS: list[tuple[str, tuple[Any, ...]]] = [
    ("connected", (5, 30.0)), ("matched", ([],)),
    ("matched", ([MatchNotice(A, B, "initiator"), MatchNotice(B, A, "responder")],)),
    ("relayed", ()), ("peer_gone", ()), ("upload_done", (0,)), ("upload_done", (4,)),
    ("board_read", ([positive(1)], 1, False)), ("board_streamed", ()),
    ("refused", (Refusal("refused", code="code_used", field="code"),)), ("unavailable", ()),
    ("failed", ()), ("replaced", ()), ("connection_lost", ()), ("store_unavailable", ()),
    ("refuse_connection", ("the broker is full: retry later",)),
]

_inputs = st.one_of(
    st.tuples(st.just("frame"), st.sampled_from(_FRAMES + _RAW)),
    st.tuples(st.just("tick"), st.floats(0.0, 40.0)),
    st.tuples(st.just("wait"), st.floats(0.0, 5.0)),
    st.tuples(st.just("answer"), st.sampled_from(_ANSWERS)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(_inputs, max_size=40), record=st.booleans())
def test_random_inputs_raise_only_local_protocol_errors_that_change_nothing(steps, record):
    conn = BrokerConnection(LIMITS, T0, record=record)
    now = T0
    was_closed = False
    for what, value in steps:
        before = _snapshot(conn)
        try:
            if what == "frame":
                frame = encode(value) if isinstance(value, msgspec.Struct) else value
                conn.receive_frame(frame, now)
            elif what == "tick":
                conn.tick(now + value)
            elif what == "wait":
                now += value
                continue
            else:
                name, args = value
                getattr(conn, name)(*args)
        except LocalProtocolError:
            assert _snapshot(conn) == before      # an illegal input changes nothing
            continue
        _check_invariants(conn, conn.actions(), was_closed)
        was_closed = conn.kind is K.CLOSED


def _check_invariants(conn: BrokerConnection, actions: list[Action], was_closed: bool) -> None:
    kind = conn.kind
    if was_closed:
        assert kind is K.CLOSED                   # terminal
    assert (conn.deadline is not None) == (kind is K.NEW)
    if kind is K.GREETING:
        assert conn.awaiting is Op.CONNECT
    elif conn.awaiting is Op.CONNECT:
        assert kind is K.CLOSED                   # ended while the hello was registered
    if kind is K.SESSION:
        assert conn.session_id in _SESSION_IDS
    if kind in (K.NEW, K.GREETING, K.ANONYMOUS):
        assert conn.session_id is None            # an anonymous connection has no session
    waits = [a for a in actions if isinstance(a, Connect | UpdatePosition | RelaySignal
                                              | StoreUpload | CheckDecoy | ReadBoard
                                              | StreamBoard)]
    assert len(waits) <= 1 and (not waits or actions[-1] is waits[0])
    if waits:
        assert conn.awaiting is not None
    for action in actions:
        if isinstance(action, Send):
            message = decode_broker_message(action.frame)
            if isinstance(message, Error):
                assert message.code in DOCUMENTED_CODES and action.error == message.code
            if action.not_before is not None:     # the answer to an upload
                assert len(action.frame.encode()) == ACK_SIZE_BYTES
                assert isinstance(message, PositiveAck | Error)
        if kind is K.ANONYMOUS:
            assert not isinstance(action, Connect | Attach | UpdatePosition | RelaySignal)



def test_docs_give_the_state_machine_of_every_kind():
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    section = text.split("## The broker connection (state machine)")[1].split("\n## ")[0]
    for kind in ConnectionKind:
        assert f"| `{kind.name}` |" in section, kind
    for code in DOCUMENTED_CODES:                 # the error codes' table
        assert f"| `{code}` |" in text, code


_LEGAL_ANSWERS: dict[Op, list[tuple[str, tuple[Any, ...]]]] = {
    Op.CONNECT: [("connected", (5, 30.0)), ("unavailable", ()), ("failed", ())],
    Op.UPDATE: [("matched", ([],)), ("matched", ([MatchNotice(A, B, "initiator"),
                                                 MatchNotice(B, A, "responder")],)),
                ("unavailable", ()), ("failed", ())],
    Op.RELAY: [("relayed", ()), ("peer_gone", ()),
               ("refused", (Refusal("no route", code="not_matched",
                                    field="peer_session_id"),)), ("unavailable", ()),
               ("failed", ())],
    Op.STORE: [("upload_done", (0,)), ("upload_done", (3,)), ("unavailable", ()),
               ("refused", (Refusal("used", code="code_used", field="code"),)), ("failed", ())],
    Op.READ: [("board_read", ([positive(1)], 1, False)), ("unavailable", ()), ("failed", ())],
    Op.STREAM: [("board_streamed", ()), ("unavailable", ()), ("failed", ())],
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.sampled_from(_FRAMES + _RAW), max_size=30), data=st.data())
def test_a_well_behaved_adapter_never_meets_an_illegal_input_and_every_frame_is_answered(
        frames, data):
    """The adapter's loop with stores that answer anything legal: no LocalProtocolError, every
    frame gets an output, and every upload exactly one answer, late and at the ack's size."""
    conn = BrokerConnection(LIMITS, T0)
    now = T0
    for value in frames:
        now += data.draw(st.floats(0.0, 2.0))
        was_closed = conn.kind is K.CLOSED
        frame = encode(value) if isinstance(value, msgspec.Struct) else value
        conn.receive_frame(frame, now)
        outputs = conn.actions()
        _check_invariants(conn, outputs, was_closed)
        answers = list(outputs)
        while conn.awaiting is not None:
            name, args = data.draw(st.sampled_from(_LEGAL_ANSWERS[conn.awaiting]))
            getattr(conn, name)(*args)
            more = conn.actions()
            _check_invariants(conn, more, was_closed)
            answers += more
        if was_closed:
            assert answers == []
            continue
        assert answers, f"{value!r} got no output"
        is_upload = isinstance(value, PositiveUpload) or (
            isinstance(value, str) and '"positive_upload"' in value)
        late = [a for a in answers if isinstance(a, Send) and a.not_before is not None]
        if is_upload:
            assert len(late) == 1 and len(late[0].frame.encode()) == ACK_SIZE_BYTES
            assert [a for a in answers if isinstance(a, Send)] == late
        else:
            assert late == []
