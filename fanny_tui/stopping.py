"""Stop signals with a bounded shutdown, for runs whose event loop may block (the Textual app).

``fanny-tui`` (the app) and ``fanny-tui demo`` stop cleanly on SIGINT, SIGTERM and SIGHUP (the
terminal closed): the engine stops, the store is closed, the demo's temporary directory is
removed. :class:`StopSignals` delivers the signal to the event loop, and also guards against a
shutdown that never ends (a library blocked in a write to a terminal that is gone, see
:mod:`fanny_tui.ui.driver`):

- its handlers are Python-level (:func:`signal.signal`), not ``loop.add_signal_handler``:
  Python runs them in the main thread even while the event loop is blocked (waiting on a lock),
  where a handler scheduled on the loop would never run;
- the first stop signal calls ``on_stop(signum)`` on the loop and starts a watchdog; if the
  process still runs :data:`STOP_GRACE_S` seconds later, the watchdog (a daemon thread) calls
  ``cleanup()`` (the demo: remove its temporary directory) and ends the process at once with
  ``os._exit(128 + signum)``;
- a second stop signal (SIGTERM after a SIGHUP, a second Ctrl-C) does the same at once.

Nothing is lost by ending that way: every token, contact and alert is committed to SQLite when
it happens (an interrupted transaction is rolled back on the next open), a positive's tokens are
deleted only after the broker's ack, and the data directory's lock (``flock``) is released by
the kernel when the process ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals on which a run stops cleanly (SIGHUP: the terminal closed)."""

STOP_GRACE_S = 8.0
"""How long a shutdown may take after a stop signal before the process ends at once
(seconds). The app waits up to 10 s for the engine itself (``fanny_tui.ui.app.STOP_TIMEOUT_S``)
only when quitting with ``q``; a normal shutdown takes well under a second."""


class StopSignals:
    """Handle :data:`STOP_SIGNALS` while a run's event loop runs (a context manager).

    Args:
        loop: the running event loop; ``on_stop`` is called on it.
        on_stop: called once, on the loop, with the first stop signal's number.
        cleanup: called by the watchdog (any thread) before the process ends without
            unwinding, e.g. to remove a temporary directory; must not block.
        grace_s: seconds from the first stop signal to the forced exit.
        name: the program's name, for the one line on stderr when the watchdog acts.

    Attributes:
        signum: the first stop signal received, or None.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_stop: Callable[[int], None], *,
                 cleanup: Callable[[], None] | None = None, grace_s: float = STOP_GRACE_S,
                 name: str = "fanny-tui") -> None:
        self._loop = loop
        self._on_stop = on_stop
        self._cleanup = cleanup
        self._grace_s = grace_s
        self._name = name
        self.signum: int | None = None
        self._watchdog: threading.Timer | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take over :data:`STOP_SIGNALS` (call from the main thread)."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Give the signals back to their previous handlers and stop the watchdog."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread, between two bytecodes of whatever it was doing.
        if self.signum is not None:
            self.give_up(signum, f"{signal.Signals(signum).name} while stopping")
            return
        self.signum = signum
        late = (f"did not stop within {self._grace_s:g} s of "
                f"{signal.Signals(signum).name}")
        self._watchdog = threading.Timer(self._grace_s, self.give_up, (signum, late))
        self._watchdog.daemon = True
        self._watchdog.name = "fanny-stop-watchdog"
        self._watchdog.start()
        with contextlib.suppress(RuntimeError):   # the loop is closed: nothing to stop
            self._loop.call_soon_threadsafe(self._on_stop, signum)

    def give_up(self, signum: int, why: str) -> None:
        """End the process now: ``cleanup()``, the line ``NAME: WHY; exiting now`` on stderr
        if it can be written without blocking, then ``os._exit(128 + signum)`` (no unwinding,
        no waiting for any thread)."""
        try:
            if self._cleanup is not None:
                self._cleanup()
            _say(f"{self._name}: {why}; exiting now\n")
        finally:
            os._exit(128 + signum)


def _say(line: str) -> None:
    """Write ``line`` to stderr unless that could block (a full pipe) or fail (no terminal)."""
    with contextlib.suppress(OSError, ValueError):
        fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
        if select.select([], [fd], [], 0)[1]:
            os.write(fd, line.encode())
