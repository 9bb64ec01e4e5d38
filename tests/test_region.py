"""A region on several brokers (issue 8, point 2): two and three broker processes on one Redis
and one shared positive board.

Devices connected to different brokers are matched, relay signaling and store the same token;
a positive uploaded through one broker is announced to and polled through the others; a broker
SIGKILLed after acknowledging an upload loses none of it, its sessions are at once unreachable
from the survivors, and a device of it that reconnects to a survivor keeps its signaling route.
Redis is inspected after the scenario (no session ID, no position left).

The board is the ``region_board`` fixture's parameter: one SQLite file that every broker process
opens (``--db``), or one PostgreSQL database (``--postgres``), the scaled setting of issue 8.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.exceptions import ConnectionClosed

from broker.__main__ import create_board, create_postgres_board
from broker.server import BrokerSettings, RunningBroker, start_broker
from fanny_tui.protocol.messages import (
    Error,
    Match,
    PositiveAck,
    Positives,
    PositivesAvailable,
    PositivesPoll,
    PositiveUpload,
    Signal,
)
from fanny_tui.protocol.tokens import craft_token
from fanny_tui.store import TokenStore
from tests.broker.kit import Client, eventually, new_id, positive, real_expiry, token
from tests.helpers import TIME_UNIT, device_config, device_pair
from tests.servers import broker_processes, redis_contents


@dataclass(frozen=True)
class RegionBoard:
    """The positive board every broker of the region shares.

    Attributes:
        settings: :class:`BrokerSettings` fields naming it (``db_path``, ``postgres_url``).
        args: the same as ``fanny-broker serve`` options.
    """

    settings: dict[str, Any]
    args: tuple[str, ...]


@pytest.fixture(params=["sqlite", "postgres"])
def region_board(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegionBoard]:
    """The shared board: ``sqlite`` is one SQLite file opened by every broker process;
    ``postgres`` one database on the test PostgreSQL server (tests/pg.py)."""
    db = tmp_path / "region-board.sqlite3"
    if request.param == "sqlite":
        create_board(db)                  # as an operator does: fanny-broker create-board
        yield RegionBoard({"db_path": db}, ("--db", str(db)))
    elif request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        create_postgres_board(url)        # as an operator does: create-board --postgres URL
        yield RegionBoard({"postgres_url": url}, ("--postgres", url))   # no db_path needed
    else:  # pragma: no cover - a parameter without a board is a mistake in this file
        raise AssertionError(f"unknown board {request.param!r}")


@contextlib.asynccontextmanager
async def region(redis_url: str, board: RegionBoard, count: int,
                 recorder: Any = None, **overrides: Any) -> AsyncIterator[list[RunningBroker]]:
    """``count`` brokers in this process, each on its own port, one Redis, one board."""
    values: dict[str, Any] = {
        "host": "127.0.0.1", "port": 0, "redis_url": redis_url, "open_declarations": True,
        "upload_answer_delay_s": 0.05, "cooldown_s": 600.0, "position_timeout_s": 10.0,
        "housekeeping_interval_s": 0.5, "announce_interval_s": 0.0, **board.settings}
    values.update(overrides)
    async with contextlib.AsyncExitStack() as stack:
        brokers = [await stack.enter_async_context(
            start_broker(BrokerSettings(**values), recorder=recorder)) for _ in range(count)]
        yield brokers


async def test_devices_on_two_brokers_witness_and_the_positive_reaches_the_other(
        redis_url: str, region_board: RegionBoard, tmp_path: Path) -> None:
    hellos: list[str] = []

    def record(kind: str, raw: str) -> None:
        if '"hello"' in raw:
            hellos.append(json.loads(raw)["session_id"])

    poll_s = 1.0
    async with region(redis_url, region_board, 2, recorder=record) as (one, two):
        a_config = device_config(one.url, poll_interval_s=poll_s)
        b_config = device_config(two.url, poll_interval_s=poll_s)
        async with device_pair(tmp_path, a_config, b_config) as (a, b):
            stored_a = await a.wait_event("token_stored", timeout=30 * TIME_UNIT)
            stored_b = await b.wait_event("token_stored", timeout=30 * TIME_UNIT)
            expected = craft_token(a.engine._contact_id, b.engine._contact_id)
            assert stored_a.token == stored_b.token == expected
            assert one.backends.router.local_count() == 1
            assert two.backends.router.local_count() == 1

            # A declares through broker one; B, on broker two, is alerted from the shared
            # board and its matched token deleted.
            assert await a.engine.declare_positive() == 1
            await a.wait_event("positive_declared", timeout=10 * TIME_UNIT)
            alert = await b.wait_event("exposure_alert", timeout=2 * poll_s + 10 * TIME_UNIT)
            assert alert.count == 1
            store_b = TokenStore.in_dir(b.data_dir)
            try:
                assert expected not in {t.token for t in store_b.tokens()}
            finally:
                store_b.close()

    # Privacy: the brokers are gone; Redis keeps no session ID, no position, no session.
    assert hellos
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
        left = redis_contents(raw)
        text = " ".join(f"{key} {' '.join(values)}" for key, values in left.items())
        assert not any(session_id in text for session_id in hellos)
        assert not any(key.startswith(("fanny:s:", "fanny:f:", "fanny:geo", "fanny:polar"))
                       for key in left), left
        assert raw.config_get("save") == {"save": ""}
        assert raw.config_get("appendonly") == {"appendonly": "no"}


async def test_three_brokers_share_positives_and_announcements(
        redis_url: str, region_board: RegionBoard) -> None:
    async with (region(redis_url, region_board, 3) as brokers,
                Client.open(brokers[1].url) as listener,
                Client.open(brokers[2].url) as other,
                Client.open(brokers[0].url) as anon):
        await listener.hello()
        await other.hello()
        await anon.send(PositiveUpload(upload_id=new_id(),
                                       tokens=[positive(1, real_expiry()),
                                               positive(2, real_expiry())]))
        assert (await anon.expect(PositiveAck)).count == 2
        # Sessions on the other brokers hear of it...
        for client in (listener, other):
            announced = await client.expect(PositivesAvailable, timeout=5 * TIME_UNIT)
            assert announced.cursor >= 2
        # ...and polls through them find it.
        for broker in brokers[1:]:
            async with Client.open(broker.url) as poller:
                await poller.send(PositivesPoll())
                page = await poller.expect(Positives)
                assert [t.token for t in page.tokens] == [token(1), token(2)]


async def test_a_reconnect_through_another_broker_replaces_the_older_connection(
        redis_url: str, region_board: RegionBoard) -> None:
    async with (region(redis_url, region_board, 2) as (one, two),
                Client.open(one.url) as old, Client.open(two.url) as new,
                Client.open(one.url) as peer):
        await old.hello()
        await new.hello(session_id=old.session_id)
        with pytest.raises(ConnectionClosed) as closed:
            await old.recv(timeout=5 * TIME_UNIT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
        # The session lives on through the newer connection: it matches a peer of broker one.
        await peer.hello()
        await new.at(0)
        await new.barrier()
        await peer.at(2)
        assert (await new.expect(Match)).peer_session_id == peer.session_id
        assert one.backends.router.local_count() == 1 and two.backends.router.local_count() == 1


def _region_args(redis_url: str, region_board: RegionBoard) -> tuple[str, ...]:
    """``fanny-broker serve`` options of a region's broker: a free port, the Redis and the
    board, open declarations answered at once, warnings only."""
    return ("--port", "0", "--redis", redis_url, *region_board.args, "--open-declarations",
            "--upload-answer-delay-s", "0", "--log-level", "WARNING")


async def _signal_outcome(sender: Client, peer: str) -> str:
    """Send an offer to ``peer``; ``"relayed"`` or the refusal's code."""
    await sender.send(Signal(peer_session_id=peer, sdp_type="offer", sdp="v=0"))
    for message in await sender.barrier():
        if isinstance(message, Error):
            return message.code
    return "relayed"


async def test_a_killed_broker_loses_no_acknowledged_token_and_its_sessions_move(
        redis_url: str, region_board: RegionBoard) -> None:
    """Real ``fanny-broker serve --redis`` processes; one is SIGKILLed."""
    async with broker_processes(3, *_region_args(redis_url, region_board)) as brokers:
        urls = brokers.urls
        async with Client.open(urls[1]) as b:
            await b.hello(radius_m=30.0)
            async with Client.open(urls[0]) as a:
                await a.hello(radius_m=30.0)
                await a.at(0)
                await a.barrier()
                await b.at(3)
                assert isinstance(await b.expect(Match), Match)
                assert (await a.expect(Match)).peer_session_id == b.session_id
                assert await _signal_outcome(a, b.session_id) == "relayed"
                relayed = await b.expect(Signal)
                assert relayed.peer_session_id == a.session_id and relayed.sdp == "v=0"
                async with Client.open(urls[0]) as anon:
                    await anon.send(PositiveUpload(upload_id=new_id(),
                                                   tokens=[positive(7, real_expiry())]))
                    assert (await anon.expect(PositiveAck)).count == 1
                    brokers.kill(0)   # right after its ack
                a_session = a.session_id
            # a's broker is dead: a is unreachable as soon as Redis has seen the dead
            # subscriber's connection close (long before a's session key expires).

            async def a_is_unreachable() -> bool:
                return await _signal_outcome(b, a_session) == "peer_unavailable"

            await eventually(a_is_unreachable, timeout=2 * TIME_UNIT)
            for url in urls[1:]:
                async with Client.open(url) as poller:
                    await poller.send(PositivesPoll())
                    page = await poller.expect(Positives)
                    assert [t.token for t in page.tokens] == [token(7)]
            # a reconnects to a survivor with its session: the pair's route holds.
            async with Client.open(urls[2]) as a_again:
                await a_again.hello(session_id=a_session, radius_m=30.0)
                assert await _signal_outcome(b, a_session) == "relayed"
                assert (await a_again.expect(Signal)).peer_session_id == b.session_id


async def test_a_device_of_a_killed_broker_fails_over_and_its_declaration_reaches_the_region(
        redis_url: str, region_board: RegionBoard, tmp_path: Path) -> None:
    """Two real ``fanny-broker serve`` processes on one Redis and one board; device x lists
    both (``[broker] url``), device y only the second. x and y witness across the brokers;
    the first broker is SIGKILLed; x fails over to the second, declares through it, and y is
    alerted (issue 8, point 2)."""
    async with broker_processes(2, *_region_args(redis_url, region_board)) as brokers:
        urls = brokers.urls
        poll_s = 1.0
        x_config = device_config(urls, poll_interval_s=poll_s)
        y_config = device_config(urls[1], poll_interval_s=poll_s)
        async with device_pair(tmp_path, x_config, y_config, names=("x", "y")) as (x, y):
            connected = await x.wait_event("broker_connected", timeout=10 * TIME_UNIT)
            assert connected.url == urls[0]
            stored_x = await x.wait_event("token_stored", timeout=30 * TIME_UNIT)
            stored_y = await y.wait_event("token_stored", timeout=30 * TIME_UNIT)
            assert stored_x.token == stored_y.token
            brokers.kill(0)
            await x.wait_for(lambda e: e.event == "broker_connected" and e.url == urls[1],
                             timeout=20 * TIME_UNIT)
            assert await x.engine.declare_positive() == 1
            await x.wait_event("positive_declared", timeout=10 * TIME_UNIT)
            alert = await y.wait_event("exposure_alert", timeout=2 * poll_s + 10 * TIME_UNIT)
            assert alert.count == 1
