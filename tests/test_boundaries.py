"""Architecture contracts: the pure core, the broker and the engine import only what they may."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after_import(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout))


def _top(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


@pytest.mark.parametrize("module", [
    "fanny_tui.protocol.tokens", "fanny_tui.protocol.expiry", "fanny_tui.protocol.messages",
    "fanny_tui.protocol.handshake", "fanny_tui.protocol.proximity", "fanny_tui.protocol.errors",
])
def test_protocol_core_is_pure(module):
    loaded = _top(_modules_after_import(module))
    # msgspec's C extension loads _socket itself; the core opens no socket (no socket module).
    forbidden = {"textual", "aiortc", "av", "aioice", "websockets", "sqlite3", "_sqlite3",
                 "socket", "asyncio", "ssl", "platformdirs"}
    assert not loaded & forbidden, loaded & forbidden


def test_package_init_imports_nothing():
    loaded = _modules_after_import("fanny_tui")
    assert not {m for m in loaded if m.startswith("fanny_tui.")}


def test_broker_imports_no_ui_and_no_webrtc():
    loaded = _modules_after_import("broker.server")
    assert not _top(loaded) & {"textual", "aiortc", "av", "aioice", "rich"}
    assert not {m for m in loaded if m.startswith("fanny_tui.")
                and not m.startswith("fanny_tui.protocol") and m != "fanny_tui.sqlite_util"}


def test_shared_sqlite_plumbing_is_pure_stdlib():
    # Imported by the broker and by the device's store: nothing from the kit, no third party.
    loaded = _modules_after_import("fanny_tui.sqlite_util")
    assert {m for m in loaded if m.startswith("fanny_tui.")} == {"fanny_tui.sqlite_util"}
    assert not _top(loaded) & {"textual", "aiortc", "websockets", "msgspec", "rich"}


def test_engine_imports_no_textual_and_aiortc_lazily():
    loaded = _top(_modules_after_import("fanny_tui.engine"))
    assert "textual" not in loaded
    assert "aiortc" not in loaded and "av" not in loaded   # imported when a match comes


def test_ui_does_no_network_itself():
    import ast
    from pathlib import Path

    ui = Path(__file__).resolve().parents[1] / "fanny_tui" / "ui"
    for path in ui.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"websockets", "aiortc", "socket", "sqlite3",
                                                  "broker"}, f"{path.name} imports {name}"
