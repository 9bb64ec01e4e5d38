"""The Textual UI around a real engine: real SQLite store, broker URL on a dead loopback port.

Each test builds a real :class:`~fanny_tui.engine.Engine` whose broker URL points at a loopback
port that is bound but not listening (connections are refused, so the broker stays
disconnected), with a position source fed by the test, and drives the app with Textual's Pilot.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from textual.command import CommandList, CommandPalette
from textual.message import Message
from textual.pilot import Pilot
from textual.widgets import RadioButton
from textual.widgets._footer import FooterKey

from fanny_tui.events import (
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
    PositivePending,
    PositiveRefused,
    TokenStored,
)
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.store import TokenStore
from fanny_tui.ui import EngineEvent, FannyApp
from fanny_tui.ui.formatting import format_countdown
from fanny_tui.ui.screens import ConfirmDeclareScreen

from .kit import TOKENS, build, log_text, rendered, started, wait_until

SIZE = (120, 40)
FIX = GpsFix(latitude=44.0688172, longitude=-1.2345678, accuracy_m=4.2, mode=3,
             satellites_used=8, satellites_visible=12)
MARKUP = "peer[/] [bold]x[/bold"
"""Remote text that raises MarkupError if anything renders it as console markup."""


def pending_in_store(data_dir: Path) -> dict[str, list[str]]:
    store = TokenStore.in_dir(data_dir)
    try:
        return {k: [t.token for t in v] for k, v in store.pending_uploads().items()}
    finally:
        store.close()


def count_in_store(data_dir: Path) -> int:
    store = TokenStore.in_dir(data_dir)
    try:
        return store.count()
    finally:
        store.close()





# -- start-up ---------------------------------------------------------------------------


async def test_start_shows_session_tokens_broker_and_gps(config, data_dir):
    app, engine = build(config, data_dir, FIX)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        main = app.main_screen
        await wait_until(pilot, lambda: main.session.fix is not None, "the first fix")
        await pilot.pause()

        session = rendered(main.session)
        assert engine.session_short in session
        assert "disconnected" in session and not engine.broker_connected
        assert "3D fix" in session
        assert "8 used / 12 visible" in session
        assert "44.068817" in session and "-1.234568" in session   # 6 decimals, not 2
        assert "4.2 m" in session

        table = main.tokens
        for token in TOKENS:
            assert table.get_cell(token, "token").plain == token[:8] + "…"
            assert table.get_cell(token, "upload").plain == ""
            expires = table.get_cell(token, "expires").plain
            assert re.fullmatch(r"\d{4}-\d\d-\d\d 04:00 UTC", expires)
            assert re.fullmatch(r"\d+d \d\dh \d\dm \d\ds", table.get_cell(token, "left").plain)
        shown = rendered(table)
        assert "1a2b3c4d…" in shown and "Tokens (3)" in shown
        # Rows are sorted soonest expiry first.
        assert [table.get_row_at(i)[0].plain for i in range(3)] == [
            t[:8] + "…" for t in TOKENS]
        # The countdown is live: it changes within a couple of seconds.
        first = table.get_cell(TOKENS[0], "left").plain
        await wait_until(pilot, lambda: table.get_cell(TOKENS[0], "left").plain != first,
                         "the countdown to tick")
        assert "session_started" in log_text(app)
        # Positions never go into the event log.
        assert "44.06" not in log_text(app)


def test_countdown_format():
    assert format_countdown(14 * 86_400 + 18 * 3_600 + 3 * 60 + 12.9) == "14d 18h 03m 12s"
    assert format_countdown(59) == "0d 00h 00m 59s"
    assert format_countdown(0) == "expired"


async def test_store_error_exits_with_a_clear_message(config, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("not a directory")
    app, _ = build(config, not_a_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.error is not None, "the start-up error")
    assert app.return_code == 1
    assert app.error is not None and "cannot open the token store" in app.error
    assert "Traceback" not in app.error


async def test_q_stops_the_engine_and_quits(config, data_dir):
    app, engine = build(config, data_dir, FIX)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        worker = app.engine_worker
        assert worker is not None
        await pilot.press("q")
        await wait_until(pilot, lambda: worker.is_finished, "the engine worker to finish")
    assert app.return_code == 0 and app.error is None
    assert worker.state.name == "SUCCESS"       # engine.run() returned: the store is closed
    assert count_in_store(data_dir) == len(TOKENS)


@pytest.mark.parametrize("dialog", [False, True])
async def test_ctrl_c_quits_like_q_even_in_the_declare_dialog(config, data_dir, dialog):
    # A tester presses Ctrl-C to leave a console program (trial finding 5): it quits, with the
    # engine stopped cleanly, from the main screen and from a dialog with a text field.
    app, _ = build(config, data_dir, FIX)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        worker = app.engine_worker
        assert worker is not None
        if dialog:
            await pilot.press("d")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDeclareScreen),
                             "the dialog")
            await pilot.press(*"K7QF")
        await pilot.press("ctrl+c")
        await wait_until(pilot, lambda: worker.is_finished, "the engine worker to finish")
    assert app.return_code == 0 and app.error is None
    assert worker.state.name == "SUCCESS"
    assert count_in_store(data_dir) == len(TOKENS)
    assert pending_in_store(data_dir) == {}                     # nothing was declared


async def test_the_footer_says_ctrl_c_quits(config, data_dir):
    app, _ = build(config, data_dir, FIX)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot, app)
        await pilot.pause()
        keys = {(key.key_display, key.description) for key in app.screen.query(FooterKey)}
        assert ("q ^c", "Quit") in keys, keys
        [quit_key] = [key for key in app.screen.query(FooterKey) if key.description == "Quit"]
        assert "q ^c Quit" in rendered(quit_key)


# -- declare positive ---------------------------------------------------------------------


async def test_declare_key_then_cancel_declares_nothing(config, data_dir):
    app, _ = build(config, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDeclareScreen),
                         "the confirmation dialog")
        dialog = app.screen
        assert isinstance(dialog, ConfirmDeclareScreen)
        assert dialog.question == (
            "Upload all 3 tokens and delete them from this device once the broker has them?")
        depth = len(app.screen_stack)
        await pilot.press("d")              # inert while the dialog is open
        await pilot.pause()
        assert len(app.screen_stack) == depth
        await pilot.click("#cancel")
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmDeclareScreen),
                         "the dialog to close")
        await pilot.pause()
        assert "cancelled" in log_text(app)
        assert "positive_pending" not in log_text(app)
        assert pending_in_store(data_dir) == {}
        assert all(app.main_screen.tokens.get_cell(t, "upload").plain == "" for t in TOKENS)
    assert count_in_store(data_dir) == len(TOKENS)


async def test_declare_from_palette_then_confirm_keeps_tokens_pending(config, data_dir):
    app, _ = build(config, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
        await pilot.press(*"declare")

        def offered() -> bool:
            results = app.screen.query(CommandList)
            return bool(results) and results.first().option_count > 0 and (
                "Declare positive" in str(results.first().get_option_at_index(0).prompt))

        await wait_until(pilot, offered, "the Declare positive command")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDeclareScreen),
                         "the confirmation dialog")
        await pilot.click("#declare")
        # The broker is down: the upload fails, the tokens are kept and marked pending.
        await wait_until(pilot, lambda: "positive_pending" in log_text(app),
                         "a positive_pending line in the log")
        pending = pending_in_store(data_dir)
        assert len(pending) == 1 and sorted(next(iter(pending.values()))) == sorted(TOKENS)
        assert count_in_store(data_dir) == len(TOKENS)
        await wait_until(pilot, lambda: all(
            app.main_screen.tokens.get_cell(t, "upload").plain for t in TOKENS),
            "the pending markers")
        assert "3 pending upload" in rendered(app.main_screen.tokens)
        assert "3 tokens marked for upload" in log_text(app)


# -- events -------------------------------------------------------------------------------


async def test_exposure_banner_appears_on_alert(config, data_dir):
    app, engine = build(config, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        banner = app.main_screen.banner
        assert not banner.display
        engine.emit(ExposureAlert(count=2))
        await wait_until(pilot, lambda: banner.display, "the exposure banner")
        await pilot.pause()
        text = rendered(banner)
        assert "EXPOSURE ALERT: 2 stored tokens were declared positive" in text
        assert "exposure_alert" in log_text(app)


async def test_exposure_banner_shown_at_start_for_past_alerts(config, data_dir):
    store = TokenStore.in_dir(data_dir)
    assert store.check_positives([[TOKENS[0]]], 1, datetime.now(UTC)).matched == 1  # an alert
    store.close()
    app, _ = build(config, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.main_screen.banner.display, "the exposure banner")
        await pilot.pause()
        assert "1 stored token was declared positive" in rendered(
            app.main_screen.banner)
        assert app.main_screen.tokens.row_count == len(TOKENS) - 1


async def test_remote_text_is_never_markup(config, data_dir):
    app, engine = build(config, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        engine.emit(BrokerDisconnected(reason=MARKUP, retry_in_s=0.5))
        engine.emit(MatchFound(peer=1, role="offerer"))
        engine.emit(HandshakeProgress(peer=1, state="connecting"))
        engine.emit(HandshakeFailed(peer=1, reason=MARKUP))
        engine.emit(GpsLost(reason=MARKUP))
        engine.emit(EngineError(message=MARKUP))
        engine.emit(PositivePending(count=1, reason=MARKUP, retry_in_s=1.0))
        matches = app.main_screen.peers
        await wait_until(pilot, lambda: "positive_pending" in log_text(app), "the events")
        await pilot.pause()
        # Cut to the table's 26 characters, never parsed (the log has the whole reason).
        assert matches.get_cell("1", "state").plain == "failed: peer[/] [bold]x[/…"
        assert "failed: peer[/] [bold]x[/…" in rendered(matches)
        session = rendered(app.main_screen.session)
        assert "peer[/]" in session and "no fix" in session
        # Five events carry it (outage, failed exchange, lost fix, error, pending upload);
        # each line is wrapped at the log's width, so none is split or cut.
        assert log_text(app).count(MARKUP) == 5
        assert app.is_running and app.error is None


async def test_floods_are_merged_and_tables_follow(config, data_dir):
    dispatched: list[Event] = []

    def hook(message: Message) -> None:
        if isinstance(message, EngineEvent):
            dispatched.append(message.event)

    app, engine = build(config, data_dir)
    async with app.run_test(size=SIZE, message_hook=hook) as pilot:
        await started(pilot, app)
        before = sum(isinstance(e, GpsFix) for e in dispatched)
        for i in range(300):                    # 300 fixes queued at once
            engine.emit(GpsFix(latitude=44.0 + i * 1e-6, longitude=-1.0, accuracy_m=3.0,
                               mode=2, satellites_used=5, satellites_visible=9))
        for peer in range(1, 51):               # 50 matches, each through its handshake
            engine.emit(MatchFound(peer=peer, role="answerer"))
            for state in ("connecting", "exchanging", "stored"):
                engine.emit(HandshakeProgress(peer=peer, state=state))
        new_token = "f" * 64
        engine.emit(TokenStored(peer=50, token=new_token,
                                expires_at=expiry_for(datetime.now(UTC))))
        main = app.main_screen
        await wait_until(pilot, lambda: main.tokens.row_count == len(TOKENS) + 1,
                         "the new token")
        fixes = sum(isinstance(e, GpsFix) for e in dispatched) - before
        print(f"300 queued GPS fixes were dispatched as {fixes} message(s)")
        assert fixes <= 2
        assert main.session.fix is not None and main.session.fix.latitude == 44.0 + 299e-6
        assert "44.000299" in rendered(main.session) and "2D fix" in rendered(main.session)
        assert main.peers.row_count == 50
        assert all(main.peers.get_cell(str(p), "state").plain == "stored"
                   for p in range(1, 51))
        assert main.tokens.get_cell(new_token, "token").plain == "ffffffff…"


# -- declaration codes ----------------------------------------------------------------------


def codes_in_store(data_dir: Path) -> list[str | None]:
    store = TokenStore.in_dir(data_dir)
    try:
        return [p.code for p in store.pending()]
    finally:
        store.close()


async def open_dialog(pilot: Pilot[None], app: FannyApp) -> ConfirmDeclareScreen:
    await pilot.press("d")
    await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDeclareScreen),
                     "the declaration dialog")
    await pilot.pause()
    assert isinstance(app.screen, ConfirmDeclareScreen)
    return app.screen


async def test_a_mistyped_code_is_explained_and_declares_nothing(config, data_dir):
    app, _ = build(config, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        dialog = await open_dialog(pilot, app)
        assert dialog.code_input.has_focus
        await pilot.press(*"K7QF-3M9X-TR2B-8HJ")       # one symbol short
        await pilot.click("#declare")
        await pilot.pause()
        assert app.screen is dialog                     # still open
        assert dialog.code_error == "Check the code: a declaration code has 16 characters, got 15"
        assert "Check the code" in rendered(dialog.query_one("#code-error"))
        await pilot.press("U", "enter")                 # U is not in the code's alphabet
        await pilot.pause()
        assert app.screen is dialog and "'U'" in dialog.code_error
        await pilot.press("backspace")
        assert dialog.code_error == ""                  # typing clears the complaint
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is app.main_screen, "the dialog to close")
        assert "cancelled" in log_text(app)
    assert pending_in_store(data_dir) == {}


async def test_a_code_typed_loosely_is_kept_with_the_pending_upload(config, data_dir):
    app, _ = build(config, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await open_dialog(pilot, app)
        await pilot.press(*"k7qf 3m9x tr2b 8hjd", "enter")   # lower case, spaces: fine
        await wait_until(pilot, lambda: "positive_pending" in log_text(app),
                         "the upload to be pending (the broker is down)")
        assert "with the declaration code" in log_text(app)
    assert codes_in_store(data_dir) == ["K7QF3M9XTR2B8HJD"]     # survives the restart
    assert count_in_store(data_dir) == len(TOKENS)


async def test_a_refused_code_is_shown_and_the_tokens_stay(config, data_dir):
    app, engine = build(config, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        engine.emit(PositiveRefused(reason="code_used", count=3,
                                    message="this declaration code was already used"))
        await wait_until(pilot, lambda: "positive_refused" in log_text(app), "the refusal")
        await pilot.pause()
        text = " ".join(line.strip() for line in app.main_screen.log_view.plain_lines)
        assert "already used" in text and "3 tokens stay on this device" in text
        assert any(n.title == "Declaration refused" and "already used" in n.message
                   for n in app._notifications)
        assert app.main_screen.tokens.row_count == len(TOKENS)


# -- broker outage --------------------------------------------------------------------------


async def test_an_outage_is_shown_once_in_the_log_and_in_full_in_the_panel(config, data_dir):
    app, engine = build(config, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        # The real link retries a refused port again and again, with the same reason.
        await wait_until(pilot, lambda: app.main_screen.session.outage_attempts >= 4,
                         "four failed attempts")
        await pilot.pause()
        lines = [line for line in app.main_screen.log_view.plain_lines
                 if "broker_disconnected" in line]
        assert len(lines) == 1 and "ConnectionRefusedError" in lines[0], lines
        session = rendered(app.main_screen.session)
        assert re.search(r"disconnected, retry in [\d.]+ s", session), session
        assert "ConnectionRefusedError" in session
        assert re.search(r"since \d\d:\d\d:\d\d, \d+ attempts", session), session
        # Another reason is news: logged; back up, then down again: logged again. (Shown
        # directly, in one go: the real link keeps reporting its own failures meanwhile.)
        real = app.main_screen.session.broker_detail
        main = app.main_screen
        main.show_event(BrokerDisconnected(reason="connection closed (1001)", retry_in_s=0.0))
        main.show_event(BrokerConnected(url="ws://127.0.0.1:1", radius_m=10.0))
        assert main.session.broker_connected and main.session.outage_attempts == 0
        assert "attempts" not in rendered(main.session)
        main.show_event(BrokerDisconnected(reason=real, retry_in_s=0.1))
        assert main.session.outage_attempts == 1
        await pilot.pause()
        lines = [line for line in main.log_view.plain_lines if "broker_disconnected" in line]
        assert len(lines) == 3, lines
        assert "connection closed (1001)" in lines[1] and "ConnectionRefusedError" in lines[2]


async def test_the_declaration_goes_to_the_broker_picked_in_the_dialog(quiet_region, data_dir):
    # Issue 8: with [[positives]] brokers the dialog offers them; the device's own is the default.
    app, engine = build(quiet_region, data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot, app)
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDeclareScreen),
                         "the confirmation dialog")
        dialog = app.screen
        assert isinstance(dialog, ConfirmDeclareScreen)
        assert dialog.brokers == engine.broker_names == ("main", "health", "region-2")
        assert dialog.broker is None                        # the device's own, by default
        buttons = list(dialog.query(RadioButton))
        assert [str(b.label) for b in buttons] == [
            "main (this device's broker)", "health", "region-2"]
        # The one picked reads without colour: only it has the dot.
        await pilot.pause()
        choice = " ".join(" ".join(rendered(b).split()) for b in buttons)
        assert choice == "▐●▌ main (this device's broker) ▐ ▌ health ▐ ▌ region-2", choice
        await pilot.click(buttons[1])
        await pilot.pause()
        assert dialog.broker == "health"
        choice = " ".join(" ".join(rendered(b).split()) for b in buttons)
        assert choice == "▐ ▌ main (this device's broker) ▐●▌ health ▐ ▌ region-2", choice
        await pilot.click("#declare")
        await wait_until(pilot, lambda: "to the broker health" in log_text(app),
                         "the declaration's log line")
        store = TokenStore.in_dir(data_dir, read_only=True)
        try:
            assert [(p.broker, len(p.tokens)) for p in store.pending()] == [("health", 3)]
        finally:
            store.close()
