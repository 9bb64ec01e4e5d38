"""The binary batch form of positive tokens, ``batch1`` (paper section 4, step 4).

A device that lists ``batch1`` in ``positives_poll.accept`` gets its answer as WebSocket
**binary** frames instead of one JSON ``positives`` message: zero or more *token frames*, then
exactly one *end frame*. All integers are unsigned big-endian. docs/protocol.md ("Positive
batches") has the same layout with a test vector.

Token frame (kind 1)::

    offset  size  field
    0       1     version: 1
    1       1     kind: 1
    2       8     cursor: the board cursor after this frame's tokens (u64)
    10      4     base: the expiry of the first group, whole hours since 1970-01-01T00:00Z (u32)
    14      var   G: number of expiry groups, >= 1 (varint)
    then G groups, in strictly increasing expiry:
            var   delta: this group's expiry hour minus the previous group's (the first
                  group's: minus ``base``, so 0); >= 1 after the first group (varint)
            var   N: number of tokens in the group, >= 1 (varint)
            32*N  the tokens, 32 raw bytes each (the SHA-256 output, not hex)

A varint is unsigned LEB128: 7 bits a byte, least significant first, the high bit set on every
byte but the last; at most 5 bytes, value < 2**32, no superfluous trailing 0x80 bytes.
Within a frame tokens are grouped by expiry, so their order in the frame means nothing; the
frame's cursor covers them all.

End frame (kind 2)::

    0       1     version: 1
    1       1     kind: 2
    2       8     cursor: pass it in the next poll (u64)
    10      1     flags: bit 0 ``more`` (the broker stopped early: poll again now); other bits 0

A token costs 32 bytes plus its share of the frame header (14 bytes and the group count) and
of its group's 2 to 10 bytes (usually 2: every token of one expiry hour shares one group, and
a board holds at most 16 days x 24 hours of them); a poll with nothing new is answered by one
11-byte end frame.

Pure: no I/O. Decoding a malformed frame raises :class:`~fanny_tui.protocol.errors.MessageError`
naming the field.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import MessageError

BATCH_FORMAT = "batch1"
"""The name of this format in ``positives_poll.accept``."""
BATCH_VERSION = 1
KIND_TOKENS = 1
KIND_END = 2
TOKEN_BYTES = 32
MAX_CURSOR = 2**62
"""The largest cursor (the JSON ``positives_poll.cursor`` bound)."""

_HEAD = struct.Struct(">BBQ")       # version, kind, cursor
_BASE = struct.Struct(">I")         # the first group's expiry hour
_END_FLAGS = struct.Struct(">B")
_MAX_HOUR = 0xFFFFFFFF
_FLAG_MORE = 0x01


@dataclass(frozen=True)
class TokenFrame:
    """A decoded token frame.

    Attributes:
        cursor: the board cursor after these tokens.
        groups: ``(expiry_hour, tokens)`` pairs; ``expiry_hour`` is whole hours since the Unix
            epoch (UTC; the expiry instant is ``expiry_hour * 3600`` seconds), ``tokens`` the
            32-byte raw tokens.
    """

    cursor: int
    groups: tuple[tuple[int, tuple[bytes, ...]], ...]

    @property
    def token_count(self) -> int:
        """Tokens in the frame."""
        return sum(len(tokens) for _, tokens in self.groups)

    def hex_tokens(self) -> list[str]:
        """The tokens as 64 lowercase hex characters (the form of the JSON messages)."""
        return [t.hex() for _, tokens in self.groups for t in tokens]


@dataclass(frozen=True)
class EndFrame:
    """A decoded end frame: ``cursor`` for the next poll; ``more``: poll again now."""

    cursor: int
    more: bool = False


def _check_cursor(cursor: int) -> None:
    if isinstance(cursor, bool) or not isinstance(cursor, int) or not 0 <= cursor <= MAX_CURSOR:
        raise ValueError(f"cursor must be an integer in 0..2**62, got {cursor!r}")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(view: memoryview, at: int, field: str) -> tuple[int, int]:
    value = shift = 0
    for i in range(5):
        if at + i >= len(view):
            raise MessageError("token frame cut in a varint", field=field)
        byte = view[at + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if (byte == 0 and i > 0) or value > _MAX_HOUR:
                raise MessageError("a varint is not in its shortest form or over 2**32-1",
                                   field=field)
            return value, at + i + 1
    raise MessageError("a varint longer than 5 bytes", field=field)


def encode_token_frame(cursor: int, tokens: Iterable[tuple[bytes, int]]) -> bytes:
    """Encode one token frame.

    Args:
        cursor: the board cursor after these tokens (0..2**62).
        tokens: ``(token, expiry_hour)`` pairs: ``token`` 32 raw bytes, ``expiry_hour`` whole
            hours since the Unix epoch. They are grouped by hour (groups in increasing hour,
            tokens of a group in the order given).

    Returns:
        The frame bytes.

    Raises:
        ValueError: no token, a token not 32 bytes, an hour out of 0..2**32-1, or a bad
            cursor.
    """
    _check_cursor(cursor)
    groups: dict[int, list[bytes]] = {}
    for token, hour in tokens:
        if len(token) != TOKEN_BYTES:
            raise ValueError(f"a token is {TOKEN_BYTES} bytes, got {len(token)}")
        group = groups.get(hour)
        if group is None:
            if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= _MAX_HOUR:
                raise ValueError(f"expiry hour out of range: {hour!r}")
            groups[hour] = group = []
        group.append(token)
    if not groups:
        raise ValueError("a token frame holds at least one token")
    hours = sorted(groups)
    parts = [_HEAD.pack(BATCH_VERSION, KIND_TOKENS, cursor), _BASE.pack(hours[0]),
             _varint(len(hours))]
    previous = hours[0]
    for hour in hours:
        group = groups[hour]
        parts.append(_varint(hour - previous) + _varint(len(group)))
        parts.extend(group)
        previous = hour
    return b"".join(parts)


def encode_end_frame(cursor: int, more: bool = False) -> bytes:
    """Encode the end frame of a poll's answer (11 bytes).

    Raises:
        ValueError: a bad cursor.
    """
    _check_cursor(cursor)
    return _HEAD.pack(BATCH_VERSION, KIND_END, cursor) + _END_FLAGS.pack(
        _FLAG_MORE if more else 0)


def decode_batch_frame(data: bytes) -> TokenFrame | EndFrame:
    """Decode one binary frame of a ``batch1`` answer.

    Raises:
        MessageError: a short or long frame, an unknown version or kind, a cursor over 2**62,
            an empty group, unknown flags (``field`` names the part).
    """
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise MessageError(f"batch frame of {len(view)} bytes, shorter than its header",
                           field="version")
    version, kind, cursor = _HEAD.unpack_from(view, 0)
    if version != BATCH_VERSION:
        raise MessageError(f"unsupported batch version {version}", field="version")
    if cursor > MAX_CURSOR:
        raise MessageError("cursor over 2**62", field="cursor")
    at = _HEAD.size
    if kind == KIND_END:
        if len(view) != at + _END_FLAGS.size:
            raise MessageError("an end frame is 11 bytes", field="flags")
        (flags,) = _END_FLAGS.unpack_from(view, at)
        if flags & ~_FLAG_MORE:
            raise MessageError(f"unknown end frame flags {flags:#04x}", field="flags")
        return EndFrame(cursor=cursor, more=bool(flags & _FLAG_MORE))
    if kind != KIND_TOKENS:
        raise MessageError(f"unknown batch frame kind {kind}", field="kind")
    if len(view) < at + _BASE.size:
        raise MessageError("token frame cut before its base hour", field="base")
    (hour,) = _BASE.unpack_from(view, at)
    count, at = _read_varint(view, at + _BASE.size, "groups")
    if count == 0:
        raise MessageError("a token frame has at least one group", field="groups")
    groups: list[tuple[int, tuple[bytes, ...]]] = []
    for i in range(count):
        delta, at = _read_varint(view, at, f"groups[{i}].delta")
        if i and delta == 0:
            raise MessageError(f"group {i} does not follow the previous group's hour",
                               field=f"groups[{i}].delta")
        if i == 0 and delta != 0:
            raise MessageError("the first group's delta is 0", field="groups[0].delta")
        hour += delta
        if hour > _MAX_HOUR:
            raise MessageError(f"group {i}'s hour is over 2**32-1", field=f"groups[{i}].delta")
        n, at = _read_varint(view, at, f"groups[{i}].count")
        if n == 0:
            raise MessageError(f"group {i} holds no token", field=f"groups[{i}].count")
        end = at + n * TOKEN_BYTES
        if len(view) < end:
            raise MessageError(f"token frame cut in group {i}", field=f"groups[{i}].tokens")
        raw = bytes(view[at:end])
        groups.append((hour, tuple(raw[j:j + TOKEN_BYTES]
                                   for j in range(0, len(raw), TOKEN_BYTES))))
        at = end
    if at != len(view):
        raise MessageError(f"{len(view) - at} bytes after the last group", field="groups")
    return TokenFrame(cursor=cursor, groups=tuple(groups))


def group_by_hour(rows: Sequence[tuple[str, int]]) -> list[tuple[bytes, int]]:
    """``(hex token, expiry in Unix seconds)`` rows -> ``(raw token, expiry hour)`` pairs.

    Raises:
        ValueError: a token that is not 64 hex characters, or an expiry not on the hour.
    """
    out = []
    for token, expires_at in rows:
        hour, rest = divmod(expires_at, 3600)
        if rest:
            raise ValueError(f"expiry {expires_at} is not on a UTC hour")
        out.append((bytes.fromhex(token), hour))
    return out
