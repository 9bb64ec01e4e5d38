"""tools/floors.py: every dependency declares a floor that CI can install and check."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tools.floors import EXTRAS, FAST_TESTS, SLOW_TESTS, FloorError, floors, requirements

ROOT = Path(__file__).resolve().parents[1]


def test_every_declared_dependency_has_a_floor():
    pins = floors(requirements())
    assert {"msgspec", "websockets", "aiortc", "textual", "rich", "pytest"} <= set(pins)
    # The floors the code was found to need (issue 7, point 8; each checked by ./kit floors).
    assert pins["websockets"] == "17.0"          # connect(reconnect_delays=...)
    assert pins["textual"] == "6.0"              # Label.content
    assert pins["msgspec"] == "0.19"             # msgspec.structs.force_setattr


def test_the_floors_cover_the_base_and_every_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert set(EXTRAS) == set(project["optional-dependencies"])   # a new extra is checked too
    pins = floors(requirements())
    assert {"msgspec", "websockets"} <= set(pins)                  # the base (broker host)
    assert {"aiortc", "platformdirs", "dnspython"} <= set(pins)    # the [tui] extra
    assert pins["mypy"] == "1.11"                                  # the [test] extra


@pytest.mark.parametrize("bad", ["textual", "textual<9", "textual>=6,<9", "textual==6.0"])
def test_a_dependency_without_a_single_floor_is_refused_in_one_line(bad):
    with pytest.raises(FloorError, match="^pyproject.toml: .* has no single '>=' floor"):
        floors([bad])


def test_extras_and_spaces_are_read():
    assert floors(["uvicorn[standard] >= 0.30", "Foo_Bar>=1.2.3"]) == {
        "uvicorn": "0.30", "foo_bar": "1.2.3"}


def test_constraints_and_test_selection_on_the_command_line():
    out = subprocess.run([sys.executable, "tools/floors.py", "constraints"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert "websockets==17.0" in out and all("==" in line for line in out)
    args = subprocess.run([sys.executable, "tools/floors.py", "tests"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.split()
    assert args == [*FAST_TESTS, *(f"--deselect={t}" for t in SLOW_TESTS)]
    for path in [*FAST_TESTS, *(t.split("::")[0] for t in SLOW_TESTS)]:
        assert (ROOT / path).exists(), path
    for test in SLOW_TESTS:                       # a renamed test must not silently run again
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text()
