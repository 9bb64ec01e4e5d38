"""Alert latency after an acknowledged declaration, at default settings (issue 7, point 2).

D headless engines (10; ``--quick``: 2) run against a broker on loopback with the default
``[protocol]`` settings (``poll_interval_s`` 300), each 1 km from the others (no contact
between them) and each holding the token of one contact with a person who then declares.
Once every device has connected and made its start-up poll, the declaration is uploaded
through the kit's own :func:`~fanny_tui.positives.declare` and
:func:`~fanny_tui.positives.upload_pending`; the figure is the p95, over the devices, of the
time from the broker's ack to each device's ``exposure_alert`` event.

Two rounds on the same devices, each holding one token for each round:

* ``alert_p95_s``: a lone declaration (the broker's first announcement goes out at once).
* ``alert_busy_p95_s``: a declaration committed right after another one (a token nobody
  holds), so that its announcement waits out the broker's ``announce_interval_s`` (20 s by
  default): the case of a busy board, where declarations keep coming. With the device's
  random delay before its fetch (uniform up to ``poll_interval_s`` / 10, 30 s by default),
  about 20 + 30 = 50 s is expected at worst.

Whatever brings the alert (the periodic poll, or the broker's ``positives_available``
announcement and the device's delayed fetch) is measured the same way: nothing here names
the mechanism. Each wait is bounded (120 s; ``--quick``: 8 s): a device without its alert by
then counts as "later than the bound", and when more than 5 % of them are, the figure is the
bound itself, a lower bound (the note says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from broker.server import BrokerSettings, start_broker
from fanny_tui.config import Config, parse_config
from fanny_tui.gps import FixedSource
from fanny_tui.positives import declare, upload_pending
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.store import TokenStore

from .common import LOOPBACK, Budget, Figure, Scale, percentile

KM_LAT = 1000 / 111_195.0


def default_config(url: str) -> Config:
    """A device's configuration: the defaults, but for the loopback broker and ICE host."""
    return parse_config({"broker": {"url": url, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
                         "webrtc": {"host_addresses": [LOOPBACK]}})


async def _declare(directory: Path, tokens: list[str], url: str, now: datetime) -> float:
    """Declare ``tokens`` through the kit's ``declare`` and ``upload_pending``; the monotonic
    time of the broker's ack. Raises RuntimeError when it is not acknowledged."""
    declarant = TokenStore(directory / "tokens.sqlite3")
    try:
        for token in tokens:
            declarant.add(token, expiry_for(now))
        declare(declarant)
        outcomes = await upload_pending(declarant, url)
    finally:
        declarant.close()
    if not outcomes or not all(o.acknowledged for o in outcomes):
        raise RuntimeError(f"the declaration was not acknowledged: {outcomes!r}")
    return time.monotonic()


async def _alerts(devices: list, want: int, acked: float, bound: float
                  ) -> tuple[list[float], int]:
    """Wait (at most ``bound`` s) until each device has ``want`` exposure alerts; the
    latencies from ``acked`` and the number of devices still without."""
    latencies: list[float] = []
    pending = list(devices)
    budget = Budget(bound)
    while pending and not budget.over:
        for device in list(pending):
            if len(device.of("exposure_alert")) >= want:
                latencies.append(time.monotonic() - acked)
                pending.remove(device)
        await asyncio.sleep(0.05)
    return latencies, len(pending)


def _figure(name: str, what: str, latencies: list[float], late: int, count: int,
            bound: float, polls: int) -> Figure:
    censored = late > 0.05 * count
    p95 = float(bound) if censored else percentile(latencies, 0.95)
    seen = (f"{len(latencies)} of {count} devices alerted within {bound:g} s"
            + (f" (p50 {percentile(latencies, 0.5):.1f} s, max {max(latencies):.1f} s)"
               if latencies else ""))
    return Figure(
        name, p95, None, "s", count,
        ("LOWER BOUND: more than 5 % of the devices had no alert within the bound; "
         if censored else "") + what + "; " + seen + f"; {polls} polls by all devices "
        "while waiting; default settings (poll_interval_s 300, announce_interval_s 20)",
        "<= 60 s (p95), polls no more frequent than today")


def _polls(devices: list) -> int:
    return sum(len(d.of("positives_polled")) for d in devices)


async def run(scale: Scale) -> list[Figure]:
    from tests.helpers import LAT, LON, running_device

    count = scale.pick(10, 2)
    bound = scale.pick(120, 8)
    rng = random.Random(11)
    lone, busy, decoy = (rng.randbytes(32).hex() for _ in range(3))
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="fanny-bench-") as tmp:
        settings = BrokerSettings(host=LOOPBACK, port=0, db_path=Path(tmp) / "board.sqlite3",
                                  open_declarations=True)
        async with start_broker(settings) as broker, contextlib.AsyncExitStack() as stack:
            config = default_config(broker.url)
            devices = []
            for i in range(count):
                data_dir = Path(tmp) / f"device{i}"
                store = TokenStore.in_dir(data_dir)
                store.add(lone, expiry_for(now))
                store.add(busy, expiry_for(now))
                store.close()
                source = FixedSource(LAT + i * KM_LAT, LON, 4.0)
                devices.append(await stack.enter_async_context(
                    running_device(config, data_dir, source)))
            ready = Budget(30)
            for device in devices:   # the start-up poll is not what is measured
                with contextlib.suppress(AssertionError):
                    await device.wait_event("positives_polled", timeout=max(0.1, ready.left))

            polls = _polls(devices)
            acked = await _declare(Path(tmp) / "lone", [lone], broker.url, now)
            lone_s, lone_late = await _alerts(devices, 1, acked, bound)
            lone_polls = _polls(devices) - polls

            polls = _polls(devices)
            await _declare(Path(tmp) / "first", [decoy], broker.url, now)
            acked = await _declare(Path(tmp) / "busy", [busy], broker.url, now)
            busy_s, busy_late = await _alerts(devices, 2, acked, bound)
            busy_polls = _polls(devices) - polls

    return [
        _figure("alert_p95_s", "a lone declaration, broker ack -> exposure_alert", lone_s,
                lone_late, count, bound, lone_polls),
        _figure("alert_busy_p95_s", "a declaration right after another (its announcement "
                "waits out announce_interval_s), broker ack -> exposure_alert", busy_s,
                busy_late, count, bound, busy_polls),
    ]
