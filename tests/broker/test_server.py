"""broker.server: real websockets clients against the real broker on port 0, real SQLite."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from websockets.exceptions import ConnectionClosed

from broker.__main__ import issue_code
from broker.positives import BoardError, SqlitePositiveBoard
from broker.server import BrokerSettings, start_broker
from fanny_tui.protocol.codes import code_hash
from fanny_tui.protocol.messages import (
    UPLOAD_SIZE_BYTES,
    Error,
    Hello,
    Match,
    Position,
    PositionLost,
    PositiveAck,
    Positives,
    PositivesPoll,
    PositiveUpload,
    Signal,
    Welcome,
    encode_padded,
)
from tests.helpers import TIME_UNIT

from .kit import (
    LAT,
    LON,
    WALL_NOW,
    Client,
    FakeMonotonic,
    FakeWall,
    eventually,
    flood_signals,
    healthz,
    new_id,
    north,
    positive,
    running,
    settings_for,
    token,
)


def db_rows(path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


# --- health, settings, boundaries ----------------------------------------------------------


async def test_healthz_reports_counts_only(tmp_path):
    async with running(tmp_path) as broker:
        assert broker.url == f"ws://127.0.0.1:{broker.port}" and broker.port > 0
        async with Client.open(broker.url) as a:
            await a.hello()
            await a.at(0)
            await a.barrier()
            status, body = await healthz(broker.port)
            assert status == 200
            assert body == {"status": "ok", "declarations": "open", "connections": 1,
                            "sessions": 1, "positions": 1, "jumps_rejected": 0}
            assert a.session_id not in json.dumps(body)


def test_settings_name_the_bad_field(tmp_path):
    good = {"host": "127.0.0.1", "port": 0, "db_path": tmp_path / "x"}
    for field, value in (("port", 70000), ("radius_max_m", 0.0), ("radius_max_m", 20_000.0),
                         ("cooldown_s", -1.0), ("position_timeout_s", float("nan")),
                         ("poll_limit", 0), ("max_message_bytes", 10), ("host", ""),
                         ("max_speed_mps", 0.0), ("max_speed_mps", 2e6)):
        with pytest.raises(ValueError, match=f"BrokerSettings.{field}"):
            BrokerSettings(**{**good, field: value})
    assert BrokerSettings("127.0.0.1", 0, tmp_path / "x").radius_max_m == 100.0
    assert BrokerSettings("127.0.0.1", 0, tmp_path / "x").max_speed_mps == 30.0   # the devices'


def test_broker_imports_no_ui_and_no_webrtc():
    code = ("import sys, broker.server, broker.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'textual', 'aiortc', 'av', 'rich'} or (m.startswith('fanny_tui.') and "
            "not m.startswith('fanny_tui.protocol') and m != 'fanny_tui.sqlite_util')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# --- matching --------------------------------------------------------------------------------


async def test_two_clients_match_with_deterministic_roles(tmp_path):
    async with (
        running(tmp_path) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
    ):
        welcome = await a.hello(radius_m=30.0)
        assert welcome == Welcome(radius_m=30.0, position_timeout_s=60.0)
        await b.hello(radius_m=30.0)
        await a.at(0)
        await b.at(5)
        match_b = await b.expect(Match)
        match_a = await a.expect(Match)
        assert match_a.peer_session_id == b.session_id
        assert match_b.peer_session_id == a.session_id
        first = min(a.session_id, b.session_id)
        assert match_a.role == ("initiator" if a.session_id == first else "responder")
        assert {match_a.role, match_b.role} == {"initiator", "responder"}


async def test_three_clients_and_one_far_away(tmp_path):
    async with (
        running(tmp_path) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
        Client.open(broker.url) as c, Client.open(broker.url) as far,
    ):
        for client in (a, b, c, far):
            await client.hello(radius_m=30.0)
        got: dict[Client, list] = {a: [], b: [], c: [], far: []}
        # A barrier per client: frames of different connections run concurrently.
        for client, metres in ((a, 0), (b, 10), (c, 20), (far, 500)):
            await client.at(metres)
            got[client] += await client.barrier()
        for client, others in ((a, {b, c}), (b, {a, c}), (c, {a, b}), (far, set())):
            got[client] += await client.barrier()
            assert all(isinstance(m, Match) for m in got[client])
            assert sorted(m.peer_session_id for m in got[client]) == sorted(
                o.session_id for o in others)


async def test_no_match_beyond_radius_and_radius_capped(tmp_path):
    clock = FakeMonotonic()
    async with (
        running(tmp_path, radius_max_m=40.0, mono=clock) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
    ):
        assert (await a.hello(radius_m=500.0)).radius_m == 40.0     # capped
        await b.hello(radius_m=10.0)
        await a.at(0)
        await b.at(20)                                   # 20 m > min(40, 10)
        assert await b.barrier() == [] and await a.barrier() == []
        clock.advance(1.0)                               # 11 m in 1 s: a walk, not a jump
        await b.at(9)
        assert [m.peer_session_id for m in await b.barrier()] == [a.session_id]


async def test_cooldown_one_match_per_pair(tmp_path):
    clock = FakeMonotonic()
    async with (
        running(tmp_path, mono=clock, cooldown_s=300.0, position_timeout_s=1e6) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
    ):
        await a.hello()
        await b.hello()
        await a.at(0)
        await a.barrier()
        await b.at(5)
        assert len(await b.barrier()) == 1 and len(await a.barrier()) == 1
        clock.advance(299.0)
        await b.at(6)
        await a.at(1)
        assert await b.barrier() == [] and await a.barrier() == []
        clock.advance(1.0)
        await b.at(5)
        assert len(await b.barrier()) == 1 and len(await a.barrier()) == 1


async def test_position_dropped_on_disconnect(tmp_path):
    async with (
        running(tmp_path) as broker,
        Client.open(broker.url) as b,
    ):
        await b.hello()
        async with Client.open(broker.url) as a:
            await a.hello()
            await a.at(0)
            await a.barrier()
        await eventually(lambda: _positions(broker.port, 0))
        await b.at(3)
        assert await b.barrier() == []


async def _positions(port: int, expected: int) -> bool:
    return (await healthz(port))[1]["positions"] == expected


async def test_position_lost_drops_the_position(tmp_path):
    async with (
        running(tmp_path) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
    ):
        await a.hello()
        await b.hello()
        await a.at(0)
        await a.send(PositionLost())
        await a.barrier()
        await b.at(3)
        assert await b.barrier() == []
        assert (await healthz(broker.port))[1]["positions"] == 1


async def test_position_dropped_after_timeout_real_clock(tmp_path):
    async with (
        running(tmp_path, position_timeout_s=0.3) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
    ):
        await a.hello()
        await b.hello()
        await a.at(0)
        await a.barrier()
        await eventually(lambda: _positions(broker.port, 0))   # housekeeping expired it
        await b.at(3)
        assert await b.barrier() == []


async def test_housekeeping_expires_in_batches_and_keeps_serving(tmp_path, monkeypatch):
    # One stale entry per batch: three positions need three batches with the loop free between.
    monkeypatch.setattr("broker.backends.EXPIRE_BATCH", 1)
    async with (
        running(tmp_path, position_timeout_s=0.3, housekeeping_interval_s=0.1) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b, Client.open(broker.url) as c,
    ):
        for n, client in enumerate((a, b, c)):
            await client.hello()
            await client.at(1000.0 * n)
            await client.barrier()
        assert (await healthz(broker.port))[1]["positions"] == 3
        await eventually(lambda: _positions(broker.port, 0))
        await a.at(0)
        assert await a.barrier() == []
        assert (await healthz(broker.port))[1]["positions"] == 1


async def test_stale_position_never_matches_even_before_housekeeping(tmp_path):
    clock = FakeMonotonic()
    async with (
        running(tmp_path, mono=clock, position_timeout_s=60.0,
                housekeeping_interval_s=3600.0) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
    ):
        await a.hello()
        await b.hello()
        await a.at(0)
        await a.barrier()
        clock.advance(61.0)
        await b.at(3)
        assert await b.barrier() == []


async def test_reconnect_with_same_session_replaces_the_first_connection(tmp_path):
    async with running(tmp_path) as broker:
        session_id = new_id()
        async with Client.open(broker.url) as first, Client.open(broker.url) as b:
            await first.hello(session_id)
            await b.hello()
            await first.at(0)
            await first.barrier()
            async with Client.open(broker.url) as second:
                await second.hello(session_id)
                with pytest.raises(ConnectionClosed) as closed:
                    await first.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
                await second.at(0)
                assert await second.barrier() == []
                await b.at(4)
                assert [m.peer_session_id for m in await b.barrier()] == [session_id]
                assert len(await second.barrier()) == 1
                assert (await healthz(broker.port))[1]["sessions"] == 2


# --- signaling -------------------------------------------------------------------------------


async def test_signal_relayed_only_between_matched_sessions(tmp_path):
    clock = FakeMonotonic()
    async with (
        running(tmp_path, mono=clock, cooldown_s=300.0, route_ttl_s=120.0,
                position_timeout_s=1e6) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b, Client.open(broker.url) as c,
    ):
        for client in (a, b, c):
            await client.hello()
        await a.at(0)
        await b.at(3)
        await c.at(900)
        await a.expect(Match)
        await b.expect(Match)
        sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"
        await a.send(Signal(peer_session_id=b.session_id, sdp_type="offer", sdp=sdp))
        relayed = await b.expect(Signal)
        assert relayed == Signal(peer_session_id=a.session_id, sdp_type="offer", sdp=sdp)
        await b.send(Signal(peer_session_id=a.session_id, sdp_type="answer", sdp=sdp))
        assert (await a.expect(Signal)).sdp_type == "answer"
        # C never matched A: refused, and C's connection stays usable.
        await c.send(Signal(peer_session_id=a.session_id, sdp_type="offer", sdp=sdp))
        await c.expect_error("not_matched", "peer_session_id")
        assert await a.barrier() == []
        # The route lives route_ttl_s after the match.
        clock.advance(121.0)
        await a.send(Signal(peer_session_id=b.session_id, sdp_type="offer", sdp=sdp))
        await a.expect_error("not_matched", "peer_session_id")
        assert await b.barrier() == []


async def test_signal_to_a_matched_peer_that_left_is_refused(tmp_path):
    async with (
        running(tmp_path) as broker,
        Client.open(broker.url) as a,
    ):
        await a.hello()
        async with Client.open(broker.url) as b:
            await b.hello()
            await a.at(0)
            await b.at(3)
            await a.expect(Match)
        await eventually(lambda: _sessions(broker.port, 1))
        await a.send(Signal(peer_session_id=b.session_id, sdp_type="offer", sdp="v=0"))
        await a.expect_error("peer_unavailable", "peer_session_id")


async def _sessions(port: int, expected: int) -> bool:
    return (await healthz(port))[1]["sessions"] == expected


# --- the positive board over the wire ------------------------------------------------------


async def test_upload_ack_only_after_commit(tmp_path):
    wall = FakeWall(WALL_NOW)
    async with (
        running(tmp_path, wall=wall) as broker,
        Client.open(broker.url) as anon,
    ):
        upload_id = new_id()
        await anon.send(PositiveUpload(upload_id=upload_id,
                                       tokens=[positive(3), positive(1), positive(2)]))
        ack = await anon.expect(PositiveAck)
        assert (ack.upload_id, ack.count) == (upload_id, 3)
        # Read the file with another connection right after the ack: committed.
        assert db_rows(tmp_path / "board.sqlite3", "SELECT token FROM positives") == [
            (token(1),), (token(2),), (token(3),)]


class FailingBoard(SqlitePositiveBoard):
    """A real board whose storage fails on add (as a full disk would)."""

    def add(self, upload_id, tokens, now=None, **kwargs):  # type: ignore[override]
        raise BoardError("disk I/O error")


async def test_no_ack_when_the_commit_fails(tmp_path):
    board = FailingBoard(tmp_path / "failing.sqlite3")
    try:
        async with (
            start_broker(settings_for(tmp_path), board=board,
                         wall_clock=FakeWall(WALL_NOW)) as broker,
            Client.open(broker.url) as anon,
        ):
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(1)]))
            await anon.expect_error("unavailable", None)
            await anon.send(PositivesPoll(cursor=0))               # connection still up
            assert (await anon.expect(Positives)).tokens == []
    finally:
        board.close()


async def test_a_redis_stopped_mid_run_is_answered_unavailable_and_logged_in_one_line(
        tmp_path, own_redis, caplog):
    """Redis down under a region's broker: a session message whose store call fails is
    answered ``unavailable`` and its connection closed 1013 (try again later: the device says
    hello again, on this broker or another); a hello is answered ``unavailable`` and may be
    said again. Each failure is one log line, without data or traceback."""
    caplog.set_level(logging.DEBUG)
    answer_s = 10 * TIME_UNIT                    # a refused reconnect fails at once
    async with (
        running(tmp_path, redis_url=own_redis.url) as broker,
        Client.open(broker.url) as a,
        Client.open(broker.url) as b,
        Client.open(broker.url) as d,
    ):
        for client in (a, b, d):
            await client.hello()
        await a.at(0)
        await b.at(3)
        assert isinstance(await a.recv(answer_s), Match)     # Redis works: a and b match
        assert isinstance(await b.recv(answer_s), Match)
        own_redis.stop()
        # b's update is its place again: a move in the instant would be an implausible jump,
        # refused by the broker before any store call (docs/protocol.md, the jump rule)
        for client, message in (
                (a, PositionLost()),                             # DropPosition: no answer
                (b, Position(latitude=north(3), longitude=LON, accuracy_m=4.0)),   # update
                (d, Signal(peer_session_id=b.session_id, sdp_type="offer", sdp="v=0"))):
            await client.send(message)
            error = await client.recv(answer_s)
            assert isinstance(error, Error) and (error.code, error.field) == (
                "unavailable", None), (message, error)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(client.ws.recv(), answer_s)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        async with Client.open(broker.url) as c:
            for _ in range(2):                  # a hello not welcomed leaves it new
                await c.send(Hello(session_id=new_id(), radius_m=30.0))
                error = await c.recv(answer_s)
                assert isinstance(error, Error) and error.code == "unavailable", error
            await c.send(PositivesPoll(cursor=0))    # the board (SQLite here) still answers
            assert isinstance(await c.recv(answer_s), Positives)
    records = [r for r in caplog.records if not r.name.startswith("tests.")]
    failures = [r for r in records if r.getMessage().startswith("store unavailable")]
    assert {r.getMessage() for r in failures} >= {
        "store unavailable while handling a message: ConnectionError",
        "store unavailable in a store call (update): ConnectionError",
        "store unavailable in a store call (relay): ConnectionError",
        "store unavailable in a store call (connect): ConnectionError",
        "store unavailable while ending a connection: ConnectionError"}, failures
    assert all(r.levelno == logging.ERROR and r.exc_info is None for r in failures)
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in records)
    assert "internal error" not in text and "Traceback" not in text
    for session_id in (a.session_id, b.session_id, d.session_id):
        assert session_id is not None and session_id not in text
    assert "127.0.0." not in text


async def test_idempotent_reupload(tmp_path):
    async with running(tmp_path, wall=FakeWall(WALL_NOW)) as broker:
        upload = PositiveUpload(upload_id=new_id(), tokens=[positive(1), positive(2)])
        for _ in range(2):
            async with Client.open(broker.url) as anon:
                await anon.send(upload)
                assert (await anon.expect(PositiveAck)).count == 2
        async with Client.open(broker.url) as anon:
            await anon.send(PositiveUpload(upload_id=upload.upload_id, tokens=[positive(9)]))
            await anon.expect_error("upload_conflict", "upload_id")
    path = tmp_path / "board.sqlite3"
    assert db_rows(path, "SELECT count(*) FROM positives") == [(2,)]
    assert db_rows(path, "SELECT count(*) FROM uploads") == [(1,)]


async def test_poll_with_cursor(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW), poll_limit=2) as broker,
        Client.open(broker.url) as anon,
    ):
        await anon.send(PositiveUpload(upload_id=new_id(),
                                       tokens=[positive(n) for n in range(5)]))
        await anon.expect(PositiveAck)
        seen, cursor = [], 0
        while True:
            await anon.send(PositivesPoll(cursor=cursor))
            page = await anon.expect(Positives)
            assert len(page.tokens) <= 2
            seen += [t.token for t in page.tokens]
            cursor = page.cursor
            if not page.more:
                break
        assert seen == [token(n) for n in range(5)]
        await anon.send(PositivesPoll(cursor=cursor))
        assert (await anon.expect(Positives)).tokens == []
        await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(42)]))
        await anon.expect(PositiveAck)
        await anon.send(PositivesPoll(cursor=cursor))
        assert [t.token for t in (await anon.expect(Positives)).tokens] == [token(42)]


async def test_expired_positives_are_left_out_then_purged(tmp_path):
    wall = FakeWall(WALL_NOW)
    soon = datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    async with (
        running(tmp_path, wall=wall, purge_interval_s=0.05) as broker,
        Client.open(broker.url) as anon,
    ):
        await anon.send(PositiveUpload(upload_id=new_id(),
                                       tokens=[positive(1, soon), positive(2)]))
        assert (await anon.expect(PositiveAck)).count == 2
        wall.now = soon
        await anon.send(PositivesPoll())
        assert [t.token for t in (await anon.expect(Positives)).tokens] == [token(2)]
        path = tmp_path / "board.sqlite3"

        async def purged() -> bool:
            return db_rows(path, "SELECT token FROM positives") == [(token(2),)]

        await eventually(purged)


async def test_expiry_out_of_window_is_refused_naming_the_token(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW)) as broker,
        Client.open(broker.url) as anon,
    ):
        too_late = WALL_NOW.replace(minute=0) + timedelta(days=17)
        await anon.send(PositiveUpload(upload_id=new_id(),
                                       tokens=[positive(1), positive(2, too_late)]))
        await anon.expect_error("expiry_out_of_window", "tokens[1].expires_at")
    assert db_rows(tmp_path / "board.sqlite3", "SELECT count(*) FROM positives") == [(0,)]


# --- connection kinds (privacy invariant 4) ------------------------------------------------


async def test_upload_and_poll_on_a_session_connection_are_refused(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW)) as broker,
        Client.open(broker.url) as s,
    ):
        await s.hello()
        await s.send(PositiveUpload(upload_id=new_id(), tokens=[positive(1)]))
        await s.expect_error("wrong_connection", "type")
        await s.send(PositivesPoll())
        await s.expect_error("wrong_connection", "type")
        await s.at(0)                                        # still a working session
        assert await s.barrier() == []
    assert db_rows(tmp_path / "board.sqlite3", "SELECT count(*) FROM positives") == [(0,)]


async def test_session_messages_on_an_anonymous_connection_are_refused(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW)) as broker,
        Client.open(broker.url) as anon,
    ):
        await anon.send(PositivesPoll())
        await anon.expect(Positives)
        await anon.send(Hello(session_id=new_id(), radius_m=10.0))
        await anon.expect_error("wrong_connection", "type")
        await anon.send({"type": "position", "latitude": LAT, "longitude": LON})
        await anon.expect_error("wrong_connection", "type")
        await anon.send(PositivesPoll())
        await anon.expect(Positives)
        assert (await healthz(broker.port))[1]["sessions"] == 0


async def test_session_messages_before_hello_are_refused(tmp_path):
    async with (
        running(tmp_path) as broker,
        Client.open(broker.url) as c,
    ):
        await c.send({"type": "position", "latitude": LAT, "longitude": LON})
        await c.expect_error("hello_required", "type")
        await c.send({"type": "hello", "session_id": new_id(), "radius_m": 5, "protocol": 9})
        await c.expect_error("unsupported_protocol", "protocol")
        await c.hello()                                      # still possible


# --- bad input ---------------------------------------------------------------------------------


BAD_FRAMES = [
    ("{not json", "bad_message", None),
    ('{"type": "teleport"}', "unknown_type", "type"),
    ('{"type": "position", "latitude": 1, "longitude": 2, "altitude": 3}',
     "unknown_field", "altitude"),
    ('{"type": "position", "latitude": 91, "longitude": 2}', "bad_message", "latitude"),
    ('{"type": "position", "latitude": "north", "longitude": 2}', "bad_message", "latitude"),
    ('{"type": "hello", "session_id": "not-a-uuid", "radius_m": 5}', "bad_message",
     "session_id"),
    (json.dumps({"type": "positive_upload", "upload_id": new_id(),
                 "tokens": [{"token": "XYZ", "expires_at": "2026-03-14T04:00:00Z"}]}),
     "bad_message", "tokens[0].token"),
    ('{"type": "positives_poll", "cursor": -1}', "bad_message", "cursor"),
    ('[1, 2, 3]', "bad_message", None),
]


@pytest.mark.parametrize("kind", ["undecided", "session", "anonymous"])
async def test_bad_messages_get_typed_errors_and_the_connection_survives(tmp_path, kind):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW)) as broker,
        Client.open(broker.url) as c,
    ):
        if kind == "session":
            await c.hello()
        elif kind == "anonymous":
            await c.send(PositivesPoll())
            await c.expect(Positives)
        for raw, code, field in BAD_FRAMES:
            await c.send(raw)
            error = await c.expect_error(code, field)
            assert error.message
        await c.send(b"\x00\x01binary")
        await c.expect_error("bad_message", None)
        if kind == "anonymous":
            await c.send(PositivesPoll())
            await c.expect(Positives)
        else:
            await c.hello() if kind == "undecided" else None
            await c.at(0)
            assert await c.barrier() == []


async def test_oversized_frame_closes_only_that_client(tmp_path):
    async with (
        running(tmp_path, max_message_bytes=4096) as broker,
        Client.open(broker.url) as good, Client.open(broker.url) as bad,
    ):
        await good.hello()
        await bad.hello()
        await bad.send(Signal(peer_session_id=good.session_id, sdp_type="offer",
                              sdp="x" * 8000))
        with pytest.raises(ConnectionClosed) as closed:
            await bad.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await good.at(0)
        assert await good.barrier() == []


async def test_a_client_that_stops_reading_is_closed_and_others_are_unaffected(tmp_path):
    async with (
        # signal_burst: the flood must reach the sleeper, not the signal rate limit.
        running(tmp_path, outbox_size=8, max_message_bytes=64 * 1024,
                signal_burst=100_000) as broker,
        Client.open(broker.url) as sender,
        Client.open(broker.url, max_queue=1) as sleeper,
        Client.open(broker.url) as bystander,
    ):
        await sender.hello()
        await sleeper.hello()
        await bystander.hello()
        await sender.at(0)
        await sleeper.at(2)
        await sender.expect(Match)
        received: list = []

        async def read_all() -> None:          # the sender reads its mail until a probe
            while True:
                message = await sender.recv(timeout=30)
                if getattr(message, "code", None) == "already_hello":
                    return
                received.append(message)

        reader = asyncio.create_task(read_all())
        sent = await flood_signals(sender, sleeper.session_id,
                                   lambda: _sessions(broker.port, 2))
        await eventually(lambda: _sessions(broker.port, 2), timeout=10)
        print(f"the broker dropped the client that stopped reading after {sent} signals")
        await bystander.at(500)
        assert await bystander.barrier() == []
        # The sender is fine: signals sent after the sleeper left were refused, typed.
        await sender.send(Hello(session_id=sender.session_id, radius_m=1.0))
        await reader
        assert {(m.code, m.field) for m in received} <= {
            ("peer_unavailable", "peer_session_id")}
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await sleeper.ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_an_idle_connection_holds_no_writer_task(tmp_path):
    """Memory per connection: the writer task runs only while messages wait to be sent."""
    async with running(tmp_path) as broker, Client.open(broker.url) as a, \
            Client.open(broker.url) as b:
        await a.hello()
        await b.hello()
        await a.at(0)
        await b.at(3)
        assert [type(m) for m in await b.barrier()] == [Match]
        await a.expect(Match)
        clients = broker.backends.router._recipients   # LocalRouter: the session connections
        await eventually(lambda: _idle(clients))
        tasks = {t.get_name() for t in asyncio.all_tasks()}
        assert len(clients) == 2 and not any(c._writer for c in clients.values()), tasks


async def _idle(clients) -> bool:
    return all(c._writer is None and c._pending() == 0 for c in clients.values())


async def test_a_client_that_pipelines_requests_is_slowed_not_dropped(tmp_path):
    async with (
        # poll_burst: this is about the outbox, not the poll rate limit.
        running(tmp_path, outbox_size=4, wall=FakeWall(WALL_NOW), poll_burst=1000) as broker,
        Client.open(broker.url) as anon,
    ):
        for _ in range(300):
            await anon.send(PositivesPoll())
        for _ in range(300):
            await anon.expect(Positives)
        assert (await healthz(broker.port))[1]["connections"] == 1


async def test_a_silent_connection_is_closed(tmp_path):
    async with (
        running(tmp_path, first_message_timeout_s=0.2) as broker,
        Client.open(broker.url) as c,
    ):
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


# --- what the broker sees, logs and writes -------------------------------------------------


SCENARIO = {"wall": FakeWall(WALL_NOW), "open_declarations": False,
            "max_connections_per_address": 2, "position_rate_per_s": 1.0, "position_burst": 3,
            "upload_answer_delay_s": 0.05, "max_uploads_per_code": 1}
"""Settings of the full scenario: codes required, small caps so that every limit is hit."""


async def _scenario(broker, tmp_path) -> dict[str, list[str]]:
    """Sessions, positions, a match, signaling, refusals, rate limiting, a refused connection,
    uploads with declaration codes (accepted, refused, reused), a decoy and a poll.

    Returns every private value the broker saw, by kind, in the forms a log could show it.
    """
    open_mode = broker.settings.open_declarations
    code, unused = (issue_code(str(broker.settings.db_path), timedelta(hours=1), now=WALL_NOW)[0]
                    for _ in range(2))
    async with Client.open(broker.url) as a, Client.open(broker.url) as b:
        await a.hello()
        await b.hello()
        await a.at(0)
        await b.at(4, lon=LON + 0.00001)
        await a.expect(Match)
        await b.expect(Match)
        await a.send(Signal(peer_session_id=b.session_id, sdp_type="offer", sdp="v=0 offer"))
        await b.expect(Signal)
        await b.send(PositionLost())
        await b.send({"type": "position", "latitude": 123, "longitude": LON})
        await b.expect_error("bad_message", "latitude")
        await a.send(Signal(peer_session_id=new_id(), sdp_type="offer", sdp="v=0"))
        await a.expect_error("not_matched", "peer_session_id")
        for _ in range(3):                                   # over the burst of 3 positions
            await b.at(5, lon=LON + 0.00001)
        await b.expect_error("rate_limited", None)
        # A third connection from 127.0.0.3 is over the cap of 2: refused and closed.
        async with (Client.open(broker.url, local_addr=("127.0.0.3", 0)) as c1,
                    Client.open(broker.url, local_addr=("127.0.0.3", 0)) as c2,
                    Client.open(broker.url, local_addr=("127.0.0.3", 0)) as c3):
            await c3.expect_error("too_many_connections", None)
            capped = [c.ws.local_address for c in (c1, c2, c3)]
        async with Client.open(broker.url, local_addr=("127.0.0.2", 0)) as anon:
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(66)]))
            if open_mode:
                await anon.expect(PositiveAck)
            else:
                await anon.expect_error("code_required", "code")
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(67)],
                                           code="not a code"))
            await anon.expect_error("code_invalid", "code")
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(77)],
                                           code=code.lower()))
            await anon.expect(PositiveAck)
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(78)], code=code))
            await anon.expect_error("code_used", "code")
            await anon.send(encode_padded(
                PositiveUpload(upload_id=new_id(), tokens=[positive(79)], code=unused,
                               decoy=True), UPLOAD_SIZE_BYTES))
            await anon.expect(PositiveAck)
            await anon.send(PositivesPoll())
            await anon.expect(Positives)
            local = anon.ws.local_address
        sessions = [a.session_id, b.session_id]
    positions = [f"{LAT}", f"{LAT:.5f}", f"{north(4):.5f}", f"{LON}", f"{LON:.5f}",
                 f"{LON + 0.00001:.5f}", f"{north(5):.5f}"]
    codes = [c for one in (code, unused) for c in (
        one, one.lower(), one.replace("-", ""), code_hash(one))] + ["not a code"]
    addresses = ["127.0.0.2", "127.0.0.3"] + [
        form for host, port in [local, *capped]
        for form in (f"{host}:{port}", f"{host}, {port}", f"'{host}', {port}", str(port))]
    return {"sessions": sessions, "positions": positions,
            "tokens": [token(n) for n in (66, 67, 77, 78, 79)], "codes": codes,
            "addresses": addresses}


@pytest.mark.parametrize("declarations", ["code", "open"])
async def test_logs_never_contain_ids_positions_tokens_codes_or_addresses(
        tmp_path, caplog, declarations):
    caplog.set_level(logging.DEBUG)
    settings = {**SCENARIO, "open_declarations": declarations == "open"}
    async with running(tmp_path, **settings) as broker:
        private = await _scenario(broker, tmp_path)
    records = [r for r in caplog.records if not r.name.startswith("tests.")]
    text = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in records)
    # The logs do say things, at every level used, with counts only.
    assert "positive upload committed (1 tokens)" in text
    assert "connection opened" in text and "session started" in text
    assert "decoy upload discarded" in text
    for refusal in ("rate_limited", "code_used", "code_invalid", "not_matched"):
        assert f"refused a message: {refusal}" in text, refusal
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert any("over the per-address cap of 2" in w for w in warnings), warnings
    assert any("open declarations" in w for w in warnings) == (declarations == "open")
    assert "declarations=" + declarations in text
    assert "positions=memory board=sqlite)" in text
    for what, values in private.items():
        for value in values:
            assert value not in text, f"a {what} value appears in the log: {value}"
    assert "127.0.0." not in text


async def test_board_file_holds_no_session_id_position_code_or_address(tmp_path):
    async with running(tmp_path, **SCENARIO) as broker:
        private = await _scenario(broker, tmp_path)
        files = sorted(tmp_path.glob("board.sqlite3*"))
        assert any(f.name.endswith("-wal") for f in files)
        while_running = b"".join(f.read_bytes() for f in files)
    after = b"".join(f.read_bytes() for f in sorted(tmp_path.glob("board.sqlite3*")))
    for blob in (while_running, after):
        assert token(77).encode() in blob                       # the reading does see data
        for value in private["sessions"] + private["positions"] + private["addresses"]:
            assert value.encode() not in blob
        for value in private["codes"]:
            if len(value) != 64:                                # hashes are stored, codes not
                assert value.encode() not in blob
        for n in (66, 67, 78, 79):                              # refused and decoy: not stored
            assert token(n).encode() not in blob
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.sqlite3"]  # WAL checkpointed


async def test_recorder_sees_every_frame_with_its_connection_kind(tmp_path):
    frames: list[tuple[str, str]] = []
    async with (
        running(tmp_path, recorder=lambda k, r: frames.append((k, r)),
                wall=FakeWall(WALL_NOW)) as broker,
        Client.open(broker.url) as s, Client.open(broker.url) as anon,
    ):
        await s.send("garbage")
        await s.expect_error("bad_message", None)
        await s.hello()
        await s.at(0)
        await s.barrier()
        await anon.send(PositivesPoll())
        await anon.expect(Positives)
    kinds = [(kind, json.loads(raw)["type"] if raw.startswith("{") else raw)
             for kind, raw in frames]
    assert kinds == [("unknown", "garbage"), ("session", "hello"), ("session", "position"),
                     ("session", "hello"), ("anonymous", "positives_poll")]


async def test_stop_closes_clients_with_1001(tmp_path):
    async with (
        running(tmp_path) as broker,
        Client.open(broker.url) as a,
    ):
        await a.hello()
        stopping = asyncio.ensure_future(_exit(broker))
        with pytest.raises(ConnectionClosed) as closed:
            await a.recv(timeout=10)
        await stopping
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def _exit(broker) -> None:
    """Stop the server the way the context manager does (close, wait)."""
    broker._server.close()
    await broker._server.wait_closed()


async def test_port_in_use_raises_oserror_and_closes_the_board(tmp_path):
    async with running(tmp_path) as broker:
        settings = BrokerSettings(host="127.0.0.1", port=broker.port,
                                  db_path=tmp_path / "other.sqlite3")
        with pytest.raises(OSError):
            async with start_broker(settings):
                pass
    assert not (tmp_path / "other.sqlite3-wal").exists()


async def test_a_redis_outage_is_one_log_line_a_minute_without_traceback(
        tmp_path, caplog, own_redis):
    # A region broker whose Redis dies: every hello and position fails while it lasts; each
    # is answered unavailable and the log gets one line per kind of failure a minute, not a
    # line (or a 35-line traceback, issue 8 trial) per call.
    caplog.set_level(logging.INFO)
    async with running(tmp_path, redis_url=own_redis.url) as broker:
        own_redis.stop()
        for _ in range(3):
            async with Client.open(broker.url) as device:
                await device.send(Hello(session_id=new_id(), radius_m=30.0))
                await device.expect_error("unavailable")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("broker")]
    assert any("positions=redis board=sqlite)" in line for line in lines), lines
    failures = [line for line in lines if line.startswith("store unavailable in a store call "
                                                          "(connect)")]
    assert failures == ["store unavailable in a store call (connect): ConnectionError"], lines
    assert not any('File "' in line or "internal error" in line for line in lines), lines



async def test_healthz_is_503_naming_the_store_that_does_not_answer(tmp_path, own_redis):
    # A load balancer must stop sending devices to a broker cut off from Redis (issue 8 trial:
    # /healthz said 200 "ok" while every position failed).
    async with running(tmp_path, redis_url=own_redis.url) as broker:
        status, body = await healthz(broker.port)
        assert status == 200 and body["status"] == "ok" and "failing" not in body
        own_redis.stop()
        status, body = await healthz(broker.port)
        assert status == 503, body
        assert body["status"] == "unavailable" and body["failing"] == ["positions"]
        await asyncio.to_thread(broker.board.close)   # the board fails too
        status, body = await healthz(broker.port)
        assert (status, body["failing"]) == (503, ["positions", "board"])
