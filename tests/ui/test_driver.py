"""The driver's output once its terminal is gone (fanny_tui.ui.driver), on a real pty."""

from __future__ import annotations

import contextlib
import os

from fanny_tui.ui.driver import TerminalOutput


def test_output_to_a_hung_up_terminal_is_dropped_not_raised():
    master, slave = os.openpty()
    terminal = os.fdopen(slave, "w", buffering=1)
    output = TerminalOutput(terminal)
    try:
        output.write("drawn\n")
        output.flush()
        assert os.read(master, 100) == b"drawn\r\n" and not output.gone
        os.close(master)                        # the terminal closes: the tty is hung up
        for _ in range(3):                      # EIO at the first flush, then nothing tried
            assert output.write("x" * 10000) == 10000
            output.flush()
        assert output.gone
        assert output.fileno() == slave         # everything else is the file's own
    finally:
        with contextlib.suppress(OSError):      # its last flush: EIO, as expected
            terminal.close()


def test_no_file_drops_everything():
    output = TerminalOutput(None)
    assert output.gone and output.write("x") == 1
    output.flush()
