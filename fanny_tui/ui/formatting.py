"""Pure text formatting for the FANNY field kit's UI: numbers, durations, names and plain words.

Nothing here imports Textual, reads a clock or touches I/O: every function takes what it shows
(``now`` included) and returns text, so each is unit-tested on its own
(``tests/ui/test_formatting.py``). Remote text (reasons, error messages: anything that came in an
event) is wrapped in :class:`rich.text.Text`, never parsed as console markup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.text import Text

from ..events import (
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
    SessionStarted,
    TokensExpired,
    TokenStored,
)

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
    "nmea": None,
    "fixed": "fixed position (no GPS)",
    "walk": "simulated walk (no GPS)",
    "track": "simulated track (no GPS)",
}
"""What each ``GpsFix.source`` is, when it is not a receiver (None: a receiver)."""


def describe_gps_source(source: str) -> str | None:
    """Why a fix is not from a receiver (``fixed position (no GPS)``), None if it is.

    Args:
        source: ``GpsFix.source``: ``gpsd`` or ``nmea`` (a receiver), ``fixed``, ``walk``,
            ``track``; any other value is named as it is.
    """
    if source in GPS_SOURCES:
        return GPS_SOURCES[source]
    return f"{source} (no GPS)"


def format_fix_mode(mode: int) -> str:
    """gpsd's TPV mode in cgps' words: 2 -> ``2D fix``, 3 -> ``3D fix``, else ``no fix``."""
    return {2: "2D fix", 3: "3D fix"}.get(mode, "no fix")


# -- broker failures in plain words ---------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """A failure in plain words: what went wrong and what to do about it."""

    problem: str
    hint: str


_HTTP_STATUS = re.compile(r"(HTTP \d{3})")
_BROKER_CODE = re.compile(r"broker refused: ([a-z_]+)")

_FAILURES: tuple[tuple[tuple[str, ...], Failure], ...] = (
    (("Hostname mismatch", "IP address mismatch", "not valid for", "doesn't match"),
     Failure("certificate is for another host name",
             "put the name the certificate was issued for in [broker] url")),
    (("CERTIFICATE_VERIFY_FAILED", "SSLCertVerificationError"),
     Failure("the broker's certificate is not trusted",
             "set [broker] ca_file to the CA that signed it")),
    (("SSLError", "SSL:", "WRONG_VERSION_NUMBER"),
     Failure("TLS with the broker failed",
             "wss:// needs a TLS broker, ws:// a plain one: check [broker] url")),
    (("ConnectionRefusedError", "Connect call failed"),
     Failure("no broker answers at that address",
             "start fanny-broker or fix [broker] url")),
    (("gaierror", "Name or service not known", "nodename nor servname",
      "Temporary failure in name resolution"),
     Failure("the broker's host name is unknown",
             "check [broker] url, and that this device is online")),
    (("Network is unreachable", "No route to host", "Errno 101", "Errno 113"),
     Failure("no network route to the broker", "check Wi-Fi or mobile data")),
    (("InvalidStatus", "InvalidHandshake", "InvalidMessage", "InvalidUpgrade"),
     Failure("[broker] url is not a FANNY broker",
             "check the URL's path; a proxy may block WebSockets")),
    (("too_many_connections", "rate_limited"),
     Failure("the broker turned this device away", "it is busy; this device retries")),
    (("broker refused",),
     Failure("the broker refused this device", "kit and broker versions may differ")),
    (("bad answer to hello", "expected welcome"),
     Failure("the broker's answer was not understood", "kit and broker versions may differ")),
    (("no answer to hello", "TimeoutError", "timed out"),
     Failure("the broker did not answer in time",
             "slow network or busy broker; it retries")),
    (("connection closed (1001)",),
     Failure("the broker is restarting or stopping", "this device reconnects on its own")),
    (("connection closed", "ConnectionClosed", "ConnectionResetError", "closed by the broker"),
     Failure("the connection to the broker dropped", "this device reconnects on its own")),
)


def describe_failure(reason: str) -> Failure:
    """A broker failure reason as the link and the uploads report it, in plain words.

    The reasons are those of :class:`~fanny_tui.events.BrokerDisconnected` and
    :class:`~fanny_tui.events.PositivePending` (``ConnectionRefusedError: [Errno 111] Connect
    call failed ('127.0.0.1', 8765)``, ``SSLCertVerificationError: [SSL:
    CERTIFICATE_VERIFY_FAILED] …``, ``connection closed (1001)``...; see
    :mod:`fanny_tui.link`). The raw reason stays in the event log.

    Args:
        reason: the raw reason.

    Returns:
        What went wrong and what to do; an unknown reason is ``cannot reach the broker``, with
        its first 60 characters as the hint.
    """
    for needles, failure in _FAILURES:
        if any(needle in reason for needle in needles):
            detail = _HTTP_STATUS.search(reason) or _BROKER_CODE.search(reason)
            if detail is None:
                return failure
            return Failure(f"{failure.problem} ({detail.group(1)})", failure.hint)
    first = reason.splitlines()[0] if reason else "no reason given"
    return Failure("cannot reach the broker",
                   first if len(first) <= 60 else first[:59] + "…")


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


EXPOSURE_NEXT_STEP = "Next: get tested, follow your health authority, tell the test lead (? help)"
"""What to do after an exposure alert (shown in the banner)."""


def describe_exposure(total: int, contacts: tuple[Contact, ...] | list[Contact], *,
                      compact: bool = False) -> str:
    """The exposure banner's first line: how many tokens matched and their contacts' measures.

    Args:
        total: stored tokens declared positive so far.
        contacts: the measures of the matched tokens' contacts that are known (paper 2).
        compact: for a narrow screen: contacts as ``2m05s ≤2.1 m`` (:func:`format_contact`).
    """
    verb = "was" if total == 1 else "were"
    text = f"⚠ EXPOSURE ALERT: {plural(total, 'stored token')} {verb} declared positive"
    if compact:
        if contacts:
            text += ": contact " + "; ".join(format_contact(c) for c in contacts)
        return text
    text += ": you may have been exposed."
    if contacts:
        text += " Contact: " + "; ".join(describe_contact(c) for c in contacts) + "."
    return text


# -- the event log --------------------------------------------------------------------------


def describe_event(event: Event) -> Text | None:
    """One human line for the event log (without time or name), or None for events not logged.

    Routine events are not logged (the peers panel, the GPS panel and the status line show
    them): GPS fixes (one a second would drown the log, and positions never go into a log),
    handshake steps, data channels opening, peer position samples, and polls that brought
    nothing. Remote text is kept literal (no markup).
    """
    match event:
        case SessionStarted():
            return Text("new session: fresh session and contact IDs, kept in memory only")
        case IdsRotated(reason=reason):
            why = "after the declaration" if reason == "declared" else "on schedule"
            return Text.assemble("session and contact IDs renewed ", why)
        case BrokerConnected(url=url, radius_m=radius):
            return Text(f"connected to {url} (match radius {radius:g} m)")
        case BrokerDisconnected(reason=reason):
            failure = describe_failure(reason)
            return Text.assemble(failure.problem, " (", reason, ")")
        case GpsLost(reason=reason):
            return Text.assemble("no fix: ", reason)
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
            return Text.assemble(f"{peer_name(peer)}: contact over (", reason,
                                 f"): {describe_contact(contact)}; {left}")
        case TokensExpired(count=count):
            return Text(f"{plural(count, 'expired token')} deleted")
        case PositiveDeclared(count=0):
            return Text("no token to upload")
        case PositiveDeclared(count=count):
            return Text(f"the broker has {plural(count, 'token')}; deleted from this device")
        case PositivePending(count=count, reason=reason):
            return Text.assemble(f"{plural(count, 'token')} kept until the broker has them: ",
                                 describe_failure(reason).problem, " (", reason, ")")
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
        case EngineError(message=message):
            return Text(message)
    return None
