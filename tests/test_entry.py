"""fanny_tui.entry: `fanny-tui` and `fanny-sim` without the `tui` extra say what to install."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from fanny_tui.entry import INSTALL_TUI, TUI_MODULES, missing_tui_modules

from .helpers import TIME_UNIT, ImportBlocker, console_script

ROOT = Path(__file__).resolve().parents[1]


def test_the_checked_modules_are_those_of_the_tui_extra():
    tui = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["optional-dependencies"]["tui"]
    names = [r.split(">")[0].strip().lower() for r in tui]
    owners = packages_distributions()
    assert [owners[module][0].lower() for module in TUI_MODULES] == names
    assert missing_tui_modules() == []          # this venv has the extra (./kit installs it)


def _run(command: str, *args: str, blocker: ImportBlocker) -> subprocess.CompletedProcess[str]:
    main = "tui" if command == "fanny-tui" else "sim"
    argv = console_script(command, f"import sys; from fanny_tui.entry import {main}; "
                                   f"sys.exit({main}())")
    return subprocess.run([*argv, *args], env=blocker.env, capture_output=True, text=True,
                          timeout=30 * TIME_UNIT, cwd=ROOT)


@pytest.mark.parametrize(("command", "args"), [
    ("fanny-tui", ()), ("fanny-tui", ("--version",)), ("fanny-tui", ("demo", "--headless")),
    ("fanny-sim", ("scenarios/street.toml",)),
])
def test_without_the_client_stack_one_line_says_what_to_install(tmp_path, command, args):
    blocker = ImportBlocker.make(tmp_path, ("textual", "aiortc", "av", "rich"))
    done = _run(command, *args, blocker=blocker)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"{command}: the field device's packages are not installed "
                           f"(missing: aiortc, textual, rich); install them with: "
                           f"{INSTALL_TUI}\n")
    assert INSTALL_TUI == "pip install 'fanny-field-kit[tui]'"
    assert blocker.installed_in() == 1


def test_one_missing_module_is_named_alone(tmp_path):
    done = _run("fanny-tui", "--version", blocker=ImportBlocker.make(tmp_path, ("gpxpy",)))
    assert done.returncode == 2
    assert "(missing: gpxpy);" in done.stderr and len(done.stderr.splitlines()) == 1


def test_with_the_extra_the_commands_run(tmp_path):
    blocker = ImportBlocker.make(tmp_path, ("no_such_module_here",))
    done = _run("fanny-tui", "--version", blocker=blocker)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("fanny-tui ")
    done = _run("fanny-sim", "--help", blocker=blocker)
    assert done.returncode == 0 and "usage: fanny-sim" in done.stdout


# -- a Ctrl-C while starting (./kit starts the app with SIGINT ignored) ----------------------

_SIGINT_STATE = ("import os, signal, sys; from fanny_tui.entry import take_back_sigint; "
                 "take_back_sigint(); handler = signal.getsignal(signal.SIGINT); "
                 "print('default' if handler is signal.default_int_handler else "
                 "'ignored' if handler == signal.SIG_IGN else handler, "
                 "os.environ.get('FANNY_KIT_SIGINT'))")


def _ignoring_sigint() -> None:   # preexec_fn: as ./kit's `trap '' INT` before its exec
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(("marker", "shown"), [("ignored", "default None"),
                                               (None, "ignored None")])
def test_the_entry_takes_sigint_back_only_when_kit_ignored_it(marker, shown):
    # Without the marker a process started with SIGINT ignored (nohup, a background job)
    # keeps it ignored; with it, SIGINT is handled again and no child inherits the marker.
    env = {k: v for k, v in os.environ.items() if k != "FANNY_KIT_SIGINT"}
    if marker is not None:
        env["FANNY_KIT_SIGINT"] = marker
    done = subprocess.run([sys.executable, "-c", _SIGINT_STATE], env=env, text=True,
                          capture_output=True, preexec_fn=_ignoring_sigint,
                          timeout=30 * TIME_UNIT, check=True)
    assert done.stdout.split() == shown.split()


def test_a_ctrl_c_early_in_the_demo_exits_130_without_a_traceback():
    # Trial finding: Ctrl-C 0.3 s into `./kit demo` printed "Fatal Python error:
    # init_import_site ... KeyboardInterrupt", later ones a traceback from an import. Started
    # as ./kit starts it, SIGINT every 50 ms (those before the entry point runs are dropped)
    # until the demo ends: wherever one lands (imports, arguments, the demo), a quiet 130.
    argv = console_script("fanny-tui", "import sys; from fanny_tui.entry import tui; "
                                       "sys.exit(tui())")
    process = subprocess.Popen([*argv, "demo", "--headless"], cwd=ROOT, text=True,
                               env={**os.environ, "FANNY_KIT_SIGINT": "ignored"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=_ignoring_sigint)
    deadline = time.monotonic() + 30 * TIME_UNIT
    try:
        while process.poll() is None and time.monotonic() < deadline:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(0.05)
        _, err = process.communicate(timeout=30 * TIME_UNIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Fatal Python error" not in err, err
