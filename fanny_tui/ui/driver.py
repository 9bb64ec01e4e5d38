"""The terminal driver: Textual's Linux driver, made safe against a terminal that goes away.

When the terminal closes (a terminal window or ``tmux kill-session``, an SSH connection lost),
the kernel hangs the tty up: the process (the session leader) gets SIGHUP then SIGCONT, and
every later write to the tty fails with EIO. Textual 8.2 (``textual.drivers.linux_driver``,
``_writer_thread``) does not survive that:

- its writer thread (``textual-output``) dies at the first failed write, so the next
  30 writes fill its queue and the 31st blocks the event loop for ever: the app's shutdown,
  which restores the terminal (``disable_input``, ``stop_application_mode``, ``close``),
  never ends, and a signal handled on the event loop is never run;
- its SIGCONT handler resumes "application mode" on the dead terminal (a new writer thread,
  a new input thread) in the middle of whatever the main thread was doing.

Textual has no handling of SIGHUP (Textualize/textual issue 5140, "Gracefully handle
termination signals", open; the writer thread is unchanged upstream). :class:`HangupSafeDriver`
keeps Textual's behaviour on a live terminal and, once it is gone, drops what would be written
instead of failing, and does not resume on SIGCONT. The app exits on SIGHUP through
:mod:`fanny_tui.stopping`.
"""

from __future__ import annotations

import os
from io import TextIOWrapper
from typing import IO, Any, cast

from textual.drivers.linux_driver import LinuxDriver


class TerminalOutput:
    """The driver's output file (the process's stderr), minus the errors of a closed terminal.

    Textual's writer thread calls :meth:`write` and :meth:`flush`; the first :class:`OSError`
    (EIO on a hung-up tty, EPIPE) marks the terminal :attr:`gone`, and from then on everything
    written is dropped, so the writer thread keeps draining its queue and nothing that writes
    can block.

    Args:
        file: the file Textual would write to (``sys.__stderr__``; None when the process has
            no stderr: everything is dropped).
    """

    def __init__(self, file: IO[str] | None) -> None:
        self._file = file
        self.gone = file is None

    def write(self, text: str) -> int:
        """Write ``text`` (dropped once the terminal is gone). Returns ``len(text)``."""
        file = self._file
        if file is not None and not self.gone:
            try:
                file.write(text)
            except OSError:
                self.gone = True
        return len(text)

    def flush(self) -> None:
        """Flush the file (nothing once the terminal is gone)."""
        file = self._file
        if file is not None and not self.gone:
            try:
                file.flush()
            except OSError:
                self.gone = True

    def __getattr__(self, name: str) -> Any:
        # fileno(), isatty(), encoding...: the file's own.
        return getattr(self._file, name)


class HangupSafeDriver(LinuxDriver):
    """Textual's :class:`LinuxDriver` whose output survives a hung-up terminal (see the
    module docstring); ``App(driver_class=HangupSafeDriver)`` or ``get_driver_class``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output = TerminalOutput(self._file)
        # Textual's writer thread only calls write(), flush() and fileno() on it.
        self._file = cast("TextIOWrapper", self.output)

    @property
    def terminal_gone(self) -> bool:
        """True once the terminal has been hung up (a write failed, or stdin is no longer a
        tty although it was one: ``isatty`` fails with EIO after a hangup)."""
        if not self.output.gone and self.input_tty and not os.isatty(self.fileno):
            self.output.gone = True
        return self.output.gone

    def _sigcont_application(self, *args: Any) -> None:
        # SIGCONT after ``fg`` resumes the app; SIGCONT after a hangup (the kernel sends it
        # with SIGHUP) must not start application mode again on a terminal that is gone.
        if not self.terminal_gone:
            super()._sigcont_application(*args)
