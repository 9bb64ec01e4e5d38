"""broker.redis_backend on a real redis-server: two RedisPositions/RedisRouter pairs on one Redis
are two brokers of one region (issue 8, point 2)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from broker import Refusal, redis_backend
from broker.backends import LivePositions, Router, open_backends
from broker.redis_backend import (
    RedisPositions,
    RedisRouter,
    connect_redis,
    pair_hash,
    session_hash,
)
from broker.server import BrokerSettings, SetupError
from broker.state import BrokerState, MatchNotice
from fanny_tui.protocol.errors import LocalProtocolError
from tests.broker.kit import LAT, LON, new_id, north
from tests.helpers import TIME_UNIT, loopback_port
from tests.servers import redis_binary, redis_contents, start_redis, stop_redis


@dataclass
class Broker:
    """One broker process's live stores."""

    positions: RedisPositions
    router: RedisRouter


@contextlib.asynccontextmanager
async def brokers(url: str, count: int = 2, **times: float) -> AsyncIterator[list[Broker]]:
    """``count`` brokers on the Redis at ``url``, each with its own client (its own
    connections), as separate processes would have."""
    values = {"radius_max_m": 100.0, "cooldown_s": 300.0, "position_timeout_s": 60.0}
    values.update(times)
    opened: list[Broker] = []
    try:
        for _ in range(count):
            client = await connect_redis(url)
            positions = RedisPositions(client, values["radius_max_m"], values["cooldown_s"],
                                       values["position_timeout_s"], values.get("route_ttl_s"),
                                       max_speed_mps=values.get("max_speed_mps", 30.0),
                                       session_ttl_s=values.get("session_ttl_s"))
            router = RedisRouter(client)
            opened.append(Broker(positions, router))
            await router.start()
        yield opened
    finally:
        for broker in opened:
            await broker.router.close()
            await broker.positions.close()


@dataclass
class Inbox:
    """A :class:`~broker.backends.Recipient` that records what it gets."""

    frames: list[str] = field(default_factory=list)
    replaced: int = 0

    def post(self, message: str) -> None:
        self.frames.append(message)

    def replace(self) -> None:
        self.replaced += 1


async def until(predicate, timeout: float = 5 * TIME_UNIT) -> None:
    """Wait until ``predicate()`` (sync or async) is true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the bound")
        await asyncio.sleep(0.02)


def pairs_of(notices: list[MatchNotice]) -> list[tuple[str, str, str]]:
    return [(n.session_id, n.peer_session_id, n.role) for n in notices]


def test_redis_stores_implement_the_contracts() -> None:
    assert issubclass(RedisPositions, LivePositions)
    assert issubclass(RedisRouter, Router)


async def test_sessions_on_two_brokers_match_once_per_cooldown(redis_url: str) -> None:
    cooldown = 1.0 * TIME_UNIT
    async with brokers(redis_url, cooldown_s=cooldown) as (one, two):
        a, b = sorted([new_id(), new_id()])      # a < b: a is the initiator
        await one.positions.connect(a, 30.0, 0.0)
        await two.positions.connect(b, 30.0, 0.0)
        assert await one.positions.update_position(a, LAT, LON, 4.0, 0.0) == []
        notices = await two.positions.update_position(b, north(5), LON, 4.0, 0.0)
        matched_at = time.monotonic()
        assert pairs_of(notices) == [(b, a, "responder"), (a, b, "initiator")]
        # Either broker, either side: nothing more within the cooldown.
        assert await one.positions.update_position(a, LAT, LON, 4.0, 1.0) == []
        assert await two.positions.update_position(b, north(5), LON, 4.0, 1.0) == []

        async def matches_again() -> bool:
            return bool(await one.positions.update_position(a, LAT, LON, 4.0, 2.0))

        await until(matches_again, timeout=cooldown + 5 * TIME_UNIT)
        assert time.monotonic() - matched_at >= cooldown * 0.95


async def test_two_brokers_matching_one_pair_at_once_match_it_once(redis_url: str) -> None:
    async with brokers(redis_url, count=3) as group:
        ids = [new_id() for _ in range(6)]
        for i, session_id in enumerate(ids):
            await group[i % 3].positions.connect(session_id, 50.0, 0.0)
        rounds = await asyncio.gather(*(
            group[i % 3].positions.update_position(session_id, north(i), LON, 3.0, 0.0)
            for _ in range(5) for i, session_id in enumerate(ids)))
        notices = [n for found in rounds for n in found]
        # 6 sessions within a few metres: 15 pairs, each matched once (two notices).
        assert len(notices) == 2 * 15
        seen = {frozenset((n.session_id, n.peer_session_id)) for n in notices}
        assert len(seen) == 15


async def test_matching_follows_the_rule_of_broker_state(redis_url: str) -> None:
    """Random sessions, radii, accuracies and moves around one spot, split over two brokers,
    with outliers 3 km away (implausible jumps, some of them in runs that re-anchor): every
    update yields exactly the notices of :class:`BrokerState` (same rules, same order) and
    the same updates are rejected as jumps."""
    rng = random.Random(8)
    state = BrokerState(60.0, 3600.0, 3600.0, max_speed_mps=30.0)
    async with brokers(redis_url, radius_max_m=60.0, cooldown_s=3600.0,
                       position_timeout_s=3600.0, max_speed_mps=30.0) as group:
        ids = [new_id() for _ in range(24)]
        for i, session_id in enumerate(ids):
            radius = rng.choice([1.0, 5.0, 10.0, 25.0, 60.0, 500.0])
            state.connect(session_id, radius, 0.0)
            await group[i % 2].positions.connect(session_id, radius, 0.0)
        total = 0
        away = 0.0
        for step in range(400):
            i = rng.randrange(len(ids))
            if rng.random() < 0.05:
                away = 0.0 if away else 3000.0      # a run of outliers starts or ends
            north_m = rng.uniform(-80, 80) + (away if rng.random() < 0.5 else 0.0)
            lat = LAT + north_m / 111_195.0
            lon = LON + rng.uniform(-80, 80) / (111_195.0 * math.cos(math.radians(LAT)))
            accuracy = rng.choice([None, 0.0, 2.0, 8.0, 30.0, 200.0])
            now = step * 0.5
            expected = state.update_position(ids[i], lat, lon, accuracy, now)
            got = await group[i % 2].positions.update_position(ids[i], lat, lon, accuracy, now)
            assert pairs_of(got) == pairs_of(expected), step
            rejected = sum(broker.positions.counts()["jumps_rejected"] for broker in group)
            assert rejected == state.jumps_rejected, step
            total += len(got)
        assert total > 40        # the draw matched many pairs, and refused many
        assert state.jumps_rejected > 40


@pytest.mark.parametrize(("first", "second"), [
    ((89.9999, 10.0), (89.9999, -170.0)),       # across the North Pole, beyond Redis' GEO limit
    ((85.0512, 3.0), (85.05105, 3.0)),          # either side of Redis' GEO latitude limit
    ((-85.05108, 3.0), (-85.05116, 3.0)),
    ((0.0, 179.99995), (0.0, -179.99995)),      # across the antimeridian
])
async def test_matching_near_the_poles_and_the_antimeridian(
        redis_url: str, first: tuple[float, float], second: tuple[float, float]) -> None:
    state = BrokerState(100.0, 300.0, 60.0)
    async with brokers(redis_url) as (one, two):
        a, b = new_id(), new_id()
        for positions, session_id in ((one.positions, a), (two.positions, b)):
            state.connect(session_id, 30.0, 0.0)
            await positions.connect(session_id, 30.0, 0.0)
        state.update_position(a, *first, 1.0, 0.0)
        await one.positions.update_position(a, *first, 1.0, 0.0)
        expected = state.update_position(b, *second, 1.0, 0.0)
        got = await two.positions.update_position(b, *second, 1.0, 0.0)
        assert len(expected) == 2
        assert pairs_of(got) == pairs_of(expected)


async def test_routes_are_shared_and_expire(redis_url: str) -> None:
    route_ttl = 1.0 * TIME_UNIT
    async with brokers(redis_url, route_ttl_s=route_ttl) as (one, two):
        a, b, c = new_id(), new_id(), new_id()
        await one.positions.connect(a, 30.0, 0.0)
        epoch_b = (await two.positions.connect(b, 30.0, 0.0)).epoch
        await two.positions.connect(c, 30.0, 0.0)
        await one.positions.update_position(a, LAT, LON, 4.0, 0.0)
        assert len(await two.positions.update_position(b, north(3), LON, 4.0, 0.0)) == 2
        await one.positions.check_route(a, b, 0.0)          # matched through the other broker
        await two.positions.check_route(b, a, 0.0)
        for source, destination in ((a, c), (a, a)):
            with pytest.raises(Refusal) as refused:
                await one.positions.check_route(source, destination, 0.0)
            assert (refused.value.code, refused.value.field) == ("not_matched", "peer_session_id")
        assert await two.positions.disconnect(b, epoch_b)
        with pytest.raises(Refusal) as refused:
            await one.positions.check_route(a, b, 0.0)
        assert refused.value.code == "peer_unavailable"
        await two.positions.connect(b, 30.0, 0.0)            # back (reconnected): routed again
        await one.positions.check_route(a, b, 0.0)

        async def route_closed() -> bool:
            try:
                await one.positions.check_route(a, b, 0.0)
            except Refusal as exc:
                return exc.code == "not_matched"
            return False

        await until(route_closed, timeout=route_ttl + 5 * TIME_UNIT)


async def test_positions_expire_on_their_own(redis_url: str) -> None:
    timeout = 1.0 * TIME_UNIT
    async with brokers(redis_url, position_timeout_s=timeout) as (one, two):
        a, b = new_id(), new_id()
        await one.positions.connect(a, 30.0, 0.0)
        await two.positions.connect(b, 30.0, 0.0)
        await one.positions.update_position(a, LAT, LON, 4.0, 0.0)
        raw = redis.Redis.from_url(redis_url, decode_responses=True)
        with raw:
            assert raw.exists(f"fanny:f:{session_hash(a)}")
            # No broker does any housekeeping: the position and the index go by themselves.
            await until(lambda: not raw.keys("fanny:f:*") and not raw.exists("fanny:geo"),
                        timeout=timeout + 5 * TIME_UNIT)
            assert await two.positions.update_position(b, north(2), LON, 4.0, 0.0) == []
            # A's stale index entry is swept by housekeeping while B's position is fresh.
            await one.positions.update_position(a, LAT, LON, 4.0, 0.0)

            async def a_expired_while_b_moves() -> bool:
                await two.positions.update_position(b, north(200), LON, 4.0, 10.0)
                return not raw.exists(f"fanny:f:{session_hash(a)}")

            await until(a_expired_while_b_moves, timeout=timeout + 5 * TIME_UNIT)
            assert raw.zscore("fanny:t", session_hash(a)) is not None
            assert await one.positions.expire(10.0) >= 1
            assert raw.zscore("fanny:t", session_hash(a)) is None
            assert raw.zscore("fanny:geo", session_hash(a)) is None
            assert one.positions.counts() == {"sessions": 1, "positions": 0,
                                              "jumps_rejected": 0}
            assert two.positions.counts() == {"sessions": 1, "positions": 1,
                                              "jumps_rejected": 0}


async def test_disconnect_and_position_lost_drop_the_position(redis_url: str) -> None:
    async with brokers(redis_url, cooldown_s=0.001) as (one, two):
        a, b = new_id(), new_id()
        epoch_a = (await one.positions.connect(a, 30.0, 0.0)).epoch
        await two.positions.connect(b, 30.0, 0.0)
        await one.positions.update_position(a, LAT, LON, 4.0, 0.0)
        assert await one.positions.drop_position(a)
        assert not await one.positions.drop_position(a)
        assert await two.positions.update_position(b, north(2), LON, 4.0, 0.0) == []
        await one.positions.update_position(a, LAT, LON, 4.0, 0.0)   # matches b again
        # a reconnects through the other broker: the old connection's position goes, and
        # its late disconnect (a stale epoch) changes nothing.
        await one.positions.update_position(a, LAT, LON, 4.0, 0.0)
        reconnected = await two.positions.connect(a, 30.0, 0.0)
        assert reconnected.replaced and reconnected.epoch != epoch_a
        assert await two.positions.update_position(b, north(2), LON, 4.0, 0.0) == []
        assert not await one.positions.disconnect(a, epoch_a)
        await two.positions.update_position(a, LAT, LON, 4.0, 0.0)
        assert await two.positions.disconnect(a, reconnected.epoch)
        assert await two.positions.update_position(b, north(2), LON, 4.0, 0.0) == []
        with pytest.raises(LocalProtocolError):
            await one.positions.update_position(a, LAT, LON, 4.0, 0.0)


async def test_session_keys_live_with_their_broker_and_go_with_it(redis_url: str) -> None:
    ttl = 1.0 * TIME_UNIT
    async with brokers(redis_url, count=1, session_ttl_s=ttl) as (one,):
        a = new_id()
        await one.positions.connect(a, 30.0, 0.0)
        key = f"fanny:s:{session_hash(a)}"
        with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
            # Housekeeping keeps the key of a session the broker holds...
            began = time.monotonic()
            while time.monotonic() - began < 2 * ttl:
                await one.positions.expire(time.monotonic())
                assert raw.exists(key)
                await asyncio.sleep(ttl / 10)
            # ...and a broker that stopped working (killed) leaves it to expire.
            await until(lambda: not raw.exists(key), timeout=ttl + 5 * TIME_UNIT)


async def test_a_position_writes_a_lost_session_again(redis_url: str) -> None:
    """Redis restarted (without persistence, everything is gone): the sessions the brokers
    hold come back with their next position and match again."""
    async with brokers(redis_url) as (one, two):
        a, b = new_id(), new_id()
        await one.positions.connect(a, 30.0, 0.0)
        epoch_b = (await two.positions.connect(b, 30.0, 0.0)).epoch
        with redis.Redis.from_url(redis_url) as raw:
            raw.flushall()
        assert await one.positions.update_position(a, LAT, LON, 4.0, 0.0) == []
        assert len(await two.positions.update_position(b, north(2), LON, 4.0, 0.0)) == 2
        assert await two.positions.disconnect(b, epoch_b)     # the same connection


async def test_bad_arguments_are_refused_before_redis(redis_url: str) -> None:
    async with brokers(redis_url, count=1) as (one,):
        a = new_id()
        for radius in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match="radius_m"):
                await one.positions.connect(a, radius, 0.0)
        await one.positions.connect(a, 30.0, 0.0)
        for lat, lon in ((91.0, 0.0), (math.nan, 0.0), (0.0, 180.5), (0.0, math.inf)):
            with pytest.raises(ValueError, match="out of range"):
                await one.positions.update_position(a, lat, lon, None, 0.0)


async def test_router_delivers_across_brokers_and_replaces_older_connections(
        redis_url: str) -> None:
    async with brokers(redis_url) as (one, two):
        a, b = new_id(), new_id()
        inbox_a, inbox_b = Inbox(), Inbox()
        await one.router.attach(a, inbox_a)
        await two.router.attach(b, inbox_b)
        assert await two.router.post(a, "to a")
        assert await one.router.post(a, "to a, local")
        # (no order between frames from two brokers; each broker's own frames keep theirs)
        await until(lambda: sorted(inbox_a.frames) == ["to a", "to a, local"])
        assert not await one.router.post(new_id(), "to nobody")

        # a reconnects through broker two: broker one's connection is replaced.
        newer = Inbox()
        await two.router.attach(a, newer)
        await until(lambda: inbox_a.replaced == 1)
        assert one.router.local_count() == 0 and two.router.local_count() == 2
        await one.router.detach(a, inbox_a)                  # the old connection's late end
        assert await one.router.post(a, "to the newer a")
        await until(lambda: newer.frames == ["to the newer a"])
        assert sorted(inbox_a.frames) == ["to a", "to a, local"]

        # a local reconnect replaces at once
        newest = Inbox()
        await two.router.attach(a, newest)
        assert newer.replaced == 1
        await two.router.detach(a, newer)                     # stale: changes nothing
        assert await one.router.post(a, "x")
        await until(lambda: newest.frames == ["x"])

        await two.router.detach(b, inbox_b)
        assert not await one.router.post(b, "gone")


async def test_broadcast_reaches_every_broker_once(redis_url: str) -> None:
    async with brokers(redis_url, count=3) as group:
        inboxes = [Inbox() for _ in range(5)]
        for i, inbox in enumerate(inboxes):
            await group[i % 3].router.attach(new_id(), inbox)
        assert await group[0].router.broadcast("news") == 2
        await until(lambda: all(inbox.frames for inbox in inboxes))
        # a marker posted after the broadcast arrives after it: nothing more was on its way
        assert await group[1].router.broadcast("end") == 2
        await until(lambda: all(inbox.frames[-1:] == ["end"] for inbox in inboxes))
        assert all(inbox.frames == ["news", "end"] for inbox in inboxes)


async def test_a_stopped_broker_holds_no_session(redis_url: str) -> None:
    async with brokers(redis_url) as (one, two):
        a = new_id()
        await one.router.attach(a, Inbox())
        assert await two.router.post(a, "x")
        await one.router.close()             # its subscription connection is gone

        async def held_nowhere() -> bool:
            return not await two.router.post(a, "y")

        # Redis drops the subscriptions once it sees the connection closed (at once, as for
        # a SIGKILLed process): no key to expire first.
        await until(held_nowhere, timeout=5 * TIME_UNIT)


async def test_nothing_identifying_is_left_in_redis(redis_url: str) -> None:
    """Privacy: after a scenario (matches, routes, reconnects, disconnects, broadcasts) Redis
    holds no session ID and no position; while it runs, no key name carries a session ID;
    Redis persists nothing (no RDB, no AOF)."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as raw:
        async with brokers(redis_url, count=2) as (one, two):
            ids = [new_id() for _ in range(6)]
            epochs, inboxes = {}, {}
            for i, session_id in enumerate(ids):
                broker = (one, two)[i % 2]
                epochs[session_id] = (await broker.positions.connect(session_id, 30.0,
                                                                     0.0)).epoch
                inboxes[session_id] = Inbox()
                await broker.router.attach(session_id, inboxes[session_id])
            for i, session_id in enumerate(ids):
                broker = (one, two)[i % 2]
                for notice in await broker.positions.update_position(session_id, north(i), LON,
                                                                     3.0, 0.0):
                    await broker.router.post(notice.session_id, "match")
            await one.positions.check_route(ids[0], ids[1], 0.0)
            await one.router.broadcast("news")
            live = redis_contents(raw)
            assert any(key.startswith("fanny:f:") for key in live)
            assert not any(s in key for key in live for s in ids)
            for i, session_id in enumerate(ids):
                broker = (one, two)[i % 2]
                assert await broker.positions.disconnect(session_id, epochs[session_id])
                await broker.router.detach(session_id, inboxes[session_id])
            await until(lambda: raw.pubsub_channels() == ["fanny:all"])
            assert all(inbox.frames for inbox in inboxes.values())
        await until(lambda: raw.pubsub_channels() == [])
        left = redis_contents(raw)
        text = " ".join(f"{key} {' '.join(values)}" for key, values in left.items())
        assert not any(session_id in text for session_id in ids), text
        assert not any(session_hash(s) in text for s in ids)   # no session key, no index entry
        # What is left: the epoch counter and the pairs' cooldowns and routes (named by a
        # hash of two session IDs, holding "1", expiring on their own).
        assert {key.split(":")[1] for key in left} == {"epoch", "c", "r"}, left
        assert all(raw.pttl(key) > 0 for key in left if key != "fanny:epoch")
        assert f"fanny:c:{pair_hash(ids[0], ids[1])}" in left
        assert raw.config_get("save") == {"save": ""}
        assert raw.config_get("appendonly") == {"appendonly": "no"}


async def test_open_backends_with_redis(redis_url: str, tmp_path: Path) -> None:
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "board.sqlite3",
                              redis_url=redis_url)
    backends = await open_backends(settings)
    try:
        assert isinstance(backends.positions, RedisPositions)
        assert isinstance(backends.router, RedisRouter)
        inbox = Inbox()
        await backends.router.attach("s", inbox)
        assert await backends.router.post("s", "x")
    finally:
        await backends.close()
        await backends.close()                 # idempotent


async def test_open_backends_names_redis_url_when_unreachable(tmp_path: Path) -> None:
    with loopback_port(listening=False) as port:
        settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "board.sqlite3",
                                  redis_url=f"redis://user:secret@127.0.0.1:{port}/0")
        with pytest.raises(SetupError) as failed:
            await open_backends(settings)
    message = str(failed.value)
    assert message.startswith("redis_url: cannot reach Redis at redis://127.0.0.1:")
    assert "\n" not in message and "secret" not in message


async def test_a_lost_subscription_is_one_warning_not_one_a_second(tmp_path, caplog,
                                                                    monkeypatch):
    # Redis gone: the router retries its subscriptions (here every 10 ms) and says so once
    # (the trial of issue 8 saw one WARNING a second for as long as Redis was down).
    monkeypatch.setattr(redis_backend, "RESUBSCRIBE_DELAY_S", 0.01)
    caplog.set_level(logging.WARNING, logger="broker.redis")
    process, url = start_redis(redis_binary(), tmp_path)
    try:
        async with brokers(url, count=1) as (one,):
            stop_redis(process)
            await until(lambda: one.router.subscription_failures >= 5)
            warnings = [r.getMessage() for r in caplog.records
                        if "Redis subscription failed" in r.getMessage()]
            assert len(warnings) == 1, warnings
            assert "1 attempt(s) in a row; retrying every 0.01 s" in warnings[0]
    finally:
        stop_redis(process)
