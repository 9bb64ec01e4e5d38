"""The demo: the whole kit on one machine, loopback only.

It starts a broker in-process on a free loopback port (SQLite in a temporary directory), the
tester's engine with a simulated walk (shown in the Textual app, or as JSON lines with
``--headless``), and a few simulated devices walking around the same spot (headless engines in
this process, real aiortc over 127.0.0.1, the real broker). Once a simulated device holds a token
that the tester holds too, it declares positive; the tester's next poll raises the exposure
alert.

The demo broker requires declaration codes, as a real one does (paper 5): its board is created
(as ``fanny-broker create-board`` does) and two codes are issued on it at start (as
``fanny-broker issue-code`` does), one for the simulated device's
declaration and one for the tester, shown in the app's declare dialog, or printed once on stderr
with ``--headless`` (``fanny-tui demo: broker ws://127.0.0.1:PORT, declaration code for this
demo: XXXX-XXXX-XXXX-XXXX ...``; stdout stays JSON lines only).

Everything lives in a temporary directory removed at exit, however the demo ends: quit, Ctrl-C,
SIGTERM, SIGHUP (the terminal closed) or a closed stdout (``--headless | head -3``); a shutdown
still running a few seconds after a signal, or a second signal meanwhile, removes it and ends
the process at once (:mod:`fanny_tui.stopping`). The demo never touches the tester's real token
store.

Exit codes: the app's (0 after ``q``); headless, 0 once the exposure alert came, 1 when
``--duration`` ran out before it; 141 (128 + SIGPIPE) when stdout was closed; 128 + N when
signal N stopped the demo before that (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from .cli import EXIT_BROKEN_PIPE, STOP_SIGNALS, JsonLinesOut
from .config import Config, parse_config
from .events import Event, ExposureAlert, TokenStored
from .protocol import validate
from .protocol.proximity import EARTH_RADIUS_M
from .stopping import StopSignals

if TYPE_CHECKING:
    from .engine import Engine  # imported when the demo runs (run_demo)

# A quiet square in Toulouse (WGS84 degrees); any spot works: the walkers stay within metres.
DEMO_LATITUDE = 43.604500
DEMO_LONGITUDE = 1.444000
WALK_RADIUS_M = 6.0
WALK_START_OFFSET_M = 3.0
"""Each simulated device walks around its own point this far from the tester's (metres), so
that no two walkers start at one spot; with walks of at most 6 m the tester and a device are
never more than 15 m apart (the demo's radius)."""
CONNECTIONS_PER_ADDRESS = 128
"""The demo broker's ``max_connections_per_address`` (the broker's default): every engine of
the demo connects from 127.0.0.1."""
MAX_DEVICES = CONNECTIONS_PER_ADDRESS // 2 - 1
"""The most simulated devices (``--devices``): each engine, the tester's included, holds its
session link and, while it polls or declares, an anonymous connection: two connections each
stay within :data:`CONNECTIONS_PER_ADDRESS`."""
CODE_TTL = timedelta(hours=24)
"""How long the demo's declaration codes stay valid."""
STOPPING_NOTICE_AFTER_S = 0.5
"""A shutdown that takes longer than this says "stopping..." on stderr."""
WATCH_BEFORE_DECLARING_S = 12.0
"""The simulated device declares positive no earlier than this after the start (seconds), so
that the tester first watches matches, handshakes and countdowns."""


def walk_start(index: int, devices: int) -> tuple[float, float]:
    """Where simulated device ``index`` (1..``devices``) starts and walks around: on a circle
    of :data:`WALK_START_OFFSET_M` metres around the tester's start, evenly spaced, so that no
    two walkers start at the same point (a first contact at 0.0 m would look like a bug).

    Returns:
        ``(latitude, longitude)``, WGS84 degrees (flat-earth offset, exact to millimetres).
    """
    bearing = math.tau * (index - 1) / max(devices, 1)
    metres_per_deg_lat = math.pi * EARTH_RADIUS_M / 180.0
    metres_per_deg_lon = metres_per_deg_lat * math.cos(math.radians(DEMO_LATITUDE))
    return (DEMO_LATITUDE + WALK_START_OFFSET_M * math.cos(bearing) / metres_per_deg_lat,
            DEMO_LONGITUDE + WALK_START_OFFSET_M * math.sin(bearing) / metres_per_deg_lon)


def demo_config(broker_url: str) -> Config:
    """The configuration every demo device uses: loopback-only ICE, short intervals."""
    return parse_config({
        "broker": {"url": broker_url, "reconnect_min_s": 0.3, "reconnect_max_s": 3.0},
        "gps": {"source": "fixed", "latitude": DEMO_LATITUDE, "longitude": DEMO_LONGITUDE},
        "protocol": {"radius_m": 15.0, "position_interval_s": 1.0, "poll_interval_s": 3.0,
                     "handshake_timeout_s": 10.0},
        "webrtc": {"host_addresses": ["127.0.0.1"]},
    })


class _Stop:
    """Why the demo is stopping: a signal (its number), a closed stdout, or nothing yet."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.signal: int | None = None
        self.broken_pipe = False

    def on_signal(self, signum: int) -> None:
        if self.signal is None:
            self.signal = signum
        self.requested.set()

    def on_broken_pipe(self) -> None:
        self.broken_pipe = True
        self.requested.set()

    def exit_code(self, otherwise: int) -> int:
        if self.broken_pipe:
            return EXIT_BROKEN_PIPE
        if self.signal is not None:
            return 128 + self.signal
        return otherwise


async def _run(devices: int, headless: bool, duration_s: float | None, root: Path) -> int:
    from broker.__main__ import create_board, issue_code
    from broker.server import BrokerSettings, start_broker

    from .engine import Engine
    from .gps import WalkSource

    loop = asyncio.get_running_loop()
    stop = _Stop()
    # Python-level handlers with a watchdog: a shutdown stuck after the signal (the terminal
    # gone) still removes the temp dir and ends (fanny_tui.stopping).
    signals = StopSignals(loop, stop.on_signal, name="fanny-tui demo",
                          cleanup=lambda: shutil.rmtree(root, ignore_errors=True))
    signals.install()
    db = root / "broker.sqlite3"
    await asyncio.to_thread(create_board, db)  # as `fanny-broker create-board` does
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=db, cooldown_s=120.0,
                              position_timeout_s=15.0,
                              max_connections_per_address=CONNECTIONS_PER_ADDRESS)
    stopping: list[asyncio.TimerHandle] = []   # the "stopping..." notice, once stopping
    try:
        async with start_broker(settings) as broker:
            device_code, _ = await asyncio.to_thread(issue_code, str(db), CODE_TTL)
            tester_code, _ = await asyncio.to_thread(issue_code, str(db), CODE_TTL)
            config = demo_config(broker.url)
            tester = Engine(replace(config), root / "tester",
                            source=WalkSource(DEMO_LATITUDE, DEMO_LONGITUDE,
                                              radius_m=WALK_RADIUS_M, seed=1))
            others = [Engine(config, root / f"device-{i}",
                             source=WalkSource(*walk_start(i, devices),
                                               radius_m=WALK_RADIUS_M, seed=100 + i))
                      for i in range(1, devices + 1)]
            tester_tokens: set[str] = set()
            device_tokens: dict[int, set[str]] = {i: set() for i in range(len(others))}
            alerted = asyncio.Event()
            out = JsonLinesOut(stop.on_broken_pipe) if headless else None

            def on_tester(event: Event) -> None:
                if isinstance(event, TokenStored):
                    tester_tokens.add(event.token)
                if isinstance(event, ExposureAlert):
                    alerted.set()
                if out is not None:
                    out(event)

            tester.subscribe(on_tester)
            def keep_tokens(tokens: set[str]) -> Callable[[Event], None]:
                def on_event(event: Event) -> None:
                    if isinstance(event, TokenStored):
                        tokens.add(event.token)
                return on_event

            for index, engine in enumerate(others):
                engine.subscribe(keep_tokens(device_tokens[index]))

            async def scenario() -> None:
                await asyncio.sleep(WATCH_BEFORE_DECLARING_S)
                while True:
                    for index, engine in enumerate(others):
                        if device_tokens[index] & tester_tokens:
                            await asyncio.sleep(3.0)
                            await engine.declare_positive(device_code)
                            return
                    await asyncio.sleep(0.5)

            hint = f"Demo declaration code: {tester_code}"
            if headless:
                print(f"fanny-tui demo: broker {broker.url}, declaration code for this demo: "
                      f"{tester_code} (one declaration; the simulated devices have their own)",
                      file=sys.stderr, flush=True)
            tasks = [asyncio.create_task(engine.run()) for engine in others]
            story = asyncio.create_task(scenario())
            try:
                if stop.requested.is_set():
                    return stop.exit_code(0)
                if not headless:
                    return stop.exit_code(await _run_app(tester, hint, stop, duration_s))
                alert = await _run_headless_tester(tester, alerted, stop.requested, duration_s)
                return 0 if alert and not stop.broken_pipe else stop.exit_code(1)
            finally:
                # The scenario first: it may sleep for seconds, and nothing must wait for it.
                story.cancel()
                stopping.append(loop.call_later(STOPPING_NOTICE_AFTER_S, _say_stopping))
                for engine in others:
                    await engine.stop()
                await asyncio.gather(story, *tasks, return_exceptions=True)
    finally:
        for notice in stopping:                # the broker has stopped too by now
            notice.cancel()
        signals.restore()


async def _run_app(tester: Engine, hint: str, stop: _Stop, duration_s: float | None) -> int:
    """Run the tester's app until it quits (``q``), a stop signal or ``duration_s``."""
    from .ui.app import make_app

    app = make_app(tester, title="FANNY field kit: demo", declare_hint=hint)
    stopper = asyncio.create_task(stop.requested.wait())
    stopper.add_done_callback(lambda _: app.exit())
    if duration_s is not None:
        asyncio.get_running_loop().call_later(duration_s, app.exit)
    try:
        await app.run_async()
    finally:
        stopper.cancel()
    return int(app.return_code or 0)


def _say_stopping() -> None:
    with contextlib.suppress(OSError):
        print("fanny-tui demo: stopping (simulated devices, broker)...", file=sys.stderr,
              flush=True)


async def _run_headless_tester(tester: Engine, alerted: asyncio.Event, stop: asyncio.Event,
                               duration_s: float | None) -> bool:
    """Run the tester's engine until the alert (+0.5 s), a stop request or ``duration_s``.

    Returns:
        True if the exposure alert came.
    """
    run = asyncio.create_task(tester.run())
    waits = [asyncio.create_task(alerted.wait()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait([*waits, run], timeout=duration_s,
                           return_when=asyncio.FIRST_COMPLETED)
        if alerted.is_set() and not stop.is_set():
            with contextlib.suppress(TimeoutError):  # show the poll that brought the alert
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        for wait in waits:
            wait.cancel()
        await tester.stop()
        await run
    return alerted.is_set()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """Before and after the event loop: a stop signal unwinds (and the temp dir is removed)."""
    raise SystemExit(128 + signum)


def devices_range() -> str:
    """What ``--devices`` takes, as said in its error (the reason for the upper bound too)."""
    return (f"expected an integer in [1, {MAX_DEVICES}] (the demo broker takes "
            f"{CONNECTIONS_PER_ADDRESS} connections from one address, up to two per device)")


def devices_argument(text: str) -> int:
    """``--devices``'s argparse type: an integer in [1, :data:`MAX_DEVICES`].

    Raises:
        argparse.ArgumentTypeError: one line, ``expected an integer in [1, 63] (...), got
            '500'`` (argparse names the option).
    """
    try:
        return validate.integer_text("", text, 1, MAX_DEVICES)
    except validate.Invalid as exc:
        raise argparse.ArgumentTypeError(f"{devices_range()}, got {exc.got!r}") from None


def run_demo(*, devices: int = 3, headless: bool = False, duration_s: float | None = None) -> int:
    """Run the demo; returns the exit code (see the module docstring).

    The temporary directory is removed whatever ends the demo: SIGTERM and SIGHUP unwind
    (``SystemExit``) until the event loop takes them over, and are blocked while it is removed.
    """
    if not 1 <= devices <= MAX_DEVICES:
        print(f"fanny-tui demo: --devices: {devices_range()}, got {devices}", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, _exit_on_signal)
                for sig in STOP_SIGNALS if sig != signal.SIGINT}
    root: Path | None = None
    try:
        root = Path(tempfile.mkdtemp(prefix="fanny-demo-"))
        return asyncio.run(_run(devices, headless, duration_s, root))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
