"""The positive-token board: tokens of positive declarations, published to every poller.

Paper section 4, steps 2-4: a device declared positive uploads its tokens with their expiry;
every other device polls the board and compares locally. The board never learns who uploaded
or who polls: uploads arrive on anonymous connections (no session ID), and the board stores
only what it must:

* each token with its expiry (UTC, on the hour) and a publication sequence number (the poll
  cursor); tokens of one upload are inserted in token order, not in the order the device sent
  them, so the sequence reveals nothing about when each contact happened;
* each ``upload_id`` (a random UUIDv4 unrelated to any session) with its token count and a
  digest of its tokens, only so that a retried upload is answered idempotently; it is dropped
  when the last of its tokens expires.

No session ID, no address, no time of upload. Expired tokens are deleted (``secure_delete``
overwrites their bytes).

:class:`PositiveBoard` is the interface the server uses (synchronous methods, run in a worker
thread with :func:`asyncio.to_thread`); :class:`SqlitePositiveBoard` is the default
implementation. Another backend (Redis, PostgreSQL) implements the same four methods and
reuses :func:`check_upload` for the validation rules.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

from fanny_tui.protocol.errors import FannyError
from fanny_tui.protocol.expiry import DEFAULT_LIFETIME_DAYS, require_utc
from fanny_tui.protocol.messages import PositiveToken

from . import Refusal

SCHEMA_VERSION = 1
"""The schema version this code writes, kept in ``PRAGMA user_version``."""

DEFAULT_MAX_EXPIRY_AHEAD = timedelta(days=DEFAULT_LIFETIME_DAYS + 1)
"""How far ahead an uploaded expiry may be: the token lifetime (15 days) plus one day for the
rounding up to the deletion hour (paper section 3, step 6, footnote 3)."""


class BoardError(FannyError):
    """The board itself failed: cannot open or write its storage, or it is closed.

    Not the client's fault; the server answers ``unavailable`` and the client retries.
    """


@runtime_checkable
class PositiveBoard(Protocol):
    """The positive-token board as the server sees it. Every method is thread-safe.

    Implementations must make :meth:`add` durable before it returns, publish tokens in a
    total order with an integer cursor, and never store anything that links an upload to a
    device, a session, an address or a time.
    """

    def add(self, upload_id: str, tokens: Sequence[PositiveToken], now: datetime) -> int:
        """Publish the tokens of one positive declaration (paper section 4, step 2).

        Durable before it returns, all or nothing. Idempotent: the same ``upload_id`` with the
        same tokens returns the same count and stores nothing twice; a token already on the
        board is not duplicated.

        Args:
            upload_id: the random UUIDv4 of the declaration.
            tokens: the tokens with their expiry (UTC, on the hour).
            now: the current time, aware (UTC).

        Returns:
            The number of distinct tokens in the upload.

        Raises:
            Refusal: see :func:`check_upload`; ``upload_conflict`` (field ``upload_id``) when
                the ``upload_id`` is known with other tokens.
            BoardError: the storage failed.
        """
        ...

    def since(
        self, cursor: int, limit: int, now: datetime
    ) -> tuple[list[PositiveToken], int, bool]:
        """Tokens published after ``cursor``, oldest first, unexpired only (section 4, step 4).

        Args:
            cursor: 0 for everything, else the cursor a previous call returned.
            limit: at most this many tokens, >= 1.
            now: the current time, aware (UTC); tokens with ``expires_at <= now`` are left out.

        Returns:
            ``(tokens, new_cursor, more)``: pass ``new_cursor`` next time; ``more`` is True
            when another call now would return more tokens.

        Raises:
            ValueError: ``cursor`` < 0 or ``limit`` < 1.
            BoardError: the storage failed.
        """
        ...

    def purge_expired(self, now: datetime) -> int:
        """Delete every token with ``expires_at <= now``; returns how many were deleted."""
        ...

    def close(self) -> None:
        """Release the storage. Idempotent; other methods raise :class:`BoardError` after."""
        ...


def check_upload(
    tokens: Sequence[PositiveToken],
    now: datetime,
    max_expiry_ahead: timedelta = DEFAULT_MAX_EXPIRY_AHEAD,
) -> list[PositiveToken]:
    """Validate the tokens of an upload and return them deduplicated, sorted by token.

    Args:
        tokens: the uploaded tokens (already validated as wire messages: 64 hex, UTC hour).
        now: the current time, aware.
        max_expiry_ahead: the latest allowed expiry is ``now + max_expiry_ahead``.

    Returns:
        The distinct tokens, sorted by token text.

    Raises:
        Refusal: ``expiry_out_of_window`` when an expiry is not after ``now`` or later than
            ``now + max_expiry_ahead`` (field ``tokens[i].expires_at``); ``duplicate_token``
            when the same token appears twice with different expiries (field
            ``tokens[i].token``).
        ValueError: ``now`` is naive.
    """
    now = require_utc(now)
    latest = now + max_expiry_ahead
    for i, item in enumerate(tokens):
        expires_at = item.expires_at.astimezone(UTC)
        if expires_at <= now:
            raise Refusal("expiry is in the past: expired tokens are not published",
                          code="expiry_out_of_window", field=f"tokens[{i}].expires_at")
        if expires_at > latest:
            raise Refusal(
                f"expiry is more than {max_expiry_ahead.total_seconds() / 86400:g} days ahead",
                code="expiry_out_of_window", field=f"tokens[{i}].expires_at")
    return distinct_tokens(tokens)


def distinct_tokens(tokens: Sequence[PositiveToken]) -> list[PositiveToken]:
    """The distinct tokens of an upload, sorted by token text, expiries in UTC.

    Raises:
        Refusal: ``duplicate_token`` when the same token appears twice with different
            expiries (field ``tokens[i].token``).
    """
    seen: dict[str, PositiveToken] = {}
    for i, item in enumerate(tokens):
        expires_at = item.expires_at.astimezone(UTC)
        known = seen.get(item.token)
        if known is not None and known.expires_at != expires_at:
            raise Refusal("the same token appears twice with different expiries",
                          code="duplicate_token", field=f"tokens[{i}].token")
        seen[item.token] = PositiveToken(token=item.token, expires_at=expires_at)
    return [seen[t] for t in sorted(seen)]


def _current(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else require_utc(now)


def _epoch(moment: datetime) -> int:
    return int(require_utc(moment).timestamp())


def _digest(tokens: Sequence[PositiveToken]) -> str:
    text = "".join(f"{t.token}:{_epoch(t.expires_at)}\n" for t in tokens)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


_SCHEMA = """
CREATE TABLE positives (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,  -- publication order, the poll cursor
    token      TEXT    NOT NULL UNIQUE CHECK (length(token) = 64),
    expires_at INTEGER NOT NULL                    -- Unix seconds, UTC, on the hour
);
CREATE INDEX positives_expires_at ON positives (expires_at);
CREATE TABLE uploads (
    upload_id  TEXT    PRIMARY KEY,                -- random UUIDv4, for idempotent retries
    count      INTEGER NOT NULL,
    digest     TEXT    NOT NULL,                   -- SHA-256 of the sorted token list
    keep_until INTEGER NOT NULL                    -- latest expiry of its tokens
) WITHOUT ROWID;
"""


class SqlitePositiveBoard:
    """:class:`PositiveBoard` in one SQLite file (WAL, ``synchronous=FULL``).

    Args:
        path: the database file; created (with its schema and, mode 0700, its missing parent
            directories) if missing.
        max_expiry_ahead: the allowed expiry window, see :func:`check_upload`.

    Raises:
        BoardError: the file cannot be opened or written, is not a FANNY board, or has a
            newer schema version than this code.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_expiry_ahead: timedelta = DEFAULT_MAX_EXPIRY_AHEAD,
    ) -> None:
        if max_expiry_ahead <= timedelta(0):
            raise ValueError("max_expiry_ahead must be positive")
        self.path = Path(path)
        self.max_expiry_ahead = max_expiry_ahead
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise BoardError(f"cannot open the positive board {self.path}: cannot create its "
                             f"directory: {exc.strerror or exc}") from None
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
            self._setup(self._db)
        except sqlite3.Error as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            raise BoardError(f"cannot open the positive board {self.path}: {exc}") from None
        except BoardError:
            if self._db is not None:
                self._db.close()
                self._db = None
            raise

    def _setup(self, db: sqlite3.Connection) -> None:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise BoardError(f"cannot use WAL journal mode on {self.path} (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA secure_delete=ON")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0:
                if tables - {"sqlite_sequence"}:
                    raise BoardError(f"{self.path} is an SQLite file but not a positive board")
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise BoardError(
                    f"{self.path} has schema version {version}, newer than this broker "
                    f"({SCHEMA_VERSION}); upgrade the broker")
            elif not {"positives", "uploads"} <= tables:
                raise BoardError(f"{self.path} is an SQLite file but not a positive board")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise BoardError("the positive board is closed")
        return self._db

    def add(
        self, upload_id: str, tokens: Sequence[PositiveToken], now: datetime | None = None
    ) -> int:
        """See :meth:`PositiveBoard.add`; ``now=None`` means the current UTC time."""
        now = _current(now)
        clean = distinct_tokens(tokens)
        digest = _digest(clean)
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    known = db.execute("SELECT count, digest FROM uploads WHERE upload_id = ?",
                                       (upload_id,)).fetchone()
                    if known is not None:
                        if known[1] != digest:
                            raise Refusal("this upload_id was already used for other tokens",
                                          code="upload_conflict", field="upload_id")
                        db.execute("ROLLBACK")
                        return int(known[0])
                    # Checked only for a new upload: a retry whose ack was lost is answered
                    # even if some of its tokens expired in the meantime.
                    check_upload(tokens, now, self.max_expiry_ahead)
                    if clean:
                        db.executemany(
                            "INSERT INTO positives (token, expires_at) VALUES (?, ?) "
                            "ON CONFLICT (token) DO NOTHING",
                            [(t.token, _epoch(t.expires_at)) for t in clean])
                        db.execute(
                            "INSERT INTO uploads (upload_id, count, digest, keep_until) "
                            "VALUES (?, ?, ?, ?)",
                            (upload_id, len(clean), digest,
                             max(_epoch(t.expires_at) for t in clean)))
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise BoardError(f"the positive board could not store an upload: {exc}") from None
        return len(clean)

    def since(
        self, cursor: int, limit: int, now: datetime | None = None
    ) -> tuple[list[PositiveToken], int, bool]:
        """See :meth:`PositiveBoard.since`; ``now=None`` means the current UTC time.

        A ``cursor`` beyond the last sequence number ever published (the board was reset)
        is treated as 0, so a poller never silently misses tokens.
        """
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
            raise ValueError(f"cursor must be an integer >= 0, got {cursor!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
        at = _epoch(_current(now))
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN")
                try:
                    row = db.execute(
                        "SELECT seq FROM sqlite_sequence WHERE name = 'positives'").fetchone()
                    high = int(row[0]) if row else 0
                    if cursor > high:
                        cursor = 0
                    rows = db.execute(
                        "SELECT seq, token, expires_at FROM positives "
                        "WHERE seq > ? AND expires_at > ? ORDER BY seq LIMIT ?",
                        (cursor, at, limit + 1)).fetchall()
                finally:
                    db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise BoardError(f"the positive board could not be read: {exc}") from None
        more = len(rows) > limit
        rows = rows[:limit]
        new_cursor = int(rows[-1][0]) if more else max(high, cursor)
        tokens = [PositiveToken(token=token, expires_at=datetime.fromtimestamp(exp, UTC))
                  for _, token, exp in rows]
        return tokens, new_cursor, more

    def purge_expired(self, now: datetime | None = None) -> int:
        """See :meth:`PositiveBoard.purge_expired`; ``now=None`` means the current UTC time.

        Also forgets the upload IDs whose tokens all expired.
        """
        at = _epoch(_current(now))
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    purged = db.execute("DELETE FROM positives WHERE expires_at <= ?",
                                        (at,)).rowcount
                    db.execute("DELETE FROM uploads WHERE keep_until <= ?", (at,))
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise BoardError(f"the positive board could not purge: {exc}") from None
        return int(purged)

    def count(self) -> int:
        """Number of tokens on the board (expired ones included until purged)."""
        with self._lock:
            try:
                return int(self._conn().execute("SELECT count(*) FROM positives").fetchone()[0])
            except sqlite3.Error as exc:
                raise BoardError(f"the positive board could not be read: {exc}") from None

    def close(self) -> None:
        """See :meth:`PositiveBoard.close`. Checkpoints the WAL into the main file."""
        with self._lock:
            if self._db is None:
                return
            db, self._db = self._db, None
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            finally:
                db.close()
