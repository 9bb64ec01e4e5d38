"""Helpers for the UI tests: a real engine with a test-fed position source, a settable clock,
the tokens a test store holds, and ways to read what is shown (fixtures: tests/ui/conftest.py;
loopback ports that refuse or never answer: tests/helpers.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from textual.geometry import Region
from textual.pilot import Pilot
from textual.widget import Widget

from fanny_tui.config import Config, parse_config
from fanny_tui.engine import Engine
from fanny_tui.events import Contact, GpsFix, GpsLost
from fanny_tui.ui import FannyApp, make_app
from tests.helpers import TIME_UNIT

T0 = datetime(2099, 1, 1, 9, 30, tzinfo=UTC)
"""The UI clock's start in tests that fix it. Tokens stored for them expire days after it, and
far after the real clock, so that the engine's sweep (on the real clock) keeps them."""

TOKENS = ["1a2b3c4d" + "0" * 56, "5e6f7a8b" + "1" * 56, "9c0d1e2f" + "2" * 56]
"""The witness tokens the ``data_dir`` fixture's store holds, soonest expiry first."""

TOKEN_DAYS = (5, 10, 15)
"""Days after :data:`T0` (at 04:00 UTC) when each of :data:`TOKENS` expires."""

CONTACT = Contact(duration_s=125.0, closest_m=2.1, median_m=4.0, samples=25)
"""A contact's measures: 2m05s within the radius, closest 2.1 m."""

REFUSED = "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 8765)"
"""The reason the broker link gives for a refused connection."""


def expiry(days: int) -> datetime:
    """04:00 UTC, ``days`` days after :data:`T0` (a stored expiry: on the deletion hour)."""
    return (T0 + timedelta(days=days)).replace(hour=4, minute=0)


class QueueSource:
    """A position source that yields whatever the test puts in it (a test input)."""

    def __init__(self, *items: GpsFix | GpsLost) -> None:
        self.queue: asyncio.Queue[GpsFix | GpsLost] = asyncio.Queue()
        for item in items:
            self.queue.put_nowait(item)

    async def stream(self) -> AsyncIterator[GpsFix | GpsLost]:
        while True:
            yield await self.queue.get()


class SettableClock:
    """The app's clock in a test: it says :attr:`now` until the test moves it."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        """Move the clock ``seconds`` on; returns the new instant."""
        self.now += timedelta(seconds=seconds)
        return self.now


def ui_config(port: int, positives: dict[str, int] | None = None) -> Config:
    """A device whose broker is ``ws://127.0.0.1:port``, fixed position, loopback ICE;
    ``positives``: name -> port of ``[[positives]]`` brokers on loopback."""
    return parse_config({
        "broker": {"url": f"ws://127.0.0.1:{port}", "reconnect_min_s": 0.1,
                   "reconnect_max_s": 0.5},
        "positives": [{"name": name, "url": f"ws://127.0.0.1:{other}"}
                      for name, other in (positives or {}).items()],
        "gps": {"source": "fixed", "latitude": 44.0, "longitude": -1.0},
        "webrtc": {"host_addresses": ["127.0.0.1"]},
    })


def build(config: Config, data_dir: Path, *items: GpsFix | GpsLost,
          clock: Callable[[], datetime] | None = None, declare_hint: str | None = None
          ) -> tuple[FannyApp, Engine]:
    """The real app around a real engine on ``data_dir``, its positions fed by the test."""
    engine = Engine(config, data_dir, source=QueueSource(*items))
    if clock is None:
        return make_app(engine, title="FANNY test", declare_hint=declare_hint), engine
    return make_app(engine, title="FANNY test", declare_hint=declare_hint, clock=clock), engine


async def started(pilot: Pilot[None], app: FannyApp) -> None:
    """Wait until the app shows the ``data_dir`` fixture's stored tokens (the engine runs)."""
    await wait_until(pilot, lambda: app.main_screen.tokens.row_count == len(TOKENS),
                     "the stored tokens in the table")


async def wait_until(pilot: Pilot[None], predicate: Callable[[], object], what: str,
                     timeout: float = 15 * TIME_UNIT) -> None:
    """Let the app run until ``predicate()`` is true (fail naming ``what`` after timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def rendered(widget: Widget) -> str:
    """What ``widget`` shows on screen, as plain text (borders and padding included)."""
    region = Region(0, 0, widget.outer_size.width, widget.outer_size.height)
    return "\n".join(strip.text for strip in widget.render_lines(region))


def log_text(app: FannyApp) -> str:
    """The event log as shown (wrapped lines joined by newlines)."""
    return "\n".join(app.main_screen.log_view.plain_lines)
