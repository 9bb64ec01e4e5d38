"""A stdout closed by its reader (``fanny-tui report ... | head -n 2``): a quiet exit 141.

Shared by ``fanny-tui`` (``--headless``, ``tokens``, ``report``, ``demo``) and ``fanny-sim``:
at the first :class:`BrokenPipeError` stdout is pointed at ``/dev/null`` (:func:`silence_stdout`,
the Python documentation's recipe for SIGPIPE: the interpreter's final flush then succeeds
instead of printing an error) and the program exits with :data:`EXIT_BROKEN_PIPE`, as a Unix tool
killed by SIGPIPE. Rich's console exits with status 1 on a broken pipe; :func:`rich_console`
makes one that raises :class:`BrokenPipeError` instead, for the caller to handle the same way.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
"""141: stdout's reader went away (``| head``); what a Unix tool killed by SIGPIPE returns."""


def silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null (after a broken pipe: nothing more is
    written, and the interpreter's last flush cannot fail)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def rich_console(**kwargs: Any) -> Console:
    """A :class:`rich.console.Console` (``kwargs`` as rich's) whose broken pipe raises
    :class:`BrokenPipeError` (rich's own raises ``SystemExit(1)``)."""
    from rich.console import Console

    class _PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True          # nothing more is rendered
            raise BrokenPipeError(32, "Broken pipe")

    return _PipeConsole(**kwargs)
