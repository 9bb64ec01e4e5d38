"""Run a real TURN server (coturn, Debian ``coturn``) on a loopback port, for tests.

Usage::

    from tests.turn import TurnServer

    with TurnServer() as turn:
        webrtc = WebRtcConfig(ice_servers=(turn.ice_server(),), ice_transport_policy="relay")
        ...

:class:`TurnServer` starts ``turnserver`` with the command line measured in STACK-NOTES (listening
and relaying on 127.0.0.1 only, long-term credentials ``test:secret`` in realm ``fieldtest``,
loopback peers allowed, no TLS, no DTLS, no CLI, UDP only) on a free loopback port, in its own
process group, and returns once it answers a STUN Binding request (RFC 8489) on that port.

Nothing is read from or written to the system's coturn: ``-n`` ignores ``/etc/turnserver.conf``,
and the log (``--log-file stdout``, redirected), the pid file and the SQLite user database go to
a private temporary directory removed on :meth:`TurnServer.stop`. A system coturn service that
Debian's package may have started (on port 3478) is neither used nor touched: the port here is
a free one picked by the OS. :meth:`TurnServer.stop` kills the process group and checks that no
process of it is left.
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
from pathlib import Path
from types import TracebackType

from fanny_tui.config import IceServer
from tests.helpers import free_port

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
USER = "test"
PASSWORD = "secret"
REALM = "fieldtest"

_STUN_MAGIC = 0x2112A442


def stun_binding_answered(port: int, timeout_s: float = 0.2) -> bool:
    """True if a STUN Binding request to 127.0.0.1:``port`` gets a matching answer (RFC 8489)."""
    transaction = os.urandom(12)
    request = (0x0001).to_bytes(2, "big") + (0).to_bytes(2, "big") \
        + _STUN_MAGIC.to_bytes(4, "big") + transaction
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.sendto(request, ("127.0.0.1", port))
            data = sock.recv(2048)
        except OSError:  # timeout, or ICMP port unreachable reported as ECONNREFUSED
            return False
    return len(data) >= 20 and data[8:20] == transaction


class TurnServer:
    """One coturn ``turnserver`` on ``127.0.0.1:port`` (UDP), relaying on 127.0.0.1.

    Args:
        start_timeout_s: seconds the server may take to answer STUN after its start.
    """

    def __init__(self, *, start_timeout_s: float = 15.0) -> None:
        if not Path(TURNSERVER).exists():
            raise FileNotFoundError(
                "turnserver not found: install the Debian package coturn (./kit test does)")
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """The ``turn:`` URL of this server (RFC 7065), UDP."""
        return f"turn:127.0.0.1:{self.port}"

    def ice_server(self, *, password: str = PASSWORD) -> IceServer:
        """An ``[webrtc] ice_servers`` entry for this server, with ``password`` as credential."""
        return IceServer(urls=(self.url,), username=USER, credential=password)

    def log_text(self) -> str:
        """What the server has logged so far (empty once stopped)."""
        if self._tmp is None:
            return ""
        path = Path(self._tmp.name) / "turnserver.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> TurnServer:
        """Start turnserver; return once it answers STUN on its port.

        Raises:
            RuntimeError: turnserver exited or did not answer in time (with its log's tail).
        """
        if self.process is not None:
            raise RuntimeError("turnserver already running")
        self._tmp = tempfile.TemporaryDirectory(prefix="fanny-turn-")
        tmp = Path(self._tmp.name)
        self.port = free_port(udp=True)
        cmd = [
            TURNSERVER, "-n",
            "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
            f"--listening-port={self.port}",
            "--lt-cred-mech", f"--user={USER}:{PASSWORD}", f"--realm={REALM}",
            "--allow-loopback-peers", "--no-tls", "--no-dtls", "--no-cli", "--no-tcp",
            "--log-file=stdout", "--simple-log",
            f"--pidfile={tmp / 'turnserver.pid'}", f"--db={tmp / 'turndb'}",
        ]
        log = open(tmp / "turnserver.log", "wb")  # noqa: SIM115
        try:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=tmp,
                                            start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while not stun_binding_answered(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log_text().splitlines()[-15:])
                exited = self.process.poll()
                self.stop()
                what = f"exited with {exited}" if exited is not None else "did not answer STUN"
                raise RuntimeError(f"turnserver {what} on port {self.port}:\n{tail}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the server and its process group; remove its temporary directory.

        Raises:
            RuntimeError: a process of the group is still there after SIGKILL.
        """
        process, self.process = self.process, None
        try:
            if process is not None:
                pgid = process.pid
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
                try:
                    process.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                    process.wait(timeout=5.0)
                # Any other member of the group (none is expected) goes too.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
                while _group_exists(pgid):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"turnserver process group {pgid} survived SIGKILL")
                    time.sleep(0.02)
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> TurnServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
