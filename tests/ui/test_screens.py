"""The main screen as a tester outdoors sees it: live peers, radar, GPS, broker, status, log,
alert, help and the declaration dialog; at 80x24 and larger.

A real engine runs behind the app (real SQLite store); its broker address is a loopback port
that either refuses connections or accepts them and never answers (quiet: the link waits for
its 10 s handshake time-out). Peer, contact and poll events are posted to the app, as the
engine would emit them, and the app's clock is a :class:`~tests.ui.kit.SettableClock`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from fanny_tui.config import Config
from fanny_tui.events import (
    BrokerDisconnected,
    ChannelOpen,
    Contact,
    ContactClosed,
    Event,
    ExposureAlert,
    GpsFix,
    HandshakeFailed,
    HandshakeProgress,
    IdsRotated,
    MatchFound,
    PeerUpdate,
    PositiveDeclared,
    PositivePending,
    PositiveRefused,
    PositivesPolled,
    PositivesPollFailed,
    TokenStored,
)
from fanny_tui.store import TokenStore
from fanny_tui.ui import EngineEvent, FannyApp
from fanny_tui.ui.peers import LINGER_S
from fanny_tui.ui.screens import ConfirmDeclareScreen, HelpScreen

from .kit import T0, SettableClock, build, log_text, loopback_port, rendered, ui_config, wait_until

WIDE, SMALL = (160, 48), (80, 24)
TOKENS = ["1a2b3c4d" + "0" * 56, "5e6f7a8b" + "1" * 56, "9c0d1e2f" + "2" * 56]
CONTACT = Contact(duration_s=125.0, closest_m=2.1, median_m=4.0, samples=25)
REFUSED = "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 8765)"


@pytest.fixture
def quiet() -> Iterator[Config]:
    """A broker address that accepts connections and never answers."""
    with loopback_port(listening=True) as port:
        yield ui_config(port)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A store with the three TOKENS, expiring 5, 10 and 15 days after T0 at 04:00 UTC."""
    store = TokenStore.in_dir(tmp_path)
    for days, token in zip((5, 10, 15), TOKENS, strict=True):
        store.add(token, (T0 + timedelta(days=days)).replace(hour=4, minute=0))
    store.close()
    return tmp_path


@pytest.fixture
def clock() -> SettableClock:
    return SettableClock()


async def started(pilot, app: FannyApp) -> None:
    await wait_until(pilot, lambda: app.main_screen.tokens.row_count == len(TOKENS),
                     "the stored tokens in the table")


async def post(pilot, app: FannyApp, *events: Event) -> None:
    """Deliver ``events`` as the engine would, and let the app draw them."""
    for event in events:
        app.post_message(EngineEvent(event))
    await pilot.pause()
    await pilot.pause()


async def tick(pilot, app: FannyApp, clock: SettableClock, seconds: float) -> None:
    """Move the clock on and let the screen's one-second refresh run."""
    clock.advance(seconds)
    app.main_screen.tick()
    await pilot.pause()


def update(peer: int, distance: float, bearing: float, within: str = "in",
           within_s: float = 30.0) -> PeerUpdate:
    return PeerUpdate(peer=peer, distance_m=distance, bearing_deg=bearing, peer_accuracy_m=5.0,
                      within=within, within_s=within_s, samples=6)


# -- live peers and radar ---------------------------------------------------------------------


async def test_live_peers_show_the_contact_and_go_after_it_ends(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=WIDE) as pilot:
        await started(pilot, app)
        main = app.main_screen
        await post(pilot, app,
                   MatchFound(peer=1, role="offerer"),
                   HandshakeProgress(peer=1, state="connecting"),
                   ChannelOpen(peer=1, local_candidate="host", remote_candidate="host"),
                   update(1, 4.3, 47.0, within_s=125.0),
                   MatchFound(peer=2, role="answerer"), update(2, 14.0, 200.0, "uncertain"))
        row = [cell.plain for cell in main.peers.get_row("1")]
        assert row == ["peer 1", "4.3 m", "047° NE", "2m05s", "±5.0 m", "exchanging", "–", ""]
        assert main.peers.get_cell("2", "distance").plain == "14 m"
        assert "Live peers (2)" in rendered(main.peers)
        radar = rendered(main.radar)
        assert "◉" in radar and "1" in radar and "2" in radar and "ring 10 m" in radar

        await post(pilot, app, TokenStored(peer=1, token=TOKENS[0],
                                           expires_at=main.tokens._expiry[TOKENS[0]],
                                           new=False, contact=CONTACT, match_to_token_s=1.26))
        assert main.peers.get_cell("1", "state").plain == "stored"
        assert main.peers.get_cell("1", "latency").plain == "1.3 s"
        await post(pilot, app,
                   ContactClosed(peer=1, reason="parted", contact=CONTACT, token_stored=True),
                   HandshakeProgress(peer=2, state="failed"),
                   HandshakeFailed(peer=2, reason="handshake timed out"))
        assert main.peers.get_cell("1", "state").plain == "closed"
        assert main.peers.get_cell("1", "reason").plain == "parted"
        assert main.peers.get_cell("2", "reason").plain == "handshake timed out"
        await tick(pilot, app, clock, LINGER_S - 1)
        assert main.peers.row_count == 2                     # the tester sees how they ended
        await tick(pilot, app, clock, 1)
        assert main.peers.row_count == 0
        assert "Live peers: none" in rendered(main.peers)
        assert "1" not in rendered(main.radar).split("ring")[0].replace("◉", "")
        # What matters stayed in the log; handshake steps and samples did not go there.
        log = log_text(app)
        assert "peer 1 within the radius, role offerer" in log
        assert "peer 1: contact over (parted)" in log
        assert "handshake timed out" in log
        assert "connecting" not in log and "peer_update" not in log


async def test_the_radar_replaces_the_tables_on_r_when_narrow(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        main = app.main_screen
        await post(pilot, app, MatchFound(peer=3, role="offerer"), update(3, 6.0, 90.0))
        assert not main.radar.display or main.radar.size.width == 0
        assert main.peers.size.height > 0
        await pilot.press("r")
        await pilot.pause()
        assert main.radar.size.height >= 8 and main.peers.size.height == 0
        assert "3" in rendered(main.radar) and "◉" in rendered(main.radar)
        await pilot.press("r")
        await pilot.pause()
        assert main.radar.size.width == 0 and main.peers.size.height > 0


# -- broker and GPS ---------------------------------------------------------------------------


async def test_a_broker_failure_in_plain_words_with_a_live_countdown(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        session = app.main_screen.session
        await post(pilot, app, BrokerDisconnected(reason=REFUSED, retry_in_s=27.76))
        shown = rendered(session)
        assert "disconnected, retry in 28 s" in shown
        assert "no broker answers at that address" in shown
        assert "→ start fanny-broker or fix [broker] url" in shown
        assert "since 09:30:00, 1 attempt" in shown
        await tick(pilot, app, clock, 10)
        assert "disconnected, retry in 18 s" in rendered(session)
        await tick(pilot, app, clock, 18)
        assert "disconnected, retrying…" in rendered(session)


async def test_the_gps_half_reads_like_cgps(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        session = app.main_screen.session
        await post(pilot, app, GpsFix(latitude=44.0688172, longitude=-1.2345678,
                                      accuracy_m=4.2, mode=3, satellites_used=8,
                                      satellites_visible=12, hdop=1.1, source="fixed",
                                      time=T0 - timedelta(seconds=2)))
        shown = rendered(session)
        assert "GPS  3D fix" in shown and "⚠ fixed position (no GPS)" in shown
        assert "Sats 8 used / 12 visible" in shown and "Acc  ±4.2 m  HDOP 1.1" in shown
        assert "Age  2.0 s" in shown and "Pos  44.068817° -1.234568°" in shown
        await tick(pilot, app, clock, 5)
        assert "Age  7.0 s" in rendered(session)               # the age is live
        await post(pilot, app, GpsFix(latitude=44.0, longitude=-1.0, accuracy_m=None,
                                      mode=2, satellites_used=4, source="gpsd"))
        shown = rendered(session)
        assert "GPS  2D fix" in shown and "receiver (gpsd)" in shown
        assert "no GPS" not in shown and "4 used / – visible" in shown
        assert "Age  0.0 s" in shown                          # no GPS time: since it came
        await post(pilot, app, GpsFix(latitude=44.0, longitude=-1.0, accuracy_m=3.0, mode=3,
                                      time=(clock.now - timedelta(seconds=3)).replace(tzinfo=None)))
        assert "Age  3.0 s" in rendered(session)               # a zoneless GPS time is UTC
        assert "44.06" not in log_text(app)                   # positions never in the log


# -- routine state in the status line, what matters in the log -----------------------------


async def test_polls_and_retries_go_to_the_status_line_not_the_log(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        status = app.main_screen.status
        assert "positives: not checked yet" in status.text.plain
        for _ in range(3):
            await post(pilot, app, PositivesPolled(received=0, next_poll_in_s=120.0),
                       PositivePending(count=1, reason=REFUSED, retry_in_s=2.0))
        assert status.text.plain == (
            "09:30:00 UTC │ positives checked 09:30:00 (0 new) · next check in 2m00s │ "
            "⇡ 1 token waiting for the broker, retry in 2 s")
        await tick(pilot, app, clock, 61)
        assert "next check in 59s" in status.text.plain and "retrying…" in status.text.plain
        log = log_text(app)
        assert "positives_polled" not in log
        assert log.count("positive_pending") == 1             # the same reason: once
        # News is logged: positives received, another reason, the ack.
        await post(pilot, app, PositivesPolled(received=3),    # no next: the configured 300 s
                   PositivePending(count=1, reason="connection closed (1001)", retry_in_s=1.0),
                   PositiveDeclared(count=1))
        log = log_text(app)
        assert "3 positive tokens received and compared here" in log
        assert log.count("positive_pending") == 2 and "positive_declared" in log
        assert "(3 new) · next check in 5m00s" in status.text.plain
        assert "waiting for the broker" not in status.text.plain


async def test_failed_polls_show_in_the_status_line_until_one_succeeds(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        status = app.main_screen.status
        since = clock.now - timedelta(minutes=10)
        for attempts in (1, 2, 3):
            await post(pilot, app, PositivesPollFailed(
                reason="OSError: connection refused", since=since, attempts=attempts,
                next_poll_in_s=300.0))
        assert status.text.plain.startswith(
            "09:30:00 UTC │ ⚠ positives check failing since 09:20:00 (3 attempts) · next check "
            "in 5m00s")
        assert log_text(app).count("positives_poll_failed") == 1    # the first one only
        assert "connection refused" in log_text(app)
        await post(pilot, app, PositivesPolled(received=0, next_poll_in_s=300.0))
        assert "failing" not in status.text.plain
        assert "positives checked 09:30:00 (0 new)" in status.text.plain


# -- the alert, tokens, declaring ---------------------------------------------------------------


@pytest.mark.parametrize("size", [SMALL, WIDE])
async def test_the_alert_gives_the_contacts_and_a_next_step(quiet, data_dir, clock, size):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=size) as pilot:
        await started(pilot, app)
        banner = app.main_screen.banner
        await post(pilot, app, ExposureAlert(count=1, contacts=(CONTACT,)))
        shown = rendered(banner)
        assert "EXPOSURE ALERT: 1 stored token was declared positive" in shown
        assert "Next: get tested, follow your health authority, tell the test lead" in shown
        if size == SMALL:
            assert "contact 2m05s ≤2.1 m" in shown and banner.size.height == 2
        else:
            assert "2m05s within the radius, closest 2.1 m, median 4.0 m" in shown


async def test_token_rows_show_their_contact(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        tokens = app.main_screen.tokens
        assert tokens.get_cell(TOKENS[1], "contact").plain == "–"
        assert tokens.get_cell(TOKENS[1], "left").plain == "9d 18h 30m 00s"
        await post(pilot, app, TokenStored(peer=4, token=TOKENS[1],
                                           expires_at=tokens._expiry[TOKENS[1]], new=False,
                                           contact=CONTACT, match_to_token_s=0.8))
        assert tokens.get_cell(TOKENS[1], "contact").plain == "2m05s ≤2.1 m"
        assert "2m05s ≤2.1 m" in rendered(tokens)


async def test_a_refusal_toast_does_not_stay_beside_a_later_success(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=WIDE) as pilot:
        await started(pilot, app)
        await post(pilot, app, PositiveRefused(reason="code_used", count=3))
        assert [n.title for n in app._notifications] == ["Declaration refused"]
        await post(pilot, app, PositiveDeclared(count=3))
        assert [n.title for n in app._notifications] == ["Declared positive"]


async def test_the_declare_dialog_shows_the_apps_hint(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock, declare_hint="demo code: K7QF-3M9X-TR2B-8HJD")
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDeclareScreen),
                         "the dialog")
        await pilot.pause()
        assert "demo code: K7QF-3M9X-TR2B-8HJD" in rendered(app.screen.query_one("#declare-hint"))
        await pilot.press("escape")
    app, _ = build(quiet, data_dir, clock=clock)                # no hint: no line
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDeclareScreen),
                         "the dialog")
        assert not app.screen.query("#declare-hint")


@pytest.mark.parametrize("key", ["question_mark", "f1"])
async def test_help_explains_the_words_and_the_keys(quiet, data_dir, clock, key):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=WIDE) as pilot:
        await started(pilot, app)
        await pilot.press(key)
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help")
        await pilot.pause()
        text = rendered(app.screen.query_one("#help-text"))
        for word in ("Match", "Contact", "Token", "Declare", "Exposure", "Keys",
                     "d       declare positive", "q       quit"):
            assert word in text, word
        await pilot.press("d")                                  # inert under the help
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is app.main_screen, "the help to close")


# -- 80x24 ------------------------------------------------------------------------------------


async def test_80x24_keeps_every_essential_part_on_screen(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        main = app.main_screen
        await post(pilot, app, MatchFound(peer=1, role="offerer"), update(1, 4.3, 47.0))

        def visible() -> dict[str, int]:
            parts = {"session": main.session, "peers": main.peers, "tokens": main.tokens,
                     "log": main.log_view, "status": main.status}
            heights = {}
            for name, widget in parts.items():
                region = widget.region
                assert region.bottom <= 24 and region.right <= 80, (name, region)
                heights[name] = region.height
            return heights

        heights = visible()
        assert heights["tokens"] >= 2 + len(TOKENS)            # border, header, every row
        shown = rendered(main.tokens)
        assert all(token[:8] in shown for token in TOKENS)
        assert "peer 1" in rendered(main.peers)
        assert "Broker" in rendered(main.session) and "GPS" in rendered(main.session)
        await post(pilot, app, ExposureAlert(count=1, contacts=(CONTACT,)))
        heights = visible()
        assert main.banner.region.height == 2 and heights["tokens"] >= 3
        assert TOKENS[0][:8] in rendered(main.tokens)          # still at least one row


async def test_log_lines_wrap_without_losing_a_character(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        log = app.main_screen.log_view
        words = [f"w{i:03d}" for i in range(60)]               # 300 characters
        app.main_screen.log_line("error", " ".join(words))
        await pilot.pause()

        def shown_words() -> list[str]:
            return " ".join(log.plain_lines).split()

        assert all(len(line.rstrip()) <= log.scrollable_content_region.width
                   for line in log.plain_lines)
        assert [w for w in shown_words() if w.startswith("w")] == words
        narrow_lines = len(log.plain_lines)
        await pilot.resize_terminal(160, 48)
        await pilot.pause()
        await pilot.pause()
        assert len(log.plain_lines) < narrow_lines              # wrapped again, wider
        assert [w for w in shown_words() if w.startswith("w")] == words


async def test_a_sample_that_changes_only_the_verdict_recolours_the_distance(quiet, data_dir,
                                                                              clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=WIDE) as pilot:
        await started(pilot, app)
        peers = app.main_screen.peers
        await post(pilot, app, MatchFound(peer=1, role="offerer"), update(1, 12.0, 10.0, "in"))
        assert peers.get_cell("1", "distance").style == "bold green"
        await post(pilot, app, update(1, 12.0, 10.0, "uncertain"))
        assert peers.get_cell("1", "distance").style == "yellow"


async def test_declaring_again_clears_the_refusal_toast(quiet, data_dir, clock):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=WIDE) as pilot:
        await started(pilot, app)
        await post(pilot, app, PositiveRefused(reason="code_invalid", count=3))
        assert [n.title for n in app._notifications] == ["Declaration refused"]
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDeclareScreen),
                         "the dialog")
        await pilot.press(*"K7QF3M9XTR2B8HJD", "enter")
        await wait_until(pilot, lambda: "tokens marked for upload" in log_text(app),
                         "the declaration")
        assert not [n for n in app._notifications if n.title == "Declaration refused"]


async def test_renewed_ids_show_the_new_session(quiet, data_dir, clock):
    app, engine = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=SMALL) as pilot:
        await started(pilot, app)
        session = app.main_screen.session
        session.set_session("00000000")                          # as shown before rotating
        await post(pilot, app, IdsRotated(reason="schedule"))
        assert session.session_short == engine.session_short
        assert f"Session {engine.session_short}" in rendered(session)
        assert "session and contact IDs renewed on schedule" in log_text(app)


@pytest.mark.parametrize(("size", "offered"), [(SMALL, True), (WIDE, False)])
async def test_r_is_offered_only_where_the_radar_is_not_shown(quiet, data_dir, clock, size,
                                                              offered):
    app, _ = build(quiet, data_dir, clock=clock)
    async with app.run_test(size=size) as pilot:
        await started(pilot, app)
        await pilot.pause()
        assert ("r" in app.screen.active_bindings) is offered
