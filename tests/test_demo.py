"""The demo, headless, as the README runs it: matches, tokens, then the exposure alert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_headless_demo_reaches_the_exposure_alert(tmp_path):
    result = subprocess.run([BIN / "fanny-tui", "demo", "--headless", "--devices", "3",
                             "--duration", "90"], capture_output=True, text=True, timeout=150,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    names = [e["event"] for e in events]
    for name in ("session_started", "broker_connected", "gps_fix", "match", "handshake",
                 "token_stored", "positives_polled", "exposure_alert"):
        assert name in names, f"{name} missing from the demo's events"
    assert names.index("token_stored") < names.index("exposure_alert")
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []          # the demo writes nothing where it runs
