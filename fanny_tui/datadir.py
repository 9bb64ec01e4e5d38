"""One process at a time on a data directory: an advisory lock on ``DIR/fanny-tui.lock``.

Two engines on one token store would both witness under one store, and a ``fanny-tui
declare-positive`` running beside an engine would upload the tokens that engine is also
uploading. So the engine (:meth:`fanny_tui.engine.Engine.run`, for its whole life) and
``fanny-tui declare-positive`` (while it writes) hold an exclusive :func:`fcntl.flock` on the
lock file; a second holder is refused at once with :class:`DataDirBusy`, whose message names the
directory and the process that holds it. ``fanny-tui tokens`` only reads and takes no lock.

The lock is released by the kernel when the holding process ends, however it ends (kill -9
included): a stale lock file is harmless and is never deleted (deleting it would let two
processes lock two different files). While held, the file says who holds it (process ID and
command line, one line); no session ID, contact ID, token or position is ever written there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path
from types import TracebackType

from .store import StoreError

LOCK_NAME = "fanny-tui.lock"
"""The lock file's name in the data directory."""

_MAX_HOLDER = 200


class DataDirBusy(StoreError):
    """Another process holds the data directory's lock; ``str()`` is one line naming both.

    Attributes:
        data_dir: the locked directory.
        holder: who holds it, as that process wrote it (``pid 1234: fanny-tui --headless``),
            or None if it could not be read.
    """

    def __init__(self, data_dir: Path, holder: str | None) -> None:
        self.data_dir = data_dir
        self.holder = holder
        who = holder or "another process"
        super().__init__(f"the data directory {data_dir} is in use by {who}: stop that "
                         "process first, or use another --data-dir")


def holder_line(pid: int | None = None, argv: list[str] | None = None) -> str:
    """What a holder writes in the lock file: ``pid N: PROGRAM ARGS`` (one line, <= 200 chars).

    Args:
        pid: the process ID (default: this process).
        argv: the command line (default: ``sys.argv``, the program by its file name only).
    """
    pid = os.getpid() if pid is None else pid
    argv = list(sys.argv) if argv is None else argv
    command = " ".join([Path(argv[0]).name, *argv[1:]]) if argv else "python"
    line = " ".join(f"pid {pid}: {command}".split())
    return line[:_MAX_HOLDER].rstrip()   # cut at a space: no trailing one (as read back)


class DataDirLock:
    """The exclusive lock on one data directory (also a context manager).

    Args:
        data_dir: the data directory (created with its parents when missing).

    Example::

        with DataDirLock(data_dir):
            ...   # nobody else runs an engine or a declaration on data_dir here
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True between :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now, without waiting, and write this process's holder line in it.

        Raises:
            DataDirBusy: another process (or another lock object here) holds it.
            StoreError: the directory or the lock file cannot be created or opened (one line
                naming it).
            RuntimeError: this object holds the lock already.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this object")
        if self.data_dir.exists() and not self.data_dir.is_dir():
            # mkdir(exist_ok=True) on a file says "File exists", which names no mistake
            raise StoreError(f"cannot open the token store in {self.data_dir}: it is a file, "
                             f"not a directory (check --data-dir or [storage] data_dir)")
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the token store in {self.data_dir}: "
                             f"{exc.strerror or exc}") from None
        try:
            taken = try_lock(fd)
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock the data directory {self.data_dir}: "
                             f"{exc.strerror or exc}") from None
        if not taken:
            holder = _read_holder(fd)
            os.close(fd)
            raise DataDirBusy(self.data_dir, holder)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder_line() + "\n").encode(), 0)
        except OSError:
            pass  # a full disk must not stop the device: the lock holds without the note

    def release(self) -> None:
        """Let the lock go (idempotent); the holder line is erased first."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)          # closing the file releases the flock

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def try_lock(fd: int) -> bool:
    """Take an exclusive :func:`fcntl.flock` on the open file ``fd`` without waiting.

    Returns:
        True when taken (it lasts until ``fd`` is closed, or the process ends however it
        ends); False when another open file (another process, or another open here) holds it.

    Raises:
        OSError: the lock cannot be taken for another reason (e.g. ENOLCK).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _read_holder(fd: int) -> str | None:
    try:
        text = os.pread(fd, _MAX_HOLDER + 1, 0).decode("utf-8", "replace")
    except OSError:
        return None
    line = " ".join(text.split())[:_MAX_HOLDER]
    return line or None
