"""broker.__main__ (the fanny-broker command) and the systemd unit shipped with it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path

import psycopg
import pytest

from broker.__main__ import build_parser, create_board, main, parse_ttl
from fanny_tui.protocol.codes import code_hash, normalize_code
from fanny_tui.protocol.messages import (
    Match,
    PositiveAck,
    Positives,
    PositivesPoll,
    PositiveUpload,
)
from tests.helpers import free_port, loopback_port
from tests.servers import (
    broker_command,
    start_broker_process,
    stop_broker_process,
)

from .kit import LAT, LON, Client, healthz, new_id, north, positive, real_expiry, token

UNIT = Path(str(files("broker") / "fanny-broker.service"))


def issue(db: Path, *args: str) -> tuple[str, str]:
    """Run ``fanny-broker issue-code --db DB ARGS``; return (stdout, stderr)."""
    done = subprocess.run([*broker_command(), "issue-code", "--db", str(db), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


SECRET = "5e" * 32
"""A declaration secret (issue 8, point 3): the same in every upload of one declaration."""


async def test_serve_healthz_sigterm_and_restart_keeps_committed_tokens(tmp_path):
    db = tmp_path / "board.sqlite3"
    port = free_port()
    create = subprocess.run([*broker_command(), "create-board", "--db", str(db)],
                            capture_output=True, text=True, timeout=60)
    assert create.returncode == 0 and create.stdout == "", create.stderr
    assert create.stderr == f"fanny-broker: created an empty positive board at {db}\n"
    code = issue(db)[0].strip()          # issued before the broker ever ran
    process, url = await start_broker_process(
        "--host", "127.0.0.1", "--port", str(port), "--db", str(db), "--log-level", "DEBUG",
        "--radius-max-m", "50", "--upload-answer-delay-s", "0.2")
    try:
        assert url == f"ws://127.0.0.1:{port}"
        status, body = await healthz(port)
        assert status == 200 and body["status"] == "ok" and body["declarations"] == "code"
        async with Client.open(url) as a, Client.open(url) as b:
            assert (await a.hello(radius_m=500.0)).radius_m == 50.0
            await b.hello()
            await a.at(0)
            await a.barrier()
            await b.at(3, lon=LON + 0.00002)
            await b.expect(Match)
            session_ids = [a.session_id, b.session_id]
        later = issue(db, "--ttl", "10m")[0].strip()     # issued while the broker runs
        async with Client.open(url) as anon:
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(6, real_expiry())]))
            await anon.expect_error("code_required", "code")
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(5, real_expiry())],
                                           code=code.lower(), declaration=SECRET))
            assert (await anon.expect(PositiveAck)).count == 1
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(7, real_expiry())],
                                           code=later))
            assert (await anon.expect(PositiveAck)).count == 1
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    status, err, took = await stop_broker_process(process, signal.SIGTERM)
    print(f"SIGTERM to exit: {took:.3f} s")
    assert status == 0, err
    assert "Traceback" not in err
    assert "listening on" in err and "positive upload committed (1 tokens)" in err
    assert "declarations=code" in err and "WARNING" not in err
    for private in [*session_ids, token(5), f"{LAT}", f"{north(3):.5f}", f"{LON:.5f}",
                    code, code.replace("-", ""), later, code_hash(code), SECRET]:
        assert private not in err, "a session ID, token, code or position reached the log"

    # Restart on a fresh port: the token committed before SIGTERM is still published.
    process, url = await start_broker_process("--port", "0", "--db", str(db))
    try:
        async with Client.open(url) as anon:
            await anon.send(PositivesPoll())
            assert [t.token for t in (await anon.expect(Positives)).tokens] == [
                token(5), token(7)]
            # The code was consumed before the restart; within its continuation window it
            # still authorizes another upload of the same declaration (its secret), counted
            # durably; without the secret it is used up.
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(9, real_expiry())],
                                           code=code))
            await anon.expect_error("code_used", "code")
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(8, real_expiry())],
                                           code=code, declaration=SECRET))
            assert (await anon.expect(PositiveAck)).count == 1
    finally:
        status, err, _ = await stop_broker_process(process, signal.SIGINT)
    assert status == 0, err
    with sqlite3.connect(db) as conn:
        uses = dict(conn.execute("SELECT code_hash, uploads FROM codes").fetchall())
    assert uses == {code_hash(code): 2, code_hash(later): 1}


async def test_open_declarations_warns_and_healthz_says_open(tmp_path):
    create_board(tmp_path / "b.sqlite3")
    process, url = await start_broker_process("--port", "0", "--db", str(tmp_path / "b.sqlite3"),
                                              "--open-declarations", "--upload-answer-delay-s", "0")
    try:
        port = int(url.rsplit(":", 1)[1])
        status, body = await healthz(port)
        assert status == 200 and body["declarations"] == "open"
        async with Client.open(url) as anon:
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(1, real_expiry())]))
            assert (await anon.expect(PositiveAck)).count == 1
            await anon.send(PositiveUpload(upload_id=new_id(), tokens=[positive(2, real_expiry())],
                                           code="K7QF-3M9X-TR2B-8HJD"))
            await anon.expect_error("code_invalid", "code")    # a code sent is still checked
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    status, err, _ = await stop_broker_process(process, signal.SIGTERM)
    assert status == 0, err
    warnings = [line for line in err.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "open declarations" in warnings[0], err
    assert "declarations=open" in err and "127.0.0.1" not in warnings[0]


def test_issue_code_prints_one_code_and_stores_only_its_hash(tmp_path, capsys):
    db = tmp_path / "sub" / "board.sqlite3"
    create_board(db)
    before = datetime.now(UTC)
    assert main(["issue-code", "--db", str(db), "--ttl", "90m"]) == 0
    after = datetime.now(UTC)
    out, err = capsys.readouterr()
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}\n", out), out
    code = out.strip()
    assert normalize_code(code) == code.replace("-", "")
    assert "valid until" in err and code not in err
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT code_hash, expires_at, uploads, used_until FROM codes")
        (hashed, expires_at, uploads, used_until), = rows.fetchall()
    assert hashed == code_hash(code) and (uploads, used_until) == (0, None)
    assert (before + timedelta(minutes=90)).timestamp() - 1 <= expires_at
    assert expires_at <= (after + timedelta(minutes=90)).timestamp() + 1
    blob = b"".join(f.read_bytes() for f in tmp_path.glob("sub/board.sqlite3*"))
    assert code.encode() not in blob and code.replace("-", "").encode() not in blob
    # Two codes are never the same (80 random bits each).
    assert main(["issue-code", "--db", str(db)]) == 0
    assert capsys.readouterr().out.strip() != code


def test_issue_code_into_a_region_s_postgresql_board(postgres_url, capsys):
    # A region's brokers keep their board in PostgreSQL (postgres_url): a code issued into
    # the db_path SQLite file they never open was refused on every one of them.
    from broker.postgres_board import PostgresPositiveBoard

    assert main(["create-board", "--postgres", postgres_url]) == 0
    capsys.readouterr()
    before = datetime.now(UTC)
    assert main(["issue-code", "--postgres", postgres_url, "--ttl", "2h"]) == 0
    out, err = capsys.readouterr()
    code = out.strip()
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}", code), out
    assert "valid until" in err and code not in err
    board = PostgresPositiveBoard(postgres_url)
    try:
        record = board.code_record(code_hash(code))
    finally:
        board.close()
    assert record is not None
    assert abs(record.expires_at - (before + timedelta(hours=2))) < timedelta(minutes=1)
    # Unreachable: one line naming postgres_url, never the URL (it may hold a password).
    assert main(["issue-code", "--postgres", "postgresql://u:secret@127.0.0.1:1/x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "postgres_url:" in err
    assert "secret" not in err


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1.5h", 5400), ("600s", 600),
    (" 2H ", 7200), ("30d", 30 * 86400),
])
def test_ttl_units(text, seconds):
    assert parse_ttl(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("ttl", ["0s", "31d", "1w", "-1h", "h", "1 hour", "nan", "", "1", "600"])
def test_bad_ttl_one_line_exit_2(tmp_path, capsys, ttl):
    create_board(tmp_path / "b.sqlite3")
    assert main(["issue-code", "--db", str(tmp_path / "b.sqlite3"), "--ttl", ttl]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--ttl" in err


def test_a_ttl_without_unit_is_refused_saying_which_units(tmp_path, capsys):
    """``--ttl 1`` used to mean one second: a code dead before it was read out."""
    create_board(tmp_path / "b.sqlite3")
    assert main(["issue-code", "--db", str(tmp_path / "b.sqlite3"), "--ttl", "1"]) == 2
    err = capsys.readouterr().err
    assert err == ("fanny-broker: error: argument --ttl: expected a duration with its unit "
                   "(s, m, h or d), like 90s, 30m, 2h or 1d (a bare number is refused: it does "
                   "not say which unit), got '1'\n")
    with sqlite3.connect(tmp_path / "b.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM codes").fetchone() == (0,)


def test_issue_code_on_an_unusable_file_one_line_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database " * 200)
    assert main(["issue-code", "--db", str(junk)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "cannot open the positive board" in err


def test_create_board_as_root_gives_the_new_board_to_the_directory_owner(tmp_path, capsys):
    """The service's dynamic user owns its state directory; root's new file must be its."""
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() == 0:
        os.chown(state, 54321, 54321)
        expected = 54321
    else:                                   # not root: nothing to hand over, files stay ours
        expected = os.geteuid()
    assert main(["create-board", "--db", str(state / "positives.sqlite3")]) == 0
    assert [(p.name, p.stat().st_uid) for p in state.iterdir()] == [
        ("positives.sqlite3", expected)]
    assert main(["issue-code", "--db", str(state / "positives.sqlite3")]) == 0
    assert {p.stat().st_uid for p in state.iterdir()} == {expected}


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--port", "70000", "--db", "x"], "--port"),
    (["serve", "--port", "http", "--db", "x"], "--port"),
    (["serve", "--db", "x", "--radius-max-m", "-5"], "--radius-max-m"),
    (["serve", "--db", "x", "--radius-max-m", "20000"], "--radius-max-m"),
    (["serve", "--db", "x", "--cooldown-s", "nan"], "--cooldown-s"),
    (["serve", "--db", "x", "--position-timeout-s", "0"], "--position-timeout-s"),
    (["serve", "--db", "x", "--log-level", "loud"], "--log-level"),
    (["serve", "--db", "x", "--bogus"], "--bogus"),
    (["serve"], "--db"),
    (["launch"], "launch"),
    ([], "serve"),
    (["serve", "--db", "x", "--certfile", "c.pem"], "--keyfile"),
    (["serve", "--db", "x", "--keyfile", "k.pem"], "--certfile"),
    (["serve", "--db", "x", "--max-connections-per-address", "-1"],
     "--max-connections-per-address"),
    (["serve", "--db", "x", "--max-connections", "-1"], "--max-connections:"),
    (["serve", "--db", "x", "--max-connections", "10000001"], "--max-connections:"),
    (["serve", "--db", "x", "--position-rate-per-s", "0"], "--position-rate-per-s"),
    (["serve", "--db", "x", "--max-speed-mps", "0"], "--max-speed-mps"),
    (["serve", "--db", "x", "--max-speed-mps", "2e6"], "--max-speed-mps"),
    (["serve", "--db", "x", "--upload-answer-delay-s", "-1"], "--upload-answer-delay-s"),
    (["serve", "--db", "x", "--upload-answer-delay-s", "61"], "--upload-answer-delay-s"),
    (["serve", "--db", "x", "--redis", "http://127.0.0.1:6379"], "--redis: expected a URL"),
    (["serve", "--db", "x", "--postgres", "mysql://127.0.0.1"], "--postgres: expected a URL"),
    (["serve", "--db", "x", "--postgres", "sqlite:///x"], "--postgres: expected a URL"),
    (["issue-code"], "--db"),
    (["create-board"], "--db"),
])
def test_bad_arguments_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("fanny-broker: error: ") and needle in err


def test_unusable_database_path_one_line_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database " * 200)
    for db in (tmp_path, junk):
        assert main(["serve", "--port", "0", "--db", str(db), "--log-level", "ERROR"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot open the positive board" in err, err


def test_unreachable_redis_one_line_exit_2(tmp_path, capsys):
    with loopback_port(listening=False) as port:        # connections are refused
        db = tmp_path / "b.sqlite3"
        assert main(["create-board", "--db", str(db)]) == 0
        capsys.readouterr()
        code = main(["serve", "--port", "0", "--db", str(db),
                     "--redis", f"redis://127.0.0.1:{port}/0", "--log-level", "ERROR"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"fanny-broker: error: redis_url: cannot reach Redis at "
                          f"redis://127.0.0.1:{port}/0: "), err
@pytest.mark.parametrize("command_line", [["serve", "--port", "0"], ["issue-code"]])
def test_a_missing_board_is_refused_naming_the_path_and_the_command(tmp_path, capsys,
                                                                    command_line):
    """A mistyped --db used to start an empty board, where the tester's code is unknown."""
    typo = tmp_path / "positive.sqlite3"
    assert main([*command_line, "--db", str(typo)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"fanny-broker: error: cannot open the positive board {typo}: no such file (create "
        f"it with: fanny-broker create-board --db {typo})\n")
    assert list(tmp_path.iterdir()) == []                 # nothing was created


def test_create_board_creates_folders_and_never_overwrites(tmp_path, capsys):
    db = tmp_path / "state" / "sub" / "board.sqlite3"
    assert main(["create-board", "--db", str(db)]) == 0
    assert capsys.readouterr().err == f"fanny-broker: created an empty positive board at {db}\n"
    assert (db.stat().st_mode & 0o777, db.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert main(["issue-code", "--db", str(db)]) == 0
    code = capsys.readouterr().out.strip()
    before = db.read_bytes()
    assert main(["create-board", "--db", str(db)]) == 2
    assert capsys.readouterr().err == (
        f"fanny-broker: error: {db} already exists: not overwritten (a board is created once; "
        "serve and issue-code use it as it is)\n")
    assert main(["create-board", "--db", str(db), "--if-missing"]) == 0
    assert capsys.readouterr().err == f"fanny-broker: {db} exists: left as it is\n"
    assert db.read_bytes() == before
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT code_hash FROM codes").fetchall() == [(code_hash(code),)]


def test_create_board_refuses_any_existing_file(tmp_path, capsys):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a board")
    assert main(["create-board", "--db", str(junk)]) == 2
    assert "already exists: not overwritten" in capsys.readouterr().err
    assert junk.read_text() == "not a board"
    blocked = junk / "board.sqlite3"                      # its folder is a file
    assert main(["create-board", "--db", str(blocked)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot create the positive board {blocked}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _pg_tables(url: str) -> list[str]:
    with psycopg.connect(url) as db:
        return [row[0] for row in db.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]


def test_a_regions_board_is_created_and_given_codes_on_postgresql(postgres_url, tmp_path,
                                                                   capsys):
    """Issue 8: the operator of a region creates its PostgreSQL board and issues codes into
    it, as with the SQLite file; nothing creates a board but create-board."""
    missing = ("fanny-broker: error: postgres_url: the database holds no positive board "
               "(create it with: fanny-broker create-board --postgres URL, or --config FILE)\n")
    assert main(["issue-code", "--postgres", postgres_url]) == 2
    assert capsys.readouterr() == ("", missing)
    assert main(["serve", "--port", "0", "--postgres", postgres_url]) == 2
    assert capsys.readouterr() == ("", missing)
    assert _pg_tables(postgres_url) == []                   # neither created anything
    assert main(["create-board", "--postgres", postgres_url]) == 0
    assert capsys.readouterr().err == (
        "fanny-broker: created an empty positive board in the PostgreSQL database\n")
    assert _pg_tables(postgres_url) == ["board", "codes", "positives", "uploads"]
    assert main(["create-board", "--postgres", postgres_url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a positive board" in err
    assert main(["create-board", "--postgres", postgres_url, "--if-missing"]) == 0
    assert capsys.readouterr().err == (
        "fanny-broker: the PostgreSQL database holds a positive board: left as it is\n")
    assert main(["issue-code", "--postgres", postgres_url, "--ttl", "2h"]) == 0
    code = capsys.readouterr().out.strip()
    with psycopg.connect(postgres_url) as db:
        (hashed, expires_at, uploads), = db.execute(
            "SELECT code_hash, expires_at, uploads FROM codes").fetchall()
    assert (hashed, uploads) == (code_hash(code), 0)
    assert abs(expires_at - (datetime.now(UTC) + timedelta(hours=2)).timestamp()) < 60
    assert list(tmp_path.iterdir()) == []                   # no SQLite file on the side


def test_create_board_and_issue_code_read_the_storage_settings_of_the_config_file(
        postgres_url, tmp_path, capsys):
    config = tmp_path / "broker.toml"
    config.write_text(f'[storage]\npostgres_url = "{postgres_url}"\n[server]\nport = 0\n')
    assert main(["create-board", "--config", str(config)]) == 0
    assert main(["issue-code", "--config", str(config)]) == 0
    code = capsys.readouterr().out.strip()
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT code_hash FROM codes").fetchall() == [(code_hash(code),)]
    # An option wins over the file (as for serve): here the SQLite file beside it.
    db_file = tmp_path / "local.sqlite3"
    config.write_text('[storage]\ndb_path = "local.sqlite3"\n')
    assert main(["create-board", "--config", str(config)]) == 0
    assert main(["issue-code", "--config", str(config), "--ttl", "1h"]) == 0
    local = capsys.readouterr().out.strip()
    with sqlite3.connect(db_file) as conn:
        assert conn.execute("SELECT code_hash FROM codes").fetchall() == [(code_hash(local),)]
    # The whole file is checked, with serve's one-line errors naming the file and key.
    config.write_text('[storage]\ndb_path = "local.sqlite3"\n[limits]\nposition_burst = 0\n')
    assert main(["issue-code", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fanny-broker: config error: {config}: limits.position_burst: ")
    config.write_text("[server]\nport = 0\n")
    for command_line in (["issue-code"], ["create-board"], ["serve"]):
        assert main([*command_line, "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--db: expected the positive board's SQLite file" in err
        assert "--postgres URL" in err, err


async def test_serve_on_postgresql_needs_no_db_path(postgres_url, tmp_path):
    assert main(["create-board", "--postgres", postgres_url]) == 0
    process, url = await start_broker_process("--port", "0", "--postgres", postgres_url,
                                              "--open-declarations", "--upload-answer-delay-s", "0")
    try:
        async with Client.open(url) as anon:
            await anon.send(PositiveUpload(upload_id=new_id(),
                                           tokens=[positive(1, real_expiry())]))
            assert (await anon.expect(PositiveAck)).count == 1
    finally:
        status, err, _ = await stop_broker_process(process, signal.SIGTERM)
    assert status == 0, err
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT token FROM positives").fetchall() == [(token(1),)]
    assert list(tmp_path.iterdir()) == []


def test_version_prints_the_kit_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"fanny-broker {version('fanny-field-kit')}\n"


def test_address_in_use_one_line_exit_1(tmp_path, capsys):
    with loopback_port(listening=True) as port:         # the port is taken
        create_board(tmp_path / "b.sqlite3")
        code = main(["serve", "--port", str(port), "--db", str(tmp_path / "b.sqlite3"),
                     "--log-level", "ERROR"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1 port {port}" in err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert main(["serve", "--help"]) == 0
    assert "--position-timeout-s" in capsys.readouterr().out


def test_console_script_bad_arguments_print_no_traceback(tmp_path):
    (tmp_path / "x").write_text("a file where a directory should be")
    done = subprocess.run([*broker_command(), "serve", "--db", str(tmp_path / "x" / "y" / "z.db")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stdout == ""


# --- the systemd unit ------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values...]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], {})
            continue
        assert current is not None and "=" in stripped, f"line {number}: {line!r}"
        key, _, value = stripped.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_has_the_hardening_and_the_documented_command():
    unit = parse_unit(UNIT.read_text(encoding="utf-8"))
    service = unit["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["ExecStart"] == ("/usr/local/bin/fanny-broker serve --host 127.0.0.1 "
                                "--port 8765 --db /var/lib/fanny-broker/positives.sqlite3 "
                                "--max-connections-per-address 0")
    # systemd runs no program by a bare name: both commands are absolute paths.
    assert one["ExecStartPre"] == ("/usr/local/bin/fanny-broker create-board "
                                   "--db /var/lib/fanny-broker/positives.sqlite3 --if-missing")
    expected = {
        "DynamicUser": "yes", "StateDirectory": "fanny-broker", "Restart": "on-failure",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    assert {key: one.get(key) for key in expected} == expected
    assert "@system-service" in service["SystemCallFilter"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # The command line is one our own parser accepts, and the DB is in the StateDirectory.
    argv = shlex.split(one["ExecStart"])
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.host, args.port) == ("serve", "127.0.0.1", 8765)
    assert Path(args.db_path).parent == Path("/var/lib") / one["StateDirectory"]
    # Declaration codes are required (no --open-declarations); behind the loopback proxy the
    # per-address cap would count every client as one.
    assert args.open_declarations is None and args.max_connections_per_address == 0
    # The board it serves is the one ExecStartPre creates on the first start.
    pre = build_parser().parse_args(shlex.split(one["ExecStartPre"])[1:])
    assert (pre.command, pre.db_path, pre.if_missing) == ("create-board", args.db_path, True)
    # The documented issue-code command line is one our parser accepts, on the same file.
    documented = re.search(r"#\s+(fanny-broker issue-code .*)", UNIT.read_text())
    assert documented is not None
    issue = build_parser().parse_args(shlex.split(documented.group(1))[1:])
    assert (issue.command, issue.db_path) == ("issue-code", args.db_path)


def test_unit_passes_systemd_analyze_verify(tmp_path):
    """The unit as shipped, unchanged, verified in a root where its program exists.

    ``systemd-analyze verify`` checks that ExecStart's program exists and is executable, so
    it runs with ``--root`` on a folder holding the system's units, the shipped unit and, at
    the unit's absolute path, the installed ``fanny-broker`` script. The Debian package
    ``systemd`` provides it; ``./kit test`` installs it where it is missing.
    """
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: apt-get install systemd (./kit test)"
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copyfile(UNIT, root / "etc/systemd/system" / UNIT.name)
    one = {key: values[-1] for key, values in parse_unit(UNIT.read_text())["Service"].items()}
    program = Path(shlex.split(one["ExecStart"])[0])
    assert program.is_absolute() and program == Path(shlex.split(one["ExecStartPre"])[0])
    installed = root / program.relative_to("/")
    installed.parent.mkdir(parents=True)
    script = Path(sys.executable).with_name("fanny-broker")
    if script.exists():
        shutil.copy2(script, installed)
    else:                                   # run from a source tree: the module, as a script
        installed.write_text(f"#!/bin/sh\nexec {sys.executable} -m broker \"$@\"\n")
        installed.chmod(0o755)
    done = subprocess.run([analyze, "verify", f"--root={root}", UNIT.name],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    installed.unlink()                      # the check is real: without the program it fails
    done = subprocess.run([analyze, "verify", f"--root={root}", UNIT.name],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"Command {program} is not executable" in done.stderr
    security = subprocess.run([analyze, "security", "--offline=yes", f"--root={root}",
                               UNIT.name], capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert level is not None, security.stdout + security.stderr
    print(f"systemd-analyze security exposure: {level.group(1)} (0 best, 10 worst)")
    assert float(level.group(1)) <= 3.0


# --- the documented command lines --------------------------------------------------------


def documented_commands() -> list[tuple[str, str]]:
    """Every ``fanny-broker ...`` line of a ```sh code block in README.md and docs/*.md
    (continuation lines joined, trailing ``# comment`` and ``&`` dropped): (where, line)."""
    root = Path(__file__).resolve().parents[2]
    found = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        fenced = False
        lines = doc.read_text(encoding="utf-8").splitlines()
        number = 0
        while number < len(lines):
            line = lines[number].strip()
            number += 1
            if line.startswith("```"):
                fenced = not fenced and line == "```sh"
                continue
            if not (fenced and line.startswith("fanny-broker ")):
                continue
            where = f"{doc.name}:{number}"
            while line.endswith("\\") and number < len(lines):
                line = line[:-1] + " " + lines[number].strip()
                number += 1
            line = re.sub(r"\s+#.*$", "", line).removesuffix("&").strip()
            found.append((where, line))
    return found


def test_every_documented_broker_command_line_parses():
    commands = documented_commands()
    assert len(commands) >= 8                            # README, field-testing, deployment
    assert any("create-board" in line for _, line in commands)
    for where, line in commands:
        words = shlex.split(line)
        try:
            build_parser().parse_args(words[1:])
        except SystemExit as exc:                      # --version, --help: printed, exit 0
            assert exc.code == 0, f"{where}: {line}"
        except Exception as exc:                       # the parser raises instead of exiting
            raise AssertionError(f"{where}: {line}: {exc}") from None
