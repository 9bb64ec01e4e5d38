"""Screens of the FANNY field kit: the main screen and the positive-declaration dialog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Header, Input, Label

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
from ..protocol.codes import normalize_code
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
        self._outage_reason: str | None = None

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
                self._outage_reason = None
                self.session.set_broker(True, url)
            case BrokerDisconnected(reason=reason, retry_in_s=retry):
                self.session.set_outage(reason, retry)
                if reason == self._outage_reason:
                    return  # the same failure again at each retry: one log line is enough
                self._outage_reason = reason
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


@dataclass(frozen=True)
class DeclareRequest:
    """The tester confirmed a positive declaration.

    Attributes:
        code: the declaration code as typed, already checked with
            :func:`~fanny_tui.protocol.codes.normalize_code`; None when left empty (a broker with
            open declarations).
    """

    code: str | None


class ConfirmDeclareScreen(ModalScreen[DeclareRequest | None]):
    """Ask for the declaration code and a confirmation (paper 4, steps 1-2; paper 5).

    Dismissed with a :class:`DeclareRequest` to declare, None to cancel. A mistyped code (wrong
    length, a character outside the code's alphabet) is explained under the field and the
    dialog stays open: nothing is declared.

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
        with Vertical(id="dialog"):
            yield Label(Text("Declare positive", style="bold"), id="dialog-title")
            yield Label(Text(self.question), id="question")
            yield Label(Text("Declaration code from your test site or health authority:"),
                        id="code-label")
            yield Input(placeholder="XXXX-XXXX-XXXX-XXXX", id="code", max_length=64)
            yield Label("", id="code-error", markup=False)
            yield Label(Text("Leave it empty only for a field-test broker with open "
                             "declarations.", style="dim"), id="code-hint")
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
            return DeclareRequest(None)
        try:
            normalize_code(text)
        except ValueError as exc:
            self.query_one("#code-error", Label).update(f"Check the code: {exc}")
            self.code_input.focus()
            return None
        return DeclareRequest(text)

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
