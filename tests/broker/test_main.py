"""broker.__main__ (the fanny-broker command) and the systemd unit shipped with it."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path

import pytest

from broker.__main__ import build_parser, main, parse_ttl
from fanny_tui.protocol.codes import code_hash, normalize_code
from fanny_tui.protocol.messages import (
    Match,
    PositiveAck,
    Positives,
    PositivesPoll,
    PositiveUpload,
)

from .kit import LAT, LON, Client, healthz, new_id, north, positive, real_expiry, token

UNIT = Path(str(files("broker") / "fanny-broker.service"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command() -> list[str]:
    """The installed console script, or the module when the script is not installed."""
    script = Path(sys.executable).with_name("fanny-broker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "broker"]


async def start(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``fanny-broker serve ARGS``; return it and its URL once it says it listens."""
    process = await asyncio.create_subprocess_exec(
        *command(), "serve", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    found = re.fullmatch(r"listening on (wss?://127\.0\.0\.1:\d+)\n", line)
    if not found:
        os.killpg(process.pid, signal.SIGKILL)
        _, err = await process.communicate()
        raise AssertionError(f"unexpected first line {line!r}; stderr: {err.decode()}")
    return process, found.group(1)


def issue(db: Path, *args: str) -> tuple[str, str]:
    """Run ``fanny-broker issue-code --db DB ARGS``; return (stdout, stderr)."""
    done = subprocess.run([*command(), "issue-code", "--db", str(db), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


async def stop(process: asyncio.subprocess.Process, signum: int) -> tuple[int, str, float]:
    """Send ``signum``; return the exit status, stderr and how long the stop took."""
    began = time.monotonic()
    process.send_signal(signum)
    try:
        _, err = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return int(process.returncode or 0), err.decode(), time.monotonic() - began


SECRET = "5e" * 32
"""A declaration secret (issue 8, point 3): the same in every upload of one declaration."""


async def test_serve_healthz_sigterm_and_restart_keeps_committed_tokens(tmp_path):
    db = tmp_path / "board.sqlite3"
    port = free_port()
    code = issue(db)[0].strip()          # issued before the broker ever ran: creates the board
    process, url = await start("--host", "127.0.0.1", "--port", str(port), "--db", str(db),
                               "--log-level", "DEBUG", "--radius-max-m", "50",
                               "--upload-answer-delay-s", "0.2")
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
    status, err, took = await stop(process, signal.SIGTERM)
    print(f"SIGTERM to exit: {took:.3f} s")
    assert status == 0, err
    assert "Traceback" not in err
    assert "listening on" in err and "positive upload committed (1 tokens)" in err
    assert "declarations=code" in err and "WARNING" not in err
    for private in [*session_ids, token(5), f"{LAT}", f"{north(3):.5f}", f"{LON:.5f}",
                    code, code.replace("-", ""), later, code_hash(code), SECRET]:
        assert private not in err, "a session ID, token, code or position reached the log"

    # Restart on a fresh port: the token committed before SIGTERM is still published.
    process, url = await start("--port", "0", "--db", str(db))
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
        status, err, _ = await stop(process, signal.SIGINT)
    assert status == 0, err
    with sqlite3.connect(db) as conn:
        uses = dict(conn.execute("SELECT code_hash, uploads FROM codes").fetchall())
    assert uses == {code_hash(code): 2, code_hash(later): 1}


async def test_open_declarations_warns_and_healthz_says_open(tmp_path):
    process, url = await start("--port", "0", "--db", str(tmp_path / "b.sqlite3"),
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
    status, err, _ = await stop(process, signal.SIGTERM)
    assert status == 0, err
    warnings = [line for line in err.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "open declarations" in warnings[0], err
    assert "declarations=open" in err and "127.0.0.1" not in warnings[0]


def test_issue_code_prints_one_code_and_stores_only_its_hash(tmp_path, capsys):
    db = tmp_path / "sub" / "board.sqlite3"
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


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1.5h", 5400), ("600", 600),
    (" 2H ", 7200), ("30d", 30 * 86400),
])
def test_ttl_units(text, seconds):
    assert parse_ttl(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("ttl", ["0s", "31d", "1w", "-1h", "h", "1 hour", "nan", ""])
def test_bad_ttl_one_line_exit_2(tmp_path, capsys, ttl):
    assert main(["issue-code", "--db", str(tmp_path / "b.sqlite3"), "--ttl", ttl]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--ttl" in err


def test_issue_code_on_an_unusable_file_one_line_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database " * 200)
    assert main(["issue-code", "--db", str(junk)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "cannot open the positive board" in err


def test_issue_code_as_root_gives_a_new_board_to_the_directory_owner(tmp_path, capsys):
    """The service's dynamic user owns its state directory; root's new file must be its."""
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() == 0:
        os.chown(state, 54321, 54321)
        expected = 54321
    else:                                   # not root: nothing to hand over, files stay ours
        expected = os.geteuid()
    assert main(["issue-code", "--db", str(state / "positives.sqlite3")]) == 0
    assert [(p.name, p.stat().st_uid) for p in state.iterdir()] == [
        ("positives.sqlite3", expected)]


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
    (["serve", "--db", "x", "--upload-answer-delay-s", "-1"], "--upload-answer-delay-s"),
    (["serve", "--db", "x", "--upload-answer-delay-s", "61"], "--upload-answer-delay-s"),
    (["serve", "--db", "x", "--redis", "http://127.0.0.1:6379"], "--redis: expected a URL"),
    (["serve", "--db", "x", "--postgres", "mysql://127.0.0.1"], "--postgres: expected a URL"),
    (["issue-code"], "--db"),
])
def test_bad_arguments_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("fanny-broker: error: ") and needle in err


def test_unusable_database_path_one_line_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database " * 200)
    for db in (junk / "under" / "a-file.sqlite3", tmp_path, junk):
        assert main(["serve", "--port", "0", "--db", str(db), "--log-level", "ERROR"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot open the positive board" in err, err


def test_unreachable_redis_one_line_exit_2(tmp_path, capsys):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))          # bound, not listening: connections are refused
        port = closed.getsockname()[1]
        code = main(["serve", "--port", "0", "--db", str(tmp_path / "b.sqlite3"),
                     "--redis", f"redis://127.0.0.1:{port}/0", "--log-level", "ERROR"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"fanny-broker: error: redis_url: cannot reach Redis at "
                          f"redis://127.0.0.1:{port}/0: "), err


def test_address_in_use_one_line_exit_1(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
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
    done = subprocess.run([*command(), "serve", "--db", str(tmp_path / "x" / "y" / "z.db")],
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
    assert one["ExecStart"] == ("fanny-broker serve --host 127.0.0.1 --port 8765 "
                                "--db /var/lib/fanny-broker/positives.sqlite3 "
                                "--max-connections-per-address 0")
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
    assert Path(args.db).parent == Path("/var/lib") / one["StateDirectory"]
    # Declaration codes are required (no --open-declarations); behind the loopback proxy the
    # per-address cap would count every client as one.
    assert args.open_declarations is False and args.max_connections_per_address == 0
    # The documented issue-code command line is one our parser accepts, on the same file.
    documented = re.search(r"#\s+(fanny-broker issue-code .*)", UNIT.read_text())
    assert documented is not None
    issue = build_parser().parse_args(shlex.split(documented.group(1))[1:])
    assert (issue.command, issue.db) == ("issue-code", args.db)


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not available here: only the parser test checked the unit")
    # verify checks that ExecStart's program exists; point it at the installed script.
    copy = tmp_path / "fanny-broker.service"
    copy.write_text(UNIT.read_text(encoding="utf-8").replace(
        "ExecStart=fanny-broker ", f"ExecStart={command()[0]} " if len(command()) == 1
        else f"ExecStart={sys.executable} -m broker "), encoding="utf-8")
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                          timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if "fanny-broker.service" in line]
    assert done.returncode == 0 and complaints == [], done.stdout + done.stderr
    security = subprocess.run([analyze, "security", "--offline=yes", str(copy)],
                              capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    if level:
        print(f"systemd-analyze security exposure: {level.group(1)} (0 best, 10 worst)")
        assert float(level.group(1)) <= 3.0
