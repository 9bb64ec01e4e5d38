"""Positive declarations against a real broker on loopback (paper 4, steps 1-2; paper 5).

Real ``start_broker`` on port 0 with its SQLite board, real token stores, the client's own
``declare`` / ``upload_pending`` / ``send_decoy``. Codes are issued the way ``fanny-broker
issue-code`` does. A loopback TCP proxy that forwards the upload and then cuts the connection
before the broker's answer reaches the client stands for a lost ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import websockets

from broker.__main__ import issue_code
from broker.server import BrokerSettings, RunningBroker, start_broker
from fanny_tui import positives
from fanny_tui.positives import (
    CODE_REFUSALS,
    CONTENT_REFUSALS,
    DECOY_MAX_TOKENS,
    PollResult,
    declare,
    decoy_upload,
    poll_once,
    send_decoy,
    upload_pending,
)
from fanny_tui.protocol.batch import BATCH_FORMAT
from fanny_tui.protocol.expiry import expiry_for, is_on_the_hour
from fanny_tui.protocol.messages import (
    MAX_TOKENS_PER_UPLOAD,
    UPLOAD_SIZE_BYTES,
    Error,
    Positives,
    PositiveToken,
    PositiveUpload,
    decode_client_message,
    encode,
    encode_padded,
)
from fanny_tui.store import PositivesCheck, PositivesMatch, TokenStore


class Recorder:
    """Every frame the broker received: (connection kind, raw text)."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, str]] = []

    def __call__(self, kind: str, raw: str) -> None:
        self.frames.append((kind, raw))

    @property
    def uploads(self) -> list[tuple[int, PositiveUpload]]:
        """Every positive upload received: (size in bytes, decoded)."""
        out = []
        for _, raw in self.frames:
            if '"positive_upload"' in raw:
                message = decode_client_message(raw)
                assert isinstance(message, PositiveUpload)
                out.append((len(raw.encode("utf-8")), message))
        return out


@contextlib.asynccontextmanager
async def running(tmp_path: Path, recorder: Recorder | None = None,
                  **overrides: Any) -> AsyncIterator[RunningBroker]:
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "board.sqlite3",
                              upload_answer_delay_s=0.02, **overrides)
    async with start_broker(settings, recorder=recorder) as broker:
        yield broker


def new_code(tmp_path: Path, ttl: timedelta = timedelta(hours=1),
             now: datetime | None = None) -> str:
    """A code issued as ``fanny-broker issue-code --db`` does (the broker may be running)."""
    code, _ = issue_code(str(tmp_path / "board.sqlite3"), ttl, now)
    return code


def fill(store: TokenStore, count: int) -> dict[str, datetime]:
    """Store ``count`` random tokens witnessed over the last 14 days; returns token -> expiry."""
    now = datetime.now(UTC)
    made = {}
    for i in range(count):
        token = os.urandom(32).hex()
        made[token] = expiry_for(now - timedelta(hours=(i * 7) % (14 * 24)))
        store.add(token, made[token])
    return made


def board_tokens(broker: RunningBroker) -> set[str]:
    tokens, _, _ = broker.board.since(0, 100_000, datetime.now(UTC))
    return {t.token for t in tokens}


@pytest.fixture
def store(tmp_path: Path):
    s = TokenStore.in_dir(tmp_path / "device")
    yield s
    s.close()


class AckDropper:
    """A loopback TCP proxy to the broker that loses the broker's answer to an upload.

    It relays the WebSocket opening handshake both ways and every byte from the client, then
    closes both connections as soon as the broker's first frame (the answer, sent only after
    the commit) arrives, without relaying it.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.dropped = 0
        self.url = ""

    async def __aenter__(self) -> AckDropper:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def upstream() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        pump = asyncio.create_task(upstream())
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await up_reader.read(65536)
                if not chunk:
                    return
                head += chunk
            end = head.index(b"\r\n\r\n") + 4
            writer.write(head[:end])
            await writer.drain()
            if head[end:] or await up_reader.read(65536):
                self.dropped += 1           # the answer: never relayed
        finally:
            pump.cancel()
            for w in (writer, up_writer):
                w.close()
            with contextlib.suppress(Exception):
                await pump


# -- padding and splitting ------------------------------------------------------------------


async def test_every_upload_is_padded_to_one_size_and_big_ones_split(tmp_path, store):
    recorder = Recorder()
    async with running(tmp_path, recorder) as broker:
        made = fill(store, 2 * MAX_TOKENS_PER_UPLOAD + 201)
        code = new_code(tmp_path)
        declaration = declare(store, code)
        assert declaration.count == len(made) and len(declaration.upload_ids) == 3
        assert store.pending_count() == len(made)

        outcomes = await upload_pending(store, broker.url)

        assert [o.acknowledged for o in outcomes] == [True, True, True]
        assert sorted(o.count for o in outcomes) == [201, 500, 500]
        assert store.count() == 0 and store.pending() == []
        assert board_tokens(broker) == set(made)
    uploads = recorder.uploads
    assert [size for size, _ in uploads] == [UPLOAD_SIZE_BYTES] * 3
    assert {u.upload_id for _, u in uploads} == set(declaration.upload_ids)
    assert {u.code for _, u in uploads} == {code.replace("-", "")}   # one code, every upload
    [secret] = {u.declaration for _, u in uploads}                   # and one declaration
    assert secret is not None and len(secret) == 64
    assert sorted(len(u.tokens) for _, u in uploads) == [201, 500, 500]
    # The most recent contacts (latest expiry) went in the full uploads first.
    by_size = sorted((u for _, u in uploads), key=lambda u: len(u.tokens))
    assert (max(t.expires_at for t in by_size[0].tokens)
            <= min(t.expires_at for t in by_size[2].tokens))
    print(f"{len(made)} tokens -> {len(uploads)} uploads of {UPLOAD_SIZE_BYTES} bytes each")


async def test_one_token_and_no_token_look_the_same(tmp_path, store):
    recorder = Recorder()
    async with running(tmp_path, recorder, open_declarations=True) as broker:
        fill(store, 1)
        declare(store, None)
        [outcome] = await upload_pending(store, broker.url)
        assert outcome.acknowledged and outcome.count == 1
        assert await send_decoy(broker.url)
    sizes = [size for size, _ in recorder.uploads]
    assert sizes == [UPLOAD_SIZE_BYTES, UPLOAD_SIZE_BYTES]


def test_a_mistyped_code_changes_nothing(store):
    fill(store, 3)
    with pytest.raises(ValueError, match="16 characters"):
        declare(store, "K7QF-3M9X-TR2B-8HJ")
    with pytest.raises(ValueError, match="'U'"):
        declare(store, "K7QF-3M9X-TR2B-8HJU")
    assert store.pending_count() == 0


def test_nothing_to_declare_records_no_upload(store):
    declaration = declare(store, "K7QF-3M9X-TR2B-8HJD")
    assert (declaration.count, declaration.upload_ids) == (0, ())
    assert store.pending() == []


# -- refused codes: every token kept, un-marked, never retried ------------------------------


@pytest.mark.parametrize("reason", sorted(CODE_REFUSALS))
async def test_a_refused_code_keeps_every_token_and_is_not_retried(tmp_path, store, reason):
    recorder = Recorder()
    # One purge of expired codes, at start (an expired code is then forgotten: code_invalid).
    async with running(tmp_path, recorder, code_grace_s=0.0, purge_interval_s=3600.0) as broker:
        made = fill(store, 3)
        if reason == "code_required":
            code = None
        elif reason == "code_invalid":
            code = "K7QF-3M9X-TR2B-8HJD"                    # well formed, never issued
        elif reason == "code_expired":
            await asyncio.sleep(0.1)                        # after the purge at start
            code = new_code(tmp_path, ttl=timedelta(seconds=1))
            await asyncio.sleep(1.1)
        else:                                                # used by an earlier declaration
            code = new_code(tmp_path)
            other = TokenStore.in_dir(tmp_path / "other")
            fill(other, 1)
            declare(other, code)
            assert (await upload_pending(other, broker.url))[0].acknowledged
            other.close()
        before = len(recorder.uploads)
        declare(store, code)

        [outcome] = await upload_pending(store, broker.url)

        assert (outcome.refused, outcome.count) == (reason, 3)
        assert outcome.message and not outcome.acknowledged
        assert {t.token: t.pending for t in store.tokens()} == dict.fromkeys(made, False)
        assert not board_tokens(broker) & set(made)
        # Not retried: the next round has nothing to send.
        assert await upload_pending(store, broker.url) == []
        assert len(recorder.uploads) == before + 1
        # A new declaration with a good code takes the same tokens.
        declare(store, new_code(tmp_path))
        [again] = await upload_pending(store, broker.url)
        assert again.acknowledged and again.count == 3
        assert set(made) <= board_tokens(broker)
        assert store.count() == 0


# -- a code is one declaration (issue 8, point 3) -------------------------------------------


async def test_a_second_device_with_the_same_code_is_refused_at_once(tmp_path, store):
    """Device A's declaration of 1001 tokens is three uploads; its first commits but its ack
    is lost. Device B, given the same code, declares within the continuation window: refused
    ``code_used`` at once, its tokens kept. A's retry then completes the whole declaration (the
    first upload answered idempotently, the others with A's declaration secret)."""
    recorder = Recorder()
    async with running(tmp_path, recorder) as broker:               # 10 min window (default)
        code = new_code(tmp_path)
        made = fill(store, 2 * MAX_TOKENS_PER_UPLOAD + 1)
        declaration = declare(store, code)
        assert len(declaration.upload_ids) == 3
        async with AckDropper(broker.port) as proxy:
            with pytest.raises((websockets.ConnectionClosed, OSError)):
                await upload_pending(store, proxy.url, timeout_s=5.0)
        assert proxy.dropped == 1
        first = len(board_tokens(broker))
        assert first in (1, MAX_TOKENS_PER_UPLOAD)                 # one upload committed

        other = TokenStore.in_dir(tmp_path / "other")
        theirs = set(fill(other, 3))
        declare(other, code)
        [refusal] = await upload_pending(other, broker.url)
        assert (refusal.refused, refusal.count) == ("code_used", 3)
        assert {t.token: t.pending for t in other.tokens()} == dict.fromkeys(theirs, False)
        assert not board_tokens(broker) & theirs
        other.close()

        outcomes = await upload_pending(store, broker.url)
        assert [o.acknowledged for o in outcomes] == [True, True, True]
        assert store.count() == 0 and board_tokens(broker) == set(made)
    uploads = [u for _, u in recorder.uploads]
    by_id: dict[str, set[str | None]] = {}
    for upload in uploads:
        by_id.setdefault(upload.upload_id, set()).add(upload.declaration)
    ours = {d for i in declaration.upload_ids for d in by_id[i]}
    assert len(ours) == 1 and None not in ours                  # one secret, also on the retry
    assert len(by_id) == 4 and not ours & by_id[refusal.upload_id]


async def test_the_declaration_secret_is_kept_in_memory_only(tmp_path):
    """The secret is never written to the device's files; after a restart the rest of a
    declaration whose first upload committed is refused ``code_used`` and keeps its tokens."""
    data_dir = tmp_path / "device"
    recorder = Recorder()
    async with running(tmp_path, recorder) as broker:
        store = TokenStore.in_dir(data_dir)
        made = fill(store, MAX_TOKENS_PER_UPLOAD + 2)
        declare(store, new_code(tmp_path))
        secrets = {p.declaration for p in store.pending()}
        assert len(secrets) == 1 and None not in secrets
        [secret] = secrets
        async with AckDropper(broker.port) as proxy:
            with pytest.raises((websockets.ConnectionClosed, OSError)):
                await upload_pending(store, proxy.url, timeout_s=5.0)
        store.close()
        on_disk = b"".join(f.read_bytes() for f in data_dir.rglob("*") if f.is_file())
        assert secret.encode() not in on_disk and bytes.fromhex(secret) not in on_disk

        restarted = TokenStore.in_dir(data_dir)                      # the device restarts
        assert {p.declaration for p in restarted.pending()} == {None}
        outcomes = await upload_pending(restarted, broker.url)
        assert sorted((o.refused or "ack") for o in outcomes) == ["ack", "code_used"]
        kept = {t.token for t in restarted.tokens()}
        assert kept and kept | board_tokens(broker) == set(made)
        assert all(not t.pending for t in restarted.tokens())
        restarted.close()
    # The retry after the restart carried a new secret: the broker holds only the first's.
    assert len({u.declaration for _, u in recorder.uploads}) == 2


# -- refused content: final too, never retried every 30 s (issue 7, point 7) ---------------


def _corrupt_row(store: TokenStore, token: str, expires_at: datetime) -> None:
    """A row the kit itself never writes (an older version's, or a damaged file)."""
    with store._lock:
        store._db.execute("INSERT INTO tokens (token, expires_at) VALUES (?, ?)",
                          (token, int(expires_at.timestamp())))


def _sent(recorder: Recorder) -> int:
    """Upload frames the broker received, decodable or not."""
    return sum('"positive_upload"' in raw for _, raw in recorder.frames)


@pytest.mark.parametrize("reason", ["expiry_out_of_window", "too_many_tokens", "bad_message",
                                    "too_large_to_send"])
async def test_a_refused_content_keeps_every_token_and_is_not_retried(tmp_path, store, reason):
    recorder = Recorder()
    async with running(tmp_path, recorder, open_declarations=True) as broker:
        made = set(fill(store, 3))
        if reason == "expiry_out_of_window":
            # token_lifetime_days 20 (the config allowed up to 365), or a clock days ahead.
            late = expiry_for(datetime.now(UTC), lifetime_days=20)
            extra = os.urandom(32).hex()
            store.add(extra, late)
            made.add(extra)
        elif reason == "bad_message":
            extra = "A" * 64                             # upper case: not a wire token
            _corrupt_row(store, extra, expiry_for(datetime.now(UTC)))
            made.add(extra)
        else:                                              # one upload over the cap
            count = MAX_TOKENS_PER_UPLOAD + (1 if reason == "too_many_tokens" else 300)
            made |= set(fill(store, count - 3))
        marked = store.begin_upload("0f0e5b1c-2a59-4b6e-9a51-3d7c1a2b3c4d", None)
        assert len(marked) == len(made)
        before = _sent(recorder)

        [outcome] = await upload_pending(store, broker.url)

        expected = "too_many_tokens" if reason == "too_large_to_send" else reason
        assert (outcome.refused, outcome.count) == (expected, len(made))
        assert outcome.message and not outcome.acknowledged
        assert expected in CONTENT_REFUSALS
        assert {t.token: t.pending for t in store.tokens()} == dict.fromkeys(made, False)
        assert not board_tokens(broker) & made
        sent = 0 if reason == "too_large_to_send" else 1   # decided here, never sent
        assert _sent(recorder) == before + sent
        # Not retried: the next round has nothing to send.
        assert await upload_pending(store, broker.url) == []
        assert _sent(recorder) == before + sent


# -- lost acks: the retry is acknowledged without the consumed code -------------------------


async def test_a_lost_ack_is_recovered_after_a_restart(tmp_path):
    data_dir = tmp_path / "device"
    async with running(tmp_path, code_grace_s=0.0) as broker:
        store = TokenStore.in_dir(data_dir)
        made = fill(store, 4)
        declare(store, new_code(tmp_path))
        async with AckDropper(broker.port) as proxy:
            with pytest.raises((websockets.ConnectionClosed, OSError)):
                await upload_pending(store, proxy.url, timeout_s=5.0)
        assert proxy.dropped == 1
        # The broker committed (and consumed the code); the device did not hear it.
        assert set(made) <= board_tokens(broker)
        assert store.pending_count() == 4
        store.close()

        restarted = TokenStore.in_dir(data_dir)           # the device restarts
        [pending] = restarted.pending()
        assert pending.code is not None                   # the code came back from disk
        [outcome] = await upload_pending(restarted, broker.url)
        assert outcome.acknowledged and outcome.count == 4
        assert restarted.count() == 0
        assert board_tokens(broker) == set(made)
        restarted.close()


async def test_a_retry_shrunk_by_expiry_counts_as_committed(tmp_path, store):
    """The first attempt committed 2 tokens; one expired here before the retry."""
    async with running(tmp_path, open_declarations=True) as broker:
        now = datetime.now(UTC)
        soon, later = expiry_for(now - timedelta(days=5)), expiry_for(now)
        store.add("a" * 64, soon)
        store.add("b" * 64, later)
        declare(store, None)
        async with AckDropper(broker.port) as proxy:
            with pytest.raises((websockets.ConnectionClosed, OSError)):
                await upload_pending(store, proxy.url, timeout_s=5.0)
        assert store.sweep_expired(soon) == 1              # expired here: gone from the upload
        [outcome] = await upload_pending(store, broker.url)
        assert outcome.acknowledged and store.count() == 0
        assert board_tokens(broker) == {"a" * 64, "b" * 64}


# -- decoys ---------------------------------------------------------------------------------


async def test_a_decoy_is_answered_discarded_and_the_same_size(tmp_path):
    recorder = Recorder()
    async with running(tmp_path, recorder) as broker:   # codes required: decoys need none
        assert await send_decoy(broker.url)
        assert board_tokens(broker) == set()
    [(size, upload)] = recorder.uploads
    assert size == UPLOAD_SIZE_BYTES and upload.decoy and upload.code is None
    assert upload.declaration is None


async def test_a_decoy_to_a_dead_broker_is_dropped_quietly(tmp_path):
    async with running(tmp_path) as broker:
        url = broker.url
    assert await send_decoy(url, timeout_s=2.0) is False


def test_decoy_tokens_are_plausible():
    now = datetime.now(UTC)
    counts = set()
    ids = set()
    for _ in range(50):
        upload = decoy_upload(now)
        counts.add(len(upload.tokens))
        ids.add(upload.upload_id)
        assert upload.decoy and upload.code is None
        assert len(upload.tokens) <= DECOY_MAX_TOKENS
        for token in upload.tokens:
            assert now < token.expires_at <= now + timedelta(days=16)
            assert is_on_the_hour(token.expires_at)
        assert len(json.loads(encode_padded(upload, UPLOAD_SIZE_BYTES))["padding"]) > 0
    assert len(ids) == 50 and len(counts) > 1


# --- polls (paper 4, step 4): binary batches, one poll for the whole board ------------------


def publish(broker: RunningBroker, tokens: list[str], expires_at: datetime) -> None:
    """Put tokens on the board as committed uploads would (open declarations)."""
    for start in range(0, len(tokens), 50_000):
        broker.board.add(str(uuid.uuid4()), [PositiveToken(token=t, expires_at=expires_at)
                                             for t in tokens[start:start + 50_000]],
                         datetime.now(UTC), code_required=False)


@pytest.mark.parametrize("formats", [(BATCH_FORMAT,), ()], ids=["batch1", "json"])
async def test_a_device_catches_up_on_the_whole_board_in_one_poll(tmp_path, store, formats):
    expires_at = expiry_for(datetime.now(UTC))
    mine = list(fill(store, 40))
    witnessed, kept = mine[:25], mine[25:]
    published = [os.urandom(32).hex() for _ in range(20_000)]
    published[7_000:7_000] = witnessed
    recorder = Recorder()
    alerts: list[int] = []
    async with running(tmp_path, recorder, batch_frame_tokens=4096, poll_limit=100_000) as broker:
        publish(broker, published, expires_at)
        result = await poll_once(store, broker.url, on_match=lambda n, _: alerts.append(n))
        polls = [raw for _, raw in recorder.frames if '"positives_poll"' in raw]
        assert len(polls) == 1                               # one poll, streamed answer
        assert result == PollResult(received=len(published), matched=len(witnessed))
        assert sum(alerts) == len(witnessed)
        assert store.poll_cursor() == len(published)
        assert {t.token for t in store.tokens()} == set(kept)
        assert store.count() == len(kept)                    # only the matches deleted
        assert sum(a.count for a in store.alerts()) == len(witnessed)
        again = await poll_once(store, broker.url, on_match=lambda n, _: alerts.append(n))
        assert again == PollResult(received=0, matched=0)
        assert sum(a.count for a in store.alerts()) == len(witnessed)   # alerted once


def count_commits(store: TokenStore) -> list[int]:
    """The cursors of every bulk check the store records from now on (one per poll)."""
    cursors: list[int] = []
    start = store.positives_check

    def checking() -> PositivesCheck:
        check = start()
        commit = check.commit

        def committing(cursor: int, now: datetime) -> PositivesMatch:
            cursors.append(cursor)
            return commit(cursor, now)

        check.commit = committing                           # type: ignore[method-assign]
        return check

    store.positives_check = checking                        # type: ignore[method-assign]
    return cursors


async def test_a_whole_catch_up_is_one_transaction(tmp_path, store):
    mine = list(fill(store, 5))
    published = [os.urandom(32).hex() for _ in range(10_000)] + mine[:2]
    alerts: list[tuple[int, int]] = []
    async with running(tmp_path, batch_frame_tokens=1000) as broker:
        publish(broker, published, expiry_for(datetime.now(UTC)))
        commits = count_commits(store)
        result = await poll_once(store, broker.url,
                                 on_match=lambda n, contacts: alerts.append((n, len(contacts))))
        assert result == PollResult(received=10_002, matched=2)
        assert commits == [10_002]                       # 11 frames, ONE write
        assert alerts == [(2, 2)] and len(store.alerts()) == 1
        assert await poll_once(store, broker.url) == PollResult(received=0, matched=0)
        assert commits == [10_002]                       # nothing new: nothing written


async def test_a_catch_up_cut_off_resumes_after_the_last_frame_compared(tmp_path, store,
                                                                        monkeypatch):
    mine = list(fill(store, 3))
    expires_at = expiry_for(datetime.now(UTC))
    early = [os.urandom(32).hex() for _ in range(2500)] + [mine[0]]   # within 3 frames
    async with running(tmp_path, batch_frame_tokens=1000) as broker:
        publish(broker, early, expires_at)
        publish(broker, [os.urandom(32).hex() for _ in range(7499)], expires_at)
        frames: list[int] = []
        real = positives.decode_batch_frame

        def cut_after_three(data: bytes) -> Any:
            if len(frames) == 3:
                raise ConnectionError("cut")
            frames.append(1)
            return real(data)

        monkeypatch.setattr(positives, "decode_batch_frame", cut_after_three)
        commits = count_commits(store)
        alerts: list[int] = []
        with pytest.raises(ConnectionError):
            await poll_once(store, broker.url, on_match=lambda n, _: alerts.append(n))
        monkeypatch.setattr(positives, "decode_batch_frame", real)
        assert commits == [3000]                            # what was compared, once
        assert store.poll_cursor() == 3000 and alerts == [1]   # its match recorded
        assert store.count() == 2
        rest = await poll_once(store, broker.url)
        assert rest == PollResult(received=7000, matched=0)
        assert store.poll_cursor() == 10_000 and len(store.alerts()) == 1


async def test_a_broker_older_than_batch1_is_polled_in_json(tmp_path, store):
    """A stand-in for a broker before ``accept`` existed: it refuses the unknown field, as the
    old ``forbid_unknown_fields`` decoder did, and answers a plain poll with a JSON page."""
    mine = next(iter(fill(store, 1)))
    polls: list[dict[str, Any]] = []

    async def old_broker(ws: Any) -> None:
        async for raw in ws:
            poll = json.loads(raw)
            polls.append(poll)
            if "accept" in poll:
                await ws.send(encode(Error(code="unknown_field", message="Object contains "
                                           "unknown field `accept`", field="accept")))
            else:
                await ws.send(encode(Positives(cursor=5, tokens=[PositiveToken(
                    token=mine, expires_at=expiry_for(datetime.now(UTC)))])))

    async with websockets.serve(old_broker, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        result = await poll_once(store, f"ws://127.0.0.1:{port}")
    assert result == PollResult(received=1, matched=1)
    assert [sorted(p) for p in polls] == [["accept", "type"], ["type"]]   # cursor 0: left out
    assert store.poll_cursor() == 5
