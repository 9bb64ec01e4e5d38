"""Screens of the FANNY field kit: the main screen and the positive-declaration dialog."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Header, Label

from ..engine import EngineSnapshot
from ..events import (
    BrokerConnected,
    BrokerDisconnected,
    Event,
    ExposureAlert,
    GpsFix,
    GpsLost,
    HandshakeFailed,
    HandshakeProgress,
    MatchFound,
    TokenStored,
)
from .widgets import (
    EventLog,
    ExposureBanner,
    MatchesTable,
    SessionPanel,
    TokensTable,
    describe_event,
)


class MainScreen(Screen[None]):
    """Session, nearby matches, tokens, exposure banner and event log.

    It displays what :meth:`show_event` and :meth:`load_snapshot` give it and never calls the
    engine; the app does (see :class:`fanny_tui.ui.app.FannyApp`). Once its panels are
    mounted it posts :class:`MainScreen.Ready`, after which the app starts the engine.

    Args:
        broker_url: shown while the first connection to the broker is being tried.
    """

    class Ready(Message):
        """The panels are mounted: events can be shown."""

    def __init__(self, broker_url: str) -> None:
        super().__init__()
        self.broker_url = broker_url

    def compose(self) -> ComposeResult:
        """Lay out the panels."""
        yield Header(show_clock=True)
        yield ExposureBanner(id="exposure")
        with Horizontal(id="top"):
            yield SessionPanel(id="session")
            yield MatchesTable(id="matches")
        yield TokensTable(id="tokens")
        yield EventLog(id="log")
        yield Footer()

    def on_mount(self) -> None:
        """Start the one-second countdown refresh of the tokens table; tell the app."""
        self.session.set_broker(False, f"connecting to {self.broker_url}…")
        self.set_interval(1.0, self.tick)
        self.post_message(self.Ready())

    # -- parts ----------------------------------------------------------------------------

    @property
    def session(self) -> SessionPanel:
        """The Session panel."""
        return self.query_one("#session", SessionPanel)

    @property
    def matches(self) -> MatchesTable:
        """The Nearby matches table."""
        return self.query_one("#matches", MatchesTable)

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

    # -- updates --------------------------------------------------------------------------

    def tick(self) -> None:
        """Refresh the token countdowns (every second)."""
        self.tokens.tick(datetime.now(UTC))

    def load_snapshot(self, snapshot: EngineSnapshot) -> None:
        """Show the session ID, the stored tokens and past exposure alerts (at start-up)."""
        self.session.set_session(snapshot.session_short)
        self.tokens.sync(snapshot.tokens)
        total = sum(alert.count for alert in snapshot.alerts)
        if total:
            self.banner.add_alert(total)
            latest = snapshot.alerts[-1].noticed_at
            self.log_view.add("exposure_alert", Text(
                f"{total} stored tokens were declared positive (latest alert "
                f"{latest.astimezone(UTC):%Y-%m-%d %H:%M} UTC)"))

    def show_event(self, event: Event) -> None:
        """Render one engine event in the panels it concerns and in the log."""
        match event:
            case BrokerConnected(url=url):
                self.session.set_broker(True, url)
            case BrokerDisconnected(reason=reason, retry_in_s=retry):
                self.session.set_broker(False, f"{reason} (retry in {retry:g} s)")
            case GpsFix():
                self._show_fix(event)
                return  # logged by _show_fix only when the fix mode changes
            case GpsLost(reason=reason):
                self.session.set_lost(reason)
            case MatchFound(peer=peer, role=role):
                self.matches.add_match(peer, role)
            case HandshakeProgress(peer=peer, state=state):
                self.matches.set_state(peer, state)
            case HandshakeFailed(peer=peer, reason=reason):
                self.matches.set_state(peer, "failed")
                self.matches.set_reason(peer, reason)
            case TokenStored(token=token, expires_at=expires_at):
                self.tokens.add_token(token, expires_at)
            case ExposureAlert(count=count):
                self.banner.add_alert(count)
        text = describe_event(event)
        if text is not None:
            self.log_view.add(event.event, text)

    def _show_fix(self, fix: GpsFix) -> None:
        previous = self.session.fix
        self.session.set_fix(fix)
        if previous is None or (previous.mode >= 3) != (fix.mode >= 3):
            mode = "3D" if fix.mode >= 3 else "2D"
            used = "?" if fix.satellites_used is None else str(fix.satellites_used)
            self.log_view.add(fix.event, f"{mode} fix ({used} satellites used)")


class ConfirmDeclareScreen(ModalScreen[bool]):
    """Ask before declaring positive (paper 4, steps 1-2). Dismissed with True to declare.

    Args:
        count: how many stored tokens the declaration would upload.
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    @property
    def question(self) -> str:
        """The question asked."""
        if self.count == 0:
            return ("No token is stored on this device: declaring positive uploads nothing. "
                    "Declare anyway?")
        tokens = "the 1 token" if self.count == 1 else f"all {self.count} tokens"
        return (f"Upload {tokens} and delete them from this device once the broker has "
                "them?")

    def compose(self) -> ComposeResult:
        """The question and the two buttons (Cancel has the focus)."""
        with Vertical(id="dialog"):
            yield Label(Text("Declare positive", style="bold"), id="dialog-title")
            yield Label(Text(self.question), id="question")
            with Horizontal(id="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Declare", id="declare", variant="error")

    def on_mount(self) -> None:
        """Focus Cancel, the harmless choice."""
        self.query_one("#cancel", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        """Declare -> True, Cancel -> False."""
        event.stop()
        self.dismiss(event.button.id == "declare")

    def action_cancel(self) -> None:
        """Escape: do not declare."""
        self.dismiss(False)
