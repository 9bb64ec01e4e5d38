"""Screens of the FANNY field kit: the main screen, the help screen, the declaration dialog."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Input, Label, RadioButton, RadioSet, Static

from ..engine import EngineSnapshot
from ..events import (
    MAIN_BROKER,
    BrokerConnected,
    BrokerDisconnected,
    ContactClosed,
    Event,
    ExposureAlert,
    GpsFix,
    GpsLost,
    PeerUpdate,
    PositiveDeclared,
    PositivePending,
    PositiveRefused,
    PositivesPolled,
    PositivesPollFailed,
    TokenStored,
)
from ..protocol.codes import normalize_code
from .formatting import describe_event, describe_gps_source, format_utc
from .peers import LivePeers
from .widgets import (
    EventLog,
    ExposureBanner,
    PeersTable,
    RadarView,
    SessionPanel,
    StatusLine,
    TitleBar,
    TokensTable,
)

Clock = Callable[[], datetime]
"""Returns the current instant, aware, UTC (the app's clock; fixed in snapshot tests)."""


def utc_now() -> datetime:
    """The system clock, UTC."""
    return datetime.now(UTC)


class MainScreen(Screen[None]):
    """Session/broker/GPS, live peers and radar, tokens, exposure banner, event log, status.

    It displays what :meth:`show_event` and :meth:`load_snapshot` give it and never calls the
    engine; the app does (see :class:`fanny_tui.ui.app.FannyApp`). Once its panels are
    mounted it posts :class:`MainScreen.Ready`, after which the app starts the engine.

    Below 140 columns the radar is not beside the peers table: ``r`` shows it instead of the
    peers and tokens tables (and back). Below 36 rows the panels keep only a top border.

    Args:
        broker_url: shown while the first connection to the broker is being tried.
        title: the title line.
        radius_m: the configured match radius (metres) for the radar, until the broker's.
        poll_interval_s: seconds between polls of positives, when the engine does not say.
        clock: the current instant (default: the system clock, UTC).
        broker_name: the device's own broker's name (``[broker] name``): its polls go to the
            status line.
        other_brokers: the ``[[positives]]`` brokers' names: the Session panel shows each
            one's last poll, or that its polls fail (issue 8).
    """

    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (140, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]
    BINDINGS = [Binding("r", "toggle_radar", "Radar")]

    class Ready(Message):
        """The panels are mounted: events can be shown."""

    def __init__(self, broker_url: str, *, title: str = "FANNY field kit",
                 radius_m: float = 10.0, poll_interval_s: float | None = None,
                 clock: Clock = utc_now, broker_name: str = MAIN_BROKER,
                 other_brokers: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.broker_url = broker_url
        self.broker_name = broker_name
        self.other_brokers = other_brokers
        self.title_text = title
        self.radius_m = radius_m
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.live_peers = LivePeers()
        self._outage_reason: str | None = None
        self._pending_reason: str | None = None

    def compose(self) -> ComposeResult:
        """Lay out the panels."""
        yield TitleBar(self.title_text, id="title")
        yield ExposureBanner(id="exposure")
        yield SessionPanel(id="session")
        with Horizontal(id="middle"):
            with Vertical(id="lists"):
                yield PeersTable(id="peers")
                yield TokensTable(id="tokens")
            yield RadarView(id="radar")
        yield EventLog(id="log")
        yield StatusLine(id="status")
        yield Footer()

    def on_mount(self) -> None:
        """Start the one-second refresh of countdowns and ages; tell the app."""
        self.session.set_others(self.other_brokers)
        self.session.set_match_radius(self.radius_m)
        self.session.set_broker(False, f"connecting to {self.broker_url}…")
        self.tick()
        self.set_interval(1.0, self.tick)
        self.post_message(self.Ready())

    # -- parts ----------------------------------------------------------------------------

    @property
    def session(self) -> SessionPanel:
        """The Session panel (broker and GPS)."""
        return self.query_one("#session", SessionPanel)

    @property
    def peers(self) -> PeersTable:
        """The Live peers table."""
        return self.query_one("#peers", PeersTable)

    @property
    def radar(self) -> RadarView:
        """The radar."""
        return self.query_one("#radar", RadarView)

    @property
    def tokens(self) -> TokensTable:
        """The Tokens table."""
        return self.query_one("#tokens", TokensTable)

    @property
    def banner(self) -> ExposureBanner:
        """The exposure banner."""
        return self.query_one("#exposure", ExposureBanner)

    @property
    def log_view(self) -> EventLog:
        """The event log."""
        return self.query_one("#log", EventLog)

    @property
    def status(self) -> StatusLine:
        """The status line (routine state)."""
        return self.query_one("#status", StatusLine)

    # -- updates --------------------------------------------------------------------------

    def tick(self) -> None:
        """Refresh every countdown and age, drop peers whose time is up (every second)."""
        now = self.clock()
        self.tokens.tick(now)
        self.session.tick(now)
        self.status.tick(now)
        if self.live_peers.expire(now):
            self._show_peers()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """``r`` is offered only where the radar is not beside the tables (narrow)."""
        if action == "toggle_radar":
            return self.has_class("-narrow")
        return True

    def on_resize(self) -> None:
        """The breakpoint classes may have changed: offer ``r`` or not."""
        self.refresh_bindings()

    def action_toggle_radar(self) -> None:
        """``r``: on a narrow screen, the radar instead of the tables (and back)."""
        self.toggle_class("-radar")

    def log_line(self, name: str, text: Text | str) -> None:
        """Add a line to the event log, stamped with the app's clock."""
        self.log_view.add(name, text, at=self.clock())

    def load_snapshot(self, snapshot: EngineSnapshot) -> None:
        """Show the session ID, the stored tokens and past exposure alerts (at start-up)."""
        now = self.clock()
        self.session.set_session(snapshot.session_short)
        self.tokens.sync(snapshot.tokens, now)
        total = sum(alert.count for alert in snapshot.alerts)
        if total:
            self.banner.add_alert(total)
            latest = snapshot.alerts[-1].noticed_at
            self.log_line("exposure_alert", Text(
                f"{total} stored tokens were declared positive (latest alert "
                f"{format_utc(latest)})"))

    def show_event(self, event: Event) -> None:
        """Render one engine event in the panels it concerns and, if it matters, in the log."""
        now = self.clock()
        if self.live_peers.apply(event, now):
            self._show_peers()
        match event:
            case BrokerConnected(url=url, radius_m=radius):
                self._outage_reason = None
                self.radius_m = radius
                self.session.set_broker(True, url, radius)
                self._show_peers()
            case BrokerDisconnected(reason=reason, retry_in_s=retry):
                self.session.set_outage(reason, retry, now)
                if reason == self._outage_reason:
                    return  # the same failure again at each retry: one log line is enough
                self._outage_reason = reason
            case GpsFix():
                self._show_fix(event, now)
                return  # logged by _show_fix only when the fix mode changes
            case GpsLost(reason=reason):
                self.session.set_lost(reason)
            case TokenStored(token=token, expires_at=expires_at, contact=contact, new=new):
                self.tokens.show_stored(token, expires_at, contact, new=new, now=now)
            case PeerUpdate(peer=peer) if peer in self.live_peers:
                live = self.live_peers[peer]
                if live.token is not None and live.contact is not None and live.ended_at is None:
                    self.tokens.show_live(live.token, live.contact)
            case ContactClosed(peer=peer, contact=contact, token_stored=True):
                held = self.live_peers[peer].token if peer in self.live_peers else None
                if held is not None:
                    self.tokens.show_closed(held, contact)
            case ExposureAlert(count=count, contacts=contacts):
                self.banner.add_alert(count, contacts)
            case PositivesPolled(broker=broker, received=received) if (
                    broker in self.other_brokers):
                self.session.set_other_polled(broker, received, now)
            case PositivesPollFailed(broker=broker, attempts=attempts, since=since,
                                     reason=reason) if broker in self.other_brokers:
                self.session.set_other_failing(broker, attempts, since, reason)
            case PositivesPolled(received=received, next_poll_in_s=next_in):
                self.status.set_polled(received, next_in if next_in is not None
                                       else self.poll_interval_s, now)
            case PositivesPollFailed(attempts=attempts, since=since, next_poll_in_s=next_in):
                self.status.set_poll_failed(attempts, since, next_in, now)
            case PositivePending(count=count, reason=reason, retry_in_s=retry):
                self.status.set_pending(count, retry, now)
                if reason == self._pending_reason:
                    return  # retried for the same reason: the status line counts down
                self._pending_reason = reason
            case PositiveDeclared() | PositiveRefused():
                self._pending_reason = None
                self.status.set_pending(0, None, now)
        text = describe_event(event, main=self.broker_name)
        if text is not None:
            self.log_view.add(event.event, text, at=now)

    def _show_peers(self) -> None:
        peers = self.live_peers.peers
        self.peers.show(peers)
        self.radar.show(peers, self.radius_m)

    def _show_fix(self, fix: GpsFix, now: datetime) -> None:
        previous = self.session.fix
        self.session.set_fix(fix, now)
        if previous is None or (previous.mode >= 3) != (fix.mode >= 3):
            mode = "3D" if fix.mode >= 3 else "2D"
            not_receiver = describe_gps_source(fix.source)
            if not_receiver is not None:
                self.log_view.add(fix.event, f"{mode} position: {not_receiver}", at=now)
                return
            used = "?" if fix.satellites_used is None else str(fix.satellites_used)
            self.log_view.add(fix.event, f"{mode} fix ({used} satellites used)", at=now)


HELP_INTRO = ("Your device sends the broker its GPS position as measured (not coarsened), "
              "under a session ID that is renewed regularly; the broker keeps only the "
              "latest and never logs it. When another device is within the match radius, the "
              "broker introduces the two (FANNY, paper sections 3-4).")

HELP_TERMS = (
    ("Match", "The broker saw another device within the radius. The two then connect "
              "directly (SDP offer/answer, ICE) and open a data channel; the broker never sees "
              "what they say. Live peers shows each: distance, bearing, time within the "
              "radius, the peer's GPS accuracy, handshake state, time from match to token. "
              "\"open (host)\": the data channel is open, and how ICE connected the two: "
              "host on one network, srflx or prflx across a NAT, relay through a TURN "
              "server; once it ended, why (\"closed: parted\", \"failed: timed out\"; the "
              "event log has the whole reason)."),
    ("Contact", "While the channel is open the two devices exchange positions directly and "
                "measure the contact: time within the radius, closest and median distance. "
                "A sample counts only when the two fixes' accuracies allow it: a fix coarser "
                "than about twice the radius never counts (the GPS panel then says \"too "
                "coarse\")."),
    ("Token", "Both devices derive the same witness token from their contact IDs and keep it "
              "until it expires (Tokens panel: countdown and contact). Tokens never leave "
              "the device unless you declare positive."),
    ("Declare", "After a positive test, d uploads your tokens to the broker (with the "
                "declaration code from the test site); they are deleted here once it has "
                "them."),
    ("Exposure", "Every few minutes the device fetches the tokens others declared and "
                 "compares them here. A match means a device you were in contact with "
                 "declared positive: the red banner. Get tested and follow your health "
                 "authority's advice; in a field test, tell the test lead."),
)

HELP_KEYS = (("d", "declare positive"), ("r", "radar instead of the tables (narrow screens)"),
             ("Tab ↑↓", "move to the next panel, scroll its rows (tables, event log)"),
             ("? F1", "this help"), ("ctrl+p", "commands"), ("Esc", "close a dialog"),
             ("q ctrl+c", "quit (ctrl+q too)"))


def help_text() -> Group:
    """The help: what match, contact, token, declaration and exposure mean; the keys."""
    terms = Table.grid(padding=(0, 2))
    terms.add_column(style="bold", no_wrap=True)
    terms.add_column(ratio=1)
    for term, meaning in HELP_TERMS:
        terms.add_row(term, meaning)
    keys = Table.grid(padding=(0, 2))
    keys.add_column(style="bold", no_wrap=True)
    keys.add_column(ratio=1)
    for key, meaning in HELP_KEYS:
        keys.add_row(key, meaning)
    return Group(Text(HELP_INTRO), Text(""), terms, Text(""), Text("Keys", style="bold"), keys)


class HelpScreen(ModalScreen[None]):
    """What match, contact, token, declaration and exposure mean, and the keys."""

    BINDINGS = [Binding("escape", "close", "Close"), Binding("question_mark", "close", show=False),
                Binding("f1", "close", show=False), Binding("q", "close", show=False)]

    def compose(self) -> ComposeResult:
        """The text in a scrollable box."""
        with VerticalScroll(id="help"):
            yield Static(help_text(), id="help-text")

    def on_mount(self) -> None:
        """Title the box."""
        self.query_one("#help").border_title = "Help (Esc to close)"

    def action_close(self) -> None:
        """Close the help."""
        self.dismiss(None)


class ChoiceButton(RadioButton):
    """A radio button whose dot is drawn only when it is the one picked: the choice reads
    without colour (a monochrome console, colour blindness), as ``▐●▌ main`` among ``▐ ▌``."""

    @property
    def BUTTON_INNER(self) -> str:  # type: ignore[override]  # noqa: N802 (Textual's name)
        """The dot when picked, a blank when not."""
        return "●" if self.value else " "


@dataclass(frozen=True)
class DeclareRequest:
    """The tester confirmed a positive declaration.

    Attributes:
        code: the declaration code as typed, already checked with
            :func:`~fanny_tui.protocol.codes.normalize_code`; None when left empty (a broker with
            open declarations).
        broker: the name of the broker picked (issue 8), None for the device's own
            (``[broker]``, also when it is the only one).
    """

    code: str | None
    broker: str | None = None


class ConfirmDeclareScreen(ModalScreen[DeclareRequest | None]):
    """Ask for the declaration code and a confirmation (paper 4, steps 1-2; paper 5).

    Dismissed with a :class:`DeclareRequest` to declare, None to cancel. A mistyped code (wrong
    length, a character outside the code's alphabet) is explained under the field and the
    dialog stays open: nothing is declared.

    With several brokers (``[[positives]]``, issue 8) the tester also picks the broker the
    declaration goes to, the one whose organization issued the code: the device's own broker
    (the first, selected) or a poll-only one; the one picked is marked with a dot
    (:class:`ChoiceButton`), not only by colour.

    Args:
        count: how many stored tokens the declaration would upload.
        hint: a line from the app shown under the code field (the demo's code), or None.
        brokers: the brokers' names, the device's own first (the default); one or none: no
            choice is shown.
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, count: int, hint: str | None = None,
                 brokers: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.count = count
        self.hint = hint
        self.brokers = brokers

    @property
    def broker(self) -> str | None:
        """The broker picked: None for the device's own (the first), else its name."""
        if len(self.brokers) < 2:
            return None
        index = self.query_one("#brokers", RadioSet).pressed_index
        return None if index <= 0 else self.brokers[index]

    @property
    def question(self) -> str:
        """The question asked."""
        if self.count == 0:
            return ("No token is stored on this device: declaring positive uploads nothing. "
                    "Declare anyway?")
        tokens = "the 1 token" if self.count == 1 else f"all {self.count} tokens"
        return (f"Upload {tokens} and delete them from this device once the broker has "
                "them?")

    @property
    def code_input(self) -> Input:
        """The declaration code field."""
        return self.query_one("#code", Input)

    @property
    def code_error(self) -> str:
        """What is wrong with the code typed, as shown ("" when nothing is)."""
        return str(self.query_one("#code-error", Label).content)

    def compose(self) -> ComposeResult:
        """The question, the code field and the two buttons."""
        with Vertical(id="dialog", classes="-brokers" if len(self.brokers) > 1 else ""):
            yield Label(Text("Declare positive", style="bold"), id="dialog-title")
            yield Label(Text(self.question), id="question")
            yield Label(Text("Declaration code from your test site or health authority:"),
                        id="code-label")
            yield Input(placeholder="XXXX-XXXX-XXXX-XXXX", id="code", max_length=64)
            yield Label("", id="code-error", markup=False)
            if self.hint:
                yield Label(Text(self.hint, style="bold"), id="declare-hint")
            yield Label(Text("Leave it empty only for a field-test broker with open "
                             "declarations.", style="dim"), id="code-hint")
            if len(self.brokers) > 1:
                yield Label(Text("Declare to (the broker that issued the code):"),
                            id="brokers-label")
                with RadioSet(id="brokers"):
                    for i, name in enumerate(self.brokers):
                        label = f"{name} (this device's broker)" if i == 0 else name
                        yield ChoiceButton(Text(label), value=i == 0)
            with Horizontal(id="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Declare", id="declare", variant="error")

    def on_mount(self) -> None:
        """Focus the code field (Escape cancels)."""
        self.code_input.focus()

    def _checked(self) -> DeclareRequest | None:
        """The request for the code typed, or None after showing what is wrong with it."""
        text = self.code_input.value.strip()
        if not text:
            return DeclareRequest(None, self.broker)
        try:
            normalize_code(text)
        except ValueError as exc:
            self.query_one("#code-error", Label).update(f"Check the code: {exc}")
            self.code_input.focus()
            return None
        return DeclareRequest(text, self.broker)

    def on_input_changed(self, event: Input.Changed) -> None:
        """Typing clears the previous complaint."""
        self.query_one("#code-error", Label).update("")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter in a non-empty code field is Declare (an empty one needs the button)."""
        event.stop()
        if event.value.strip():
            request = self._checked()
            if request is not None:
                self.dismiss(request)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        """Declare -> the request (if the code reads well), Cancel -> None."""
        event.stop()
        if event.button.id != "declare":
            self.dismiss(None)
            return
        request = self._checked()
        if request is not None:
            self.dismiss(request)

    def action_cancel(self) -> None:
        """Escape: do not declare."""
        self.dismiss(None)
