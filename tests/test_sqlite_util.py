"""The SQLite plumbing shared by the token store and the broker's board: real SQLite files."""

from __future__ import annotations

import sqlite3

import pytest

from fanny_tui.sqlite_util import reading, transaction


class Failed(Exception):
    pass


def _error(exc: sqlite3.Error) -> Failed:
    return Failed(f"test db: {exc}")


@pytest.fixture
def db(tmp_path):
    conn = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    yield conn
    conn.close()


def _rows(db):
    return [r[0] for r in db.execute("SELECT x FROM t ORDER BY x")]


def test_commits_when_the_block_ends(db):
    with transaction(db, _error) as tx:
        tx.execute("INSERT INTO t VALUES (1)")
    assert not db.in_transaction and _rows(db) == [1]


@pytest.mark.parametrize("exc", [ValueError("bad row"), KeyboardInterrupt()])
def test_any_exception_rolls_back_and_is_raised_unchanged(db, exc):
    with pytest.raises(type(exc)), transaction(db, _error) as tx:
        tx.execute("INSERT INTO t VALUES (1)")
        raise exc
    assert not db.in_transaction and _rows(db) == []
    with transaction(db, _error) as tx:          # the connection is usable again
        tx.execute("INSERT INTO t VALUES (2)")
    assert _rows(db) == [2]


def test_sqlite_errors_become_the_callers_error_and_roll_back(db):
    with pytest.raises(Failed, match="^test db: UNIQUE constraint failed"), \
            transaction(db, _error) as tx:
        tx.execute("INSERT INTO t VALUES (1)")
        tx.execute("INSERT INTO t VALUES (1)")
    assert not db.in_transaction and _rows(db) == []


def test_a_failing_begin_is_the_callers_error(db):
    db.execute("BEGIN")                           # someone left a transaction open
    with pytest.raises(Failed, match="within a transaction"), transaction(db, _error):
        pass
    db.execute("ROLLBACK")


def test_reading_maps_errors_and_never_leaves_a_transaction_open(db):
    with pytest.raises(Failed, match="no such table"), reading(db, _error) as conn:
        conn.execute("SELECT * FROM missing")
    with pytest.raises(RuntimeError), reading(db, _error) as conn:
        conn.execute("BEGIN")
        raise RuntimeError("oops")
    assert not db.in_transaction
