"""First contact (issue 7, point 4): aiortc is imported in the background once the broker link
is up, so a match that comes 2 s after start does not pay for the import.

Runs in a fresh interpreter: in this one another test may have imported aiortc already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import TIME_UNIT

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import asyncio, json, sys, tempfile, time
from pathlib import Path

from tests.broker.kit import running
from tests.helpers import TIME_UNIT, device_config, fixed_at, running_device

assert "aiortc" not in sys.modules


async def main():
    stamps = []
    def stamper(name):
        return lambda event: stamps.append((time.monotonic(), name, event.event,
                                            "aiortc" in sys.modules))
    def first(name, kind, after=0.0):
        return min(t for t, n, k, _ in stamps if n == name and k == kind and t >= after)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        async with running(tmp, cooldown_s=300.0) as broker:
            config = device_config(broker.url)
            def device(name, metres):
                return running_device(config, tmp / name, fixed_at(metres),
                                      subscriber=stamper(name))
            start = time.monotonic()
            async with device("a", 0) as a:
                await a.wait_event("broker_connected", timeout=10 * TIME_UNIT)
                connected_s = first("a", "broker_connected") - start
                imported_at_connect = next(i for t, n, k, i in stamps
                                           if n == "a" and k == "broker_connected")
                # The peer turns up 2 s after start: the first match of "a".
                await asyncio.sleep(max(0.0, start + 2.0 - time.monotonic()))
                async with device("b", 3) as b:
                    for d in (a, b):
                        await d.wait_event("token_stored", timeout=20 * TIME_UNIT)
                    async with device("c", 1) as c:   # later matches: a-c and b-c
                        await c.wait_for(lambda e: len(c.of("token_stored")) == 2,
                                         20 * TIME_UNIT)
                        for d in (a, b):
                            await d.wait_for(lambda e, d=d: len(d.of("token_stored")) == 2,
                                             20 * TIME_UNIT)
    match_ab = first("a", "match")
    imported_at_match = next(i for t, n, k, i in stamps if n == "a" and k == "match")
    first_cost = max(first("a", "token_stored"), first("b", "token_stored")) - match_ab
    match_ac = first("c", "match")
    later_cost = max(first("a", "token_stored", match_ac),
                     first("c", "token_stored", match_ac)) - match_ac
    print(json.dumps({"connected_s": connected_s, "imported_at_connect": imported_at_connect,
                      "match_after_start_s": match_ab - start,
                      "imported_at_match": imported_at_match,
                      "first_s": first_cost, "later_s": later_cost}))

asyncio.run(main())
"""


def test_aiortc_is_imported_before_a_match_two_seconds_after_start():
    env = {**os.environ, "FANNY_TIME_UNIT": str(TIME_UNIT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120 * TIME_UNIT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"first contact: broker_connected {result['connected_s']:.3f} s after start; "
          f"match {result['match_after_start_s']:.2f} s after start; "
          f"match -> token on both: first {1000 * result['first_s']:.0f} ms, "
          f"later {1000 * result['later_s']:.0f} ms "
          f"(ratio {result['first_s'] / result['later_s']:.2f})")
    assert not result["imported_at_connect"]      # not imported on the way to the broker
    assert result["match_after_start_s"] >= 2.0
    assert result["imported_at_match"]            # in the background, before the match
