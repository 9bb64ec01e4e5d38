"""End to end on loopback: a real broker, two engines, real aiortc peers, real SQLite stores.

Covers privacy invariants 3, 4 and 6, and the issue's flows: both stores hold the same token
(= SHA-256 over the sorted contact IDs), the broker never saw a contact ID and saw tokens only in
positive uploads; a positive declaration (with a declaration code issued by the broker's
operator) alerts the other device within two poll intervals and deletes its matched token; the
positive's store empties only after the ack; with the broker down nothing is deleted and the
upload is retried, with its code, even after the device restarts; a refused code keeps every
token on the device and is not retried; decoy uploads look like real ones on the wire and change
nothing; a full or read-only token store is an ``error`` event, never a crash or a lost token.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.__main__ import create_board, issue_code
from broker.server import BrokerSettings, start_broker
from fanny_tui.config import Config
from fanny_tui.engine import MAX_CONCURRENT_HANDSHAKES
from fanny_tui.positives import declare, upload_pending
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.protocol.messages import UPLOAD_SIZE_BYTES, PositiveToken
from fanny_tui.protocol.tokens import craft_token
from fanny_tui.store import StoreError, TokenStore

from .helpers import (
    LAT,
    LON,
    METRE_LAT,
    TIME_UNIT,
    MovableSource,
    device_config,
    device_pair,
    fixed_at,
    free_port,
    running_device,
)

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


def _settings(tmp_path: Path, port: int = 0, **overrides: Any) -> BrokerSettings:
    values: dict[str, Any] = {"cooldown_s": 600.0, "position_timeout_s": 10.0,
                              "upload_answer_delay_s": 0.05}
    values.update(overrides)
    return BrokerSettings(host="127.0.0.1", port=port, db_path=tmp_path / "broker.sqlite3",
                          **values)


def _code(tmp_path: Path) -> str:
    """A declaration code, issued as ``fanny-broker issue-code --db`` does."""
    code, _ = issue_code(str(tmp_path / "broker.sqlite3"), timedelta(hours=1))
    return code


async def test_witness_then_positive_then_exposure(tmp_path):
    recorder = Recorder()
    async with start_broker(_settings(tmp_path), recorder=recorder) as broker:
        config = device_config(broker.url, poll_interval_s=POLL_S)
        async with device_pair(tmp_path, config) as (a, b):
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
            # The declaration rotates A's IDs: A and B, still side by side, witness again
            # under new IDs (a new token), so the checks below name the declared token.
            contact_ids = {a.engine._contact_id, b.engine._contact_id}
            session_ids = {a.engine._session_id, b.engine._session_id}
            count = await a.engine.declare_positive(_code(tmp_path))
            assert count == 1
            declared = await a.wait_event("positive_declared")
            assert declared.count == 1
            assert held_at_upload == [1]
            assert expected not in {t.token for t in store_a.tokens()}  # deleted once acked

            # B alerts within two poll intervals, its matched token deleted (paper 4, step 4).
            loop = asyncio.get_running_loop()
            started = loop.time()
            alert = await b.wait_event("exposure_alert", timeout=2 * POLL_S + 1.0)
            assert alert.count == 1
            # The alert carries the matched token's stored contact measures: those of the
            # contact B measured with A (closed when A's declaration rotated A's IDs).
            [closed] = [c for c in b.of("contact_closed") if c.peer == stored_b.peer]
            assert closed.token_stored and closed.contact.samples > 0
            [shown] = alert.contacts
            assert shown.samples == closed.contact.samples
            assert shown.duration_s == pytest.approx(closed.contact.duration_s, abs=0.002)
            assert shown.closest_m == pytest.approx(closed.contact.closest_m)
            assert shown.median_m == pytest.approx(closed.contact.median_m)
            assert 2.5 < shown.closest_m < 3.5   # the devices stood 3 m apart
            assert loop.time() - started <= 2 * POLL_S + 1.0
            assert expected not in {t.token for t in store_b.tokens()}
            assert not a.of("exposure_alert")               # A's own tokens never alert A
            store_a.close()
            store_b.close()

    # Invariant 3: no contact ID ever reached the broker; invariant 4: tokens only in uploads
    # and uploads never on a session connection.
    contact_ids |= {a.engine._contact_id, b.engine._contact_id}
    session_ids |= {a.engine._session_id, b.engine._session_id}
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


async def test_broker_down_keeps_tokens_and_retries_after_a_restart(tmp_path):
    port = free_port()
    settings = _settings(tmp_path, port=port)
    create_board(tmp_path / "broker.sqlite3")          # as an operator does, once
    code = _code(tmp_path)                              # issued while the broker is down
    tokens = _stock(tmp_path / "a", 1)
    url = f"ws://127.0.0.1:{port}"
    async with running_device(_one_device_config(url), tmp_path / "a", fixed_at()) as a:
        await a.wait_event("broker_disconnected")
        assert await a.engine.declare_positive(code) == 1
        pending = await a.wait_event("positive_pending")
        assert pending.count == 1
        await a.wait_for(lambda e: e.event == "positive_pending" and e is not pending)
        assert _held(a.data_dir) == dict.fromkeys(tokens, True)    # kept after retries
        assert not a.of("positive_declared")
    # The device restarts, then the broker comes back: the pending upload and its code come
    # back from the store (the broker requires the code), and the retry is acknowledged.
    async with running_device(_one_device_config(url), tmp_path / "a", fixed_at()) as a:
        await a.wait_event("positive_pending")
        async with start_broker(settings) as broker:
            declared = await a.wait_event("positive_declared", timeout=60)
            assert declared.count == 1
            assert _held(a.data_dir) == {}
            board_tokens, _, _ = broker.board.since(0, 100, datetime.now(UTC))
            assert {t.token for t in board_tokens} == tokens


def _one_device_config(url: str, **privacy: Any) -> Config:
    return device_config(url, privacy=privacy, poll_interval_s=POLL_S)


def _stock(data_dir: Path, count: int) -> set[str]:
    store = TokenStore.in_dir(data_dir)
    tokens = {os.urandom(32).hex() for _ in range(count)}
    for token in tokens:
        store.add(token, expiry_for(datetime.now(UTC)))
    store.close()
    return tokens


def _held(data_dir: Path) -> dict[str, bool]:
    store = TokenStore.in_dir(data_dir, read_only=True)
    try:
        return {t.token: t.pending for t in store.tokens()}
    finally:
        store.close()


async def test_a_refused_code_keeps_every_token_and_is_not_retried(tmp_path):
    recorder = Recorder()
    tokens = _stock(tmp_path / "a", 3)
    async with start_broker(_settings(tmp_path), recorder=recorder) as broker, \
            running_device(_one_device_config(broker.url), tmp_path / "a", fixed_at()) as a:
        with pytest.raises(ValueError, match="16 characters"):
            await a.engine.declare_positive("K7QF-3M9X-TR2B")      # a typo: nothing happens
        assert _held(a.data_dir) == dict.fromkeys(tokens, False)

        assert await a.engine.declare_positive("K7QF-3M9X-TR2B-8HJD") == 3   # never issued
        refused = await a.wait_event("positive_refused")
        assert (refused.reason, refused.count) == ("code_invalid", 3)
        assert _held(a.data_dir) == dict.fromkeys(tokens, False)   # kept, free for a new try
        # Two polls later (a clock of the engine's own), still a single attempt.
        polled = len(a.of("positives_polled"))
        await a.wait_for(lambda e: len(a.of("positives_polled")) >= polled + 2)
        assert not a.of("positive_pending") and not a.of("positive_declared")

        assert await a.engine.declare_positive(_code(tmp_path)) == 3
        declared = await a.wait_event("positive_declared")
        assert declared.count == 3 and _held(a.data_dir) == {}
        board, _, _ = broker.board.since(0, 100, datetime.now(UTC))
        assert {t.token for t in board} == tokens
    uploads = [json.loads(raw) for _, raw in recorder.frames if '"positive_upload"' in raw]
    assert [u["code"] for u in uploads] == ["K7QF3M9XTR2B8HJD", uploads[1]["code"]]
    assert uploads[1]["code"] != uploads[0]["code"]


async def test_decoys_look_like_uploads_and_change_nothing(tmp_path):
    recorder = Recorder()
    tokens = _stock(tmp_path / "a", 2)
    async with start_broker(_settings(tmp_path), recorder=recorder) as broker:
        config = _one_device_config(broker.url, decoy_uploads=True, decoy_interval_s=1.0)
        async with running_device(config, tmp_path / "a", fixed_at()) as a:
            def decoys() -> list[str]:
                return [raw for kind, raw in recorder.frames
                        if kind == "anonymous" and '"decoy":true' in raw]

            await a.wait_for(lambda e: len(decoys()) >= 2, timeout=60)
            assert _held(a.data_dir) == dict.fromkeys(tokens, False)   # nothing local changed
            assert not a.of("positive_declared") and not a.of("error")
            assert await a.engine.declare_positive(_code(tmp_path)) == 2
            await a.wait_event("positive_declared")
        board, _, _ = broker.board.since(0, 1000, datetime.now(UTC))
        assert {t.token for t in board} == tokens                  # decoys were discarded
    real = [raw for _, raw in recorder.frames
            if '"positive_upload"' in raw and '"decoy":false' in raw]
    assert len(real) == 1
    sizes = {len(raw.encode()) for raw in [*decoys(), *real]}
    assert sizes == {UPLOAD_SIZE_BYTES}                             # one size for all
    assert all(kind == "anonymous" for kind, raw in recorder.frames if '"decoy"' in raw)
    print(f"{len(decoys())} decoys and 1 real upload, all {UPLOAD_SIZE_BYTES} bytes")


def _degrade(store: TokenStore, pragma: str) -> None:
    """Change the engine's own connection: ``max_page_count`` (disk full), ``query_only``."""
    with store._lock:
        store._db.execute(f"PRAGMA {pragma}")


def _fill(store: TokenStore) -> int:
    """Let the file not grow any more, then store tokens until SQLite says it is full."""
    with store._lock:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    _degrade(store, f"max_page_count = {pages}")
    added = 0
    expires = expiry_for(datetime.now(UTC))
    with pytest.raises(StoreError, match="database or disk is full"):
        while True:
            store.add(os.urandom(32).hex(), expires)
            added += 1
    return added


async def test_disk_full_fails_the_witness_cleanly_and_recovers(tmp_path):
    async with start_broker(_settings(tmp_path, cooldown_s=1.0)) as broker:
        config = device_config(broker.url, poll_interval_s=POLL_S)
        async with running_device(config, tmp_path / "a", fixed_at()) as a:
            store = a.engine._store
            assert store is not None
            _fill(store)
            before = {t.token for t in store.tokens()}
            async with running_device(config, tmp_path / "b", fixed_at(3.0)) as b:
                failed = await a.wait_event("handshake_failed")
                assert failed.reason.startswith("store_failed"), failed.reason
                error = await a.wait_event("error")
                assert "database or disk is full" in error.message
                assert "tokens.sqlite3" in error.message
                assert {t.token for t in store.tokens()} == before      # nothing lost or added
                # B stored only if A was the initiator (it acked first); never half a token.
                assert all(e.event == "token_stored" or e.reason.startswith("peer_aborted")
                           for e in b.events if e.event in ("handshake_failed", "token_stored"))
                # Room again: the pair meets again after the cool-down and A stores the token.
                _degrade(store, "max_page_count = 1073741823")
                stored = await a.wait_event("token_stored", timeout=60)
                assert stored.token in {t.token for t in store.tokens()}
                assert before < {t.token for t in store.tokens()}
            assert a.engine.broker_connected                          # it never stopped
        check = TokenStore.in_dir(tmp_path / "a")
        assert check._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert before < {t.token for t in check.tokens()}
        check.close()


async def test_a_read_only_store_is_an_error_not_a_crash(tmp_path):
    tokens = _stock(tmp_path / "a", 2)
    async with start_broker(_settings(tmp_path)) as broker, \
            running_device(_one_device_config(broker.url), tmp_path / "a", fixed_at()) as a:
        await a.wait_event("positives_polled")
        store = a.engine._store
        assert store is not None
        _degrade(store, "query_only = 1")              # the file system went read-only
        with pytest.raises(StoreError, match="readonly"):
            await a.engine.declare_positive(_code(tmp_path))
        now = datetime.now(UTC)                         # someone else's positive is published:
        broker.board.add(os.urandom(16).hex(), [PositiveToken(token=os.urandom(32).hex(),
                         expires_at=expiry_for(now))], now, code_required=False)
        error = await a.wait_event("error")             # the next poll cannot save its cursor
        assert "readonly" in error.message and "\n" not in error.message
        assert _held(a.data_dir) == dict.fromkeys(tokens, False)
        polled = len(a.of("positives_polled"))
        errors = len(a.of("error"))
        await a.wait_for(lambda e: len(a.of("error")) >= errors + 1)  # still polling
        assert len(a.of("positives_polled")) == polled
        _degrade(store, "query_only = 0")               # writable again: it carries on
        assert await a.engine.declare_positive(_code(tmp_path)) == 2
        await a.wait_event("positive_declared")
        assert _held(a.data_dir) == {}


async def test_a_read_only_store_still_raises_the_exposure_alert_once(tmp_path):
    """The store cannot record a match, but the tester must still learn of the exposure."""
    tokens = sorted(_stock(tmp_path / "a", 2))
    async with start_broker(_settings(tmp_path)) as broker, \
            running_device(_one_device_config(broker.url), tmp_path / "a", fixed_at()) as a:
        await a.wait_event("positives_polled")
        _degrade(a.engine._store, "query_only = 1")     # the file system went read-only
        positive = TokenStore.in_dir(tmp_path / "positive")   # the contact, declaring
        positive.add(tokens[0], expiry_for(datetime.now(UTC)))
        declare(positive, _code(tmp_path))
        await upload_pending(positive, broker.url)
        positive.close()
        alert = await a.wait_event("exposure_alert", timeout=10)
        assert alert.count == 1
        errors = len(a.of("error"))
        await a.wait_for(lambda e: len(a.of("error")) >= errors + 2)   # two more polls
        assert len(a.of("exposure_alert")) == 1                        # alerted once
        assert _held(a.data_dir) == dict.fromkeys(tokens, False)       # nothing lost
        _degrade(a.engine._store, "query_only = 0")


def test_position_message_caps_a_nonsense_accuracy():
    from fanny_tui.engine import position_message
    from fanny_tui.events import GpsFix
    from fanny_tui.protocol.messages import decode_client_message, encode

    fix = GpsFix(latitude=LAT, longitude=LON, accuracy_m=3.0e7, mode=3)
    sent = decode_client_message(encode(position_message(fix)))   # the broker accepts it
    assert sent.accuracy_m == 100_000.0
    assert position_message(GpsFix(LAT, LON, None, 2)).accuracy_m is None


async def test_a_running_engine_sends_a_declaration_made_by_another_process(tmp_path):
    """`fanny-tui declare-positive` on the store of a running app: the app sends it."""
    tokens = _stock(tmp_path / "a", 2)
    async with start_broker(_settings(tmp_path)) as broker, \
            running_device(_one_device_config(broker.url), tmp_path / "a", fixed_at()) as a:
        await a.wait_event("positives_polled")
        other = TokenStore.in_dir(tmp_path / "a")            # as another process would
        declare(other, _code(tmp_path))
        other.close()
        declared = await a.wait_event("positive_declared", timeout=3 * POLL_S + 5)
        assert declared.count == len(tokens)
        assert _held(a.data_dir) == {}


# --- the narrow contact, measured peer to peer (issue 6, point 1) ------------------------------


DATA_CHANNEL_TYPES = {"peer_hello", "peer_position", "heartbeat", "token", "ack", "close",
                      "abort", "contact_id"}


CONTACT_MAX_SPEED_MPS = 1000.0
"""The devices' and the broker's bound in the contact tests: they move a device 200 m at once
(the jump rule is tested in tests/test_contact.py, tests/test_handshake.py and
tests/broker/test_state.py)."""


def _contact_config(broker_url: str, min_contact_s: float):  # type: ignore[no-untyped-def]
    return device_config(broker_url, poll_interval_s=POLL_S, radius_m=15.0,
                         position_interval_s=0.2, min_contact_s=min_contact_s,
                         contact_gap_s=1.0 * TIME_UNIT, max_speed_mps=CONTACT_MAX_SPEED_MPS)


async def test_token_after_min_contact_measured_peer_to_peer_then_the_pair_parts(tmp_path):
    min_contact = 1.5 * TIME_UNIT
    recorder = Recorder()
    async with start_broker(_settings(tmp_path, max_speed_mps=CONTACT_MAX_SPEED_MPS),
                            recorder=recorder) as broker:
        config = _contact_config(broker.url, min_contact)
        walker = MovableSource(LAT + 3 * METRE_LAT, LON, 4.0)
        async with (
            running_device(config, tmp_path / "a", fixed_at(interval_s=0.1)) as a,
            running_device(config, tmp_path / "b", walker) as b,
        ):
            stored = [await d.wait_event("token_stored", timeout=20 * TIME_UNIT)
                      for d in (a, b)]
            for device, event in zip((a, b), stored, strict=True):
                # Not at the first witness: only after min_contact_s within the radius.
                assert event.contact is not None and event.contact.duration_s >= min_contact
                assert event.match_to_token_s is not None
                assert event.match_to_token_s >= min_contact
                opened = device.of("channel_open")
                assert len(opened) == 1
                assert (opened[0].local_candidate, opened[0].remote_candidate) == ("host", "host")
                updates = device.of("peer_update")
                assert updates, "positions were exchanged over the data channel"
                assert all(2.5 < u.distance_m < 3.5 and u.within == "in" for u in updates)
                assert max(u.within_s for u in updates) >= min_contact
            assert stored[0].token == stored[1].token == craft_token(a.engine._contact_id,
                                                                     b.engine._contact_id)
            # The contact goes on (heartbeats, positions) until B walks away, and it holds no
            # handshake slot: those cover the establishment only.
            assert not a.of("contact_closed") and not b.of("contact_closed")
            for device in (a, b):
                assert device.engine._handshake_slots.free == MAX_CONCURRENT_HANDSHAKES
            walker.move_to(LAT + 200 * METRE_LAT, LON)
            closed = [await d.wait_event("contact_closed", timeout=10 * TIME_UNIT)
                      for d in (a, b)]
            assert {c.reason for c in closed} <= {"parted", "peer_closed"}
            assert "parted" in {c.reason for c in closed}
            for event in closed:
                assert event.token_stored
                assert event.contact.duration_s >= min_contact
                assert event.contact.closest_m is not None and event.contact.closest_m < 3.5
            # Both stores hold the token with the contact's final measures.
            for device, event in zip((a, b), closed, strict=True):
                store = TokenStore.in_dir(device.data_dir)
                [token] = store.tokens()
                store.close()
                assert token.token == stored[0].token and token.meetings == 1
                assert token.contact is not None
                assert token.contact.duration_s == pytest.approx(event.contact.duration_s,
                                                                 abs=0.01)
                assert token.contact.samples == event.contact.samples > 0
                assert token.contact.closest_m == pytest.approx(event.contact.closest_m)

    # Positions and contact IDs travelled peer to peer only: no data channel message, no
    # contact ID and no position in any signal passed through the broker.
    contact_ids = {a.engine._contact_id, b.engine._contact_id}
    assert recorder.frames
    for _kind, raw in recorder.frames:
        message = json.loads(raw)
        assert message["type"] not in DATA_CHANNEL_TYPES, raw
        assert not any(cid in raw for cid in contact_ids), raw
        if message["type"] == "signal":
            assert "latitude" not in raw and "longitude" not in raw


async def test_a_pair_that_parts_before_min_contact_leaves_nothing(tmp_path):
    async with start_broker(_settings(tmp_path, max_speed_mps=CONTACT_MAX_SPEED_MPS)) as broker:
        config = _contact_config(broker.url, min_contact_s=30.0)
        walker = MovableSource(LAT + 3 * METRE_LAT, LON, 4.0)
        async with (
            running_device(config, tmp_path / "a", fixed_at(interval_s=0.1)) as a,
            running_device(config, tmp_path / "b", walker) as b,
        ):
            for device in (a, b):
                await device.wait_for(lambda e: e.event == "peer_update" and e.within == "in",
                                      timeout=20 * TIME_UNIT)
            walker.move_to(LAT + 200 * METRE_LAT, LON)
            closed = [await d.wait_event("contact_closed", timeout=10 * TIME_UNIT)
                      for d in (a, b)]
            for device, event in zip((a, b), closed, strict=True):
                assert not event.token_stored
                assert event.contact.duration_s < 30.0
                assert not device.of("token_stored") and not device.of("handshake_failed")
                store = TokenStore.in_dir(device.data_dir)
                assert store.tokens() == []
                store.close()


class OutlierSource:
    """A receiver 200 m north of ``LAT, LON`` that gives one outlier next to it, stays north,
    then comes really near after a pause long enough for the move to be plausible."""

    def __init__(self, outlier_north_m: float, max_speed_mps: float) -> None:
        self.outlier_north_m = outlier_north_m
        self.pause_s = 1.5 * 200.0 / max_speed_mps   # 1.5 x the time the real move needs
        self.arriving = asyncio.Event()

    async def stream(self):  # type: ignore[no-untyped-def]
        from fanny_tui.events import GpsFix

        def fix(north_m: float) -> GpsFix:
            return GpsFix(latitude=LAT + north_m * METRE_LAT, longitude=LON, accuracy_m=3.0,
                          mode=3, time=datetime.now(UTC))

        # One fix every 0.5 s, the engine's positions every 0.1 s: a fix the engine kept would
        # reach the broker several times.
        for north_m in (200.0, 200.0, self.outlier_north_m, 200.0, 200.0, 200.0):
            yield fix(north_m)
            await asyncio.sleep(0.5)
        await asyncio.sleep(self.pause_s)
        self.arriving.set()
        while True:
            yield fix(3.0)
            await asyncio.sleep(0.5)


async def test_a_single_gps_jump_never_reaches_the_broker_nor_makes_a_contact(tmp_path):
    """One outlier of B's receiver next to A (197 m in 0.5 s, over ``max_speed_mps``): the
    device rejects it before the broker sees it, so no match and no token (with the default
    ``min_contact_s`` 0 the broker's match is the witness). B really arriving later matches."""
    recorder = Recorder()
    max_speed = 50.0
    async with start_broker(_settings(tmp_path, max_speed_mps=max_speed),
                            recorder=recorder) as broker:
        config = device_config(broker.url, poll_interval_s=POLL_S, radius_m=15.0,
                               position_interval_s=0.1, max_speed_mps=max_speed)
        source = OutlierSource(outlier_north_m=3.0, max_speed_mps=max_speed)
        async with (
            running_device(config, tmp_path / "a", fixed_at(0.0, accuracy_m=3.0, interval_s=0.1))
            as a,
            running_device(config, tmp_path / "b", source) as b,
        ):
            await asyncio.wait_for(source.arriving.wait(), timeout=20 * TIME_UNIT)
            positions = [json.loads(raw) for kind, raw in recorder.frames
                         if json.loads(raw)["type"] == "position"]
            assert positions, "the devices sent their positions to the broker"
            near = [p for p in positions if 0.5 * METRE_LAT < p["latitude"] - LAT
                    < 15 * METRE_LAT]
            assert near == [], "the outlier reached the broker"
            for device in (a, b):
                assert not device.of("match") and not device.of("token_stored")
            # The outlier was not taken as B's fix either: every fix B showed before its real
            # arrival was 200 m north.
            far = [abs(f.latitude - LAT) > 100 * METRE_LAT for f in b.of("gps_fix")]
            assert far.count(True) == 5 and far[:5] == [True] * 5
            # The control: B really near is matched and witnessed.
            stored = [await d.wait_event("token_stored", timeout=20 * TIME_UNIT)
                      for d in (a, b)]
            assert stored[0].token == stored[1].token


async def test_the_broker_never_matches_a_clients_single_jump_next_to_a_device(tmp_path):
    """A client of another implementation (a raw WebSocket client here) sends one outlier 2 m
    from a real device, after a fix 1 km away: the broker rejects it as an implausible jump
    (issue 6, point 1: its match applies the devices' rule), so neither gets a match frame;
    it is counted, with no error to the client. Its third agreeing update re-anchors it, and
    then the pair is matched."""
    from fanny_tui.protocol.messages import Match, Position

    from .broker.kit import Client, healthz

    def position(north_m: float) -> Position:
        return Position(latitude=LAT + north_m * METRE_LAT, longitude=LON, accuracy_m=3.0)

    recorder = Recorder()
    async with start_broker(_settings(tmp_path), recorder=recorder) as broker:
        config = device_config(broker.url, poll_interval_s=POLL_S, position_interval_s=0.1)
        async with (
            running_device(config, tmp_path / "a", fixed_at(0.0, accuracy_m=3.0, interval_s=0.1))
            as device,
            Client.open(broker.url) as client,
        ):
            await client.hello()
            await client.send(position(1000.0))
            assert await client.barrier() == []
            await client.send(position(2.0))                   # 998 m at once: a jump
            assert await client.barrier() == []                # no match, no error

            def device_positions() -> int:
                return sum(json.loads(raw)["type"] == "position" for _, raw in recorder.frames)

            # The device goes on sending its position: the broker matches it against the
            # client's last accepted one, 1 km away.
            seen = device_positions()
            deadline = asyncio.get_running_loop().time() + 10 * TIME_UNIT
            while device_positions() < seen + 3:
                assert asyncio.get_running_loop().time() < deadline, "the device stopped"
                await asyncio.sleep(0.05)
            assert await client.barrier() == []
            assert not device.of("match")
            status, health = await healthz(broker.port)
            assert status == 200 and health["jumps_rejected"] == 1
            assert health["positions"] == 2
            # The control: two more updates agreeing with the outlier (3 in a row) re-anchor;
            # the third only 0.1 mm from the second, plausible after the barrier's round trip.
            await client.send(position(2.5))
            assert await client.barrier() == []
            await client.send(position(2.5001))
            assert [type(m) for m in await client.barrier()] == [Match]
            await device.wait_event("match", timeout=10 * TIME_UNIT)
            assert (await healthz(broker.port))[1]["jumps_rejected"] == 2


async def test_the_same_pair_meeting_again_grows_one_token(tmp_path):
    """Same sessions, same contact IDs, so the same token (issue 6, point 1): the second
    contact is stored as ``new`` False, and the store holds one token whose exposure is both
    contacts' (durations and samples added, the closer distance, two meetings) and whose
    expiry is the latest contact's."""
    async with start_broker(_settings(tmp_path, cooldown_s=0.5,
                                      max_speed_mps=CONTACT_MAX_SPEED_MPS)) as broker:
        config = _contact_config(broker.url, min_contact_s=0.0)
        walker = MovableSource(LAT + 3 * METRE_LAT, LON, 4.0)
        async with (
            running_device(config, tmp_path / "a", fixed_at(0.0, accuracy_m=4.0, interval_s=0.1))
            as a,
            running_device(config, tmp_path / "b", walker) as b,
        ):
            first = [await d.wait_event("token_stored", timeout=20 * TIME_UNIT) for d in (a, b)]
            assert all(event.new for event in first)
            walker.move_to(LAT + 200 * METRE_LAT, LON)
            for device in (a, b):
                await device.wait_event("contact_closed", timeout=10 * TIME_UNIT)
            walker.move_to(LAT + 2 * METRE_LAT, LON)
            again = [await d.wait_for(lambda e: e.event == "token_stored" and not e.new,
                                      timeout=20 * TIME_UNIT) for d in (a, b)]
            assert {e.token for e in first + again} == {first[0].token}
            walker.move_to(LAT + 200 * METRE_LAT, LON)
            for device in (a, b):
                await device.wait_for(lambda e: e.event == "contact_closed" and e.peer == 2,
                                      timeout=10 * TIME_UNIT)
        for device, stored in zip((a, b), again, strict=True):
            contacts = [c.contact for c in device.of("contact_closed")]
            assert len(contacts) == 2 and all(c.samples > 0 for c in contacts)
            store = TokenStore.in_dir(device.data_dir)
            [token] = store.tokens()
            store.close()
            assert token.token == first[0].token and token.meetings == 2
            assert token.contact is not None
            assert token.contact.samples == sum(c.samples for c in contacts)
            assert token.contact.duration_s == pytest.approx(
                sum(c.duration_s for c in contacts), abs=0.002)  # events: ms
            assert token.contact.closest_m == pytest.approx(min(c.closest_m for c in contacts))
            assert token.contact.median_m == pytest.approx(contacts[1].median_m)
            assert token.expires_at == stored.expires_at   # the latest contact's


async def test_a_moving_receivers_log_replayed_faster_keeps_its_fixes(tmp_path):
    """tr737A+.log moves up to 16 m between epochs 1 s apart; replayed 20 times faster that
    is 326 m/s of wall-clock time, over ``max_speed_mps``: the bound follows the replay's
    rate, so every fix of the log is the device's (none rejected as a jump) and reaches the
    broker."""
    from fanny_tui.events import GpsFix
    from fanny_tui.gps import NmeaReplaySource, parse_nmea_log

    log = Path(__file__).parent / "data" / "nmea" / "tr737A+.log"
    expected = [(f.latitude, f.longitude) for f in parse_nmea_log(log.read_text().splitlines())
                if isinstance(f, GpsFix)]
    recorder = Recorder()
    async with start_broker(_settings(tmp_path), recorder=recorder) as broker:
        config = device_config(broker.url, position_interval_s=0.05, max_speed_mps=30.0)
        source = NmeaReplaySource(log, rate=20.0, loop=False)
        async with running_device(config, tmp_path / "a", source) as a:
            await a.wait_for(lambda e: e.event == "gps_lost" and e.reason == "end of NMEA log",
                             timeout=20 * TIME_UNIT)
    shown = [(f.latitude, f.longitude) for f in a.of("gps_fix")]
    assert shown == expected
    assert a.engine._jumps.max_speed_mps == 600.0
    sent = {(m["latitude"], m["longitude"]) for m in map(json.loads, (r for _, r in
            recorder.frames)) if m["type"] == "position"}
    assert sent and sent <= set(expected)
