"""The demo: the whole kit on one machine, loopback only.

It starts a broker in-process on a free loopback port (SQLite in a temporary directory), the
tester's engine with a simulated walk (shown in the Textual app, or as JSON lines with
``--headless``), and a few simulated devices walking around the same spot (headless engines in
this process, real aiortc over 127.0.0.1, the real broker). Once a simulated device holds a token
that the tester holds too, it declares positive; the tester's next poll raises the exposure
alert.

Everything lives in a temporary directory removed at exit: the demo never touches the tester's
real token store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from .config import Config, parse_config
from .events import Event, ExposureAlert, TokenStored, to_json_dict

# A quiet square in Toulouse (WGS84 degrees); any spot works: the walkers stay within metres.
DEMO_LATITUDE = 43.604500
DEMO_LONGITUDE = 1.444000
WALK_RADIUS_M = 6.0


def demo_config(broker_url: str) -> Config:
    """The configuration every demo device uses: loopback-only ICE, short intervals."""
    return parse_config({
        "broker": {"url": broker_url, "reconnect_min_s": 0.3, "reconnect_max_s": 3.0},
        "gps": {"source": "fixed", "latitude": DEMO_LATITUDE, "longitude": DEMO_LONGITUDE},
        "protocol": {"radius_m": 15.0, "position_interval_s": 1.0, "poll_interval_s": 3.0,
                     "handshake_timeout_s": 10.0},
        "webrtc": {"host_addresses": ["127.0.0.1"]},
    })


async def _run(devices: int, headless: bool, duration_s: float | None, root: Path) -> int:
    from broker.server import BrokerSettings, start_broker

    from .engine import Engine
    from .gps import WalkSource

    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=root / "broker.sqlite3",
                              cooldown_s=120.0, position_timeout_s=15.0, open_declarations=True)
    async with start_broker(settings) as broker:
        config = demo_config(broker.url)
        tester = Engine(replace(config), root / "tester",
                        source=WalkSource(DEMO_LATITUDE, DEMO_LONGITUDE, radius_m=WALK_RADIUS_M,
                                          seed=1))
        others = [Engine(config, root / f"device-{i}",
                         source=WalkSource(DEMO_LATITUDE, DEMO_LONGITUDE,
                                           radius_m=WALK_RADIUS_M, seed=100 + i))
                  for i in range(1, devices + 1)]
        tester_tokens: set[str] = set()
        device_tokens: dict[int, set[str]] = {i: set() for i in range(len(others))}
        alerted = asyncio.Event()

        def on_tester(event: Event) -> None:
            if isinstance(event, TokenStored):
                tester_tokens.add(event.token)
            if isinstance(event, ExposureAlert):
                alerted.set()
            if headless:
                sys.stdout.write(json.dumps(to_json_dict(event), separators=(",", ":")) + "\n")
                sys.stdout.flush()

        tester.subscribe(on_tester)
        for index, engine in enumerate(others):
            engine.subscribe(lambda e, i=index: device_tokens[i].add(e.token)
                             if isinstance(e, TokenStored) else None)

        async def scenario() -> None:
            await asyncio.sleep(12.0)          # let the tester watch matches and countdowns
            while True:
                for index, engine in enumerate(others):
                    if device_tokens[index] & tester_tokens:
                        await asyncio.sleep(3.0)
                        await engine.declare_positive()
                        return
                await asyncio.sleep(0.5)

        tasks = [asyncio.create_task(engine.run()) for engine in others]
        tasks.append(asyncio.create_task(scenario()))
        try:
            if headless:
                return await _run_headless_tester(tester, alerted, duration_s)
            from .ui.app import make_app

            app = make_app(tester, title="FANNY field kit: demo")
            if duration_s is not None:
                asyncio.get_running_loop().call_later(duration_s, app.exit)
            await app.run_async()
            return int(app.return_code or 0)
        finally:
            for engine in others:
                await engine.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                task.cancel()


async def _run_headless_tester(tester: object, alerted: asyncio.Event,
                               duration_s: float | None) -> int:
    from .engine import Engine

    assert isinstance(tester, Engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, alerted.set)
    run = asyncio.create_task(tester.run())
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(alerted.wait(), duration_s)
        await asyncio.sleep(0.5)
    finally:
        await tester.stop()
        await run
    return 0 if alerted.is_set() else 1


def run_demo(*, devices: int = 3, headless: bool = False, duration_s: float | None = None) -> int:
    """Run the demo; returns the exit code (headless: 0 once the exposure alert came)."""
    if devices < 1:
        print("fanny-tui demo: --devices must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fanny-demo-") as tmp:
        return asyncio.run(_run(devices, headless, duration_s, Path(tmp)))
