"""Snapshots of the main screen at 80x24 (a Raspberry Pi console) and 160x48 (a laptop).

The real app runs around a real engine (real store holding three tokens) whose broker address
accepts connections and never answers, so the engine stays quiet for the 10 s its link waits;
the scene is posted as engine events, and the app's clock is fixed, so countdowns and ages are
the same at every run. The only random thing shown, the session ID, is set to a fixed value.

Update after a deliberate change of the UI with ``pytest tests/ui/test_snapshots.py
--snapshot-update`` and look at the SVG files in ``tests/ui/__snapshots__`` before committing.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from textual.pilot import Pilot

from fanny_tui.events import (
    BrokerDisconnected,
    ChannelOpen,
    Contact,
    ExposureAlert,
    GpsFix,
    HandshakeFailed,
    HandshakeProgress,
    MatchFound,
    PeerUpdate,
    PositivesPolled,
    TokenStored,
)
from fanny_tui.store import TokenStore
from fanny_tui.ui import EngineEvent, FannyApp
from tests.helpers import loopback_port

from .kit import T0, SettableClock, build, ui_config, wait_until

TOKENS = ["1a2b3c4d" + "0" * 56, "5e6f7a8b" + "1" * 56, "9c0d1e2f" + "2" * 56]
CONTACT = Contact(duration_s=125.0, closest_m=2.1, median_m=4.0, samples=25)
REFUSED = "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 8765)"


def _expiry(days: int):
    return (T0 + timedelta(days=days)).replace(hour=4, minute=0)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    store = TokenStore.in_dir(tmp_path)
    for days, token in zip((5, 10, 15), TOKENS, strict=True):
        store.add(token, _expiry(days))
    store.close()
    return tmp_path


SCENE = [
    BrokerDisconnected(reason=REFUSED, retry_in_s=27.76),
    GpsFix(latitude=44.0688172, longitude=-1.2345678, accuracy_m=4.2, mode=3,
           satellites_used=8, satellites_visible=12, hdop=1.1, source="gpsd",
           time=T0 - timedelta(seconds=1)),
    PositivesPolled(received=0, next_poll_in_s=300.0),
    MatchFound(peer=1, role="offerer"),
    HandshakeProgress(peer=1, state="connecting"),
    ChannelOpen(peer=1, local_candidate="host", remote_candidate="host"),
    PeerUpdate(peer=1, distance_m=4.3, bearing_deg=47.0, peer_accuracy_m=5.0, within="in",
               within_s=125.0, samples=25),
    TokenStored(peer=1, token=TOKENS[0], expires_at=_expiry(5), new=False, contact=CONTACT,
                match_to_token_s=1.3),
    MatchFound(peer=2, role="answerer"),
    PeerUpdate(peer=2, distance_m=14.0, bearing_deg=200.0, peer_accuracy_m=12.0,
               within="uncertain", within_s=12.0, samples=3),
    MatchFound(peer=3, role="offerer"),
    HandshakeFailed(peer=3, reason="handshake timed out"),
]


async def _scene(pilot: Pilot[None], *, alert: bool = False) -> None:
    app = pilot.app
    assert isinstance(app, FannyApp)
    main = app.main_screen
    await wait_until(pilot, lambda: app.engine_worker is not None, "the panels")  # Ready
    await wait_until(pilot, lambda: main.tokens.row_count == len(TOKENS), "the tokens")
    main.session.set_session("5eed5eed")      # the one random value shown
    events = [*SCENE, ExposureAlert(count=1, contacts=(CONTACT,))] if alert else SCENE
    for event in events:
        app.post_message(EngineEvent(event))
    await pilot.pause()
    await pilot.pause()


def _app(data_dir: Path, port: int) -> FannyApp:
    app, _ = build(ui_config(port), data_dir, clock=SettableClock(),
                   declare_hint="demo code: K7QF-3M9X-TR2B-8HJD")
    return app


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_main_screen(snap_compare, data_dir, size):
    with loopback_port(listening=True) as port:
        assert snap_compare(_app(data_dir, port), terminal_size=size, run_before=_scene)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_main_screen_with_an_exposure_alert(snap_compare, data_dir, size):
    async def scene(pilot: Pilot[None]) -> None:
        await _scene(pilot, alert=True)

    with loopback_port(listening=True) as port:
        assert snap_compare(_app(data_dir, port), terminal_size=size, run_before=scene)


def test_radar_at_80x24(snap_compare, data_dir):
    with loopback_port(listening=True) as port:
        assert snap_compare(_app(data_dir, port), terminal_size=(80, 24), run_before=_scene,
                            press=["r"])


def test_help_at_80x24(snap_compare, data_dir):
    with loopback_port(listening=True) as port:
        assert snap_compare(_app(data_dir, port), terminal_size=(80, 24), run_before=_scene,
                            press=["question_mark"])
