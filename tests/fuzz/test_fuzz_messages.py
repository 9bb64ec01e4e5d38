"""Fuzzing the wire decoders: decode_client_message, decode_broker_message, decode_peer_message.

Whatever arrives, a decoder returns a message of the right type for its channel or raises
:class:`MessageError` with a documented ``code`` (docs/protocol.md: ``bad_message``,
``unknown_type``, ``unknown_field``); when one field of a valid message was changed, ``field``
names it. Inputs: (a) arbitrary bytes and JSON-ish byte soup, (b) arbitrary JSON values and
objects built from the schema's own names, (c) one mutation of a valid message of every type
(drop, add or retag a field, wrong types, huge numbers, ``1e999``, ``-0.0``, NaN, unicode,
deep nesting, very long strings and lists, duplicated keys, trailing data). Plus round trips:
``decode(encode(m)) == m`` and ``encode_padded`` for generated valid messages, and anything
that decodes re-encodes to itself.

tests/test_messages.py has the hand-written cases and a first round trip; this goes further.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from fanny_tui.protocol.errors import MessageError
from fanny_tui.protocol.messages import (
    ACK_SIZE_BYTES,
    ALL_MESSAGES,
    MAX_TOKENS_PER_UPLOAD,
    UPLOAD_SIZE_BYTES,
    Abort,
    BrokerToClient,
    ClientToBroker,
    Close,
    Error,
    Heartbeat,
    Hello,
    Match,
    PeerHello,
    PeerMessage,
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
    encode_padded,
)
from tests.fuzz import fuzz_settings, report, tried
from tests.helpers import uuid4s

CODES = {"bad_message", "unknown_type", "unknown_field"}
"""The ``code`` values a decoding MessageError may carry (docs/protocol.md, error codes)."""

Decoder = Callable[[str | bytes], Any]
CHANNELS: dict[str, tuple[Decoder, tuple[type, ...]]] = {
    "client": (decode_client_message, ClientToBroker.__args__),  # type: ignore[attr-defined]
    "broker": (decode_broker_message, BrokerToClient.__args__),  # type: ignore[attr-defined]
    "peer": (decode_peer_message, PeerMessage.__args__),  # type: ignore[attr-defined]
}
TAGS = {cls: cls.__struct_config__.tag for cls in ALL_MESSAGES}


def channels_of(cls: type) -> list[str]:
    return [name for name, (_, members) in CHANNELS.items() if cls in members]


def check_outcome(channel: str, data: str | bytes) -> Any:
    """Decode ``data`` on ``channel``: a message of the channel's types, or a typed refusal.

    Returns:
        The decoded message, or the MessageError raised.
    """
    decode, members = CHANNELS[channel]
    try:
        message = decode(data)
    except MessageError as error:
        assert type(error) is MessageError, type(error)
        assert error.code in CODES, error.code
        assert error.field is None or isinstance(error.field, str)
        assert str(error), "a refusal says what was wrong"
        assert error.__cause__ is None and error.__suppress_context__  # no chain to print
        if error.code == "unknown_type":
            assert error.field == "type"
        return error
    assert isinstance(message, members), type(message)
    # Anything accepted re-encodes to a text that decodes to the same message.
    again = encode(message)
    assert decode(again) == message
    assert encode(decode(again)) == again
    return message


# --- a JSON writer that can also write what json.dumps cannot -----------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text written as it is (``1e999``, ``NaN``, a 5000-digit number, deep nesting)."""

    text: str
    valid_json: bool = True


def dump(value: Any) -> str:
    """Serialize ``value`` as JSON; infinities as ``1e999``/``-1e999``, NaN as ``NaN``."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "1e999" if value > 0 else "-1e999"
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{dump(str(k))}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dump(v) for v in value) + "]"
    raise TypeError(type(value))


def is_valid_json(value: Any) -> bool:
    """False if ``value`` holds a NaN or a Raw that is not JSON."""
    if isinstance(value, Raw):
        return value.valid_json
    if isinstance(value, float):
        return not math.isnan(value)
    if isinstance(value, dict):
        return all(is_valid_json(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(is_valid_json(v) for v in value)
    return True


# --- valid messages, wide: bounds, unicode, big integers, offsets ---------------------------

tokens = st.text("0123456789abcdef", min_size=64, max_size=64)
finite = {"allow_nan": False, "allow_infinity": False}
offsets = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5)),
                           timezone(timedelta(hours=5, minutes=30)),
                           timezone(timedelta(hours=-9, minutes=-30))])
# Any whole UTC hour in the years 2-9998 (kept away from year 1 and 9999 so that every offset
# above stays inside datetime's range), written in some offset; the decoder keeps it in UTC.
hours = st.builds(
    lambda h, tz: (datetime(2, 1, 1, tzinfo=UTC) + timedelta(hours=h)).astimezone(tz),
    st.integers(0, 87_600_000), offsets)
positive_tokens = st.builds(PositiveToken, token=tokens, expires_at=hours)
any_text = st.text(max_size=80)
radii = st.floats(min_value=0.0, max_value=10_000, exclude_min=True, **finite) | st.just(10_000.0)


def bounded_text(max_size: int) -> st.SearchStrategy[str]:
    """Text up to ``max_size`` characters, at the bound now and then."""
    return st.one_of(st.text(max_size=min(max_size, 80)),
                     st.sampled_from(["x", "é", "\U0001f600", "\x00", "\n"]).map(
                         lambda c: c * max_size))


paddings = st.integers(0, 300).map(lambda n: " " * n)

VALID: dict[type, st.SearchStrategy[Any]] = {
    Hello: st.builds(Hello, session_id=uuid4s, radius_m=radii,
                     protocol=st.integers(1, 2**80)),
    Welcome: st.builds(Welcome, radius_m=radii,
                       position_timeout_s=st.floats(min_value=0, **finite),
                       protocol=st.integers(-(2**70), 2**70)),
    Position: st.builds(Position, latitude=st.floats(-90, 90, **finite),
                        longitude=st.floats(-180, 180, **finite),
                        accuracy_m=st.none() | st.floats(0, 100_000, **finite)),
    PositionLost: st.just(PositionLost()),
    Match: st.builds(Match, peer_session_id=uuid4s,
                     role=st.sampled_from(["initiator", "responder"])),
    Signal: st.builds(Signal, peer_session_id=uuid4s,
                      sdp_type=st.sampled_from(["offer", "answer"]),
                      sdp=st.text(min_size=1, max_size=200) | st.just("a" * 32_768)),
    PositiveUpload: st.builds(PositiveUpload, upload_id=uuid4s,
                              tokens=st.lists(positive_tokens, max_size=6),
                              code=st.none() | st.text(min_size=1, max_size=64),
                              decoy=st.booleans(), padding=paddings),
    PositiveAck: st.builds(PositiveAck, upload_id=uuid4s, count=st.integers(0, 2**80),
                           padding=paddings),
    PositivesPoll: st.builds(PositivesPoll, cursor=st.integers(0, 2**62),
                             accept=st.lists(st.text(min_size=1, max_size=16), max_size=8)),
    PositivesAvailable: st.builds(PositivesAvailable, cursor=st.integers(0, 2**62)),
    Positives: st.builds(Positives, cursor=st.integers(0, 2**62),
                         tokens=st.lists(positive_tokens, max_size=6), more=st.booleans()),
    Error: st.builds(Error, code=bounded_text(64), message=bounded_text(200),
                     field=st.none() | any_text),
    PeerHello: st.builds(PeerHello, version=st.integers(1, 2**31 - 1), contact_id=uuid4s,
                         min_contact_s=st.floats(0, 86_400, **finite),
                         radius_m=st.floats(min_value=0.001, max_value=10_000, **finite)),
    PeerPosition: st.builds(PeerPosition, latitude=st.floats(-90, 90, **finite),
                            longitude=st.floats(-180, 180, **finite),
                            accuracy_m=st.none() | st.floats(0, 100_000, **finite)),
    Heartbeat: st.just(Heartbeat()),
    Close: st.builds(Close, reason=st.text(max_size=200)),
    TokenOffer: st.builds(TokenOffer, token=tokens),
    TokenAck: st.builds(TokenAck, token=tokens),
    Abort: st.builds(Abort, reason=bounded_text(200)),
}


def test_every_message_type_is_fuzzed() -> None:
    assert set(VALID) == set(ALL_MESSAGES)
    assert all(channels_of(cls) for cls in ALL_MESSAGES)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_round_trip(cls: type) -> None:
    name = f"messages.round_trip.{cls.__name__}"

    @fuzz_settings(1)
    @given(message=VALID[cls])
    def run(message: Any) -> None:
        tried(name)
        text = encode(message)
        for channel in channels_of(cls):
            decode = CHANNELS[channel][0]
            assert decode(text) == message
            assert decode(text.encode("utf-8")) == message
            assert encode(decode(text)) == text  # one canonical text
        if isinstance(message, PositiveUpload | PositiveAck):
            size = UPLOAD_SIZE_BYTES if isinstance(message, PositiveUpload) else ACK_SIZE_BYTES
            padded = encode_padded(message, size)
            assert len(padded.encode("utf-8")) == size
            for channel in channels_of(cls):
                got = CHANNELS[channel][0](padded)
                assert msgspec.structs.replace(got, padding=message.padding) == message
                assert set(got.padding) <= {" "}
                assert encode_padded(got, size) == padded

    run()
    report(name)


def test_the_largest_valid_upload_fits_its_size_class() -> None:
    """500 tokens with the longest expiry text and a 64-character code of characters JSON
    escapes into 6 bytes each: still within UPLOAD_SIZE_BYTES, so padding never fails."""
    last_hour = datetime(9999, 12, 31, 23, tzinfo=UTC)
    upload = PositiveUpload(
        upload_id="ffffffff-ffff-4fff-bfff-ffffffffffff",
        tokens=[PositiveToken(token=f"{i:064x}", expires_at=last_hour)
                for i in range(MAX_TOKENS_PER_UPLOAD)],
        code="\x01" * 64, decoy=True)
    padded = encode_padded(upload, UPLOAD_SIZE_BYTES)
    assert len(padded.encode("utf-8")) == UPLOAD_SIZE_BYTES
    assert decode_client_message(padded).tokens == upload.tokens
    ack = PositiveAck(upload_id=upload.upload_id, count=2**200)
    assert len(encode_padded(ack, ACK_SIZE_BYTES).encode("utf-8")) == ACK_SIZE_BYTES


# --- (a) arbitrary bytes, (b) arbitrary JSON -------------------------------------------------

byte_soup = st.lists(st.sampled_from([
    b"{", b"}", b"[", b"]", b":", b",", b'"', b'"type"', b'"position"', b'"latitude"', b"1e999",
    b"-0", b"0.5", b"null", b"true", b"\\u", b"\\ud800", b"\xff", b"\xc3", b"\x00", b" ",
    b"\r\n", b'"tokens"', b'"expires_at"', b'"2026-12-14T04:00:00Z"', b"NaN", b"9" * 30,
]), max_size=40).map(b"".join)


# str input that has no UTF-8 form (lone surrogates): what a careless adapter could pass on.
surrogate_text = st.text(st.sampled_from(["\ud800", "\udfff", "{", "}", '"', ":", "a"])
                         | st.characters(exclude_categories=()), max_size=50)


def test_arbitrary_bytes() -> None:
    name = "messages.arbitrary_bytes"

    @fuzz_settings(5)
    @given(data=st.one_of(st.binary(max_size=2048), byte_soup,
                          st.text(max_size=500).map(lambda t: t.encode("utf-8")),
                          st.text(max_size=500), surrogate_text))
    def run(data: bytes | str) -> None:
        tried(name)
        for channel in CHANNELS:
            check_outcome(channel, data)

    run()
    report(name)


def test_text_with_lone_surrogates_is_refused_not_crashed() -> None:
    """Regression: a ``str`` holding a lone surrogate (no UTF-8 form) raised UnicodeEncodeError
    out of every decoder, and out of WitnessHandshake.receive_data."""
    for channel in CHANNELS:
        error = check_outcome(channel, '{"type":"abort","reason":"\ud800"}')
        assert isinstance(error, MessageError) and error.code == "bad_message"
        assert "UTF-8" in str(error)


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**200), 2**200),
    st.floats(), st.text(max_size=30),
    st.sampled_from([Raw("1e999"), Raw("-1e999"), Raw("-0.0"), Raw("1e-400"), Raw("1" + "0" * 400),
                     Raw("NaN", valid_json=False), Raw('"\\ud800"', valid_json=False)]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
ALL_FIELD_NAMES = sorted({f.name for cls in (*ALL_MESSAGES, PositiveToken)
                          for f in msgspec.structs.fields(cls)})
schema_objects = st.builds(
    lambda tag, fields, extra: {"type": tag, **fields, **extra},
    st.sampled_from(sorted(TAGS.values())) | st.text(max_size=10),
    st.dictionaries(st.sampled_from(ALL_FIELD_NAMES), json_values, max_size=6),
    st.dictionaries(st.text(max_size=8), json_values, max_size=1))


def test_arbitrary_json() -> None:
    name = "messages.arbitrary_json"

    @fuzz_settings(5)
    @given(value=json_values | schema_objects)
    def run(value: Any) -> None:
        tried(name)
        text = dump(value)
        for channel in CHANNELS:
            outcome = check_outcome(channel, text)
            if not isinstance(outcome, MessageError):
                assert isinstance(value, dict) and outcome.__struct_config__.tag == value["type"]
            elif outcome.code == "unknown_field":
                assert outcome.field is not None
            if not is_valid_json(value):
                assert isinstance(outcome, MessageError)

    run()
    report(name)


# --- (c) one mutation of a valid message ----------------------------------------------------


def field_paths(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(dotted path, containing object, key) for every field of a message's JSON object."""
    out: list[tuple[str, dict[str, Any], str]] = []
    for key, value in obj.items():
        if key == "type":
            continue
        out.append((key, obj, key))
        if key == "tokens" and isinstance(value, list):
            for index, item in enumerate(value):
                for sub in item:
                    out.append((f"tokens[{index}].{sub}", item, sub))
    return out


def object_paths(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(path prefix, object) for the message and each of its token objects."""
    out: list[tuple[str, dict[str, Any]]] = [("", obj)]
    for index, item in enumerate(obj.get("tokens", [])):
        out.append((f"tokens[{index}]", item))
    return out


def names_it(field: str | None, path: str) -> bool:
    """``field`` is ``path`` or a part of the value now at ``path``."""
    return field is not None and (field == path or field.startswith((path + ".", path + "[")))


GOOD_TOKEN_ITEM = {"token": "ab" * 32, "expires_at": "2026-12-14T04:00:00Z"}
deep = st.integers(2, 20_000).map(lambda n: Raw("[" * n + "]" * n))
long_strings = st.tuples(
    st.sampled_from([0, 1, 35, 36, 37, 63, 64, 65, 199, 200, 201, 32_768, 32_769, 65_536,
                     65_537, 200_000]),
    st.sampled_from([" ", "a", "0", "é", "\n", "\U0001f600", "`"]),
).map(lambda t: t[1] * t[0])
replacement_values = st.one_of(
    json_values, deep, long_strings,
    st.sampled_from([
        10**30, -(10**30), 2**63, 2**64, -(2**63) - 1, 1.7976931348623157e308, 5e-324, -0.0,
        0, 1, -1, 0.5, 90.0000001, -180.0000001, 100_000.0001, 10_000.0001,
        Raw("-0"), Raw("1e999"), Raw("-1e999"), Raw("1" + "0" * 5000), Raw("0.1e1"),
        Raw("NaN", valid_json=False), Raw("Infinity", valid_json=False),
        Raw('"\\u0000"'), Raw('"\\ud800"', valid_json=False), Raw('"\\udfff\\ud800"', False),
        "2026-12-14T04:00:00Z", "2026-12-14T04:00:00", "2026-12-14T04:30:00+00:30",
        "0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-01:00", "9999-12-31T23:59:59Z",
        "2026-02-30T04:00:00Z", "2026-12-14T24:00:00Z", "2026-12-14T04:00:60Z",
        "0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69", "0F6C7B2A-3D1E-4C5B-9A8F-1E2D3C4B5A69",
        "0f6c7b2a-3d1e-1c5b-9a8f-1e2d3c4b5a69", "ab" * 32, "AB" * 32, "ab" * 32 + "\n",
        "initiator", "responder", "offer", "answer", "", "   ", " \n", [], {},
        [GOOD_TOKEN_ITEM] * MAX_TOKENS_PER_UPLOAD, [GOOD_TOKEN_ITEM] * (MAX_TOKENS_PER_UPLOAD + 1),
        [GOOD_TOKEN_ITEM, 5], [dict(GOOD_TOKEN_ITEM, extra=1)], GOOD_TOKEN_ITEM,
    ]),
)
new_names = st.text(max_size=20).filter(lambda s: " - at `$" not in s)
suffixes = st.one_of(st.text(" \t\r\n", max_size=4), st.text(max_size=10),
                     st.sampled_from(["x", "{}", ',"a":1}', "\x00", "\n{}", "]", "0"]))


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.__name__)
def test_one_mutation_of_a_valid_message(cls: type) -> None:
    name = f"messages.mutation.{cls.__name__}"
    required = {f.name for f in msgspec.structs.fields(cls) if f.required} | {"type"}
    required_in_token = {"token", "expires_at"}

    @fuzz_settings(3)
    @given(message=VALID[cls], kind=st.sampled_from(
        ["drop", "add", "retag", "replace", "replace", "replace", "duplicate", "trailing"]),
        data=st.data())
    def run(message: Any, kind: str, data: st.DataObject) -> None:
        tried(name)
        obj = json.loads(encode(message))
        fields = field_paths(obj)
        expect_ok: bool | None = None  # None: either is fine
        expect_field: str | None = None  # the field a refusal must name
        text: str
        if kind == "drop":
            choices = [("type", obj, "type"), *fields]
            path, container, key = data.draw(st.sampled_from(choices))
            del container[key]
            is_required = key in (required_in_token if path.startswith("tokens[") else required)
            expect_ok, expect_field = (False, path) if is_required else (True, None)
            text = dump(obj)
        elif kind == "add":
            prefix, container = data.draw(st.sampled_from(object_paths(obj)))
            key = data.draw(new_names.filter(lambda s, c=container: s not in c and s != "type"))
            container[key] = data.draw(json_values.filter(is_valid_json))
            expect_ok, expect_field = False, f"{prefix}.{key}" if prefix else key
            text = dump(obj)
        elif kind == "retag":
            tag = data.draw(st.sampled_from(sorted(TAGS.values())) | json_values)
            obj["type"] = tag
            text = dump(obj)
        elif kind == "replace":
            assume(fields)
            path, container, key = data.draw(st.sampled_from(fields))
            value = data.draw(replacement_values)
            container[key] = value
            if not is_valid_json(value):
                expect_ok = False  # the whole text is not JSON: no field to name
            else:
                expect_field = path
            text = dump(obj)
        elif kind == "duplicate":
            # The same key twice: JSON says nothing, msgspec keeps the last. The earlier value
            # is still checked, so it is either refused by name or the original wins.
            assume(fields)
            path, container, key = data.draw(st.sampled_from(
                [f for f in fields if not f[0].startswith("tokens[")]))
            body = dump(obj)
            value = data.draw(replacement_values)
            text = "{" + f"{dump(key)}:{dump(value)}," + body[1:]
            if not is_valid_json(value):
                expect_ok = False
            elif not (isinstance(value, Raw) and value.text.startswith("[[")):
                expect_field = path
            # else: a deep value before "type" fails msgspec's look-ahead for the tag, which
            # cannot say whose value it was: "nested too deeply", no field.
        else:
            text = encode(message) + data.draw(suffixes)
            expect_ok = text.strip(" \t\r\n") == encode(message)
        channel = data.draw(st.sampled_from(channels_of(cls)))
        as_bytes = data.draw(st.booleans())
        outcome = check_outcome(channel, text.encode("utf-8", "surrogatepass") if as_bytes
                                else text)
        refused = isinstance(outcome, MessageError)
        event(f"{kind}: {'refused, ' + outcome.code if refused else 'accepted'}")
        if expect_ok is not None:
            assert refused is not expect_ok, (kind, text[:300], outcome)
        if refused and expect_field is not None:
            assert names_it(outcome.field, expect_field), (kind, expect_field, outcome.field,
                                                            str(outcome)[:300])
        if kind == "add":
            assert outcome.code == "unknown_field"
        if kind == "trailing" and refused:
            assert (outcome.code, outcome.field) == ("bad_message", None)
        if not refused:
            if kind == "retag":
                assert outcome.__struct_config__.tag == obj["type"]
            elif kind == "duplicate" or (kind == "trailing"):
                assert outcome == message
            else:
                assert type(outcome) is cls

    run()
    report(name)


# --- regressions found by this suite ---------------------------------------------------------

SID = "0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69"


@pytest.mark.parametrize("expires_at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-01:00",
                                        "9999-12-31T23:00:00-23:59"])
def test_expiry_outside_the_utc_calendar_is_a_field_error(expires_at: str) -> None:
    """Regression: an expiry whose UTC instant falls outside years 1-9999 raised OverflowError
    (a traceback in the broker's handler) instead of a MessageError naming the field."""
    for channel, tag in (("client", "positive_upload"), ("broker", "positives")):
        obj: dict[str, Any] = {"type": tag, "tokens": [{"token": "ab" * 32,
                                                         "expires_at": expires_at}]}
        obj |= {"upload_id": SID} if tag == "positive_upload" else {"cursor": 1}
        error = check_outcome(channel, json.dumps(obj))
        assert isinstance(error, MessageError)
        assert (error.code, error.field) == ("bad_message", "tokens[0].expires_at")
        assert "years 1-9999" in str(error)


def test_padding_is_spaces_only_even_with_a_trailing_newline() -> None:
    """Regression: the padding pattern ``^ *$`` let ``"  \\n"`` through ("$" matches before a
    final newline), so padding was not "spaces only" as documented."""
    for padding in ["  \n", "\n", " " * 10 + "\n"]:
        for obj, channel in (
                ({"type": "positive_ack", "upload_id": SID, "count": 1}, "broker"),
                ({"type": "positive_upload", "upload_id": SID, "tokens": []}, "client")):
            error = check_outcome(channel, json.dumps(obj | {"padding": padding}))
            assert isinstance(error, MessageError)
            assert (error.code, error.field) == ("bad_message", "padding")


def test_deep_nesting_before_the_type_tag_is_refused_not_crashed() -> None:
    """Regression: msgspec raised RecursionError (not a DecodeError) when it had to skip a
    deeply nested value while looking ahead for the ``type`` tag; it escaped every decoder."""
    for depth in (1_000, 3_000, 100_000):
        text = '{"x":' + "[" * depth + "]" * depth + ',"type":"abort","reason":"r"}'
        for channel in CHANNELS:
            error = check_outcome(channel, text)
            assert isinstance(error, MessageError) and error.code == "bad_message"


@pytest.mark.parametrize("name", ["a`b", "`", "``", "x\ny", "with ` - tick", "é`\U0001f600"])
def test_unknown_field_with_backticks_or_newlines_is_named_whole(name: str) -> None:
    """Regression: an unknown field named ``a`b`` was reported as ``a``."""
    error = check_outcome("peer", json.dumps({"type": "abort", "reason": "x", name: 1}))
    assert isinstance(error, MessageError)
    assert (error.code, error.field) == ("unknown_field", name)
    nested = json.dumps({"type": "positive_upload", "upload_id": SID,
                         "tokens": [dict(GOOD_TOKEN_ITEM, **{name: 1})]})
    error = check_outcome("client", nested)
    assert isinstance(error, MessageError)
    assert (error.code, error.field) == ("unknown_field", f"tokens[0].{name}")
