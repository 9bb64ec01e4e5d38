"""broker.positives: the SQLite positive-token board on real files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker import Refusal
from broker.positives import (
    SCHEMA_VERSION,
    BoardError,
    PositiveBoard,
    SqlitePositiveBoard,
    check_upload,
)
from fanny_tui.protocol.messages import PositiveToken

NOW = datetime(2026, 3, 1, 10, 30, tzinfo=UTC)
EXPIRY = datetime(2026, 3, 14, 4, 0, tzinfo=UTC)
U1 = "aaaaaaaa-0000-4000-8000-000000000001"
U2 = "aaaaaaaa-0000-4000-8000-000000000002"


def tok(n: int, expires_at: datetime = EXPIRY) -> PositiveToken:
    return PositiveToken(token=f"{n:064x}", expires_at=expires_at)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "positives.sqlite3"


@pytest.fixture
def board(path: Path):
    b = SqlitePositiveBoard(path)
    yield b
    b.close()


def rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def test_new_file_gets_schema_version_wal_and_full_sync(board, path):
    assert isinstance(board, PositiveBoard)
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]
    assert board._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_only_token_expiry_sequence_and_upload_id_are_stored(board, path):
    columns = {table: [r[1] for r in rows(path, f"PRAGMA table_info({table})")]
               for table in ("positives", "uploads")}
    assert columns == {"positives": ["seq", "token", "expires_at"],
                       "uploads": ["upload_id", "count", "digest", "keep_until"]}


def test_add_then_since_in_publication_order(board):
    assert board.add(U1, [tok(3), tok(1), tok(2)], NOW) == 3
    assert board.add(U2, [tok(9)], NOW) == 1
    tokens, cursor, more = board.since(0, 100, NOW)
    # Within an upload, token order (not the order the device sent them), then uploads in order.
    assert [t.token for t in tokens] == [tok(n).token for n in (1, 2, 3, 9)]
    assert all(t.expires_at == EXPIRY for t in tokens)
    assert (cursor, more) == (4, False)
    assert board.since(cursor, 100, NOW) == ([], 4, False)


def test_since_pages_with_limit_and_cursor(board):
    board.add(U1, [tok(n) for n in range(5)], NOW)
    seen, cursor, pages = [], 0, 0
    while True:
        tokens, cursor, more = board.since(cursor, 2, NOW)
        seen += [t.token for t in tokens]
        pages += 1
        if not more:
            break
    assert seen == [tok(n).token for n in range(5)] and pages == 3
    board.add(U2, [tok(7)], NOW)
    assert [t.token for t in board.since(cursor, 2, NOW)[0]] == [tok(7).token]


def test_idempotent_upload_id_and_known_tokens(board, path):
    upload = [tok(1), tok(2)]
    assert board.add(U1, upload, NOW) == 2
    assert board.add(U1, list(reversed(upload)), NOW) == 2           # a retry
    assert board.add(U2, [tok(2), tok(3)], NOW) == 2                 # tok(2) already known
    assert rows(path, "SELECT count(*) FROM positives") == [(3,)]
    assert rows(path, "SELECT count(*) FROM uploads") == [(2,)]
    # Duplicates inside one upload count once.
    assert board.add("aaaaaaaa-0000-4000-8000-000000000003", [tok(5), tok(5)], NOW) == 1


def test_reused_upload_id_with_other_tokens_is_refused(board, path):
    board.add(U1, [tok(1)], NOW)
    with pytest.raises(Refusal) as refused:
        board.add(U1, [tok(2)], NOW)
    assert (refused.value.code, refused.value.field) == ("upload_conflict", "upload_id")
    assert rows(path, "SELECT token FROM positives") == [(tok(1).token,)]


def test_retry_is_acknowledged_even_after_some_tokens_expired(board):
    soon = datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    assert board.add(U1, [tok(1, soon), tok(2)], NOW) == 2
    assert board.add(U1, [tok(1, soon), tok(2)], soon + timedelta(hours=1)) == 2


def test_expiry_window_is_enforced_all_or_nothing(path):
    board = SqlitePositiveBoard(path, max_expiry_ahead=timedelta(days=2))
    try:
        latest = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)       # <= NOW + 2 days
        cases = [
            ([tok(1, latest), tok(2, datetime(2026, 3, 1, 10, tzinfo=UTC))],
             "tokens[1].expires_at"),
            ([tok(1, datetime(2026, 3, 3, 11, 0, tzinfo=UTC))], "tokens[0].expires_at"),
        ]
        for upload, field in cases:
            with pytest.raises(Refusal) as refused:
                board.add(U1, upload, NOW)
            assert (refused.value.code, refused.value.field) == ("expiry_out_of_window", field)
        assert rows(path, "SELECT count(*) FROM positives") == [(0,)]
        assert rows(path, "SELECT count(*) FROM uploads") == [(0,)]
        assert board.add(U1, [tok(1, latest), tok(2, datetime(2026, 3, 1, 11, tzinfo=UTC))],
                         NOW) == 2
    finally:
        board.close()


def test_check_upload_rules():
    on_now = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    with pytest.raises(Refusal, match="past"):
        check_upload([tok(1, on_now)], on_now)                       # == now is not after now
    with pytest.raises(Refusal) as refused:
        check_upload([tok(1), tok(1, EXPIRY + timedelta(hours=1))], NOW)
    assert (refused.value.code, refused.value.field) == ("duplicate_token", "tokens[1].token")
    sixteen = datetime(2026, 3, 17, 10, 0, tzinfo=UTC)                # default: 15 + 1 days
    assert check_upload([tok(2, sixteen), tok(1)], NOW) == [tok(1), tok(2, sixteen)]
    with pytest.raises(Refusal, match="16 days"):
        check_upload([tok(1, sixteen + timedelta(hours=1))], NOW)
    with pytest.raises(ValueError, match="naive"):
        check_upload([tok(1)], NOW.replace(tzinfo=None))


def test_since_leaves_out_expired_and_purge_deletes_them(board, path):
    soon = datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    board.add(U1, [tok(1, soon), tok(2)], NOW)
    board.add(U2, [tok(3, soon)], NOW)
    tokens, cursor, more = board.since(0, 10, soon)
    assert [t.token for t in tokens] == [tok(2).token] and cursor == 3 and not more
    assert board.purge_expired(soon) == 2
    assert rows(path, "SELECT token FROM positives") == [(tok(2).token,)]
    assert rows(path, "SELECT upload_id FROM uploads") == [(U1,)]    # U2's tokens all expired
    assert board.purge_expired(EXPIRY) == 1
    assert rows(path, "SELECT count(*) FROM uploads") == [(0,)]
    # Sequence numbers are never reused, so an old cursor never skips a new token.
    board.add("aaaaaaaa-0000-4000-8000-000000000009", [tok(4, EXPIRY + timedelta(days=1))],
              EXPIRY - timedelta(days=1))
    assert board.since(3, 10, EXPIRY - timedelta(days=1))[0] == [
        tok(4, EXPIRY + timedelta(days=1))]


def test_a_cursor_beyond_the_board_starts_over(board):
    board.add(U1, [tok(1)], NOW)
    tokens, cursor, more = board.since(10_000, 10, NOW)
    assert [t.token for t in tokens] == [tok(1).token] and cursor == 1


def test_bad_arguments(board):
    for cursor, limit in ((-1, 10), (0, 0), (True, 10)):
        with pytest.raises(ValueError):
            board.since(cursor, limit, NOW)


def test_missing_directories_are_created(tmp_path):
    path = tmp_path / "state" / "fanny" / "positives.sqlite3"
    SqlitePositiveBoard(path).close()
    assert path.exists() and (path.parent.stat().st_mode & 0o777) == 0o700


def test_data_survives_reopen(path):
    board = SqlitePositiveBoard(path)
    board.add(U1, [tok(1), tok(2)], NOW)
    board.close()
    board.close()                                                     # idempotent
    with pytest.raises(BoardError, match="closed"):
        board.since(0, 10, NOW)
    again = SqlitePositiveBoard(path)
    try:
        assert [t.token for t in again.since(0, 10, NOW)[0]] == [tok(1).token, tok(2).token]
        assert again.add(U1, [tok(1), tok(2)], NOW) == 2             # still idempotent
        assert again.count() == 2
    finally:
        again.close()


def test_add_is_durable_when_it_returns(path):
    """A process that dies right after add() returned (no close, no checkpoint) lost nothing."""
    script = textwrap.dedent(f"""
        import os, sys
        from datetime import datetime, UTC
        from broker.positives import SqlitePositiveBoard
        from fanny_tui.protocol.messages import PositiveToken
        board = SqlitePositiveBoard(sys.argv[1])
        expires_at = datetime(2026, 3, 14, 4, tzinfo=UTC)
        token = PositiveToken(token="{tok(7).token}", expires_at=expires_at)
        board.add("{U1}", [token], datetime(2026, 3, 1, 10, 30, tzinfo=UTC))
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    assert Path(str(path) + "-wal").exists()                          # not checkpointed
    assert rows(path, "SELECT token FROM positives") == [(tok(7).token,)]


def test_concurrent_adds_from_threads(board):
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(20):
                board.add(f"aaaaaaaa-0000-4000-8000-{k:06d}{i:06d}", [tok(k * 100 + i)], NOW)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(board.since(0, 1000, NOW)[0]) == 120


def test_unusable_files_raise_board_error(tmp_path):
    plain = tmp_path / "plain-file"
    plain.write_text("a file, not a directory")
    with pytest.raises(BoardError, match="cannot create its directory"):
        SqlitePositiveBoard(plain / "sub" / "x.sqlite3")
    with pytest.raises(BoardError, match="cannot open"):
        SqlitePositiveBoard(tmp_path)                                 # a directory
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database, just text " * 100)
    with pytest.raises(BoardError, match="cannot open"):
        SqlitePositiveBoard(junk)
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE people (name TEXT)")
    with pytest.raises(BoardError, match="not a positive board"):
        SqlitePositiveBoard(foreign)
    newer = tmp_path / "newer.sqlite3"
    SqlitePositiveBoard(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(BoardError, match="newer than this broker"):
        SqlitePositiveBoard(newer)


def test_board_module_imports_no_asyncio_or_ui():
    code = ("import sys, broker.positives; bad = {'asyncio', 'websockets', 'textual', "
            "'aiortc'} & set(sys.modules); print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
