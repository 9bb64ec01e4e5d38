"""Run a real gpsd through gpsfake on a loopback port, for tests (Debian ``gpsd-clients``).

Usage::

    from tests.gpsfake import gpsfake

    with gpsfake(Path("tests/data/nmea/bu353s4.log")) as port:
        source = GpsdSource("127.0.0.1", port)
        ...

:func:`gpsfake` starts ``gpsfake -q -c CYCLE -P PORT LOG`` (the log is replayed in a loop) on a
free loopback port, in its own process group, waits until gpsd answers on it, yields the
port, and on exit stops gpsfake and its gpsd and checks that no process of the group is left.
:class:`GpsFake` is the same thing with more control: a fixed port (restart on the same port),
``stop()`` in the middle of a test, and a *stepped* mode where gpsfake sends one log sentence
per :meth:`GpsFake.feed` call (gpsfake ``-i``), for tests that must see the log from its start.

gpsd only listens on loopback here (gpsfake does not pass ``-G``). Its control socket goes to a
private temporary directory, and the SysV shared-memory segment gpsd creates (key derived from
the port, ``GPSD_SHM_KEY=0x4770PPPP``) is removed on stop. Nothing here needs root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.helpers import free_port

GPSFAKE = shutil.which("gpsfake") or "/usr/bin/gpsfake"


def _gpsd_answers(port: int) -> bool:
    """True if what listens on 127.0.0.1:``port`` greets like gpsd (a VERSION object)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
            conn.settimeout(2.0)
            greeting = b""
            while b"\n" not in greeting:
                chunk = conn.recv(4096)
                if not chunk:
                    return False
                greeting += chunk
    except OSError:
        return False
    return b'"class":"VERSION"' in greeting


def gpsfake_sentence_count(log_path: Path) -> int:
    """How many sentences gpsfake feeds per pass of ``log_path`` (what one ``feed`` step is).

    Asked from gpsfake's own loader (``gps.fake.TestLoad``, run by gpsfake's interpreter), since
    it keeps some comment lines (``# Date:``) as sentences and drops others.
    """
    with open(GPSFAKE, encoding="utf-8") as script:
        interpreter = script.readline().removeprefix("#!").strip().split()[0]
    code = ("import sys\nfrom gps.fake import TestLoad\n"
            "print(len(TestLoad(sys.argv[1]).sentences))")
    out = subprocess.run([interpreter, "-c", code, str(log_path)], check=True,
                         capture_output=True, text=True, timeout=30)
    return int(out.stdout.strip())


class GpsFake:
    """One gpsfake + gpsd replaying ``log_path`` on ``127.0.0.1:port``.

    Args:
        log_path: the NMEA log.
        port: TCP port for gpsd; a free one by default.
        cycle: seconds between sentences (free-running mode).
        stepped: feed one sentence per :meth:`feed` step instead of free-running.
        start_timeout_s: how long gpsd may take to accept connections.
    """

    def __init__(self, log_path: Path, *, port: int | None = None, cycle: float = 0.05,
                 stepped: bool = False, start_timeout_s: float = 20.0) -> None:
        if not Path(log_path).is_file():
            raise FileNotFoundError(f"gpsfake log not found: {log_path}")
        self.log_path = Path(log_path)
        self.port = port if port is not None else free_port()
        self.cycle = cycle
        self.stepped = stepped
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> GpsFake:
        """Start gpsfake; return once gpsd answers on the port (its VERSION greeting).

        Raises:
            RuntimeError: gpsfake exited, or no gpsd answered on the port in time (with
                gpsfake's stderr).
        """
        if self.process is not None:
            raise RuntimeError("gpsfake already running")
        self._tmp = tempfile.TemporaryDirectory(prefix="fanny-gpsfake-")
        cmd = [GPSFAKE, "-q", "-c", str(0.0 if self.stepped else self.cycle),
               "-P", str(self.port)]
        if self.stepped:
            cmd.append("-i")
        cmd.append(str(self.log_path))
        env = dict(os.environ, TMPDIR=self._tmp.name)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin"
        stderr = open(Path(self._tmp.name) / "stderr.txt", "wb")  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.PIPE if self.stepped else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
        finally:
            stderr.close()
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                text = self._stderr()
                self.stop()
                raise RuntimeError(f"gpsfake exited early: {text}")
            if _gpsd_answers(self.port):
                return self
            if time.monotonic() > deadline:
                text = self._stderr()
                self.stop()
                raise RuntimeError(f"gpsd did not answer on port {self.port}: {text}")
            time.sleep(0.05)

    def feed(self, sentences: int = 1) -> None:
        """Stepped mode: let gpsfake send the next ``sentences`` sentences of the log."""
        if not self.stepped or self.process is None or self.process.stdin is None:
            raise RuntimeError("feed() needs a running stepped GpsFake")
        self.process.stdin.write(b"\n" * sentences)
        self.process.stdin.flush()

    def stop(self) -> None:
        """Stop gpsfake and its gpsd; return once no process of their group is left.

        Raises:
            RuntimeError: a process of the group is still there after SIGKILL.
        """
        process, self.process = self.process, None
        if process is not None:
            pgid = process.pid
            # gpsfake's SIGTERM handler stops its gpsd and reaps it. gpsfake itself may stay
            # blocked (stepped mode waits on stdin, a pty write may wait to drain), so once its
            # gpsd is gone it is simply killed.
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            _wait_until(lambda: process.poll() is not None
                        or _group_members(pgid, besides=process.pid) == [], 5.0)
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            if _group_members(pgid):  # an orphaned gpsd: kill it, init reaps it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                if not _wait_until(lambda: _group_members(pgid) == [], 15.0):
                    raise RuntimeError(f"process group {pgid} (gpsfake/gpsd) did not go away: "
                                       f"{_group_members(pgid)}")
        self._remove_shm()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _remove_shm(self) -> None:
        ipcrm = shutil.which("ipcrm")
        if ipcrm is not None:
            subprocess.run([ipcrm, "-M", f"0x4770{self.port:04X}"], capture_output=True,
                           check=False, timeout=10)

    def stderr(self) -> str:
        """The end of gpsfake's (and gpsd's) stderr so far, for failure messages."""
        return self._stderr()

    def _stderr(self) -> str:
        if self._tmp is None:
            return ""
        path = Path(self._tmp.name) / "stderr.txt"
        try:
            return path.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> GpsFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def gpsfake(log_path: Path, *, cycle: float = 0.05, port: int | None = None) -> Iterator[int]:
    """Replay ``log_path`` through gpsfake + gpsd on a free loopback port; yield the port.

    The log is replayed in a loop, one sentence every ``cycle`` seconds. On exit gpsfake and
    gpsd are stopped and none of their processes is left.
    """
    with GpsFake(log_path, port=port, cycle=cycle) as fake:
        yield fake.port


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _group_members(pgid: int, *, besides: int | None = None) -> list[str]:
    """``pid name state`` of the processes in process group ``pgid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(besides):
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition("(")[2].rpartition(")")
        fields = rest.split()
        if len(fields) > 2 and fields[2] == str(pgid):
            found.append(f"{entry.name} {name} {fields[0]}")
    return found


def gpsd_running_on(port: int) -> list[str]:
    """Command lines of gpsd processes serving ``port`` (for "nothing left behind" checks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if words and Path(words[0]).name == "gpsd" and str(port) in words:
            found.append(" ".join(words))
    return found
