"""fanny-tui's command line as a field tester uses it: real processes on loopback.

A ``fanny-broker serve`` process, two ``fanny-tui --headless`` processes with fixed positions 2 m
apart, then ``fanny-broker issue-code``, ``fanny-tui declare-positive --code`` and
``fanny-tui tokens --json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import pytest
import trustme

from broker.server import BrokerSettings, start_broker
from fanny_tui.journal import Journal

from .helpers import LAT, LON, METRE_LAT, TIME_UNIT, free_port

BIN = Path(sys.executable).parent


def _issue_code(db: Path) -> str:
    """``fanny-broker issue-code --db``: the code is the one line on stdout."""
    result = subprocess.run([BIN / "fanny-broker", "issue-code", "--db", db, "--ttl", "1h"],
                            capture_output=True, text=True, timeout=30, check=True)
    code = result.stdout.strip()
    assert re.fullmatch(r"[0-9A-Z]{4}(-[0-9A-Z]{4}){3}", code), result.stdout
    return code


def _write_config(path: Path, port: int, latitude: float, scheme: str = "ws",
                  extra: str = "") -> Path:
    path.write_text(f"""
[broker]
url = "{scheme}://127.0.0.1:{port}"
{extra}
reconnect_min_s = 0.2
reconnect_max_s = 1.0

[gps]
source = "fixed"
latitude = {latitude}
longitude = {LON}
accuracy_m = 3.0

[protocol]
radius_m = 10.0
position_interval_s = 0.3
poll_interval_s = 1.0
handshake_timeout_s = 10.0

[webrtc]
host_addresses = ["127.0.0.1"]
""")
    return path


class JsonLines:
    """A subprocess printing one JSON event per line, read asynchronously."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict] = []

    async def wait_for(self, name: str, timeout: float = 30.0) -> dict:
        async def scan() -> dict:
            for event in self.events:
                if event["event"] == name:
                    return event
            assert self.process.stdout is not None
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    raise AssertionError(f"process ended before {name}; saw "
                                         f"{[e['event'] for e in self.events]}")
                event = json.loads(line)
                self.events.append(event)
                if event["event"] == name:
                    return event
        return await asyncio.wait_for(scan(), timeout)

    def names(self) -> set[str]:
        return {e["event"] for e in self.events}


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def _stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), 15)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise


def _healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return response.status


async def _wait_healthy(port: int) -> None:
    for _ in range(100):
        try:
            if await asyncio.to_thread(_healthz, port) == 200:
                return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("the broker never answered /healthz")


def _create_board(db: Path) -> None:
    """``fanny-broker create-board --db``: serve and issue-code need the board to exist."""
    subprocess.run([BIN / "fanny-broker", "create-board", "--db", db], capture_output=True,
                   text=True, timeout=30, check=True)


async def test_headless_devices_declare_positive_and_alert(tmp_path):
    port = free_port()
    _create_board(tmp_path / "broker.sqlite3")
    broker = await _spawn(str(BIN / "fanny-broker"), "serve", "--host", "127.0.0.1", "--port",
                          str(port), "--db", str(tmp_path / "broker.sqlite3"))
    devices: list[asyncio.subprocess.Process] = []
    try:
        await _wait_healthy(port)
        config_a = _write_config(tmp_path / "a.toml", port, LAT)
        config_b = _write_config(tmp_path / "b.toml", port, LAT + 2 * METRE_LAT)
        for name, config in (("a", config_a), ("b", config_b)):
            devices.append(await _spawn(str(BIN / "fanny-tui"), "--headless", "--config",
                                        str(config), "--data-dir", str(tmp_path / name)))
        a, b = JsonLines(devices[0]), JsonLines(devices[1])
        for device in (a, b):
            await device.wait_for("session_started")
            await device.wait_for("broker_connected")
            fix = await device.wait_for("gps_fix")
            assert {"latitude", "longitude", "accuracy_m"} <= set(fix)
            assert fix["accuracy_m"] == 3.0
            match = await device.wait_for("match")
            assert match["role"] in ("initiator", "responder")
            stored = await device.wait_for("token_stored")
            assert stored["expires_at"].endswith("T04:00:00Z")
        token = (await a.wait_for("token_stored"))["token"]
        assert (await b.wait_for("token_stored"))["token"] == token

        listing = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", tmp_path / "a",
                                  "--json"], capture_output=True, text=True, check=True)
        assert [t["token"] for t in json.loads(listing.stdout)["tokens"]] == [token]

        # A stops, then declares positive from the command line (no UI, no session) with the
        # code the test site gave (issued on the broker's database while it runs).
        assert await _stop(devices[0]) == 0
        code = _issue_code(tmp_path / "broker.sqlite3")
        declared = subprocess.run([BIN / "fanny-tui", "declare-positive", "--config", config_a,
                                   "--data-dir", tmp_path / "a", "--timeout", "20",
                                   "--code", code.lower()],
                                  capture_output=True, text=True, timeout=60)
        assert declared.returncode == 0, declared.stderr
        assert "positive declared: 1 token acknowledged" in declared.stdout
        after = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", tmp_path / "a",
                                "--json"], capture_output=True, text=True, check=True)
        assert json.loads(after.stdout) == {"tokens": [], "alerts": []}

        alert = await b.wait_for("exposure_alert", timeout=20)
        assert alert["count"] == 1
        remaining = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", tmp_path / "b",
                                    "--json"], capture_output=True, text=True, check=True)
        assert json.loads(remaining.stdout)["tokens"] == []
        [raised] = json.loads(remaining.stdout)["alerts"]
        assert raised["count"] == 1 and raised["noticed_at"].endswith("Z")

        # The broker goes away: B reports it.
        assert await _stop(broker) == 0
        await b.wait_for("broker_disconnected", timeout=20)
    finally:
        for process in [*devices, broker]:
            if process.returncode is None:
                await _stop(process)
    for process in devices:
        stderr = (await process.stderr.read()).decode()
        assert "Traceback" not in stderr, stderr


def test_declare_positive_with_broker_down_keeps_tokens(tmp_path):
    from datetime import UTC, datetime

    from fanny_tui.store import TokenStore

    store = TokenStore.in_dir(tmp_path / "d")
    store.add("ab" * 32, datetime(2026, 12, 20, 4, tzinfo=UTC))
    store.close()
    port = free_port()
    config = _write_config(tmp_path / "c.toml", port, LAT)
    result = subprocess.run([BIN / "fanny-tui", "declare-positive", "--config", config,
                             "--data-dir", tmp_path / "d", "--timeout", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "1 token is kept" in result.stderr
    assert "Traceback" not in result.stderr
    # While it waits, one line says so; then the reason in plain words and what to do, on one
    # line; no raw exception text.
    waiting, *lines = result.stderr.strip().splitlines()
    assert waiting == ("fanny-tui: uploading 1 token: waiting for the broker at "
                       f"ws://127.0.0.1:{port} (up to 2 s)...")
    assert len(lines) == 1, result.stderr
    assert "the broker did not acknowledge: nothing accepts connections at ws://127.0.0.1:" in (
        lines[0])
    assert "start the broker, or check [broker] url" in lines[0]
    assert "Errno" not in lines[0] and "Error" not in lines[0]
    listing = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", tmp_path / "d",
                              "--json"], capture_output=True, text=True, check=True)
    assert json.loads(listing.stdout)["tokens"] == [{"token": "ab" * 32,
                                           "expires_at": "2026-12-20T04:00:00Z",
                                           "pending_upload": True,
                                           "contact": {"duration_s": 0.0, "closest_m": None,
                                                       "median_m": None, "samples": 0},
                                           "meetings": 1}]


@pytest.mark.parametrize(("content", "key"), [
    ('[gps]\nsource = "glonass"\n', "gps.source"),
    ('[protocol]\nradius_m = -3\n', "protocol.radius_m"),
    ('[webrtc]\nhost_addresses = ["not-an-ip"]\n', "webrtc.host_addresses"),
    ("[broker\n", "file"),
])
def test_bad_config_is_one_clear_line(tmp_path, content, key):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = subprocess.run([BIN / "fanny-tui", "--headless", "--config", path,
                             "--data-dir", tmp_path], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and "bad.toml" in lines[0]


def test_unusable_data_dir_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = _write_config(tmp_path / "c.toml", free_port(), LAT)
    result = subprocess.run([BIN / "fanny-tui", "--headless", "--config", config,
                             "--data-dir", blocker / "sub"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "token store" in result.stderr and "Traceback" not in result.stderr


def test_a_journal_path_in_a_missing_directory_is_refused_at_start(tmp_path):
    (tmp_path / "file").write_text("")
    for journal, problem in (
            (tmp_path / "no" / "dir" / "j.jsonl",
             f"journal.path: the directory {tmp_path}/no/dir does not exist"),
            (tmp_path / "file" / "j.jsonl", f"journal.path: {tmp_path}/file is not a directory"),
            (tmp_path / "c.toml", f"journal.path: {tmp_path}/c.toml is not a journal")):
        config = _write_config(tmp_path / "c.toml", free_port(), LAT)
        config.write_text(config.read_text() + f'\n[journal]\npath = "{journal}"\n')
        result = subprocess.run([BIN / "fanny-tui", "--headless", "--config", config,
                                 "--data-dir", tmp_path / "d"], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.startswith(f"fanny-tui: {problem}"), result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "no").exists()
    assert "fanny-journal" not in config.read_text() and '"kind"' not in config.read_text()


def test_an_unusable_nmea_log_or_ca_file_is_refused_before_anything_is_created(tmp_path):
    """``[gps] source = "nmea"`` with a missing file or a GPX track, or a missing ``[broker]
    ca_file``: the app and ``--headless`` both stop at once with one line naming the config
    file and the key (exit 2), and no data directory (nor its log file) is created."""
    (tmp_path / "walk.gpx").write_text('<?xml version="1.0"?>\n<gpx version="1.1"></gpx>\n')
    config = tmp_path / "c.toml"
    for text, why in (
            ('[gps]\nsource = "nmea"\npath = "missing.log"\n',
             "gps.path: expected an NMEA log file that can be read"),
            ('[gps]\nsource = "nmea"\npath = "walk.gpx"\n',
             "gps.path: expected an NMEA 0183 log (it is a GPX track"),
            ('[broker]\nurl = "wss://127.0.0.1:1"\nca_file = "missing.pem"\n',
             "broker.ca_file: expected a readable PEM file")):
        config.write_text(text)
        for mode in (["--headless"], []):
            result = subprocess.run([BIN / "fanny-tui", *mode, "--config", config,
                                     "--data-dir", tmp_path / "d"], capture_output=True,
                                    text=True, timeout=30, stdin=subprocess.DEVNULL)
            assert result.returncode == 2 and result.stdout == "", (mode, result)
            assert result.stderr.startswith(f"fanny-tui: config error: {config}: {why}"), (
                mode, result.stderr)
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert not (tmp_path / "d").exists(), mode


def test_a_second_device_on_one_journal_file_is_refused_at_start(tmp_path):
    journal = tmp_path / "j.jsonl"
    holder = Journal(journal)   # the first device's journal, held while it runs
    try:
        config = _write_config(tmp_path / "c.toml", free_port(), LAT)
        config.write_text(config.read_text() + f'\n[journal]\npath = "{journal}"\n')
        result = subprocess.run([BIN / "fanny-tui", "--headless", "--config", config,
                                 "--data-dir", tmp_path / "d"], capture_output=True, text=True,
                                timeout=30)
    finally:
        holder.close()
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"fanny-tui: journal.path: {journal}: in use by another "
                                    "running device"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_tokens_on_empty_dir(tmp_path):
    result = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", tmp_path, "--json"],
                            capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == {"tokens": [], "alerts": []}


def test_tokens_from_a_data_dir_that_does_not_exist_is_refused(tmp_path):
    # Trial finding: `tokens --data-dir nope` said "no token store in nope", exit 0, while
    # declare-positive refused the same typo (exit 2).
    typo = tmp_path / "nope"
    for extra in ([], ["--json"]):
        result = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", typo, *extra],
                                capture_output=True, text=True)
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert result.stderr == (f"fanny-tui: no token store in {typo}: no such directory "
                                 "(check --data-dir or [storage] data_dir)\n")
    assert not typo.exists()
    # The default data directory of a device that never ran: nothing to list, not a mistake.
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg-config")}
    fresh = subprocess.run([BIN / "fanny-tui", "tokens"], capture_output=True, text=True,
                           env=env)
    assert fresh.returncode == 0, fresh
    assert fresh.stdout == f"no token store in {tmp_path / 'xdg' / 'fanny-tui'}\n"
    assert not (tmp_path / "xdg").exists()


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path):
    # trial6: `tokens --data-dir device.toml` said "no token store in device.toml" (exit 0)
    # and the run said "... File exists": both now name the mistake, in one line.
    config = tmp_path / "device.toml"
    config.write_text("[gps]\nsource = \"fixed\"\nlatitude = 43.6\nlongitude = 1.44\n")
    listing = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", config],
                             capture_output=True, text=True)
    assert listing.returncode == 2, listing
    assert listing.stdout == ""
    assert listing.stderr == (f"fanny-tui: no token store in {config}: it is a file, not a "
                              "directory (check --data-dir or [storage] data_dir)\n")
    run = subprocess.run([BIN / "fanny-tui", "--headless", "--config", config,
                          "--data-dir", config], capture_output=True, text=True,
                         timeout=30 * TIME_UNIT)
    assert run.returncode == 2, run
    assert run.stderr == (f"fanny-tui: cannot open the token store in {config}: it is a file, "
                          "not a directory (check --data-dir or [storage] data_dir)\n")
    assert config.read_text().startswith("[gps]\n")


def test_declaring_from_a_data_dir_without_a_store_is_refused_and_creates_nothing(tmp_path):
    # trial6: `declare-positive --data-dir typo` made an empty store in a new directory
    # "typo" and said "no tokens to upload: nothing declared", exit 0: a tester who had just
    # tested positive believed there was nothing to declare.
    config = _write_config(tmp_path / "c.toml", free_port(), LAT)
    typo = tmp_path / "typo"
    result = subprocess.run([BIN / "fanny-tui", "declare-positive", "--config", config,
                             "--data-dir", typo, "--code", "AAAA-BBBB-CCCC-DDDD",
                             "--timeout", "1"], capture_output=True, text=True,
                            timeout=30 * TIME_UNIT)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr == (f"fanny-tui: no token store in {typo}: nothing to declare from "
                             "there (check --data-dir or [storage] data_dir)\n")
    assert not typo.exists()
    # A store with no token (the device ran, met nobody) is still "nothing declared", exit 0.
    _stock(tmp_path / "d")
    empty = subprocess.run([BIN / "fanny-tui", "declare-positive", "--config", config,
                            "--data-dir", tmp_path / "d", "--code", "AAAA-BBBB-CCCC-DDDD",
                            "--timeout", "1"], capture_output=True, text=True,
                           timeout=30 * TIME_UNIT)
    assert (empty.returncode, empty.stdout) == (0, "no tokens to upload: nothing declared\n")


def _stock(data_dir: Path, *tokens: str) -> None:
    from datetime import UTC, datetime

    from fanny_tui.protocol.expiry import expiry_for
    from fanny_tui.store import TokenStore

    store = TokenStore.in_dir(data_dir)
    for token in tokens:
        store.add(token, expiry_for(datetime.now(UTC)))
    store.close()


def _tokens_json(data_dir: Path) -> list[dict]:
    listing = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", data_dir, "--json"],
                             capture_output=True, text=True, check=True)
    return json.loads(listing.stdout)["tokens"]


async def test_declare_positive_fails_over_along_the_region_list(tmp_path):
    # [broker] url = [a broker that is down, one that is up]: the declaration reaches the
    # second, and the waiting line says that more than the first URL will be tried.
    port, dead = free_port(), free_port()
    db = tmp_path / "broker.sqlite3"
    _create_board(db)
    broker = await _spawn(str(BIN / "fanny-broker"), "serve", "--host", "127.0.0.1", "--port",
                          str(port), "--db", str(db), "--upload-answer-delay-s", "0.05",
                          "--open-declarations")
    try:
        await _wait_healthy(port)
        config = _write_config(tmp_path / "c.toml", port, LAT)
        text = config.read_text().replace(
            f'url = "ws://127.0.0.1:{port}"',
            f'url = ["ws://127.0.0.1:{dead}", "ws://127.0.0.1:{port}"]')
        config.write_text(text)
        _stock(tmp_path / "d", "ab" * 32)
        result = await asyncio.to_thread(
            subprocess.run, [BIN / "fanny-tui", "declare-positive", "--config", config,
                             "--data-dir", tmp_path / "d", "--timeout", str(20 * TIME_UNIT)],
            capture_output=True, text=True, timeout=60 * TIME_UNIT)
        assert result.returncode == 0, result.stderr
        assert (f"waiting for the broker at ws://127.0.0.1:{dead}, then the next of its 2 URLs "
                "in turn") in result.stderr
        assert "1 token acknowledged" in result.stdout
        assert _tokens_json(tmp_path / "d") == []
    finally:
        assert await _stop(broker) == 0


async def test_declare_positive_codes_refused_and_accepted(tmp_path):
    port = free_port()
    db = tmp_path / "broker.sqlite3"
    _create_board(db)
    broker = await _spawn(str(BIN / "fanny-broker"), "serve", "--host", "127.0.0.1", "--port",
                          str(port), "--db", str(db), "--upload-answer-delay-s", "0.05")
    try:
        await _wait_healthy(port)
        config = _write_config(tmp_path / "c.toml", port, LAT)
        _stock(tmp_path / "d", "ab" * 32, "cd" * 32)

        def declare(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([BIN / "fanny-tui", "declare-positive", "--config", config,
                                   "--data-dir", tmp_path / "d", "--timeout", "20", *extra],
                                  capture_output=True, text=True, timeout=60)

        # No code: the broker requires one; every token stays, not pending.
        result = await asyncio.to_thread(declare)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "code_required" in result.stderr and "2 tokens are kept" in result.stderr
        assert "--code" in result.stderr
        assert [t["pending_upload"] for t in _tokens_json(tmp_path / "d")] == [False, False]
        # A well-formed code the broker never issued.
        result = await asyncio.to_thread(declare, "--code", "K7QF-3M9X-TR2B-8HJD")
        assert result.returncode == 1 and "code_invalid" in result.stderr
        assert len(_tokens_json(tmp_path / "d")) == 2
        # A typo is caught before anything is marked or sent: one line, exit 2.
        result = await asyncio.to_thread(declare, "--code", "K7QF-3M9X-TR2B-8HJ")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "fanny-tui: --code: a declaration code has 16 characters, got 15"]
        # The right code: acknowledged, deleted here.
        code = _issue_code(db)
        result = await asyncio.to_thread(declare, "--code", code)
        assert result.returncode == 0, result.stderr
        assert "2 tokens acknowledged" in result.stdout
        assert _tokens_json(tmp_path / "d") == []
    finally:
        await _stop(broker)


def test_an_unusable_ca_file_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere" / "ca.pem"
    config = _write_config(tmp_path / "c.toml", free_port(), LAT, scheme="wss",
                           extra=f'ca_file = "{missing}"')
    for command in (["--headless"], ["declare-positive", "--timeout", "1"]):
        _stock(tmp_path / "d", "ab" * 32)
        result = subprocess.run([BIN / "fanny-tui", *command, "--config", config,
                                 "--data-dir", tmp_path / "d"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "broker.ca_file" in lines[0] and str(missing) in lines[0]
        assert "No such file" in lines[0]
    # Nothing was marked for upload by the failed declaration.
    assert [t["pending_upload"] for t in _tokens_json(tmp_path / "d")] == [False]


def test_tokens_lists_exposure_alerts_and_the_data_dir_error(tmp_path):
    from datetime import UTC, datetime

    from fanny_tui.store import TokenStore

    store = TokenStore.in_dir(tmp_path / "d")
    store.add("cd" * 32, datetime(2026, 12, 20, 4, tzinfo=UTC))
    store.add("ef" * 32, datetime(2026, 12, 20, 4, tzinfo=UTC))
    assert store.check_positives([["cd" * 32]], 1,
                                 datetime(2026, 12, 6, 9, tzinfo=UTC)).matched == 1
    store.close()
    result = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", tmp_path / "d"],
                            capture_output=True, text=True, check=True)
    assert "ef" * 32 in result.stdout and "cd" * 32 not in result.stdout
    assert "exposure alert 2026-12-06 09:00Z: 1 stored token declared positive" in result.stdout
    listing = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", tmp_path / "d",
                              "--json"], capture_output=True, text=True, check=True)
    assert json.loads(listing.stdout) == {
        "tokens": [{"token": "ef" * 32, "expires_at": "2026-12-20T04:00:00Z",
                    "pending_upload": False,
                    "contact": {"duration_s": 0.0, "closest_m": None, "median_m": None,
                                "samples": 0},
                    "meetings": 1}],
        "alerts": [{"noticed_at": "2026-12-06T09:00:00Z", "count": 1}]}


def test_tokens_show_the_contact_measures(tmp_path):
    from datetime import UTC, datetime

    from fanny_tui.protocol.contact import ContactMeasures
    from fanny_tui.store import TokenStore

    store = TokenStore.in_dir(tmp_path / "d")
    expiry = datetime(2026, 12, 20, 4, tzinfo=UTC)
    store.add("ab" * 32, expiry, ContactMeasures(62.0, 1.4, 2.1, 13))
    store.add("ab" * 32, expiry, ContactMeasures(30.0, 2.0, 2.5, 6))  # met again
    store.close()
    [token] = _tokens_json(tmp_path / "d")
    assert token["contact"] == {"duration_s": 92.0, "closest_m": 1.4, "median_m": 2.5,
                                "samples": 19}
    assert token["meetings"] == 2
    text = subprocess.run([BIN / "fanny-tui", "tokens", "--data-dir", tmp_path / "d"],
                          capture_output=True, text=True, check=True).stdout
    assert ("contact: 92 s within the radius, closest 1.4 m, median 2.5 m, 19 samples, "
            "2 meetings") in text


def test_tui_with_an_unusable_data_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = _write_config(tmp_path / "c.toml", free_port(), LAT)
    result = subprocess.run([BIN / "fanny-tui", "--config", config, "--data-dir",
                             blocker / "sub"], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"fanny-tui: cannot use the data directory {blocker / 'sub'}: Not a directory"]


def test_version_comes_from_the_package_metadata():
    result = subprocess.run([BIN / "fanny-tui", "--version"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"fanny-tui {version('fanny-field-kit')}\n"
    assert re.fullmatch(r"fanny-tui \d+\.\d+\.\d+\S*\n", result.stdout)


def test_headless_piped_into_head_stops_quietly_at_the_first_broken_pipe(tmp_path):
    """``fanny-tui --headless | head -n 2``: two events, then exit 141 at once, no traceback."""
    config = _write_config(tmp_path / "c.toml", free_port(), LAT)
    stderr_file, status_file = tmp_path / "stderr.txt", tmp_path / "status.txt"
    command = (f"{shlex.quote(str(BIN / 'fanny-tui'))} --headless --config "
               f"{shlex.quote(str(config))} --data-dir {shlex.quote(str(tmp_path / 'd'))} "
               f"2>{shlex.quote(str(stderr_file))} | head -n 2; "
               f"echo ${{PIPESTATUS[0]}} >{shlex.quote(str(status_file))}")
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            timeout=60 * TIME_UNIT)
    elapsed = time.monotonic() - started
    events = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert len(events) == 2 and events[0] == "session_started", result.stdout
    assert status_file.read_text().strip() == "141"
    stderr = stderr_file.read_text()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert elapsed < 10 * TIME_UNIT, f"took {elapsed:.1f} s to notice the closed pipe"
    # The engine stopped cleanly: the data directory is free again at once.
    again = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                           timeout=60 * TIME_UNIT)
    assert len(again.stdout.splitlines()) == 2
    assert status_file.read_text().strip() == "141", stderr_file.read_text()


def _first_line(process: subprocess.Popen[str]) -> dict:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, "the process ended without an event"
    return json.loads(line)


def test_no_config_file_is_said_once_with_the_path_looked_for(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    default = tmp_path / "xdg" / "fanny-tui" / "config.toml"

    def run_headless() -> str:
        process = subprocess.Popen([BIN / "fanny-tui", "--headless", "--data-dir",
                                    tmp_path / "d"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert _first_line(process)["event"] == "session_started"
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30 * TIME_UNIT)
        assert process.returncode == 0, stderr
        return stderr

    stderr = run_headless()
    notices = [line for line in stderr.splitlines() if "no config file" in line]
    assert notices == [f"fanny-tui: no config file at {default}: running on the defaults "
                       "(broker ws://127.0.0.1:8765); write one there or pass --config FILE "
                       "(see config.example.toml)"], stderr
    # With a config file at the default path: read, and nothing said.
    default.parent.mkdir(parents=True)
    _write_config(default, free_port(), LAT)
    assert "no config file" not in run_headless()


def test_one_data_dir_for_one_process_at_a_time(tmp_path):
    config = _write_config(tmp_path / "c.toml", free_port(), LAT)
    data_dir = tmp_path / "d"
    _stock(data_dir, "ab" * 32)
    first = subprocess.Popen([BIN / "fanny-tui", "--headless", "--config", config,
                              "--data-dir", data_dir], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert _first_line(first)["event"] == "session_started"
        busy = (f"fanny-tui: the data directory {data_dir} is in use by pid {first.pid}: "
                f"fanny-tui --headless --config {config} --data-dir {data_dir}: stop that "
                "process first, or use another --data-dir")
        second = subprocess.run([BIN / "fanny-tui", "--headless", "--config", config,
                                 "--data-dir", data_dir], capture_output=True, text=True,
                                timeout=30 * TIME_UNIT)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [busy]
        assert second.stdout == ""
        declared = subprocess.run([BIN / "fanny-tui", "declare-positive", "--config", config,
                                   "--data-dir", data_dir, "--timeout", "1"],
                                  capture_output=True, text=True, timeout=30 * TIME_UNIT)
        assert declared.returncode == 1
        assert declared.stderr.strip().splitlines() == [busy]
        # Reading needs no lock; the refused declaration marked nothing.
        assert [t["pending_upload"] for t in _tokens_json(data_dir)] == [False]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30 * TIME_UNIT)
    assert first.returncode == 0
    # The engine let the lock go when it stopped.
    declared = subprocess.run([BIN / "fanny-tui", "declare-positive", "--config", config,
                               "--data-dir", data_dir, "--timeout", "1"],
                              capture_output=True, text=True, timeout=30 * TIME_UNIT)
    assert "in use by" not in declared.stderr and "1 token is kept" in declared.stderr


async def test_declare_positive_to_a_broker_with_an_untrusted_certificate(tmp_path):
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    for i, blob in enumerate(issued.cert_chain_pems):
        blob.write_to_path(str(cert), append=i > 0)
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "board.sqlite3",
                              certfile=cert, keyfile=key, open_declarations=True)
    _stock(tmp_path / "d", "ab" * 32)
    async with start_broker(settings) as broker:
        config = _write_config(tmp_path / "c.toml", broker.port, LAT, scheme="wss")
        result = await asyncio.to_thread(
            subprocess.run, [BIN / "fanny-tui", "declare-positive", "--config", config,
                             "--data-dir", tmp_path / "d", "--timeout", str(2 * TIME_UNIT)],
            capture_output=True, text=True, timeout=60 * TIME_UNIT)
    assert result.returncode == 1
    waiting, *lines = result.stderr.strip().splitlines()
    assert waiting.startswith("fanny-tui: uploading 1 token: waiting for the broker at wss://")
    assert len(lines) == 1, result.stderr
    assert ("the broker's TLS certificate is not signed by a CA this device trusts: set "
            "[broker] ca_file to the deployment's CA certificate (PEM)") in lines[0]
    assert "SSL" not in lines[0] and "Error" not in lines[0]
    assert "1 token is kept on this device" in lines[0]


async def test_the_app_says_once_that_no_config_file_was_read(tmp_path):
    from fanny_tui.cli import tui_app
    from fanny_tui.config import load_config

    config = load_config(_write_config(tmp_path / "c.toml", free_port(), LAT))
    notice = "no config file at /nowhere/config.toml: running on the defaults"
    app = tui_app(config, tmp_path / "d", notice=notice)
    async with app.run_test(size=(120, 40)) as pilot:
        deadline = time.monotonic() + 10 * TIME_UNIT
        while not app._notifications and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.pause(0.5 * TIME_UNIT)                 # more events: still one notice
        shown = [(n.title, n.message, n.severity) for n in app._notifications]
        assert shown == [("No config file", notice, "warning")]
        await pilot.press("q")


def test_a_long_token_list_piped_into_head_exits_quietly(tmp_path):
    _stock(tmp_path / "d", *(f"{i:064x}" for i in range(3000)))     # far over a pipe's buffer
    status = tmp_path / "status.txt"
    command = (f"{shlex.quote(str(BIN / 'fanny-tui'))} tokens --json --data-dir "
               f"{shlex.quote(str(tmp_path / 'd'))} | head -n 1; "
               f"echo ${{PIPESTATUS[0]}} >{shlex.quote(str(status))}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            timeout=60 * TIME_UNIT)
    assert result.stdout == "{\n"
    assert status.read_text().strip() == "141"
    assert result.stderr == ""


async def test_the_app_on_a_data_dir_in_use_says_so_and_exits_1(tmp_path):
    from fanny_tui.cli import tui_app
    from fanny_tui.config import load_config
    from fanny_tui.datadir import DataDirLock, holder_line

    config = load_config(_write_config(tmp_path / "c.toml", free_port(), LAT))
    with DataDirLock(tmp_path / "d"):                  # as another process would hold it
        app = tui_app(config, tmp_path / "d")
        async with app.run_test(size=(120, 40)) as pilot:
            deadline = time.monotonic() + 10 * TIME_UNIT
            while app.return_code is None and time.monotonic() < deadline:
                await pilot.pause(0.05)
    assert app.return_code == 1
    assert app.error == (f"cannot start: the data directory {tmp_path / 'd'} is in use by "
                         f"{holder_line()}: stop that process first, or use another --data-dir")


async def test_declare_positive_to_a_poll_only_broker_picked_by_name(tmp_path):
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "health.sqlite3",
                              open_declarations=True, upload_answer_delay_s=0.0)
    _stock(tmp_path / "d", "ab" * 32)
    async with start_broker(settings) as health:
        config = _write_config(tmp_path / "c.toml", free_port(), LAT)   # [broker] is down
        with config.open("a") as out:
            out.write(f'\n[[positives]]\nname = "health"\nurl = "{health.url}"\n')

        def declare(*more: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([BIN / "fanny-tui", "declare-positive", "--config", config,
                                   "--data-dir", tmp_path / "d", "--timeout",
                                   str(5 * TIME_UNIT), *more],
                                  capture_output=True, text=True, timeout=60 * TIME_UNIT)

        wrong = await asyncio.to_thread(declare, "--broker", "elsewhere")
        assert wrong.returncode == 2
        assert wrong.stderr.strip().splitlines() == [
            "fanny-tui: --broker: no broker named 'elsewhere' in the config (one of: main, "
            "health)"]
        assert [t["pending_upload"] for t in _tokens_json(tmp_path / "d")] == [False]
        done = await asyncio.to_thread(declare, "--broker", "health")
        assert done.returncode == 0, done.stderr
        assert done.stderr.startswith("fanny-tui: uploading 1 token: waiting for the broker "
                                      f"health at {health.url} ")
        board, _, _ = health.board.since(0, 10, datetime.now(UTC))
        assert [t.token for t in board] == ["ab" * 32]
    assert _tokens_json(tmp_path / "d") == []


@pytest.mark.parametrize(("argv", "refused"), [
    (["declare-positive", "--timeout", "-5"],
     "argument --timeout: expected a number > 0, got '-5'"),
    (["declare-positive", "--timeout", "nan"], "argument --timeout: expected a finite number > 0"),
    (["demo", "--duration", "-1"], "argument --duration: expected a number > 0, got '-1'"),
    (["demo", "--duration", "inf"], "argument --duration: expected a finite number > 0"),
    (["demo", "--devices", "0"], "argument --devices: expected an integer in [1, 63] (the demo "
     "broker takes 128 connections from one address, up to two per device), got '0'"),
    (["demo", "--devices", "64"], "argument --devices: expected an integer in [1, 63]"),
    (["demo", "--devices", "500"], "argument --devices: expected an integer in [1, 63]"),
    (["demo", "--devices", "many"], "argument --devices: expected an integer in [1, 63]"),
    (["declare-positive", "--timeout", "3x"],
     "argument --timeout: expected seconds > 0, as a number or with its unit (3s, 2m), got "
     "'3x'"),
    (["declare-positive", "--timeout", "0s"], "argument --timeout: expected a duration > 0s"),
])
def test_nonsense_durations_and_counts_are_refused_by_name(argv, refused, capsys):
    # A negative --timeout used to give up at once (the tokens stayed pending); a negative
    # --duration ran the demo and reported "no alert" (exit 1).
    from fanny_tui.cli import _parser

    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(argv)
    assert exited.value.code == 2
    assert refused in capsys.readouterr().err
    assert _parser().parse_args([argv[0], argv[1], "2"]) is not None


@pytest.mark.parametrize(("given", "seconds"), [("20", 20.0), ("2.5", 2.5), ("3s", 3.0),
                                                ("2m", 120.0), ("1.5m", 90.0)])
def test_a_wait_takes_seconds_or_a_unit_as_the_brokers_ttl_does(given, seconds):
    # Trial finding: "--timeout 3s" was refused while fanny-broker's --ttl requires the unit.
    from fanny_tui.cli import _parser

    assert _parser().parse_args(["declare-positive", "--timeout", given]).timeout == seconds
    assert _parser().parse_args(["demo", "--duration", given]).duration == seconds


@pytest.mark.parametrize("how", ["hangup", "sigterm"])
def test_the_app_stops_cleanly_when_its_terminal_closes_or_on_sigterm(tmp_path, how):
    """The app in a real terminal (a pty, 80x24): the terminal closed while Down keys come and
    nobody reads the screen (the demo's trial hang, fanny_tui.ui.driver), or SIGTERM (before:
    killed at once by the default action, the engine never stopped). It exits 128 + N within
    seconds, the data directory's lock released, the stored token still there."""
    from fanny_tui.datadir import DataDirLock

    from .terminal import DOWN, NEVER, hang_up_after_keys, in_terminal, read_screen, wait_exit

    data_dir = tmp_path / "d"
    _stock(data_dir, "a" * 64)
    config = _write_config(tmp_path / "c.toml", free_port(), LAT)   # no broker: it retries
    argv = [str(BIN / "fanny-tui"), "--config", str(config), "--data-dir", str(data_dir)]
    with in_terminal(argv, os.environ) as app:
        screen = read_screen(app.fd, b"FANNY field kit", 30 * TIME_UNIT)
        assert b"FANNY field kit" in screen, screen[-2000:]
        read_screen(app.fd, NEVER, 1.0 * TIME_UNIT)         # the engine runs, retries
        if how == "hangup":
            started = hang_up_after_keys(app.fd, b"?", DOWN * 10, 1.5 * TIME_UNIT)
            app.closed = True
            signum = signal.SIGHUP
        else:
            started = time.monotonic()
            os.kill(app.pid, signal.SIGTERM)
            signum = signal.SIGTERM
        app.status = status = wait_exit(app.pid, 30 * TIME_UNIT)
        elapsed = time.monotonic() - started
        assert status is not None, "the app still runs"
    assert os.waitstatus_to_exitcode(status) == 128 + signum
    assert elapsed < 3 * TIME_UNIT, f"stopping took {elapsed:.1f} s"
    with DataDirLock(data_dir):                            # released
        pass
    assert [t["token"] for t in _tokens_json(data_dir)] == ["a" * 64]
