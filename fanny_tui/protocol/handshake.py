"""The witness exchange over the data channel, as a sans-I/O state machine (paper 3, steps 4-5).

Like h11 and websockets' ``protocol.py``, the machine does no I/O: the adapter
(:mod:`fanny_tui.peer`) feeds it what happened and drains what to do.

Inputs (methods): :meth:`WitnessHandshake.channel_open`, :meth:`~WitnessHandshake.receive_data`,
:meth:`~WitnessHandshake.token_stored`, :meth:`~WitnessHandshake.timeout`,
:meth:`~WitnessHandshake.channel_closed`.

Outputs (drained): :meth:`~WitnessHandshake.data_to_send` (text frames for the data channel) and
:meth:`~WitnessHandshake.events` (:class:`StoreToken`, :class:`HandshakeCompleted`,
:class:`HandshakeFailed`).

The exchange::

    initiator                                   responder
    channel open  ── contact_id(A) ──────────►  (stores A in memory)
                  ◄────────────── contact_id(B)  channel open
    token = SHA-256(sorted(A, B))
                  ── token(T) ───────────────►  checks T == SHA-256(sorted(A, B))
                                                StoreToken(T) -> adapter -> token_stored(new)
                  ◄─────────────────── ack(T)
    StoreToken(T) -> adapter -> token_stored(new)
    completed                                    completed

The responder stores first and acks; the initiator stores on the ack (step 5). Storing an
existing token is reported as ``new=False`` by the adapter: the token is never stored twice and
both sides still complete. A wrong token, an unexpected message or an abort fails the exchange
(an :class:`~fanny_tui.protocol.messages.Abort` is sent when the peer may still listen). Neither
side keeps the peer's contact ID after the exchange.

Every transition lives in one table (``_TRANSITIONS``); an illegal call raises
:class:`~fanny_tui.protocol.errors.LocalProtocolError` and leaves the state unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from .errors import LocalProtocolError, MessageError
from .messages import (
    Abort,
    ContactIdMessage,
    PeerMessage,
    Role,
    TokenAck,
    TokenOffer,
    decode_peer_message,
    encode,
)
from .tokens import craft_token, is_uuid4


class HandshakeState(enum.Enum):
    """States of one side of the witness exchange."""

    IDLE = "idle"                      # data channel not open yet
    AWAIT_PEER_ID = "await_peer_id"    # own contact ID sent, waiting for the peer's
    AWAIT_TOKEN = "await_token"        # responder: has the peer's ID, waiting for the token
    AWAIT_ACK = "await_ack"            # initiator: token sent, waiting for the ack
    STORING = "storing"                # StoreToken emitted, waiting for token_stored()
    COMPLETED = "completed"            # terminal: token held by this side
    FAILED = "failed"                  # terminal: nothing stored by this exchange


TERMINAL = frozenset({HandshakeState.COMPLETED, HandshakeState.FAILED})


@dataclass(frozen=True)
class StoreToken:
    """Ask the adapter to store ``token`` and then call ``token_stored(new)``."""

    token: str


@dataclass(frozen=True)
class HandshakeCompleted:
    """The exchange succeeded; ``new`` is False when the token was already stored."""

    token: str
    new: bool


@dataclass(frozen=True)
class HandshakeFailed:
    """The exchange failed; ``reason`` is short text such as ``timeout`` or ``token_mismatch``."""

    reason: str


HandshakeEvent = StoreToken | HandshakeCompleted | HandshakeFailed

_Handler = Callable[["WitnessHandshake", PeerMessage], None]


class WitnessHandshake:
    """One side of one witness exchange.

    Args:
        role: ``"initiator"`` (crafts the token, stores on ack) or ``"responder"``.
        contact_id: this device's contact ID (canonical UUIDv4 text), made at app start.

    Raises:
        ValueError: bad role or contact ID.
    """

    def __init__(self, role: Role, contact_id: str) -> None:
        if role not in ("initiator", "responder"):
            raise ValueError(f"role must be 'initiator' or 'responder', got {role!r}")
        if not is_uuid4(contact_id):
            raise ValueError("contact_id is not a canonical lowercase UUIDv4")
        self.role: Role = role
        self._contact_id = contact_id
        self._peer_contact_id: str | None = None
        self._token: str | None = None
        self._state = HandshakeState.IDLE
        self._outgoing: list[str] = []
        self._events: list[HandshakeEvent] = []
        self.failure_reason: str | None = None

    # -- observation --------------------------------------------------------------------

    @property
    def state(self) -> HandshakeState:
        """The current state."""
        return self._state

    @property
    def token(self) -> str | None:
        """The token once known (crafted or received and checked), else ``None``."""
        return self._token

    def data_to_send(self) -> list[str]:
        """Drain the text frames to send on the data channel, in order."""
        out, self._outgoing = self._outgoing, []
        return out

    def events(self) -> list[HandshakeEvent]:
        """Drain the events produced since the last call, in order."""
        out, self._events = self._events, []
        return out

    # -- inputs -------------------------------------------------------------------------

    def channel_open(self) -> None:
        """The data channel is open: send our contact ID.

        Raises:
            LocalProtocolError: not in ``IDLE``.
        """
        if self._state is not HandshakeState.IDLE:
            raise LocalProtocolError(f"channel_open in state {self._state.value}")
        self._send(ContactIdMessage(contact_id=self._contact_id))
        self._state = HandshakeState.AWAIT_PEER_ID

    def receive_data(self, data: str | bytes) -> None:
        """Feed one data channel message. Invalid or unexpected input fails the exchange.

        Messages arriving after the exchange ended are ignored.
        """
        if self._state in TERMINAL:
            return
        try:
            message = decode_peer_message(data)
        except MessageError as exc:
            self._fail("bad_message", f"bad_message: {exc}", notify_peer=True)
            return
        handler = _TRANSITIONS.get((self.role, self._state, type(message)))
        if handler is None and isinstance(message, Abort):
            self._fail(f"peer_aborted: {message.reason}", None, notify_peer=False)
            return
        if handler is None:
            self._fail("unexpected_message", f"unexpected {type(message).__name__} in "
                       f"{self._state.value}", notify_peer=True)
            return
        handler(self, message)

    def token_stored(self, new: bool) -> None:
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
        self._state = HandshakeState.COMPLETED
        self._forget_peer()
        self._events.append(HandshakeCompleted(token=self._token, new=new))

    def store_failed(self, reason: str) -> None:
        """The adapter could not store the token (disk full, read-only): fail, tell the peer.

        Raises:
            LocalProtocolError: not in ``STORING``.
        """
        if self._state is not HandshakeState.STORING:
            raise LocalProtocolError(f"store_failed in state {self._state.value}")
        self._fail(f"store_failed: {reason}", "store_failed", notify_peer=True)

    def timeout(self) -> None:
        """The adapter's handshake timer fired. No effect once the exchange ended."""
        if self._state not in TERMINAL:
            self._fail("timeout", "timeout", notify_peer=True)

    def channel_closed(self) -> None:
        """The data channel or peer connection closed. No effect once the exchange ended."""
        if self._state not in TERMINAL:
            self._fail("channel_closed", None, notify_peer=False)

    # -- transitions --------------------------------------------------------------------

    def _on_peer_id_initiator(self, message: PeerMessage) -> None:
        assert isinstance(message, ContactIdMessage)
        if message.contact_id == self._contact_id:
            self._fail("same_contact_id", "same_contact_id", notify_peer=True)
            return
        self._token = craft_token(self._contact_id, message.contact_id)
        self._send(TokenOffer(token=self._token))
        self._state = HandshakeState.AWAIT_ACK

    def _on_peer_id_responder(self, message: PeerMessage) -> None:
        assert isinstance(message, ContactIdMessage)
        if message.contact_id == self._contact_id:
            self._fail("same_contact_id", "same_contact_id", notify_peer=True)
            return
        self._peer_contact_id = message.contact_id
        self._state = HandshakeState.AWAIT_TOKEN

    def _on_peer_id_before_open(self, message: PeerMessage) -> None:
        # The peer's first message may overtake our own "open" notification.
        self.channel_open()
        handler = _TRANSITIONS[(self.role, self._state, ContactIdMessage)]
        handler(self, message)

    def _on_token(self, message: PeerMessage) -> None:
        assert isinstance(message, TokenOffer) and self._peer_contact_id is not None
        expected = craft_token(self._contact_id, self._peer_contact_id)
        if message.token != expected:
            self._fail("token_mismatch", "token_mismatch", notify_peer=True)
            return
        self._token = expected
        self._state = HandshakeState.STORING
        self._events.append(StoreToken(token=expected))

    def _on_ack(self, message: PeerMessage) -> None:
        assert isinstance(message, TokenAck) and self._token is not None
        if message.token != self._token:
            self._fail("ack_mismatch", "ack_mismatch", notify_peer=True)
            return
        self._state = HandshakeState.STORING
        self._events.append(StoreToken(token=self._token))

    # -- helpers ------------------------------------------------------------------------

    def _send(self, message: PeerMessage) -> None:
        self._outgoing.append(encode(message))

    def _forget_peer(self) -> None:
        self._peer_contact_id = None

    def _fail(self, reason: str, wire_reason: str | None, *, notify_peer: bool) -> None:
        if notify_peer and wire_reason is not None:
            self._send(Abort(reason=wire_reason[:200]))
        self._state = HandshakeState.FAILED
        self.failure_reason = reason
        self._forget_peer()
        self._events.append(HandshakeFailed(reason=reason))


_S = HandshakeState
_TRANSITIONS: dict[tuple[str, HandshakeState, type], _Handler] = {
    ("initiator", _S.IDLE, ContactIdMessage): WitnessHandshake._on_peer_id_before_open,
    ("responder", _S.IDLE, ContactIdMessage): WitnessHandshake._on_peer_id_before_open,
    ("initiator", _S.AWAIT_PEER_ID, ContactIdMessage): WitnessHandshake._on_peer_id_initiator,
    ("responder", _S.AWAIT_PEER_ID, ContactIdMessage): WitnessHandshake._on_peer_id_responder,
    ("responder", _S.AWAIT_TOKEN, TokenOffer): WitnessHandshake._on_token,
    ("initiator", _S.AWAIT_ACK, TokenAck): WitnessHandshake._on_ack,
}
"""(role, state, message type) -> handler. Anything else is a protocol violation."""
