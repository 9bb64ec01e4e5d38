"""Widgets of the FANNY field kit's main screen, and the text formatting they share.

Every widget here only displays what it is given; none talks to the engine, a socket or a
file. Remote text (reasons, error messages: anything that came in an event) is always wrapped
in :class:`rich.text.Text` or written with markup off, so a string such as ``peer[/]`` is shown
as typed instead of being parsed as console markup.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from rich.table import Table
from rich.text import Text
from textual.widgets import DataTable, RichLog, Static

from ..events import (
    BrokerConnected,
    BrokerDisconnected,
    EngineError,
    Event,
    ExposureAlert,
    GpsFix,
    GpsLost,
    HandshakeFailed,
    HandshakeProgress,
    MatchFound,
    PositiveDeclared,
    PositivePending,
    PositiveRefused,
    PositivesPolled,
    SessionStarted,
    TokensExpired,
    TokenStored,
)
from ..store import StoredToken

MAX_MATCH_ROWS = 200
"""Rows kept in the matches table; the oldest row goes when a new match would exceed it."""

MAX_LOG_LINES = 1000
"""Lines kept in the event log."""

HANDSHAKE_STYLES = {
    "matched": "yellow",
    "connecting": "cyan",
    "exchanging": "bold cyan",
    "stored": "bold green",
    "failed": "bold red",
}

EVENT_STYLES = {
    "broker_connected": "green",
    "broker_disconnected": "yellow",
    "gps_lost": "yellow",
    "handshake_failed": "red",
    "token_stored": "green",
    "positive_declared": "bold green",
    "positive_pending": "bold yellow",
    "positive_refused": "bold red",
    "exposure_alert": "bold red",
    "error": "bold red",
    "declare_positive": "bold magenta",
}


# -- formatting ---------------------------------------------------------------------------


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


def format_utc(moment: datetime) -> str:
    """An instant as ``2025-06-14 04:00 UTC``.

    Args:
        moment: an aware datetime (a naive one is taken as UTC).
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


REFUSAL_TEXTS = {
    "code_required": "the broker requires a declaration code",
    "code_invalid": "the declaration code is not valid (mistyped, or not issued for this broker)",
    "code_expired": "the declaration code has expired",
    "code_used": "the declaration code was already used",
}
"""What each refusal of a declaration code means, for the tester."""


def describe_refusal(reason: str, count: int) -> str:
    """One sentence on a refused declaration: why, and that the tokens stay here.

    Args:
        reason: the broker's refusal code (``code_used``...).
        count: tokens kept on the device.
    """
    why = REFUSAL_TEXTS.get(reason, f"the broker refused the declaration ({reason})")
    return (f"{why}: {_plural(count, 'token')} stay on this device, not uploaded; declare "
            "again with a valid code")


def abbreviate_token(token: str) -> str:
    """The first 8 hex characters of a witness token and an ellipsis, e.g. ``1a2b3c4d…``."""
    return f"{token[:8]}…"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def describe_event(event: Event) -> Text | None:
    """One human line for the event log (without time or name), or None for events not logged.

    GPS fixes are not described here (one a second would drown the log, and positions never
    go into a log): the main screen logs changes of fix mode itself. Remote text is kept
    literal (no markup).
    """
    match event:
        case SessionStarted():
            return Text("new session: fresh session and contact IDs, kept in memory only")
        case BrokerConnected(url=url, radius_m=radius):
            return Text(f"connected to {url} (match radius {radius:g} m)")
        case BrokerDisconnected(reason=reason, retry_in_s=retry):
            return Text.assemble(reason, f"; retry in {retry:g} s")
        case GpsLost(reason=reason):
            return Text.assemble("no fix: ", reason)
        case MatchFound(peer=peer, role=role):
            return Text.assemble(f"peer #{peer} nearby, role ", role)
        case HandshakeProgress(peer=peer, state=state):
            return Text.assemble(f"peer #{peer}: ", state)
        case HandshakeFailed(peer=peer, reason=reason):
            return Text.assemble(f"peer #{peer} failed: ", reason)
        case TokenStored(peer=peer, token=token, expires_at=expires, new=new):
            verb = "stored" if new else "already stored"
            return Text(f"peer #{peer}: token {abbreviate_token(token)} {verb}, "
                        f"expires {format_utc(expires)}")
        case TokensExpired(count=count):
            return Text(f"{_plural(count, 'expired token')} deleted")
        case PositiveDeclared(count=0):
            return Text("no token to upload")
        case PositiveDeclared(count=count):
            return Text(f"the broker has {_plural(count, 'token')}; deleted from this device")
        case PositivePending(count=count, reason=reason, retry_in_s=retry):
            return Text.assemble(f"{_plural(count, 'token')} kept until the broker has them: ",
                                 reason, f"; retry in {retry:g} s")
        case PositiveRefused(reason=reason, count=count):
            return Text(describe_refusal(reason, count))
        case PositivesPolled(received=received):
            return Text(f"{_plural(received, 'positive token')} received and compared here")
        case ExposureAlert(count=count):
            return Text(f"{_plural(count, 'stored token')} declared positive: possible exposure")
        case EngineError(message=message):
            return Text(message)
    return None


# -- widgets ------------------------------------------------------------------------------


class SessionPanel(Static):
    """Session ID, broker connection and GPS state, as a two-column grid.

    Positions are shown here and nowhere else (never logged).
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "Session"
        self.session_short = "…"
        self.broker_connected = False
        self.broker_detail: str = "connecting…"
        self.outage_since: datetime | None = None
        self.outage_attempts = 0
        self.retry_in_s: float | None = None
        self.fix: GpsFix | None = None
        self.gps_detail: str = "waiting for the first fix"

    def on_mount(self) -> None:
        """Draw the initial state."""
        self.redraw()

    def set_session(self, session_short: str) -> None:
        """Show the short session ID (first 8 characters; shown on this device only)."""
        self.session_short = session_short
        self.redraw()

    def set_broker(self, connected: bool, detail: str) -> None:
        """Show the broker state.

        Args:
            connected: True while the session connection is up.
            detail: URL when connected, reason and retry delay when not (remote text).
        """
        self.broker_connected = connected
        self.broker_detail = detail
        if connected:
            self.outage_since, self.outage_attempts, self.retry_in_s = None, 0, None
        self.redraw()

    def set_outage(self, reason: str, retry_in_s: float, now: datetime | None = None) -> None:
        """Show that the broker is unreachable: why, since when, attempts, next retry.

        Args:
            reason: the last failure (remote text).
            retry_in_s: seconds until the next attempt.
            now: the current instant (default: the clock).
        """
        if self.outage_since is None:
            self.outage_since = now or datetime.now(UTC)
        self.outage_attempts += 1
        self.retry_in_s = retry_in_s
        self.set_broker(False, reason)

    def set_fix(self, fix: GpsFix) -> None:
        """Show a position fix (WGS84 degrees, accuracy in metres)."""
        self.fix = fix
        self.gps_detail = ""
        self.redraw()

    def set_lost(self, reason: str) -> None:
        """Show that there is no usable fix, and why (remote text)."""
        self.fix = None
        self.gps_detail = reason
        self.redraw()

    def redraw(self) -> None:
        """Render the grid again from the current state."""
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(overflow="fold")
        grid.add_row("Session", Text(self.session_short, style="bold"))
        if self.broker_connected:
            grid.add_row("Broker", Text("connected", style="bold green"))
        else:
            state = Text("disconnected", style="bold yellow")
            if self.retry_in_s is not None:
                state.append(f", retry in {self.retry_in_s:g} s", style="yellow")
            grid.add_row("Broker", state)
        if self.broker_detail:
            grid.add_row("", Text(self.broker_detail, style="italic", no_wrap=True,
                                  overflow="ellipsis"))
        if not self.broker_connected and self.outage_since is not None:
            since = self.outage_since.astimezone().strftime("%H:%M:%S")
            grid.add_row("", Text(f"since {since}, {_plural(self.outage_attempts, 'attempt')}",
                                  style="italic", no_wrap=True, overflow="ellipsis"))
        fix = self.fix
        if fix is None:
            grid.add_row("GPS", Text("no fix", style="bold yellow"))
            if self.gps_detail:
                grid.add_row("", Text(self.gps_detail, style="italic", no_wrap=True,
                                      overflow="ellipsis"))
            dash = Text("–", style="dim")
            for label in ("Satellites", "Latitude", "Longitude", "Accuracy"):
                grid.add_row(label, dash)
        else:
            mode = "3D" if fix.mode >= 3 else "2D"
            grid.add_row("GPS", Text(f"{mode} fix", style="bold green"))
            used = "–" if fix.satellites_used is None else str(fix.satellites_used)
            seen = "–" if fix.satellites_visible is None else str(fix.satellites_visible)
            grid.add_row("Satellites", Text(f"{used} used / {seen} visible"))
            grid.add_row("Latitude", Text(f"{format_coordinate(fix.latitude)}°"))
            grid.add_row("Longitude", Text(f"{format_coordinate(fix.longitude)}°"))
            accuracy = "–" if fix.accuracy_m is None else f"{fix.accuracy_m:.1f} m"
            grid.add_row("Accuracy", Text(accuracy))
        self.update(grid)


class MatchesTable(DataTable[Text]):
    """Nearby matches: one row per peer (in-memory ordinal), its role and handshake state."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.border_title = "Nearby matches"

    def on_mount(self) -> None:
        """Add the columns."""
        self.add_column("Peer", key="peer", width=6)
        self.add_column("Role", key="role", width=10)
        self.add_column("Handshake", key="state", width=11)
        self.add_column("Reason", key="reason")

    def _key(self, peer: int) -> str:
        return str(peer)

    def has_peer(self, peer: int) -> bool:
        """True when ``peer`` has a row."""
        return self._key(peer) in self.rows

    def add_match(self, peer: int, role: str) -> None:
        """Add a row for a new match (state ``matched``); the oldest row goes past the limit."""
        if self.has_peer(peer):
            self.update_cell(self._key(peer), "role", Text(role))
            return
        while self.row_count >= MAX_MATCH_ROWS:
            self.remove_row(next(iter(self.rows)))
        self.add_row(Text(f"#{peer}"), Text(role), _state_text("matched"), Text(""),
                     key=self._key(peer))
        self.border_title = f"Nearby matches ({self.row_count})"

    def set_state(self, peer: int, state: str) -> None:
        """Show the handshake state of ``peer`` (a row is added if it had none)."""
        if not self.has_peer(peer):
            self.add_match(peer, "?")
        self.update_cell(self._key(peer), "state", _state_text(state))

    def set_reason(self, peer: int, reason: str) -> None:
        """Show why the exchange with ``peer`` failed (remote text, shown literally)."""
        if not self.has_peer(peer):
            self.add_match(peer, "?")
        self.update_cell(self._key(peer), "reason", Text(reason), update_width=True)


def _state_text(state: str) -> Text:
    return Text(state, style=HANDSHAKE_STYLES.get(state, ""))


class TokensTable(DataTable[Text]):
    """Stored witness tokens: abbreviated token, expiry (UTC), live countdown, upload marker.

    Rows are keyed by the full token and kept soonest expiry first.
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.border_title = "Tokens"
        self._expiry: dict[str, datetime] = {}

    def on_mount(self) -> None:
        """Add the columns."""
        self.add_column("Token", key="token", width=10)
        self.add_column("Expires at (UTC)", key="expires", width=20)
        self.add_column("Time left", key="left", width=16)
        self.add_column("Upload", key="upload", width=18)

    @property
    def tokens(self) -> set[str]:
        """The full tokens shown."""
        return set(self._expiry)

    def add_token(self, token: str, expires_at: datetime, *, pending: bool = False,
                  now: datetime | None = None, sort: bool = True) -> None:
        """Show one token (its pending marker is updated if it is shown already).

        Args:
            token: 64 hex characters.
            expires_at: aware expiry instant.
            pending: part of a positive upload the broker has not acknowledged yet.
            now: the current instant for the countdown (default: the clock, UTC).
            sort: keep the rows sorted by expiry (pass False while adding many, then sort once).
        """
        if token in self._expiry:
            self.update_cell(token, "upload", _pending_text(pending))
            return
        now = now or datetime.now(UTC)
        self._expiry[token] = expires_at
        self.add_row(Text(abbreviate_token(token)), Text(format_utc(expires_at)),
                     Text(format_countdown((expires_at - now).total_seconds())),
                     _pending_text(pending), key=token)
        if sort:
            self._sort()
        self._retitle()

    def sync(self, stored: Iterable[StoredToken], now: datetime | None = None) -> None:
        """Make the table show exactly ``stored`` (rows added, removed or re-marked)."""
        wanted = {item.token: item for item in stored}
        for token in list(self._expiry):
            if token not in wanted:
                del self._expiry[token]
                self.remove_row(token)
        for item in wanted.values():
            self.add_token(item.token, item.expires_at, pending=item.pending, now=now,
                           sort=False)
        self._sort()
        self._retitle()

    def tick(self, now: datetime | None = None) -> None:
        """Refresh every countdown (called once a second)."""
        now = now or datetime.now(UTC)
        for token, expires_at in self._expiry.items():
            self.update_cell(token, "left", Text(format_countdown((expires_at - now)
                                                                  .total_seconds())))

    def _sort(self) -> None:
        if self.row_count > 1:  # "YYYY-MM-DD HH:MM UTC" sorts as text
            self.sort("expires", "token", key=lambda cells: (cells[0].plain, cells[1].plain))

    def _retitle(self) -> None:
        pending = sum(1 for key in self._expiry
                      if self.get_cell(key, "upload").plain)
        title = f"Tokens ({len(self._expiry)})"
        if pending:
            title += f" · {pending} pending upload"
        self.border_title = title


def _pending_text(pending: bool) -> Text:
    return Text("⇡ pending upload", style="bold yellow") if pending else Text("")


class ExposureBanner(Static):
    """Hidden until an exposure alert; then a prominent line with the number of tokens."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.total = 0

    def add_alert(self, count: int) -> None:
        """Count ``count`` more tokens declared positive and show the banner (if count > 0)."""
        if count <= 0:
            return
        self.total += count
        verb = "was" if self.total == 1 else "were"
        self.update(Text(f"⚠ EXPOSURE ALERT: {_plural(self.total, 'stored token')} {verb} "
                         "declared positive: you may have been exposed."))
        self.add_class("-visible")


class EventLog(RichLog):
    """One line per event: local time, event name, text. Markup is off (remote text)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False, highlight=False, wrap=True,
                         max_lines=MAX_LOG_LINES)
        self.border_title = "Event log"

    def add(self, name: str, text: Text | str, *, at: datetime | None = None) -> None:
        """Append one line.

        Args:
            name: the event's wire name (``positive_pending``) or a UI action name.
            text: what happened; a ``str`` is shown literally, never parsed as markup.
            at: when (default: now), shown in local time.
        """
        moment = (at or datetime.now(UTC)).astimezone()
        line = Text.assemble((moment.strftime("%H:%M:%S"), "dim"), " ",
                             (name, EVENT_STYLES.get(name, "bold")), "  ")
        line.append_text(text if isinstance(text, Text) else Text(text))
        self.write(line)

    @property
    def plain_lines(self) -> list[str]:
        """The lines as plain text (as shown, after wrapping)."""
        return [strip.text for strip in self.lines]
