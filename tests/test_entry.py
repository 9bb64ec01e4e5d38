"""fanny_tui.entry: `fanny-tui` and `fanny-sim` without the `tui` extra say what to install."""

from __future__ import annotations

import subprocess
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
