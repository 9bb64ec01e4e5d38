"""broker.positives and broker.postgres_board: the positive-token board on both backends.

One set of tests for every board: the fixture ``backend`` runs each test on a real SQLite file
and on a fresh database of a real PostgreSQL server (tests/pg.py). Tests of one backend's own
storage (SQLite files, WAL, schema upgrades) take ``path`` and the SQLite board directly."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker import Refusal
from broker.positives import (
    SCHEMA_VERSION,
    BatchPages,
    BoardError,
    CodePolicy,
    CodeRecord,
    PositiveBoard,
    SqlitePositiveBoard,
    check_code,
    check_upload,
)
from broker.postgres_board import PostgresPositiveBoard
from fanny_tui.protocol.batch import TokenFrame, decode_batch_frame
from fanny_tui.protocol.codes import code_hash, declaration_hash, format_code, new_declaration
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


@dataclass
class Backend:
    """Where a board lives: an SQLite file or a PostgreSQL database, opened and read directly."""

    name: str
    target: Any                       # the SQLite file's Path or the database's URL

    def open(self, **options: Any) -> SqlitePositiveBoard | PostgresPositiveBoard:
        if self.name == "sqlite":
            return SqlitePositiveBoard(self.target, **options)
        return PostgresPositiveBoard(self.target, **options)

    def rows(self, sql: str) -> list[tuple]:
        """Run ``sql`` on the board's storage, from outside the board."""
        if self.name == "sqlite":
            return rows(self.target, sql)
        with psycopg.connect(self.target) as db:
            return [tuple(r) for r in db.execute(sql).fetchall()]  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", path)
    return Backend("postgres", request.getfixturevalue("postgres_url"))


@pytest.fixture
def board(backend: Backend) -> Iterator[SqlitePositiveBoard | PostgresPositiveBoard]:
    b = backend.open()
    yield b
    b.close()


def rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


@pytest.fixture
def sqlite_board(path: Path) -> Iterator[SqlitePositiveBoard]:
    b = SqlitePositiveBoard(path)
    yield b
    b.close()


def test_new_file_gets_schema_version_wal_and_full_sync(sqlite_board, path):
    assert isinstance(sqlite_board, PositiveBoard)
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]
    assert sqlite_board._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


STORED_COLUMNS = {
    "positives": ["seq", "token", "expires_at"],
    "uploads": ["upload_id", "count", "digest", "keep_until"],
    "codes": ["code_hash", "expires_at", "uploads", "used_until", "declaration_hash"],
}
"""Every column a board stores (privacy: no session ID, address or time of upload)."""


def test_only_token_expiry_sequence_upload_id_and_code_hash_are_stored(board, backend):
    assert isinstance(board, PositiveBoard)
    if backend.name == "sqlite":
        tables = {r[0] for r in backend.rows(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {table: [r[1] for r in backend.rows(f"PRAGMA table_info({table})")]
                   for table in tables - {"sqlite_sequence"}}
        assert tables - set(columns) == {"sqlite_sequence"}   # SQLite's own AUTOINCREMENT
    else:
        columns = {}
        for table, column in backend.rows(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"):
            columns.setdefault(table, []).append(column)
        assert columns.pop("board") == ["id", "last_seq", "version"]   # the cursor's row
    assert columns == STORED_COLUMNS


def test_add_then_since_in_publication_order(board):
    assert board.add(U1, [tok(3), tok(1), tok(2)], NOW, code_required=False) == 3
    assert board.add(U2, [tok(9)], NOW, code_required=False) == 1
    tokens, cursor, more = board.since(0, 100, NOW)
    # Within an upload, token order (not the order the device sent them), then uploads in order.
    assert [t.token for t in tokens] == [tok(n).token for n in (1, 2, 3, 9)]
    assert all(t.expires_at == EXPIRY for t in tokens)
    assert (cursor, more) == (4, False)
    assert board.since(cursor, 100, NOW) == ([], 4, False)


def test_since_pages_with_limit_and_cursor(board):
    board.add(U1, [tok(n) for n in range(5)], NOW, code_required=False)
    seen, cursor, pages = [], 0, 0
    while True:
        tokens, cursor, more = board.since(cursor, 2, NOW)
        seen += [t.token for t in tokens]
        pages += 1
        if not more:
            break
    assert seen == [tok(n).token for n in range(5)] and pages == 3
    board.add(U2, [tok(7)], NOW, code_required=False)
    assert [t.token for t in board.since(cursor, 2, NOW)[0]] == [tok(7).token]


def test_idempotent_upload_id_and_known_tokens(board, backend):
    upload = [tok(1), tok(2)]
    assert board.add(U1, upload, NOW, code_required=False) == 2
    assert board.add(U1, list(reversed(upload)), NOW, code_required=False) == 2   # a retry
    # tok(2) already known:
    assert board.add(U2, [tok(2), tok(3)], NOW, code_required=False) == 2
    assert backend.rows("SELECT count(*) FROM positives") == [(3,)]
    assert backend.rows("SELECT count(*) FROM uploads") == [(2,)]
    # Duplicates inside one upload count once.
    assert board.add("aaaaaaaa-0000-4000-8000-000000000003", [tok(5), tok(5)], NOW,
                     code_required=False) == 1


def test_reused_upload_id_with_other_tokens_is_refused(board, backend):
    board.add(U1, [tok(1)], NOW, code_required=False)
    with pytest.raises(Refusal) as refused:
        board.add(U1, [tok(2)], NOW, code_required=False)
    assert (refused.value.code, refused.value.field) == ("upload_conflict", "upload_id")
    assert backend.rows("SELECT token FROM positives") == [(tok(1).token,)]


def test_retry_is_acknowledged_even_after_some_tokens_expired(board):
    soon = datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    assert board.add(U1, [tok(1, soon), tok(2)], NOW, code_required=False) == 2
    assert board.add(U1, [tok(1, soon), tok(2)], soon + timedelta(hours=1),
                     code_required=False) == 2


def test_expiry_window_is_enforced_all_or_nothing(backend):
    board = backend.open(max_expiry_ahead=timedelta(days=2))
    try:
        latest = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)       # <= NOW + 2 days
        cases = [
            ([tok(1, latest), tok(2, datetime(2026, 3, 1, 10, tzinfo=UTC))],
             "tokens[1].expires_at"),
            ([tok(1, datetime(2026, 3, 3, 11, 0, tzinfo=UTC))], "tokens[0].expires_at"),
        ]
        for upload, field in cases:
            with pytest.raises(Refusal) as refused:
                board.add(U1, upload, NOW, code_required=False)
            assert (refused.value.code, refused.value.field) == ("expiry_out_of_window", field)
        assert backend.rows("SELECT count(*) FROM positives") == [(0,)]
        assert backend.rows("SELECT count(*) FROM uploads") == [(0,)]
        assert board.add(U1, [tok(1, latest), tok(2, datetime(2026, 3, 1, 11, tzinfo=UTC))],
                         NOW, code_required=False) == 2
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


def test_since_leaves_out_expired_and_purge_deletes_them(board, backend):
    soon = datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    board.add(U1, [tok(1, soon), tok(2)], NOW, code_required=False)
    board.add(U2, [tok(3, soon)], NOW, code_required=False)
    tokens, cursor, more = board.since(0, 10, soon)
    assert [t.token for t in tokens] == [tok(2).token] and cursor == 3 and not more
    assert board.purge_expired(soon) == 2
    assert backend.rows("SELECT token FROM positives") == [(tok(2).token,)]
    assert backend.rows("SELECT upload_id FROM uploads") == [(U1,)]    # U2's tokens all expired
    assert board.purge_expired(EXPIRY) == 1
    assert backend.rows("SELECT count(*) FROM uploads") == [(0,)]
    # Sequence numbers are never reused, so an old cursor never skips a new token.
    board.add("aaaaaaaa-0000-4000-8000-000000000009", [tok(4, EXPIRY + timedelta(days=1))],
              EXPIRY - timedelta(days=1), code_required=False)
    assert board.since(3, 10, EXPIRY - timedelta(days=1))[0] == [
        tok(4, EXPIRY + timedelta(days=1))]


def test_a_cursor_beyond_the_board_starts_over(board):
    board.add(U1, [tok(1)], NOW, code_required=False)
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


def test_data_survives_reopen(backend):
    board = backend.open()
    board.add(U1, [tok(1), tok(2)], NOW, code_required=False)
    board.close()
    board.close()                                                     # idempotent
    with pytest.raises(BoardError, match="closed"):
        board.since(0, 10, NOW)
    again = backend.open()
    try:
        assert [t.token for t in again.since(0, 10, NOW)[0]] == [tok(1).token, tok(2).token]
        assert again.add(U1, [tok(1), tok(2)], NOW, code_required=False) == 2   # idempotent
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
        board.add("{U1}", [token], datetime(2026, 3, 1, 10, 30, tzinfo=UTC), code_required=False)
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
                board.add(f"aaaaaaaa-0000-4000-8000-{k:06d}{i:06d}", [tok(k * 100 + i)], NOW,
                          code_required=False)
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


# --- schema migration ------------------------------------------------------------------------


V1_SCHEMA = """
CREATE TABLE positives (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    token      TEXT    NOT NULL UNIQUE CHECK (length(token) = 64),
    expires_at INTEGER NOT NULL
);
CREATE INDEX positives_expires_at ON positives (expires_at);
CREATE TABLE uploads (
    upload_id  TEXT    PRIMARY KEY,
    count      INTEGER NOT NULL,
    digest     TEXT    NOT NULL,
    keep_until INTEGER NOT NULL
) WITHOUT ROWID;
PRAGMA journal_mode = WAL;
PRAGMA user_version = 1;
"""
"""The board as the issue-2 broker wrote it (schema version 1), copied here verbatim."""


def test_a_version_1_board_is_upgraded_in_place(path):
    token = tok(1)
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO positives (token, expires_at) VALUES (?, ?)",
                   (token.token, int(EXPIRY.timestamp())))
        db.execute("INSERT INTO uploads VALUES (?, 1, 'x', ?)", (U1, int(EXPIRY.timestamp())))
    inode = path.stat().st_ino
    board = SqlitePositiveBoard(path)
    try:
        assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 3
        assert [r[1] for r in rows(path, "PRAGMA table_info(codes)")] == STORED_COLUMNS["codes"]
        assert path.stat().st_ino == inode                          # the same file, in place
        assert board.since(0, 10, NOW) == ([token], 1, False)       # its data kept
        code = format_code(bytes(10))
        board.add_code(code_hash(code), NOW + timedelta(hours=1))
        assert board.add(U2, [tok(2)], NOW, code_hash=code_hash(code)) == 1
        assert [t.token for t in board.since(1, 10, NOW)[0]] == [tok(2).token]
    finally:
        board.close()
    SqlitePositiveBoard(path).close()                               # and reopens as version 3
    assert rows(path, "SELECT uploads FROM codes") == [(1,)]


V2_CODES = """
CREATE TABLE codes (
    code_hash  TEXT    PRIMARY KEY CHECK (length(code_hash) = 64),
    expires_at INTEGER NOT NULL,
    uploads    INTEGER NOT NULL DEFAULT 0,
    used_until INTEGER
) WITHOUT ROWID;
PRAGMA user_version = 2;
"""
"""The codes table of schema version 2 (issue 5), copied here verbatim."""


def test_a_version_2_board_is_upgraded_and_its_used_codes_authorize_nothing_more(path):
    used, fresh = format_code(bytes(10)), format_code(bytes([1] * 10))
    window = int((NOW + timedelta(minutes=10)).timestamp())
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA + V2_CODES)
        db.execute("INSERT INTO codes VALUES (?, ?, 1, ?)",
                   (code_hash(used), int(SOON.timestamp()), window))
        db.execute("INSERT INTO codes (code_hash, expires_at) VALUES (?, ?)",
                   (code_hash(fresh), int(SOON.timestamp())))
    board = SqlitePositiveBoard(path)
    try:
        assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert board.code_record(code_hash(used)).declaration_hash is None
        # Used before declarations existed: within its old window, still used up.
        refused(lambda: board.add(U1, [tok(1)], NOW, code_hash=code_hash(used),
                                  declaration_hash=D1), "code_used")
        assert board.add(U1, [tok(1)], NOW, code_hash=code_hash(fresh), declaration_hash=D1)
        assert board.code_record(code_hash(fresh)).declaration_hash == D1
    finally:
        board.close()


def test_a_failed_upgrade_leaves_the_version_1_file_untouched(path):
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        db.execute("CREATE TABLE codes (x TEXT)")      # a clash: the migration cannot create it
    with pytest.raises(BoardError, match="cannot open"):
        SqlitePositiveBoard(path)
    assert rows(path, "PRAGMA user_version") == [(1,)]
    assert [r[1] for r in rows(path, "PRAGMA table_info(codes)")] == ["x"]


# --- declaration codes -----------------------------------------------------------------------


CODE = format_code(bytes(range(10)))
OTHER = format_code(bytes(range(10, 20)))
SOON = NOW + timedelta(hours=1)
D1 = declaration_hash(new_declaration(bytes(range(32))))
D2 = declaration_hash(new_declaration(bytes(range(32, 64))))
"""Hashes of two declaration secrets (two devices' declarations)."""


def coded(board: SqlitePositiveBoard, *codes: str, expires_at: datetime = SOON) -> None:
    for code in codes:
        board.add_code(code_hash(code), expires_at)


def refused(call, code: str, field: str | None = "code") -> Refusal:
    with pytest.raises(Refusal) as caught:
        call()
    assert (caught.value.code, caught.value.field) == (code, field), caught.value
    return caught.value


def test_a_code_authorizes_and_is_consumed_with_the_commit(board, backend):
    coded(board, CODE)
    assert board.code_record(code_hash(CODE)) == CodeRecord(expires_at=SOON)
    assert board.add(U1, [tok(1), tok(2)], NOW, code_hash=code_hash(CODE)) == 2
    record = board.code_record(code_hash(CODE))
    assert record == CodeRecord(expires_at=SOON, uploads=1,
                                used_until=NOW + CodePolicy().grace)
    assert backend.rows("SELECT count(*) FROM positives") == [(2,)]


def test_uploads_without_a_valid_code_are_refused_and_store_nothing(board, backend):
    coded(board, CODE)
    coded(board, OTHER, expires_at=NOW)                   # expires exactly now
    refused(lambda: board.add(U1, [tok(1)], NOW), "code_required")
    refused(lambda: board.add(U1, [tok(1)], NOW, code_hash=code_hash("0" * 16)),
            "code_invalid")
    refused(lambda: board.add(U1, [tok(1)], NOW, code_hash=code_hash(OTHER)), "code_expired")
    assert backend.rows("SELECT count(*) FROM positives") == [(0,)]
    assert backend.rows("SELECT count(*) FROM uploads") == [(0,)]
    assert backend.rows("SELECT sum(uploads) FROM codes") == [(0,)]


def test_a_refused_upload_does_not_consume_its_code(board, backend):
    coded(board, CODE)
    past = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    refused(lambda: board.add(U1, [tok(1), tok(2, past)], NOW, code_hash=code_hash(CODE)),
            "expiry_out_of_window", "tokens[1].expires_at")
    assert board.add(U2, [tok(3)], NOW, code_hash=code_hash(CODE)) == 1   # still unused
    assert board.code_record(code_hash(CODE)).uploads == 1


def test_an_empty_upload_is_checked_but_consumes_nothing(board):
    coded(board, CODE)
    refused(lambda: board.add(U1, [], NOW), "code_required")
    assert board.add(U1, [], NOW, code_hash=code_hash(CODE)) == 0
    assert board.code_record(code_hash(CODE)).uploads == 0


def test_used_codes_continuation_window_and_cap(backend):
    board = backend.open(code_policy=CodePolicy(grace=timedelta(minutes=10),
                                                             max_uploads=3))
    try:
        coded(board, CODE)
        ids = [f"aaaaaaaa-0000-4000-8000-{n:012d}" for n in range(10)]
        assert board.add(ids[0], [tok(1)], NOW, code_hash=code_hash(CODE),
                         declaration_hash=D1) == 1
        # More uploads of the same declaration (over 500 tokens), even past the code's expiry.
        later = SOON + timedelta(seconds=1)
        assert board.add(ids[1], [tok(2)], NOW + timedelta(minutes=9), code_hash=code_hash(CODE),
                         declaration_hash=D1)
        assert board.add(ids[2], [tok(3)], NOW + timedelta(minutes=9), code_hash=code_hash(CODE),
                         declaration_hash=D1)
        refused(lambda: board.add(ids[3], [tok(4)], NOW + timedelta(minutes=9),
                                  code_hash=code_hash(CODE), declaration_hash=D1),
                "code_used")                                                     # the cap
        coded(board, OTHER)
        assert board.add(ids[4], [tok(5)], NOW, code_hash=code_hash(OTHER),
                         declaration_hash=D2) == 1
        refused(lambda: board.add(ids[5], [tok(6)], NOW + timedelta(minutes=10),
                                  code_hash=code_hash(OTHER), declaration_hash=D2),
                "code_used")                                                     # the window
        refused(lambda: board.add(ids[5], [tok(6)], later, code_hash=code_hash(OTHER),
                                  declaration_hash=D2), "code_used")
        # A retried upload whose ack was lost is answered without its (consumed) code.
        assert board.add(ids[0], [tok(1)], later) == 1
        assert board.add(ids[4], [tok(5)], later, code_hash=code_hash(OTHER)) == 1
        assert board.count() == 4
    finally:
        board.close()


def test_a_used_code_is_refused_at_once_to_another_declaration(board, backend):
    """Issue 8, point 3: a second device given the same code is refused at once, within the
    continuation window, while the first device's declaration goes on; nothing of the second
    is stored and its refusals do not count against the first."""
    coded(board, CODE)
    first = [f"aaaaaaaa-0000-4000-8000-{n:012d}" for n in range(3)]
    second = "bbbbbbbb-0000-4000-8000-000000000001"
    assert board.add(first[0], [tok(1)], NOW, code_hash=code_hash(CODE),
                     declaration_hash=D1) == 1
    refused(lambda: board.add(second, [tok(50)], NOW, code_hash=code_hash(CODE)), "code_used")
    refused(lambda: board.add(second, [tok(50)], NOW, code_hash=code_hash(CODE),
                              declaration_hash=D2), "code_used")
    assert board.add(first[1], [tok(2)], NOW + timedelta(minutes=1), code_hash=code_hash(CODE),
                     declaration_hash=D1) == 1
    assert backend.rows("SELECT count(*) FROM positives") == [(2,)]
    assert backend.rows(f"SELECT count(*) FROM uploads WHERE upload_id = '{second}'") == [(0,)]
    record = board.code_record(code_hash(CODE))
    assert (record.uploads, record.declaration_hash) == (2, D1)


def test_a_declaration_binds_its_code_only_when_it_commits(board):
    """A declaration whose first upload was refused (or empty) did not take the code: another
    declaration may still use it, and then owns it."""
    coded(board, CODE)
    past = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    refused(lambda: board.add(U1, [tok(1, past)], NOW, code_hash=code_hash(CODE),
                              declaration_hash=D1), "expiry_out_of_window", "tokens[0].expires_at")
    assert board.add(U1, [], NOW, code_hash=code_hash(CODE), declaration_hash=D1) == 0
    assert board.add(U2, [tok(2)], NOW, code_hash=code_hash(CODE), declaration_hash=D2) == 1
    refused(lambda: board.add("aaaaaaaa-0000-4000-8000-000000000003", [tok(3)], NOW,
                              code_hash=code_hash(CODE), declaration_hash=D1), "code_used")
    assert board.code_record(code_hash(CODE)).declaration_hash == D2


def test_a_code_used_without_a_declaration_authorizes_nothing_more(board):
    """An upload without a declaration secret (a client from before them) uses the code up."""
    coded(board, CODE)
    assert board.add(U1, [tok(1)], NOW, code_hash=code_hash(CODE)) == 1
    refused(lambda: board.add(U2, [tok(2)], NOW, code_hash=code_hash(CODE)), "code_used")
    refused(lambda: board.add(U2, [tok(2)], NOW, code_hash=code_hash(CODE),
                              declaration_hash=D1), "code_used")


def test_retries_of_a_declaration_stay_idempotent(board, backend):
    """A retried upload (its ack was lost) is answered again, with or without its secret, and
    a retry of the second device's refused upload is refused again."""
    coded(board, CODE)
    assert board.add(U1, [tok(1), tok(2)], NOW, code_hash=code_hash(CODE),
                     declaration_hash=D1) == 2
    for declared in (D1, None, D2):
        assert board.add(U1, [tok(2), tok(1)], NOW + timedelta(minutes=1),
                         code_hash=code_hash(CODE), declaration_hash=declared) == 2
    for _ in range(2):
        refused(lambda: board.add(U2, [tok(3)], NOW, code_hash=code_hash(CODE),
                                  declaration_hash=D2), "code_used")
    assert backend.rows("SELECT count(*) FROM positives") == [(2,)]
    assert board.code_record(code_hash(CODE)).uploads == 1


def test_a_malformed_declaration_hash_is_a_value_error(board):
    coded(board, CODE)
    with pytest.raises(ValueError, match="declaration hash"):
        board.add(U1, [tok(1)], NOW, code_hash=code_hash(CODE), declaration_hash="x")


def test_open_declarations_still_check_a_code_that_is_sent(board):
    coded(board, CODE)
    assert board.add(U1, [tok(1)], NOW, code_required=False) == 1
    refused(lambda: board.add(U2, [tok(2)], NOW, code_hash=code_hash(OTHER),
                              code_required=False), "code_invalid")
    assert board.add(U2, [tok(2)], NOW, code_hash=code_hash(CODE), code_required=False) == 1
    assert board.code_record(code_hash(CODE)).uploads == 1


def test_check_code_rules_for_other_backends():
    policy = CodePolicy(grace=timedelta(minutes=10), max_uploads=2)
    h = code_hash(CODE)
    fresh = CodeRecord(expires_at=SOON)
    used = CodeRecord(expires_at=SOON, uploads=1, used_until=NOW + timedelta(minutes=10),
                      declaration_hash=D1)
    check_code(h, fresh, NOW, code_required=True, policy=policy)
    check_code(h, fresh, NOW, code_required=True, policy=policy, declaration_hash=D2)
    check_code(h, used, NOW, code_required=True, policy=policy, declaration_hash=D1)
    check_code(None, None, NOW, code_required=False, policy=policy)
    cases = [
        (None, None, NOW, True, None, "code_required"),
        (h, None, NOW, False, None, "code_invalid"),
        (h, fresh, SOON, True, None, "code_expired"),
        (h, used, NOW + timedelta(minutes=10), True, D1, "code_used"),
        (h, CodeRecord(SOON, 2, NOW + timedelta(minutes=10), D1), NOW, True, D1, "code_used"),
        # A code is one declaration: used, it is refused at once to anyone without its secret.
        (h, used, NOW, True, None, "code_used"),
        (h, used, NOW, True, D2, "code_used"),
        (h, CodeRecord(SOON, 1, NOW + timedelta(minutes=10)), NOW, True, D1, "code_used"),
    ]
    for hashed, record, now, required, declared, code in cases:
        refused(lambda: check_code(hashed, record, now, code_required=required,  # noqa: B023
                                   policy=policy, declaration_hash=declared), code)  # noqa: B023
    with pytest.raises(ValueError):
        CodePolicy(max_uploads=0)


def test_add_code_rejects_bad_input_and_duplicates(board):
    with pytest.raises(ValueError, match="64 lowercase hex"):
        board.add_code(CODE, SOON)                           # the code itself, not its hash
    with pytest.raises(ValueError, match="64 lowercase hex"):
        board.add_code(code_hash(CODE).upper(), SOON)
    with pytest.raises(ValueError, match="naive"):
        board.add_code(code_hash(CODE), SOON.replace(tzinfo=None))
    coded(board, CODE)
    with pytest.raises(BoardError, match="already stored"):
        coded(board, CODE)


def test_purge_forgets_codes_past_expiry_and_window(board, backend):
    coded(board, CODE, OTHER)
    board.add(U1, [tok(1)], NOW, code_hash=code_hash(CODE))   # used: window ends NOW + 10 min
    assert board.purge_expired(NOW + timedelta(minutes=30)) == 0
    assert len(backend.rows("SELECT * FROM codes")) == 2
    assert board.purge_expired(SOON) == 0                     # both codes' expiry reached
    assert backend.rows("SELECT count(*) FROM codes") == [(0,)]


def test_only_one_upload_wins_a_code_across_connections(backend):
    """Two boards (two SQLite connections, as two broker processes would have) race."""
    policy = CodePolicy(max_uploads=1)
    boards = [backend.open(code_policy=policy) for _ in range(2)]
    codes = [format_code(n.to_bytes(10, "big")) for n in range(1, 21)]
    try:
        coded(boards[0], *codes)
        outcomes: list[str] = []
        lock = threading.Lock()

        def worker(k: int) -> None:
            for i, code in enumerate(codes):
                try:
                    boards[k].add(f"aaaaaaaa-0000-4000-8000-{k:06d}{i:06d}", [tok(k * 100 + i)],
                                  NOW, code_hash=code_hash(code))
                    result = "ok"
                except Refusal as exc:
                    result = exc.code
                with lock:
                    outcomes.append(result)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["code_used"] * 20 + ["ok"] * 20
        assert boards[0].count() == 20
    finally:
        for b in boards:
            b.close()


def test_a_crash_before_the_commit_leaves_the_code_unused(path):
    """The process dies between the inserts and COMMIT: no token, code still usable."""
    board = SqlitePositiveBoard(path)
    coded(board, CODE)
    board.close()
    script = textwrap.dedent(f"""
        import os, sys
        from datetime import datetime, UTC
        from broker.positives import SqlitePositiveBoard
        from fanny_tui.protocol.messages import PositiveToken

        class Dying:
            def __init__(self, db):
                self.db = db
            def execute(self, sql, *args):
                if sql == "COMMIT" and self.db.in_transaction:
                    os._exit(3)                       # killed just before the commit
                return self.db.execute(sql, *args)
            def __getattr__(self, name):
                return getattr(self.db, name)

        board = SqlitePositiveBoard(sys.argv[1])
        real = board._conn()
        board._conn = lambda: Dying(real)
        token = PositiveToken(token="{tok(7).token}",
                              expires_at=datetime(2026, 3, 14, 4, tzinfo=UTC))
        board.add("{U1}", [token], datetime(2026, 3, 1, 10, 30, tzinfo=UTC),
                  code_hash="{code_hash(CODE)}")
        sys.exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(path)], timeout=60)
    assert done.returncode == 3                                   # it did die mid-way
    again = SqlitePositiveBoard(path)
    try:
        assert again.count() == 0
        assert again.code_record(code_hash(CODE)) == CodeRecord(expires_at=SOON)
        assert again.add(U1, [tok(7)], NOW, code_hash=code_hash(CODE)) == 1
    finally:
        again.close()


# --- BatchPages: binary frames encoded once, shared ----------------------------------------


def test_pages_cut_ranges_at_multiples_of_the_span(board):
    pages = BatchPages(board, frame_span=4)
    assert list(pages.spans(0, 10)) == [(0, 4), (4, 8), (8, 10)]
    assert list(pages.spans(6, 10)) == [(6, 8), (8, 10)]
    assert list(pages.spans(10, 10)) == []


def test_a_frame_holds_the_unexpired_tokens_of_its_range(board):
    soon = datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    board.add("00000000-0000-4000-8000-000000000001",
              [tok(1), tok(2, soon), tok(3)], NOW, code_required=False)
    pages = BatchPages(board, frame_span=8)
    frame = decode_batch_frame(pages.frame(0, 3, soon))
    assert isinstance(frame, TokenFrame) and frame.cursor == 3
    assert sorted(frame.hex_tokens()) == [tok(1).token, tok(3).token]
    assert pages.frame(3, 3, NOW) is None                  # an empty range: no frame


def test_pollers_asking_at_once_share_one_encoding(board):
    board.add("00000000-0000-4000-8000-000000000001",
              [tok(n) for n in range(2000)], NOW, code_required=False)
    pages = BatchPages(board, frame_span=4096)
    results: list[bytes | None] = []
    threads = [threading.Thread(target=lambda: results.append(pages.frame(0, 2000, NOW)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pages.encoded == 1
    assert len(set(results)) == 1 and results[0] is not None


def test_the_cache_is_bounded_and_drops_the_least_recently_used(board):
    board.add("00000000-0000-4000-8000-000000000001",
              [tok(n) for n in range(12)], NOW, code_required=False)
    one = 14 + 1 + 2 + 4 * 32                               # a frame of 4 tokens, one expiry
    pages = BatchPages(board, frame_span=4, cache_bytes=2 * one)
    for lo, hi in pages.spans(0, 12):
        pages.frame(lo, hi, NOW)
    assert pages.encoded == 3
    pages.frame(4, 8, NOW)                                  # cached: the last two are kept
    pages.frame(8, 12, NOW)
    assert pages.encoded == 3
    pages.frame(0, 4, NOW)                                  # dropped: encoded again
    assert pages.encoded == 4
    pages.invalidate()
    pages.frame(8, 12, NOW)
    assert pages.encoded == 5
