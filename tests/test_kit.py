"""``./kit``: the kit is installed again only when pyproject.toml changed, and quietly.

The venv here is a directory of small scripts standing in for the venv's ``python`` (which
records how pip was called) and ``fanny-sim`` (which says it ran), so that what ``./kit sim``
decides can be seen without a minute of real installation; ``./kit install`` runs for real in
every developer's setup and in CI.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

from .helpers import TIME_UNIT

ROOT = Path(__file__).resolve().parents[1]


def _venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "pip-calls.txt"
    scripts = {
        "python": f'#!/bin/sh\necho "$@" >>"{calls}"\necho "pip chatter: a warning"\n',
        "fanny-sim": '#!/bin/sh\necho "fanny-sim ran"\n',
    }
    for name, text in scripts.items():
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    return venv


def _kit_sim(venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ROOT / "kit", "sim"], capture_output=True, text=True,
                          env={**os.environ, "FANNY_VENV": str(venv)},
                          timeout=30 * TIME_UNIT, check=True)


def test_kit_installs_only_when_pyproject_changed_and_quietly(tmp_path):
    venv = _venv(tmp_path)
    calls = tmp_path / "pip-calls.txt"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()

    first = _kit_sim(venv)                       # no stamp: installs, pip's output in the log
    assert first.stdout == "fanny-sim ran\n"
    assert first.stderr == (f"kit: installing the kit[tui] in {venv} (a minute or two the "
                            "first time)...\n")
    assert calls.read_text().splitlines() == ["-m pip install -q --upgrade pip",
                                              "-m pip install -q -e .[tui]"]
    assert (venv / ".kit-installed").read_text() == f"{digest} [tui]\n"
    assert "pip chatter" in (venv / "kit-install.log").read_text()

    again = _kit_sim(venv)                       # same pyproject.toml: no install at all
    assert (again.stdout, again.stderr) == ("fanny-sim ran\n", "")
    assert len(calls.read_text().splitlines()) == 2

    (venv / ".kit-installed").write_text("0" * 64 + " [tui]\n")   # pyproject.toml changed since
    _kit_sim(venv)
    assert len(calls.read_text().splitlines()) == 4
    assert (venv / ".kit-installed").read_text() == f"{digest} [tui]\n"


def test_kit_counts_the_test_install_as_the_device_one_but_not_the_base(tmp_path):
    venv = _venv(tmp_path)
    calls = tmp_path / "pip-calls.txt"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()

    (venv / ".kit-installed").write_text(f"{digest} [tui,test]\n")   # ./kit install's stamp
    assert _kit_sim(venv).stderr == ""
    assert not calls.exists()

    (venv / ".kit-installed").write_text(f"{digest} \n")   # the base only (a broker host's)
    _kit_sim(venv)
    assert calls.read_text().splitlines()[-1] == "-m pip install -q -e .[tui]"
    assert (venv / ".kit-installed").read_text() == f"{digest} [tui]\n"


def _kit_test(venv: Path, mypy_status: int) -> subprocess.CompletedProcess[str]:
    calls = venv.parent / "pip-calls.txt"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".kit-installed").write_text(f"{digest} [tui,test]\n")   # installed: no pip
    for name, status in (("ruff", 0), ("mypy", mypy_status)):
        (venv / "bin" / name).write_text(f'#!/bin/sh\necho "{name} $*" >>"{calls}"\n'
                                         f'exit {status}\n')
        (venv / "bin" / name).chmod(0o755)
    return subprocess.run([ROOT / "kit", "test", "tests/test_kit.py"], capture_output=True,
                          text=True, env={**os.environ, "FANNY_VENV": str(venv)},
                          timeout=30 * TIME_UNIT)


def test_kit_test_runs_the_type_check_after_the_lint_and_stops_on_its_errors(tmp_path):
    venv = _venv(tmp_path)
    calls = tmp_path / "pip-calls.txt"
    failed = _kit_test(venv, mypy_status=1)
    assert failed.returncode == 1
    assert calls.read_text().splitlines() == ["ruff check fanny_tui broker tests benchmarks",
                                              "mypy "]          # no pytest after mypy failed
    calls.unlink()
    passed = _kit_test(venv, mypy_status=0)
    assert passed.returncode == 0, passed.stderr
    assert calls.read_text().splitlines() == ["ruff check fanny_tui broker tests benchmarks",
                                              "mypy ", "-m pytest tests/test_kit.py"]


def test_kit_starts_the_app_with_sigint_ignored_and_says_so(tmp_path):
    # `./kit demo` / `./kit sim`: a Ctrl-C in Python's own start-up printed "Fatal Python
    # error: init_import_site"; the app starts with SIGINT ignored (the entry point takes it
    # back, told by FANNY_KIT_SIGINT: tests/test_entry.py).
    venv = _venv(tmp_path)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".kit-installed").write_text(f"{digest} [tui]\n")
    (venv / "bin" / "fanny-sim").write_text(
        '#!/bin/sh\necho "$FANNY_KIT_SIGINT"\nsed -n "s/^SigIgn:\\t//p" /proc/$$/status\n')
    marker, ignored = _kit_sim(venv).stdout.split()
    assert marker == "ignored"
    assert int(ignored, 16) & (1 << (signal.SIGINT - 1))


def test_a_ctrl_c_during_the_python_check_stops_kit_and_installs_nothing(tmp_path):
    # An interrupted `python3 -c 'import venv, ensurepip'` looked like a missing python3-venv:
    # kit went on to apt-get. apt-get and sudo here only record that they were called.
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    apt_calls = tmp_path / "apt-calls.txt"
    scripts = {
        # Ctrl-C reaches kit (its parent) while the check runs; the check fails.
        "python3": '#!/bin/sh\nkill -INT "$PPID"\nexit 1\n',
        "apt-get": f'#!/bin/sh\necho "apt-get $*" >>"{apt_calls}"\n',
        "sudo": '#!/bin/sh\nexec "$@"\n',
    }
    for name, text in scripts.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    done = subprocess.run([ROOT / "kit", "sim"], capture_output=True, text=True,
                          env={**os.environ, "FANNY_VENV": str(_venv(tmp_path)),
                               "PYTHON": str(stubs / "python3"),
                               "PATH": f"{stubs}:{os.environ['PATH']}"},
                          timeout=30 * TIME_UNIT)
    assert (done.returncode, done.stderr) == (130, "kit: interrupted\n")
    assert not apt_calls.exists()
