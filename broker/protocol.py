"""One broker connection, sans I/O: kinds, refusals, limits and deadlines (paper sections 3-4).

The shape of :mod:`fanny_tui.protocol.handshake`, h11's ``Connection`` and websockets'
``ServerProtocol``: :class:`BrokerConnection` does no I/O, reads no clock and awaits nothing.
The adapter (:mod:`broker.server`) feeds it what happened, with ``now`` (monotonic seconds of
the broker's clock), drains :meth:`BrokerConnection.actions` and executes them in order --
writing frames, closing, calling the stores of :mod:`broker.backends` -- and feeds the stores'
answers back as further inputs. The connection state machine is documented in
docs/protocol.md ("The broker connection").

Kinds (:class:`ConnectionKind`): the first accepted message of a connection decides it.

* ``hello`` -> a **session** connection (after the live-positions store registered it,
  ``GREETING``), answered with ``welcome``; then ``position``, ``position_lost``, ``signal``.
* ``positive_upload`` or ``positives_poll`` -> an **anonymous** connection, which never
  carries a session ID: ``hello`` is refused on it, and uploads and polls are refused on a
  session connection, so a positive upload can never be linked to a session.

Inputs (methods): :meth:`~BrokerConnection.receive_frame`, :meth:`~BrokerConnection.tick`,
:meth:`~BrokerConnection.refuse_connection`, :meth:`~BrokerConnection.replaced`,
:meth:`~BrokerConnection.connection_lost`, and the stores' answers
:meth:`~BrokerConnection.connected`, :meth:`~BrokerConnection.matched`,
:meth:`~BrokerConnection.relayed`, :meth:`~BrokerConnection.peer_gone`,
:meth:`~BrokerConnection.upload_done`, :meth:`~BrokerConnection.board_read`,
:meth:`~BrokerConnection.board_streamed`, :meth:`~BrokerConnection.refused`,
:meth:`~BrokerConnection.unavailable`, :meth:`~BrokerConnection.store_unavailable`,
:meth:`~BrokerConnection.failed`.

Outputs (drained): :meth:`~BrokerConnection.actions` (plain slotted dataclasses, not frozen:
built once per frame, they are cheaper so; treat them as read-only) -- :class:`Send`, :class:`Post`,
:class:`Close`, :class:`Record`, :class:`Connect`, :class:`Attach`, :class:`Disconnect`,
:class:`UpdatePosition`, :class:`DropPosition`, :class:`RelaySignal`, :class:`StoreUpload`,
:class:`CheckDecoy`, :class:`ReadBoard`, :class:`StreamBoard`, :class:`Announce`.

At most one store call is outstanding per connection (:attr:`~BrokerConnection.awaiting`):
the adapter handles a connection's frames one at a time, so it feeds the answer before the
next frame; a frame fed meanwhile, or an answer nobody waits for, is a
:class:`~fanny_tui.protocol.errors.LocalProtocolError` and changes nothing. Every refusal is an
``error`` message ``{code, message, field}`` and the connection stays open; an answer to a
``positive_upload`` (ack or error) is padded to
:data:`~fanny_tui.protocol.messages.ACK_SIZE_BYTES` and leaves no earlier than
``upload_answer_delay_s`` after the upload was received.

Every transition lives in one table (``_TRANSITIONS``, keyed by kind and input); every limit
is a :class:`ConnectionLimits` field or a :class:`TokenBucket`. Nothing here logs: the
adapter logs counts and refusal codes only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import msgspec

from fanny_tui.protocol.batch import BATCH_FORMAT
from fanny_tui.protocol.codes import code_hash, declaration_hash
from fanny_tui.protocol.errors import LocalProtocolError, MessageError
from fanny_tui.protocol.messages import (
    ACK_SIZE_BYTES,
    MAX_TOKENS_PER_UPLOAD,
    PROTOCOL_VERSION,
    Error,
    Hello,
    Match,
    Position,
    PositionLost,
    PositiveAck,
    Positives,
    PositivesPoll,
    PositiveToken,
    PositiveUpload,
    Signal,
    Welcome,
    decode_client_message,
    encode,
    encode_padded,
)

from . import Refusal
from .state import MatchNotice

if TYPE_CHECKING:
    from .server import BrokerSettings

__all__ = [
    "CLOSE_POLICY",
    "CLOSE_REPLACED",
    "INTERNAL_ERROR",
    "Action",
    "Admission",
    "Announce",
    "Attach",
    "BrokerConnection",
    "CheckDecoy",
    "Close",
    "Connect",
    "ConnectionKind",
    "ConnectionLimits",
    "Disconnect",
    "DropPosition",
    "Input",
    "Op",
    "Post",
    "ReadBoard",
    "Record",
    "RelaySignal",
    "Send",
    "StoreUpload",
    "StreamBoard",
    "TokenBucket",
    "UpdatePosition",
]

CLOSE_POLICY = 1008
"""WebSocket close code: policy violation (no valid first message, too many connections)."""
CLOSE_REPLACED = 4000
"""WebSocket close code: a newer connection of the same session replaced this one."""
CLOSE_TRY_AGAIN = 1013
"""WebSocket close code "Try Again Later" (RFC 6455 section 7.4, IANA registry): the
live-positions store of a session connection cannot be reached."""
REASON_MAX = 200
"""The longest ``message`` of an ``error``, characters (longer ones end with ``...``)."""


# --- limits --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The per-connection rules of :class:`~broker.server.BrokerSettings` (same meanings and
    units; validated there). No defaults here: they live in
    :class:`~broker.server.BrokerSettings` only (:meth:`from_settings`); a test core is built
    with every field given.

    Attributes:
        first_message_timeout_s: seconds a connection has to send a valid first message.
        upload_answer_delay_s: least seconds between a ``positive_upload`` and its answer.
        position_rate_per_s / position_burst: token bucket of ``position`` (session).
        poll_rate_per_s / poll_burst: token bucket of ``positives_poll`` (anonymous).
        signal_rate_per_s / signal_burst: token bucket of ``signal`` (session).
        poll_limit: most tokens in one JSON ``positives`` answer.
        position_timeout_s: told to the device in ``welcome``, seconds.
        open_declarations: a real upload needs no declaration code.
        announce_positives: a committed upload with tokens asks for an announcement.
    """

    first_message_timeout_s: float
    upload_answer_delay_s: float
    position_rate_per_s: float
    position_burst: int
    poll_rate_per_s: float
    poll_burst: int
    signal_rate_per_s: float
    signal_burst: int
    poll_limit: int
    position_timeout_s: float
    open_declarations: bool
    announce_positives: bool

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> ConnectionLimits:
        """The limits of a broker's settings (the fields of the same names)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` stored (starts full).

    Args:
        rate: tokens added per second (> 0).
        burst: the most tokens stored (>= 1).
        now: monotonic seconds of creation.
    """

    __slots__ = ("rate", "burst", "level", "at")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.level = float(burst)
        self.at = now

    def take(self, now: float) -> bool:
        """Take one token at monotonic time ``now``; False (nothing taken) when empty. A
        ``now`` earlier than the last one refills nothing."""
        if now > self.at:
            level = self.level + (now - self.at) * self.rate
            self.level = level if level < self.burst else self.burst
            self.at = now
        if self.level < 1.0:
            return False
        self.level -= 1.0
        return True


class Admission:
    """Open connections counted against the global cap and each source address's cap.

    Addresses are kept only as keys of the counts, in memory, while connections are open
    (never logged).

    Args:
        max_connections: connections allowed in all; 0: no cap.
        max_per_address: connections allowed from one address; 0: no cap (addresses are
            then not kept at all).
    """

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.admitted = 0
        self._per_address: dict[str, int] = {}

    def admit(self, address: str) -> str | None:
        """Count a new connection from ``address``.

        Returns:
            ``None`` when admitted (call :meth:`release` when it ends), else the refusal's
            message (its code is ``too_many_connections``; nothing was counted).
        """
        if self.max_connections and self.admitted >= self.max_connections:
            return "the broker is full: retry later"
        if self.max_per_address:
            held = self._per_address.get(address, 0)
            if held >= self.max_per_address:
                return "too many connections from this address: close some and retry"
            self._per_address[address] = held + 1
        self.admitted += 1
        return None

    def release(self, address: str) -> None:
        """An admitted connection from ``address`` ended.

        Raises:
            LocalProtocolError: no connection is admitted.
        """
        if self.admitted <= 0:
            raise LocalProtocolError("release without an admitted connection")
        self.admitted -= 1
        left = self._per_address.get(address, 0) - 1
        if left > 0:
            self._per_address[address] = left
        else:
            self._per_address.pop(address, None)

    @property
    def addresses(self) -> int:
        """Distinct source addresses counted (no address itself)."""
        return len(self._per_address)


# --- actions -------------------------------------------------------------------------------


@dataclass(slots=True)
class Send:
    """Queue ``frame`` to this connection, after what is already queued.

    Attributes:
        frame: JSON text, or the bytes of a binary frame.
        not_before: monotonic seconds before which the frame must not be queued (answers to
            a ``positive_upload``), or ``None``.
        error: the refusal code when ``frame`` is an ``error`` (for a DEBUG log), or ``None``.
    """

    frame: str | bytes
    not_before: float | None = None
    error: str | None = None


@dataclass(slots=True)
class Post:
    """Deliver ``frame`` (a ``match``) to the session ``session_id`` wherever it is connected
    (:meth:`~broker.backends.Router.post`); nothing happens when it is connected nowhere."""

    session_id: str
    frame: str


@dataclass(slots=True)
class Close:
    """Close the connection with WebSocket ``code`` and ``reason`` (fixed text, no client
    data); ``flush``: once the queued frames went out, else at once."""

    code: int
    reason: str
    flush: bool = True


@dataclass(slots=True)
class Record:
    """Hand the received frame to the recorder (tests): ``kind`` is ``"session"``,
    ``"anonymous"`` or ``"unknown"``. Emitted only by a connection built with ``record``."""

    kind: str
    frame: str | bytes


@dataclass(slots=True)
class Connect:
    """Register the session (:meth:`~broker.backends.LivePositions.connect`); answer with
    :meth:`BrokerConnection.connected`."""

    session_id: str
    radius_m: float
    now: float


@dataclass(slots=True)
class Attach:
    """This connection now holds ``session_id`` (:meth:`~broker.backends.Router.attach`)."""

    session_id: str


@dataclass(slots=True)
class Disconnect:
    """The session connection ended: :meth:`~broker.backends.Router.detach` and
    :meth:`~broker.backends.LivePositions.disconnect` with ``epoch``."""

    session_id: str
    epoch: int


@dataclass(slots=True)
class UpdatePosition:
    """Replace the session's position (WGS84 degrees, accuracy metres) and match it
    (:meth:`~broker.backends.LivePositions.update_position`); answer with
    :meth:`BrokerConnection.matched`."""

    session_id: str
    latitude: float
    longitude: float
    accuracy_m: float | None
    now: float


@dataclass(slots=True)
class DropPosition:
    """Forget the session's position (:meth:`~broker.backends.LivePositions.drop_position`)."""

    session_id: str


@dataclass(slots=True)
class RelaySignal:
    """Check the route (:meth:`~broker.backends.LivePositions.check_route`: a
    :class:`~broker.Refusal` goes to :meth:`BrokerConnection.refused`), then post ``frame``
    to ``destination`` (:meth:`BrokerConnection.relayed`, or
    :meth:`BrokerConnection.peer_gone` when it is connected nowhere)."""

    source: str
    destination: str
    frame: str
    now: float


@dataclass(slots=True)
class StoreUpload:
    """Commit the upload to the board (:meth:`~broker.positives.PositiveBoard.add`, with the
    wall clock); answer with :meth:`BrokerConnection.upload_done` (the count) only once it
    is durable, :meth:`~BrokerConnection.refused` or :meth:`~BrokerConnection.unavailable`.

    Attributes:
        upload: the decoded upload.
        code_hash: SHA-256 hex of the normalized declaration code, or ``None``.
        code_required: a code must authorize it (``open_declarations`` is off).
        declaration_hash: SHA-256 hex of the upload's declaration secret, or ``None``
            (issue 8, point 3: binds a declaration's uploads to its first).
    """

    upload: PositiveUpload
    code_hash: str | None
    code_required: bool
    declaration_hash: str | None = None


@dataclass(slots=True)
class CheckDecoy:
    """Validate a decoy's tokens like a real upload's
    (:func:`~broker.positives.check_upload`, wall clock), store nothing, look at no code;
    answer with :meth:`BrokerConnection.upload_done` (distinct tokens) or
    :meth:`~BrokerConnection.refused`."""

    tokens: Sequence[PositiveToken]


@dataclass(slots=True)
class ReadBoard:
    """Read at most ``limit`` unexpired tokens after ``cursor``
    (:meth:`~broker.positives.PositiveBoard.since`); answer with
    :meth:`BrokerConnection.board_read` or :meth:`~BrokerConnection.unavailable`."""

    cursor: int
    limit: int


@dataclass(slots=True)
class StreamBoard:
    """Send every unexpired token after ``cursor`` up to the board's last cursor as
    ``batch1`` binary frames, then the end frame (:mod:`fanny_tui.protocol.batch`; a cursor
    beyond the board's last starts over at 0); answer with
    :meth:`BrokerConnection.board_streamed` or :meth:`~BrokerConnection.unavailable`."""

    cursor: int


@dataclass(slots=True)
class Announce:
    """New positives were committed: announce ``positives_available`` to every session
    (the broker spaces announcements by ``announce_interval_s``)."""


Action = (Send | Post | Close | Record | Connect | Attach | Disconnect | UpdatePosition
          | DropPosition | RelaySignal | StoreUpload | CheckDecoy | ReadBoard | StreamBoard
          | Announce)


# --- states and inputs ---------------------------------------------------------------------


class ConnectionKind(enum.Enum):
    """What a connection is (its value is the recorder's kind)."""

    NEW = "unknown"           # no valid first message yet: the first-message deadline runs
    GREETING = "greeting"     # hello accepted; waiting for the live-positions store
    SESSION = "session"       # hello, welcome: positions and signals
    ANONYMOUS = "anonymous"   # positive uploads and polls only, never a session ID
    CLOSED = "closed"         # terminal: nothing more is read

    __hash__ = object.__hash__   # members are singletons; Enum's own hash is Python code


class Op(enum.Enum):
    """The store call a connection waits for (:attr:`BrokerConnection.awaiting`)."""

    CONNECT = "connect"
    UPDATE = "update"
    RELAY = "relay"
    STORE = "store"
    READ = "read"
    STREAM = "stream"

    __hash__ = object.__hash__


class Input(enum.Enum):
    """Inputs other than a decoded message (the keys of the transition table)."""

    BINARY = "binary frame"
    UNDECODABLE = "undecodable frame"
    TICK = "tick"
    REFUSE = "refuse_connection"
    REPLACED = "replaced"
    LOST = "connection_lost"
    CONNECTED = "connected"
    MATCHED = "matched"
    RELAYED = "relayed"
    PEER_GONE = "peer_gone"
    UPLOAD_DONE = "upload_done"
    BOARD_READ = "board_read"
    BOARD_STREAMED = "board_streamed"
    REFUSED = "refused"
    UNAVAILABLE = "unavailable"
    STORE_DOWN = "store_unavailable"
    FAILED = "failed"

    __hash__ = object.__hash__


K = ConnectionKind
_OPEN = (K.NEW, K.SESSION, K.ANONYMOUS)
_ALL = tuple(K)

INTERNAL_ERROR = encode(Error(code="internal_error", message="the broker failed on this message"))
"""The ``error`` text for a message the broker failed on (an exception, not a refusal)."""



class _TypeOnly(msgspec.Struct):
    type: str = ""


_type_only: msgspec.json.Decoder[_TypeOnly] = msgspec.json.Decoder(_TypeOnly)


def _frame_type(raw: str) -> str | None:
    """The ``type`` of a frame that failed full decoding, if it is a JSON object with one."""
    try:
        return _type_only.decode(raw).type
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _error(code: str, message: str, field: str | None) -> Error:
    if len(message) > REASON_MAX:
        message = message[: REASON_MAX - 3] + "..."
    return Error(code=code[:64], message=message, field=field)


def _upload_error(error: Error) -> str:
    """The text of an ``error`` answering a ``positive_upload``: padded to exactly
    ``ACK_SIZE_BYTES`` like the ack, so a refused upload's answer has the size of an
    acknowledged one (trial finding 9). A refusal too long for it loses the end of its
    ``message`` (then its ``field``) to fit."""
    while True:
        try:
            return encode_padded(error, ACK_SIZE_BYTES)
        except ValueError:
            over = len(encode(error).encode("utf-8")) - ACK_SIZE_BYTES
            if len(error.message) > 3:
                keep = max(0, len(error.message.removesuffix("...")) - over - 3)
                error = msgspec.structs.replace(error, message=error.message[:keep] + "...")
            elif error.field is not None:
                error = msgspec.structs.replace(error, field=None)
            else:
                raise


def _decode_refusal(exc: MessageError) -> Refusal:
    """The refusal of a frame that failed to decode (``too_many_tokens`` named)."""
    if exc.field == "tokens" and "length <=" in str(exc):
        return Refusal(f"an upload carries at most {MAX_TOKENS_PER_UPLOAD} tokens: send the "
                       "others in another upload", code="too_many_tokens", field="tokens")
    return Refusal(str(exc), code=exc.code, field=exc.field)


def _classify(message: Any) -> str:
    if isinstance(message, Hello):
        return "session"
    if isinstance(message, PositiveUpload | PositivesPoll):
        return "anonymous"
    return "unknown"


# --- the connection ------------------------------------------------------------------------


class BrokerConnection:
    """One client connection of the broker, sans I/O (see the module docstring).

    Args:
        limits: the per-connection rules.
        now: monotonic seconds when the connection was accepted (starts the first-message
            deadline and the token buckets).
        record: emit a :class:`Record` action for every frame received (a recorder is set).
    """

    def __init__(self, limits: ConnectionLimits, now: float, *, record: bool = False) -> None:
        self.limits = limits
        self._record = record
        self.kind = ConnectionKind.NEW
        """The current kind (read-only: a plain attribute, read on every frame)."""
        self._deadline = now + limits.first_message_timeout_s
        self._positions = TokenBucket(limits.position_rate_per_s, limits.position_burst, now)
        self._polls = TokenBucket(limits.poll_rate_per_s, limits.poll_burst, now)
        self._signals = TokenBucket(limits.signal_rate_per_s, limits.signal_burst, now)
        self.awaiting: Op | None = None
        """The store call whose answer is due, or ``None`` (read-only)."""
        self._greeting: str | None = None         # the session ID of a pending hello
        self._session_id: str | None = None       # memory only, never logged
        self._epoch = 0
        self._attached = False                    # a Disconnect is owed at the end
        self._pending_upload: PositiveUpload | None = None
        self._answer_at = 0.0                     # when the pending upload may be answered
        self._actions: list[Action] = []

    # -- observation --------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        """The session ID of a session connection (also after it closed), else ``None``."""
        return self._session_id

    @property
    def epoch(self) -> int:
        """The live-positions epoch of the session connection (0 before ``welcome``)."""
        return self._epoch

    @property
    def deadline(self) -> float | None:
        """Monotonic seconds at which :meth:`tick` closes a connection that sent no valid
        first message; ``None`` unless the connection is new (a hello the store failed on
        leaves it new, with its first deadline)."""
        return self._deadline if self.kind is K.NEW else None

    def actions(self) -> list[Action]:
        """Drain the actions produced since the last call, in the order to execute them."""
        out, self._actions = self._actions, []
        return out

    # -- inputs: the client ---------------------------------------------------------------

    def receive_frame(self, frame: str | bytes, now: float) -> None:
        """Feed one frame received at ``now``: ``str`` for a text frame, ``bytes`` for a
        binary one (refused ``bad_message``). Frames after the end are ignored.

        Raises:
            LocalProtocolError: a store answer is still due (:attr:`awaiting`).
        """
        kind = self.kind
        if kind is K.CLOSED:
            return
        if self.awaiting is not None:
            raise LocalProtocolError(f"a frame while the answer of {self.awaiting.value} is "
                                     "due: feed it first")
        if not isinstance(frame, str):
            self._dispatch(Input.BINARY, frame, now, frame)
            return
        try:
            message = decode_client_message(frame)
        except MessageError as exc:
            upload = _frame_type(frame) == "positive_upload"
            self._dispatch(Input.UNDECODABLE, (exc, upload), now, frame)
            return
        # _dispatch, inlined: this is the path of every position.
        handler = _TRANSITIONS.get((kind, type(message)))
        if handler is None:
            raise LocalProtocolError(f"{type(message).__name__} on a {kind.value} connection")
        if self._record:
            shown = _classify(message) if kind is K.NEW else kind.value
            self._actions.append(Record(shown, frame))
        handler(self, message, now)

    def tick(self, now: float) -> None:
        """Run the timer: close (1008) a connection without a valid first message once
        :attr:`deadline` passed. No effect otherwise."""
        self._dispatch(Input.TICK, None, now)

    def refuse_connection(self, reason: str) -> None:
        """The connection is over a cap (:class:`Admission`): answer
        ``too_many_connections`` with ``reason`` and close (1008) once it is sent.

        Raises:
            LocalProtocolError: not a new connection.
        """
        self._dispatch(Input.REFUSE, reason, 0.0)

    def replaced(self) -> None:
        """A newer connection of the same session exists (the router called
        :meth:`~broker.backends.Recipient.replace`): close this one at once (4000). No effect
        once closed.

        Raises:
            LocalProtocolError: not a session connection.
        """
        self._dispatch(Input.REPLACED, None, 0.0)

    def connection_lost(self) -> None:
        """The connection ended (any cause): forget the session (:class:`Disconnect`) once."""
        self._dispatch(Input.LOST, None, 0.0)

    # -- inputs: the stores' answers ------------------------------------------------------

    def connected(self, epoch: int, radius_m: float) -> None:
        """The live-positions store registered the hello's session (``epoch``; the
        effective ``radius_m``, metres): attach it and answer ``welcome``.

        Raises:
            LocalProtocolError: no ``Connect`` is pending.
        """
        self._answer(Op.CONNECT, Input.CONNECTED, (epoch, radius_m))

    def matched(self, notices: Sequence[MatchNotice]) -> None:
        """The position was stored; post a ``match`` to each notice's session.

        Raises:
            LocalProtocolError: no ``UpdatePosition`` is pending.
        """
        if self.awaiting is Op.UPDATE:    # _answer, inlined: the path of every position
            _TRANSITIONS[self.kind, Input.MATCHED](self, notices, 0.0)
        else:
            self._answer(Op.UPDATE, Input.MATCHED, notices)

    def relayed(self) -> None:
        """The signal reached the peer's connection.

        Raises:
            LocalProtocolError: no ``RelaySignal`` is pending.
        """
        self._answer(Op.RELAY, Input.RELAYED, None)

    def peer_gone(self) -> None:
        """The peer of a routed signal is connected nowhere: refuse ``peer_unavailable``.

        Raises:
            LocalProtocolError: no ``RelaySignal`` is pending.
        """
        self._answer(Op.RELAY, Input.PEER_GONE, None)

    def upload_done(self, count: int) -> None:
        """The upload is committed (or the decoy validated): ``count`` distinct tokens;
        answer the padded ``positive_ack``, and ask for an announcement of real tokens.

        Raises:
            LocalProtocolError: no ``StoreUpload`` or ``CheckDecoy`` is pending.
        """
        self._answer(Op.STORE, Input.UPLOAD_DONE, count)

    def board_read(self, tokens: list[PositiveToken], cursor: int, more: bool) -> None:
        """The board's answer to :class:`ReadBoard`: reply ``positives``.

        Raises:
            LocalProtocolError: no ``ReadBoard`` is pending.
        """
        self._answer(Op.READ, Input.BOARD_READ, (tokens, cursor, more))

    def board_streamed(self) -> None:
        """The adapter sent the frames of :class:`StreamBoard` and the end frame.

        Raises:
            LocalProtocolError: no ``StreamBoard`` is pending.
        """
        self._answer(Op.STREAM, Input.BOARD_STREAMED, None)

    def refused(self, refusal: Refusal) -> None:
        """A store refused the pending call (``not_matched``, ``code_used``,
        ``expiry_out_of_window``...): answer the refusal.

        Raises:
            LocalProtocolError: nothing is pending, or a ``Connect``.
        """
        if self.awaiting is Op.CONNECT:
            raise LocalProtocolError("refused: the live-positions store refuses no hello")
        self._answer(self.awaiting, Input.REFUSED, refusal)

    def unavailable(self) -> None:
        """The store of the pending call cannot be reached (the board failed, Redis is down):
        refuse ``unavailable`` (retry later). A hello whose registration failed leaves the
        connection new, as :meth:`failed` does: the client may say hello again. A session's
        ``position`` or ``signal`` so refused also closes the connection (1013, try again
        later): the device reconnects and says hello again, here once the store is back or
        on another broker of its list that reaches the store.

        Raises:
            LocalProtocolError: nothing is pending.
        """
        if self.awaiting is None:
            raise LocalProtocolError("unavailable: no store call is pending")
        self._answer(self.awaiting, Input.UNAVAILABLE, None)

    def store_unavailable(self) -> None:
        """A store action that awaits no answer (:class:`Attach`, :class:`Post`,
        :class:`DropPosition`) failed because its store cannot be reached: on a session
        connection, refuse ``unavailable`` and close (1013), as :meth:`unavailable` does. No
        effect on another kind of connection.
        """
        self._dispatch(Input.STORE_DOWN, None, 0.0)

    def failed(self) -> None:
        """The pending call raised unexpectedly: answer ``internal_error`` (a hello that
        failed leaves the connection new: the client may say hello again).

        Raises:
            LocalProtocolError: nothing is pending.
        """
        self._answer(self.awaiting, Input.FAILED, None)

    # -- plumbing -------------------------------------------------------------------------

    def _dispatch(self, key: Any, value: Any, now: float, frame: str | bytes | None = None
                  ) -> None:
        handler = _TRANSITIONS.get((self.kind, key))
        if handler is None:
            name = key.value if isinstance(key, Input) else key.__name__
            raise LocalProtocolError(f"{name} on a {self.kind.value} connection")
        if frame is not None and self._record:
            kind = self.kind
            shown = (_classify(value) if kind is K.NEW and not isinstance(key, Input)
                     else "unknown" if kind is K.GREETING else kind.value)
            self._actions.append(Record(shown, frame))
        handler(self, value, now)

    def _answer(self, op: Op | None, key: Input, value: Any) -> None:
        if op is None or self.awaiting is not op:
            due = "nothing" if self.awaiting is None else self.awaiting.value
            raise LocalProtocolError(f"{key.value} while {due} is pending")
        handler = _TRANSITIONS.get((self.kind, key))
        if handler is None:
            raise LocalProtocolError(f"{key.value} on a {self.kind.value} connection")
        handler(self, value, 0.0)

    def _wait(self, op: Op, action: Action) -> None:
        self.awaiting = op
        self._actions.append(action)

    def _send_error(self, refusal: Refusal) -> None:
        error = _error(refusal.code, str(refusal), refusal.field)
        self._actions.append(Send(encode(error), error=error.code))

    def _send_upload_error(self, refusal: Refusal, answer_at: float) -> None:
        error = _error(refusal.code, str(refusal), refusal.field)
        self._actions.append(Send(_upload_error(error), not_before=answer_at, error=error.code))

    # -- transitions: frames --------------------------------------------------------------

    def _binary(self, _frame: bytes, _now: float) -> None:
        self._send_error(Refusal("binary frames are not accepted: send JSON text",
                                 code="bad_message"))

    def _undecodable(self, value: tuple[MessageError, bool], now: float) -> None:
        exc, upload = value
        refusal = _decode_refusal(exc)
        if upload:   # even a malformed upload is answered late, and at the ack's size
            self._send_upload_error(refusal, now + self.limits.upload_answer_delay_s)
        else:
            self._send_error(refusal)

    def _hello(self, hello: Hello, now: float) -> None:
        if hello.protocol != PROTOCOL_VERSION:
            self._send_error(Refusal(
                f"unsupported protocol version; this broker speaks {PROTOCOL_VERSION}",
                code="unsupported_protocol", field="protocol"))
            return
        self.kind = K.GREETING
        self._greeting = hello.session_id
        self._wait(Op.CONNECT, Connect(hello.session_id, hello.radius_m, now))

    def _position(self, position: Position, now: float) -> None:
        if not self._positions.take(now):
            self._send_error(Refusal(
                f"too many positions: at most {self.limits.position_rate_per_s:g} per second "
                "on average; this one was ignored", code="rate_limited"))
            return
        assert self._session_id is not None
        self.awaiting = Op.UPDATE       # _wait, inlined: the path of every position
        self._actions.append(UpdatePosition(self._session_id, position.latitude,
                                            position.longitude, position.accuracy_m, now))

    def _position_lost(self, _message: PositionLost, _now: float) -> None:
        assert self._session_id is not None
        self._actions.append(DropPosition(self._session_id))

    def _signal(self, signal: Signal, now: float) -> None:
        if not self._signals.take(now):
            self._send_error(Refusal(
                f"too many signals: at most {self.limits.signal_rate_per_s:g} per second on "
                "average; this one was not relayed", code="rate_limited"))
            return
        source = self._session_id
        assert source is not None
        relayed = encode(Signal(peer_session_id=source, sdp_type=signal.sdp_type,
                                sdp=signal.sdp))
        self._wait(Op.RELAY, RelaySignal(source, signal.peer_session_id, relayed, now))

    def _upload(self, upload: PositiveUpload, now: float) -> None:
        self.kind = K.ANONYMOUS
        answer_at = now + self.limits.upload_answer_delay_s
        if upload.decoy:
            # Validated like a real upload, then discarded: nothing stored, no code looked at.
            self._pending_upload, self._answer_at = upload, answer_at
            self._wait(Op.STORE, CheckDecoy(upload.tokens))
            return
        hashed = declared = None
        if upload.code is not None:
            try:
                hashed = code_hash(upload.code)
            except ValueError as exc:
                self._send_upload_error(Refusal(f"malformed declaration code: {exc}",
                                                code="code_invalid", field="code"), answer_at)
                return
        if upload.declaration is not None:
            try:
                declared = declaration_hash(upload.declaration)
            except ValueError as exc:
                self._send_upload_error(Refusal(f"malformed declaration secret: {exc}",
                                                code="bad_message", field="declaration"),
                                        answer_at)
                return
        self._pending_upload, self._answer_at = upload, answer_at
        self._wait(Op.STORE, StoreUpload(upload, hashed,
                                         code_required=not self.limits.open_declarations,
                                         declaration_hash=declared))

    def _upload_on_session(self, _upload: PositiveUpload, now: float) -> None:
        self._send_upload_error(Refusal(
            "positive uploads and polls are refused on a session connection: open a separate "
            "anonymous connection", code="wrong_connection", field="type"),
            now + self.limits.upload_answer_delay_s)

    def _poll(self, poll: PositivesPoll, now: float) -> None:
        self.kind = K.ANONYMOUS
        if not self._polls.take(now):
            self._send_error(Refusal(
                f"too many polls: at most {self.limits.poll_rate_per_s:g} per second on "
                "average; poll again later", code="rate_limited"))
            return
        if BATCH_FORMAT in poll.accept:
            self._wait(Op.STREAM, StreamBoard(poll.cursor))
        else:
            self._wait(Op.READ, ReadBoard(poll.cursor, self.limits.poll_limit))

    # -- transitions: other inputs --------------------------------------------------------

    def _tick(self, _value: None, now: float) -> None:
        if now >= self._deadline:
            self.kind = K.CLOSED
            self._actions.append(Close(CLOSE_POLICY, "no valid first message"))

    def _nothing(self, _value: Any, _now: float) -> None:
        return None

    def _refuse_connection(self, reason: str, _now: float) -> None:
        self.kind = K.CLOSED
        self._send_error(Refusal(reason, code="too_many_connections", field=None))
        self._actions.append(Close(CLOSE_POLICY, "too many connections"))

    def _replaced(self, _value: None, _now: float) -> None:
        self.kind = K.CLOSED
        self._actions.append(Close(CLOSE_REPLACED, "replaced by a newer connection",
                                   flush=False))

    def _lost(self, _value: None, _now: float) -> None:
        self.kind = K.CLOSED
        if self._attached:
            self._attached = False
            assert self._session_id is not None
            self._actions.append(Disconnect(self._session_id, self._epoch))

    def _connected(self, value: tuple[int, float], _now: float) -> None:
        epoch, radius_m = value
        session_id = self._greeting
        assert session_id is not None
        self.awaiting = None
        self._greeting = None
        self.kind = K.SESSION
        self._session_id, self._epoch, self._attached = session_id, epoch, True
        self._actions.append(Attach(session_id))
        self._actions.append(Send(encode(Welcome(
            radius_m=radius_m, position_timeout_s=self.limits.position_timeout_s))))

    def _connected_after_end(self, value: tuple[int, float], _now: float) -> None:
        # The connection ended while its hello was being registered: undo the registration.
        epoch, _radius_m = value
        session_id = self._greeting
        assert session_id is not None
        self.awaiting = None
        self._greeting = None
        self._actions.append(Disconnect(session_id, epoch))

    def _matched(self, notices: Sequence[MatchNotice], _now: float) -> None:
        self.awaiting = None
        for notice in notices:
            self._actions.append(Post(notice.session_id, encode(
                Match(peer_session_id=notice.peer_session_id, role=notice.role))))

    def _relayed(self, _value: None, _now: float) -> None:
        self.awaiting = None

    def _peer_gone(self, _value: None, _now: float) -> None:
        self.awaiting = None
        self._send_error(Refusal("the peer is not connected", code="peer_unavailable",
                                 field="peer_session_id"))

    def _upload_done(self, count: int, _now: float) -> None:
        upload = self._pending_upload
        assert upload is not None
        self.awaiting, self._pending_upload = None, None
        self._actions.append(Send(encode_padded(
            PositiveAck(upload_id=upload.upload_id, count=count), ACK_SIZE_BYTES),
            not_before=self._answer_at))
        if count and not upload.decoy and self.limits.announce_positives:
            self._actions.append(Announce())

    def _board_read(self, value: tuple[list[PositiveToken], int, bool], _now: float) -> None:
        tokens, cursor, more = value
        self.awaiting = None
        self._actions.append(Send(encode(Positives(cursor=cursor, tokens=tokens, more=more))))

    def _board_streamed(self, _value: None, _now: float) -> None:
        self.awaiting = None

    def _refused(self, refusal: Refusal, _now: float) -> None:
        if self.awaiting is Op.STORE:
            self._pending_upload = None
            self._send_upload_error(refusal, self._answer_at)
        else:
            self._send_error(refusal)
        self.awaiting = None

    def _unavailable(self, _value: None, _now: float) -> None:
        if self.awaiting is Op.STORE:
            self._pending_upload = None
            self._send_upload_error(Refusal("the broker could not store the upload; retry "
                                            "later", code="unavailable"), self._answer_at)
        elif self.awaiting in (Op.READ, Op.STREAM):
            self._send_error(Refusal("the broker could not read the board; retry later",
                                     code="unavailable"))
        elif self.kind is K.SESSION:
            self._session_store_down(None, _now)
        else:
            self._send_error(_LIVE_STORE_DOWN)
        if self.awaiting is Op.CONNECT and self.kind is K.GREETING:
            self._greeting = None
            self.kind = K.NEW      # the deadline of the first message still runs
        self.awaiting = None

    def _session_store_down(self, _value: None, _now: float) -> None:
        self._send_error(_LIVE_STORE_DOWN)
        self.kind = K.CLOSED
        self._actions.append(Close(CLOSE_TRY_AGAIN, "store unavailable: say hello again"))

    def _failed(self, _value: None, _now: float) -> None:
        error = _error("internal_error", "the broker failed on this message", None)
        if self.awaiting is Op.STORE:
            self._pending_upload = None
            self._actions.append(Send(_upload_error(error), not_before=self._answer_at,
                                      error=error.code))
        else:
            self._actions.append(Send(INTERNAL_ERROR, error=error.code))
        if self.awaiting is Op.CONNECT and self.kind is K.GREETING:
            self._greeting = None
            self.kind = K.NEW      # the deadline of the first message still runs
        self.awaiting = None


_Handler = Callable[[BrokerConnection, Any, float], None]

_LIVE_STORE_DOWN = Refusal("the broker's live-positions store is unavailable; retry later",
                           code="unavailable")


def _refuse(code: str, message: str, field: str | None = "type") -> _Handler:
    """A transition that only refuses: the kind stays, an ``error`` is answered."""
    def refuse(connection: BrokerConnection, _message: Any, _now: float) -> None:
        connection._send_error(Refusal(message, code=code, field=field))
    return refuse


_C = BrokerConnection
_HELLO_REQUIRED = _refuse("hello_required",
                          "send hello first (or open an anonymous connection for positives)")
_ALREADY_HELLO = _refuse("already_hello", "hello was already sent on this connection")
_NOT_ON_SESSION = _refuse("wrong_connection", "positive uploads and polls are refused on a "
                          "session connection: open a separate anonymous connection")
_NOT_ANONYMOUS = _refuse("wrong_connection", "this is an anonymous connection (positives "
                         "only): session messages need their own connection opened with hello")
_RESULTS: dict[Input, _Handler] = {
    Input.CONNECTED: _C._connected, Input.MATCHED: _C._matched, Input.RELAYED: _C._relayed,
    Input.PEER_GONE: _C._peer_gone, Input.UPLOAD_DONE: _C._upload_done,
    Input.BOARD_READ: _C._board_read, Input.BOARD_STREAMED: _C._board_streamed,
    Input.REFUSED: _C._refused, Input.UNAVAILABLE: _C._unavailable, Input.FAILED: _C._failed,
}
"""Answers of the stores; each is legal only while its call is pending (checked first)."""

_TRANSITIONS: dict[tuple[ConnectionKind, Any], _Handler] = {
    # A new connection: the first accepted message decides its kind.
    (K.NEW, Hello): _C._hello,                          # -> GREETING (or refused: stays NEW)
    (K.NEW, PositiveUpload): _C._upload,                # -> ANONYMOUS
    (K.NEW, PositivesPoll): _C._poll,                   # -> ANONYMOUS
    (K.NEW, Position): _HELLO_REQUIRED,
    (K.NEW, PositionLost): _HELLO_REQUIRED,
    (K.NEW, Signal): _HELLO_REQUIRED,
    (K.NEW, Input.REFUSE): _C._refuse_connection,       # -> CLOSED
    (K.NEW, Input.TICK): _C._tick,                      # -> CLOSED once the deadline passed
    # A session connection.
    (K.SESSION, Hello): _ALREADY_HELLO,
    (K.SESSION, Position): _C._position,
    (K.SESSION, PositionLost): _C._position_lost,
    (K.SESSION, Signal): _C._signal,
    (K.SESSION, PositiveUpload): _C._upload_on_session,
    (K.SESSION, PositivesPoll): _NOT_ON_SESSION,
    (K.SESSION, Input.REPLACED): _C._replaced,          # -> CLOSED
    (K.SESSION, Input.STORE_DOWN): _C._session_store_down,  # -> CLOSED
    # An anonymous connection.
    (K.ANONYMOUS, PositiveUpload): _C._upload,
    (K.ANONYMOUS, PositivesPoll): _C._poll,
    (K.ANONYMOUS, Hello): _NOT_ANONYMOUS,
    (K.ANONYMOUS, Position): _NOT_ANONYMOUS,
    (K.ANONYMOUS, PositionLost): _NOT_ANONYMOUS,
    (K.ANONYMOUS, Signal): _NOT_ANONYMOUS,
    # Everywhere.
    **{(kind, Input.BINARY): _C._binary for kind in _OPEN},
    **{(kind, Input.UNDECODABLE): _C._undecodable for kind in _OPEN},
    **{(kind, Input.TICK): _C._nothing for kind in _ALL if kind is not K.NEW},
    **{(kind, Input.LOST): _C._lost for kind in _ALL},  # -> CLOSED
    (K.CLOSED, Input.REPLACED): _C._nothing,
    **{(kind, Input.STORE_DOWN): _C._nothing for kind in _ALL if kind is not K.SESSION},
    # The stores' answers (GREETING: CONNECTED, UNAVAILABLE or FAILED; CLOSED: a connection replaced
    # while its call ran still takes the answer, so that its matches reach their sessions).
    (K.GREETING, Input.CONNECTED): _C._connected,       # -> SESSION
    (K.GREETING, Input.FAILED): _C._failed,             # -> NEW
    (K.GREETING, Input.UNAVAILABLE): _C._unavailable,   # -> NEW
    (K.CLOSED, Input.CONNECTED): _C._connected_after_end,   # ended meanwhile: Disconnect
    **{(kind, key): handler for kind in (K.SESSION, K.ANONYMOUS, K.CLOSED)
       for key, handler in _RESULTS.items() if key is not Input.CONNECTED},
}
"""The connection state machine: (kind, input) -> transition. An input without an entry is
illegal there (LocalProtocolError, nothing changes). docs/protocol.md mirrors it."""

del _C
