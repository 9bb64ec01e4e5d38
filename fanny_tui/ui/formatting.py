"""Pure text formatting for the FANNY field kit's UI: numbers, durations, names and plain words.

Nothing here imports Textual, reads a clock or touches I/O: every function takes what it shows
(``now`` included) and returns text, so each is unit-tested on its own
(``tests/ui/test_formatting.py``). Remote text (reasons, error messages: anything that came in an
event) is wrapped in :class:`rich.text.Text`, never parsed as console markup.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from rich.text import Text

from ..describe import explain, explain_gps
from ..events import (
    MAIN_BROKER,
    BrokerConnected,
    BrokerDisconnected,
    Contact,
    ContactClosed,
    EngineError,
    Event,
    ExposureAlert,
    GpsLost,
    HandshakeFailed,
    IdsRotated,
    MatchFound,
    PositiveDeclared,
    PositivePending,
    PositiveRefused,
    PositivesPolled,
    PositivesPollFailed,
    SessionStarted,
    TokensExpired,
    TokenStored,
)
from ..protocol.proximity import coarsest_matching_accuracy_m

COMPASS_POINTS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")
"""The 8 compass points, clockwise from true north, 45 degrees apart."""

DASH = "–"
"""Shown for a value that is not known."""


# -- numbers and durations ----------------------------------------------------------------


def plural(count: int, word: str) -> str:
    """``1 token``, ``2 tokens``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def format_coordinate(degrees: float) -> str:
    """A WGS84 coordinate in decimal degrees with 6 decimals (about 0.1 m), e.g. ``44.068817``.

    Args:
        degrees: latitude or longitude, WGS84 degrees.
    """
    return f"{degrees:.6f}"


def format_countdown(seconds: float) -> str:
    """Time left as ``14d 18h 03m 12s`` (whole seconds, rounded down); ``expired`` at or below 0.

    Args:
        seconds: time left, in seconds.
    """
    if seconds <= 0:
        return "expired"
    left = int(seconds)
    days, left = divmod(left, 86_400)
    hours, left = divmod(left, 3_600)
    minutes, secs = divmod(left, 60)
    return f"{days}d {hours:02d}h {minutes:02d}m {secs:02d}s"


def format_duration(seconds: float | None) -> str:
    """A short duration: ``45s``, ``3m05s``, ``1h02m`` (rounded down); ``–`` when unknown.

    Args:
        seconds: a duration in seconds (negative is shown as ``0s``).
    """
    if seconds is None:
        return DASH
    left = max(0, int(seconds))
    if left < 60:
        return f"{left}s"
    minutes, secs = divmod(left, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_seconds(seconds: float | None) -> str:
    """A latency or age: ``0.4 s`` under 10 s, else as :func:`format_duration`; ``–`` if None.

    Args:
        seconds: seconds (negative is shown as ``0.0 s``).
    """
    if seconds is None:
        return DASH
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    return format_duration(seconds)


def format_distance(metres: float | None) -> str:
    """A distance: ``3.2 m`` under 10 m, ``42 m``, ``1.3 km`` from 1 km; ``–`` when unknown.

    Args:
        metres: distance in metres.
    """
    if metres is None:
        return DASH
    if metres < 10:
        return f"{metres:.1f} m"
    if metres < 1000:
        return f"{metres:.0f} m"
    return f"{metres / 1000:.1f} km"


def format_accuracy(metres: float | None) -> str:
    """A 95 % accuracy radius as ``±4.2 m`` (see :func:`format_distance`); ``–`` when unknown."""
    return DASH if metres is None else f"±{format_distance(metres)}"


def compass_point(bearing_deg: float) -> str:
    """The nearest of the 8 compass points for a bearing: 0 -> ``N``, 100 -> ``E``, 340 -> ``N``.

    Args:
        bearing_deg: degrees clockwise from true north (any value; taken modulo 360).
    """
    return COMPASS_POINTS[round((bearing_deg % 360) / 45) % 8]


def format_bearing(bearing_deg: float | None) -> str:
    """A bearing as ``045° NE`` (degrees clockwise from true north); ``–`` when unknown."""
    if bearing_deg is None:
        return DASH
    degrees = round(bearing_deg % 360) % 360
    return f"{degrees:03d}° {compass_point(bearing_deg)}"


def format_utc(moment: datetime) -> str:
    """An instant as ``2025-06-14 04:00 UTC``.

    Args:
        moment: an aware datetime (a naive one is taken as UTC).
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def format_clock(moment: datetime) -> str:
    """The time of day of an instant, UTC: ``04:31:07``."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%H:%M:%S")


def format_retry(seconds_left: float) -> str:
    """A live retry countdown: ``retry in 12 s`` (rounded up), ``retrying…`` once it is due.

    Args:
        seconds_left: seconds until the next attempt (0 or less: due).
    """
    if seconds_left <= 0:
        return "retrying…"
    return f"retry in {int(-(-seconds_left // 1))} s"


def peer_name(peer: int) -> str:
    """The name a tester sees for a peer: ``peer 3`` (the engine's in-memory ordinal)."""
    return f"peer {peer}"


STATE_WORDS = {"exchanging": "open"}
"""Handshake states in a tester's words, where they differ (``exchanging``: the data channel
is open, the witness messages go over it)."""


def format_state(state: str, candidates: str | None = None) -> str:
    """A peer's handshake state with the ICE candidate types of its data channel:
    ``connecting``, ``open (host)``, ``stored (relay)``, ``failed``.

    Args:
        state: ``HandshakeProgress.state`` (``matched``, ``connecting``, ``exchanging``,
            ``stored``, ``closed``, ``failed``).
        candidates: the selected pair's types (:func:`fanny_tui.ui.peers.candidate_pair`),
            None when not known.
    """
    word = STATE_WORDS.get(state, state)
    return word if candidates is None else f"{word} ({candidates})"


CLOSE_REASONS = {
    "parted": "parted",
    "max_contact": "max. contact time",
    "peer_closed": "the peer closed it",
    "channel_lost": "channel lost",
    "stopped": "app stopped",
    "rotated": "IDs rotated",
    "aborted": "aborted",
}
"""Why a contact closed (``ContactClosed.reason``), in a tester's words."""


def describe_close_reason(reason: str) -> str:
    """``ContactClosed.reason`` in words (``peer_closed`` -> ``the peer closed it``); an
    unknown reason is kept as it is."""
    return CLOSE_REASONS.get(reason, reason)


FAILURE_WORDS = {
    "timeout": "timed out",
    "channel_closed": "channel closed",
    "broker_unavailable": "broker unreachable",
    "bad_message": "bad message",
    "unexpected_message": "unexpected message",
    "store_failed": "could not store",
    "stopped": "app stopped",
    "unsupported_version": "other version",
    "same_contact_id": "same contact ID",
    "token_mismatch": "token mismatch",
    "ack_mismatch": "ack mismatch",
    "bad_sdp": "bad SDP",
    "unexpected_signal": "bad signaling",
    "signaling_failed": "signaling failed",
    "mdns_candidate_refused": ".local candidate",
    "no_relay_candidate": "no TURN relay",
    "candidate_outside_allowed": "address refused",
    "error": "error",
}
"""Why a witness exchange failed (``HandshakeFailed.reason``: the code before any ``": "``), in
a tester's words of at most 18 characters (``failed: `` and them fit :data:`MAX_STATE`);
``peer_aborted: CODE`` reads ``peer: WORDS``. The event log keeps the whole reason."""

MAX_STATE = 26
"""Characters of the Live peers table's state cell at most, so that every column fits 80
columns (a Raspberry Pi console) with the table's scroll bar; longer is cut with "…"."""


def describe_failure_reason(reason: str) -> str:
    """``HandshakeFailed.reason`` in a few words for the Live peers table: ``timeout`` ->
    ``timed out``, ``peer_aborted: timeout`` -> ``peer: timed out``, ``store_failed: disk
    full`` -> ``could not store``; an unknown reason (remote text) is kept as it is."""
    code, _, rest = reason.partition(": ")
    if code == "peer_aborted":
        return f"peer: {describe_failure_reason(rest)}" if rest else "peer gave up"
    return FAILURE_WORDS.get(code, reason)


def format_peer_state(state: str, candidates: str | None, reason: str | None) -> str:
    """The Live peers table's state cell, at most :data:`MAX_STATE` characters: while live,
    :func:`format_state` (``open (host)``); once the contact closed or the exchange failed,
    the state and why in words: ``closed: parted``, ``failed: timed out`` (the ICE candidate
    types were shown while the channel was open; the event log has the whole reason).

    Args:
        state: ``HandshakeProgress.state``.
        candidates: the selected pair's ICE candidate types, None when not known.
        reason: ``ContactClosed.reason`` (state ``closed``) or ``HandshakeFailed.reason``
            (state ``failed``), None when not known (ignored in other states).
    """
    if state == "closed" and reason:
        shown = f"closed: {describe_close_reason(reason)}"
    elif state == "failed" and reason:
        shown = f"failed: {describe_failure_reason(reason)}"
    else:
        shown = format_state(state, candidates)
    return shown if len(shown) <= MAX_STATE else shown[:MAX_STATE - 1] + "…"


def abbreviate_token(token: str) -> str:
    """The first 8 hex characters of a witness token and an ellipsis, e.g. ``1a2b3c4d…``."""
    return f"{token[:8]}…"


def format_contact(contact: Contact | None) -> str:
    """A contact's measures for a table cell: ``3m05s ≤2.1 m`` (time within the radius, closest
    distance); ``–`` when unknown (paper 2)."""
    if contact is None:
        return DASH
    if contact.closest_m is None:
        return format_duration(contact.duration_s)
    return f"{format_duration(contact.duration_s)} ≤{format_distance(contact.closest_m)}"


def describe_contact(contact: Contact) -> str:
    """A contact's measures in words: ``3m05s within the radius, closest 2.1 m, median 4.0 m``."""
    parts = [f"{format_duration(contact.duration_s)} within the radius"]
    if contact.closest_m is not None:
        parts.append(f"closest {format_distance(contact.closest_m)}")
    if contact.median_m is not None:
        parts.append(f"median {format_distance(contact.median_m)}")
    return ", ".join(parts)


# -- GPS ------------------------------------------------------------------------------------

GPS_SOURCES = {
    "gpsd": None,
    "nmea": "NMEA replay (no GPS)",
    "fixed": "fixed position (no GPS)",
    "walk": "simulated walk (no GPS)",
    "track": "simulated track (no GPS)",
}
"""What each ``GpsFix.source`` is, when it is not a receiver (None: a receiver). An NMEA log
replay is not one: its fixes were measured once, elsewhere (as ``fanny-tui report`` says)."""


def describe_gps_source(source: str) -> str | None:
    """Why a fix is not from a receiver (``fixed position (no GPS)``), None if it is.

    Args:
        source: ``GpsFix.source``: ``gpsd`` (a receiver), ``nmea`` (a log replay),
            ``fixed``, ``walk``, ``track``; any other value is named as it is.
    """
    if source in GPS_SOURCES:
        return GPS_SOURCES[source]
    return f"{source} (no GPS)"


RECEIVER_CLOCK_TOLERANCE_S = 5.0
"""How far (seconds, either way) a fix's GPS time may be from the device clock at its arrival
and still be taken as when it was measured (gpsd sends a fix well within a second)."""


def fix_measured_at(gps_time: datetime | None, received_at: datetime) -> tuple[datetime, bool]:
    """When a fix was measured, for its age: its GPS time (UTC) if plausible, else its arrival.

    A replayed log (gpsfake, an NMEA file) carries the log's old date, and a receiver without a
    time fix or a device with a wrong clock can be off by days: such a GPS time would make a
    fresh fix look years old. It is plausible within :data:`RECEIVER_CLOCK_TOLERANCE_S` of
    ``received_at``.

    Args:
        gps_time: ``GpsFix.time`` (a naive value is UTC), or None.
        received_at: the device clock (UTC) when the fix arrived.

    Returns:
        ``(instant, from_gps)``: the instant to count the age from, and True if it is the GPS
        time.
    """
    if gps_time is None:
        return received_at, False
    if gps_time.tzinfo is None:
        gps_time = gps_time.replace(tzinfo=UTC)
    if abs((gps_time - received_at).total_seconds()) <= RECEIVER_CLOCK_TOLERANCE_S:
        return gps_time, True
    return received_at, False


def format_fix_age(age_s: float | None, gps_time: datetime | None, from_gps: bool
                   ) -> tuple[Text, Text | None]:
    """The GPS panel's age of the fix, and a note when it does not count from the GPS time.

    Args:
        age_s: seconds since the fix was measured (or arrived), None when unknown.
        gps_time: ``GpsFix.time`` (a naive value is UTC), or None.
        from_gps: whether ``age_s`` counts from ``gps_time`` (see :func:`fix_measured_at`).

    Returns:
        ``(age, note)``: ``0.4 s`` and None; or, when the GPS time was not plausible (a
        replayed log, a receiver clock that is off), ``0.4 s since arrival`` and ``GPS time
        2005-06-08 17:15`` (UTC, to the minute: at most 25 characters).
    """
    age = Text(format_seconds(age_s))
    if gps_time is None or from_gps:
        return age, None
    if gps_time.tzinfo is None:
        gps_time = gps_time.replace(tzinfo=UTC)
    age.append(" since arrival")
    return age, Text(gps_time.astimezone(UTC).strftime("GPS time %Y-%m-%d %H:%M"), style="dim")


def format_fix_mode(mode: int) -> str:
    """gpsd's TPV mode in cgps' words: 2 -> ``2D fix``, 3 -> ``3D fix``, else ``no fix``."""
    return {2: "2D fix", 3: "3D fix"}.get(mode, "no fix")


def too_coarse(accuracy_m: float | None, radius_m: float) -> tuple[str, str] | None:
    """Plain words when a fix is too coarse to ever make a contact at ``radius_m``: with a
    peer as accurate, the accuracy rule never says ``in`` (docs/protocol.md, "The accuracy
    rule"; the threshold is
    :func:`~fanny_tui.protocol.proximity.coarsest_matching_accuracy_m`, about 2.12 radii).

    Args:
        accuracy_m: the fix's 95 % horizontal accuracy in metres (eph), None when unknown.
        radius_m: the match radius in metres (> 0).

    Returns:
        None when the accuracy is unknown or fine; else ``("⚠ too coarse for 10 m contacts",
        "needs ±21 m or better")``: what is wrong, then the accuracy needed.
    """
    if accuracy_m is None:
        return None
    limit = coarsest_matching_accuracy_m(radius_m)
    if accuracy_m <= limit:
        return None
    return (f"⚠ too coarse for {format_distance(radius_m)} contacts",
            f"needs {format_accuracy(math.floor(limit * 10) / 10)} or better")


def poll_only_todo(todo: str) -> str:
    """:attr:`fanny_tui.describe.Explanation.todo` for a ``[[positives]]`` broker: the
    config keys it names are that broker's (``check [broker] url`` -> ``check its url``)."""
    return todo.replace("[broker] ", "its ")


# -- declarations ---------------------------------------------------------------------------

REFUSAL_TEXTS = {
    "code_required": "the broker requires a declaration code",
    "code_invalid": "the declaration code is not valid (mistyped, or not issued for this broker)",
    "code_expired": "the declaration code has expired",
    "code_used": "the declaration code was already used",
    "expiry_out_of_window": "the broker refused the tokens' expiry dates (is this device's "
                            "clock right? is [protocol] token_lifetime_days longer than the "
                            "broker accepts?)",
    "too_many_tokens": "the upload held more tokens than one upload may carry",
    "duplicate_token": "the upload held a token twice with different expiries",
    "bad_message": "the broker could not read the upload (another kit version?)",
}
"""What each final refusal of a declaration (its code, or its content) means, for the tester."""


def describe_refusal(reason: str, count: int) -> str:
    """One sentence on a refused declaration: why, and that the tokens stay here.

    Args:
        reason: the broker's refusal code (``code_used``...).
        count: tokens kept on the device.
    """
    why = REFUSAL_TEXTS.get(reason, f"the broker refused the declaration ({reason})")
    then = ("declare again with a valid code" if reason.startswith("code_")
            else "declare again once this is fixed")
    return f"{why}: {plural(count, 'token')} stay on this device, not uploaded; {then}"


def refusal_toast(reason: str, count: int) -> str:
    """A refused declaration in a few words, for a brief notice: why, and that the tokens
    stay (the event log has :func:`describe_refusal`'s full sentence).

    Args:
        reason: the broker's refusal code (``code_used``...).
        count: tokens kept on the device.
    """
    why = REFUSAL_TEXTS.get(reason, f"refused ({reason})").split(" (", 1)[0]
    return f"{why[:1].upper()}{why[1:]}. {plural(count, 'token')} kept here; press d to retry."


EXPOSURE_NEXT_STEP = "Next: get tested, follow your health authority, tell the test lead (? help)"
"""What to do after an exposure alert (shown in the banner)."""


BANNER_CONTACTS = 4
"""At most this many contacts are listed in the exposure banner; the rest are counted (the
event log lists them all)."""


def describe_exposure(total: int, contacts: tuple[Contact, ...] | list[Contact], *,
                      compact: bool = False, limit: int | None = BANNER_CONTACTS) -> str:
    """The exposure banner's first line: how many tokens matched and their contacts' measures.

    Args:
        total: stored tokens declared positive so far.
        contacts: the measures of the matched tokens' contacts that are known (paper 2).
        compact: for a narrow screen: contacts as ``2m05s ≤2.1 m`` (:func:`format_contact`).
        limit: list at most this many contacts, then ``and N more (event log)``; None: all.
    """
    verb = "was" if total == 1 else "were"
    text = f"⚠ EXPOSURE ALERT: {plural(total, 'stored token')} {verb} declared positive"
    shown = list(contacts) if limit is None else list(contacts)[:limit]
    more = len(contacts) - len(shown)
    rest = f"; and {more} more (event log)" if more else ""
    if compact:
        if shown:
            label = "contact" if len(contacts) == 1 else "contacts"
            text += f": {label} " + "; ".join(format_contact(c) for c in shown) + rest
        return text
    text += ": you may have been exposed."
    if shown:
        text += " Contact: " + "; ".join(describe_contact(c) for c in shown) + rest + "."
    return text


# -- the event log --------------------------------------------------------------------------


def describe_event(event: Event, *, main: str = MAIN_BROKER) -> Text | None:
    """One human line for the event log (without time or name), or None for events not logged.

    Routine events are not logged (the peers panel, the GPS panel and the status line show
    them): GPS fixes (one a second would drown the log, and positions never go into a log),
    handshake steps, data channels opening, peer position samples, and polls that brought
    nothing. Remote text is kept literal (no markup). An event about another broker than
    ``main`` (the device's own, ``[broker] name``) starts with that broker's name.
    """
    text = _describe_event(event)
    broker = getattr(event, "broker", main)
    if text is None or broker == main:
        return text
    return Text.assemble((f"{broker}: ", "bold"), text)


def _describe_event(event: Event) -> Text | None:
    match event:
        case SessionStarted():
            return Text("new session: fresh session and contact IDs, kept in memory only")
        case IdsRotated(reason=reason):
            why = "after the declaration" if reason == "declared" else "on schedule"
            return Text.assemble("session and contact IDs renewed ", why)
        case BrokerConnected(url=url, radius_m=radius):
            return Text(f"connected to {url} (match radius {radius:g} m)")
        case BrokerDisconnected(reason=reason):
            return Text.assemble(explain(reason).headline, " (", reason, ")")
        case GpsLost(reason=reason):
            return Text.assemble("no fix: ", explain_gps(reason).headline, " (", reason, ")")
        case MatchFound(peer=peer, role=role):
            return Text.assemble(f"{peer_name(peer)} within the radius, role ", role)
        case HandshakeFailed(peer=peer, reason=reason):
            return Text.assemble(f"{peer_name(peer)}: no token, exchange failed: ", reason)
        case TokenStored(peer=peer, token=token, expires_at=expires, new=new, contact=contact):
            verb = "stored" if new else "already stored"
            line = (f"{peer_name(peer)}: token {abbreviate_token(token)} {verb}, "
                    f"expires {format_utc(expires)}")
            if contact is not None:
                line += f" ({describe_contact(contact)})"
            return Text(line)
        case ContactClosed(peer=peer, reason=reason, contact=contact, token_stored=stored):
            left = "token stored" if stored else "no token"
            return Text.assemble(f"{peer_name(peer)}: contact over (",
                                 describe_close_reason(reason),
                                 f"): {describe_contact(contact)}; {left}")
        case TokensExpired(count=count):
            return Text(f"{plural(count, 'expired token')} deleted")
        case PositiveDeclared(count=0):
            return Text("no token to upload")
        case PositiveDeclared(count=count):
            return Text(f"the broker has {plural(count, 'token')}; deleted from this device")
        case PositivePending(count=count, reason=reason):
            return Text.assemble(f"{plural(count, 'token')} kept until the broker has them: ",
                                 explain(reason).headline, " (", reason, ")")
        case PositiveRefused(reason=reason, count=count):
            return Text(describe_refusal(reason, count))
        case PositivesPolled(received=0):
            return None
        case PositivesPolled(received=received):
            return Text(f"{plural(received, 'positive token')} received and compared here")
        case ExposureAlert(count=count, contacts=contacts):
            text = f"{plural(count, 'stored token')} declared positive: possible exposure"
            if contacts:
                text += "; " + "; ".join(describe_contact(c) for c in contacts)
            return Text(text)
        case PositivesPollFailed(attempts=1, reason=reason):
            return Text.assemble("checking positives failed: ", explain(reason).headline,
                                 " (", reason, ")")
        case PositivesPollFailed():
            return None   # the status line counts the failures that follow
        case EngineError(message=message):
            return Text(message)
    return None
