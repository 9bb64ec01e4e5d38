"""Domain events the engine emits; the Textual UI and ``--headless`` both consume them.

Every event is a frozen dataclass with a wire-style ``event`` name. :func:`to_json_dict` turns
one into the JSON object that ``fanny-tui --headless`` prints (one per line on stdout).

No event carries a session ID, contact ID or the peer's session ID (privacy invariants 1 and 3):
peers are named by a small in-memory ordinal (``peer``), unique for the life of the process.
Events about one broker name it (``broker``: ``[broker] name``, ``main`` by default, or a
``[[positives]]`` name; issue 8), never by anything it gave this device.
Positions appear only in :class:`GpsFix`, which is shown, never written to disk by the kit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

MAIN_BROKER = "main"
"""The default broker name (``fanny_tui.config.MAIN_BROKER``)."""


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    """Base class; ``event`` is the name used in JSON output."""

    event: ClassVar[str] = "event"


@dataclass(frozen=True)
class SessionStarted(Event):
    """A new session began: fresh session ID and contact ID (paper 3, step 1)."""

    event: ClassVar[str] = "session_started"


@dataclass(frozen=True)
class BrokerConnected(Event):
    """The session connection to the broker is up (hello answered). ``url``: the one of
    ``[broker] url`` that answered; ``broker``: its name."""

    event: ClassVar[str] = "broker_connected"
    url: str
    radius_m: float
    broker: str = MAIN_BROKER


@dataclass(frozen=True)
class BrokerDisconnected(Event):
    """The session connection is down; the engine retries after ``retry_in_s`` seconds
    (with several ``[broker] url``, on the next one). ``url``: the one that failed (``""``
    when not known); ``broker``: its name."""

    event: ClassVar[str] = "broker_disconnected"
    reason: str
    retry_in_s: float
    broker: str = MAIN_BROKER
    url: str = ""


@dataclass(frozen=True)
class GpsFix(Event):
    """A position fix: WGS84 degrees, accuracy in metres (95 %), gpsd mode 2 (2D) or 3 (3D)."""

    event: ClassVar[str] = "gps_fix"
    latitude: float
    longitude: float
    accuracy_m: float | None
    mode: int
    satellites_used: int | None = None
    satellites_visible: int | None = None
    time: datetime | None = None
    hdop: float | None = None
    source: str = "gpsd"
    """Where the fix comes from: ``gpsd`` or ``nmea`` (a receiver, live or replayed), ``fixed``
    (a configured position, not a receiver), ``walk`` or ``track`` (simulated: demo, fanny-sim)."""


@dataclass(frozen=True)
class IdsRotated(Event):
    """The session ID and contact ID were replaced by fresh UUIDv4s (privacy invariant 1).

    ``reason``: ``schedule`` (``[privacy] rotation_interval_s``) or ``declared`` (at once after
    a positive declaration). The IDs themselves never appear in an event.
    """

    event: ClassVar[str] = "ids_rotated"
    reason: str


@dataclass(frozen=True)
class GpsLost(Event):
    """No usable fix any more (no fix, gpsd gone, stale data); the broker is told."""

    event: ClassVar[str] = "gps_lost"
    reason: str


@dataclass(frozen=True)
class MatchFound(Event):
    """The broker reported another device within radius (paper 3, step 3)."""

    event: ClassVar[str] = "match"
    peer: int
    role: str


@dataclass(frozen=True)
class HandshakeProgress(Event):
    """The witness exchange with ``peer`` moved to ``state``.

    States: ``connecting`` (SDP offer/answer, ICE), ``exchanging`` (data channel open),
    ``stored`` (token held), ``failed``.
    """

    event: ClassVar[str] = "handshake"
    peer: int
    state: str


@dataclass(frozen=True)
class ChannelOpen(Event):
    """The data channel with ``peer`` is open (RFC 8831).

    ``local_candidate``/``remote_candidate``: the ICE candidate types of the selected pair
    (RFC 8445: ``host``, ``srflx``, ``prflx``, ``relay``), None when aiortc does not tell.
    """

    event: ClassVar[str] = "channel_open"
    peer: int
    local_candidate: str | None = None
    remote_candidate: str | None = None


@dataclass(frozen=True)
class PeerUpdate(Event):
    """A position sample exchanged with a live ``peer`` over the data channel (paper 2).

    Relative measures only, never the peer's position: ``distance_m`` (metres, haversine between
    the two latest fixes), ``bearing_deg`` (from this device to the peer, degrees clockwise from
    true north), ``peer_accuracy_m`` (the peer's reported accuracy, metres, 95 %), ``within``
    (the accuracy rule's verdict for this sample: ``in``, ``uncertain`` or ``out``),
    ``within_s`` (seconds within the radius so far in this contact) and ``samples`` (count).
    """

    event: ClassVar[str] = "peer_update"
    peer: int
    distance_m: float
    bearing_deg: float
    peer_accuracy_m: float | None
    within: str
    within_s: float
    samples: int


@dataclass(frozen=True)
class Contact:
    """The measures of one narrow contact (paper 2): seconds within the radius, closest and
    median distance in metres, number of samples. No timestamp (privacy invariant 5)."""

    duration_s: float
    closest_m: float | None
    median_m: float | None
    samples: int


@dataclass(frozen=True)
class ContactClosed(Event):
    """The data channel with ``peer`` closed; the contact's final measures.

    ``reason``: ``parted`` (out of the radius for ``contact_gap_s``), ``max_contact``
    (``max_contact_s`` reached), ``peer_closed``, ``channel_lost`` (no heartbeat, or the
    channel went away), ``stopped`` (the app stops), ``rotated`` (this device's IDs rotated,
    scheduled or after a positive declaration; the app runs on and the peer hears ``close``
    ``stopped``) or ``aborted`` (a failure; before the token it is also a ``handshake_failed``
    with the reason). ``token_stored``: whether this contact left a token on this device.
    """

    event: ClassVar[str] = "contact_closed"
    peer: int
    reason: str
    contact: Contact
    token_stored: bool


@dataclass(frozen=True)
class HandshakeFailed(Event):
    """The witness exchange with ``peer`` failed; nothing was stored by it."""

    event: ClassVar[str] = "handshake_failed"
    peer: int
    reason: str


@dataclass(frozen=True)
class TokenStored(Event):
    """A witness token is in the store (paper 3, steps 5-6). ``new`` False: it already was."""

    event: ClassVar[str] = "token_stored"
    peer: int
    token: str
    expires_at: datetime
    new: bool = True
    contact: Contact | None = None
    """The contact's measures when the token was stored (None: no sample yet)."""
    match_to_token_s: float | None = None
    """Seconds from the broker's match to the token being stored on this device."""


@dataclass(frozen=True)
class TokensExpired(Event):
    """``count`` expired tokens were deleted from the store (paper 3, step 6)."""

    event: ClassVar[str] = "tokens_expired"
    count: int


@dataclass(frozen=True)
class PositiveDeclared(Event):
    """The broker acknowledged the upload of ``count`` tokens; they are deleted locally."""

    event: ClassVar[str] = "positive_declared"
    count: int
    broker: str = MAIN_BROKER
    """The broker the declaration went to."""


@dataclass(frozen=True)
class PositivePending(Event):
    """A positive upload is not acknowledged yet; its ``count`` tokens are kept and retried."""

    event: ClassVar[str] = "positive_pending"
    count: int
    reason: str
    retry_in_s: float
    broker: str = MAIN_BROKER
    """The broker the declaration goes to."""


@dataclass(frozen=True)
class PositiveRefused(Event):
    """The broker refused a positive upload for good: its declaration code (paper section 5)
    or its content (issue 7: a refusal that a retry would meet again).

    ``reason``: ``code_required``, ``code_invalid``, ``code_expired`` or ``code_used``; or
    ``expiry_out_of_window`` (device clock off, or a token lifetime longer than the broker
    publishes), ``too_many_tokens``, ``duplicate_token``, ``bad_message``
    (:data:`fanny_tui.positives.FINAL_REFUSALS`); ``message``: the broker's explanation. The
    ``count`` tokens stay on the device, no longer pending: declare again (with a valid code,
    or once the cause is fixed). The refused upload is not retried.
    """

    event: ClassVar[str] = "positive_refused"
    reason: str
    count: int
    message: str = ""
    broker: str = MAIN_BROKER
    """The broker that refused it."""


@dataclass(frozen=True)
class PositivesPolled(Event):
    """A poll of positive tokens finished; ``received`` tokens were compared locally."""

    event: ClassVar[str] = "positives_polled"
    received: int
    next_poll_in_s: float | None = None
    """Seconds until the next scheduled poll."""
    broker: str = MAIN_BROKER
    """The broker polled (each broker is polled on its own)."""


@dataclass(frozen=True)
class PositivesPollFailed(Event):
    """A poll of positive tokens failed: exposure checks are not happening (paper 4, step 4).

    Emitted at every failed poll (broker unreachable, refused, a bad answer); the next
    :class:`PositivesPolled` ends the run of failures.
    """

    event: ClassVar[str] = "positives_poll_failed"
    reason: str
    """One line: why the last poll failed."""
    since: datetime
    """UTC instant of the first failed poll of the current run of failures."""
    attempts: int
    """Failed polls in a row, this one included."""
    next_poll_in_s: float | None = None
    """Seconds until the next scheduled poll."""
    broker: str = MAIN_BROKER
    """The broker whose poll failed (the others are polled all the same)."""


@dataclass(frozen=True)
class ExposureAlert(Event):
    """``count`` stored tokens were declared positive: the tester was exposed (paper 4, step 4).

    The matched tokens are deleted from the store.
    """

    event: ClassVar[str] = "exposure_alert"
    count: int
    contacts: tuple[Contact, ...] = ()
    """The stored measures of the matched tokens' contacts (those known)."""
    broker: str = MAIN_BROKER
    """The broker whose published positives matched."""


@dataclass(frozen=True)
class EngineError(Event):
    """Something failed that the tester should know about (storage full, bad broker reply)."""

    event: ClassVar[str] = "error"
    message: str


def to_json_dict(event: Event, now: datetime | None = None) -> dict[str, Any]:
    """The JSON object for one event: ``{"event": name, "at": ISO 8601 UTC, ...fields}``.

    Datetimes become ISO 8601 UTC text ending in ``Z``.
    """
    out: dict[str, Any] = {"event": event.event, "at": _iso(now or datetime.now(UTC))}
    for field in dataclasses.fields(event):
        out[field.name] = _plain(getattr(event, field.name))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value
