"""Widgets of the FANNY field kit's main screen.

Every widget here only displays what it is given; none talks to the engine, a socket or a
file, and none reads the clock: time-dependent text (countdowns, ages) is drawn from the
``now`` passed to :meth:`tick` / the setters (the app's clock, fixed in snapshot tests). Text
comes from the pure functions of :mod:`fanny_tui.ui.formatting`. Remote text (reasons, error
messages: anything that came in an event) is always wrapped in :class:`rich.text.Text` or
written with markup off, so a string such as ``peer[/]`` is shown as typed.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from textual.events import Resize
from textual.widgets import DataTable, RichLog, Static

from ..describe import explain, explain_gps
from ..events import Contact, GpsFix
from ..store import StoredToken
from .formatting import (
    DASH,
    EXPOSURE_NEXT_STEP,
    abbreviate_token,
    describe_exposure,
    describe_gps_source,
    fix_measured_at,
    format_accuracy,
    format_bearing,
    format_clock,
    format_contact,
    format_coordinate,
    format_countdown,
    format_distance,
    format_duration,
    format_fix_age,
    format_fix_mode,
    format_peer_state,
    format_retry,
    format_seconds,
    format_utc,
    peer_name,
    plural,
    poll_only_todo,
    too_coarse,
)
from .peers import RANGE_RINGS, LivePeer, RadarCell, merged_contact, radar_cells

WAITING_FOR_FIX = "waiting for the first fix"
"""The GPS half before any fix or loss came (not a failure: no next step shown)."""

MAX_LOG_LINES = 1000
"""Lines kept in the event log."""

HANDSHAKE_STYLES = {
    "matched": "yellow",
    "connecting": "cyan",
    "exchanging": "bold cyan",
    "stored": "bold green",
    "closed": "dim",
    "failed": "bold red",
}

WITHIN_STYLES = {"in": "bold green", "uncertain": "yellow", "out": "dim"}
"""How a peer's distance is drawn, by the accuracy rule's verdict (``PeerUpdate.within``)."""

RADAR_STYLES = {
    "ring": "green", "edge": "dim green", "label": "bold", "self": "bold cyan",
    "peer-in": "bold green", "peer-uncertain": "bold yellow", "peer-out": "bold white",
    "peer-far": "dim",
}

EVENT_STYLES = {
    "broker_connected": "green",
    "broker_disconnected": "yellow",
    "gps_lost": "yellow",
    "handshake_failed": "red",
    "token_stored": "green",
    "contact_closed": "cyan",
    "positive_declared": "bold green",
    "positive_pending": "bold yellow",
    "positive_refused": "bold red",
    "exposure_alert": "bold red",
    "error": "bold red",
    "declare_positive": "bold magenta",
}


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def hidden_rows_hint(table: DataTable[Text]) -> str:
    """`` · 2 of 6 shown, Tab ↑↓ for more`` when some rows of ``table`` do not fit its
    height (a short screen, the exposure banner up), else ``""``: for its title."""
    visible = table.scrollable_content_region.height - (table.header_height
                                                        if table.show_header else 0)
    if visible <= 0 or table.row_count <= visible:
        return ""
    return f" · {visible} of {table.row_count} shown, Tab ↑↓ for more"


class TitleBar(Static):
    """One line: the title, and where help is (hidden on short screens)."""

    def __init__(self, title: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title

    def on_mount(self) -> None:
        """Draw the line."""
        line = Table.grid(expand=True)
        line.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        line.add_column(justify="right", no_wrap=True)
        line.add_row(Text(self.title, style="bold"), Text("? help", style="dim"))
        self.update(line)


@dataclass(frozen=True)
class PanelRow:
    """One row of a half of the Session panel: a label, a value, how much it matters.

    Attributes:
        label: the label column ("" for a continuation).
        value: the value (remote text already wrapped in :class:`Text`).
        keep: rows with the lowest ``keep`` are left out first when the half has more rows
            than the panel's height (see :func:`fit_rows`).
        wrap: the value wraps (by words) to the column's width; else it is cut with "…".
    """

    label: str
    value: Text
    keep: int
    wrap: bool = False


_MEASURE = Console(file=io.StringIO(), width=200, no_color=True)
"""Measures how many lines a value wraps to (writes nothing anywhere)."""


def fit_rows(rows: list[PanelRow], height: int, width: int) -> list[PanelRow]:
    """The rows to show in ``height`` lines, values ``width`` columns wide: all of them when
    they fit, else those that matter most (highest ``keep``; among equals, the first), in
    their order. A wrapped value takes as many lines as it wraps to; ``height`` or ``width``
    0 (not laid out yet): all rows."""
    if height <= 0 or width <= 0:
        return rows
    lines = [len(row.value.wrap(_MEASURE, width)) if row.wrap else 1 for row in rows]
    kept = set(range(len(rows)))
    by_importance = sorted(range(len(rows)), key=lambda i: (rows[i].keep, -i))
    for i in by_importance:
        if sum(lines[k] for k in kept) <= height:
            break
        kept.discard(i)
    return [row for i, row in enumerate(rows) if i in kept]


class SessionPanel(Static):
    """Session ID (in the border), broker state and GPS state, side by side.

    The broker column says why the broker cannot be reached in plain words, what to do, since
    when, and counts down to the next retry; the GPS column is what ``cgps`` users look for:
    mode, where the position comes from, satellites used/visible, eph and HDOP, the fix's age,
    the position, and, when the fix is too coarse for any contact at the match radius (the
    accuracy rule, :func:`~fanny_tui.protocol.proximity.coarsest_matching_accuracy_m`), says
    so. Without a fix it says why in plain words and what to do
    (:func:`fanny_tui.describe.explain_gps`), then the raw reason. Positions are shown here
    and nowhere else (never logged).

    Under the broker, one line per ``[[positives]]`` broker (issue 8): its name, then when it
    was last polled and how many new positives it had, or since when and how often its polls
    fail, with what to do. Each half shows the rows that fit the panel's height, those that
    matter most (:class:`PanelRow` ``keep``): a state and what to do before when it started
    and the raw reason (the event log has them), so that at 80x24 a next step is never cut.
    """

    GPS_WIDTH = 30
    """Columns of the GPS half."""
    NAME_WIDTH = 12
    """Columns a poll-only broker's name may take (longer names are cut with "…")."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "Session"
        self.session_short = "…"
        self.broker_connected = False
        self.broker_detail: str = "connecting…"
        self.radius_m: float | None = None
        self.match_radius_m: float | None = None
        self.outage_since: datetime | None = None
        self.outage_attempts = 0
        self.retry_in_s: float | None = None
        self.retry_at: datetime | None = None
        self.fix: GpsFix | None = None
        self.fix_received_at: datetime | None = None
        self.gps_detail: str = WAITING_FOR_FIX
        self._gps_value_width = self.GPS_WIDTH - 5
        self.now: datetime | None = None
        # poll-only brokers: name -> (state, last poll or failing since, new tokens or
        # attempts, the last failure's reason)
        self.others: dict[str, tuple[str, datetime | None, int, str | None]] = {}

    def on_mount(self) -> None:
        """Draw the initial state."""
        self.redraw()

    def on_resize(self, event: Resize) -> None:
        """The two halves are laid out for the size."""
        self.redraw()

    def set_others(self, names: Iterable[str]) -> None:
        """The ``[[positives]]`` brokers to show, none polled yet."""
        self.others = {name: ("waiting", None, 0, None) for name in names}
        self.redraw()

    def set_other_polled(self, name: str, received: int, now: datetime) -> None:
        """Poll-only broker ``name`` was polled at ``now`` and had ``received`` new tokens."""
        self.others[name] = ("polled", now, received, None)
        self.redraw()

    def set_other_failing(self, name: str, attempts: int, since: datetime,
                          reason: str | None = None) -> None:
        """``attempts`` polls of poll-only broker ``name`` failed in a row since ``since``;
        ``reason``: the last failure (remote text), explained with a next step."""
        self.others[name] = ("failing", since, attempts, reason)
        self.redraw()

    def set_match_radius(self, radius_m: float) -> None:
        """The match radius (metres) the accuracy of a fix is judged against, until the
        broker gives its own (:meth:`set_broker`)."""
        self.match_radius_m = radius_m
        self.redraw()

    def _other_rows(self) -> list[PanelRow]:
        # Failing brokers in a row with the same next step share it: it follows the last.
        todos = [explain(reason).todo if state == "failing" and at is not None
                 and reason is not None else None
                 for state, at, _, reason in self.others.values()]
        rows = []
        for i, (name, (state, at, count, reason)) in enumerate(self.others.items()):
            label = Text(name, no_wrap=True, overflow="ellipsis")
            label.truncate(self.NAME_WIDTH, overflow="ellipsis")
            if state == "failing" and at is not None:
                rows.append(PanelRow(label.plain, Text(
                    f"⚠ failing since {format_clock(at)}, {plural(count, 'attempt')}",
                    style="bold red"), 8, wrap=True))
                if reason is not None:
                    failure = explain(reason)
                    rows.append(PanelRow("", Text(failure.headline, style="bold"), 2,
                                         wrap=True))
                    if i + 1 == len(todos) or todos[i + 1] != failure.todo:
                        rows.append(PanelRow("", Text(f"→ {poll_only_todo(failure.todo)}",
                                                      style="italic"), 7, wrap=True))
            elif at is not None:
                rows.append(PanelRow(label.plain, Text(f"polled {format_clock(at)} "
                                                       f"({count} new)", style="green"), 8))
            else:
                rows.append(PanelRow(label.plain, Text("not polled yet", style="dim"), 8))
        return rows

    def set_session(self, session_short: str) -> None:
        """Show the short session ID (first 8 characters; shown on this device only)."""
        self.session_short = session_short
        self.border_title = f"Session {session_short}"
        self.redraw()

    def set_broker(self, connected: bool, detail: str, radius_m: float | None = None) -> None:
        """Show the broker state.

        Args:
            connected: True while the session connection is up.
            detail: URL when connected, the raw failure reason when not (remote text).
            radius_m: the broker's match radius in metres (when connected).
        """
        self.broker_connected = connected
        self.broker_detail = detail
        if connected:
            self.outage_since, self.outage_attempts = None, 0
            self.retry_in_s, self.retry_at = None, None
            self.radius_m = radius_m
        self.redraw()

    def set_outage(self, reason: str, retry_in_s: float, now: datetime | None = None) -> None:
        """Show that the broker is unreachable: why, since when, attempts, next retry.

        Args:
            reason: the last failure (remote text), shown in plain words with a hint.
            retry_in_s: seconds until the next attempt (counted down on :meth:`tick`).
            now: the current instant (default: the clock).
        """
        now = _now(now)
        if self.outage_since is None:
            self.outage_since = now
        self.outage_attempts += 1
        self.retry_in_s = retry_in_s
        self.retry_at = now + timedelta(seconds=retry_in_s)
        self.now = now
        self.set_broker(False, reason)

    def set_fix(self, fix: GpsFix, now: datetime | None = None) -> None:
        """Show a position fix (WGS84 degrees, accuracy in metres); ``now``: when it came."""
        self.fix = fix
        self.fix_received_at = _now(now)
        self.gps_detail = ""
        self.redraw()

    def set_lost(self, reason: str) -> None:
        """Show that there is no usable fix, and why (remote text)."""
        self.fix = None
        self.gps_detail = reason
        self.redraw()

    def tick(self, now: datetime) -> None:
        """Redraw the live parts (retry countdown, age of the fix) for ``now``."""
        self.now = now
        self.redraw()

    @property
    def fix_age_s(self) -> float | None:
        """Seconds since the fix was measured: since its GPS time (UTC) when that is within
        a few seconds of the device clock at its arrival, else since it arrived (a replayed
        log's GPS time is the log's old date); None without a fix."""
        if self.fix is None or self.now is None or self.fix_received_at is None:
            return None
        measured, _ = fix_measured_at(self.fix.time, self.fix_received_at)
        return max(0.0, (self.now - measured).total_seconds())

    def _broker_rows(self, short_detail: bool = False) -> list[PanelRow]:
        """The broker half's rows; ``short_detail``: the raw reason as its exception type
        alone (``ConnectionRefusedError``), for a panel with no room for the whole of it."""
        def row(label: str, text: str, style: str, keep: int, wrap: bool = False) -> PanelRow:
            return PanelRow(label, Text(text, style=style), keep, wrap)

        if self.broker_connected:
            state = Text("connected", style="bold green")
            if self.radius_m is not None:
                state.append(f", radius {self.radius_m:g} m", style="green")
            return [PanelRow("Broker", state, 10),
                    row("", self.broker_detail, "italic", 4), *self._other_rows()]
        state = Text("disconnected", style="bold yellow")
        if self.retry_at is not None:
            left = (self.retry_at - (self.now or self.retry_at)).total_seconds()
            state.append(f", {format_retry(left)}", style="yellow")
        if self.outage_since is None:
            return [PanelRow("Broker", state, 10),
                    row("", self.broker_detail, "italic", 4), *self._other_rows()]
        failure = explain(self.broker_detail)
        # The raw reason last, whole (wrapped) where there is room, else its type alone: a
        # line cut to "ConnectionRefusedError: [Errno 111] Con…" tells nothing more.
        detail = (row("", failure.kind, "dim", 1) if short_detail and failure.kind
                  else row("", self.broker_detail, "dim", 1, wrap=not short_detail))
        return [PanelRow("Broker", state, 10),
                row("", failure.headline, "bold", 6, wrap=True),
                row("", f"→ {failure.todo}", "italic", 9, wrap=True),
                row("", f"since {format_clock(self.outage_since)}, "
                        f"{plural(self.outage_attempts, 'attempt')}", "italic", 3),
                detail,
                *self._other_rows()]

    def _gps_rows(self) -> list[PanelRow]:
        fix = self.fix
        dash = Text(DASH, style="dim")
        if fix is None:
            rows = [PanelRow("GPS", Text("no fix", style="bold yellow"), 10)]
            if self.gps_detail == WAITING_FOR_FIX:
                rows.append(PanelRow("", Text(self.gps_detail, style="italic"), 9))
                rows.extend(PanelRow(label, dash, 5) for label in ("Sats", "Acc", "Age", "Pos"))
                return rows
            failure = explain_gps(self.gps_detail)
            return [*rows, PanelRow("", Text(failure.headline, style="bold"), 8),
                    PanelRow("", Text(f"→ {failure.todo}", style="italic"), 9, wrap=True),
                    PanelRow("", Text(self.gps_detail, style="dim"), 1)]
        not_receiver = describe_gps_source(fix.source)
        rows = [PanelRow("GPS", Text(format_fix_mode(fix.mode), style="bold green"
                                     if not_receiver is None else "bold"), 10)]
        if not_receiver is None:
            rows.append(PanelRow("", Text(f"receiver ({fix.source})", style="dim"), 3))
        else:
            rows.append(PanelRow("", Text(f"⚠ {not_receiver}", style="bold magenta"), 9))
        used = DASH if fix.satellites_used is None else str(fix.satellites_used)
        seen = DASH if fix.satellites_visible is None else str(fix.satellites_visible)
        rows.append(PanelRow("Sats", Text(f"{used} used / {seen} visible"), 6))
        accuracy = Text(format_accuracy(fix.accuracy_m))
        if fix.hdop is not None:
            accuracy.append(f"  HDOP {fix.hdop:.1f}")
        rows.append(PanelRow("Acc", accuracy, 8))
        radius = self.radius_m if self.broker_connected and self.radius_m else (
            self.match_radius_m)
        coarse = None if radius is None else too_coarse(fix.accuracy_m, radius)
        if coarse is not None and len(", ".join(coarse)) <= self._gps_value_width:
            rows.append(PanelRow("", Text(", ".join(coarse), style="bold yellow"), 9))
        elif coarse is not None:   # narrow: what is wrong first, the accuracy needed if room
            rows.append(PanelRow("", Text(coarse[0], style="bold yellow"), 9, wrap=True))
            rows.append(PanelRow("", Text(coarse[1], style="yellow"), 2, wrap=True))
        _, from_gps = fix_measured_at(fix.time, self.fix_received_at or _now(None))
        age, note = format_fix_age(self.fix_age_s, fix.time, from_gps)
        rows.append(PanelRow("Age", age, 7))
        if note is not None:
            rows.append(PanelRow("", note, 4))
        rows.append(PanelRow("Pos", Text(f"{format_coordinate(fix.latitude)}° "
                                         f"{format_coordinate(fix.longitude)}°"), 5))
        return rows

    @staticmethod
    def _grid(rows: list[PanelRow], label_width: int | None = None) -> Table:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True, width=label_width)
        grid.add_column()
        for row in rows:
            value = row.value.copy()
            if row.wrap:
                value.overflow = "fold"
            else:
                value.no_wrap, value.overflow = True, "ellipsis"
            grid.add_row(row.label, value)
        return grid

    def redraw(self) -> None:
        """Render both halves again from the current state, each fitted to the panel."""
        width, height = self.content_size.width, self.content_size.height
        gps_width = self.GPS_WIDTH if width < 118 else width // 2 - 2
        broker_width = width - gps_width - 1
        rows = self._broker_rows()
        label_width = max((len(row.label) for row in rows), default=0)
        broker = fit_rows(rows, height, broker_width - label_width - 1)
        if len(broker) < len(rows) and self.outage_since is not None:
            # No room for the whole raw reason: its exception type alone, if that fits.
            broker = fit_rows(self._broker_rows(short_detail=True), height,
                              broker_width - label_width - 1)
        # The GPS labels keep their 4 columns: only the values give way.
        self._gps_value_width = gps_width - 5
        gps = fit_rows(self._gps_rows(), height, self._gps_value_width)
        outer = Table.grid(expand=True, padding=(0, 1))
        outer.add_column(ratio=1)
        outer.add_column(width=gps_width)
        outer.add_row(self._grid(broker), self._grid(gps, 4))
        self.update(outer)


class PeersTable(DataTable[Text]):
    """Live peers: one row per peer in contact now (see :class:`~fanny_tui.ui.peers.LivePeers`).

    Columns: name, distance (coloured by the accuracy rule's verdict), bearing, time within
    the radius so far, the peer's accuracy, time from match to token, then the handshake
    state with the ICE candidate types of the data channel once it opened (``open (host)``,
    ``stored (relay)``: a relayed pair went through TURN) and, once it ended, why in a few
    words (``closed (host): parted``, ``failed: timed out``; the event log has the whole
    reason). Every column fits 80 columns (a Raspberry Pi console): the state, the only one
    of varying width, is last, at most 36 characters.
    """

    COLUMNS = (("Peer", "peer", 7), ("Dist", "distance", 6), ("Bearing", "bearing", 7),
               ("Within", "within", 6), ("Acc", "accuracy", 6), ("→Token", "latency", 6),
               ("State (ICE): why ended", "state", None))

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.border_title = "Live peers"
        self._shown: dict[str, list[tuple[str, str]]] = {}

    def on_mount(self) -> None:
        """Add the columns."""
        for label, key, width in self.COLUMNS:
            self.add_column(label, key=key, width=width)

    def show(self, peers: list[LivePeer]) -> None:
        """Make the table show exactly ``peers``, in their order (rows added, removed or moved;
        only the cells that changed are updated)."""
        wanted = {str(p.peer): p for p in peers}
        for key in [key for key in self._shown if key not in wanted]:
            del self._shown[key]
            self.remove_row(key)
        for key, live in wanted.items():
            cells = self.cells(live)
            plain = [(cell.plain, str(cell.style)) for cell in cells]   # style: the verdict
            before = self._shown.get(key)
            if before is None:
                self.add_row(*cells, key=key)
            else:
                for (_, column, _), cell, old, new in zip(self.COLUMNS, cells, before, plain,
                                                          strict=True):
                    if old != new:
                        self.update_cell(key, column, cell, update_width=column == "state")
            self._shown[key] = plain
        if [row.key.value for row in self.ordered_rows] != list(wanted):  # a contact ended
            place = {peer_name(p.peer): n for n, p in enumerate(peers)}
            self.sort("peer", key=lambda cell: place[cell.plain])
        self._retitle()

    def _retitle(self) -> None:
        count = len(self._shown)
        self.border_title = (f"Live peers ({count}){hidden_rows_hint(self)}" if count
                             else "Live peers: none")

    def on_resize(self, event: Resize) -> None:
        """Say how to see the rows that no longer fit."""
        self._retitle()

    @staticmethod
    def cells(live: LivePeer) -> list[Text]:
        """The row of one peer."""
        state = live.state
        return [
            Text(peer_name(live.peer), style="bold"),
            Text(format_distance(live.distance_m), style=WITHIN_STYLES.get(live.within or "", "")),
            Text(format_bearing(live.bearing_deg)),
            Text(format_duration(live.within_s) if live.samples or live.within_s else DASH),
            Text(format_accuracy(live.peer_accuracy_m)),
            Text(format_seconds(live.match_to_token_s)),
            Text(format_peer_state(state, live.candidates, live.reason),
                 style=HANDSHAKE_STYLES.get(state, "")),
        ]


class RadarView(Static):
    """The live peers at their bearing and distance around this device, north up.

    Rings at the match radius and twice it; each peer is its ordinal's last digit, green
    within the radius, yellow uncertain (accuracy), white outside, dim beyond the edge (with an
    arrow on the edge pointing its way; the legend then says so).
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "Radar"
        self.peers: list[LivePeer] = []
        self.radius_m = 10.0

    def on_resize(self, event: Resize) -> None:
        """Redraw for the new size."""
        self.redraw()

    def show(self, peers: list[LivePeer], radius_m: float) -> None:
        """Draw ``peers`` with rings at ``radius_m`` (metres)."""
        self.peers, self.radius_m = peers, radius_m
        self.redraw()

    def redraw(self) -> None:
        """Render the radar for the widget's size."""
        width, height = self.content_size.width, self.content_size.height - 1
        if width < 5 or height < 3:
            self.update("")
            return
        lines: list[Text] = []
        for row in radar_cells(self.peers, self.radius_m, width, height):
            line = Text(no_wrap=True, overflow="crop")
            for cell in row:
                line.append(*_radar_piece(cell))
            lines.append(line)
        edge_m = RANGE_RINGS * self.radius_m
        legend = Text(f"ring {format_distance(self.radius_m)}, edge "
                      f"{format_distance(edge_m)}, north up", style="dim",
                      no_wrap=True, overflow="ellipsis")
        if any(p.distance_m is not None and p.distance_m > edge_m for p in self.peers):
            legend.append(", ↗ a peer beyond the edge")
        self.update(Group(*lines, legend))


def _radar_piece(cell: RadarCell | None) -> tuple[str, str]:
    if cell is None:
        return " ", ""
    return cell.char, RADAR_STYLES.get(cell.kind, "")


class TokensTable(DataTable[Text]):
    """Stored witness tokens: token, live countdown, the contact, upload marker, expiry (UTC).

    Rows are keyed by the full token and kept soonest expiry first. The contact (time within
    the radius, closest distance) is shown when known: from the ``token_stored`` event, then
    growing with the open contact's samples until it closes, or from the store when it keeps
    it.
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.border_title = "Tokens"
        self._expiry: dict[str, datetime] = {}
        self._contacts: dict[str, Contact] = {}
        self._earlier: dict[str, Contact] = {}   # a token's exposure before the open contact

    def on_mount(self) -> None:
        """Add the columns."""
        self.add_column("Token", key="token", width=9)
        self.add_column("Time left", key="left", width=15)
        self.add_column("Contact", key="contact", width=14)
        self.add_column("Upload", key="upload", width=9)
        self.add_column("Expires at (UTC)", key="expires", width=20)

    @property
    def tokens(self) -> set[str]:
        """The full tokens shown."""
        return set(self._expiry)

    def add_token(self, token: str, expires_at: datetime, *, pending: bool = False,
                  contact: Contact | None = None, now: datetime | None = None,
                  sort: bool = True) -> None:
        """Show one token (its pending marker and contact are updated if it is shown already).

        Args:
            token: 64 hex characters.
            expires_at: aware expiry instant.
            pending: part of a positive upload the broker has not acknowledged yet.
            contact: the contact's measures, when known.
            now: the current instant for the countdown (default: the clock, UTC).
            sort: keep the rows sorted by expiry (pass False while adding many, then sort once).
        """
        if contact is not None:
            self._contacts[token] = contact
        if token in self._expiry:
            self.update_cell(token, "upload", _pending_text(pending))
            if self._expiry[token] != expires_at:   # a new contact moved the expiry
                self._expiry[token] = expires_at
                self.update_cell(token, "expires", Text(format_utc(expires_at)))
            self.update_cell(token, "contact", Text(format_contact(self._contacts.get(token))))
            return
        now = _now(now)
        self._expiry[token] = expires_at
        self.add_row(Text(abbreviate_token(token)),
                     Text(format_countdown((expires_at - now).total_seconds())),
                     Text(format_contact(self._contacts.get(token))),
                     _pending_text(pending), Text(format_utc(expires_at)), key=token)
        if sort:
            self._sort()
        self._retitle()

    def show_stored(self, token: str, expires_at: datetime, contact: Contact | None, *,
                    new: bool, now: datetime | None = None) -> None:
        """A ``token_stored`` event: the token with its contact's measures so far.

        A token stored again (``new`` False: the same pair met again in one session) shows its
        earlier exposure grown by this contact, as the store keeps it.
        """
        earlier = None if new else self._contacts.get(token)
        if earlier is None:
            self._earlier.pop(token, None)
        else:
            self._earlier[token] = earlier
        if contact is not None:
            contact = merged_contact(earlier, contact)
        self.add_token(token, expires_at, contact=contact, now=now)

    def show_live(self, token: str, contact: Contact) -> None:
        """The open contact that stored ``token`` measured more (a ``peer_update`` after the
        token): its measures so far, added to the token's earlier exposure if any."""
        if token not in self._expiry:
            return
        self._contacts[token] = merged_contact(self._earlier.get(token), contact)
        self.update_cell(token, "contact", Text(format_contact(self._contacts[token])))

    def show_closed(self, token: str, contact: Contact) -> None:
        """A ``contact_closed`` event of a contact that stored ``token``: its final measures
        (what the contact measured after the token was stored counts too)."""
        if token not in self._expiry:
            return
        self._contacts[token] = merged_contact(self._earlier.pop(token, None), contact)
        self.update_cell(token, "contact", Text(format_contact(self._contacts[token])))

    def sync(self, stored: Iterable[StoredToken], now: datetime | None = None) -> None:
        """Make the table show exactly ``stored`` (rows added, removed or re-marked)."""
        wanted = {item.token: item for item in stored}
        for token in list(self._expiry):
            if token not in wanted:
                del self._expiry[token]
                self._contacts.pop(token, None)
                self._earlier.pop(token, None)
                self.remove_row(token)
        for item in wanted.values():
            # A store that keeps the contact with the token (issue 6) gives it here too.
            contact = getattr(item, "contact", None)
            self.add_token(item.token, item.expires_at, pending=item.pending,
                           contact=contact if isinstance(contact, Contact) else None,
                           now=now, sort=False)
        self._sort()
        self._retitle()

    def tick(self, now: datetime | None = None) -> None:
        """Refresh every countdown (called once a second)."""
        now = _now(now)
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
        self.border_title = title + hidden_rows_hint(self)

    def on_resize(self, event: Resize) -> None:
        """Say how to see the rows that no longer fit."""
        self._retitle()


def _pending_text(pending: bool) -> Text:
    return Text("⇡ pending", style="bold yellow") if pending else Text("")


class ExposureBanner(Static):
    """Hidden until an exposure alert; then the alert, the contacts' measures (wrapped; at most
    :data:`~fanny_tui.ui.formatting.BANNER_CONTACTS` listed), the next step."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.total = 0
        self.contacts: list[Contact] = []

    def add_alert(self, count: int, contacts: Iterable[Contact] = ()) -> None:
        """Count ``count`` more tokens declared positive and show the banner (if count > 0).

        Args:
            count: tokens matched by this alert.
            contacts: their contacts' measures, when known.
        """
        if count <= 0:
            return
        self.total += count
        self.contacts.extend(contacts)
        self.add_class("-visible")
        self.redraw()

    def on_resize(self, event: Resize) -> None:
        """Compact below 120 columns."""
        self.redraw()

    def redraw(self) -> None:
        """Render the alert for the width (nothing before the first alert)."""
        if not self.total:
            return
        # Wrapped, never cut: with many contacts the first few are listed, the rest counted
        # (the event log has them all), so the banner stays at 2-3 lines at 80 columns.
        compact = self.size.width < 120
        self.update(Group(
            Text(describe_exposure(self.total, self.contacts, compact=compact),
                 overflow="fold"),
            Text(EXPOSURE_NEXT_STEP, style="not bold")))


class StatusLine(Static):
    """One line for routine state, so that it stays out of the event log: the time (UTC),
    when positives were last checked and will next be checked, an upload waiting for the
    broker.

    The line is fitted to its width (:data:`STATUS_LEVELS` shorter wordings, in order), so that
    at 80 columns the countdowns are never the part cut: ``next check in 4m59s`` becomes
    ``next in 4m59s``, then the attempts and new-token counts go (the event log has them),
    then shorter words, then the clock's ``UTC``, then the clock.
    """

    STATUS_LEVELS = 6
    """Wordings from the longest (0) to the shortest (5); see :meth:`line`."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.polled_at: datetime | None = None
        self.polled_received = 0
        self.next_poll_at: datetime | None = None
        self.pending_count = 0
        self.pending_retry_at: datetime | None = None
        self.poll_failing: tuple[int, datetime] | None = None   # (attempts, since)
        self.now: datetime | None = None

    def on_mount(self) -> None:
        """Draw the initial state."""
        self.redraw()

    def on_resize(self, event: Resize) -> None:
        """The wording is fitted to the new width."""
        self.redraw()

    def set_polled(self, received: int, next_in_s: float | None, now: datetime) -> None:
        """A poll of positive tokens finished at ``now``; the next is in ``next_in_s`` s."""
        self.polled_at, self.polled_received, self.now = now, received, now
        self.next_poll_at = None if next_in_s is None else now + timedelta(seconds=next_in_s)
        self.poll_failing = None
        self.redraw()

    def set_poll_failed(self, attempts: int, since: datetime, next_in_s: float | None,
                        now: datetime) -> None:
        """``attempts`` polls in a row failed since ``since``: exposure checks are not
        happening (shown until a poll succeeds)."""
        self.poll_failing, self.now = (attempts, since), now
        self.next_poll_at = None if next_in_s is None else now + timedelta(seconds=next_in_s)
        self.redraw()

    def set_pending(self, count: int, retry_in_s: float | None, now: datetime) -> None:
        """``count`` tokens wait for the broker's ack, next try in ``retry_in_s`` s (0: none)."""
        self.pending_count, self.now = count, now
        self.pending_retry_at = (None if retry_in_s is None
                                 else now + timedelta(seconds=retry_in_s))
        self.redraw()

    def tick(self, now: datetime) -> None:
        """Redraw the countdowns for ``now``."""
        self.now = now
        self.redraw()

    @property
    def text(self) -> Text:
        """The line as shown: the longest wording that fits the widget's width (the longest
        of all before the widget is laid out), cut with "…" if even the shortest does not."""
        width = self.content_size.width
        for level in range(self.STATUS_LEVELS):
            line = self.line(level)
            if width <= 0 or line.cell_len <= width:
                return line
        return line

    def line(self, level: int = 0) -> Text:
        """The line in wording ``level`` (0: longest; up to ``STATUS_LEVELS - 1``).

        Level 1: ``next in`` for ``next check in``, the upload without ``for the broker``;
        2: no attempts or new-token counts; 3: ``positives failing``, ``⇡ N waiting``;
        4: the clock without ``UTC``; 5: no clock.
        """
        line = Text(no_wrap=True, overflow="ellipsis")
        if self.now is not None and level < 5:
            line.append(format_clock(self.now) + (" UTC" if level < 4 else ""), style="bold")
            line.append(" │ ", style="dim")
        if self.poll_failing is not None:
            attempts, since = self.poll_failing
            what = "positives check failing" if level < 3 else "positives failing"
            count = f" ({plural(attempts, 'attempt')})" if level < 2 else ""
            line.append(f"⚠ {what} since {format_clock(since)}{count}", style="bold red")
        elif self.polled_at is None:
            line.append("positives: not checked yet", style="dim")
        else:
            line.append(f"positives checked {format_clock(self.polled_at)}"
                        + (f" ({self.polled_received} new)" if level < 2 else ""))
        checked = self.poll_failing is not None or self.polled_at is not None
        if checked and self.next_poll_at is not None and self.now is not None:
            left = (self.next_poll_at - self.now).total_seconds()
            line.append(" · next check " if level < 1 else " · next ")
            line.append(f"in {format_duration(left)}" if left > 0 else "now")
        if self.pending_count:
            line.append(" │ ", style="dim")
            waiting = (f"{plural(self.pending_count, 'token')} waiting for the broker"
                       if level < 1 else f"{plural(self.pending_count, 'token')} waiting"
                       if level < 3 else f"{self.pending_count} waiting")
            line.append(f"⇡ {waiting}", style="bold yellow")
            if self.pending_retry_at is not None and self.now is not None:
                line.append(", " + format_retry(
                    (self.pending_retry_at - self.now).total_seconds()), style="yellow")
        return line

    def redraw(self) -> None:
        """Render the line again."""
        self.update(self.text)


class EventLog(RichLog):
    """One line per event: time (UTC), event name, text. Markup is off (remote text).

    Lines are wrapped to the log's width and wrapped again when it is resized, so no
    character is lost (a long reason continues on the next line). Continuation lines are
    indented under the text, past the time, so that none starts like a timestamp.
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False, highlight=False, wrap=True, min_width=20,
                         max_lines=MAX_LOG_LINES)
        self.border_title = "Event log"
        self._entries: deque[tuple[Text, Text]] = deque(maxlen=MAX_LOG_LINES)
        self._width = 0

    def add(self, name: str, text: Text | str, *, at: datetime | None = None) -> None:
        """Append one line.

        Args:
            name: the event's wire name (``positive_pending``) or a UI action name.
            text: what happened; a ``str`` is shown literally, never parsed as markup.
            at: when (default: now), shown as UTC.
        """
        stamp = Text(format_clock(_now(at)), style="dim")
        body = Text.assemble((name, EVENT_STYLES.get(name, "bold")), "  ")
        body.append_text(text if isinstance(text, Text) else Text(text))
        self._entries.append((stamp, body))
        self._write(stamp, body)

    def _write(self, stamp: Text, body: Text) -> None:
        # Wrapped at the visible width (the scrollbar's gutter is always reserved, see
        # app.tcss), never at RichLog's min_width: wider lines would lose their last characters.
        # Two columns: the body wraps (long words fold) in its own column, a hanging indent.
        line = Table.grid(padding=(0, 1))
        line.add_column(no_wrap=True)
        line.add_column(overflow="fold")
        line.add_row(stamp, body)
        width = self.scrollable_content_region.width
        self.write(line, width=width if self._width and width > 0 else None)

    def on_resize(self, event: Resize) -> None:
        """Wrap every line again for the new width."""
        width = event.size.width
        if self._width and width != self._width and self._entries:
            self._width = width
            self.clear()
            for stamp, body in self._entries:
                self._write(stamp, body)
        self._width = width

    @property
    def plain_lines(self) -> list[str]:
        """The lines as plain text (as shown, after wrapping)."""
        return [strip.text for strip in self.lines]
