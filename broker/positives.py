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
  when the last of its tokens expires;
* each declaration code (paper section 5, "signature of compliance") as its SHA-256 only
  (:func:`fanny_tui.protocol.codes.code_hash`), with its expiry, the number of uploads it
  authorized and, once used, the end of its continuation window and the SHA-256 of the
  declaration secret its first upload carried (:func:`fanny_tui.protocol.codes.
  declaration_hash`). Nothing links a code to the upload IDs or tokens it authorized.

No session ID, no address, no time of upload. Expired tokens are deleted (``secure_delete``
overwrites their bytes).

Declaration codes (:meth:`PositiveBoard.add`): an upload is published only with a valid,
unexpired, unused code (unless the caller passes ``code_required=False``: open declarations),
and the code is consumed in the same transaction that commits the tokens, so an upload that
fails or a crash before the commit leaves the code unused. A code is one declaration (issue 8,
point 3). A declaration of more than
:data:`~fanny_tui.protocol.messages.MAX_TOKENS_PER_UPLOAD` tokens is several uploads, each with
the same code and the same declaration secret: the first commit consumes the code, binds it to
that secret and opens a continuation window (:class:`CodePolicy`) during which a few more
uploads with the code *and the same secret* are accepted. Anyone else (no secret, another one)
is refused ``code_used`` at once, and so is everyone after the window. A retried ``upload_id``
already committed is answered again without looking at the code.

:class:`PositiveBoard` is the interface the server uses (synchronous methods, run in a worker
thread with :func:`asyncio.to_thread`); :class:`SqlitePositiveBoard` is the default
implementation, :class:`broker.postgres_board.PostgresPositiveBoard` the one of a region of
several brokers. Both run the same :func:`add_upload` (the order of the checks and what is
written) over their own :class:`BoardWrite` transaction, and the same SQL of everything else
but the cursors (:class:`SqlBoard`, :class:`SqlWrite`), so the rules live here once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from fanny_tui.protocol.batch import encode_token_frame, group_by_hour
from fanny_tui.protocol.errors import FannyError
from fanny_tui.protocol.expiry import DEFAULT_LIFETIME_DAYS, require_utc
from fanny_tui.protocol.messages import PositiveToken
from fanny_tui.sqlite_util import transaction

from . import Refusal

SCHEMA_VERSION = 3
"""The schema version this code writes, kept in ``PRAGMA user_version``.

1: ``positives`` and ``uploads``. 2: adds ``codes`` (declaration codes). 3: adds
``codes.declaration_hash`` (a code is one declaration). An older file is upgraded in place when
opened; a code used before version 3 has no declaration hash and authorizes nothing more."""

DEFAULT_MAX_EXPIRY_AHEAD = timedelta(days=DEFAULT_LIFETIME_DAYS + 1)
"""How far ahead an uploaded expiry may be: the token lifetime (15 days) plus one day for the
rounding up to the deletion hour (paper section 3, step 6, footnote 3)."""

DEFAULT_CODE_GRACE = timedelta(minutes=10)
"""How long after its first committed upload a code still authorizes the declaration's other
uploads, with the declaration secret of the first (a declaration of more than 500 tokens is
several uploads)."""

DEFAULT_MAX_UPLOADS_PER_CODE = 20
"""The most uploads one code authorizes (20 x 500 tokens)."""

_HASH_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CodePolicy:
    """How a declaration code is consumed.

    Attributes:
        grace: after the first committed upload, how long further uploads of the same
            declaration (same declaration secret) may use the code (a declaration bigger than
            one upload).
        max_uploads: the most committed uploads one code authorizes, >= 1.

    Raises:
        ValueError: ``grace`` is negative or ``max_uploads`` < 1.
    """

    grace: timedelta = DEFAULT_CODE_GRACE
    max_uploads: int = DEFAULT_MAX_UPLOADS_PER_CODE

    def __post_init__(self) -> None:
        if self.grace < timedelta(0):
            raise ValueError("CodePolicy.grace must be >= 0")
        if isinstance(self.max_uploads, bool) or not isinstance(self.max_uploads, int) \
                or self.max_uploads < 1:
            raise ValueError("CodePolicy.max_uploads must be an integer >= 1")


@dataclass(frozen=True)
class CodeRecord:
    """What a board keeps about one declaration code (never the code itself).

    Attributes:
        expires_at: aware UTC instant after which an unused code is refused.
        uploads: the number of committed uploads it authorized so far.
        used_until: after the first committed upload, the end of the continuation window
            (first commit + :attr:`CodePolicy.grace`); ``None`` while unused.
        declaration_hash: after the first committed upload, the SHA-256 (64 hex) of the
            declaration secret it carried: the only one the code accepts after; ``None``
            while unused, or when that upload carried none (then nothing more is accepted).
    """

    expires_at: datetime
    uploads: int = 0
    used_until: datetime | None = None
    declaration_hash: str | None = None


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

    def add(
        self,
        upload_id: str,
        tokens: Sequence[PositiveToken],
        now: datetime,
        *,
        code_hash: str | None = None,
        code_required: bool = True,
        declaration_hash: str | None = None,
    ) -> int:
        """Publish the tokens of one positive declaration (paper section 4, step 2; section 5).

        Durable before it returns, all or nothing: the tokens, the upload ID and the
        consumption of the code commit in one transaction. Idempotent: the same ``upload_id``
        with the same tokens returns the same count and stores nothing twice, without any code
        check (its code was consumed by the first commit); a token already on the board is not
        duplicated. An upload with no token stores nothing and consumes no code (its code is
        still checked).

        Checks, in order: a known ``upload_id`` (answered at once, or ``upload_conflict``);
        the code (:func:`check_code`); the tokens (:func:`check_upload`).

        Args:
            upload_id: the random UUIDv4 of the upload.
            tokens: the tokens with their expiry (UTC, on the hour).
            now: the current time, aware (UTC).
            code_hash: :func:`~fanny_tui.protocol.codes.code_hash` of the declaration code the
                client sent, or ``None`` if it sent none. A code that is sent is always checked
                and consumed, even when ``code_required`` is False.
            code_required: refuse an upload without a code (False: open declarations).
            declaration_hash: :func:`~fanny_tui.protocol.codes.declaration_hash` of the
                declaration secret the client sent, or ``None``: the first commit binds the
                code to it, later uploads need the same.

        Returns:
            The number of distinct tokens in the upload.

        Raises:
            Refusal: ``code_required``, ``code_invalid``, ``code_expired``, ``code_used``
                (field ``code``); see :func:`check_upload`; ``upload_conflict`` (field
                ``upload_id``) when the ``upload_id`` is known with other tokens.
            ValueError: a malformed ``code_hash`` or ``declaration_hash``.
            BoardError: the storage failed.
        """
        ...

    def add_code(self, code_hash: str, expires_at: datetime) -> None:
        """Store a new declaration code: its hash and expiry only (paper section 5).

        Args:
            code_hash: SHA-256 hex (64 lowercase hex) of the normalized code.
            expires_at: aware UTC instant after which the unused code is refused.

        Raises:
            ValueError: a malformed hash or a naive ``expires_at``.
            BoardError: the storage failed, or the hash is already stored.
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

    def last_cursor(self) -> int:
        """The cursor of the last token ever published (0: none), for binary batches.

        Raises:
            BoardError: the storage failed.
        """
        ...

    def rows(self, after: int, upto: int, now: datetime) -> list[tuple[str, int]]:
        """The unexpired tokens with ``after < cursor <= upto``, in publication order.

        Returns:
            ``(token hex, expires_at in Unix seconds)`` pairs, for
            :func:`fanny_tui.protocol.batch.encode_token_frame`.

        Raises:
            BoardError: the storage failed.
        """
        ...

    def purge_expired(self, now: datetime) -> int:
        """Delete every token with ``expires_at <= now``; returns how many were deleted.

        Also forgets codes that can no longer authorize anything (expired and, if used, past
        their continuation window), and upload IDs whose tokens all expired.

        Raises:
            BoardError: the storage failed.
        """
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


def check_code(
    code_hash: str | None,
    record: CodeRecord | None,
    now: datetime,
    *,
    code_required: bool,
    policy: CodePolicy,
    declaration_hash: str | None = None,
) -> None:
    """The rules of declaration codes, for every board implementation (paper section 5).

    A code is one declaration (issue 8, point 3): once used, it is accepted again only with the
    declaration secret of its first upload, within the continuation window and the upload cap.

    Args:
        code_hash: the hash of the code the client sent, or ``None``.
        record: what the board holds for ``code_hash`` (``None``: unknown).
        now: the current time, aware.
        code_required: whether an upload without a code is refused.
        policy: the continuation window and upload cap.
        declaration_hash: the hash of the declaration secret the client sent, or ``None``.

    Raises:
        Refusal: field ``code``: ``code_required`` (no code and one is required);
            ``code_invalid`` (unknown); ``code_expired`` (never used and past its expiry);
            ``code_used`` (used, and sent without its declaration's secret, or past its
            continuation window or its upload cap).
        ValueError: ``now`` is naive.
    """
    now = require_utc(now)
    if code_hash is None:
        if code_required:
            raise Refusal("a declaration code is required to declare positive",
                          code="code_required", field="code")
        return
    if record is None:
        raise Refusal("unknown declaration code", code="code_invalid", field="code")
    if record.uploads == 0:
        if record.expires_at <= now:
            raise Refusal("this declaration code has expired", code="code_expired",
                          field="code")
        return
    same = (record.declaration_hash is not None and declaration_hash is not None
            and hmac.compare_digest(record.declaration_hash, declaration_hash))
    if (not same or record.used_until is None or record.used_until <= now
            or record.uploads >= policy.max_uploads):
        raise Refusal("this declaration code was already used", code="code_used",
                      field="code")


def check_code_hash(code_hash: str, what: str = "a code hash") -> str:
    """Return ``code_hash`` if it is 64 lowercase hex characters (a SHA-256 in hex).

    Args:
        code_hash: the value to check.
        what: how the error names it.

    Raises:
        ValueError: otherwise.
    """
    if not isinstance(code_hash, str) or not _HASH_RE.fullmatch(code_hash):
        raise ValueError(f"{what} is 64 lowercase hex characters (SHA-256)")
    return code_hash


class BoardWrite(Protocol):
    """One open write transaction of a board, as :func:`add_upload` drives it.

    The board opens it, holds whatever lock makes its uploads one after the other (SQLite:
    ``BEGIN IMMEDIATE``; PostgreSQL: a row lock), commits it after :func:`add_upload` returns
    and rolls it back when it raises. Instants are aware UTC datetimes.
    """

    def upload(self, upload_id: str) -> tuple[int, str] | None:
        """``(count, digest)`` of a committed ``upload_id``, or ``None``."""
        ...

    def code(self, code_hash: str) -> CodeRecord | None:
        """What the board holds for ``code_hash``, or ``None``."""
        ...

    def publish(self, upload_id: str, tokens: Sequence[PositiveToken], digest: str) -> None:
        """Insert the (distinct, sorted, non-empty) tokens after every published one, in this
        order, skipping those already on the board, and record ``upload_id`` with their count,
        ``digest`` and latest expiry."""
        ...

    def consume(self, code_hash: str, used_until: datetime,
                declaration_hash: str | None) -> None:
        """Count one more upload for the code; on its first, set its continuation window's
        end and its declaration hash."""
        ...


def add_upload(
    write: BoardWrite,
    upload_id: str,
    tokens: Sequence[PositiveToken],
    now: datetime,
    *,
    code_hash: str | None,
    declaration_hash: str | None,
    code_required: bool,
    policy: CodePolicy,
    max_expiry_ahead: timedelta,
) -> int:
    """:meth:`PositiveBoard.add` over one open transaction: every board's checks and writes.

    In order: a known ``upload_id`` is answered at once (or ``upload_conflict``); the code
    (:func:`check_code`); the tokens (:func:`check_upload`); then the tokens, the upload ID and
    the code's consumption are written. Nothing is written when a check fails.

    Returns:
        The number of distinct tokens in the upload.

    Raises:
        Refusal: as :meth:`PositiveBoard.add`.
        ValueError: ``now`` is naive, or a malformed hash.
    """
    now = require_utc(now)
    if code_hash is not None:
        check_code_hash(code_hash)
    if declaration_hash is not None:
        check_code_hash(declaration_hash, "a declaration hash")
    clean = distinct_tokens(tokens)
    digest = _digest(clean)
    known = write.upload(upload_id)
    if known is not None:
        if known[1] != digest:
            raise Refusal("this upload_id was already used for other tokens",
                          code="upload_conflict", field="upload_id")
        return int(known[0])
    record = None if code_hash is None else write.code(code_hash)
    check_code(code_hash, record, now, code_required=code_required, policy=policy,
               declaration_hash=declaration_hash)
    # Checked only for a new upload: a retry whose ack was lost is answered even if some of
    # its tokens expired in the meantime.
    check_upload(tokens, now, max_expiry_ahead)
    if clean:
        write.publish(upload_id, clean, digest)
        if code_hash is not None:
            # Consumed in the transaction that commits the tokens.
            write.consume(code_hash, now + policy.grace, declaration_hash)
    return len(clean)


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


def current_time(now: datetime | None) -> datetime:
    """``now`` checked aware, or the current UTC time when None.

    Raises:
        ValueError: ``now`` is naive.
    """
    return datetime.now(UTC) if now is None else require_utc(now)


def unix_seconds(moment: datetime) -> int:
    """An aware instant as whole Unix seconds (how both boards store instants).

    Raises:
        ValueError: ``moment`` is naive.
    """
    return int(require_utc(moment).timestamp())


def code_record(row: Sequence[int | str | None] | None) -> CodeRecord | None:
    """A :class:`CodeRecord` from a stored ``(expires_at, uploads, used_until,
    declaration_hash)`` row (instants in Unix seconds, as both boards store them), or None."""
    if row is None:
        return None
    expires_at, uploads, used_until, declared = row
    return CodeRecord(
        expires_at=datetime.fromtimestamp(int(expires_at or 0), UTC), uploads=int(uploads or 0),
        used_until=None if used_until is None else datetime.fromtimestamp(int(used_until), UTC),
        declaration_hash=None if declared is None else str(declared))


def _digest(tokens: Sequence[PositiveToken]) -> str:
    text = "".join(f"{t.token}:{unix_seconds(t.expires_at)}\n" for t in tokens)
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

_SCHEMA_CODES = """
CREATE TABLE codes (
    code_hash  TEXT    PRIMARY KEY CHECK (length(code_hash) = 64),  -- SHA-256, never the code
    expires_at INTEGER NOT NULL,                   -- Unix seconds, UTC: unused codes after this
    uploads    INTEGER NOT NULL DEFAULT 0,         -- committed uploads it authorized
    used_until INTEGER                             -- end of the continuation window, once used
) WITHOUT ROWID;
"""

_SCHEMA_DECLARATIONS = """
ALTER TABLE codes ADD COLUMN declaration_hash TEXT
"""
"""Version 3: ``declaration_hash`` is the SHA-256 of the declaration secret the code's first
upload carried (no SQL comment: SQLite appends the column text to the table's CREATE text)."""

_MIGRATIONS = {1: _SCHEMA_CODES, 2: _SCHEMA_DECLARATIONS}
"""``version -> SQL`` bringing a file from ``version`` to ``version + 1``."""


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction: run statement by statement.
    for statement in script.split(";\n"):
        if statement.strip():
            db.execute(statement)


class SqlWrite:
    """:class:`BoardWrite` over a DB-API connection inside the upload's transaction: the SQL
    both boards share (the same tables). A board's subclass sets :attr:`MARK` and adds
    :meth:`publish` (how cursors are handed out differs).

    Args:
        db: the connection (:mod:`sqlite3` or psycopg), in the transaction.
    """

    MARK: ClassVar[str] = "?"
    """The DB-API parameter marker: ``?`` (:mod:`sqlite3`) or ``%s`` (psycopg)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def upload(self, upload_id: str) -> tuple[int, str] | None:
        row = self.db.execute(f"SELECT count, digest FROM uploads WHERE upload_id = {self.MARK}",
                              (upload_id,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def code(self, code_hash: str) -> CodeRecord | None:
        return code_record(self.db.execute(
            "SELECT expires_at, uploads, used_until, declaration_hash FROM codes "
            f"WHERE code_hash = {self.MARK}", (code_hash,)).fetchone())

    def publish(self, upload_id: str, tokens: Sequence[PositiveToken], digest: str) -> None:
        raise NotImplementedError                 # each board hands out its cursors

    def record_upload(self, upload_id: str, tokens: Sequence[PositiveToken],
                      digest: str) -> None:
        """The last step of :meth:`publish`: the upload ID with its count, digest and latest
        expiry (``keep_until``)."""
        m = self.MARK
        self.db.execute(
            f"INSERT INTO uploads (upload_id, count, digest, keep_until) VALUES ({m}, {m}, {m}, "
            f"{m})",
            (upload_id, len(tokens), digest, max(unix_seconds(t.expires_at) for t in tokens)))

    def consume(self, code_hash: str, used_until: datetime,
                declaration_hash: str | None) -> None:
        m = self.MARK
        self.db.execute(
            f"UPDATE codes SET used_until = coalesce(used_until, {m}), declaration_hash = "
            f"CASE WHEN uploads = 0 THEN {m} ELSE declaration_hash END, uploads = uploads + 1 "
            f"WHERE code_hash = {m}", (unix_seconds(used_until), declaration_hash, code_hash))


class _SqliteWrite(SqlWrite):
    """:class:`BoardWrite` over an SQLite connection inside ``BEGIN IMMEDIATE``."""

    def publish(self, upload_id: str, tokens: Sequence[PositiveToken], digest: str) -> None:
        self.db.executemany(
            "INSERT INTO positives (token, expires_at) VALUES (?, ?) "
            "ON CONFLICT (token) DO NOTHING",
            [(t.token, unix_seconds(t.expires_at)) for t in tokens])
        self.record_upload(upload_id, tokens, digest)


def check_page(cursor: int, limit: int) -> None:
    """Check the arguments of :meth:`PositiveBoard.since`.

    Raises:
        ValueError: ``cursor`` is not an integer >= 0, or ``limit`` not an integer >= 1.
    """
    if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
        raise ValueError(f"cursor must be an integer >= 0, got {cursor!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")


class SqlBoard:
    """What the SQLite and PostgreSQL boards share: :meth:`PositiveBoard.add` over
    :func:`add_upload`, and the reads, the purge and the count, in the same SQL (the same
    tables; :attr:`SqlWrite.MARK` is the parameter marker).

    A board sets :attr:`_WRITE` (its :class:`SqlWrite`), :attr:`_LAST_CURSOR` (the query of
    the last cursor ever handed out), implements :meth:`_write` and :meth:`_read`, and
    :meth:`_order_uploads` if its write transaction alone does not write uploads one after the
    other; it adds :meth:`PositiveBoard.add_code`, :meth:`PositiveBoard.close` and its
    opening.

    Args:
        max_expiry_ahead: the allowed expiry window, see :func:`check_upload`.
        code_policy: how declaration codes are consumed, see :class:`CodePolicy`.

    Raises:
        ValueError: ``max_expiry_ahead`` is not positive.
    """

    _WRITE: ClassVar[type[SqlWrite]]
    _LAST_CURSOR: ClassVar[str]

    def __init__(self, max_expiry_ahead: timedelta, code_policy: CodePolicy | None) -> None:
        if max_expiry_ahead <= timedelta(0):
            raise ValueError("max_expiry_ahead must be positive")
        self.max_expiry_ahead = max_expiry_ahead
        self.code_policy = code_policy or CodePolicy()

    def _write(self, what: str) -> AbstractContextManager[Any]:
        """One write transaction under the board's lock, its connection as the value:
        committed if the block ends normally, rolled back on any exception; a storage error
        becomes ``BoardError("the positive board could not WHAT: ...")``."""
        raise NotImplementedError

    @staticmethod
    def _order_uploads(db: Any) -> None:
        """Called first in an upload's write transaction: take what lock makes the uploads
        written one after the other (nothing here: SQLite's ``BEGIN IMMEDIATE`` already
        admits one writer at a time)."""

    def _read(self, *, snapshot: bool = False) -> AbstractContextManager[Any]:
        """The connection under the board's lock, for reading; ``snapshot``: one consistent
        view for the whole block. A storage error becomes ``BoardError("the positive board
        could not be read: ...")``."""
        raise NotImplementedError

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
        """See :meth:`PositiveBoard.add`; ``now=None`` means the current UTC time. Returns
        after the commit."""
        now = current_time(now)
        with self._write("store an upload") as db:
            self._order_uploads(db)
            return add_upload(
                self._WRITE(db), upload_id, tokens, now, code_hash=code_hash,
                declaration_hash=declaration_hash, code_required=code_required,
                policy=self.code_policy, max_expiry_ahead=self.max_expiry_ahead)

    def code_record(self, code_hash: str) -> CodeRecord | None:
        """What the board holds for a code hash, or ``None`` (for tools and tests)."""
        check_code_hash(code_hash)
        with self._read() as db:
            return self._WRITE(db).code(code_hash)

    def since(
        self, cursor: int, limit: int, now: datetime | None = None
    ) -> tuple[list[PositiveToken], int, bool]:
        """See :meth:`PositiveBoard.since`; ``now=None`` means the current UTC time.

        A ``cursor`` beyond the last one ever published (the board was reset) counts as 0,
        so a poller never silently misses tokens.
        """
        check_page(cursor, limit)
        at = unix_seconds(current_time(now))
        m = self._WRITE.MARK
        with self._read(snapshot=True) as db:
            row = db.execute(self._LAST_CURSOR).fetchone()
            high = int(row[0]) if row else 0
            if cursor > high:
                cursor = 0
            rows = db.execute(
                "SELECT seq, token, expires_at FROM positives "
                f"WHERE seq > {m} AND expires_at > {m} ORDER BY seq LIMIT {m}",
                (cursor, at, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        new_cursor = int(rows[-1][0]) if more else max(high, cursor)
        tokens = [PositiveToken(token=token, expires_at=datetime.fromtimestamp(exp, UTC))
                  for _, token, exp in rows]
        return tokens, new_cursor, more

    def last_cursor(self) -> int:
        """See :meth:`PositiveBoard.last_cursor`."""
        with self._read() as db:
            row = db.execute(self._LAST_CURSOR).fetchone()
        return int(row[0]) if row else 0

    def rows(self, after: int, upto: int, now: datetime | None = None
             ) -> list[tuple[str, int]]:
        """See :meth:`PositiveBoard.rows`; ``now=None`` means the current UTC time."""
        at = unix_seconds(current_time(now))
        m = self._WRITE.MARK
        with self._read() as db:
            return [(str(token), int(exp)) for token, exp in db.execute(
                "SELECT token, expires_at FROM positives "
                f"WHERE seq > {m} AND seq <= {m} AND expires_at > {m} ORDER BY seq",
                (after, upto, at))]

    def purge_expired(self, now: datetime | None = None) -> int:
        """See :meth:`PositiveBoard.purge_expired`; ``now=None`` means the current UTC time.

        Also forgets the upload IDs whose tokens all expired, and the codes past both their
        expiry and their continuation window.
        """
        at = unix_seconds(current_time(now))
        m = self._WRITE.MARK
        with self._write("purge") as db:
            purged = db.execute(f"DELETE FROM positives WHERE expires_at <= {m}",
                                (at,)).rowcount
            db.execute(f"DELETE FROM uploads WHERE keep_until <= {m}", (at,))
            db.execute(f"DELETE FROM codes WHERE expires_at <= {m} "
                       f"AND coalesce(used_until, 0) <= {m}", (at, at))
        return int(purged)

    def count(self) -> int:
        """Number of tokens on the board (expired ones included until purged)."""
        with self._read() as db:
            row = db.execute("SELECT count(*) FROM positives").fetchone()
        return int(row[0]) if row else 0


class SqlitePositiveBoard(SqlBoard):
    """:class:`PositiveBoard` in one SQLite file (WAL, ``synchronous=FULL``).

    Args:
        path: the database file; created (with its schema and, mode 0700, its missing parent
            directories) if missing. A file of an older schema version is upgraded in place
            (version 1 -> 2 adds the ``codes`` table, 2 -> 3 its ``declaration_hash`` column;
            nothing else changes).
        max_expiry_ahead: the allowed expiry window, see :func:`check_upload`.
        code_policy: how declaration codes are consumed, see :class:`CodePolicy`.

    Raises:
        BoardError: the file cannot be opened or written, is not a FANNY board, or has a
            newer schema version than this code.
        ValueError: ``max_expiry_ahead`` is not positive.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_expiry_ahead: timedelta = DEFAULT_MAX_EXPIRY_AHEAD,
        code_policy: CodePolicy | None = None,
    ) -> None:
        super().__init__(max_expiry_ahead, code_policy)
        self.path = Path(path)
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
                _run_script(db, _SCHEMA)
                version = 1
            elif version > SCHEMA_VERSION:
                raise BoardError(
                    f"{self.path} has schema version {version}, newer than this broker "
                    f"({SCHEMA_VERSION}); upgrade the broker")
            elif not {"positives", "uploads"} <= tables:
                raise BoardError(f"{self.path} is an SQLite file but not a positive board")
            while version < SCHEMA_VERSION:          # upgrade in place, in this transaction
                _run_script(db, _MIGRATIONS[version])
                version += 1
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise BoardError("the positive board is closed")
        return self._db

    _WRITE = _SqliteWrite
    _LAST_CURSOR = "SELECT seq FROM sqlite_sequence WHERE name = 'positives'"

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """See :meth:`SqlBoard._write`: ``BEGIN IMMEDIATE``
        (:func:`fanny_tui.sqlite_util.transaction`, shared with the device's token store)."""
        def error(exc: sqlite3.Error) -> BoardError:
            return BoardError(f"the positive board could not {what}: {exc}")

        with self._lock, transaction(self._conn(), error) as db:
            yield db

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[sqlite3.Connection]:
        """See :meth:`SqlBoard._read`; ``snapshot``: a deferred ``BEGIN`` ... ``COMMIT``."""
        with self._lock:
            db = self._conn()
            try:
                if not snapshot:
                    yield db
                    return
                db.execute("BEGIN")
                try:
                    yield db
                finally:
                    db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise BoardError(f"the positive board could not be read: {exc}") from None

    def add_code(self, code_hash: str, expires_at: datetime) -> None:
        """See :meth:`PositiveBoard.add_code`."""
        check_code_hash(code_hash)
        at = unix_seconds(expires_at)
        with self._write("store a code") as db:
            try:
                db.execute("INSERT INTO codes (code_hash, expires_at) VALUES (?, ?)",
                           (code_hash, at))
            except sqlite3.IntegrityError:
                raise BoardError("this declaration code is already stored") from None

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


DEFAULT_FRAME_SPAN = 8192
"""Board cursors covered by one binary token frame: at most this many tokens (256 KiB)."""
_EMPTY_COST = 64
"""Bytes an empty range counts for in the cache bound (its key and entry)."""
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
"""Most bytes of encoded frames :class:`BatchPages` keeps (least recently used dropped)."""


class BatchPages:
    """Binary token frames of a board (``batch1``), each encoded once and shared by pollers.

    The board is append-only between purges, so the tokens with ``lo < cursor <= hi`` never
    change until the next purge: the frame of a cursor range is cached under ``(lo, hi)``.
    Ranges are cut at multiples of ``frame_span`` (:meth:`spans`), so that every device
    catching up gets the same frames, and every device that is up to date asks for the same
    last range. :meth:`invalidate` (after a purge that deleted tokens) drops every frame. The
    cache holds at most ``cache_bytes``; the least recently used frames go first.

    Thread-safe: :meth:`frame` runs in a worker thread (it may read the board); pollers that
    ask for the same uncached range at the same time wait for the one encoding it.

    Args:
        board: the board to read.
        frame_span: board cursors per frame, >= 1 (a frame holds at most this many tokens).
        cache_bytes: most bytes of frames kept, >= 0 (0: nothing cached).

    Raises:
        ValueError: ``frame_span`` < 1 or ``cache_bytes`` < 0.
    """

    def __init__(self, board: PositiveBoard, frame_span: int = DEFAULT_FRAME_SPAN,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if isinstance(frame_span, bool) or not isinstance(frame_span, int) or frame_span < 1:
            raise ValueError("BatchPages.frame_span must be an integer >= 1")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError("BatchPages.cache_bytes must be an integer >= 0")
        self.board = board
        self.frame_span = frame_span
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._frames: OrderedDict[tuple[int, int], bytes | None] = OrderedDict()
        self._size = 0
        self._encoding: dict[tuple[int, int], threading.Event] = {}
        self._generation = 0
        self.encoded = 0
        """Frames encoded so far (a cache miss each): for tests and benchmarks."""

    def spans(self, cursor: int, high: int) -> Iterator[tuple[int, int]]:
        """The ``(lo, hi)`` cursor ranges covering ``cursor < c <= high``, cut at multiples
        of ``frame_span``."""
        lo = cursor
        while lo < high:
            hi = min((lo // self.frame_span + 1) * self.frame_span, high)
            yield lo, hi
            lo = hi

    def frame(self, lo: int, hi: int, now: datetime) -> bytes | None:
        """The encoded token frame of the unexpired tokens with ``lo < cursor <= hi`` (its
        cursor is ``hi``), or None when the range holds none. Cached.

        Raises:
            BoardError: the board failed.
        """
        key = (lo, hi)
        while True:
            with self._lock:
                if key in self._frames:
                    self._frames.move_to_end(key)
                    return self._frames[key]
                busy = self._encoding.get(key)
                if busy is None:        # this thread encodes it; the others wait for it
                    self._encoding[key] = threading.Event()
                    generation = self._generation
                    break
            busy.wait()
        try:
            rows = self.board.rows(lo, hi, now)
            data = encode_token_frame(hi, group_by_hour(rows)) if rows else None
        except BaseException:
            with self._lock:
                self._encoding.pop(key).set()
            raise
        with self._lock:
            self.encoded += 1
            size = len(data) if data else _EMPTY_COST
            # Not kept if a purge came in between (it may hold purged tokens).
            if generation == self._generation and size <= self.cache_bytes:
                self._frames[key] = data
                self._size += size
                while self._size > self.cache_bytes:
                    _, dropped = self._frames.popitem(last=False)
                    self._size -= len(dropped) if dropped else _EMPTY_COST
            self._encoding.pop(key).set()   # cached first: a waiter finds it
        return data

    def invalidate(self) -> None:
        """Drop every cached frame (tokens were purged)."""
        with self._lock:
            self._frames.clear()
            self._size = 0
            self._generation += 1
