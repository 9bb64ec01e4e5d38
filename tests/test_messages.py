"""Tests for fanny_tui.protocol.messages: every wire message round-trips; bad input is refused
with a typed MessageError naming the field (never a msgspec error or a traceback)."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanny_tui.protocol.errors import MessageError, RemoteProtocolError
from fanny_tui.protocol.messages import (
    ALL_MESSAGES,
    PROTOCOL_VERSION,
    Abort,
    Close,
    Error,
    Heartbeat,
    Hello,
    Match,
    PeerHello,
    PeerPosition,
    Position,
    PositionLost,
    PositiveAck,
    Positives,
    PositivesAvailable,
    PositivesPoll,
    PositiveToken,
    PositiveUpload,
    Signal,
    TokenAck,
    TokenOffer,
    Welcome,
    decode_broker_message,
    decode_client_message,
    decode_peer_message,
    encode,
    message_type,
)
from tests.helpers import uuid4s

SID = "0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69"
CID = "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
TOKEN = "0123456789abcdef" * 4
HOUR = datetime(2026, 12, 14, 4, tzinfo=UTC)

CLIENT_TO_BROKER = {Hello, Position, PositionLost, Signal, PositiveUpload, PositivesPoll}
BROKER_TO_CLIENT = {Welcome, Match, Signal, PositiveAck, Positives, PositivesAvailable, Error}
PEER = {PeerHello, PeerPosition, Heartbeat, TokenOffer, TokenAck, Close, Abort}
DECODERS = {"client": decode_client_message, "broker": decode_broker_message,
            "peer": decode_peer_message}


def channels(cls: type) -> list[str]:
    return [name for name, group in (("client", CLIENT_TO_BROKER), ("broker", BROKER_TO_CLIENT),
                                     ("peer", PEER)) if cls in group]


# --- strategies: one per message, valid values only --------------------------------------

tokens = st.text("0123456789abcdef", min_size=64, max_size=64)
hours_utc = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2100, 1, 1),
                         timezones=st.just(UTC)).map(
    lambda d: d.replace(minute=0, second=0, microsecond=0))
finite = {"allow_nan": False, "allow_infinity": False}
positive_tokens = st.builds(PositiveToken, token=tokens, expires_at=hours_utc)
short_text = st.text(max_size=200)

STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    Hello: st.builds(Hello, session_id=uuid4s,
                     radius_m=st.floats(min_value=0.001, max_value=10_000, **finite),
                     protocol=st.integers(1, 10)),
    Welcome: st.builds(Welcome, radius_m=st.floats(min_value=0.001, max_value=10_000, **finite),
                       position_timeout_s=st.floats(min_value=0, max_value=1e6, **finite)),
    Position: st.builds(Position, latitude=st.floats(-90, 90, **finite),
                        longitude=st.floats(-180, 180, **finite),
                        accuracy_m=st.none() | st.floats(0, 100_000, **finite)),
    PositionLost: st.just(PositionLost()),
    Match: st.builds(Match, peer_session_id=uuid4s,
                     role=st.sampled_from(["initiator", "responder"])),
    Signal: st.builds(Signal, peer_session_id=uuid4s, sdp_type=st.sampled_from(["offer",
                                                                                "answer"]),
                      sdp=st.text(min_size=1, max_size=500)),
    PositiveUpload: st.builds(PositiveUpload, upload_id=uuid4s,
                              tokens=st.lists(positive_tokens, max_size=5)) | st.builds(
        PositiveUpload, upload_id=uuid4s, tokens=st.lists(positive_tokens, max_size=5),
        code=st.text(min_size=1, max_size=64),
        declaration=st.none() | st.binary(min_size=32, max_size=32).map(bytes.hex)),
    PositiveAck: st.builds(PositiveAck, upload_id=uuid4s, count=st.integers(0, 10**6)),
    PositivesPoll: st.builds(PositivesPoll, cursor=st.integers(0, 2**62),
                             accept=st.lists(st.text(min_size=1, max_size=16), max_size=8)),
    PositivesAvailable: st.builds(PositivesAvailable, cursor=st.integers(0, 2**62)),
    Positives: st.builds(Positives, cursor=st.integers(0, 2**62),
                         tokens=st.lists(positive_tokens, max_size=5), more=st.booleans()),
    Error: st.builds(Error, code=st.text(max_size=64), message=short_text,
                     field=st.none() | st.text(max_size=30)),
    PeerHello: st.builds(PeerHello, version=st.integers(1, 2**31 - 1), contact_id=uuid4s,
                         min_contact_s=st.floats(0, 86_400, **finite),
                         radius_m=st.floats(min_value=0.001, max_value=10_000, **finite)),
    PeerPosition: st.builds(PeerPosition, latitude=st.floats(-90, 90, **finite),
                            longitude=st.floats(-180, 180, **finite),
                            accuracy_m=st.none() | st.floats(0, 100_000, **finite)),
    Heartbeat: st.just(Heartbeat()),
    Close: st.builds(Close, reason=short_text),
    TokenOffer: st.builds(TokenOffer, token=tokens),
    TokenAck: st.builds(TokenAck, token=tokens),
    Abort: st.builds(Abort, reason=short_text),
}


EXAMPLES: dict[type, Any] = {
    Hello: Hello(session_id=SID, radius_m=10.0),
    Welcome: Welcome(radius_m=10.0, position_timeout_s=30.0),
    Position: Position(latitude=44.068817, longitude=5.0485, accuracy_m=4.5),
    PositionLost: PositionLost(),
    Match: Match(peer_session_id=SID, role="responder"),
    Signal: Signal(peer_session_id=SID, sdp_type="offer", sdp="v=0\r\n"),
    PositiveUpload: PositiveUpload(upload_id=SID, tokens=[PositiveToken(TOKEN, HOUR)]),
    PositiveAck: PositiveAck(upload_id=SID, count=1),
    PositivesPoll: PositivesPoll(cursor=7, accept=["batch1"]),
    PositivesAvailable: PositivesAvailable(cursor=9),
    Positives: Positives(cursor=8, tokens=[PositiveToken(TOKEN, HOUR)], more=True),
    Error: Error(code="bad_message", message="latitude out of range", field="latitude"),
    PeerHello: PeerHello(version=2, contact_id=CID, min_contact_s=30.0, radius_m=10.0),
    PeerPosition: PeerPosition(latitude=44.068817, longitude=5.0485, accuracy_m=None),
    Heartbeat: Heartbeat(),
    Close: Close(reason="parted"),
    TokenOffer: TokenOffer(token=TOKEN),
    TokenAck: TokenAck(token=TOKEN),
    Abort: Abort(reason="timeout"),
}


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_example_round_trip(cls: type) -> None:
    message = EXAMPLES[cls]
    for channel in channels(cls):
        assert DECODERS[channel](encode(message)) == message


def test_every_message_has_a_strategy_and_a_channel() -> None:
    assert set(STRATEGIES) == set(ALL_MESSAGES)
    assert set(EXAMPLES) == set(ALL_MESSAGES)
    assert set(ALL_MESSAGES) == CLIENT_TO_BROKER | BROKER_TO_CLIENT | PEER
    tags = [message_type(EXAMPLES[cls]) for cls in ALL_MESSAGES]
    assert len(set(tags)) == len(tags), "each message has its own type tag"


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_round_trip(cls: type, data: st.DataObject) -> None:
    message = data.draw(STRATEGIES[cls])
    text = encode(message)
    assert json.loads(text)["type"] == message_type(message)
    for channel in channels(cls):
        assert DECODERS[channel](text) == message
        assert DECODERS[channel](text.encode("utf-8")) == message


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_a_message_is_refused_on_the_wrong_channel(cls: type) -> None:
    text = encode(EXAMPLES[cls])
    for channel, decode in DECODERS.items():
        if channel not in channels(cls):
            with pytest.raises(MessageError) as refused:
                decode(text)
            assert (refused.value.code, refused.value.field) == ("unknown_type", "type")


def test_defaults() -> None:
    assert decode_client_message(f'{{"type":"hello","session_id":"{SID}","radius_m":10}}'
                                 ) == Hello(session_id=SID, radius_m=10.0,
                                            protocol=PROTOCOL_VERSION)
    assert decode_client_message('{"type":"positives_poll"}') == PositivesPoll(cursor=0)


def test_expiry_in_another_offset_is_judged_and_kept_in_utc() -> None:
    # 06:30 at +02:30 is 04:00 UTC: on the hour.
    plus_2_30 = timezone(timedelta(hours=2, minutes=30))
    text = json.dumps({"type": "positive_upload", "upload_id": SID, "tokens": [
        {"token": TOKEN, "expires_at": "2026-12-14T06:30:00+02:30"}]})
    upload = decode_client_message(text)
    assert isinstance(upload, PositiveUpload)
    assert upload.tokens[0].expires_at == datetime(2026, 12, 14, 6, 30, tzinfo=plus_2_30)
    assert upload.tokens[0].expires_at.tzinfo == UTC
    assert '"2026-12-14T04:00:00Z"' in encode(upload)


# --- bad input: typed errors naming the field --------------------------------------------


def refuse(decode: Any, text: str | bytes) -> MessageError:
    with pytest.raises(MessageError) as refused:
        decode(text)
    error = refused.value
    assert type(error) is MessageError and isinstance(error, RemoteProtocolError)
    assert error.__cause__ is None and error.__suppress_context__  # no msgspec chain to print
    assert "\n" not in str(error)
    return error


def position(**fields: Any) -> str:
    return json.dumps({"type": "position", "latitude": 44.0, "longitude": 5.0} | fields)


def upload(expires_at: str = "2026-12-14T04:00:00Z", token: str = TOKEN, *,
           fields: dict[str, Any] | None = None, **extra: Any) -> str:
    item: dict[str, Any] = {"token": token, "expires_at": expires_at} | extra
    return json.dumps({"type": "positive_upload", "upload_id": SID, "tokens": [item]}
                      | (fields or {}))


@pytest.mark.parametrize(("text", "field"), [
    (position(latitude=90.000001), "latitude"),
    (position(latitude=-91), "latitude"),
    (position(longitude=180.5), "longitude"),
    (position(longitude=-180.01), "longitude"),
    (position(accuracy_m=-1), "accuracy_m"),
    (position(latitude="44.0"), "latitude"),
    (position(latitude=True), "latitude"),
    (position(latitude=None), "latitude"),
    # A JSON number that overflows a double decodes to infinity: out of range, never NaN.
    ('{"type":"position","latitude":1e999,"longitude":5}', "latitude"),
    ('{"type":"position","latitude":44,"longitude":-1e999}', "longitude"),
    ('{"type":"position","latitude":44,"longitude":5,"accuracy_m":1e999}', "accuracy_m"),
    ('{"type":"position","longitude":5}', "latitude"),
    (json.dumps({"type": "hello", "session_id": SID, "radius_m": 0}), "radius_m"),
    (json.dumps({"type": "hello", "session_id": SID.upper(), "radius_m": 5}), "session_id"),
    (json.dumps({"type": "hello", "session_id": SID + "\n", "radius_m": 5}), "session_id"),
    (json.dumps({"type": "positives_poll", "cursor": -1}), "cursor"),
    (upload(token=TOKEN.upper()), "tokens[0].token"),
    (upload(token=TOKEN[:-1]), "tokens[0].token"),
    (upload(token=TOKEN[:-1] + "g"), "tokens[0].token"),
    (upload(token=TOKEN + "\n"), "tokens[0].token"),
    (upload(expires_at="2026-12-14T04:00:00"), "tokens[0].expires_at"),  # naive
    (upload(expires_at="2026-12-14T04:30:00Z"), "tokens[0].expires_at"),
    (upload(expires_at="2026-12-14T04:00:01Z"), "tokens[0].expires_at"),
    (upload(expires_at="2026-12-14T04:00:00.5Z"), "tokens[0].expires_at"),
    (upload(expires_at="2026-12-14T06:00:00+01:30"), "tokens[0].expires_at"),  # 04:30 UTC
    (upload(expires_at="tomorrow"), "tokens[0].expires_at"),
    # The declaration secret: 64 lowercase hex, and only with a code (issue 8, point 3).
    (upload(fields={"code": "K7QF-3M9X-TR2B-8HJD", "declaration": TOKEN.upper()}),
     "declaration"),
    (upload(fields={"code": "K7QF-3M9X-TR2B-8HJD", "declaration": TOKEN[:-2]}), "declaration"),
    (upload(fields={"code": "K7QF-3M9X-TR2B-8HJD", "declaration": TOKEN + "\n"}),
     "declaration"),
    (upload(fields={"declaration": TOKEN}), "declaration"),
])
def test_bad_client_values_name_the_field(text: str, field: str) -> None:
    error = refuse(decode_client_message, text)
    assert (error.code, error.field) == ("bad_message", field)


@pytest.mark.parametrize(("text", "field"), [
    ('{"type":"token","token":"ABCDEF"}', "token"),
    ('{"type":"ack","token":"' + "A" * 64 + '"}', "token"),
    ('{"type":"ack","token":"' + "z" * 64 + '"}', "token"),
    ('{"type":"peer_hello","version":2,"contact_id":"7a1b2c3d4e5f4a6b8c7d9e0f1a2b3c4d",'
     '"min_contact_s":0,"radius_m":10}', "contact_id"),
    ('{"type":"peer_hello","version":0,"contact_id":"' + CID + '","min_contact_s":0,'
     '"radius_m":10}', "version"),
    ('{"type":"peer_hello","version":2,"contact_id":"' + CID + '","min_contact_s":-1,'
     '"radius_m":10}', "min_contact_s"),
    ('{"type":"peer_hello","version":2,"contact_id":"' + CID + '","min_contact_s":0,'
     '"radius_m":0}', "radius_m"),
    ('{"type":"peer_hello","version":2,"contact_id":"' + CID + '","radius_m":10}',
     "min_contact_s"),
    ('{"type":"peer_position","latitude":91,"longitude":0}', "latitude"),
    ('{"type":"peer_position","latitude":0,"longitude":0,"accuracy_m":-1}', "accuracy_m"),
    ('{"type":"close","reason":"' + "x" * 201 + '"}', "reason"),
    ('{"type":"abort","reason":"' + "x" * 201 + '"}', "reason"),
])
def test_bad_peer_values_name_the_field(text: str, field: str) -> None:
    error = refuse(decode_peer_message, text)
    assert (error.code, error.field) == ("bad_message", field)


@pytest.mark.parametrize("text", ['{"type":"nope"}', '{"type":""}',
                                  '{"type":"contact_id","contact_id":"' + CID + '"}',
                                  '{"type":"peer_hello","version":2,"contact_id":"' + CID
                                  + '","min_contact_s":0,"radius_m":10}'])
def test_unknown_type(text: str) -> None:
    error = refuse(decode_client_message, text)
    assert (error.code, error.field) == ("unknown_type", "type")


@pytest.mark.parametrize("text", ['{"token":"' + TOKEN + '"}', '{"type":3,"token":"' + TOKEN
                                  + '"}', '{"type":null}', '{"type":["ack"]}'])
def test_missing_or_non_text_type(text: str) -> None:
    error = refuse(decode_peer_message, text)
    assert (error.code, error.field) == ("bad_message", "type")


@pytest.mark.parametrize(("decode", "text", "field"), [
    (decode_client_message, position(speed=3), "speed"),
    (decode_client_message, upload(comment="hi"), "tokens[0].comment"),
    (decode_peer_message, json.dumps({"type": "ack", "token": TOKEN, "contact_id": CID}),
     "contact_id"),
    (decode_peer_message, json.dumps({"type": "heartbeat", "latitude": 1}), "latitude"),
    (decode_peer_message, json.dumps({"type": "peer_hello", "version": 2, "contact_id": CID,
                                      "min_contact_s": 0, "radius_m": 10, "max_contact_s": 9}),
     "max_contact_s"),
    (decode_broker_message, json.dumps({"type": "match", "peer_session_id": SID,
                                        "role": "initiator", "position": [1, 2]}), "position"),
])
def test_unknown_field(decode: Any, text: str, field: str) -> None:
    error = refuse(decode, text)
    assert (error.code, error.field) == ("unknown_field", field)


@pytest.mark.parametrize("data", [b"\xff\xfe", b"", "{", "[]", "null", '"position"', "1e999",
                                  '{"type":"position"', b'{"type":"position"}\x00'])
def test_not_a_message_at_all(data: str | bytes) -> None:
    error = refuse(decode_client_message, data)
    assert error.code in ("bad_message", "unknown_type")


@given(st.one_of(st.binary(max_size=100), st.text(max_size=100)))
def test_arbitrary_input_only_ever_raises_message_error(data: str | bytes) -> None:
    for decode in DECODERS.values():
        with contextlib.suppress(MessageError):
            decode(data)
