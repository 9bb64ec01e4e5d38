"""Dependency floors: pin every declared dependency to its lowest allowed version (issue 7, 8).

``python tools/floors.py constraints`` prints a pip constraints file (``name==floor``) for every
``name>=floor`` in pyproject.toml's ``dependencies`` and ``test`` extra; ``./kit test`` installs
the kit with it in a second virtual environment (``.venv-floors``) and runs :data:`FAST_TESTS`
there, so that a floor too low for the code fails CI instead of a tester's install.

``python tools/floors.py verify`` (run by the floors environment's Python) checks that each
pinned distribution is installed at exactly its floor.

``python tools/floors.py tests`` prints the pytest arguments: :data:`FAST_TESTS` and a
``--deselect`` for each of :data:`SLOW_TESTS`, one per line.

Pure standard library (it runs before any install). Exit status 1 with a one-line error when
a dependency is declared without a ``>=`` floor (a floor must be stated to be checked).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAST_TESTS = (
    # Each dependency with a floor through the fast tests of the modules using it (< 2 min in
    # all on an idle 2-core machine): msgspec (messages), websockets (link, positives, broker
    # server), redis (broker's Redis backend), textual and rich (ui), platformdirs (datadir,
    # cli), pynmea2 (gps), gpxpy (sim scenarios), dnspython (mdns), aiortc (engine clock test:
    # a real engine), sqlite3 (store), psycopg (the PostgreSQL board: tests/broker/
    # test_positives.py runs on both boards).
    "tests/test_messages.py",
    "tests/test_config.py",
    "tests/test_datadir.py",
    "tests/test_store.py",
    "tests/test_sqlite_util.py",
    "tests/test_link.py",
    "tests/test_positives.py",
    "tests/test_gps.py",
    "tests/test_mdns.py",
    "tests/test_boundaries.py",
    "tests/test_engine_clock.py",
    "tests/broker/test_positives.py",
    "tests/broker/test_postgres_board.py",
    "tests/broker/test_server.py",
    "tests/broker/test_redis_backend.py",
    "tests/ui/test_formatting.py",
    "tests/ui/test_screens.py",
    "tests/ui/test_app.py",
    "tests/sim/test_scenario.py",
)
SLOW_TESTS = (
    # Long property-based or timeout-bound tests of the files above, run by the main suite only.
    "tests/test_gps.py::test_tracker_never_raises_nor_invents_a_position",
    "tests/test_gps.py::test_decoder_never_raises_on_bytes",
    "tests/test_mdns.py::test_without_restriction_aioice_resolves_the_names_itself",
)
"""Test files run against the floors."""

_FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)\s*$")


class FloorError(Exception):
    """A dependency without a ``>=`` floor; ``str()`` is one line naming it."""


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The declared requirement strings: ``dependencies`` and the ``test`` extra."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"], *project.get("optional-dependencies", {}).get("test", [])]


def floors(requirements: list[str]) -> dict[str, str]:
    """``name -> lowest allowed version`` for requirements of the form ``name>=version``.

    Raises:
        FloorError: a requirement has no ``>=`` floor (or more than one bound).
    """
    out: dict[str, str] = {}
    for requirement in requirements:
        match = _FLOOR.match(requirement)
        if match is None:
            raise FloorError(f"pyproject.toml: {requirement!r} has no single '>=' floor to check")
        out[match.group(1).lower()] = match.group(2)
    return out


def _release(version: str) -> tuple[int, ...]:
    numbers = [int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))


def verify(pins: dict[str, str]) -> int:
    """Check that the running interpreter has exactly the floors installed.

    Returns:
        0 when every pinned distribution is installed at its floor, else 1 (one line on
        stderr per difference).
    """
    from importlib.metadata import PackageNotFoundError, version

    status = 0
    for name, floor in sorted(pins.items()):
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed == "missing" or _release(installed) != _release(floor):
            print(f"floors: {name} is {installed}, not its floor {floor}", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else ""
    if what == "constraints":
        try:
            pins = floors(requirements())
        except FloorError as exc:
            print(f"floors: {exc}", file=sys.stderr)
            return 1
        print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
        return 0
    if what == "verify":
        return verify(floors(requirements()))
    if what == "tests":
        print("\n".join([*FAST_TESTS, *(f"--deselect={t}" for t in SLOW_TESTS)]))
        return 0
    print("usage: python tools/floors.py constraints|verify|tests", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
