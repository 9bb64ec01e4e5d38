"""fanny-sim's command line: arguments, one-line errors, JSON and the table."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from rich.console import Console

from fanny_tui import DISTRIBUTION
from fanny_tui.sim.cli import main, parse_sweep, results_table
from fanny_tui.sim.metrics import close_recall, evaluate
from fanny_tui.sim.runner import RunResult
from fanny_tui.sim.truth import TrueContact
from tests.helpers import TIME_UNIT


def test_parse_sweep():
    assert parse_sweep(["radius_m=10,15,25", "min_contact_s=0,60"]) == {
        "radius_m": [10.0, 15.0, 25.0], "min_contact_s": [0.0, 60.0]}
    assert parse_sweep([]) == {}
    assert parse_sweep(["rotation_interval_s=300,900"]) == {"rotation_interval_s": [300.0, 900.0]}


@pytest.mark.parametrize(("items", "message"), [
    (["radius_m"], "expected KEY=V1,V2"),
    (["radius=10"], "radius: not a setting"),
    (["radius_m=ten"], "radius_m: expected numbers"),
    (["radius_m=10", "radius_m=15"], "given twice"),
])
def test_bad_sweeps(items, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep(items)


@pytest.mark.parametrize(("args", "message"), [
    (["--sweep", "radius=10"], "fanny-sim: --sweep radius: not a setting"),
    (["--speed", "0"], "fanny-sim: --speed: expected a number > 0"),
    (["--sweep", "sigma_m=-2"], "noise.sigma_m"),
    (["--speed", "100"], "fanny-sim: --speed 100: max_speed_mps 30 x 100 = 3000 is out of"),
    (["--sweep", "max_speed_mps=2000"], "protocol.max_speed_mps"),
])
def test_bad_arguments_are_one_line_and_status_2(small_scenario, capsys, args, message):
    assert main([str(small_scenario), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_speed_too_fast_for_the_scenario_is_said_in_terms_of_speed(small_scenario, capsys):
    assert main([str(small_scenario), "--speed", "40"]) == 2
    err = capsys.readouterr().err
    assert err == ("fanny-sim: --speed 40: max_speed_mps 30 x 40 = 1200 is out of range "
                   "(expected a number > 0 and <= 1000); the fastest speed for these settings "
                   "is 33.3\n")


def test_a_closed_stdout_is_a_quiet_exit_141(small_scenario, tmp_path):
    # trial: `fanny-sim ... | head -1` ran the whole simulation, then rich exited 1
    status = tmp_path / "status.txt"
    fanny_sim = Path(sys.executable).parent / "fanny-sim"
    command = (f"{shlex.quote(str(fanny_sim))} {shlex.quote(str(small_scenario))} --speed 30 "
               f"| true; echo ${{PIPESTATUS[0]}} >{shlex.quote(str(status))}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            timeout=120 * TIME_UNIT)
    assert status.read_text().strip() == "141", result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert "run(s), real time" not in result.stderr   # nothing more after the closed pipe


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"fanny-sim {version(DISTRIBUTION)}\n"


def test_a_missing_scenario_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: file: expected a readable scenario TOML file" in capsys.readouterr().err


def _render(table: object, width: int = 80) -> str:
    console = Console(width=width, record=True)
    console.print(table)
    return console.export_text()


def test_the_table_shows_the_swept_settings_and_the_verdict():
    metrics_detected = {("a", "b"): 12.0, ("a", "c"): 3.0}
    metrics = evaluate([TrueContact("a", "b", 0.0, 400.0, 1.0)], metrics_detected)
    result = RunResult(scenario="street", settings={"min_contact_s": 60.0}, speed=10.0,
                       devices=3, radius_m=15.0, sigma_m=5.0, min_contact_s=60.0,
                       contacts=(), metrics=metrics, matches=2, failures={},
                       measured_contacts_s=(), late_fixes=0, real_s=12.5, cpu_s=2.5)
    text = _render(results_table([result], ["min_contact_s"]))
    assert "settings" in text and "precision" in text
    [run] = [line for line in text.splitlines() if "street" in line]
    assert "min_contact_s=60 radius_m=15 sigma_m=5" in run  # the swept setting first
    assert "12.5" in run and "20" in run                    # real s, CPU %
    [verdict] = [line for line in text.splitlines() if line.startswith("│ 1 ") and "0.50" in line]
    for cell in ("1", "2", "0.50", "1.00", "12/12"):
        assert f" {cell} " in verdict, (cell, verdict)
    assert "close" not in text  # no closer tier in any run: no column
    closer = dataclasses.replace(result, close=close_recall(
        3.0, [TrueContact("a", "b", 0.0, 400.0, 1.0), TrueContact("d", "e", 0.0, 400.0, 2.0)],
        metrics_detected))
    text = _render(results_table([closer, result], ["min_contact_s"]))
    rows = [line for line in text.splitlines() if "0.50" in line]
    assert "0.50 (1/2)" in rows[0] and "(1/2" not in rows[1]
    assert "close pairs (within 3 m" in " ".join(text.split())


def test_the_table_fits_80_columns():
    # trial: at 80 columns precision and recall were cut to "0.…"
    detected = {(f"d{i:03d}", f"d{i + 1:03d}"): 1234.0 for i in range(100)}
    truth = [TrueContact(f"d{i:03d}", f"d{i + 1:03d}", 0.0, 400.0, 1.0) for i in range(100)]
    metrics = evaluate(truth, detected)
    swept = {"min_contact_s": 120.0, "position_interval_s": 7.5, "sigma_m": 12.5,
             "outlier_rate": 0.05}
    result = RunResult(scenario="a-long-scenario-name-of-a-city-quarter", settings=swept,
                       speed=10.0, devices=200, radius_m=15.0, sigma_m=12.5,
                       min_contact_s=120.0, contacts=(), metrics=metrics, matches=2,
                       failures={}, measured_contacts_s=(), late_fixes=0, real_s=12345.6,
                       cpu_s=12345.6, close=close_recall(3.0, truth, detected))
    text = _render(results_table([result], list(swept)))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for cell in ("100", "1.00", "1.00 (100/100)", "1234/1234", "12345.6", "outlier_rate=0.05"):
        assert cell in text, (cell, text)


def test_json_output_of_a_real_run(small_scenario, capsys):
    status = main([str(small_scenario), "--json", "--speed", "20", "--sweep", "radius_m=10"])
    out, err = capsys.readouterr()
    assert status == 0, err
    [record] = json.loads(out)
    assert record["scenario"] == "small" and record["settings"] == {"radius_m": 10.0}
    assert record["speed"] == 20.0
    assert (record["precision"], record["recall"]) == (1.0, 1.0)
    assert "[1/1] small: 3 devices, 150 s at speed 20, radius_m=10" in err
    assert "real time" in err
    # one line per run: why the contacts closed, the rotations (none in 150 s), the failures
    line = next(line for line in err.splitlines() if "contacts closed:" in line)
    assert "ID rotations: none; handshake failures: none" in line, err
    assert [p["pair"] for p in record["pairs"]] == [["a", "b"]]
    assert record["rotations"] == {} and isinstance(record["closes"], dict)
    assert record["close"]["recall"] == 1.0  # the fixture's closer tier, 5 m
    assert "close recall 1.00 (1/1 within 5 m)" in err
