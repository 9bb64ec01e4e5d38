"""The Textual app: runs the engine in a worker, shows its events, sends it commands.

The app never talks to sockets, files or aiortc: :class:`~fanny_tui.engine.Engine` does. Engine
events arrive through :meth:`Engine.subscribe` on the app's own event loop and are posted to the
app as :class:`EngineEvent` messages; consecutive GPS fixes are merged
(:meth:`EngineEvent.can_replace`), so a flood of fixes costs one redraw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from rich.text import Text
from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.driver import Driver
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.worker import Worker, WorkerCancelled, WorkerFailed, WorkerState

from ..engine import Engine, EngineSnapshot
from ..events import (
    Event,
    ExposureAlert,
    GpsFix,
    IdsRotated,
    PositiveDeclared,
    PositivePending,
    PositiveRefused,
    SessionStarted,
    TokensExpired,
)
from ..store import StoreError
from .formatting import plural, refusal_toast
from .screens import Clock, ConfirmDeclareScreen, HelpScreen, MainScreen, utc_now

STOP_TIMEOUT_S = 10.0
"""How long quitting waits for the engine to finish before cancelling it (seconds)."""

REFUSAL_TOAST_S = 8.0
"""How long the "Declaration refused" notice stays up (seconds); the log keeps it."""

_TOKENS_CHANGED = (PositiveDeclared, PositivePending, PositiveRefused, TokensExpired,
                   ExposureAlert)


class EngineEvent(Message):
    """One engine event, delivered to the app.

    Args:
        event: the engine event.
    """

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event

    def can_replace(self, message: Message) -> bool:
        """A GPS fix is superseded by the fix queued right after it (floods are merged)."""
        return (isinstance(self.event, GpsFix) and isinstance(message, EngineEvent)
                and isinstance(message.event, GpsFix))


class FannyApp(App[None]):
    """The FANNY field kit UI around one :class:`Engine`.

    Args:
        engine: the engine to run (not running yet); the app runs and stops it.
        title: the title in the header.
        declare_hint: one line shown in the declaration dialog (e.g. the demo's code).
        clock: returns the current instant, aware, UTC (see :func:`make_app`).

    Attributes:
        error: why the app exited on its own (the store cannot open, the engine crashed),
            else None. The exit code is then 1 and the message is printed on exit.
    """

    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("d", "declare_positive", "Declare positive"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("f1", "help", "Help", show=False),
        Binding("q", "quit", "Quit", key_display="q ^c"),
        # Ctrl-C quits, as on any console program (Textual's default only says to press
        # ctrl+q, which quits too). Priority: also while the declaration dialog has focus.
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, engine: Engine, *, title: str = "FANNY field kit",
                 declare_hint: str | None = None, clock: Clock = utc_now) -> None:
        super().__init__()
        self.engine = engine
        self.title = title
        self.declare_hint = declare_hint
        self.clock = clock
        self.error: str | None = None
        self._main: MainScreen | None = None
        self._worker: Worker[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._stopping = False

    @property
    def main_screen(self) -> MainScreen:
        """The main screen (panels), even while a dialog is on top of it."""
        if self._main is None:
            config = self.engine.config
            self._main = MainScreen(config.broker.url, title=self.title,
                                    radius_m=config.protocol.radius_m,
                                    poll_interval_s=config.protocol.poll_interval_s,
                                    clock=self.clock, broker_name=config.broker.name,
                                    other_brokers=tuple(p.name for p in config.positives))
        return self._main

    @property
    def engine_worker(self) -> Worker[None] | None:
        """The worker running :meth:`Engine.run` (None before the main screen is up)."""
        return self._worker

    def get_driver_class(self) -> type[Driver]:
        """Textual's driver for this platform; on Linux and macOS one that survives a closed
        terminal (:class:`~fanny_tui.ui.driver.HangupSafeDriver`)."""
        from textual.drivers.linux_driver import LinuxDriver

        driver_class = super().get_driver_class()
        if driver_class is LinuxDriver:
            from .driver import HangupSafeDriver

            return HangupSafeDriver
        return driver_class

    def get_default_screen(self) -> Screen[None]:
        """The main screen is the first screen."""
        return self.main_screen

    # -- engine lifecycle ------------------------------------------------------------------

    def on_main_screen_ready(self, message: MainScreen.Ready) -> None:
        """The panels are up: subscribe to the engine, then start it in a worker."""
        if self._worker is not None:
            return
        self._unsubscribe = self.engine.subscribe(self._forward_engine_event)
        self._worker = self.run_worker(self._run_engine, name="engine", group="engine",
                                       exit_on_error=False)

    def _forward_engine_event(self, event: Event) -> None:
        # Called by the engine on this loop: never touch widgets here, post a message.
        # (Not named ``_on_engine_event``: Textual would take that for the message handler.)
        self.post_message(EngineEvent(event))

    async def _run_engine(self) -> None:
        try:
            await self.engine.run()
        except StoreError as exc:
            self._fail(f"cannot start: {exc}")
        except Exception as exc:  # shown in one line and exit code 1, never a traceback
            self._fail(f"the engine stopped: {type(exc).__name__}: {exc}")
        else:
            if not self._stopping:
                self._fail("the engine stopped unexpectedly")

    def _fail(self, text: str) -> None:
        self.error = text
        self.exit(return_code=1, message=Text(f"fanny-tui: {text}", style="bold red"))

    async def _stop_engine(self) -> None:
        """Stop the engine and wait for its worker (cancel it after STOP_TIMEOUT_S)."""
        if self._stopping:
            return
        self._stopping = True
        await self.engine.stop()
        worker = self._worker
        if worker is not None and worker.state in (WorkerState.PENDING, WorkerState.RUNNING):
            try:
                await asyncio.wait_for(worker.wait(), STOP_TIMEOUT_S)
            except (TimeoutError, WorkerCancelled, WorkerFailed):
                worker.cancel()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    async def action_quit(self) -> None:
        """Stop the engine (store closed cleanly), then exit."""
        await self._stop_engine()
        self.exit()

    async def on_unmount(self) -> None:
        """Whatever ended the app, the engine is told to stop."""
        await self.engine.stop()

    # -- events ----------------------------------------------------------------------------

    def on_engine_event(self, message: EngineEvent) -> None:
        """Show one engine event; refresh the tokens table when the store changed.

        Events still queued while the app closes (the panels are being removed; the engine
        keeps reporting broker retries until it stops) are dropped.
        """
        try:
            self._show_engine_event(message.event)
        except NoMatches:
            if not self._closing_down():
                raise

    def _closing_down(self) -> bool:
        return (self._stopping or self._exit or not self.is_running
                or not self.main_screen.is_running)

    def _show_engine_event(self, event: Event) -> None:
        self.main_screen.show_event(event)
        if isinstance(event, SessionStarted):
            snapshot = self._snapshot()
            if snapshot is not None:
                self.main_screen.load_snapshot(snapshot)
        elif isinstance(event, _TOKENS_CHANGED):
            self._resync_tokens()
        elif isinstance(event, IdsRotated):
            self.main_screen.session.set_session(self.engine.session_short)
        if isinstance(event, PositiveRefused):
            # Short and brief: the log keeps the whole sentence; the toast must not hide
            # the Tokens panel and the log for long.
            self.notify(refusal_toast(event.reason, event.count), title="Declaration refused",
                        severity="error", markup=False, timeout=REFUSAL_TOAST_S)
        elif isinstance(event, PositiveDeclared) and event.count:
            # The success replaces an earlier refusal's toast: never both side by side.
            self.clear_notifications()
            self.notify(f"The broker has {plural(event.count, 'token')}; deleted from this "
                        "device.", title="Declared positive", markup=False)

    def _snapshot(self) -> EngineSnapshot | None:
        try:
            return self.engine.snapshot()
        except StoreError as exc:
            self.main_screen.log_line("error", str(exc))
            return None

    def _resync_tokens(self) -> None:
        snapshot = self._snapshot()
        if snapshot is not None:
            self.main_screen.tokens.sync(snapshot.tokens, self.clock())

    # -- commands --------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys ``d`` and ``?`` do nothing while a dialog (or the command palette) is open."""
        return not (action in ("declare_positive", "help")
                    and isinstance(self.screen, ModalScreen))

    def action_help(self) -> None:
        """``?`` or F1: what match, contact, token and exposure mean, and the keys."""
        self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        """Textual's commands plus "Declare positive" in the command palette (ctrl+p)."""
        yield from super().get_system_commands(screen)
        yield SystemCommand(
            "Declare positive",
            "Upload every stored token to the broker (asks for confirmation first)",
            self.action_declare_positive)

    @work(exclusive=True, group="declare")
    async def action_declare_positive(self) -> None:
        """Ask for the declaration code and a confirmation, then declare positive.

        Paper 4, steps 1-2, and paper 5 (the code). A mistyped code is caught in the dialog;
        a refusal of the code by the broker arrives later as ``positive_refused``.
        """
        snapshot = self._snapshot()
        count = 0 if snapshot is None else sum(not t.pending for t in snapshot.tokens)
        request = await self.push_screen_wait(
            ConfirmDeclareScreen(count, self.declare_hint, self.engine.broker_names))
        if request is None:
            self.main_screen.log_line("declare_positive", "cancelled: nothing was uploaded")
            return
        self.clear_notifications()   # an earlier refusal is old news once declared again
        try:
            declared = await self.engine.declare_positive(request.code, broker=request.broker)
        except (RuntimeError, StoreError, ValueError) as exc:
            self.main_screen.log_line("error", f"declare positive failed: {exc}")
            self.notify(str(exc), title="Declare positive failed", severity="error",
                        markup=False)
            return
        with_code = "with the declaration code" if request.code else "without a code"
        to = "" if request.broker is None else f" to the broker {request.broker}"
        self.main_screen.log_line(
            "declare_positive",
            f"{declared} tokens marked for upload{to} {with_code}; deleted here once the "
            "broker has them")
        self._resync_tokens()


def make_app(engine: Engine, *, title: str = "FANNY field kit",
             declare_hint: str | None = None, clock: Clock = utc_now) -> FannyApp:
    """Build the UI around ``engine`` (shared by ``fanny-tui``, the demo and the tests).

    Args:
        engine: a configured engine that is not running; the app runs it in a worker when it
            starts and stops it when it quits.
        title: the title in the header.
        declare_hint: one line shown in the declaration dialog (the demo passes its code),
            None for none.
        clock: returns the current instant, aware, UTC: every countdown, age and log time
            is drawn from it (the default is the system clock; snapshot tests fix it).

    Returns:
        The app; ``app.run()`` blocks until the user quits. After an error
        (``app.error`` set) ``app.return_code`` is 1.
    """
    return FannyApp(engine, title=title, declare_hint=declare_hint, clock=clock)
