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
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg

from fanny_tui.protocol.messages import PositiveToken

from .positives import (
    DEFAULT_MAX_EXPIRY_AHEAD,
    BoardError,
    CodePolicy,
    CodeRecord,
    add_upload,
    check_code_hash,
    code_record,
    current_time,
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


class _PostgresWrite:
    """:class:`broker.positives.BoardWrite` inside a transaction holding the ``board`` lock."""

    def __init__(self, db: psycopg.Connection) -> None:
        self.db = db

    def upload(self, upload_id: str) -> tuple[int, str] | None:
        row = self.db.execute("SELECT count, digest FROM uploads WHERE upload_id = %s",
                              (upload_id,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def code(self, code_hash: str) -> CodeRecord | None:
        return code_record(self.db.execute(
            "SELECT expires_at, uploads, used_until, declaration_hash FROM codes "
            "WHERE code_hash = %s", (code_hash,)).fetchone())

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
        self.db.execute(
            "INSERT INTO uploads (upload_id, count, digest, keep_until) "
            "VALUES (%s, %s, %s, %s)",
            (upload_id, len(tokens), digest, max(unix_seconds(t.expires_at) for t in tokens)))

    def consume(self, code_hash: str, used_until: datetime,
                declaration_hash: str | None) -> None:
        self.db.execute(
            "UPDATE codes SET used_until = coalesce(used_until, %s), declaration_hash = "
            "CASE WHEN uploads = 0 THEN %s ELSE declaration_hash END, uploads = uploads + 1 "
            "WHERE code_hash = %s", (unix_seconds(used_until), declaration_hash, code_hash))


class PostgresPositiveBoard:
    """:class:`broker.positives.PositiveBoard` in a PostgreSQL database (psycopg 3).

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
        if max_expiry_ahead <= timedelta(0):
            raise ValueError("max_expiry_ahead must be positive")
        self.max_expiry_ahead = max_expiry_ahead
        self.code_policy = code_policy or CodePolicy()
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

    def add(
        self,
        upload_id: str,
        tokens: Sequence[PositiveToken],
        now: datetime | None = None,
        *,
        code_hash: str | None = None,
        code_required: bool = True,
        declaration_hash: str | None = None,
    ) -> int:
        """See :meth:`broker.positives.PositiveBoard.add`; ``now=None`` means the current UTC
        time. Returns after ``COMMIT``."""
        now = current_time(now)
        with self._transaction("store an upload") as db:
            db.execute("SELECT 1 FROM board FOR UPDATE")   # uploads one after the other
            return add_upload(
                _PostgresWrite(db), upload_id, tokens, now, code_hash=code_hash,
                declaration_hash=declaration_hash, code_required=code_required,
                policy=self.code_policy, max_expiry_ahead=self.max_expiry_ahead)

    def add_code(self, code_hash: str, expires_at: datetime) -> None:
        """See :meth:`broker.positives.PositiveBoard.add_code`."""
        check_code_hash(code_hash)
        at = unix_seconds(expires_at)
        with self._transaction("store a code") as db:
            row = db.execute("INSERT INTO codes (code_hash, expires_at) VALUES (%s, %s) "
                             "ON CONFLICT (code_hash) DO NOTHING RETURNING 1",
                             (code_hash, at)).fetchone()
            if row is None:
                raise BoardError("this declaration code is already stored")

    def code_record(self, code_hash: str) -> CodeRecord | None:
        """What the board holds for a code hash, or ``None`` (for tools and tests)."""
        check_code_hash(code_hash)
        with self._transaction("be read") as db:
            return _PostgresWrite(db).code(code_hash)

    def since(
        self, cursor: int, limit: int, now: datetime | None = None
    ) -> tuple[list[PositiveToken], int, bool]:
        """See :meth:`broker.positives.PositiveBoard.since`; ``now=None`` means the current UTC
        time. A ``cursor`` beyond the last one ever published (the board was reset) counts
        as 0, so a poller never silently misses tokens."""
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
            raise ValueError(f"cursor must be an integer >= 0, got {cursor!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
        at = unix_seconds(current_time(now))
        with self._transaction("be read", snapshot=True) as db:
            row = db.execute("SELECT last_seq FROM board").fetchone()
            high = int(row[0]) if row else 0
            if cursor > high:
                cursor = 0
            rows = db.execute(
                "SELECT seq, token, expires_at FROM positives "
                "WHERE seq > %s AND expires_at > %s ORDER BY seq LIMIT %s",
                (cursor, at, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        new_cursor = int(rows[-1][0]) if more else max(high, cursor)
        tokens = [PositiveToken(token=token, expires_at=datetime.fromtimestamp(exp, UTC))
                  for _, token, exp in rows]
        return tokens, new_cursor, more

    def last_cursor(self) -> int:
        """See :meth:`broker.positives.PositiveBoard.last_cursor`."""
        with self._transaction("be read") as db:
            row = db.execute("SELECT last_seq FROM board").fetchone()
        return int(row[0]) if row else 0

    def rows(self, after: int, upto: int, now: datetime | None = None
             ) -> list[tuple[str, int]]:
        """See :meth:`broker.positives.PositiveBoard.rows`; ``now=None`` means the current UTC
        time."""
        at = unix_seconds(current_time(now))
        with self._transaction("be read") as db:
            return [(str(token), int(exp)) for token, exp in db.execute(
                "SELECT token, expires_at FROM positives "
                "WHERE seq > %s AND seq <= %s AND expires_at > %s ORDER BY seq",
                (after, upto, at))]

    def purge_expired(self, now: datetime | None = None) -> int:
        """See :meth:`broker.positives.PositiveBoard.purge_expired`; ``now=None`` means the
        current UTC time."""
        at = unix_seconds(current_time(now))
        with self._transaction("purge") as db:
            purged = db.execute("DELETE FROM positives WHERE expires_at <= %s", (at,)).rowcount
            db.execute("DELETE FROM uploads WHERE keep_until <= %s", (at,))
            db.execute("DELETE FROM codes WHERE greatest(expires_at, "
                       "coalesce(used_until, 0)) <= %s", (at,))
        return int(purged)

    def count(self) -> int:
        """Number of tokens on the board (expired ones included until purged)."""
        with self._transaction("be read") as db:
            row = db.execute("SELECT count(*) FROM positives").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """See :meth:`broker.positives.PositiveBoard.close`."""
        with self._lock:
            self._closed = True
            self._drop()
