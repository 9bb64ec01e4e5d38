"""End to end on loopback: a real broker, two engines, real aiortc peers, real SQLite stores.

Covers privacy invariants 3, 4 and 6, and the issue's flows: both stores hold the same token
(= SHA-256 over the sorted contact IDs), the broker never saw a contact ID and saw tokens only in
positive uploads; a positive declaration alerts the other device within two poll intervals and
deletes its matched token; the positive's store empties only after the ack; with the broker down
nothing is deleted and the upload is retried.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.server import BrokerSettings, start_broker
from fanny_tui.gps import FixedSource
from fanny_tui.protocol.tokens import craft_token
from fanny_tui.store import TokenStore

from .helpers import LAT, LON, METRE_LAT, device_config, running_device

POLL_S = 1.0


class Recorder:
    """Every frame the broker received, with the connection kind."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, str]] = []
        self.hooks: list = []

    def __call__(self, kind: str, raw: str) -> None:
        self.frames.append((kind, raw))
        for hook in self.hooks:
            hook(kind, raw)


def _settings(tmp_path: Path, port: int = 0) -> BrokerSettings:
    return BrokerSettings(host="127.0.0.1", port=port, db_path=tmp_path / "broker.sqlite3",
                          cooldown_s=600.0, position_timeout_s=10.0)


async def _witnessed_pair(tmp_path, broker_url):
    """Two devices 3 m apart; returns the running context managers' devices after both stored."""
    config = device_config(broker_url, poll_interval_s=POLL_S)
    a = running_device(config, tmp_path / "a", FixedSource(LAT, LON, 4.0, interval_s=0.2))
    b = running_device(config, tmp_path / "b",
                       FixedSource(LAT + 3 * METRE_LAT, LON, 4.0, interval_s=0.2))
    return a, b


async def test_witness_then_positive_then_exposure(tmp_path):
    recorder = Recorder()
    async with start_broker(_settings(tmp_path), recorder=recorder) as broker:
        ctx_a, ctx_b = await _witnessed_pair(tmp_path, broker.url)
        async with ctx_a as a, ctx_b as b:
            stored_a = await a.wait_event("token_stored")
            stored_b = await b.wait_event("token_stored")
            # Both stores hold the same token, SHA-256 over the sorted contact IDs (paper 3, 4).
            expected = craft_token(a.engine._contact_id, b.engine._contact_id)
            assert stored_a.token == stored_b.token == expected
            store_a = TokenStore.in_dir(a.data_dir)
            store_b = TokenStore.in_dir(b.data_dir)
            assert [t.token for t in store_a.tokens()] == [expected]
            assert [t.token for t in store_b.tokens()] == [expected]
            # Expiry on the deletion hour (invariant 5), 15 days ahead.
            assert store_a.tokens()[0].expires_at.minute == 0
            assert store_a.tokens()[0].expires_at.hour == 4

            # Invariant 6: when the broker receives the upload, A still holds its token.
            held_at_upload: list[int] = []
            recorder.hooks.append(lambda kind, raw: held_at_upload.append(store_a.count())
                                  if '"positive_upload"' in raw else None)
            count = await a.engine.declare_positive()
            assert count == 1
            declared = await a.wait_event("positive_declared")
            assert declared.count == 1
            assert held_at_upload == [1]
            assert store_a.count() == 0                     # deleted once acknowledged

            # B alerts within two poll intervals, its matched token deleted (paper 4, step 4).
            loop = asyncio.get_running_loop()
            started = loop.time()
            alert = await b.wait_event("exposure_alert", timeout=2 * POLL_S + 1.0)
            assert alert.count == 1
            assert loop.time() - started <= 2 * POLL_S + 1.0
            assert store_b.count() == 0
            assert not a.of("exposure_alert")               # A's own tokens never alert A
            store_a.close()
            store_b.close()

    # Invariant 3: no contact ID ever reached the broker; invariant 4: tokens only in uploads
    # and uploads never on a session connection.
    contact_ids = {a.engine._contact_id, b.engine._contact_id}
    session_ids = {a.engine._session_id, b.engine._session_id}
    assert recorder.frames, "the recorder saw nothing"
    for kind, raw in recorder.frames:
        assert not any(cid in raw for cid in contact_ids), raw
        message_type = json.loads(raw)["type"]
        if expected in raw:
            assert (kind, message_type) == ("anonymous", "positive_upload"), raw
        if message_type == "positive_upload":
            assert kind == "anonymous"
            assert not any(sid in raw for sid in session_ids)
    assert any(json.loads(raw)["type"] == "signal" for _, raw in recorder.frames)


async def test_broker_down_keeps_tokens_and_retries(tmp_path, unused_tcp_port):
    settings = _settings(tmp_path, port=unused_tcp_port)
    async with start_broker(settings) as broker:
        ctx_a, ctx_b = await _witnessed_pair(tmp_path, broker.url)
        a = await ctx_a.__aenter__()
        try:
            async with ctx_b as b:
                await a.wait_event("token_stored")
                await b.wait_event("token_stored")
        except BaseException:
            await ctx_a.__aexit__(None, None, None)
            raise
    # The broker is stopped: the declaration must keep every token and retry.
    try:
        store = TokenStore.in_dir(a.data_dir)
        await a.engine.declare_positive()
        pending = await a.wait_event("positive_pending")
        assert pending.count == 1
        assert store.count() == 1 and list(store.pending_uploads())
        await asyncio.sleep(1.5)
        assert store.count() == 1                           # still there after retries
        assert not a.of("positive_declared")
        # The broker comes back on the same port: the retry succeeds, then deletion.
        async with start_broker(settings) as broker:
            await a.wait_event("positive_declared", timeout=90)
            assert store.count() == 0
            board_tokens, _, _ = broker.board.since(0, 100, datetime.now(UTC))
            assert len(board_tokens) == 1
        store.close()
    finally:
        await ctx_a.__aexit__(None, None, None)


@pytest.fixture
def unused_tcp_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
