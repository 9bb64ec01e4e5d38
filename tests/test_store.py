"""The SQLite token store: real files, durability, pending uploads, matching, failures."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from fanny_tui.store import SCHEMA_VERSION, StoreError, TokenStore

EXPIRY = datetime(2026, 12, 14, 4, tzinfo=UTC)
T1, T2, T3 = "1" * 64, "2" * 64, "3" * 64


@pytest.fixture
def store(tmp_path):
    s = TokenStore.in_dir(tmp_path)
    yield s
    s.close()


def test_add_is_idempotent_and_persistent(tmp_path, store):
    assert store.add(T1, EXPIRY) is True
    assert store.add(T1, EXPIRY) is False       # paper 3, step 5: never stored twice
    store.close()
    reopened = TokenStore.in_dir(tmp_path)
    assert [t.token for t in reopened.tokens()] == [T1]
    assert reopened.tokens()[0].expires_at == EXPIRY
    reopened.close()


def test_schema_version_recorded(tmp_path, store):
    db = sqlite3.connect(tmp_path / "tokens.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "tokens.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match="newer"):
        TokenStore(path)


def test_bad_token_rejected(store):
    with pytest.raises(ValueError):
        store.add("ABC", EXPIRY)
    with pytest.raises(ValueError):
        store.add(T1, datetime(2026, 12, 14, 4))  # naive


def test_sweep_deletes_only_expired(store):
    store.add(T1, EXPIRY)
    store.add(T2, EXPIRY + timedelta(days=1))
    assert store.sweep_expired(EXPIRY - timedelta(seconds=1)) == 0
    assert store.sweep_expired(EXPIRY) == 1
    assert [t.token for t in store.tokens()] == [T2]


def test_upload_deletes_only_after_complete(store):
    store.add(T1, EXPIRY)
    store.add(T2, EXPIRY)
    pending = store.begin_upload("u-1")
    assert {t.token for t in pending} == {T1, T2}
    assert store.count() == 2                      # nothing deleted before the ack
    store.add(T3, EXPIRY)                           # a later contact is not in that upload
    assert set(store.pending_uploads()) == {"u-1"}
    assert store.complete_upload("u-1") == 2
    assert [t.token for t in store.tokens()] == [T3]
    assert store.pending_uploads() == {}


def test_second_declaration_gets_its_own_upload(store):
    store.add(T1, EXPIRY)
    store.begin_upload("u-1")
    store.add(T2, EXPIRY)
    assert [t.token for t in store.begin_upload("u-2")] == [T2]
    assert {k: [t.token for t in v] for k, v in store.pending_uploads().items()} == {
        "u-1": [T1], "u-2": [T2]}


def test_match_positives_deletes_matches_and_records_alert(store):
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    store.add(T1, EXPIRY)
    store.add(T2, EXPIRY)
    assert store.match_positives([T3], now) == 0
    assert store.alerts() == []
    assert store.match_positives([T1, T3, "not-a-token"], now) == 1
    assert [t.token for t in store.tokens()] == [T2]   # paper 4, step 4: matched deleted
    assert [(a.count, a.noticed_at) for a in store.alerts()] == [(1, now)]


def test_own_pending_upload_is_not_an_exposure(store):
    store.add(T1, EXPIRY)
    store.begin_upload("u-1")
    assert store.match_positives([T1], datetime.now(UTC)) == 0
    assert store.count() == 1


def test_poll_cursor_persists(tmp_path, store):
    assert store.poll_cursor() == 0
    store.set_poll_cursor(42)
    store.set_poll_cursor(43)
    store.close()
    again = TokenStore.in_dir(tmp_path)
    assert again.poll_cursor() == 43
    again.close()


def test_read_only_store_fails_writes_clearly_and_loses_nothing(tmp_path, store):
    """A read-only store (as `fanny-tui tokens` opens it) refuses writes and keeps tokens."""
    store.add(T1, EXPIRY)
    store.begin_upload("u-1")
    store.close()
    ro = TokenStore.in_dir(tmp_path, read_only=True)
    with pytest.raises(StoreError, match="readonly"):
        ro.add(T2, EXPIRY)
    with pytest.raises(StoreError, match="readonly"):
        ro.complete_upload("u-1")
    assert [t.token for t in ro.tokens()] == [T1]
    ro.close()


def test_read_only_open_of_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open"):
        TokenStore.in_dir(tmp_path / "nowhere", read_only=True)


def test_not_a_database_is_a_clear_error(tmp_path):
    (tmp_path / "tokens.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="tokens.sqlite3"):
        TokenStore.in_dir(tmp_path)
