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

from fanny_tui.config import Config
from fanny_tui.events import (
    BrokerDisconnected,
    ChannelOpen,
    Contact,
    ContactClosed,
    ExposureAlert,
    GpsFix,
    GpsLost,
    HandshakeFailed,
    HandshakeProgress,
    MatchFound,
    PeerUpdate,
    PositivesPolled,
    PositivesPollFailed,
    TokenStored,
)
from fanny_tui.ui import EngineEvent, FannyApp

from .kit import CONTACT, REFUSED, T0, TOKENS, SettableClock, build, expiry, wait_until

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
    TokenStored(peer=1, token=TOKENS[0], expires_at=expiry(5), new=False, contact=CONTACT,
                match_to_token_s=1.3),
    MatchFound(peer=2, role="answerer"),
    PeerUpdate(peer=2, distance_m=14.0, bearing_deg=200.0, peer_accuracy_m=12.0,
               within="uncertain", within_s=12.0, samples=3),
    MatchFound(peer=3, role="offerer"),
    HandshakeFailed(peer=3, reason="timeout"),
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


def _app(config: Config, data_dir: Path) -> FannyApp:
    app, _ = build(config, data_dir, clock=SettableClock(),
                   declare_hint="demo code: K7QF-3M9X-TR2B-8HJD")
    return app


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_main_screen(snap_compare, quiet, data_dir, size):
    assert snap_compare(_app(quiet, data_dir), terminal_size=size, run_before=_scene)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_main_screen_with_an_exposure_alert(snap_compare, quiet, data_dir, size):
    async def scene(pilot: Pilot[None]) -> None:
        await _scene(pilot, alert=True)

    assert snap_compare(_app(quiet, data_dir), terminal_size=size, run_before=scene)


def test_radar_at_80x24(snap_compare, quiet, data_dir):
    assert snap_compare(_app(quiet, data_dir), terminal_size=(80, 24), run_before=_scene,
                        press=["r"])


def test_help_at_80x24(snap_compare, quiet, data_dir):
    assert snap_compare(_app(quiet, data_dir), terminal_size=(80, 24), run_before=_scene,
                        press=["question_mark"])


def test_gps_failure_and_a_long_alert_at_80x24(snap_compare, quiet, data_dir):
    # Trial finding 7: gpsd unreachable and an alert with many contacts, on a Pi console:
    # labels whole, a next step for the GPS, the banner wrapped, the tables say how to scroll.
    async def scene(pilot: Pilot[None]) -> None:
        await _scene(pilot)
        contacts = tuple(Contact(duration_s=7.0 + n, closest_m=0.5 + n, median_m=3.0,
                                 samples=8) for n in range(6))
        app = pilot.app
        for event in (GpsLost(reason="gpsd at 127.0.0.1:2950 unreachable: Connect call failed "
                                     "('127.0.0.1', 2950)"),
                      ExposureAlert(count=6, contacts=contacts)):
            app.post_message(EngineEvent(event))
        await pilot.pause()
        await pilot.pause()

    assert snap_compare(_app(quiet, data_dir), terminal_size=(80, 24), run_before=scene)


def test_a_coarse_fix_and_an_ended_contact_at_80x24(snap_compare, quiet, data_dir):
    # Issue 6, point 3: eph 23 m cannot make 10 m contacts (the GPS half says so), and the
    # Live peers table says how each contact ended, every column whole.
    async def scene(pilot: Pilot[None]) -> None:
        await _scene(pilot)
        for event in (GpsFix(latitude=44.0688172, longitude=-1.2345678, accuracy_m=23.0,
                             mode=3, satellites_used=4, satellites_visible=9, hdop=4.6,
                             source="gpsd", time=T0 - timedelta(seconds=1)),
                      ContactClosed(peer=1, reason="peer_closed", contact=CONTACT,
                                    token_stored=True)):
            pilot.app.post_message(EngineEvent(event))
        await pilot.pause()
        await pilot.pause()

    assert snap_compare(_app(quiet, data_dir), terminal_size=(80, 24), run_before=scene)


OTHER_BROKERS = [
    PositivesPolled(received=2, next_poll_in_s=300.0, broker="health"),
    PositivesPollFailed(reason=REFUSED, since=T0 - timedelta(minutes=12), attempts=3,
                        next_poll_in_s=300.0, broker="region-2"),
]


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_main_screen_with_poll_only_brokers(snap_compare, quiet_region, data_dir, size):
    # Issue 8: each [[positives]] broker's state under the device's own broker (down here).
    async def scene(pilot: Pilot[None]) -> None:
        await _scene(pilot)
        for event in OTHER_BROKERS:
            pilot.app.post_message(EngineEvent(event))
        await pilot.pause()
        await pilot.pause()

    assert snap_compare(_app(quiet_region, data_dir), terminal_size=size, run_before=scene)


def test_declare_dialog_offers_the_brokers_at_80x24(snap_compare, quiet_region, data_dir):
    assert snap_compare(_app(quiet_region, data_dir), terminal_size=(80, 24),
                        run_before=_scene, press=["d"])
