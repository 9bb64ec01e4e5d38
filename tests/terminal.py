"""A program in a real terminal (a pty) for the tests of the app and the demo: start it, read
what it draws, type into it, hang the terminal up, and wait for its exit status."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DOWN = b"\x1b[B"
"""The Down arrow key, as a terminal sends it."""

NEVER = b"\0never\0"
"""A screen text no program draws: ``read_screen(fd, NEVER, t)`` reads for ``t`` seconds."""


def read_screen(fd: int, until: bytes, timeout: float) -> bytes:
    """Read the terminal's output until ``until`` appears (or EOF / the timeout)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while until not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:           # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


def wait_exit(pid: int, timeout: float, fd: int | None = None) -> int | None:
    """The child's wait status once it exits, or None if it still runs after ``timeout``;
    with ``fd``, the terminal is drained meanwhile (an app blocked on a full terminal would
    never exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if fd is None:
            time.sleep(0.05)
        else:
            read_screen(fd, NEVER, 0.05)
    return None


def hang_up_after_keys(fd: int, first: bytes, repeat: bytes, for_s: float) -> float:
    """Type ``first``, then ``repeat`` again and again for ``for_s`` seconds, never reading
    what the app draws (a terminal that stopped reading, as tmux being killed: the app's
    writes back up), then close the terminal (the pty master: the kernel hangs the tty up,
    SIGHUP and SIGCONT to the session leader). Returns the monotonic time of the hangup."""
    os.write(fd, first)
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        _, writable, _ = select.select([], [fd], [], 0.05)
        if writable:
            os.write(fd, repeat)
        time.sleep(0.02)
    started = time.monotonic()
    os.close(fd)
    return started


@dataclass
class InTerminal:
    """A program running in a pty: its ``pid``, the pty master ``fd``; set ``status`` once
    it exited (its wait status) and ``closed`` once the test closed ``fd`` itself."""

    pid: int
    fd: int
    status: int | None = None
    closed: bool = False


@contextlib.contextmanager
def in_terminal(argv: Sequence[str], env: Mapping[str, str],
                cwd: Path | None = None) -> Iterator[InTerminal]:
    """Run ``argv`` in an 80x24 pty (``TERM``, ``COLUMNS``, ``LINES`` set over ``env``); on
    leaving, a program whose ``status`` was not set is SIGKILLed and reaped, and the pty
    master is closed unless the test closed it."""
    env = {**env, "TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24"}
    pid, fd = pty.fork()
    if pid == 0:                                           # the child, in the pty
        if cwd is not None:
            os.chdir(cwd)
        os.execve(argv[0], list(argv), env)
    program = InTerminal(pid, fd)
    try:
        yield program
    finally:
        if program.status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if not program.closed:
            os.close(fd)
