"""``fanny-tui report``: counts over journals of known content, the --json schema, bad input.

The journals here are written line by line as JSON (not by fanny_tui.journal), so that every
expected figure can be worked out by hand from the records below. tests/test_journal.py reports
over the journals of a real two-device run.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fanny_tui.cli import main
from fanny_tui.report import histogram, percentile

from .helpers import TIME_UNIT

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
A, B = "dev-aaaaaa", "dev-bbbbbb"
BIN = Path(sys.executable).parent


def _line(device: str, at_s: float, kind: str, **fields: Any) -> str:
    at = (T0 + timedelta(seconds=at_s)).isoformat(timespec="milliseconds")
    return json.dumps({"v": 1, "at": at.replace("+00:00", "Z"), "device": device, "kind": kind,
                       **fields})


def _contact(duration_s: float, closest_m: float | None, median_m: float | None,
             samples: int) -> dict[str, Any]:
    return {"duration_s": duration_s, "closest_m": closest_m, "median_m": median_m,
            "samples": samples}


def _gps(device: str, at_s: float, accuracy_m: float | None) -> str:
    if accuracy_m is None:
        return _line(device, at_s, "gps", fix=False, reason="no fix")
    return _line(device, at_s, "gps", fix=True, mode=3, source="gpsd", satellites_used=8,
                 satellites_visible=12, accuracy_m=accuracy_m, hdop=1.0)


def _start(device: str, at_s: float) -> str:
    return _line(device, at_s, "start", radius_m=15.0, min_contact_s=0.0,
                 position_interval_s=5.0, gps_source="gpsd", gps_sample_s=10.0)


def _token(device: str, at_s: float, peer: int, digest: str, latency: float | None,
           contact: dict[str, Any] | None) -> str:
    return _line(device, at_s, "token", peer=peer, new=True, digest=digest,
                 match_to_token_s=latency, contact=contact)


JOURNAL_A = [
    _start(A, 0), _line(A, 0, "session"),
    _gps(A, 10, 3.0), _gps(A, 20, 6.0),
    _line(A, 30, "match", peer=1, role="initiator"),
    _line(A, 30.5, "channel_open", peer=1, local_candidate="host", remote_candidate="host"),
    _token(A, 31, 1, "11111111", 1.0, _contact(5.0, 2.0, 3.0, 4)),
    _line(A, 40, "match", peer=2, role="responder"),
    _line(A, 45, "failure", peer=2, reason="timeout"),
    _line(A, 50, "match", peer=3, role="initiator"),
    _token(A, 51, 3, "33333333", 2.0, None),
    _gps(A, 60, None),
    _gps(A, 90, 12.0),
    _line(A, 100, "contact", peer=1, reason="parted", token_stored=True, digest="11111111",
          contact=_contact(60.0, 1.5, 2.5, 12)),
    _line(A, 110, "broker_down", reason="ConnectionRefusedError"),
    _line(A, 130, "broker_up", outage_s=20.0, failed_attempts=2),
    _line(A, 140, "match", peer=4, role="responder"),
    _line(A, 150, "contact", peer=4, reason="parted", token_stored=False, digest=None,
          contact=_contact(20.0, 8.0, 9.0, 4)),
    _line(A, 160, "match", peer=5, role="initiator"),
    _line(A, 170, "poll", received=3, next_poll_in_s=300.0),
    _line(A, 180, "alert", count=1, contacts=[_contact(60.0, 1.5, 2.5, 12)]),
    _line(A, 185, "ids_rotated", reason="declared"),
    _line(A, 190, "some_future_kind", anything=1),
    _line(A, 200, "stop"),
]
"""Device A, one run of 200 s: without a fix 0-10 s and 60-90 s (40 s, one loss); accuracy
3, 6, 12 m; matches 1 stored, 2 failed, 3 stored, 4 closed without token, 5 unfinished;
latencies 1 and 2 s; one outage of 20 s."""

JOURNAL_B = [
    _start(B, 0), _gps(B, 5, 4.0),
    _line(B, 30, "match", peer=1, role="responder"),
    _line(B, 31, "channel_open", peer=1, local_candidate="srflx", remote_candidate=None),
    _token(B, 32, 1, "11111111", 3.0, _contact(30.0, 4.0, 5.0, 6)),
    _line(B, 40, "match", peer=2, role="initiator"),
    _line(B, 41, "failure", peer=2, reason="ice_failed"),
    _line(B, 50, "stop"),
    _start(B, 100), _gps(B, 120, 50.0),
    _line(B, 130, "match", peer=1, role="initiator"),
    _token(B, 131, 1, "77777777", 5.0, None),
    _line(B, 150, "stop"),
]
"""Device B, two runs (50 s each): without a fix 0-5 s and 100-120 s (25 s, no loss); accuracy
4 and 50 m; matches: run 1 peer 1 stored (the token A stored as its peer 1) and peer 2 failed,
run 2 peer 1 stored; latencies 3 and 5 s."""


def _write(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _report(capsys, *args: str) -> tuple[int, dict[str, Any], str]:
    capsys.readouterr()
    code = main(["report", "--json", *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out else {}, captured.err


def test_percentile_is_nearest_rank_and_histogram_bins_are_half_open():
    values = [float(v) for v in range(20, 0, -1)]
    assert [percentile(values, p) for p in (50, 90, 95, 100)] == [10.0, 18.0, 19.0, 20.0]
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    bins = histogram([0.0, 1.999, 2.0, 4.0, 100.0], (0.0, 2.0, 5.0))
    assert bins == [{"low": 0.0, "high": 2.0, "count": 2}, {"low": 2.0, "high": 5.0, "count": 2},
                    {"low": 5.0, "high": None, "count": 1}]


def test_report_over_two_journals_gives_the_counts_worked_out_by_hand(tmp_path, capsys):
    a = _write(tmp_path, "a.jsonl", JOURNAL_A)
    b = _write(tmp_path, "b.jsonl", JOURNAL_B)
    code, report, err = _report(capsys, a, b)
    assert code == 0 and err == ""
    assert report["inputs"] == [
        {"file": a, "records": len(JOURNAL_A), "skipped": 0, "error": None, "devices": [A]},
        {"file": b, "records": len(JOURNAL_B), "skipped": 0, "error": None, "devices": [B]}]
    assert report["warnings"] == []
    assert report["matches"] == 8
    assert report["handshakes"] == {"stored": 4, "failed": 2, "no_token": 1, "unfinished": 1,
                                    "success_rate": pytest.approx(4 / 6)}
    latency = report["match_to_token_s"]
    assert (latency["count"], latency["p50"], latency["p90"], latency["p95"],
            latency["max"]) == (4, 2.0, 5.0, 5.0, 5.0)
    assert report["failure_reasons"] == {"timeout": 1, "ice_failed": 1}
    assert report["ice_candidates"] == {"host/host": 1, "srflx/?": 1}
    contacts = report["contacts"]
    assert contacts["count"] == 3  # A#1 (its contact record), A#4, B#1 (its token record)
    assert (contacts["duration_s"]["p50"], contacts["duration_s"]["max"]) == (30.0, 60.0)
    assert [b["count"] for b in contacts["duration_s"]["histogram"]] == [0, 1, 1, 1, 0, 0, 0]
    assert (contacts["closest_m"]["p50"], contacts["closest_m"]["max"]) == (4.0, 8.0)
    assert (contacts["median_m"]["p50"], contacts["median_m"]["max"]) == (5.0, 9.0)
    assert report["pairing"] == {"both": 1, "one": 2, "without_token": 1}
    assert [b["count"] for b in report["accuracy_m"]["histogram"]] == [0, 2, 1, 1, 0, 1, 0]
    assert (report["polls"], report["alerts"], report["outages"], report["ids_rotated"]) == (
        1, 1, 1, 1)
    dev_a, dev_b = report["devices"]
    assert dev_a["device"] == A and dev_b["device"] == B
    assert (dev_a["runs"], dev_a["observed_s"], dev_a["no_fix_s"], dev_a["fix_losses"]) == (
        1, 200.0, 40.0, 1)
    assert dev_a["no_fix_fraction"] == 0.2
    assert (dev_a["outages"], dev_a["outage_s"]) == (1, 20.0)
    assert (dev_a["matches"], dev_a["tokens"], dev_a["failures"]) == (5, 2, 1)
    assert dev_a["exposed_contacts"] == 1 and dev_a["settings"]["radius_m"] == 15.0
    assert dev_a["accuracy_m"]["max"] == 12.0
    assert (dev_b["runs"], dev_b["observed_s"], dev_b["no_fix_s"], dev_b["fix_losses"]) == (
        2, 100.0, 25.0, 0)
    assert (dev_b["matches"], dev_b["tokens"], dev_b["failures"]) == (3, 2, 1)
    assert (dev_a["files"], dev_a["gps_sources"], dev_a["gps_receiver"]) == ([a], ["gpsd"], True)


def _side(device: str, file: str, run: int, peer: int, matched_s: float, closed_s: float | None,
          contact: dict[str, Any] | None, latency: float | None) -> dict[str, Any]:
    return {"device": device, "file": file, "run": run, "peer": peer,
            "matched_at": _at(matched_s), "closed_at": _at(closed_s),
            **(contact and {k: contact[k] for k in ("duration_s", "closest_m", "median_m")}
               or {"duration_s": None, "closest_m": None, "median_m": None}),
            "match_to_token_s": latency}


def _at(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return (T0 + timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def test_every_contact_is_listed_with_both_devices_paired_by_digest(tmp_path, capsys):
    a = _write(tmp_path, "a.jsonl", JOURNAL_A)
    b = _write(tmp_path, "b.jsonl", JOURNAL_B)
    code, report, _ = _report(capsys, a, b)
    assert code == 0
    assert report["contact_list"] == [
        {"digest": "11111111", "devices": [A, B], "start": _at(30), "end": _at(100),
         "duration_s": 60.0, "closest_m": 1.5, "median_m": 3.75, "match_to_token_s": 3.0,
         "sides": [_side(A, a, 0, 1, 30, 100, _contact(60.0, 1.5, 2.5, 12), 1.0),
                   _side(B, b, 0, 1, 30, None, _contact(30.0, 4.0, 5.0, 6), 3.0)]},
        {"digest": "33333333", "devices": [A], "start": _at(50), "end": None,
         "duration_s": None, "closest_m": None, "median_m": None, "match_to_token_s": 2.0,
         "sides": [_side(A, a, 0, 3, 50, None, None, 2.0)]},
        {"digest": "77777777", "devices": [B], "start": _at(130), "end": None,
         "duration_s": None, "closest_m": None, "median_m": None, "match_to_token_s": 5.0,
         "sides": [_side(B, b, 1, 1, 130, None, None, 5.0)]},
        {"digest": None, "devices": [A], "start": _at(140), "end": _at(150),
         "duration_s": 20.0, "closest_m": 8.0, "median_m": 9.0, "match_to_token_s": None,
         "sides": [_side(A, a, 0, 4, 140, 150, _contact(20.0, 8.0, 9.0, 4), None)]}]


def test_repeated_meetings_under_one_token_are_paired_in_time_order(tmp_path, capsys):
    def meeting(device: str, at_s: float, peer: int, duration_s: float) -> list[str]:
        return [_line(device, at_s, "match", peer=peer, role="initiator"),
                _token(device, at_s + 1, peer, "abababab", 1.0, None),
                _line(device, at_s + duration_s, "contact", peer=peer, reason="parted",
                      token_stored=True, digest="abababab",
                      contact=_contact(duration_s, 1.0, 2.0, 3))]
    a = _write(tmp_path, "a.jsonl", [_start(A, 0), *meeting(A, 10, 1, 20),
                                     *meeting(A, 100, 2, 40)])
    b = _write(tmp_path, "b.jsonl", [_start(B, 0), *meeting(B, 101, 7, 30),
                                     *meeting(B, 11, 6, 10)])
    code, report, _ = _report(capsys, a, b)
    assert code == 0
    listed = [(c["start"], c["end"], c["duration_s"], [(s["device"], s["peer"])
                                                      for s in c["sides"]])
              for c in report["contact_list"]]
    assert listed == [(_at(10), _at(30), 20.0, [(A, 1), (B, 6)]),
                      (_at(100), _at(140), 40.0, [(A, 2), (B, 7)])]


def test_a_journal_given_twice_is_read_once_with_one_line_each(tmp_path, capsys):
    a = _write(tmp_path, "a.jsonl", JOURNAL_A)
    copy = _write(tmp_path, "copy-of-a.jsonl", JOURNAL_A)
    code, once, err = _report(capsys, a)
    assert code == 0 and err == ""
    code, twice, err = _report(capsys, a, f"{tmp_path}/./a.jsonl", copy)
    assert code == 0
    assert err.splitlines() == [
        f"fanny-tui report: {tmp_path}/./a.jsonl: the same file as {a}, given twice; read once",
        f"fanny-tui report: {copy}: the run of {A} from {_at(0)} is also in {a} (the same "
        "journal given twice?); counted once"]
    assert [i["file"] for i in twice["inputs"]] == [a, copy]
    for key in ("matches", "handshakes", "contacts", "pairing", "contact_list", "polls"):
        assert twice[key] == once[key], key
    assert twice["devices"][0]["runs"] == 1 and twice["devices"][0]["files"] == [a, copy]


def test_a_device_without_a_gps_receiver_is_flagged(tmp_path, capsys):
    fixed = [_line(B, 0, "start", radius_m=15.0, min_contact_s=0.0, gps_source="fixed"),
             _line(B, 5, "gps", fix=True, mode=3, source="fixed", satellites_used=0,
                   satellites_visible=0, accuracy_m=5.0, hdop=None),
             _line(B, 50, "stop")]
    a = _write(tmp_path, "a.jsonl", JOURNAL_A)
    b = _write(tmp_path, "b.jsonl", fixed)
    code, report, err = _report(capsys, a, b)
    assert code == 0
    warning = (f"{B}: GPS source fixed, not a receiver: its fix and accuracy figures do not "
               "measure GPS in the field")
    assert err == f"fanny-tui report: {warning}\n" and report["warnings"] == [warning]
    dev_a, dev_b = report["devices"]
    assert dev_a["gps_receiver"] is True
    assert (dev_b["gps_sources"], dev_b["gps_receiver"]) == (["fixed"], False)
    capsys.readouterr()
    assert main(["report", a, b]) == 0
    out = capsys.readouterr().out
    assert f"{B} *" in out and f"* GPS source not a receiver ({B}: fixed)" in out


def test_devices_that_ran_with_different_settings_are_shown_and_warned_about(tmp_path, capsys):
    # trial: devices with different radius_m / min_contact_s were merged without a word
    other = [_line(B, 0, "start", radius_m=10.0, min_contact_s=60.0, position_interval_s=5.0,
                   gps_source="gpsd", gps_sample_s=10.0), _line(B, 50, "stop")]
    a = _write(tmp_path, "a.jsonl", JOURNAL_A)
    b = _write(tmp_path, "b.jsonl", other)
    code, report, err = _report(capsys, a, b)
    assert code == 0
    warning = (f"the devices ran with different settings (radius_m 15 ({A}), 10 ({B}); "
               f"min_contact_s 0 ({A}), 60 ({B})): their figures are merged as if they had not")
    assert err == f"fanny-tui report: {warning}\n" and report["warnings"] == [warning]
    assert report["settings"][:3] == [
        {"setting": "radius_m", "values": [{"value": 15.0, "devices": [A]},
                                           {"value": 10.0, "devices": [B]}]},
        {"setting": "min_contact_s", "values": [{"value": 0.0, "devices": [A]},
                                                {"value": 60.0, "devices": [B]}]},
        {"setting": "position_interval_s", "values": [{"value": 5.0, "devices": [A, B]}]}]
    capsys.readouterr()
    assert main(["report", a, b]) == 0
    out = capsys.readouterr().out
    assert "Settings (start records)" in out and "radius_m ≠" in out
    assert f"15: {A}" in out and f"10: {B}" in out and "≠ differs between devices" in out
    assert any(line.split() == ["position_interval_s", "5"] for line in out.splitlines())
    assert max(len(line) for line in out.splitlines()) <= 80
    # the same settings (the second file's device another run of the first's): no warning
    capsys.readouterr()
    assert main(["report", a, _write(tmp_path, "b2.jsonl", JOURNAL_B)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "≠" not in captured.out and "radius_m" in captured.out


def test_a_long_report_piped_into_head_exits_quietly(tmp_path):
    # trial: `fanny-tui report ... | head -2` exited 1 (rich's SystemExit on a broken pipe)
    lines = [_start(A, 0)]
    for peer in range(1, 2001):             # 2000 contact rows: far over a pipe's buffer
        lines.append(_token(A, peer, peer, f"{peer:08x}", 1.0, _contact(30.0, 2.0, 3.0, 6)))
    journal = _write(tmp_path, "a.jsonl", lines)
    status = tmp_path / "status.txt"
    command = (f"{shlex.quote(str(BIN / 'fanny-tui'))} report {shlex.quote(journal)} "
               f"| head -n 2; echo ${{PIPESTATUS[0]}} >{shlex.quote(str(status))}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            timeout=60 * TIME_UNIT)
    assert result.stdout.startswith("Journals")
    assert status.read_text().strip() == "141"
    assert result.stderr == ""


def test_an_empty_journal_is_a_note_on_stderr(tmp_path, capsys):
    a = _write(tmp_path, "a.jsonl", JOURNAL_A)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, report, err = _report(capsys, a, str(empty))
    assert code == 0 and report["inputs"][1]["records"] == 0
    assert err == (f"fanny-tui report: {empty}: empty, no journal record (did the device run "
                   "with this [journal] path?)\n")


def test_contact_distances_are_rounded_alike_and_matches_say_whose(tmp_path, capsys):
    lines = [_start(A, 0), _line(A, 1, "match", peer=1, role="initiator"),
             _token(A, 2, 1, "12345678", 1.0, _contact(30.0, 1.23456789, 2.3456789, 6))]
    journal = _write(tmp_path, "a.jsonl", lines)
    code, report, _ = _report(capsys, journal)
    [contact] = report["contact_list"]
    assert (contact["closest_m"], contact["median_m"]) == (1.235, 2.346)
    assert (contact["sides"][0]["closest_m"], contact["sides"][0]["median_m"]) == (1.235, 2.346)
    capsys.readouterr()
    assert main(["report", journal]) == 0
    assert "matches (each device counts its own)" in capsys.readouterr().out


def test_a_device_never_stopped_is_measured_to_its_last_record(tmp_path, capsys):
    lines = [_start(A, 0), _gps(A, 10, 3.0), _gps(A, 20, None), _line(A, 25, "broker_down",
                                                                      reason="x"),
             _line(A, 40, "poll", received=0, next_poll_in_s=None)]
    code, report, _ = _report(capsys, _write(tmp_path, "a.jsonl", lines))
    assert code == 0
    device = report["devices"][0]
    assert (device["observed_s"], device["no_fix_s"], device["outage_s"]) == (40.0, 30.0, 15.0)


def test_json_schema(tmp_path, capsys):
    code, report, _ = _report(capsys, _write(tmp_path, "a.jsonl", JOURNAL_A))
    assert code == 0
    assert set(report) == {"v", "inputs", "devices", "matches", "handshakes", "match_to_token_s",
                           "failure_reasons", "ice_candidates", "contacts", "pairing",
                           "accuracy_m", "polls", "alerts", "outages", "ids_rotated",
                           "contact_list", "settings", "warnings"}
    assert report["v"] == 1
    assert set(report["inputs"][0]) == {"file", "records", "skipped", "error", "devices"}
    assert set(report["devices"][0]) == {
        "device", "files", "gps_sources", "gps_receiver", "runs", "observed_s", "matches",
        "tokens", "failures", "no_fix_s",
        "no_fix_fraction", "fix_losses", "accuracy_m", "outages", "outage_s", "polls", "alerts",
        "exposed_contacts", "ids_rotated", "errors", "settings"}
    assert set(report["handshakes"]) == {"stored", "failed", "no_token", "unfinished",
                                         "success_rate"}
    assert set(report["contacts"]) == {"count", "duration_s", "closest_m", "median_m"}
    assert set(report["pairing"]) == {"both", "one", "without_token"}
    assert report["settings"][0] == {"setting": "radius_m",
                                     "values": [{"value": 15.0, "devices": [A]}]}
    for contact in report["contact_list"]:
        assert set(contact) == {"digest", "devices", "start", "end", "duration_s", "closest_m",
                                "median_m", "match_to_token_s", "sides"}
        assert all(set(side) == {"device", "file", "run", "peer", "matched_at", "closed_at",
                                 "duration_s", "closest_m", "median_m", "match_to_token_s"}
                   for side in contact["sides"])
    dists = [report["match_to_token_s"], report["accuracy_m"], report["devices"][0]["accuracy_m"],
             *(report["contacts"][k] for k in ("duration_s", "closest_m", "median_m"))]
    for dist in dists:
        assert set(dist) == {"count", "p50", "p90", "p95", "max", "histogram"}
        assert sum(b["count"] for b in dist["histogram"]) == dist["count"]
        assert all(set(b) == {"low", "high", "count"} for b in dist["histogram"])
        assert dist["histogram"][-1]["high"] is None


def test_bad_lines_are_named_by_file_and_line_counted_and_skipped(tmp_path, capsys):
    lines = list(JOURNAL_A)
    lines.insert(2, "{not json")
    lines.insert(5, json.dumps({"v": 2, "at": "2026-12-01T09:00:00Z", "device": A,
                                "kind": "stop"}))
    lines.insert(7, _line(A, 30, "token", peer=9, new=True, digest=5, match_to_token_s=1.0,
                          contact=None))
    lines.insert(8, "")
    lines.insert(9, _line(A, 30, "match", role="initiator"))
    a = _write(tmp_path, "a.jsonl", lines)
    b = _write(tmp_path, "b.jsonl", JOURNAL_B)
    code, report, err = _report(capsys, a, b)
    assert code == 1
    assert err.splitlines() == [
        f"fanny-tui report: {a}:3: not JSON (Expecting property name enclosed in double quotes)"
        "; line skipped",
        f"fanny-tui report: {a}:6: v: expected 1, got 2; line skipped",
        f"fanny-tui report: {a}:8: token.digest: expected a string, got 5; line skipped",
        f"fanny-tui report: {a}:10: match.peer: missing; line skipped"]
    assert report["inputs"][0]["skipped"] == 4
    assert report["inputs"][0]["records"] == len(JOURNAL_A)
    assert report["matches"] == 8 and report["handshakes"]["stored"] == 4  # as without them


def test_a_missing_file_is_one_line_and_the_others_are_reported(tmp_path, capsys):
    missing = str(tmp_path / "nowhere.jsonl")
    code, report, err = _report(capsys, missing, _write(tmp_path, "b.jsonl", JOURNAL_B))
    assert code == 1
    assert err == f"fanny-tui report: {missing}: cannot read (No such file or directory)\n"
    assert report["inputs"][0] == {"file": missing, "records": 0, "skipped": 0,
                                   "error": "No such file or directory", "devices": []}
    assert report["matches"] == 3


def test_nothing_readable_is_exit_2(tmp_path, capsys):
    junk = _write(tmp_path, "junk.jsonl", ["junk"] * 25)
    code, report, err = _report(capsys, junk, str(tmp_path / "nowhere"))
    assert code == 2 and report == {}
    assert err.splitlines()[-1] == "fanny-tui report: no journal record could be read"


def test_many_bad_lines_in_a_journal_are_capped(tmp_path, capsys):
    journal = _write(tmp_path, "a.jsonl", [_start(A, 0), *["junk"] * 25])
    code, report, err = _report(capsys, journal)
    assert code == 1 and report["inputs"][0]["skipped"] == 25
    lines = err.splitlines()
    assert len(lines) == 20 + 1
    assert lines[0] == f"fanny-tui report: {journal}:2: not JSON (Expecting value); line skipped"
    assert lines[20] == f"fanny-tui report: {journal}: 5 more bad lines skipped"


@pytest.mark.parametrize("first", ["[device]", "SQLite format 3\x00", json.dumps({"v": 1})])
def test_a_file_that_is_not_a_journal_is_one_line_and_skipped(tmp_path, capsys, first):
    other = _write(tmp_path, "a.toml", ["", first, *["junk"] * 25, *JOURNAL_A])
    b = _write(tmp_path, "b.jsonl", JOURNAL_B)
    code, report, err = _report(capsys, other, b)
    assert code == 1
    assert err == (f"fanny-tui report: {other} is not a journal (its first line is not a "
                   f"journal record); file skipped\n")
    assert report["inputs"][0] == {"file": other, "records": 0, "skipped": 0,
                                   "error": "not a journal", "devices": []}
    assert report["matches"] == 3


def test_a_database_is_not_a_journal(tmp_path, capsys):
    database = tmp_path / "tokens.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("CREATE TABLE t (x BLOB)")
        db.executemany("INSERT INTO t VALUES (?)", [(b"\n\xff junk\n" * 50,)] * 50)
    code, _, err = _report(capsys, str(database))
    assert code == 2
    assert err.splitlines() == [
        f"fanny-tui report: {database} is not a journal (its first line is not a journal "
        f"record); file skipped", "fanny-tui report: no journal record could be read"]


def test_tables_and_histograms_on_the_terminal(tmp_path, capsys):
    a = _write(tmp_path, "a.jsonl", JOURNAL_A)
    b = _write(tmp_path, "b.jsonl", JOURNAL_B)
    capsys.readouterr()
    assert main(["report", a, b]) == 0
    out = capsys.readouterr().out
    for text in ("Devices: witness exchanges", "Devices: GPS and broker", A, B,
                 "handshake success rate", "66.7%", "2.00 / 5.00 / 5.00 / 5.00 s",
                 "Failure reasons", "ice_failed", "Contact duration", "GPS accuracy",
                 "40.0 s (20%)", "1 (20.0 s)", "1 / 2",
                 "Contacts (start in UTC, 2026-12-01)", f"{A} + {B}", "09:00:30", "1m00s",
                 "1.5 m", "3.8 m", "3.00 s", f"{A} only", f"{B} only", f"{A} (no token)"):
        assert text in out, text
    assert "█" * 30 in out  # the largest bin of a histogram is a full bar
    assert "1–2 s" in out and "0–0.1 s" not in out and "≥ 900 s" not in out  # empty ends cut
    assert max(len(line) for line in out.splitlines()) <= 80  # a Pi console
