"""benchmarks/run: names, the table, --json (no timing is checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import BENCHMARKS, main, table
from benchmarks.common import Figure

ROOT = Path(__file__).resolve().parents[2]


def test_table_has_one_row_per_figure():
    text = table([Figure("bytes_per_token", 113.0, 32.0, "B", 1000),
                  Figure("alert_p95_s", 120.0, None, "s", 10)])
    lines = text.splitlines()
    assert lines[0].split() == ["figure", "value", "floor", "ratio", "n", "unit"]
    assert lines[2].split() == ["bytes_per_token", "113", "32", "3.53", "1000", "B"]
    assert lines[3].split() == ["alert_p95_s", "120", "-", "-", "10", "s"]


def test_every_benchmark_is_a_module_with_run():
    for name in BENCHMARKS:
        module = __import__(f"benchmarks.{name}", fromlist=["run"])
        assert callable(module.run), name


def test_unknown_name_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nonsense"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown benchmark 'nonsense'" in err and "positives" in err


def test_quick_positives_writes_json(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "positives", "--quick",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    figures = report["figures"]
    assert {"bytes_per_token", "catchup_s", "catchup_polls", "check_s"} <= set(figures)
    for figure in figures.values():
        assert set(figure) >= {"value", "floor", "ratio", "n", "unit"}
    # every published token arrived and the exposure was found (the harness works)
    assert figures["bytes_per_token"]["n"] == 5000
    assert "WRONG" not in figures["check_s"]["note"]
    assert report["failed"] == []
    assert "bytes_per_token" in done.stdout
