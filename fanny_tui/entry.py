"""The console entry points of the field device: ``fanny-tui`` and ``fanny-sim`` (issue 8).

The base install (the distribution ``fanny-field-kit`` without extras: ``pip install .`` from a
checkout) is the protocol and the broker only: a broker host gets no aiortc, PyAV or Textual.
The field device is the ``tui`` extra (``pip install 'fanny-field-kit[tui]'``, from a checkout
``pip install '.[tui]'``; ``./kit`` installs it). Without it,
``fanny-tui`` and ``fanny-sim`` say in one line on stderr what to install and exit 2 (a usage
error, as a bad config), instead of a traceback from an import deep inside the app.

This module imports only the standard library until the check has passed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Callable

TUI_MODULES = ("platformdirs", "aiortc", "textual", "rich", "pynmea2", "gpxpy", "dns")
"""The top-level modules of the ``tui`` extra's distributions (pyproject.toml), in that order;
``dns`` is dnspython's."""
INSTALL_TUI = "pip install 'fanny-field-kit[tui]'"
"""What to run to get the field device's packages (from a checkout: ``pip install '.[tui]'``)."""
EXIT_USAGE = 2
"""Exit status when the extra is missing (as :data:`fanny_tui.cli.EXIT_USAGE`)."""
EXIT_INTERRUPTED = 130
"""Exit status after a Ctrl-C (SIGINT) while starting (as ``fanny_tui.cli.EXIT_INTERRUPTED``)."""
KIT_SIGINT = "FANNY_KIT_SIGINT"
"""Set to ``ignored`` by ``./kit`` when it starts the app with SIGINT ignored (see
:func:`take_back_sigint`)."""


def take_back_sigint() -> None:
    """Handle SIGINT again (``KeyboardInterrupt``) if ``./kit`` started this process with it
    ignored, as :data:`KIT_SIGINT` says; else change nothing (a process started with SIGINT
    ignored otherwise, ``nohup`` or a background job, keeps it ignored).

    ``./kit demo`` and ``./kit sim`` ignore SIGINT across Python's own start-up, where a Ctrl-C
    cannot be caught (``Fatal Python error: init_import_site``); from here on the entry points
    turn one into a quiet exit 130. The variable is removed, so that no child inherits it.
    """
    if os.environ.pop(KIT_SIGINT, None) == "ignored" and (
            signal.getsignal(signal.SIGINT) == signal.SIG_IGN):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def missing_tui_modules() -> list[str]:
    """The modules of :data:`TUI_MODULES` that cannot be imported here (none imported)."""
    missing = []
    for name in TUI_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # a finder refused it (or a broken install): not usable either
            found = False
        if not found:
            missing.append(name)
    return missing


def without_tui(command: str) -> str | None:
    """The one-line message for ``command`` when the ``tui`` extra is missing, else None."""
    missing = missing_tui_modules()
    if not missing:
        return None
    return (f"{command}: the field device's packages are not installed (missing: "
            f"{', '.join(missing)}); install them with: {INSTALL_TUI}")


def _run_with_tui(command: str, load_main: Callable[[], Callable[[], int]]) -> int:
    """Run ``command``'s main (imported by ``load_main``) once the ``tui`` extra is there; a
    Ctrl-C while it starts (its imports, the arguments) exits 130 without a traceback."""
    take_back_sigint()
    try:
        message = without_tui(command)
        if message is not None:
            print(message, file=sys.stderr)
            return EXIT_USAGE
        return load_main()()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _tui_main() -> Callable[[], int]:
    from .cli import main

    return main


def _sim_main() -> Callable[[], int]:
    from .sim.cli import main

    return main


def tui() -> int:
    """``fanny-tui``: :func:`fanny_tui.cli.main` once the ``tui`` extra is there; a Ctrl-C
    while it starts (its imports, the arguments) exits 130 without a traceback."""
    return _run_with_tui("fanny-tui", _tui_main)


def sim() -> int:
    """``fanny-sim``: :func:`fanny_tui.sim.cli.main` once the ``tui`` extra is there; a Ctrl-C
    while it starts exits 130 without a traceback."""
    return _run_with_tui("fanny-sim", _sim_main)
