"""pyproject.toml's dependency split (issue 8, point 4): the base is the protocol and the broker.

A broker host runs ``pip install .`` and gets no aiortc, PyAV, Textual or Rich. Checked three
ways: the declared base dependencies; every import reachable from :mod:`broker` and
:mod:`fanny_tui.protocol` (read from the source, lazy imports included); and the real
``fanny-broker`` run in a Python where the client stack cannot be imported.
"""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.broker.kit import Client, healthz
from tests.servers import start_broker_process, stop_broker_process

from .helpers import CLIENT_STACK, TIME_UNIT, ImportBlocker, console_script

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
CLIENT_DISTRIBUTIONS = {"textual", "aiortc", "av", "rich", "pynmea2", "gpxpy", "dnspython",
                        "platformdirs"}
"""The field device's distributions (PyPI names; ``av`` is PyAV)."""


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in requirements}


def test_the_base_dependencies_hold_nothing_of_the_field_device():
    base = _names(PROJECT["dependencies"])
    assert {"msgspec", "websockets"} <= base     # (and what the broker's backends need)
    assert not base & CLIENT_DISTRIBUTIONS
    extras = PROJECT["optional-dependencies"]
    assert _names(extras["tui"]) == CLIENT_DISTRIBUTIONS - {"av"}   # av comes with aiortc
    assert "mypy" in _names(extras["test"])
    assert PROJECT["scripts"]["fanny-broker"] == "broker.__main__:main"
    assert PROJECT["scripts"]["fanny-tui"] == "fanny_tui.entry:tui"
    assert PROJECT["scripts"]["fanny-sim"] == "fanny_tui.entry:sim"


def _runtime_imports(path: Path) -> list[tuple[str, int, int]]:
    """``(module, level, line)`` of every import in ``path`` that runs (``if TYPE_CHECKING:``
    bodies left out), those inside functions included; ``from X import Y`` gives ``X`` and
    ``X.Y`` (Y may be a module)."""
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, 0, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            out.append((base, node.level, node.lineno))
            out.extend((f"{base}.{alias.name}".lstrip("."), node.level, node.lineno)
                       for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


def _source(module: str) -> Path | None:
    """The file of one of our modules (``fanny_tui.x.y`` or ``broker.x``), None if none."""
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _absolute(module: str, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module
    parts = importer.split(".")
    package = parts if is_package else parts[:-1]
    return ".".join([*package[:len(package) - (level - 1)], *filter(None, [module])])


def test_broker_and_protocol_reach_only_the_base_dependencies():
    """Every module reachable from broker/ and fanny_tui/protocol/ through the imports in their
    source, their packages' ``__init__`` included, imports only the standard library, our own
    modules and the base dependencies' modules."""
    base = _names(PROJECT["dependencies"])
    allowed = {module for module, dists in packages_distributions().items()
               if {d.lower() for d in dists} & base}
    assert {"msgspec", "websockets"} <= allowed
    start = [f"broker.{p.stem}" for p in (ROOT / "broker").glob("*.py")]
    start += [f"fanny_tui.protocol.{p.stem}" for p in (ROOT / "fanny_tui/protocol").glob("*.py")]
    seen: set[str] = set()
    todo = [m.removesuffix(".__init__") for m in start]
    outside: dict[str, str] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _source(module)
        if path is None:
            continue   # a name imported from a module, not a module
        if "." in module:
            todo.append(module.rpartition(".")[0])   # importing a.b runs a/__init__ first
        for name, level, line in _runtime_imports(path):
            name = _absolute(name, level, module, path.name == "__init__.py")
            top = name.partition(".")[0]
            if top in ("broker", "fanny_tui"):
                todo.append(name)
            elif top not in sys.stdlib_module_names and top not in allowed:
                outside.setdefault(top, f"{path.relative_to(ROOT)}:{line}")
    assert "fanny_tui" in seen and "fanny_tui.protocol.messages" in seen
    assert not set(CLIENT_STACK) & outside.keys()
    assert outside == {}, f"imports beyond the base dependencies: {outside}"


def test_the_client_stack_blocker_works(tmp_path):
    """The blocker of the next test refuses what it should (else that test proves nothing)."""
    blocker = ImportBlocker.make(tmp_path)
    done = subprocess.run([sys.executable, "-c", "import textual"], env=blocker.env,
                          capture_output=True, text=True, timeout=30 * TIME_UNIT)
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'textual'" in done.stderr
    assert blocker.refused() == ["textual"] and blocker.installed_in() == 1


async def test_the_broker_runs_without_the_client_stack(tmp_path, monkeypatch):
    """``fanny-broker --help``, then ``serve``: a session, a health check, SIGTERM, in a Python
    that cannot import textual, aiortc, av, rich or any other module of the field device."""
    blocker = ImportBlocker.make(tmp_path)
    monkeypatch.setenv("PYTHONPATH", blocker.env["PYTHONPATH"])
    broker = console_script("fanny-broker",
                            "import sys; from broker.__main__ import main; sys.exit(main())")
    done = await asyncio.to_thread(subprocess.run, [*broker, "--help"], capture_output=True,
                                   text=True, timeout=30 * TIME_UNIT)
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout and "issue-code" in done.stdout

    board = tmp_path / "board.sqlite3"
    created = await asyncio.to_thread(subprocess.run, [*broker, "create-board", "--db", str(board)],
                                      capture_output=True, text=True, timeout=30 * TIME_UNIT)
    assert created.returncode == 0, created.stderr
    process, url = await start_broker_process("--port", "0", "--db", str(board))
    try:
        async with Client.open(url) as client:
            assert (await client.hello(radius_m=20.0)).radius_m == 20.0
        status, body = await healthz(int(url.rpartition(":")[2]))
        assert status == 200 and body["status"] == "ok"
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    status, err, _ = await stop_broker_process(process, signal.SIGTERM)
    assert status == 0, err
    assert "Traceback" not in err
    assert blocker.installed_in() == 3   # --help, create-board and serve, all with the blocker
    assert blocker.refused() == []                # nothing even tried to import the client
    assert not [line for line in blocker.lines() if line.startswith("already imported")]
