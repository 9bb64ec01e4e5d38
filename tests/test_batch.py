"""The binary ``batch1`` form of positive tokens (fanny_tui/protocol/batch.py).

The test vector is the one in docs/protocol.md ("Positive batches"): another implementation
checks itself against the same bytes.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from fanny_tui.protocol.batch import (
    EndFrame,
    TokenFrame,
    decode_batch_frame,
    encode_end_frame,
    encode_token_frame,
    group_by_hour,
)
from fanny_tui.protocol.errors import MessageError

HOUR = int(datetime(2026, 12, 14, 4, tzinfo=UTC).timestamp()) // 3600   # 499228
A, B, C = bytes(range(32)), bytes(range(32, 64)), b"\xff" * 32

VECTOR_TOKENS = bytes.fromhex(
    "0101000000000000002a"            # version 1, kind 1 (tokens), cursor 42
    "00079e1c"                        # base: expiry hour 499228 (2026-12-14T04:00Z)
    "02"                              # 2 groups
    "0002"                            # delta 0 (04:00Z), 2 tokens
    + A.hex() + B.hex()
    + "0101"                          # delta 1 (05:00Z), 1 token
    + C.hex())
VECTOR_END = bytes.fromhex("0102000000000000002a00")   # version 1, kind 2 (end), cursor 42


def test_the_documented_vector_encodes_and_decodes():
    assert HOUR == 499228
    frame = encode_token_frame(42, [(A, HOUR), (B, HOUR), (C, HOUR + 1)])
    assert frame == VECTOR_TOKENS
    decoded = decode_batch_frame(VECTOR_TOKENS)
    assert decoded == TokenFrame(cursor=42, groups=((HOUR, (A, B)), (HOUR + 1, (C,))))
    assert decoded.token_count == 3
    assert decoded.hex_tokens() == [A.hex(), B.hex(), C.hex()]
    assert encode_end_frame(42) == VECTOR_END
    assert decode_batch_frame(VECTOR_END) == EndFrame(cursor=42, more=False)
    assert decode_batch_frame(encode_end_frame(7, more=True)) == EndFrame(cursor=7, more=True)


def test_a_token_costs_at_most_33_bytes_and_an_empty_answer_11():
    # A realistic board: 15 days of expiry hours, tokens spread over them.
    n = 8192
    rows = [(os.urandom(32), HOUR + i * 360 // n) for i in range(n)]
    frame = encode_token_frame(n, rows)
    assert len(frame) / n <= 33.0
    assert len(frame) == 14 + 2 + 360 * 2 + 32 * n   # header, one group per hour, raw tokens
    assert len(encode_end_frame(2**62)) == 11


def test_tokens_are_grouped_by_hour_in_increasing_order():
    rows = [(A, HOUR + 300), (B, HOUR), (C, HOUR + 300)]
    decoded = decode_batch_frame(encode_token_frame(3, rows))
    assert isinstance(decoded, TokenFrame)
    assert decoded.groups == ((HOUR, (B,)), (HOUR + 300, (A, C)))
    # A delta over 127 hours takes a 2-byte varint: 300 = 0xac 0x02.
    assert bytes.fromhex("ac0202") in encode_token_frame(3, rows)


def test_group_by_hour_takes_board_rows():
    assert group_by_hour([(A.hex(), HOUR * 3600)]) == [(A, HOUR)]
    with pytest.raises(ValueError, match="not on a UTC hour"):
        group_by_hour([(A.hex(), HOUR * 3600 + 1)])


@pytest.mark.parametrize(("cursor", "rows", "match"), [
    (1, [], "at least one token"),
    (1, [(b"\x00" * 31, HOUR)], "32 bytes"),
    (-1, [(A, HOUR)], "cursor"),
    (2**62 + 1, [(A, HOUR)], "cursor"),
    (1, [(A, 2**32)], "expiry hour"),
])
def test_encoding_refuses_what_the_format_cannot_carry(cursor, rows, match):
    with pytest.raises(ValueError, match=match):
        encode_token_frame(cursor, rows)


def _tokens_frame(body: str) -> bytes:
    return VECTOR_TOKENS[:14] + bytes.fromhex(body)


@pytest.mark.parametrize(("data", "field"), [
    (b"", "version"),
    (VECTOR_END[:9], "version"),
    (VECTOR_END[:10], "flags"),
    (b"\x02" + VECTOR_END[1:], "version"),
    (VECTOR_END[:1] + b"\x03" + VECTOR_END[2:], "kind"),
    (VECTOR_END + b"\x00", "flags"),
    (VECTOR_END[:-1] + b"\x02", "flags"),
    (bytes.fromhex("0102") + (2**62 + 1).to_bytes(8, "big") + b"\x00", "cursor"),
    (VECTOR_TOKENS[:12], "base"),
    (VECTOR_TOKENS[:14], "groups"),
    (_tokens_frame("00"), "groups"),
    (_tokens_frame("8000"), "groups"),                       # not the shortest form
    (_tokens_frame("ffffffffff01"), "groups"),               # longer than 5 bytes
    (_tokens_frame("01"), "groups[0].delta"),
    (_tokens_frame("0101"), "groups[0].delta"),              # the first delta is 0
    (_tokens_frame("0100"), "groups[0].count"),
    (_tokens_frame("0200" + "01" + A.hex() + "0001" + B.hex()), "groups[1].delta"),
    (VECTOR_TOKENS[:-1], "groups[1].tokens"),
    (VECTOR_TOKENS + b"\x00", "groups"),
])
def test_a_malformed_frame_is_refused_naming_the_part(data, field):
    with pytest.raises(MessageError) as caught:
        decode_batch_frame(data)
    assert caught.value.field == field
