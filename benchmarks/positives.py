"""Positives distribution and the device's check (issue 7, points 1 and 3).

One board of N published tokens (1,000,000; ``--quick``: 5,000) and one device store of M
stored tokens (10,000; ``--quick``: 200), ten of them published, give four figures measured
through the kit's own code (:func:`fanny_tui.positives.poll_once` against a real broker on
loopback, through a byte-counting relay):

* ``bytes_per_token``: bytes from the broker per token received during the catch-up
  (WebSocket framing and all), beside the 32 B floor (a SHA-256 token is incompressible).
* ``catchup_s`` / ``catchup_polls``: an empty cursor catching up on the whole board: the time
  spent in polls, and how many poll cycles it took (``poll_once`` calls; the engine makes one
  every ``poll_interval_s``, 300 s by default).
* ``check_s``: the time spent in the token store's code during that catch-up, whatever the
  poll calls (the frame-by-frame ``match_positives`` and cursor writes, or the bulk
  ``positives_check()`` whose returned object's ``feed`` and ``commit`` the poll calls):
  timed by wrapping the store instance's public methods and those of the store's helper
  objects they return (see :func:`~benchmarks.common.time_methods`), so no method is named.
  Floor: a Python set intersection of the published tokens with the stored ones.
* ``empty_poll_ms``: one ``poll_once`` with nothing new, beside a bare WebSocket connect +
  ping + close to the same broker.
* ``empty_poll_bytes``: the bytes both ways of that poll (its own connection: opening
  handshake, poll, answer, close), beside its floor: the same frames after the smallest
  opening handshake RFC 6455 allows (only the required header fields, same Host and keys;
  :class:`~benchmarks.common.WebSocketParts`). The note gives each part.
* ``empty_poll_frames_bytes``: the poll's own frames (poll, answer, closing handshake),
  without the opening handshake that no fresh connection can avoid.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from websockets.asyncio.client import connect

from broker.positives import SqlitePositiveBoard
from broker.server import BrokerSettings, start_broker
from fanny_tui.positives import poll_once
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.protocol.messages import MAX_TOKENS_PER_UPLOAD, PositiveToken
from fanny_tui.store import TokenStore

from .common import (
    LOOPBACK,
    Budget,
    Figure,
    Scale,
    Timer,
    byte_relay,
    time_methods,
    websocket_parts,
)

EXPOSED = 10
"""Stored tokens that are also published (the exposure the check must find)."""


def _tokens(rng: random.Random, count: int) -> list[str]:
    return [rng.randbytes(32).hex() for _ in range(count)]


def fill_board(path: Path, tokens: list[str], now: datetime) -> None:
    """Publish ``tokens`` on a board file through the board's own ``add`` (uploads of
    ``MAX_TOKENS_PER_UPLOAD``), all with the expiry of a contact witnessed ``now``."""
    expires = expiry_for(now)
    board = SqlitePositiveBoard(path)
    try:
        for start in range(0, len(tokens), MAX_TOKENS_PER_UPLOAD):
            chunk = [PositiveToken(token=t, expires_at=expires)
                     for t in tokens[start:start + MAX_TOKENS_PER_UPLOAD]]
            board.add(str(uuid.uuid4()), chunk, now, code_required=False)
    finally:
        board.close()


def fill_store(store: TokenStore, tokens: list[str], now: datetime) -> None:
    """Store ``tokens`` through ``TokenStore.add``. Setup only: the file's fsyncs are turned
    off while it is filled (10,000 fsyncs would measure the disk, not the kit) and back on
    before anything is measured."""
    expires = expiry_for(now)
    db = store._db   # setup only, see the docstring
    db.execute("PRAGMA synchronous = OFF")
    try:
        for token in tokens:
            store.add(token, expires)
    finally:
        db.execute("PRAGMA synchronous = FULL")


def _as_engine(count: int, contacts: object) -> None:
    """The engine passes an ``on_match`` (so the poll also reads the matched contacts)."""


async def _bare_round_trip(url: str) -> float:
    start = time.perf_counter()
    async with connect(url, proxy=None, compression=None, open_timeout=10) as ws:
        pong = await ws.ping()
        await asyncio.wait_for(pong, 10)
    return time.perf_counter() - start


async def run(scale: Scale) -> list[Figure]:
    published_n = scale.pick(1_000_000, 5_000)
    stored_n = scale.pick(10_000, 200)
    budget = Budget(scale.pick(900, 40))
    rng = random.Random(7)
    now = datetime.now(UTC)
    published = _tokens(rng, published_n)
    stored = _tokens(rng, stored_n - EXPOSED) + rng.sample(published, EXPOSED)

    with tempfile.TemporaryDirectory(prefix="fanny-bench-") as tmp:
        board_path = Path(tmp) / "board.sqlite3"
        start = time.perf_counter()
        await asyncio.to_thread(fill_board, board_path, published, now)
        fill_s = time.perf_counter() - start
        store = TokenStore(Path(tmp) / "device" / "tokens.sqlite3")
        try:
            fill_store(store, stored, now)
            timer = Timer()
            time_methods(store, timer, skip=frozenset({"close", "add"}))
            settings = BrokerSettings(host=LOOPBACK, port=0, db_path=board_path,
                                      open_declarations=True)
            async with start_broker(settings) as broker, byte_relay(broker.port) as (port, counts):
                url = f"ws://{LOOPBACK}:{port}"
                received = matched = polls = 0
                start = time.perf_counter()
                while received < published_n and polls < 200 and not budget.over:
                    result = await asyncio.wait_for(
                        poll_once(store, url, timeout_s=60, on_match=_as_engine),
                        budget.left + 1)
                    polls += 1
                    received += result.received
                    matched += result.matched
                    if result.received == 0:
                        break
                catchup_s = time.perf_counter() - start
                down = counts.down

                empty, bare = [], []
                for _ in range(scale.pick(30, 5)):
                    if budget.over:
                        break
                    counts.reset()
                    counts.capture = True
                    t0 = time.perf_counter()
                    result = await poll_once(store, url, timeout_s=30)
                    empty.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.05)   # the last close frame crosses the relay
                    empty_bytes = counts.down + counts.up
                    parts = websocket_parts(bytes(counts.up_raw), bytes(counts.down_raw))
                    counts.capture = False
                    counts.reset()
                    bare.append(await _bare_round_trip(url))
                    await asyncio.sleep(0.05)
                    bare_bytes = counts.down + counts.up
        finally:
            store.close()

    t0 = time.perf_counter()
    found = len(set(published) & set(stored))
    floor_s = time.perf_counter() - t0
    complete = received >= published_n
    finished = "" if complete else (f"; STOPPED at its bound after {received} of "
                                    f"{published_n} tokens")
    check = "" if matched == EXPOSED and found == EXPOSED else (
        f"; WRONG: matched {matched}, expected {EXPOSED}")
    figures = [
        Figure("bytes_per_token", down / received if received else None, 32.0, "B", received,
               "bytes the broker sent during the catch-up per token received (WebSocket "
               "frames, handshakes included); floor: 32 raw bytes of SHA-256" + finished,
               "<= 33 B"),
        Figure("catchup_s", catchup_s, None, "s", received,
               f"{polls} poll cycle(s) (poll_once calls) from an empty cursor; at the default "
               f"poll_interval_s 300 that is {(polls - 1) * 300 + catchup_s:.0f} s in the field"
               f"; board filled in {fill_s:.1f} s" + finished + check,
               "all in one poll, < 60 s"),
        Figure("catchup_polls", float(polls), 1.0, "polls", received,
               "poll cycles needed by an empty cursor; floor: one", "1"),
        Figure("check_s", timer.seconds, floor_s, "s", received,
               f"time in the token store's methods during the catch-up ({timer.calls} calls: "
               + ", ".join(f"{k} x{v}" for k, v in sorted(timer.names.items()))
               + f"), {stored_n} stored; floor: set(published) & set(stored)" + check,
               "< 0.5 s, memory flat in the published count"),
    ]
    if empty:
        figures.append(Figure(
            "empty_poll_ms", 1000 * sum(empty) / len(empty), 1000 * sum(bare) / len(bare), "ms",
            len(empty), f"poll_once with nothing new ({empty_bytes} bytes both ways, handshake "
            "included); peer: bare WebSocket connect + ping + close to the broker", ""))
        frames = parts.total - parts.request - parts.response
        figures.append(Figure(
            "empty_poll_bytes", float(empty_bytes), float(parts.minimal_total), "B", 1,
            "bytes both ways of one poll_once with nothing new (its own connection): "
            + parts.describe() + f"; floor: the same frames after that minimal handshake "
            f"(a fresh connection cannot go lower); a bare connect + ping + close: "
            f"{bare_bytes} B", "poll with nothing new < 200 B"))
        figures.append(Figure(
            "empty_poll_frames_bytes", float(frames), None, "B", 1,
            "the same poll without its opening handshake: the poll, its answer and the "
            "closing handshake", "poll with nothing new < 200 B"))
    return figures

