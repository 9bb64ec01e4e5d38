"""Binary positive batches, poll and signal rate limits, announcements (broker/server.py,
broker/positives.py BatchPages), through a real broker on loopback."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

from fanny_tui.protocol.batch import (
    BATCH_FORMAT,
    EndFrame,
    TokenFrame,
    decode_batch_frame,
)
from fanny_tui.protocol.messages import (
    Match,
    PositiveAck,
    Positives,
    PositivesAvailable,
    PositivesPoll,
    PositiveToken,
    PositiveUpload,
    Signal,
    encode,
)
from tests.helpers import TIME_UNIT

from .kit import EXPIRY, WALL_NOW, Client, FakeMonotonic, FakeWall, new_id, positive, running, token


async def binary_answer(client: Client, cursor: int = 0,
                        timeout: float = 5.0) -> tuple[list[bytes], EndFrame]:
    """Send a ``batch1`` poll; return the raw token frames and the end frame."""
    await client.send(PositivesPoll(cursor=cursor, accept=[BATCH_FORMAT]))
    frames = []
    while True:
        raw = await asyncio.wait_for(client.ws.recv(), timeout)
        assert isinstance(raw, bytes), f"expected a binary frame, got {raw!r}"
        decoded = decode_batch_frame(raw)
        if isinstance(decoded, EndFrame):
            return frames, decoded
        frames.append(raw)


def tokens_of(frames: list[bytes]) -> list[str]:
    out = []
    for raw in frames:
        decoded = decode_batch_frame(raw)
        assert isinstance(decoded, TokenFrame)
        out += decoded.hex_tokens()
    return out


async def test_one_binary_poll_streams_the_whole_board_in_frames(tmp_path):
    later = EXPIRY.replace(hour=9)
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW), batch_frame_tokens=4) as broker,
        Client.open(broker.url) as anon,
    ):
        await anon.send(PositiveUpload(upload_id=new_id(), tokens=[
            positive(n, later if n % 2 else EXPIRY) for n in range(10)]))
        await anon.expect(PositiveAck)
        frames, end = await binary_answer(anon)
        # Frames follow the board's order; inside one, tokens are grouped by expiry.
        assert [sorted(tokens_of([f])) for f in frames] == [
            [token(n) for n in range(0, 4)], [token(n) for n in range(4, 8)],
            [token(8), token(9)]]
        assert [decode_batch_frame(f).cursor for f in frames] == [4, 8, 10]
        assert end == EndFrame(cursor=10, more=False)
        hours = {h for f in frames for h, _ in decode_batch_frame(f).groups}
        assert hours == {int(EXPIRY.timestamp()) // 3600, int(later.timestamp()) // 3600}
        # Incremental: from a cursor inside a frame's range, only what follows.
        frames, end = await binary_answer(anon, cursor=6)
        assert sorted(tokens_of(frames)) == [token(n) for n in range(6, 10)]
        assert end.cursor == 10
        # The JSON form is still answered to a poll that does not accept batch1.
        await anon.send(PositivesPoll(cursor=8))
        page = await anon.expect(Positives)
        assert [t.token for t in page.tokens] == [token(8), token(9)]


async def test_a_poll_with_nothing_new_costs_under_200_bytes(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW)) as broker,
        Client.open(broker.url) as anon,
    ):
        await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(1)]))
        await anon.expect(PositiveAck)
        request = encode(PositivesPoll(cursor=1, accept=[BATCH_FORMAT])).encode()
        frames, end = await binary_answer(anon, cursor=1)
        assert frames == [] and end.cursor == 1
        # Payloads plus WebSocket framing (client: 2 + 4-byte mask; broker: 2).
        assert len(request) + 6 + 11 + 2 < 200


async def test_bytes_per_token_on_a_binary_poll(tmp_path):
    n = 4000
    tokens = [PositiveToken(token=os.urandom(32).hex(), expires_at=EXPIRY.replace(hour=h % 24))
              for h in range(n)]
    async with running(tmp_path, wall=FakeWall(WALL_NOW)) as broker:
        broker.board.add(new_id(), tokens, WALL_NOW, code_required=False)
        async with Client.open(broker.url) as anon:
            frames, _ = await binary_answer(anon)
    assert len(tokens_of(frames)) == n
    assert sum(len(f) for f in frames) / n <= 33.0


async def test_frames_are_encoded_once_and_served_to_every_poller(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW), batch_frame_tokens=3) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
    ):
        await a.send(PositiveUpload(upload_id=new_id(), tokens=[positive(n) for n in range(7)]))
        await a.expect(PositiveAck)
        first, _ = await binary_answer(a)
        encoded = broker.pages.encoded
        assert encoded == 3                                  # (0,3] (3,6] (6,7]
        second, _ = await binary_answer(b)
        assert second == first
        assert broker.pages.encoded == encoded               # every frame from the cache
        # Up-to-date pollers share the newest range too.
        await a.send(PositiveUpload(upload_id=new_id(), tokens=[positive(100)]))
        await a.expect(PositiveAck)
        new_a, _ = await binary_answer(a, cursor=7)
        new_b, _ = await binary_answer(b, cursor=7)
        assert tokens_of(new_a) == tokens_of(new_b) == [token(100)]
        assert broker.pages.encoded == encoded + 1


async def test_a_purge_drops_the_cached_frames(tmp_path):
    wall = FakeWall(WALL_NOW)
    soon = datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    async with (
        running(tmp_path, wall=wall, purge_interval_s=0.05) as broker,
        Client.open(broker.url) as anon,
    ):
        await anon.send(PositiveUpload(upload_id=new_id(),
                                       tokens=[positive(1, soon), positive(2)]))
        await anon.expect(PositiveAck)
        frames, _ = await binary_answer(anon)
        assert sorted(tokens_of(frames)) == [token(1), token(2)]
        encoded = broker.pages.encoded
        wall.now = soon
        deadline = asyncio.get_running_loop().time() + 5 * TIME_UNIT
        while broker.board.count() != 1:                     # the purge ran
            assert asyncio.get_running_loop().time() < deadline, "no purge"
            await asyncio.sleep(0.02)
        frames, end = await binary_answer(anon)
        assert tokens_of(frames) == [token(2)]
        assert broker.pages.encoded > encoded                 # encoded again, not the stale one
        assert end.cursor == 2


async def test_polls_are_rate_limited_per_connection(tmp_path):
    clock = FakeMonotonic()
    async with (
        running(tmp_path, mono=clock, poll_rate_per_s=0.5, poll_burst=2) as broker,
        Client.open(broker.url) as anon,
    ):
        for _ in range(2):
            await binary_answer(anon)
        await anon.send(PositivesPoll(accept=[BATCH_FORMAT]))
        await anon.expect_error("rate_limited")
        await anon.send(PositivesPoll())                      # the JSON form as well
        await anon.expect_error("rate_limited")
        clock.advance(2.0)                                    # one poll refilled
        await binary_answer(anon)


async def test_signals_are_rate_limited_per_connection(tmp_path):
    clock = FakeMonotonic()
    async with (
        running(tmp_path, mono=clock, signal_rate_per_s=1.0, signal_burst=2,
                position_timeout_s=1e6) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
    ):
        await a.hello()
        await b.hello()
        await a.at(0)
        await b.at(3)
        await a.expect(Match)
        await b.expect(Match)
        sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"
        offer = Signal(peer_session_id=b.session_id, sdp_type="offer", sdp=sdp)
        for _ in range(2):
            await a.send(offer)
            await b.expect(Signal)
        await a.send(offer)
        await a.expect_error("rate_limited")
        assert await b.barrier() == []                        # not relayed
        clock.advance(1.0)
        await a.send(offer)
        await b.expect(Signal)


async def test_every_session_gets_the_same_announcement_of_new_positives(tmp_path):
    async with (
        running(tmp_path, wall=FakeWall(WALL_NOW), announce_interval_s=0.5 * TIME_UNIT) as broker,
        Client.open(broker.url) as a, Client.open(broker.url) as b,
        Client.open(broker.url) as anon,
    ):
        await a.hello()
        await b.hello()
        await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(1), positive(2)]))
        await anon.expect(PositiveAck)
        raw_a = await a.recv_text()
        raw_b = await b.recv_text()
        assert raw_a == raw_b == encode(PositivesAvailable(cursor=2))
        # Two commits within the interval share one announcement, with the newest cursor.
        for n in (3, 4):
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(n)]))
            await anon.expect(PositiveAck)
        assert await a.expect(PositivesAvailable, timeout=5 * TIME_UNIT) == \
            PositivesAvailable(cursor=4)
        assert await a.barrier() == []
        # A decoy or an empty upload announces nothing; nor does an anonymous connection hear it.
        await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(5)], decoy=True))
        await anon.expect(PositiveAck)
        await asyncio.sleep(0)
        await anon.send(PositivesPoll(cursor=4))
        assert (await anon.expect(Positives)).tokens == []
        await asyncio.sleep(0.6 * TIME_UNIT)   # past the interval: an announcement would be out
        assert await b.barrier() == [PositivesAvailable(cursor=4)]


async def test_a_large_board_streams_in_bounded_frames(tmp_path):
    n = 100_000
    tokens = [PositiveToken(token=os.urandom(32).hex(), expires_at=EXPIRY) for _ in range(n)]
    async with running(tmp_path, wall=FakeWall(WALL_NOW)) as broker:
        broker.board.add(new_id(), tokens, WALL_NOW, code_required=False)
        async with Client.open(broker.url) as anon:
            frames, end = await binary_answer(anon, timeout=30 * TIME_UNIT)
    assert end.cursor == n
    assert all(decode_batch_frame(f).token_count <= 8192 for f in frames)
    assert sorted(tokens_of(frames)) == sorted(t.token for t in tokens)


async def test_a_pending_announcement_does_not_hold_up_the_shutdown(tmp_path):
    loop = asyncio.get_running_loop()
    async with running(tmp_path, wall=FakeWall(WALL_NOW), announce_interval_s=600.0) as broker:
        async with Client.open(broker.url) as s, Client.open(broker.url) as anon:
            await s.hello()
            for n in (1, 2):                     # the second waits out the interval
                await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(n)]))
                await anon.expect(PositiveAck)
            assert await s.expect(PositivesAvailable) == PositivesAvailable(cursor=1)
        began = loop.time()
    assert loop.time() - began < 5 * TIME_UNIT
