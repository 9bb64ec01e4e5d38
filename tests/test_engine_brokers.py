"""Several brokers per device (issue 8, points 2 and 4; paper 5), with real embedded brokers.

* failover: a device given one region's two broker URLs whose first broker is stopped mid-run
  reconnects to the second and still witnesses a device connected there;
* poll-only brokers (``[[positives]]``): a device polling two boards alerts on a positive
  published on the second while the first is down; each broker's cursor is kept in the store
  and survives a restart; a poll-only broker never receives a hello, a position or any session
  frame (the broker's recorder sees every frame it receives);
* a declaration goes to the broker the tester picks, and only there; decoy uploads go to
  every broker a declaration may go to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fanny_tui.config import PrivacyConfig
from fanny_tui.events import (
    BrokerConnected,
    ExposureAlert,
    PositiveDeclared,
    PositivesPolled,
    PositivesPollFailed,
)
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.store import TokenStore

from .broker.kit import running
from .helpers import (
    TIME_UNIT,
    device_config,
    device_pair,
    fixed_at,
    loopback_port,
    running_device,
)
from .test_positives import board_tokens, publish


def _own_tokens(data_dir: Path, count: int) -> list[str]:
    """Store ``count`` random witness tokens in the device's store (closed again)."""
    store = TokenStore.in_dir(data_dir)
    tokens = [os.urandom(32).hex() for _ in range(count)]
    for token in tokens:
        store.add(token, expiry_for(datetime.now(UTC)))
    store.close()
    return tokens


def _frames(frames: list[tuple[str, str]]):  # type: ignore[no-untyped-def]
    return lambda kind, raw: frames.append((kind, raw))


async def test_a_device_fails_over_to_the_second_broker_and_still_witnesses_there(tmp_path):
    async with running(tmp_path / "b", cooldown_s=600.0) as second, \
            contextlib.AsyncExitStack() as first_up:
        first = await first_up.enter_async_context(running(tmp_path / "a"))
        region = device_config([first.url, second.url])
        async with device_pair(tmp_path, region, device_config(second.url),
                               names=("x", "y")) as (x, y):
            connected = await x.wait_event("broker_connected", 10 * TIME_UNIT)
            assert isinstance(connected, BrokerConnected)
            assert connected.url == first.url and connected.broker == "main"
            assert first.counts()["sessions"] == 1
            await first_up.aclose()                       # the first broker stops mid-run
            back = await x.wait_for(lambda e: isinstance(e, BrokerConnected)
                                    and e.url == second.url, 10 * TIME_UNIT)
            assert back.broker == "main"
            # Matched on the second broker with the device that was there all along.
            stored_x = await x.wait_event("token_stored", 30 * TIME_UNIT)
            stored_y = await y.wait_event("token_stored", 30 * TIME_UNIT)
            assert stored_x.token == stored_y.token
            assert x.of("broker_disconnected")[0].url == first.url


async def test_a_positive_on_a_second_board_alerts_while_the_first_is_down(tmp_path):
    mine = _own_tokens(tmp_path / "x", 3)
    health_frames: list[tuple[str, str]] = []
    with loopback_port(listening=False) as down:
        async with running(tmp_path / "health", recorder=_frames(health_frames)) as health:
            config = device_config(f"ws://127.0.0.1:{down}", positives={"health": health.url},
                                   poll_interval_s=0.3)
            async with running_device(config, tmp_path / "x", fixed_at()) as x:
                failed = await x.wait_event("positives_poll_failed", 10 * TIME_UNIT)
                assert isinstance(failed, PositivesPollFailed) and failed.broker == "main"
                publish(health, [mine[1], os.urandom(32).hex()], expiry_for(datetime.now(UTC)))
                alert = await x.wait_event("exposure_alert", 10 * TIME_UNIT)
                assert isinstance(alert, ExposureAlert)
                assert (alert.count, alert.broker) == (1, "health")
                # The main broker is still down and still polled, on its own.
                await x.wait_for(lambda e: isinstance(e, PositivesPollFailed)
                                 and e.attempts >= 3, 10 * TIME_UNIT)
                assert not x.of("broker_connected")
    store = TokenStore.in_dir(tmp_path / "x")
    assert sorted(t.token for t in store.tokens()) == sorted({mine[0], mine[2]})
    assert store.poll_cursor("health") == 2 and store.poll_cursor() == 0
    store.close()
    # Privacy: the poll-only broker never got a hello, a position or a session frame.
    assert health_frames, "the recorder saw the polls"
    assert {kind for kind, _ in health_frames} <= {"anonymous", "unknown"}
    types = {json.loads(raw).get("type") for _, raw in health_frames}
    assert types == {"positives_poll"}, types


async def test_each_broker_keeps_its_own_cursor_across_restarts(tmp_path):
    frames: list[tuple[str, str]] = []
    async with running(tmp_path / "main") as main, \
            running(tmp_path / "health", recorder=_frames(frames)) as health:
        expires = expiry_for(datetime.now(UTC))
        publish(main, [os.urandom(32).hex() for _ in range(3)], expires)
        publish(health, [os.urandom(32).hex() for _ in range(5)], expires)
        config = device_config(main.url, positives={"health": health.url}, poll_interval_s=0.3)

        def polled(name: str, received: int):  # type: ignore[no-untyped-def]
            return lambda e: (isinstance(e, PositivesPolled) and e.broker == name
                              and e.received == received)

        async with running_device(config, tmp_path / "x", fixed_at()) as x:
            await x.wait_for(polled("main", 3), 10 * TIME_UNIT)
            await x.wait_for(polled("health", 5), 10 * TIME_UNIT)
        store = TokenStore.in_dir(tmp_path / "x")
        assert (store.poll_cursor(), store.poll_cursor("health")) == (3, 5)
        store.close()
        publish(health, [os.urandom(32).hex()], expires)
        frames.clear()
        async with running_device(config, tmp_path / "x", fixed_at()) as x:
            # After the restart each broker is asked only for what is new on its board.
            await x.wait_for(polled("health", 1), 10 * TIME_UNIT)
            await x.wait_for(polled("main", 0), 10 * TIME_UNIT)
            assert not any(isinstance(e, PositivesPolled) and e.received > 1 for e in x.events)
        polls = [json.loads(raw) for _, raw in frames]
        assert polls[0]["type"] == "positives_poll" and polls[0]["cursor"] == 5
    store = TokenStore.in_dir(tmp_path / "x")
    assert (store.poll_cursor(), store.poll_cursor("health")) == (3, 6)
    store.close()


async def test_a_declaration_goes_to_the_broker_the_tester_picks(tmp_path):
    mine = _own_tokens(tmp_path / "x", 2)
    async with running(tmp_path / "main") as main, running(tmp_path / "health") as health:
        config = device_config(main.url, positives={"health": health.url})
        async with running_device(config, tmp_path / "x", fixed_at()) as x:
            assert x.engine.broker_names == ("main", "health")
            with pytest.raises(ValueError, match="unknown broker 'elsewhere'"):
                await x.engine.declare_positive(broker="elsewhere")
            assert await x.engine.declare_positive(broker="health") == 2
            declared = await x.wait_event("positive_declared", 10 * TIME_UNIT)
            assert isinstance(declared, PositiveDeclared)
            assert (declared.count, declared.broker) == (2, "health")
        assert board_tokens(health) == set(mine)
        assert board_tokens(main) == set()


async def test_decoys_cover_the_poll_only_brokers_too(tmp_path):
    # A declaration may go to a [[positives]] broker: its uploads need the same cover traffic.
    frames: list[tuple[str, str]] = []
    async with running(tmp_path / "main") as main, \
            running(tmp_path / "health", recorder=_frames(frames)) as health:
        config = replace(device_config(main.url, positives={"health": health.url}),
                         privacy=PrivacyConfig(decoy_uploads=True, decoy_interval_s=1.0))

        def decoys() -> int:
            return sum(kind == "anonymous" and '"decoy":true' in raw for kind, raw in frames)

        async with running_device(config, tmp_path / "x", fixed_at()):
            async with asyncio.timeout(15 * TIME_UNIT):
                while decoys() < 2:
                    await asyncio.sleep(0.05)
        assert board_tokens(health) == set()                # discarded, as at any broker
