"""The engine's poll loop (fanny_tui/engine.py ``_poll_loop``): announced positives are fetched
long before the poll interval, and failed polls are events. Real engines, a real broker, on
loopback."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from broker.server import BrokerSettings, start_broker
from fanny_tui.events import PositivesPolled, PositivesPollFailed
from fanny_tui.positives import declare, upload_pending
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.store import TokenStore

from .helpers import (
    TIME_UNIT,
    device_config,
    device_pair,
    fixed_at,
    free_port,
    running_device,
)

POLL_S = 20.0
"""Poll interval of the devices: an announced poll waits at most POLL_S / 10 = 2 s."""


def _settings(tmp_path: Path, port: int = 0) -> BrokerSettings:
    return BrokerSettings(host="127.0.0.1", port=port, db_path=tmp_path / "broker.sqlite3",
                          open_declarations=True, upload_answer_delay_s=0.05,
                          announce_interval_s=0.2)


def _stock(data_dir: Path, tokens: list[str]) -> None:
    store = TokenStore.in_dir(data_dir)
    for token in tokens:
        store.add(token, expiry_for(datetime.now(UTC)))
    store.close()


async def test_an_announcement_brings_the_alert_to_every_device_long_before_the_interval(
        tmp_path):
    witnessed = os.urandom(32).hex()
    for name in ("a", "b"):
        _stock(tmp_path / name, [witnessed, os.urandom(32).hex()])
    async with start_broker(_settings(tmp_path)) as broker:
        config = device_config(broker.url, poll_interval_s=POLL_S)
        async with device_pair(tmp_path, config, apart_m=500.0) as (a, b):   # never witness
            for device in (a, b):                          # the poll at start: nothing yet
                await device.wait_event("positives_polled", timeout=10 * TIME_UNIT)
                await device.wait_event("broker_connected", timeout=10 * TIME_UNIT)
            positive = TokenStore.in_dir(tmp_path / "positive")   # the contact, declaring
            positive.add(witnessed, expiry_for(datetime.now(UTC)))
            declare(positive)
            await upload_pending(positive, broker.url)
            positive.close()
            for device in (a, b):
                # Announcement (0.2 s) + random delay (<= 2 s) + the poll, not POLL_S.
                alert = await device.wait_event("exposure_alert", timeout=6 * TIME_UNIT)
                assert alert.count == 1
                await device.wait_for(lambda e: isinstance(e, PositivesPolled) and e.received,
                                      timeout=2 * TIME_UNIT)
                polls = device.of("positives_polled")
                assert len(polls) == 2                    # the poll at start, the announced one
                assert polls[-1] == PositivesPolled(received=1, next_poll_in_s=POLL_S)
            assert [t.token for t in TokenStore.in_dir(tmp_path / "a").tokens()
                    if t.token == witnessed] == []           # the match deleted


async def test_failed_polls_are_events_until_a_poll_succeeds(tmp_path):
    port = free_port()                                     # no broker yet
    config = device_config(f"ws://127.0.0.1:{port}", poll_interval_s=0.3)
    async with running_device(config, tmp_path / "a", fixed_at()) as a:
        await a.wait_for(lambda e: isinstance(e, PositivesPollFailed) and e.attempts == 2,
                         timeout=10 * TIME_UNIT)
        failures = a.of("positives_poll_failed")
        assert [f.attempts for f in failures[:2]] == [1, 2]
        assert failures[0].since == failures[1].since      # one run of failures
        assert failures[0].reason                          # one line, says why
        assert failures[0].next_poll_in_s == 0.3
        assert not a.of("positives_polled")
        async with start_broker(_settings(tmp_path, port)):
            await a.wait_event("positives_polled", timeout=10 * TIME_UNIT)
