"""The positive-token board in PostgreSQL, shared by the broker processes of a region (issue 8).

Paper section 4 (servers per city or region) and section 5 (several organizations' servers):
several stateless broker processes behind a load balancer publish to and poll from one board.
:class:`PostgresPositiveBoard` is :class:`broker.positives.PositiveBoard` with the same rules as
the embedded SQLite board -- the checks and writes of an upload are the one
:func:`broker.positives.add_upload`, over a PostgreSQL transaction here -- and the same stored
data (privacy: no session ID, no address, no time of upload):

* ``positives``: ``seq`` (the poll cursor), ``token`` (64 hex), ``expires_at`` (Unix seconds,
  UTC, on the hour);
* ``uploads``: ``upload_id``, ``count``, ``digest``, ``keep_until`` (idempotent retries);
* ``codes``: ``code_hash``, ``expires_at``, ``uploads``, ``used_until``, ``declaration_hash``;
* ``board``: one row, ``last_seq`` (the cursor of the last token ever published) and the
  schema ``version``.

Cursors. A PostgreSQL sequence hands out numbers at insert time, not in commit order, so a
poller could see cursor 12 committed before 11 and skip 11 for good. Here every upload takes the
``board`` row's lock first (``SELECT ... FOR UPDATE``), so the uploads of every broker are
written one after the other; ``seq`` is ``last_seq + 1 ...`` and ``last_seq`` moves in the
same transaction: a committed cursor is never followed by a smaller one, and a rolled-back
upload leaves no gap. A poll reads ``last_seq`` and the tokens in one ``REPEATABLE READ``
snapshot. The lock also makes "only one upload wins a code" hold across brokers.

Durability: :meth:`PostgresPositiveBoard.add` returns after ``COMMIT`` returned, i.e. as durable
as the server's ``synchronous_commit`` makes it (its default, ``on``: flushed to the WAL). The
schema is created with ``CREATE TABLE IF NOT EXISTS`` when the board is opened (under an
advisory lock, so brokers starting together do not race); the database itself must exist. The
``fanny-broker`` command does not rely on that: ``create-board --postgres URL`` creates the
schema, and ``serve`` and ``issue-code`` refuse a database without it (:func:`board_exists`).

Deleted rows (expired tokens) stay in the table files until ``VACUUM`` reclaims them
(autovacuum does, by default; an operator may run ``VACUUM`` sooner), unlike SQLite's
``secure_delete``.

Thread-safe: one connection guarded by a lock (the server calls the board from worker
threads); a connection found broken (the server restarted) is replaced at the next call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta

import psycopg

from fanny_tui.protocol.messages import PositiveToken

from .positives import (
    DEFAULT_MAX_EXPIRY_AHEAD,
    BoardError,
    CodePolicy,
    SqlBoard,
    SqlWrite,
    check_code_hash,
    unix_seconds,
)

SCHEMA_VERSION = 1
"""The schema version this code writes, kept in ``board.version``."""

_SCHEMA_LOCK = 0x46414E4E59  # "FANNY": the advisory lock held while creating the schema

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS board (
        id       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),  -- exactly one row
        last_seq BIGINT  NOT NULL,                  -- cursor of the last token ever published
        version  INTEGER NOT NULL                   -- schema version
    )""",
    f"INSERT INTO board (id, last_seq, version) VALUES (TRUE, 0, {SCHEMA_VERSION}) "
    "ON CONFLICT (id) DO NOTHING",
    """CREATE TABLE IF NOT EXISTS positives (
        seq        BIGINT PRIMARY KEY,              -- publication order, the poll cursor
        token      TEXT   NOT NULL UNIQUE CHECK (token ~ '^[0-9a-f]{64}$'),
        expires_at BIGINT NOT NULL                  -- Unix seconds, UTC, on the hour
    )""",
    "CREATE INDEX IF NOT EXISTS positives_expires_at ON positives (expires_at)",
    """CREATE TABLE IF NOT EXISTS uploads (
        upload_id  TEXT    PRIMARY KEY,             -- random UUIDv4, for idempotent retries
        count      INTEGER NOT NULL,
        digest     TEXT    NOT NULL,                -- SHA-256 of the sorted token list
        keep_until BIGINT  NOT NULL                 -- latest expiry of its tokens
    )""",
    """CREATE TABLE IF NOT EXISTS codes (
        code_hash        TEXT    PRIMARY KEY CHECK (code_hash ~ '^[0-9a-f]{64}$'),
        expires_at       BIGINT  NOT NULL,          -- Unix seconds: unused codes after this
        uploads          INTEGER NOT NULL DEFAULT 0,  -- committed uploads it authorized
        used_until       BIGINT,                    -- end of the continuation window
        declaration_hash TEXT                       -- SHA-256 of the first upload's secret
    )""",
)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def board_exists(url: str, *, connect_timeout_s: float = 10.0) -> bool:
    """Whether the PostgreSQL database at ``url`` holds a positive board (its ``board`` table,
    as :class:`PostgresPositiveBoard` creates it). Reads only; creates nothing.

    ``fanny-broker create-board --postgres`` creates the board explicitly; ``serve`` and
    ``issue-code`` use this to refuse a database without one (a mistyped database name
    would otherwise start an empty board), as they refuse a missing SQLite file.

    Raises:
        BoardError: the server cannot be reached, or the database does not exist: one line
            starting with ``postgres_url:`` (without the URL: it may hold a password).
    """
    try:
        with psycopg.connect(url, autocommit=True,
                             connect_timeout=max(1, round(connect_timeout_s))) as db:
            row = db.execute("SELECT to_regclass('board') IS NOT NULL").fetchone()
    except psycopg.Error as exc:
        raise BoardError(f"postgres_url: cannot open the positive board: "
                         f"{_one_line(exc)}") from None
    return bool(row and row[0])


class _PostgresWrite(SqlWrite):
    """:class:`broker.positives.BoardWrite` inside a transaction holding the ``board`` lock."""

    MARK = "%s"

    def publish(self, upload_id: str, tokens: Sequence[PositiveToken], digest: str) -> None:
        known = {row[0] for row in self.db.execute(
            "SELECT token FROM positives WHERE token = ANY(%s)", ([t.token for t in tokens],))}
        new = [t for t in tokens if t.token not in known]     # still in token order
        if new:
            row = self.db.execute("UPDATE board SET last_seq = last_seq + %s "
                                  "RETURNING last_seq", (len(new),)).fetchone()
            first = int(row[0]) - len(new) + 1 if row else 1
            self.db.execute(
                "INSERT INTO positives (seq, token, expires_at) "
                "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::bigint[]) "
                "ON CONFLICT (token) DO NOTHING",
                (list(range(first, first + len(new))), [t.token for t in new],
                 [unix_seconds(t.expires_at) for t in new]))
        self.record_upload(upload_id, tokens, digest)


class PostgresPositiveBoard(SqlBoard):
    """:class:`broker.positives.PositiveBoard` in a PostgreSQL database (psycopg 3): a
    :class:`broker.positives.SqlBoard`, as the SQLite board is.

    Args:
        url: the ``postgresql://`` URL (libpq connection string) of an existing database; the
            tables are created in it if missing.
        max_expiry_ahead: the allowed expiry window, see :func:`broker.positives.check_upload`.
        code_policy: how declaration codes are consumed, see :class:`broker.positives.CodePolicy`.
        connect_timeout_s: seconds to wait for the server when connecting.

    Raises:
        BoardError: the server cannot be reached, the database does not exist, the URL is
            malformed, or the schema is newer than this code -- one line starting with
            ``postgres_url:`` (the URL itself is not repeated: it may hold a password).
        ValueError: ``max_expiry_ahead`` is not positive.
    """

    def __init__(
        self,
        url: str,
        *,
        max_expiry_ahead: timedelta = DEFAULT_MAX_EXPIRY_AHEAD,
        code_policy: CodePolicy | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(max_expiry_ahead, code_policy)
        self._url = url
        self._timeout = max(1, round(connect_timeout_s))
        self._lock = threading.Lock()
        self._closed = False
        self._db: psycopg.Connection | None = None
        with self._lock:
            db = self._connect()
            try:
                self._setup(db)
            except psycopg.Error as exc:
                self._drop()
                raise BoardError(f"postgres_url: cannot create the positive board's tables: "
                                 f"{_one_line(exc)}") from None
            except BoardError:
                self._drop()
                raise

    def _connect(self) -> psycopg.Connection:
        try:
            self._db = psycopg.connect(self._url, autocommit=True,
                                       connect_timeout=self._timeout)
        except psycopg.Error as exc:
            raise BoardError(f"postgres_url: cannot open the positive board: "
                             f"{_one_line(exc)}") from None
        return self._db

    def _drop(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    @staticmethod
    def _setup(db: psycopg.Connection) -> None:
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT version FROM board").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise BoardError(
                    f"postgres_url: the positive board has schema version {version}, newer "
                    f"than this broker ({SCHEMA_VERSION}); upgrade the broker")

    def _conn(self) -> psycopg.Connection:
        """The connection (under the lock), reconnected if the last one broke."""
        if self._closed:
            raise BoardError("the positive board is closed")
        if self._db is None or self._db.closed or self._db.broken:
            self._drop()
            return self._connect()
        return self._db

    _WRITE = _PostgresWrite
    _LAST_CURSOR = "SELECT last_seq FROM board"

    @contextmanager
    def _transaction(self, what: str, *, snapshot: bool = False
                     ) -> Iterator[psycopg.Connection]:
        """One transaction under the lock: committed if the block ends normally, rolled back
        on any exception; a PostgreSQL error becomes ``BoardError("... could not WHAT")``.
        ``snapshot``: a read-only ``REPEATABLE READ`` transaction (one consistent view)."""
        with self._lock:
            db = self._conn()
            try:
                with db.transaction():
                    if snapshot:
                        db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    yield db
            except psycopg.Error as exc:
                if db.broken:
                    self._drop()            # the next call connects again
                raise BoardError(f"the positive board could not {what}: "
                                 f"{_one_line(exc)}") from None

    def _write(self, what: str) -> AbstractContextManager[psycopg.Connection]:
        """See :meth:`broker.positives.SqlBoard._write`."""
        return self._transaction(what)

    @staticmethod
    def _order_uploads(db: psycopg.Connection) -> None:
        """The ``board`` row's lock (``SELECT ... FOR UPDATE``): the uploads of every broker
        are written one after the other."""
        db.execute("SELECT 1 FROM board FOR UPDATE")

    def _read(self, *, snapshot: bool = False) -> AbstractContextManager[psycopg.Connection]:
        """See :meth:`broker.positives.SqlBoard._read`."""
        return self._transaction("be read", snapshot=snapshot)

    def add_code(self, code_hash: str, expires_at: datetime) -> None:
        """See :meth:`broker.positives.PositiveBoard.add_code`."""
        check_code_hash(code_hash)
        at = unix_seconds(expires_at)
        with self._write("store a code") as db:
            row = db.execute("INSERT INTO codes (code_hash, expires_at) VALUES (%s, %s) "
                             "ON CONFLICT (code_hash) DO NOTHING RETURNING 1",
                             (code_hash, at)).fetchone()
            if row is None:
                raise BoardError("this declaration code is already stored")

    def close(self) -> None:
        """See :meth:`broker.positives.PositiveBoard.close`."""
        with self._lock:
            self._closed = True
            self._drop()
