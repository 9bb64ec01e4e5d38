"""Alert latency after an acknowledged declaration, at default settings (issue 7, point 2).

D headless engines (10; ``--quick``: 2) run against a broker on loopback with the default
``[protocol]`` settings (``poll_interval_s`` 300), each 1 km from the others (no contact
between them) and each holding the token of one contact with a person who then declares.
Once every device has connected and made its start-up poll, the declaration is uploaded
through the kit's own :func:`~fanny_tui.positives.declare` and
:func:`~fanny_tui.positives.upload_pending`; the figure is the p95, over the devices, of the
time from the broker's ack to each device's ``exposure_alert`` event.

Whatever brings the alert (the periodic poll today, a broker announcement and a delayed fetch
once it exists) is measured the same way: nothing here names the mechanism. The wait is
bounded (120 s; ``--quick``: 8 s): a device without an alert by then counts as "later than
the bound", and when more than 5 % of them are, the figure is the bound itself, a lower bound
(the note says so).
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


async def run(scale: Scale) -> list[Figure]:
    from tests.helpers import LAT, LON, running_device

    count = scale.pick(10, 2)
    bound = scale.pick(120, 8)
    token = random.Random(11).randbytes(32).hex()
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
                store.add(token, expiry_for(now))
                store.close()
                source = FixedSource(LAT + i * KM_LAT, LON, 4.0)
                devices.append(await stack.enter_async_context(
                    running_device(config, data_dir, source)))
            ready = Budget(30)
            for device in devices:   # the start-up poll is not what is measured
                with contextlib.suppress(AssertionError):
                    await device.wait_event("positives_polled", timeout=max(0.1, ready.left))
            polls_before = sum(len(d.of("positives_polled")) for d in devices)

            declarant = TokenStore(Path(tmp) / "declarant" / "tokens.sqlite3")
            try:
                declarant.add(token, expiry_for(now))
                declare(declarant)
                outcomes = await upload_pending(declarant, broker.url)
            finally:
                declarant.close()
            if not outcomes or not all(o.acknowledged for o in outcomes):
                raise RuntimeError(f"the declaration was not acknowledged: {outcomes!r}")
            acked = time.monotonic()
            latencies: list[float] = []
            pending = list(devices)
            budget = Budget(bound)
            while pending and not budget.over:
                for device in list(pending):
                    if device.of("exposure_alert"):
                        latencies.append(time.monotonic() - acked)
                        pending.remove(device)
                await asyncio.sleep(0.05)
            polls_after = sum(len(d.of("positives_polled")) for d in devices)

    late = len(pending)
    censored = late > 0.05 * count
    p95 = float(bound) if censored else percentile(latencies, 0.95)
    seen = (f"{len(latencies)} of {count} devices alerted within {bound} s"
            + (f" (p50 {percentile(latencies, 0.5):.1f} s)" if latencies else ""))
    return [Figure(
        "alert_p95_s", p95, None, "s", count,
        ("LOWER BOUND: more than 5 % of the devices had no alert within the bound; "
         if censored else "") + seen + f"; {polls_after - polls_before} polls by all devices "
        "while waiting; default settings (poll_interval_s 300)",
        "<= 60 s (p95), polls no more frequent than today")]
