"""Every FANNY wire message: typed, frozen, validated on decode.

Messages are JSON objects with a ``type`` discriminator, encoded and validated with msgspec.
Three channels carry them (docs/protocol.md has the full table):

* **session** connection, client <-> broker, opened with :class:`Hello`: positions, matches and
  signaling (paper section 3, steps 2-3). Carries the session ID, never a contact ID or token.
* **anonymous** connection, client <-> broker, opened with :class:`PositiveUpload` or
  :class:`PositivesPoll`: carries no session ID (paper section 4, steps 2-4).
* **data channel**, peer <-> peer (WebRTC, RFC 8831), version :data:`DATA_CHANNEL_VERSION`:
  contact IDs, positions and heartbeats while in contact, the token and its ack, the close
  (paper section 3, steps 4-5). Never through the broker.

Units: latitude/longitude in WGS84 decimal degrees, distances and accuracy in metres, durations
in seconds, instants as RFC 3339 / ISO 8601 UTC text (``2026-12-14T04:00:00Z``).

Decoding unknown types, unknown fields, wrong types or out-of-range values raises
:class:`~fanny_tui.protocol.errors.MessageError` naming the field.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
import msgspec.structs
from msgspec import Meta

from .errors import MessageError
from .expiry import is_on_the_hour

PROTOCOL_VERSION = 1

UUID4_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
TOKEN_PATTERN = r"^[0-9a-f]{64}$"

# The exact lengths matter: Python's "$" also matches before a trailing newline.
_UUID_LEN = {"min_length": 36, "max_length": 36}
SessionId = Annotated[str, Meta(pattern=UUID4_PATTERN, **_UUID_LEN,
                                description="UUIDv4, canonical text")]
ContactId = Annotated[str, Meta(pattern=UUID4_PATTERN, **_UUID_LEN,
                                description="UUIDv4, canonical text")]
UploadId = Annotated[str, Meta(pattern=UUID4_PATTERN, **_UUID_LEN,
                               description="UUIDv4, fresh per declaration")]
Token = Annotated[str, Meta(pattern=TOKEN_PATTERN, min_length=64, max_length=64,
                            description="64 lowercase hex characters")]
Latitude = Annotated[float, Meta(ge=-90.0, le=90.0, description="WGS84 degrees")]
Longitude = Annotated[float, Meta(ge=-180.0, le=180.0, description="WGS84 degrees")]
AccuracyM = Annotated[float, Meta(ge=0.0, le=100_000.0, description="metres, 95 %")]
RadiusM = Annotated[float, Meta(gt=0.0, le=10_000.0, description="metres")]
UtcInstant = Annotated[datetime, Meta(tz=True, description="RFC 3339, UTC")]
Sdp = Annotated[str, Meta(min_length=1, max_length=32_768)]
Reason = Annotated[str, Meta(max_length=200)]
Cursor = Annotated[int, Meta(ge=0, le=2**62)]
Count = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(ge=0.0)]
Role = Literal["initiator", "responder"]
SdpType = Literal["offer", "answer"]

MAX_TOKENS_PER_UPLOAD = 500
"""Most tokens one upload may carry; a larger declaration goes in several uploads."""
UPLOAD_SIZE_BYTES = 65_536
"""Every positive upload is padded to exactly this many bytes of JSON (one size class)."""
ACK_SIZE_BYTES = 256
"""Every positive ack is padded to exactly this many bytes of JSON."""
DeclarationCode = Annotated[str, Meta(min_length=1, max_length=64)]
DeclarationSecret = Annotated[str, Meta(pattern=TOKEN_PATTERN, min_length=64, max_length=64,
                                        description="64 lowercase hex characters, 256 random "
                                                    "bits, fresh per declaration")]
# "\Z", not "$": "$" also matches before a trailing newline, and padding is spaces only.
Padding = Annotated[str, Meta(max_length=UPLOAD_SIZE_BYTES, pattern=r"^ *\Z")]


class _Message(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", kw_only=True
):
    """Base of every message; ``type`` is the tag."""


# --- session connection (paper section 3, steps 1-3) ---------------------------------------


class Hello(_Message, tag="hello"):
    """Client -> broker, first message of a session connection (step 1-2).

    ``radius_m``: the distance under which this device wants a witness; the broker matches
    two sessions within the smaller of their radii (capped by the broker's maximum).
    """

    session_id: SessionId
    radius_m: RadiusM
    protocol: Annotated[int, Meta(ge=1)] = PROTOCOL_VERSION


class Welcome(_Message, tag="welcome"):
    """Broker -> client, answer to :class:`Hello`: the effective parameters."""

    radius_m: RadiusM
    position_timeout_s: Seconds
    protocol: int = PROTOCOL_VERSION


class Position(_Message, tag="position"):
    """Client -> broker: latest position (step 2). Never stored, never logged by the broker."""

    latitude: Latitude
    longitude: Longitude
    accuracy_m: AccuracyM | None = None


class PositionLost(_Message, tag="position_lost"):
    """Client -> broker: the GPS fix is lost; drop my position now (no stale position)."""


class Match(_Message, tag="match"):
    """Broker -> both clients: another session is within radius (step 3).

    ``role``: ``initiator`` opens the data channel and crafts the token; ``responder`` answers.
    Deterministic: the lexicographically smaller session ID is the initiator.
    """

    peer_session_id: SessionId
    role: Role


class Signal(_Message, tag="signal"):
    """Signaling relayed by the broker between matched sessions (step 3, WebRTC JSEP).

    Client -> broker: ``peer_session_id`` is the destination. Broker -> client: it is the
    source. ``sdp`` is opaque to the broker (RFC 8866 text with every ICE candidate: aiortc
    does not trickle).
    """

    peer_session_id: SessionId
    sdp_type: SdpType
    sdp: Sdp


# --- anonymous connection (paper section 4) ------------------------------------------------


class PositiveToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One token of a positive declaration with its expiry (section 4, step 2)."""

    token: Token
    expires_at: UtcInstant

    def __post_init__(self) -> None:
        try:
            utc = self.expires_at.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:00:00-01:00 is in year 10000 in UTC
            raise ValueError("expires_at must be within years 1-9999 in UTC") from None
        if not is_on_the_hour(utc):
            raise ValueError("expires_at must be on a UTC hour (HH:00:00)")
        if self.expires_at.utcoffset() != UTC.utcoffset(None):
            msgspec.structs.force_setattr(self, "expires_at", utc)


class PositiveUpload(_Message, tag="positive_upload"):
    """Anonymous client -> broker: the tokens of a positive declaration (section 4, step 2).

    ``upload_id`` is a fresh random UUIDv4 per declaration, unrelated to any session ID; a
    retry reuses it so the broker answers it idempotently.

    ``code``: the single-use declaration code (paper section 5), as typed; required unless the
    broker runs with open declarations. ``declaration``: the declaration secret
    (:func:`~fanny_tui.protocol.codes.new_declaration`), the same in every upload of one
    declaration, only with a ``code``: the first commit binds the code to it, and the broker
    accepts the code again only with it (a code is one declaration). ``decoy``: a cover upload
    the broker answers like any other and then discards. ``padding``: spaces that bring every
    upload to the same size (:data:`UPLOAD_SIZE_BYTES`), so its size does not tell how many
    tokens it holds.

    Raises (on decode):
        MessageError: field ``declaration`` when it comes without a ``code``.
    """

    upload_id: UploadId
    tokens: Annotated[list[PositiveToken], Meta(max_length=MAX_TOKENS_PER_UPLOAD)]
    code: DeclarationCode | None = None
    declaration: DeclarationSecret | None = None
    decoy: bool = False
    padding: Padding = ""

    def __post_init__(self) -> None:
        if self.declaration is not None and self.code is None:
            raise ValueError("declaration must come with a code")


class PositiveAck(_Message, tag="positive_ack"):
    """Broker -> client: the upload is durably committed; the device may delete its tokens.

    ``padding`` makes every ack the same size (:data:`ACK_SIZE_BYTES`).
    """

    upload_id: UploadId
    count: Count
    padding: Padding = ""


PositivesFormat = Annotated[str, Meta(min_length=1, max_length=16)]


class PositivesPoll(_Message, tag="positives_poll", omit_defaults=True):
    """Anonymous client -> broker: positive tokens published after ``cursor`` (step 3).

    ``accept``: the answer formats this device reads, preferred first. A broker that knows
    ``batch1`` (:mod:`fanny_tui.protocol.batch`) answers in binary frames, the whole board
    after ``cursor`` in one answer; otherwise (and when ``accept`` is empty) it answers one
    JSON :class:`Positives` page, the form kept for debugging. Fields at their default are
    left out of the JSON (a poll without ``accept`` is what brokers before it understand).
    """

    cursor: Cursor = 0
    accept: Annotated[list[PositivesFormat], Meta(max_length=8)] = []


class Positives(_Message, tag="positives"):
    """Broker -> client: positive tokens after the poll's cursor (section 4, step 4).

    ``cursor``: pass it in the next poll. ``more``: another poll now would return more.
    """

    cursor: Cursor
    tokens: list[PositiveToken]
    more: bool = False


class PositivesAvailable(_Message, tag="positives_available"):
    """Broker -> every session connection: new positive tokens were published (section 4).

    The same message goes to every connected session at once (it reveals nothing about any of
    them); ``cursor`` is the board's cursor after the new batch. A device that is behind it
    polls on its *anonymous* connection after a random delay, so that the poll is not timed
    to its session.
    """

    cursor: Cursor


class Error(_Message, tag="error"):
    """Broker -> client: a request was refused. ``field`` names the failing field if any.

    ``padding``: spaces that bring every answer to a ``positive_upload`` (refusal or ack) to
    the same size (:data:`ACK_SIZE_BYTES`), so its size does not tell a refused upload from an
    acknowledged one; other errors are not padded.
    """

    code: Annotated[str, Meta(max_length=64)]
    message: Reason
    field: str | None = None
    padding: Padding = ""


# --- data channel, peer to peer (paper section 3, steps 4-5; docs/protocol.md) ------------


DATA_CHANNEL_VERSION = 2
"""The data channel protocol version this kit speaks (``peer_hello.version``). Version 1 (the
``contact_id`` message, token at once) is gone; a later version may add fields and messages."""

MinContactS = Annotated[float, Meta(ge=0.0, le=86_400.0, description="seconds")]
Version = Annotated[int, Meta(ge=1, le=2**31 - 1)]


class PeerHello(_Message, tag="peer_hello"):
    """Peer -> peer: the first message of each side once the data channel is open (step 4).

    ``version``: the highest data channel version the sender speaks
    (:data:`DATA_CHANNEL_VERSION`); the pair speaks the lower of the two, and a side aborts
    (``unsupported_version``) only when that is below the lowest it speaks (docs/protocol.md,
    "Versions"). The fields of this message are the same in every version.
    ``contact_id``: the sender's contact ID. ``min_contact_s`` (seconds) and ``radius_m``
    (metres): the sender's narrow contact setting; the pair uses the larger ``min_contact_s``
    and the smaller ``radius_m``.
    """

    version: Version
    contact_id: ContactId
    min_contact_s: MinContactS
    radius_m: RadiusM


class PeerPosition(_Message, tag="peer_position"):
    """Peer -> peer: the sender's latest fix, every ``position_interval_s`` while the channel is
    open (never through the broker)."""

    latitude: Latitude
    longitude: Longitude
    accuracy_m: AccuracyM | None = None


class Heartbeat(_Message, tag="heartbeat"):
    """Peer -> peer: sent instead of ``peer_position`` when the sender has no fix."""


class TokenOffer(_Message, tag="token"):
    """Initiator -> responder: the token it crafted, once the pair's time within the radius
    reached the effective ``min_contact_s`` (steps 4-5)."""

    token: Token


class TokenAck(_Message, tag="ack"):
    """Responder -> initiator: the token is stored (or already was) on my side (step 5)."""

    token: Token


class Close(_Message, tag="close"):
    """Either peer: the contact ended normally; both close the channel.

    ``reason``: ``parted`` (no sample within the radius for ``contact_gap_s``),
    ``max_contact`` (``max_contact_s`` reached), ``channel_lost`` (nothing heard for the
    heartbeat time-out) or ``stopped`` (the app stops).
    """

    reason: Reason


class Abort(_Message, tag="abort"):
    """Either peer: the exchange is abandoned (a failure), with a short reason."""

    reason: Reason


ClientToBroker = Hello | Position | PositionLost | Signal | PositiveUpload | PositivesPoll
BrokerToClient = (Welcome | Match | Signal | PositiveAck | Positives | PositivesAvailable
                  | Error)
PeerMessage = PeerHello | PeerPosition | Heartbeat | TokenOffer | TokenAck | Close | Abort

_encoder = msgspec.json.Encoder()
_client_decoder = msgspec.json.Decoder(ClientToBroker)
_broker_decoder = msgspec.json.Decoder(BrokerToClient)
_peer_decoder = msgspec.json.Decoder(PeerMessage)
# The unknown name is the sender's and may hold backticks or newlines: all between the
# first and last backtick (once the " - at `$...`" suffix is cut off) is the name.
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(.*)`$", re.DOTALL)
_MISSING_RE = re.compile(r"^Object missing required field `([^`]*)`")
_OWN_CHECK_RE = re.compile(r"^([a-z_][a-z0-9_]*) must ")  # our __post_init__ checks: "<field> must"
_FIELD_RE = re.compile(r" - at `\$((?:\.[A-Za-z_]\w*|\[\d+\])*)`$")


def encode(message: msgspec.Struct) -> str:
    """Encode a message as compact JSON text (one WebSocket text frame)."""
    return _encoder.encode(message).decode("utf-8")


def encode_padded(message: PositiveUpload | PositiveAck | Error, size: int) -> str:
    """Encode ``message`` with its ``padding`` filled so the JSON text is exactly ``size`` bytes.

    Raises:
        ValueError: the message is already larger than ``size`` without padding.
    """
    bare = encode(msgspec.structs.replace(message, padding=""))
    missing = size - len(bare.encode("utf-8"))
    if missing < 0:
        raise ValueError(f"{message_type(message)} is {size - missing} bytes, over {size}")
    return encode(msgspec.structs.replace(message, padding=" " * missing))


def _decode(decoder: msgspec.json.Decoder, data: str | bytes, channel: str):  # type: ignore[no-untyped-def]
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        found = _FIELD_RE.search(text)
        field = found.group(1).lstrip(".") if found else None
        if text.startswith("Invalid value") and "`$.type`" in text:
            raise MessageError(f"unknown {channel} message type", field="type",
                               code="unknown_type") from None
        unknown = _UNKNOWN_RE.match(text[:found.start()] if found else text)
        if unknown:
            name = unknown.group(1)
            raise MessageError(text, field=f"{field}.{name}" if field else name,
                               code="unknown_field") from None
        # A missing field, or one of our own checks, names the field itself, not its object.
        named = _MISSING_RE.match(text) or _OWN_CHECK_RE.match(text)
        if named:
            name = named.group(1)
            field = f"{field}.{name}" if field else name
        raise MessageError(text, field=field) from None
    except msgspec.DecodeError as exc:
        raise MessageError(f"not valid JSON: {exc}") from None
    except RecursionError:  # msgspec skipping a deeply nested value while it looks for "type"
        raise MessageError("not valid JSON: nested too deeply") from None
    except UnicodeError:  # bytes that are not UTF-8, or a str with lone surrogates
        raise MessageError("not valid UTF-8") from None


def decode_client_message(data: str | bytes) -> ClientToBroker:
    """Decode a message the broker received from a client.

    Raises:
        MessageError: invalid JSON, unknown type or field, wrong type or value (``field`` set).
    """
    return _decode(_client_decoder, data, "client")  # type: ignore[no-any-return]


def decode_broker_message(data: str | bytes) -> BrokerToClient:
    """Decode a message a client received from the broker.

    Raises:
        MessageError: as :func:`decode_client_message`.
    """
    return _decode(_broker_decoder, data, "broker")  # type: ignore[no-any-return]


def decode_peer_message(data: str | bytes) -> PeerMessage:
    """Decode a message received from a peer over the data channel.

    Raises:
        MessageError: as :func:`decode_client_message`.
    """
    return _decode(_peer_decoder, data, "peer")  # type: ignore[no-any-return]


def message_type(message: msgspec.Struct) -> str:
    """The wire ``type`` tag of a message instance."""
    return str(type(message).__struct_config__.tag)


ALL_MESSAGES: tuple[type[_Message], ...] = (
    Hello, Welcome, Position, PositionLost, Match, Signal, PositiveUpload, PositiveAck,
    PositivesPoll, Positives, PositivesAvailable, Error, PeerHello, PeerPosition, Heartbeat,
    TokenOffer, TokenAck, Close, Abort,
)
