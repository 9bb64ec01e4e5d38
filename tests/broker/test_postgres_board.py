"""broker.postgres_board beyond the rules every board shares (tests/broker/test_positives.py):
opening, cursors under concurrent brokers, a lost connection, a crash before COMMIT, and what
PostgreSQL holds after a real broker ran on it (privacy). A real server (tests/pg.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from broker.backends import open_backends
from broker.positives import BoardError, CodeRecord
from broker.postgres_board import SCHEMA_VERSION, PostgresPositiveBoard
from fanny_tui.positives import declare, poll_once, upload_pending
from fanny_tui.protocol.codes import code_hash, declaration_hash, format_code, new_declaration
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.protocol.messages import Positives, PositivesPoll, PositiveToken
from fanny_tui.store import TokenStore
from tests.broker.kit import LON, Client, north, running, settings_for
from tests.helpers import loopback_port
from tests.pg import PostgresServer

NOW = datetime(2026, 3, 1, 10, 30, tzinfo=UTC)
EXPIRY = datetime(2026, 3, 14, 4, 0, tzinfo=UTC)
CODE = format_code(bytes(range(10)))


def tok(n: int) -> PositiveToken:
    return PositiveToken(token=f"{n:064x}", expires_at=EXPIRY)


def uid(k: int, i: int) -> str:
    return f"aaaaaaaa-0000-4000-8000-{k:06d}{i:06d}"


def refused_to_open(url: str) -> str:
    with pytest.raises(BoardError) as caught:
        PostgresPositiveBoard(url, connect_timeout_s=5)
    message = str(caught.value)
    assert message.startswith("postgres_url: ") and "\n" not in message, message
    return message


def test_an_unreachable_server_or_missing_database_is_one_line_naming_postgres_url(
        postgres: PostgresServer):
    with loopback_port(listening=False) as port:                    # nothing listens there
        message = refused_to_open(f"postgresql://fanny:s3cret@127.0.0.1:{port}/board")
    assert "s3cret" not in message                                   # no password echoed
    message = refused_to_open(postgres.url("no_such_database").replace(
        "fanny@", "fanny:s3cret@"))
    assert "no_such_database" in message and "s3cret" not in message
    refused_to_open("postgresql://127.0.0.1:notaport/board")         # malformed


def test_a_newer_schema_is_refused(postgres_url: str):
    PostgresPositiveBoard(postgres_url).close()
    with psycopg.connect(postgres_url) as db:
        db.execute("UPDATE board SET version = %s", (SCHEMA_VERSION + 1,))
    assert "newer than this broker" in refused_to_open(postgres_url)


def test_brokers_opening_a_new_database_together_create_one_schema(postgres_url: str):
    boards: list[PostgresPositiveBoard] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            boards.append(PostgresPositiveBoard(postgres_url))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [] and len(boards) == 4
        assert boards[0].add(uid(0, 0), [tok(1)], NOW, code_required=False) == 1
        assert boards[3].since(0, 10, NOW)[1] == 1
    finally:
        for b in boards:
            b.close()


def test_pollers_never_skip_a_token_while_brokers_upload_together(postgres_url: str):
    """Two boards (two broker processes) upload at once while a poller follows the cursor:
    every committed token is seen exactly once (a cursor never jumps over a later commit)."""
    writers = [PostgresPositiveBoard(postgres_url) for _ in range(2)]
    reader = PostgresPositiveBoard(postgres_url)
    done = threading.Event()
    seen: list[str] = []

    def upload(k: int) -> None:
        for i in range(40):
            writers[k].add(uid(k, i), [tok(k * 1000 + i * 3 + j) for j in range(3)], NOW,
                           code_required=False)

    def poll() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            tokens, cursor, more = reader.since(cursor, 7, NOW)
            seen.extend(t.token for t in tokens)
            if finished and not more:
                return

    threads = [threading.Thread(target=upload, args=(k,)) for k in range(2)]
    poller = threading.Thread(target=poll)
    try:
        poller.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        poller.join()
        assert len(seen) == len(set(seen)) == 240
        assert reader.last_cursor() == 240                      # no gap, no number burnt
    finally:
        for b in [*writers, reader]:
            b.close()


def test_a_lost_connection_is_replaced_at_the_next_call(postgres: PostgresServer,
                                                        postgres_url: str):
    board = PostgresPositiveBoard(postgres_url)
    try:
        board.add(uid(0, 0), [tok(1)], NOW, code_required=False)
        name = postgres_url.rsplit("/", 1)[1]
        postgres.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       f"WHERE datname = '{name}'")
        with pytest.raises(BoardError, match="could not be read"):
            board.last_cursor()                           # the server answers "unavailable"
        assert board.last_cursor() == 1                   # a new connection
        assert board.add(uid(0, 1), [tok(2)], NOW, code_required=False) == 1
    finally:
        board.close()
    with pytest.raises(BoardError, match="closed"):
        board.last_cursor()


def test_a_crash_before_the_commit_leaves_no_token_and_the_code_unused(postgres_url: str):
    """The process dies after the inserts, before COMMIT: PostgreSQL rolls the upload back."""
    board = PostgresPositiveBoard(postgres_url)
    soon = NOW + timedelta(hours=1)
    board.add_code(code_hash(CODE), soon)
    script = textwrap.dedent(f"""
        import os, sys
        from datetime import datetime, UTC
        from broker import postgres_board
        from fanny_tui.protocol.messages import PositiveToken

        class Dying(postgres_board._PostgresWrite):
            def consume(self, *args):
                super().consume(*args)
                os._exit(3)                   # killed after every write, before COMMIT
        postgres_board.PostgresPositiveBoard._WRITE = Dying
        board = postgres_board.PostgresPositiveBoard(sys.argv[1])
        token = PositiveToken(token="{tok(7).token}",
                              expires_at=datetime(2026, 3, 14, 4, tzinfo=UTC))
        board.add("{uid(0, 0)}", [token], datetime(2026, 3, 1, 10, 30, tzinfo=UTC),
                  code_hash="{code_hash(CODE)}")
        sys.exit(0)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script, postgres_url], timeout=60)
        assert done.returncode == 3                                   # it did die mid-way
        assert board.count() == 0 and board.last_cursor() == 0
        assert board.code_record(code_hash(CODE)) == CodeRecord(expires_at=soon)
        assert board.add(uid(0, 0), [tok(7)], NOW, code_hash=code_hash(CODE),
                         declaration_hash=declaration_hash(new_declaration(bytes(32)))) == 1
    finally:
        board.close()


# --- privacy: every table after a real broker ran on PostgreSQL (issue 8, point 4) ----------


HEX64 = re.compile(r"[0-9a-f]{64}")
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


async def test_postgres_holds_only_what_the_sqlite_board_holds(tmp_path: Path,
                                                               postgres_url: str):
    """Sessions with positions and a match, a real device's coded declaration of two uploads,
    a poll, a decoy, a refused second declaration: then every table of every schema holds
    only token hashes, expiries, cursors, code and declaration hashes, counts and upload
    IDs -- no session ID, position, address, code, secret or time of upload."""
    now = datetime.now(UTC)
    code = format_code(bytes(range(20, 30)))
    board = PostgresPositiveBoard(postgres_url)
    board.add_code(code_hash(code), now + timedelta(hours=1))
    board.close()
    device = TokenStore.in_dir(tmp_path / "device")
    other = TokenStore.in_dir(tmp_path / "other")
    poller = TokenStore.in_dir(tmp_path / "poller")
    made = {f"{n:064x}": expiry_for(now - timedelta(hours=n % 300)) for n in range(1, 503)}
    for token, expires_at in made.items():
        device.add(token, expires_at)
    poller.add(next(iter(made)), made[next(iter(made))])
    other.add("e" * 64, expiry_for(now))
    async with running(tmp_path, postgres_url=postgres_url, open_declarations=False) as broker:
        async with Client.open(broker.url) as a, Client.open(broker.url) as b:
            await a.hello()
            await b.hello()
            await a.at(0)
            await b.at(3, lon=LON + 0.00002)
            await a.barrier()
            session_ids = [a.session_id, b.session_id]
        declare(device, code)
        secret = device.pending()[0].declaration
        outcomes = await upload_pending(device, broker.url)
        assert [o.acknowledged for o in outcomes] == [True, True]
        declare(other, code)
        assert [o.refused for o in await upload_pending(other, broker.url)] == ["code_used"]
        assert (await poll_once(poller, broker.url)).matched == 1
        async with Client.open(broker.url) as anon:
            await anon.send(PositivesPoll())
            assert len((await anon.expect(Positives)).tokens) == 502
    for store in (device, other, poller):
        store.close()

    with psycopg.connect(postgres_url) as db:
        tables = [r[0] for r in db.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')")]
        assert sorted(tables) == ["public.board", "public.codes", "public.positives",
                                  "public.uploads"]
        types = set(db.execute("SELECT data_type FROM information_schema.columns "
                               "WHERE table_schema = 'public'").fetchall())
        assert types <= {("bigint",), ("integer",), ("text",), ("boolean",)}  # no timestamp
        dump = {t: db.execute(f"SELECT * FROM {t}").fetchall() for t in tables}
        upload_ids = {r[0] for r in dump["public.uploads"]}
    assert len(dump["public.positives"]) == 502 and len(upload_ids) == 2
    assert {r[1] for r in dump["public.positives"]} == set(made)
    assert dump["public.board"] == [(True, 502, SCHEMA_VERSION)]
    [(hashed, expires_at, uses, used_until, declared)] = dump["public.codes"]
    assert (hashed, uses, declared) == (code_hash(code), 2, declaration_hash(secret))
    assert expires_at == int((now + timedelta(hours=1)).timestamp())   # as issued
    assert used_until is not None                   # the window's end, as SQLite keeps it
    # Every other instant is an expiry on the hour: nothing tells when an upload came.
    assert all(exp % 3600 == 0 for _, _, exp in dump["public.positives"])
    assert all(keep % 3600 == 0 and len(digest) == 64
               for _, _, digest, keep in dump["public.uploads"])
    for table, rows in dump.items():
        for row in rows:
            for value in row:
                if isinstance(value, str):
                    assert HEX64.fullmatch(value) or (
                        UUID4.fullmatch(value) and value in upload_ids), (table, value)
                else:
                    assert isinstance(value, (int, bool)), (table, value)
    text = repr(dump)
    for private in [*session_ids, secret, code, code.replace("-", ""), "127.0.0.1",
                    f"{north(0):.4f}", f"{north(3):.4f}", f"{LON:.4f}"]:
        assert private not in text, private
    assert not upload_ids & set(session_ids)


async def test_open_backends_opens_the_postgres_board_of_the_settings(tmp_path: Path,
                                                                      postgres_url: str):
    backends = await open_backends(settings_for(tmp_path, postgres_url=postgres_url))
    try:
        assert isinstance(backends.board, PostgresPositiveBoard) and backends.owns_board
        assert not (tmp_path / "board.sqlite3").exists()               # no SQLite file made
    finally:
        await backends.close()
    with pytest.raises(BoardError, match="^postgres_url: .*no_such_database"):
        await open_backends(settings_for(
            tmp_path, postgres_url=postgres_url.rsplit("/", 1)[0] + "/no_such_database"))
