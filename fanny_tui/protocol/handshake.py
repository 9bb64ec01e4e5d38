"""The witness exchange and the narrow contact over the data channel, sans I/O (paper 3, 4-5).

Data channel protocol version 2 (docs/protocol.md, "Data channel"). Like h11 and websockets'
``protocol.py``, the machine does no I/O and reads no clock: the adapter
(:mod:`fanny_tui.peer`) feeds it what happened, with ``now`` (seconds of a monotonic clock), and
drains what to do.

Inputs (methods): :meth:`~WitnessHandshake.channel_open`, :meth:`~WitnessHandshake.receive_data`,
:meth:`~WitnessHandshake.local_fix`, :meth:`~WitnessHandshake.tick` (timers),
:meth:`~WitnessHandshake.token_stored`, :meth:`~WitnessHandshake.store_failed`,
:meth:`~WitnessHandshake.timeout` (the adapter's establishment budget),
:meth:`~WitnessHandshake.channel_closed`, :meth:`~WitnessHandshake.stop`.

Outputs (drained): :meth:`~WitnessHandshake.data_to_send` (text frames for the data channel)
and :meth:`~WitnessHandshake.events` (:class:`Established`, :class:`PeerSample`,
:class:`StoreToken`, :class:`HandshakeCompleted`, :class:`HandshakeFailed`,
:class:`ContactEnded`).

The exchange::

    initiator                                      responder
    channel open ── peer_hello(v2, A, min, r) ──►
                 ◄── peer_hello(v2, B, min, r) ──  channel open
    (both: effective min_contact_s = max, radius_m = min; Established)
                 ◄──── peer_position / heartbeat ──►   every position_interval_s
    within_s >= min_contact_s (at once when 0):
    token = SHA-256(sorted(A, B))
                 ── token(T) ─────────────────►  checks T; StoreToken(T) -> token_stored(new)
                 ◄──────────────────── ack(T) ──
    StoreToken(T) -> token_stored(new)
                 ◄──── peer_position / heartbeat ──►   while in contact
    parted / max_contact / channel_lost / stopped: whoever decides first
                 ── close(reason) ────────────►  both close the channel (ContactEnded)

Versions: each side sends its own version (:data:`DATA_CHANNEL_VERSION`); the pair speaks
``min`` of the two, and a side aborts with ``unsupported_version`` only when that is below
:data:`MIN_DATA_CHANNEL_VERSION` (a version 3 peer is answered in version 2). Frames: each side
sends a ``peer_position`` or ``heartbeat`` every ``position_interval_s``, at most
:data:`MAX_FRAME_INTERVAL_S` apart; text frames only (a binary frame is ``bad_message``).

The responder stores first and acks; the initiator stores on the ack. While a token is on its
way (``AWAIT_ACK``) or being stored (``STORING``) neither side decides to end the contact; the
initiator's ``token_timeout_s`` budget (from sending the token) bounds that wait. With an
effective ``min_contact_s`` of 0 the token is due at once, so the responder too fails with
``timeout`` when no token came ``token_timeout_s`` after the hellos (with a longer
``min_contact_s`` the two sides' measures may differ a little, and the responder waits for
the token until the contact ends). A pair that ends before the token left
nothing on either side. After the token is held, a failure (garbage, abort, lost channel) only
ends the contact: the token stays and no :class:`HandshakeFailed` is emitted
(:class:`HandshakeFailed` always means that this exchange stored nothing on this side).

Every transition lives in one table (``_TRANSITIONS``); an illegal local call raises
:class:`~fanny_tui.protocol.errors.LocalProtocolError` and leaves the state unchanged. Neither
side keeps the peer's contact ID once the token is known, nor any position after the end.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from .contact import ContactMeasures, ContactMeter, ContactSettings, Fix, Sample
from .errors import LocalProtocolError, MessageError
from .messages import (
    DATA_CHANNEL_VERSION,
    Abort,
    Close,
    Heartbeat,
    PeerHello,
    PeerMessage,
    PeerPosition,
    Role,
    TokenAck,
    TokenOffer,
    decode_peer_message,
    encode,
)
from .tokens import craft_token, is_uuid4

MAX_WIRE_ACCURACY_M = 100_000.0
"""The largest ``accuracy_m`` the wire accepts; a worse estimate is sent as this ceiling."""

MIN_DATA_CHANNEL_VERSION = 2
"""The lowest data channel version this side speaks. The pair speaks the effective version
``min(DATA_CHANNEL_VERSION, peer_hello.version)``; below this one the exchange is aborted
(``unsupported_version``). docs/protocol.md, "Versions"."""

MAX_FRAME_INTERVAL_S = 10.0
"""Seconds: a side sends a ``peer_position`` or ``heartbeat`` at least this often, whatever its
``position_interval_s`` (docs/protocol.md, "Positions": the MUST bound a receiver relies on)."""


class HandshakeState(enum.Enum):
    """States of one side of the witness exchange and contact."""

    IDLE = "idle"                  # data channel not open yet
    AWAIT_HELLO = "await_hello"    # own peer_hello sent, waiting for the peer's
    CONTACT = "contact"            # hellos exchanged, no token yet (positions flow)
    AWAIT_ACK = "await_ack"        # initiator: token sent, waiting for the ack
    STORING = "storing"            # StoreToken emitted, waiting for token_stored()
    WITNESSED = "witnessed"        # token held by this side; the contact goes on
    CLOSED = "closed"              # terminal: the contact ended (token held or not)
    FAILED = "failed"              # terminal: failure, nothing stored by this exchange


TERMINAL = frozenset({HandshakeState.CLOSED, HandshakeState.FAILED})
_OPEN = frozenset({HandshakeState.CONTACT, HandshakeState.AWAIT_ACK, HandshakeState.STORING,
                   HandshakeState.WITNESSED})
"""States where positions flow and the contact is measured."""


@dataclass(frozen=True)
class Established:
    """Both hellos are exchanged: the establishment is over (the adapter frees its slot).

    ``radius_m`` and ``min_contact_s``: the effective (stricter) settings of the pair.
    """

    radius_m: float
    min_contact_s: float


@dataclass(frozen=True)
class PeerSample:
    """A position sample of the contact (see :class:`~fanny_tui.protocol.contact.Sample`)."""

    sample: Sample


@dataclass(frozen=True)
class StoreToken:
    """Ask the adapter to store ``token`` and then call ``token_stored(new)``."""

    token: str


@dataclass(frozen=True)
class HandshakeCompleted:
    """The token is held by this side; ``new`` is False when it was already stored.

    ``measures``: the contact's measures when the token was stored (not part of equality: the
    outcome of an exchange is its token).
    """

    token: str
    new: bool
    measures: ContactMeasures | None = field(default=None, compare=False)


@dataclass(frozen=True)
class HandshakeFailed:
    """The exchange failed before a token was held; ``reason`` is short text such as
    ``timeout``, ``token_mismatch``, ``unsupported_version`` or ``peer_aborted: ...``."""

    reason: str


@dataclass(frozen=True)
class ContactEnded:
    """The contact is over (emitted once, last, by every machine that opened its channel).

    ``reason``: ``parted``, ``max_contact``, ``channel_lost``, ``stopped``, ``peer_closed`` or
    ``aborted`` (a failure). ``token``: the token this side holds from this contact (None: none,
    the pair ended before it). ``measures``: this side's measures of the contact.
    """

    reason: str
    measures: ContactMeasures
    token: str | None


HandshakeEvent = (Established | PeerSample | StoreToken | HandshakeCompleted | HandshakeFailed
                  | ContactEnded)

_Handler = Callable[["WitnessHandshake", PeerMessage, float], None]


class WitnessHandshake:
    """One side of one witness exchange and of the contact that follows.

    Args:
        role: ``"initiator"`` (crafts the token, stores on ack) or ``"responder"``.
        contact_id: this device's contact ID (canonical UUIDv4 text).
        settings: this device's contact settings (radius, min contact, gap, ...).

    Raises:
        ValueError: bad role or contact ID.
    """

    def __init__(self, role: Role, contact_id: str,
                 settings: ContactSettings | None = None) -> None:
        if role not in ("initiator", "responder"):
            raise ValueError(f"role must be 'initiator' or 'responder', got {role!r}")
        if not is_uuid4(contact_id):
            raise ValueError("contact_id is not a canonical lowercase UUIDv4")
        self.role: Role = role
        self.settings = settings or ContactSettings()
        self._contact_id = contact_id
        self._peer_contact_id: str | None = None
        self._token: str | None = None
        self._held = False                   # the token is stored on this side
        self._state = HandshakeState.IDLE
        self._outgoing: list[str] = []
        self._events: list[HandshakeEvent] = []
        self._fix: Fix | None = None
        self.meter: ContactMeter | None = None
        self.radius_m = self.settings.radius_m
        self.min_contact_s = self.settings.min_contact_s
        self.version: int | None = None      # the effective version, once the hellos are in
        self._started: float = 0.0           # CONTACT entered
        self._heard: float = 0.0             # last frame from the peer
        self._next_send: float = 0.0         # next position/heartbeat
        self._token_sent: float | None = None
        self._closing: str | None = None     # a close decided while STORING
        self.failure_reason: str | None = None
        self.close_reason: str | None = None

    # -- observation --------------------------------------------------------------------

    @property
    def state(self) -> HandshakeState:
        """The current state."""
        return self._state

    @property
    def token(self) -> str | None:
        """The token once known (crafted or received and checked), else ``None``."""
        return self._token

    def measures(self) -> ContactMeasures:
        """This side's measures of the contact so far (empty before the hellos)."""
        return self.meter.measures() if self.meter is not None else ContactMeasures()

    def data_to_send(self) -> list[str]:
        """Drain the text frames to send on the data channel, in order."""
        out, self._outgoing = self._outgoing, []
        return out

    def events(self) -> list[HandshakeEvent]:
        """Drain the events produced since the last call, in order."""
        out, self._events = self._events, []
        return out

    # -- inputs -------------------------------------------------------------------------

    def channel_open(self, now: float = 0.0) -> None:
        """The data channel is open: send our ``peer_hello``.

        Raises:
            LocalProtocolError: not in ``IDLE``.
        """
        if self._state is not HandshakeState.IDLE:
            raise LocalProtocolError(f"channel_open in state {self._state.value}")
        self._send(PeerHello(version=DATA_CHANNEL_VERSION, contact_id=self._contact_id,
                             min_contact_s=self.settings.min_contact_s,
                             radius_m=self.settings.radius_m))
        self._heard = now
        self._state = HandshakeState.AWAIT_HELLO

    def receive_data(self, data: str | bytes, now: float = 0.0) -> None:
        """Feed one data channel message received at ``now``: ``str`` for a text frame (WebRTC
        string, PPID 51), ``bytes`` for a binary one. Invalid or unexpected input ends the
        exchange (``abort`` sent); a binary frame is invalid input (``abort``
        ``bad_message: binary frame``), whatever it holds. Messages arriving after the end are
        ignored."""
        if self._state in TERMINAL:
            return
        self._heard = now
        if not isinstance(data, str):
            self._fail("bad_message", "bad_message: binary frame", now, notify_peer=True)
            return
        try:
            message = decode_peer_message(data)
        except MessageError as exc:
            self._fail("bad_message", f"bad_message: {exc}", now, notify_peer=True)
            return
        handler = _TRANSITIONS.get((self.role, self._state, type(message)))
        if handler is None and isinstance(message, Abort):
            self._fail(f"peer_aborted: {message.reason}", None, now, notify_peer=False)
            return
        if handler is None:
            self._fail("unexpected_message", f"unexpected {type(message).__name__} in "
                       f"{self._state.value}", now, notify_peer=True)
            return
        handler(self, message, now)

    def local_fix(self, fix: Fix | None, now: float) -> None:
        """This device's latest fix (None: no fix), kept for the next ``peer_position``.

        Feeding the fix already kept changes nothing (its time stays the one it was first
        seen at, for the jump rule). An implausible jump is neither measured nor sent.
        """
        if self._state in TERMINAL or fix == self._fix:
            return
        if fix is None:
            self._fix = None
            if self.meter is not None:
                self.meter.own(None, now)       # no sample until this device has a fix again
            return
        if self.meter is not None and not self.meter.own(fix, now):
            return
        self._fix = fix

    def tick(self, now: float) -> None:
        """Run the timers: send a position or heartbeat when due, end the contact when the
        peer is silent, parted, or the contact is too long, fail a token that got no ack."""
        if self._state not in _OPEN:
            return
        s = self.settings
        if self._state is HandshakeState.AWAIT_ACK:
            assert self._token_sent is not None
            if now - self._token_sent >= s.token_timeout_s:
                self._fail("timeout", "timeout", now, notify_peer=True)
                return
        elif self._state is not HandshakeState.STORING:
            assert self.meter is not None
            if (self.role == "responder" and self._state is HandshakeState.CONTACT
                    and self.min_contact_s == 0 and now - self._started >= s.token_timeout_s):
                # With min_contact_s 0 the token is due at once after the hellos.
                self._fail("timeout", "timeout", now, notify_peer=True)
                return
            if now - self._heard >= s.silence_s:
                self._close("channel_lost", now)
                return
            if now - self._started >= s.max_contact_s:
                self._close("max_contact", now)
                return
            last_in = self.meter.last_in if self.meter.last_in is not None else self._started
            if now - last_in >= s.contact_gap_s:
                self._close("parted", now)
                return
        if now >= self._next_send:
            self._send_position(now)

    def token_stored(self, new: bool, now: float = 0.0) -> None:
        """The adapter stored the token asked by :class:`StoreToken`.

        Args:
            new: False when the token was already in the store (not stored twice).

        Raises:
            LocalProtocolError: not in ``STORING``.
        """
        if self._state is not HandshakeState.STORING:
            raise LocalProtocolError(f"token_stored in state {self._state.value}")
        assert self._token is not None
        if self.role == "responder":
            self._send(TokenAck(token=self._token))
        self._held = True
        self._peer_contact_id = None
        self._state = HandshakeState.WITNESSED
        self._events.append(HandshakeCompleted(token=self._token, new=new,
                                                measures=self.measures()))
        if self._closing is not None:
            reason, self._closing = self._closing, None
            self._close(reason, now, notify_peer=reason == "stopped")

    def store_failed(self, reason: str, now: float = 0.0) -> None:
        """The adapter could not store the token (disk full, read-only): fail, tell the peer.

        Raises:
            LocalProtocolError: not in ``STORING``.
        """
        if self._state is not HandshakeState.STORING:
            raise LocalProtocolError(f"store_failed in state {self._state.value}")
        self._fail(f"store_failed: {reason}", "store_failed", now, notify_peer=True)

    def timeout(self, now: float = 0.0) -> None:
        """The adapter's establishment budget ran out (signaling to hellos). No effect once the
        hellos are exchanged or the exchange ended."""
        if self._state in (HandshakeState.IDLE, HandshakeState.AWAIT_HELLO):
            self._fail("timeout", "timeout", now, notify_peer=True)

    def channel_closed(self, now: float = 0.0) -> None:
        """The data channel or peer connection closed. No effect once the exchange ended.

        Before the hellos, or with the token on its way: :class:`HandshakeFailed`
        ``channel_closed``. In contact (token held or not): the contact ends, ``channel_lost``.
        While the token is being stored, the end waits for the store's report.
        """
        if self._state in TERMINAL:
            return
        if self._state is HandshakeState.STORING:
            self._closing = "channel_lost"  # the store decides: the end follows its report
        elif self._held or self._state is HandshakeState.CONTACT:
            self._close("channel_lost", now, notify_peer=False)
        else:
            self._fail("channel_closed", None, now, notify_peer=False)

    def stop(self, now: float = 0.0) -> None:
        """This device stops (app exit, task cancelled): send ``close`` ``stopped`` and end.
        While the token is being stored, the end waits for :meth:`token_stored`."""
        if self._state in TERMINAL:
            return
        if self._state is HandshakeState.STORING:
            self._closing = "stopped"
        elif self._state in (HandshakeState.IDLE, HandshakeState.AWAIT_HELLO,
                             HandshakeState.AWAIT_ACK):
            self._fail("stopped", "stopped", now, notify_peer=True)
        else:
            self._close("stopped", now)

    # -- transitions --------------------------------------------------------------------

    def _on_hello_before_open(self, message: PeerMessage, now: float) -> None:
        # The peer's first message may overtake our own "open" notification.
        self.channel_open(now)
        self._on_hello(message, now)

    def _on_hello(self, message: PeerMessage, now: float) -> None:
        assert isinstance(message, PeerHello)
        version = min(DATA_CHANNEL_VERSION, message.version)
        if version < MIN_DATA_CHANNEL_VERSION:
            self._fail("unsupported_version", "unsupported_version", now, notify_peer=True)
            return
        if message.contact_id == self._contact_id:
            self._fail("same_contact_id", "same_contact_id", now, notify_peer=True)
            return
        if self.role == "initiator":
            self._token = craft_token(self._contact_id, message.contact_id)
        else:
            self._peer_contact_id = message.contact_id
        self.radius_m = min(self.settings.radius_m, message.radius_m)
        self.min_contact_s = max(self.settings.min_contact_s, message.min_contact_s)
        self.version = version
        self.meter = ContactMeter(self.radius_m, self.settings.contact_gap_s,
                                  self.settings.max_speed_mps)
        if self._fix is not None:
            self.meter.own(self._fix, now)
        self._state = HandshakeState.CONTACT
        self._started = now
        self._events.append(Established(radius_m=self.radius_m,
                                        min_contact_s=self.min_contact_s))
        self._send_position(now)
        self._maybe_offer_token(now)

    def _on_position(self, message: PeerMessage, now: float) -> None:
        assert isinstance(message, PeerPosition) and self.meter is not None
        sample = self.meter.peer(Fix(message.latitude, message.longitude, message.accuracy_m),
                                 now)
        if sample is not None:
            self._events.append(PeerSample(sample))
        self._maybe_offer_token(now)

    def _on_heartbeat(self, message: PeerMessage, now: float) -> None:
        pass  # any frame counts as a heartbeat (receive_data noted the time)

    def _on_close(self, message: PeerMessage, now: float) -> None:
        if self._state is HandshakeState.STORING:
            self._closing = "peer_closed"  # the store runs on; the end follows token_stored()
        else:  # in AWAIT_ACK nothing is held here (the peer may hold the token alone)
            self._close("peer_closed", now, notify_peer=False)

    def _on_token(self, message: PeerMessage, now: float) -> None:
        assert isinstance(message, TokenOffer) and self._peer_contact_id is not None
        expected = craft_token(self._contact_id, self._peer_contact_id)
        if message.token != expected:
            self._fail("token_mismatch", "token_mismatch", now, notify_peer=True)
            return
        self._token = expected
        self._state = HandshakeState.STORING
        self._events.append(StoreToken(token=expected))

    def _on_ack(self, message: PeerMessage, now: float) -> None:
        assert isinstance(message, TokenAck) and self._token is not None
        if message.token != self._token:
            self._fail("ack_mismatch", "ack_mismatch", now, notify_peer=True)
            return
        self._state = HandshakeState.STORING
        self._events.append(StoreToken(token=self._token))

    # -- helpers ------------------------------------------------------------------------

    def _maybe_offer_token(self, now: float) -> None:
        if self.role != "initiator" or self._state is not HandshakeState.CONTACT:
            return
        assert self.meter is not None and self._token is not None
        if self.meter.within_s >= self.min_contact_s:
            self._send(TokenOffer(token=self._token))
            self._token_sent = now
            self._state = HandshakeState.AWAIT_ACK

    def _send_position(self, now: float) -> None:
        fix = self._fix
        if fix is None:
            self._send(Heartbeat())
        else:
            accuracy = fix.accuracy_m
            if accuracy is not None:
                accuracy = min(accuracy, MAX_WIRE_ACCURACY_M)
            self._send(PeerPosition(latitude=fix.latitude, longitude=fix.longitude,
                                    accuracy_m=accuracy))
        self._next_send = now + min(self.settings.position_interval_s, MAX_FRAME_INTERVAL_S)

    def _send(self, message: PeerMessage) -> None:
        self._outgoing.append(encode(message))

    def _end(self, state: HandshakeState, reason: str) -> None:
        opened = self._state is not HandshakeState.IDLE
        self._state = state
        self._peer_contact_id = None
        self._fix = None
        if self.meter is not None:
            self.meter.forget_positions()
        self.close_reason = reason
        if opened:
            self._events.append(ContactEnded(reason=reason, measures=self.measures(),
                                             token=self._token if self._held else None))

    def _close(self, reason: str, now: float, *, notify_peer: bool = True) -> None:
        if notify_peer:
            self._send(Close(reason=reason))
        self._end(HandshakeState.CLOSED, reason)

    def _fail(self, reason: str, wire_reason: str | None, now: float, *,
              notify_peer: bool) -> None:
        if notify_peer and wire_reason is not None:
            self._send(Abort(reason=wire_reason[:200]))
        if self._held:  # the token stays: only the contact ends
            self._end(HandshakeState.CLOSED, "aborted")
            return
        self.failure_reason = reason
        self._events.append(HandshakeFailed(reason=reason))
        self._end(HandshakeState.FAILED, "aborted")


_S = HandshakeState
_W = WitnessHandshake
_BOTH = ("initiator", "responder")
_TRANSITIONS: dict[tuple[str, HandshakeState, type], _Handler] = {
    **{(r, _S.IDLE, PeerHello): _W._on_hello_before_open for r in _BOTH},
    **{(r, _S.AWAIT_HELLO, PeerHello): _W._on_hello for r in _BOTH},
    **{(r, s, PeerPosition): _W._on_position for r in _BOTH for s in _OPEN},
    **{(r, s, Heartbeat): _W._on_heartbeat for r in _BOTH for s in _OPEN},
    **{(r, s, Close): _W._on_close for r in _BOTH for s in _OPEN},
    ("responder", _S.CONTACT, TokenOffer): _W._on_token,
    ("initiator", _S.AWAIT_ACK, TokenAck): _W._on_ack,
}
"""(role, state, message type) -> handler. Anything else is a protocol violation."""
