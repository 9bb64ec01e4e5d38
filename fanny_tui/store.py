"""The device's SQLite token store (paper section 3, steps 5-6 and section 4).

One file, ``tokens.sqlite3`` in the data directory, holding:

* ``tokens``: witness tokens with their expiry (Unix seconds, always on the deletion hour) and,
  while a positive declaration waits for the broker's acknowledgement, the random ``upload_id``
  of that declaration (privacy invariant 6: tokens are deleted only after the ack); since schema
  3 also the token's contact measures (issue 6): ``duration_s`` (seconds within the radius),
  ``closest_m`` and ``median_m`` (metres), ``samples`` and ``meetings`` (how many contacts of
  the same pair, in one session, made this token), NULL for a token stored before schema 3;
* ``uploads``: one row per positive upload not acknowledged yet: its ``upload_id`` and the
  declaration code that authorizes it (paper section 5), so that a retry after a restart still
  carries the code; the row goes with the ack, or when the broker refuses the code (the
  declaration secret that binds a declaration's uploads to one another is kept beside them in
  memory only, :meth:`TokenStore.declaration_for`);
* ``meta``: the positive-poll cursor;
* ``alerts``: exposure alerts already raised (UTC instant and count), so a restart still shows
  them.

Never stored: session IDs, contact IDs, positions, peer identities, the time of a contact (the
only instant kept per token is its expiry, rounded up to the deletion hour).
The schema version is in ``PRAGMA user_version`` (3; a version 1 file, from before declaration
codes, or 2, from before contact measures, is upgraded in place when opened for writing).
Writes are durable (WAL, ``synchronous=FULL``) before a method returns. Every SQLite or file
system failure (disk full, read-only directory, corrupt file) is raised as :class:`StoreError`
with a one-line message naming the file; a failed write changes nothing (one transaction per
method, rolled back on any exception, SQLite's or not: :mod:`fanny_tui.sqlite_util`, shared with
the broker's board).

Thread-safe: one connection guarded by a lock, so the aiortc adapter may call :meth:`add` from a
worker thread.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .protocol.contact import ContactMeasures, merge_measures
from .protocol.tokens import is_token
from .sqlite_util import reading, transaction

SCHEMA_VERSION = 3
FILE_NAME = "tokens.sqlite3"
READABLE_VERSIONS = (1, 2, 3)
"""Schema versions a read-only open accepts (1 and 2 have no contact measures)."""

_SCHEMA_V1 = (
    """CREATE TABLE IF NOT EXISTS tokens (
        token TEXT PRIMARY KEY CHECK (length(token) = 64),
        expires_at INTEGER NOT NULL,
        upload_id TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS tokens_upload ON tokens (upload_id)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS alerts (
        id INTEGER PRIMARY KEY,
        noticed_at INTEGER NOT NULL,
        count INTEGER NOT NULL
    )""",
)
_MIGRATE_V1_TO_V2 = (
    "CREATE TABLE IF NOT EXISTS uploads (upload_id TEXT PRIMARY KEY, code TEXT)",
    # Uploads pending in a version 1 store had no code (the broker did not ask for one).
    "INSERT OR IGNORE INTO uploads (upload_id, code) "
    "SELECT DISTINCT upload_id, NULL FROM tokens WHERE upload_id IS NOT NULL",
)
_MIGRATE_V2_TO_V3 = (
    # Tokens stored before schema 3 have no measures (NULL) and count as one meeting.
    "ALTER TABLE tokens ADD COLUMN duration_s REAL",
    "ALTER TABLE tokens ADD COLUMN closest_m REAL",
    "ALTER TABLE tokens ADD COLUMN median_m REAL",
    "ALTER TABLE tokens ADD COLUMN samples INTEGER",
    "ALTER TABLE tokens ADD COLUMN meetings INTEGER NOT NULL DEFAULT 1",
)
_MEASURES = "duration_s, closest_m, median_m, samples, meetings"


class StoreError(Exception):
    """The token store could not be read or written; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class StoredToken:
    """A token in the store. ``pending``: part of a positive upload not acknowledged yet.

    ``contact``: the exposure measured for this token, all its meetings together (None: stored
    without measures, before schema 3); ``meetings``: the number of contacts that made it.
    """

    token: str
    expires_at: datetime
    pending: bool = False
    contact: ContactMeasures | None = None
    meetings: int = 1


def _measures(row: tuple[object, ...]) -> ContactMeasures | None:
    """ContactMeasures from (duration_s, closest_m, median_m, samples), None when unmeasured."""
    duration, closest, median, samples = row
    if duration is None:
        return None
    return ContactMeasures(duration_s=float(duration),  # type: ignore[arg-type]
                           closest_m=None if closest is None else float(closest),  # type: ignore[arg-type]
                           median_m=None if median is None else float(median),  # type: ignore[arg-type]
                           samples=int(samples or 0))  # type: ignore[call-overload]


@dataclass(frozen=True)
class PendingUpload:
    """A positive upload not acknowledged yet: its ID, its declaration code and its tokens.

    ``code`` is the normalized declaration code (None: sent without one, for a broker with open
    declarations). ``declaration`` is the declaration secret of that code's uploads, from
    memory (:meth:`TokenStore.declaration_for`; None: none yet in this process, e.g. after a
    restart, or no code).
    """

    upload_id: str
    code: str | None
    tokens: list[StoredToken]
    declaration: str | None = None


@dataclass(frozen=True)
class Alert:
    """An exposure alert already raised: when it was noticed (UTC) and how many tokens."""

    noticed_at: datetime
    count: int


def _ts(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("datetime must be aware (UTC)")
    return int(moment.timestamp())


def _dt(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True)
class PositivesMatch:
    """What one bulk check of published positives found (:meth:`TokenStore.check_positives`).

    Attributes:
        received: published tokens compared.
        matched: stored tokens that matched, now deleted, with one alert recorded (0: none).
        contacts: the stored measures of the matched tokens that had some.
    """

    received: int
    matched: int
    contacts: tuple[ContactMeasures, ...] = ()


class UnrecordedMatchError(StoreError):
    """Published positives matched stored tokens, but the store could not record it.

    ``tokens``: the stored tokens that matched (hex); the exposure is real, the alert should
    still be shown, and the next poll finds the same tokens again (the cursor did not move).
    """

    def __init__(self, message: str, tokens: frozenset[str]) -> None:
        super().__init__(message)
        self.tokens = tokens


class PositivesCheck:
    """One bulk comparison in progress: see :meth:`TokenStore.positives_check`.

    :meth:`feed` is pure computation on sets (no SQLite, no lock): a chunk of 100,000 published
    tokens costs about 10 ms on the 2-core test machine, so a caller may run it on the event
    loop between received chunks; :meth:`commit` writes (run it in a worker thread).
    """

    def __init__(self, store: TokenStore, stored: frozenset[str]) -> None:
        self._store = store
        self._stored = stored
        self._stored_raw = frozenset(bytes.fromhex(t) for t in stored)
        self._found: set[str] = set()
        self.received = 0

    def feed(self, chunk: Sequence[bytes | str]) -> int:
        """Compare one chunk of published tokens (32 raw bytes or 64 hex characters each).

        Returns:
            The number of stored tokens found in this chunk (not yet recorded).
        """
        self.received += len(chunk)
        if not self._stored:
            return 0
        found = set(self._stored.intersection(chunk))
        found.update(t.hex() for t in self._stored_raw.intersection(chunk))
        self._found |= found
        return len(found)

    @property
    def found(self) -> frozenset[str]:
        """The stored tokens found so far (hex), not yet recorded."""
        return frozenset(self._found)

    def commit(self, cursor: int, now: datetime) -> PositivesMatch:
        """Record the outcome in one transaction; see :meth:`TokenStore.check_positives`."""
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
            raise ValueError(f"cursor must be an integer >= 0, got {cursor!r}")
        at = _ts(now)
        store = self._store
        wanted = sorted(self._found)
        contacts: list[ContactMeasures] = []
        matched = 0
        try:
            with store._transaction() as db:
                for start in range(0, len(wanted), 500):
                    part = wanted[start:start + 500]
                    marks = ",".join("?" * len(part))
                    where = f"upload_id IS NULL AND token IN ({marks})"
                    if store._has_measures:
                        for row in db.execute("SELECT duration_s, closest_m, median_m, samples "
                                              f"FROM tokens WHERE {where} ORDER BY token", part):
                            measures = _measures(tuple(row))
                            if measures is not None:
                                contacts.append(measures)
                    matched += db.execute(f"DELETE FROM tokens WHERE {where}", part).rowcount
                if matched:
                    db.execute("INSERT INTO alerts (noticed_at, count) VALUES (?, ?)",
                               (at, matched))
                db.execute("INSERT INTO meta (key, value) VALUES ('poll_cursor', ?) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                           (str(cursor),))
        except StoreError as exc:
            if wanted:
                raise UnrecordedMatchError(str(exc), frozenset(wanted)) from None
            raise
        return PositivesMatch(self.received, matched, tuple(contacts))


class TokenStore:
    """The token store in ``path`` (created with its parent directory when missing).

    Args:
        path: the SQLite file.
        read_only: open an existing store without ever writing (``fanny-tui tokens``); every
            write then raises :class:`StoreError`.

    Raises:
        StoreError: the file cannot be created or opened, or is not a token store.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._declarations: dict[str, str] = {}     # code -> declaration secret, memory only
        try:
            if read_only:
                self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                           check_same_thread=False, isolation_level=None)
            else:
                _private_file(path)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the token store {path}: {exc}") from None
        try:
            if read_only:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version not in READABLE_VERSIONS:
                    raise StoreError(f"{path} is not a token store of schema {SCHEMA_VERSION}")
                self._has_uploads = version >= 2
                self._has_measures = version >= 3
                return
            self._migrate()
            self._has_uploads = True
            self._has_measures = True
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
        except StoreError:
            self._db.close()
            raise
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot use the token store {path}: {exc}") from None

    def _migrate(self) -> None:
        """Create the schema, or upgrade an older one in place, in one transaction."""
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {version}, newer than this "
                                 f"kit's {SCHEMA_VERSION}: upgrade fanny-tui")
            if version == SCHEMA_VERSION:
                return
            for statement in (*_SCHEMA_V1, *_MIGRATE_V1_TO_V2, *_MIGRATE_V2_TO_V3):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        """The schema version of the file (``PRAGMA user_version``)."""
        with self._write():
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @classmethod
    def in_dir(cls, data_dir: Path, *, read_only: bool = False) -> TokenStore:
        """Open ``data_dir/tokens.sqlite3``."""
        return cls(Path(data_dir) / FILE_NAME, read_only=read_only)

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()

    def _error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"token store {self.path}: {exc}")

    @contextmanager
    def _write(self) -> Iterator[None]:
        """Statements outside a transaction, under the lock (reads, pragmas)."""
        with self._lock, reading(self._db, self._error):
            yield

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock, rolled back on any exception
        (:func:`fanny_tui.sqlite_util.transaction`)."""
        with self._lock, transaction(self._db, self._error) as db:
            yield db

    # -- tokens --------------------------------------------------------------------------

    def add(self, token: str, expires_at: datetime,
            contact: ContactMeasures | None = None) -> bool:
        """Store a witness token (paper 3, step 5). An existing token is not stored twice.

        An existing token is the same pair meeting again in one session (same contact IDs,
        same token): its exposure grows by ``contact`` (:func:`~fanny_tui.protocol.contact.
        merge_measures`: durations and samples add up, the closest distance is the smaller,
        the median the latest), ``meetings`` goes up by one and its expiry moves to
        ``expires_at`` when that is later.

        Args:
            token: 64 lowercase hex characters.
            expires_at: aware expiry, already rounded to the deletion hour.
            contact: the contact's measures so far (None: none yet); later growth of the same
                contact goes through :meth:`grow_contact`.

        Returns:
            True when the token is new, False when it was already in the store.

        Raises:
            ValueError: malformed token or naive datetime.
            StoreError: the write failed (nothing changed).
        """
        if not is_token(token):
            raise ValueError("token must be 64 lowercase hex characters")
        expires = _ts(expires_at)
        measures = contact or ContactMeasures()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO tokens (token, expires_at, duration_s, closest_m, "
                "median_m, samples, meetings) VALUES (?, ?, ?, ?, ?, ?, 1)",
                (token, expires, measures.duration_s, measures.closest_m, measures.median_m,
                 measures.samples))
            if cursor.rowcount == 1:
                return True
            self._merge(db, token, measures, meeting=1)
            db.execute("UPDATE tokens SET expires_at = max(expires_at, ?) WHERE token = ?",
                       (expires, token))
            return False

    def grow_contact(self, token: str, more: ContactMeasures) -> bool:
        """Add what a contact measured after its token was stored (when the contact closes).

        ``more`` holds the increments (extra seconds within the radius, extra samples) and
        the contact's latest closest and median distances; merged as in :meth:`add`, without
        counting a new meeting.

        Returns:
            False when the token is no longer in the store (declared, matched or expired).

        Raises:
            StoreError: the write failed (nothing changed).
        """
        with self._transaction() as db:
            return self._merge(db, token, more, meeting=0)

    @staticmethod
    def _merge(db: sqlite3.Connection, token: str, more: ContactMeasures, *,
               meeting: int) -> bool:
        row = db.execute("SELECT duration_s, closest_m, median_m, samples FROM tokens "
                         "WHERE token = ?", (token,)).fetchone()
        if row is None:
            return False
        merged = merge_measures(_measures(row) or ContactMeasures(), more)
        db.execute("UPDATE tokens SET duration_s = ?, closest_m = ?, median_m = ?, samples = ?, "
                   "meetings = meetings + ? WHERE token = ?",
                   (merged.duration_s, merged.closest_m, merged.median_m, merged.samples,
                    meeting, token))
        return True

    def tokens(self) -> list[StoredToken]:
        """Every stored token with its contact measures, soonest expiry first."""
        measures = _MEASURES if self._has_measures else "NULL, NULL, NULL, NULL, 1"
        with self._write():
            rows = self._db.execute(
                f"SELECT token, expires_at, upload_id, {measures} FROM tokens "
                "ORDER BY expires_at, token").fetchall()
        return [StoredToken(t, _dt(e), u is not None, _measures(tuple(m)), meetings)
                for t, e, u, *m, meetings in rows]

    def count(self) -> int:
        """Number of stored tokens."""
        with self._write():
            return int(self._db.execute("SELECT count(*) FROM tokens").fetchone()[0])

    def sweep_expired(self, now: datetime) -> int:
        """Delete tokens whose expiry is at or before ``now`` (paper 3, step 6; 4, last note).

        Expired tokens of a pending upload go too (the upload is sent with the others); an
        upload left with no token is forgotten, with its code.

        Returns:
            The number of tokens deleted.
        """
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM tokens WHERE expires_at <= ?",
                                 (_ts(now),)).rowcount
            if deleted:
                db.execute("DELETE FROM uploads WHERE upload_id NOT IN "
                           "(SELECT upload_id FROM tokens WHERE upload_id IS NOT NULL)")
        if deleted:
            self._forget_declarations()
        return deleted

    # -- positive declaration (paper 4, step 2; invariant 6) --------------------------------

    def begin_upload(self, upload_id: str, code: str | None = None, *,
                     limit: int | None = None) -> list[StoredToken]:
        """Mark tokens not already pending as part of the positive upload ``upload_id``.

        Nothing is deleted: :meth:`complete_upload` does that once the broker acknowledged.
        The most recent contacts (latest expiry) come first when ``limit`` leaves some out.

        Args:
            upload_id: the fresh random UUIDv4 of the upload.
            code: the normalized declaration code that authorizes it, kept with it until the
                ack so that a retry after a restart still carries it (None: no code).
            limit: mark at most this many tokens (the wire's ``MAX_TOKENS_PER_UPLOAD``);
                None marks them all.

        Returns:
            The tokens now pending under ``upload_id`` (may be empty: then nothing is recorded).

        Raises:
            ValueError: ``limit`` < 1.
            StoreError: the write failed (nothing changed).
        """
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        with self._transaction() as db:
            db.execute(
                "UPDATE tokens SET upload_id = ? WHERE token IN (SELECT token FROM tokens "
                "WHERE upload_id IS NULL ORDER BY expires_at DESC, token LIMIT ?)",
                (upload_id, -1 if limit is None else limit))
            rows = db.execute("SELECT token, expires_at FROM tokens WHERE upload_id = ? "
                              "ORDER BY token", (upload_id,)).fetchall()
            if rows:
                db.execute("INSERT INTO uploads (upload_id, code) VALUES (?, ?)",
                           (upload_id, code))
        return [StoredToken(t, _dt(e), True) for t, e in rows]

    def pending_uploads(self) -> dict[str, list[StoredToken]]:
        """Positive uploads not acknowledged yet: ``upload_id -> tokens``."""
        return {p.upload_id: p.tokens for p in self.pending()}

    def pending(self) -> list[PendingUpload]:
        """Positive uploads not acknowledged yet, each with its code and tokens."""
        with self._write():
            rows = self._db.execute("SELECT upload_id, token, expires_at FROM tokens WHERE "
                                    "upload_id IS NOT NULL ORDER BY upload_id, token").fetchall()
            codes = dict(self._db.execute("SELECT upload_id, code FROM uploads").fetchall()
                         if self._has_uploads else [])
            secrets = dict(self._declarations)
        tokens: dict[str, list[StoredToken]] = {}
        for upload_id, token, expires in rows:
            tokens.setdefault(upload_id, []).append(StoredToken(token, _dt(expires), True))
        return [PendingUpload(upload_id, code, items,
                              None if code is None else secrets.get(code))
                for upload_id, items in tokens.items()
                for code in [codes.get(upload_id)]]

    def declaration_for(self, code: str, fresh: str) -> str:
        """The declaration secret of the pending uploads of ``code``: the one already kept, or
        ``fresh`` (now kept). Memory only, never written to the file; forgotten when no
        pending upload has that code any more (ack, refusal, expiry) or the process ends.

        Args:
            code: the normalized declaration code.
            fresh: a new secret (:func:`~fanny_tui.protocol.codes.new_declaration`), used
                when none is kept for ``code``.
        """
        with self._lock:
            return self._declarations.setdefault(code, fresh)

    def _forget_declarations(self) -> None:
        """Drop the secrets of codes no pending upload has any more (after a commit)."""
        with self._write():
            if self._declarations:
                kept = {row[0] for row in self._db.execute(
                    "SELECT DISTINCT code FROM uploads WHERE code IS NOT NULL")}
                for code in set(self._declarations) - kept:
                    del self._declarations[code]

    def pending_count(self) -> int:
        """Number of tokens in positive uploads not acknowledged yet."""
        with self._write():
            return int(self._db.execute(
                "SELECT count(*) FROM tokens WHERE upload_id IS NOT NULL").fetchone()[0])

    def complete_upload(self, upload_id: str) -> int:
        """The broker acknowledged ``upload_id``: delete its tokens and its code (paper 4, 2).

        Returns:
            The number of tokens deleted.
        """
        with self._transaction() as db:
            db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
            deleted = db.execute("DELETE FROM tokens WHERE upload_id = ?",
                                 (upload_id,)).rowcount
        self._forget_declarations()
        return deleted

    def abandon_upload(self, upload_id: str) -> int:
        """The broker refused ``upload_id`` for its code: keep its tokens, un-mark them.

        The tokens stay on the device, no longer pending, so that a new declaration (with a
        valid code) takes them; the refused code is forgotten.

        Returns:
            The number of tokens un-marked.
        """
        with self._transaction() as db:
            db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
            kept = db.execute("UPDATE tokens SET upload_id = NULL WHERE upload_id = ?",
                              (upload_id,)).rowcount
        self._forget_declarations()
        return kept

    # -- exposure (paper 4, step 4) ---------------------------------------------------------

    def positives_check(self) -> PositivesCheck:
        """Start a bulk comparison of published positive tokens with the store (issue 7, 3).

        Reads the stored tokens not pending upload once (one short read under the lock; run it
        in a worker thread); then :meth:`PositivesCheck.feed` compares each published chunk in
        memory, off SQLite, and :meth:`PositivesCheck.commit` records everything at the end in
        one transaction. :meth:`check_positives` does the three at once.

        Raises:
            StoreError: the store could not be read.
        """
        with self._write():
            rows = self._db.execute("SELECT token FROM tokens WHERE upload_id IS NULL").fetchall()
        return PositivesCheck(self, frozenset(row[0] for row in rows))

    def check_positives(self, chunks: Iterable[Sequence[bytes | str]], cursor: int,
                        now: datetime) -> PositivesMatch:
        """Compare published positive tokens with the store in bulk, then record the outcome.

        Memory stays flat in the number published: one chunk at a time is compared with an
        in-memory set of the stored tokens, and only the matches are kept. One transaction at
        the end deletes the stored tokens that matched (never those of this device's own
        pending upload), records one alert for them all, and moves the durable poll cursor to
        ``cursor``, so a crash or a failure before it changes nothing and the next poll
        compares the same tokens again (alert once, delete only what matched).

        Args:
            chunks: the published tokens, in chunks of any size: 32 raw bytes (SHA-256) or 64
                lowercase hex characters each; anything else never matches.
            cursor: the broker's cursor after the last chunk (stored with the outcome).
            now: the instant of the alert, aware (UTC).

        Returns:
            The :class:`PositivesMatch`: tokens received, stored tokens matched and deleted
            (0: no exposure), and the stored measures of those that had some.

        Raises:
            UnrecordedMatchError: the final write failed after a match (disk full, read-only):
                the exposure is real but neither recorded nor deleted; ``.tokens`` names them.
            StoreError: the store could not be read or written (nothing changed).
            ValueError: ``now`` is naive or ``cursor`` < 0 (nothing changed).
        """
        check = self.positives_check()
        for chunk in chunks:
            check.feed(chunk)
        return check.commit(cursor, now)

    def alerts(self) -> list[Alert]:
        """Exposure alerts raised so far, oldest first."""
        with self._write():
            rows = self._db.execute(
                "SELECT noticed_at, count FROM alerts ORDER BY id").fetchall()
        return [Alert(_dt(at), count) for at, count in rows]

    def poll_cursor(self) -> int:
        """The cursor to send with the next positives poll (0 at first)."""
        with self._write():
            row = self._db.execute("SELECT value FROM meta WHERE key = 'poll_cursor'").fetchone()
        return int(row[0]) if row else 0


def _private_file(path: Path) -> None:
    """Make ``path`` (and its directory, when created here) readable by this user only.

    The store holds tokens and pending declaration codes: mode 0600 for the file, created so
    before SQLite opens it (SQLite gives its ``-wal`` and ``-shm`` files the database file's
    mode), and an older store's looser file, ``-wal`` and ``-shm`` are tightened. A directory
    created here is 0700; an existing one is left as its owner set it.

    Raises:
        OSError: the directory or the file cannot be created or changed.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if each.stat().st_mode & 0o077:
                each.chmod(0o600)
