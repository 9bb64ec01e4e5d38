"""SQLite plumbing shared by the device's token store and the broker's positive board.

Pure standard library (the broker imports it; it must never pull in Textual or aiortc).

One rule for every write: :func:`transaction` commits when its block ends normally and rolls
back on *any* exception, SQLite's or not (a ``ValueError`` from a corrupt row, a
``MemoryError``, a ``KeyboardInterrupt``), so that no transaction is ever left open on a shared
connection: an open one would make every later ``BEGIN`` fail with "cannot start a transaction
within a transaction". SQLite errors become the caller's own exception type, with a one-line
message (:func:`reading` does the same for reads).

The caller holds its own lock around both (one connection per store, shared between the event
loop's worker threads): ``with self._lock, transaction(db, error) as db: ...``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

ErrorFactory = Callable[[sqlite3.Error], Exception]
"""Turns an SQLite error into the caller's exception (``StoreError``, ``BoardError``)."""


def _rollback(db: sqlite3.Connection) -> None:
    # A failing ROLLBACK means the connection is unusable (closed, I/O error): SQLite discards
    # the transaction itself when the connection closes; the original error is the one to report.
    if db.in_transaction:
        with suppress(sqlite3.Error):
            db.execute("ROLLBACK")


@contextmanager
def transaction(db: sqlite3.Connection, error: ErrorFactory, *,
                begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """One transaction on ``db`` (opened with ``isolation_level=None``).

    Committed when the block ends normally, rolled back on any exception (which is then
    re-raised; an ``sqlite3.Error``, from the block or from ``BEGIN``/``COMMIT``, is raised as
    ``error(exc)`` instead).

    Args:
        db: the connection, in autocommit mode (``isolation_level=None``).
        error: builds the exception raised for an SQLite error.
        begin: ``BEGIN IMMEDIATE`` (default: takes the write lock at once, so a writer never
            fails half-way on a busy database) or ``BEGIN`` for a read snapshot.

    Raises:
        Exception: ``error(exc)`` for an SQLite error; any other exception unchanged.
    """
    try:
        db.execute(begin)
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
    except sqlite3.Error as exc:
        raise error(exc) from None


@contextmanager
def reading(db: sqlite3.Connection, error: ErrorFactory) -> Iterator[sqlite3.Connection]:
    """Statements outside a transaction (reads, pragmas): an SQLite error becomes ``error(exc)``.

    If the block left a transaction open (it should not), it is rolled back whatever happened.
    """
    try:
        yield db
    except sqlite3.Error as exc:
        raise error(exc) from None
    finally:
        _rollback(db)
