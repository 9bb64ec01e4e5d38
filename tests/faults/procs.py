"""Real processes for the fault scenarios: a broker, headless devices, signals, their output.

* :class:`BrokerProcess`: a ``fanny-broker serve`` subprocess on a fixed loopback port (so it
  can be restarted on the same port and database after being killed).
* :class:`HeadlessDevice`: a ``fanny-tui --headless`` subprocess whose JSON events are read in
  the background (a stopped or killed device never blocks the reader).
* :class:`Processes`: an async context manager that leaves nothing running: on exit, every
  process still alive is continued (``SIGCONT``) and killed.
* Read-only views: ``/healthz`` counts, the board's tokens and upload IDs (SQLite opened
  read-only), ``fanny-tui tokens --json``.

Everything binds and connects to 127.0.0.1 only. Logs of each process go to a file in the
scenario's work directory (stderr is never left in a pipe that could fill up and block it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from broker.__main__ import create_board
from tests.helpers import LAT, LON

__all__ = [
    "BIN",
    "CHILD_ENV",
    "UPLOAD_ANSWER_DELAY_S",
    "BrokerProcess",
    "HeadlessDevice",
    "Processes",
    "board_tokens",
    "board_upload_ids",
    "event_time",
    "healthz",
    "tokens_json",
    "wait_healthz",
    "write_device_config",
]

BIN = Path(sys.executable).parent
"""The virtualenv's ``bin`` (``fanny-broker``, ``fanny-tui``)."""

UPLOAD_ANSWER_DELAY_S = 0.05
"""The broker's minimum delay before answering an upload, in these runs (when it has one)."""

CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
"""Environment of the processes started here (unbuffered, so events arrive as they happen)."""


def event_time(event: dict[str, Any]) -> float:
    """The ``at`` of a headless JSON event, as Unix seconds (same clock as ``time.time()``)."""
    return datetime.fromisoformat(event["at"]).timestamp()


# -- the broker ---------------------------------------------------------------------------


class BrokerProcess:
    """One ``fanny-broker serve`` process on ``127.0.0.1:port`` with the board ``db``.

    Uploads are accepted without declaration codes (``--open-declarations``: these scenarios
    are about faults, not authorization) and answered after :data:`UPLOAD_ANSWER_DELAY_S`.

    Args:
        port: the TCP port (fixed, so that a restart uses the same one).
        db: the SQLite board file.
        log_path: where its stderr goes.
        cooldown_s, position_timeout_s: ``--cooldown-s`` / ``--position-timeout-s`` (seconds).
    """

    def __init__(self, port: int, db: Path, log_path: Path, *, cooldown_s: float | None = None,
                 position_timeout_s: float | None = None) -> None:
        self.port = port
        self.db = db
        self.log_path = log_path
        self.url = f"ws://127.0.0.1:{port}"
        self.command = [str(BIN / "fanny-broker"), "serve", "--host", "127.0.0.1", "--port",
                        str(port), "--db", str(db), "--log-level", "WARNING",
                        "--open-declarations",
                        "--upload-answer-delay-s", str(UPLOAD_ANSWER_DELAY_S)]
        if cooldown_s is not None:
            self.command += ["--cooldown-s", str(cooldown_s)]
        if position_timeout_s is not None:
            self.command += ["--position-timeout-s", str(position_timeout_s)]
        self.process: asyncio.subprocess.Process | None = None
        self.listening_at: float | None = None
        self._drain: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 30.0) -> float:
        """Start it; return the wall-clock time (Unix seconds) it said ``listening on``.

        Raises:
            AssertionError: it exited or did not listen within ``timeout_s`` (with its log).
        """
        create_board(self.db, if_missing=True)   # the first start; a restart keeps the board
        with open(self.log_path, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, stdout=asyncio.subprocess.PIPE, stderr=log, env=CHILD_ENV)
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = await self.process.stdout.readline()
                    if not line:
                        raise AssertionError(f"the broker exited before listening: {self.log()}")
                    if line.startswith(b"listening on "):
                        break
        except TimeoutError:
            raise AssertionError(f"the broker did not listen in {timeout_s} s: "
                                 f"{self.log()}") from None
        self.listening_at = time.time()
        self._drain = asyncio.create_task(self._drain_stdout())
        return self.listening_at

    async def _drain_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while await self.process.stdout.readline():
            pass

    async def signal(self, signum: int, timeout_s: float = 20.0) -> int:
        """Send ``signum`` and wait for the process to end; return its exit status."""
        assert self.process is not None
        self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), timeout_s)

    def log(self) -> str:
        """Its stderr so far (the last 4000 characters)."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


# -- headless devices ---------------------------------------------------------------------


def write_device_config(path: Path, *, port: int, latitude: float = LAT, longitude: float = LON,
                        handshake_timeout_s: float = 5.0, poll_interval_s: float = 1.0,
                        position_interval_s: float = 0.3, reconnect_min_s: float = 0.2,
                        reconnect_max_s: float = 1.0, radius_m: float = 10.0) -> Path:
    """A device configuration on a fixed position (WGS84 degrees) talking to the loopback broker.

    Only 127.0.0.1 is offered as ICE host address. Durations in seconds.
    """
    path.write_text(f"""
[broker]
url = "ws://127.0.0.1:{port}"
reconnect_min_s = {reconnect_min_s}
reconnect_max_s = {reconnect_max_s}

[gps]
source = "fixed"
latitude = {latitude}
longitude = {longitude}
accuracy_m = 3.0

[protocol]
radius_m = {radius_m}
position_interval_s = {position_interval_s}
poll_interval_s = {poll_interval_s}
handshake_timeout_s = {handshake_timeout_s}

[webrtc]
host_addresses = ["127.0.0.1"]
""", encoding="utf-8")
    return path


class HeadlessDevice:
    """A ``fanny-tui --headless`` process; its JSON events are collected as they come.

    Args:
        name: for messages.
        config: its configuration file.
        data_dir: its token store directory.
        log_path: where its stderr goes.
    """

    def __init__(self, name: str, config: Path, data_dir: Path, log_path: Path) -> None:
        self.name = name
        self.config = config
        self.data_dir = data_dir
        self.log_path = log_path
        self.events: list[dict[str, Any]] = []
        self.process: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Event()
        self._ended = False
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> HeadlessDevice:
        """Start the process and the background reader of its events."""
        with open(self.log_path, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(BIN / "fanny-tui"), "--headless", "--config", str(self.config),
                "--data-dir", str(self.data_dir), stdout=asyncio.subprocess.PIPE, stderr=log,
                env=CHILD_ENV)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        try:
            while line := await self.process.stdout.readline():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and "event" in event:
                    self.events.append(event)
                    self._changed.set()
        finally:
            self._ended = True
            self._changed.set()

    def names(self, after: int = 0) -> list[str]:
        """The names of its events from index ``after`` on."""
        return [e["event"] for e in self.events[after:]]

    async def wait_for(self, name: str, *, after: int = 0, timeout_s: float = 30.0,
                       where: Callable[[dict[str, Any]], bool] = lambda e: True
                       ) -> tuple[int, dict[str, Any]]:
        """The first event ``name`` at index >= ``after`` satisfying ``where``.

        Returns:
            ``(index, event)``.

        Raises:
            AssertionError: none within ``timeout_s`` seconds, or the process ended first.
        """
        async def scan() -> tuple[int, dict[str, Any]]:
            index = after
            while True:
                while index < len(self.events):
                    event = self.events[index]
                    if event["event"] == name and where(event):
                        return index, event
                    index += 1
                if self._ended:
                    raise AssertionError(f"{self.name} ended before {name}; saw "
                                         f"{self.names(after)}; log: {self.log()}")
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(scan(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {name} within {timeout_s} s after event "
                                 f"#{after}; saw {self.names(after)}") from None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process."""
        assert self.process is not None
        self.process.send_signal(signum)

    async def kill(self) -> int:
        """SIGKILL; return once it is gone (its exit status)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        return await asyncio.wait_for(self.process.wait(), 20)

    async def output_ended(self, timeout_s: float = 10.0) -> None:
        """Wait until every event it printed has been read (its stdout is closed)."""
        if self._reader is not None:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout_s)

    async def stop(self) -> int:
        """SIGCONT then SIGTERM (a graceful stop); return its exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 20)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)
        return code

    def log(self) -> str:
        """Its stderr so far (the last 4000 characters)."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


_P = TypeVar("_P", BrokerProcess, HeadlessDevice)


class Processes:
    """Tracks processes; on exit, every one still running is continued and killed."""

    def __init__(self) -> None:
        self._items: list[BrokerProcess | HeadlessDevice] = []

    def add(self, item: _P) -> _P:
        """Track ``item`` (a :class:`BrokerProcess` or :class:`HeadlessDevice`); return it."""
        self._items.append(item)
        return item

    def device(self, workdir: Path, name: str, *, port: int, latitude: float = LAT,
               **config: float) -> HeadlessDevice:
        """A tracked, not yet started :class:`HeadlessDevice` ``name`` at ``latitude`` (WGS84
        degrees) talking to the broker on ``port``: its configuration ``workdir/NAME.toml``
        (:func:`write_device_config`, with ``config``'s other keys), its store
        ``workdir/NAME``, its log ``workdir/NAME.log``."""
        path = write_device_config(workdir / f"{name}.toml", port=port, latitude=latitude,
                                   **config)
        return self.add(HeadlessDevice(name, path, workdir / name, workdir / f"{name}.log"))

    async def __aenter__(self) -> Processes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for item in reversed(self._items):
            process = item.process
            if process is None:
                continue
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 20)


# -- read-only views ----------------------------------------------------------------------


def _healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return json.loads(response.read())


async def healthz(port: int) -> dict[str, Any]:
    """The broker's ``/healthz`` body (counts only: connections, sessions, positions...)."""
    return await asyncio.to_thread(_healthz, port)


async def wait_healthz(port: int, where: Callable[[dict[str, Any]], bool],
                       timeout_s: float = 30.0) -> dict[str, Any]:
    """Poll ``/healthz`` every 0.1 s until ``where(body)``; return the body.

    Raises:
        AssertionError: not within ``timeout_s`` (with the last body seen).
    """
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] | str = "no answer"
    while time.monotonic() < deadline:
        try:
            last = await healthz(port)
            if where(last):
                return last
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.1)
    raise AssertionError(f"/healthz never satisfied the condition in {timeout_s} s; "
                         f"last: {last}")


def _read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)


def board_tokens(db: Path) -> set[str]:
    """Every token on the broker's board, read from its SQLite file opened read-only."""
    with contextlib.closing(_read_only(db)) as conn:
        return {row[0] for row in conn.execute("SELECT token FROM positives")}


def board_upload_ids(db: Path) -> set[str]:
    """Every upload ID the board has committed (read-only)."""
    with contextlib.closing(_read_only(db)) as conn:
        return {row[0] for row in conn.execute("SELECT upload_id FROM uploads")}


async def tokens_json(data_dir: Path) -> list[dict[str, Any]]:
    """The tokens of ``fanny-tui tokens --data-dir DIR --json``, parsed.

    Raises:
        AssertionError: the command failed (its stderr in the message).
    """
    process = await asyncio.create_subprocess_exec(
        str(BIN / "fanny-tui"), "tokens", "--data-dir", str(data_dir), "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=CHILD_ENV)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"fanny-tui tokens failed: {err.decode(errors='replace')}"
    return json.loads(out)["tokens"]
