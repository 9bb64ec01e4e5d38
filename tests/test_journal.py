"""The run journal ([journal] path): what each event becomes, what is never written, failures.

Unit tests drive a :class:`~fanny_tui.journal.Journal` with events and a stepped clock; the end
to end test runs two real engines (real broker, real aiortc over loopback, real SQLite stores)
with a journal each, and searches both files for every session ID, contact ID, token and
position the way tests/test_privacy.py does, then reports over them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import stat
import struct
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.server import BrokerSettings, start_broker
from fanny_tui.cli import main
from fanny_tui.config import ConfigError, JournalConfig, parse_config
from fanny_tui.events import (
    BrokerConnected,
    BrokerDisconnected,
    ChannelOpen,
    Contact,
    ContactClosed,
    EngineError,
    Event,
    ExposureAlert,
    GpsFix,
    GpsLost,
    HandshakeFailed,
    HandshakeProgress,
    IdsRotated,
    MatchFound,
    PeerUpdate,
    PositiveDeclared,
    PositivePending,
    PositiveRefused,
    PositivesPolled,
    PositivesPollFailed,
    TokensExpired,
    TokenStored,
)
from fanny_tui.journal import Journal, check_path, token_digest

from .helpers import (
    LAT,
    LON,
    METRE_LAT,
    TIME_UNIT,
    MovableSource,
    device_config,
    fixed_at,
    running_device,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "5f" * 32
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _fix(accuracy_m: float | None = 4.0, **fields: Any) -> GpsFix:
    return GpsFix(latitude=LAT, longitude=LON, accuracy_m=accuracy_m, mode=3, **fields)


def test_the_journal_is_off_by_default_and_its_path_is_relative_to_the_config(tmp_path):
    assert parse_config({}).journal.path is None
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert parse_config(example).journal.path is None  # the example leaves it commented out
    config = parse_config({"journal": {"path": "j.jsonl"}}, base_dir=tmp_path)
    assert config.journal.path == tmp_path / "j.jsonl"
    with pytest.raises(ConfigError, match="journal.paht"):
        parse_config({"journal": {"paht": "j.jsonl"}})


def test_records_have_the_common_fields_and_the_file_is_0600(tmp_path):
    clock = Clock()
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, settings={"radius_m": 15.0, "min_contact_s": 0.0}, clock=clock)
    clock.advance(1.5)
    journal.handle(MatchFound(peer=1, role="initiator"))
    # flushed per line: readable before close
    assert [r["kind"] for r in _records(path)] == ["start", "match"]
    journal.close()
    journal.close()  # idempotent
    records = _records(path)
    assert [r["kind"] for r in records] == ["start", "match", "stop"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    labels = {r["device"] for r in records}
    assert len(labels) == 1 and labels.pop().startswith("dev-")
    assert all(r["v"] == 1 for r in records)
    assert records[1]["at"] == "2026-12-01T09:00:01.500Z"
    assert records[0]["radius_m"] == 15.0 and records[0]["gps_sample_s"] == 10.0
    assert records[1]["peer"] == 1 and records[1]["role"] == "initiator"


def test_a_reopened_journal_keeps_its_device_label_and_a_new_one_gets_another(tmp_path):
    first = Journal(tmp_path / "j.jsonl")
    first.close()
    again = Journal(tmp_path / "j.jsonl")
    again.close()
    other = Journal(tmp_path / "other.jsonl")
    other.close()
    assert first.device == again.device != other.device
    assert [r["kind"] for r in _records(tmp_path / "j.jsonl")] == ["start", "stop"] * 2


def test_witness_records_token_digest_latency_and_contact(tmp_path):
    clock = Clock()
    path = tmp_path / "j.jsonl"
    journal = Journal(path, clock=clock)
    journal.handle(MatchFound(peer=3, role="responder"))
    clock.advance(0.25)
    journal.handle(ChannelOpen(peer=3, local_candidate="host", remote_candidate="relay"))
    journal.handle(HandshakeProgress(peer=3, state="exchanging"))
    clock.advance(0.5)
    contact = Contact(duration_s=0.0, closest_m=2.5, median_m=2.5, samples=1)
    journal.handle(TokenStored(peer=3, token=TOKEN, expires_at=T0, contact=contact))
    journal.handle(PeerUpdate(peer=3, distance_m=4.25, bearing_deg=123.456, peer_accuracy_m=3.0,
                              within="in", within_s=12.0, samples=4))
    final = Contact(duration_s=95.5, closest_m=1.75, median_m=3.25, samples=20)
    journal.handle(ContactClosed(peer=3, reason="parted", contact=final, token_stored=True))
    journal.handle(MatchFound(peer=4, role="initiator"))
    journal.handle(TokenStored(peer=4, token="ab" * 32, expires_at=T0, match_to_token_s=7.5))
    journal.handle(HandshakeFailed(peer=5, reason="timeout"))
    journal.handle(ContactClosed(peer=6, reason="parted", token_stored=False,
                                 contact=Contact(10.0, 5.0, 6.0, 3)))
    journal.close()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for record in _records(path):
        by_kind.setdefault(record["kind"], []).append(record)
    assert "handshake" not in by_kind and "peer_update" not in by_kind
    assert by_kind["channel_open"][0]["local_candidate"] == "host"
    assert by_kind["channel_open"][0]["remote_candidate"] == "relay"
    digest = hashlib.sha256(("fanny-journal-v1:" + TOKEN).encode()).hexdigest()[:8]
    assert token_digest(TOKEN) == digest
    stored = by_kind["token"]
    assert stored[0]["digest"] == digest and stored[0]["new"] is True
    assert stored[0]["match_to_token_s"] == 0.75  # from the journal's own clock
    assert stored[0]["contact"] == {"duration_s": 0.0, "closest_m": 2.5, "median_m": 2.5,
                                    "samples": 1}
    assert stored[1]["match_to_token_s"] == 7.5  # the engine's figure wins
    contacts = by_kind["contact"]
    assert contacts[0]["digest"] == digest and contacts[0]["token_stored"] is True
    assert contacts[0]["contact"] == dataclasses.asdict(final)
    assert contacts[1]["digest"] is None and contacts[1]["token_stored"] is False
    assert [(r["peer"], r["reason"]) for r in by_kind["failure"]] == [(5, "timeout")]
    text = path.read_text()
    assert TOKEN not in text and "ab" * 16 not in text
    assert "123.456" not in text and "bearing" not in text


def test_gps_is_sampled_and_every_change_of_fix_state_is_written(tmp_path):
    clock = Clock()
    path = tmp_path / "j.jsonl"
    journal = Journal(path, clock=clock, gps_sample_s=10.0)
    for second in range(25):  # a fix a second: lines at 0, 10 and 20 s
        journal.handle(_fix(accuracy_m=3.0 + second, satellites_used=8, satellites_visible=11,
                            hdop=0.9, source="gpsd"))
        clock.advance(1)
    journal.handle(GpsLost(reason="no fix"))  # a change: written at once (25 s)
    clock.advance(1)
    journal.handle(GpsLost(reason="no fix"))  # same state within 10 s: not written
    clock.advance(1)
    journal.handle(_fix(accuracy_m=float("nan")))  # a change: written (27 s)
    journal.close()
    gps = [r for r in _records(path) if r["kind"] == "gps"]
    assert [(r["at"][17:23], r["fix"]) for r in gps] == [
        ("00.000", True), ("10.000", True), ("20.000", True), ("25.000", False),
        ("27.000", True)]
    assert {k: gps[1][k] for k in ("mode", "source", "satellites_used", "satellites_visible",
                                   "accuracy_m", "hdop")} == {
        "mode": 3, "source": "gpsd", "satellites_used": 8, "satellites_visible": 11,
        "accuracy_m": 13.0, "hdop": 0.9}
    assert gps[3]["reason"] == "no fix"
    assert gps[4]["accuracy_m"] is None  # NaN is not JSON
    assert "latitude" not in path.read_text() and f"{LAT:.4f}" not in path.read_text()


def test_broker_outage_is_one_start_and_one_end_with_its_length(tmp_path):
    clock = Clock()
    path = tmp_path / "j.jsonl"
    journal = Journal(path, clock=clock)
    journal.handle(BrokerConnected(url="ws://127.0.0.1:1", radius_m=15.0))
    clock.advance(5)
    journal.handle(BrokerDisconnected(reason="ConnectionClosedError: no close frame",
                                      retry_in_s=0.5))
    for _ in range(3):
        clock.advance(2)
        journal.handle(BrokerDisconnected(reason="ConnectionRefusedError", retry_in_s=1.0))
    clock.advance(1.5)
    journal.handle(BrokerConnected(url="ws://127.0.0.1:1", radius_m=15.0))
    journal.close()
    broker = [(r["kind"], {k: v for k, v in r.items() if k not in ("v", "at", "device", "kind")})
              for r in _records(path) if r["kind"].startswith("broker")]
    assert broker == [
        ("broker_up", {"outage_s": None, "failed_attempts": 0}),
        ("broker_down", {"reason": "ConnectionClosedError: no close frame"}),
        ("broker_up", {"outage_s": 7.5, "failed_attempts": 3})]


def test_polls_alerts_rotations_and_scrubbed_free_text(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    journal.handle(PositivesPolled(received=12, next_poll_in_s=300.0))
    journal.handle(ExposureAlert(count=2, contacts=(Contact(400.0, 1.0, 2.0, 80),),
                                 broker="health"))
    journal.handle(IdsRotated(reason="schedule"))
    session_id = "3f0e8d7a-1c2b-4d5e-8f9a-0b1c2d3e4f50"
    journal.handle(HandshakeFailed(peer=1, reason=f"error: bad peer {session_id}"))
    journal.handle(EngineError(message=f"store failed on token {TOKEN}"))
    journal.close()
    records = {r["kind"]: r for r in _records(path)}
    assert records["poll"]["received"] == 12 and records["poll"]["next_poll_in_s"] == 300.0
    assert records["poll"]["broker"] == "main"          # issue 8: which broker was polled
    assert records["alert"]["count"] == 2 and records["alert"]["broker"] == "health"
    assert records["alert"]["contacts"] == [{"duration_s": 400.0, "closest_m": 1.0,
                                             "median_m": 2.0, "samples": 80}]
    assert records["ids_rotated"]["reason"] == "schedule"
    assert records["failure"]["reason"] == "error: bad peer …"
    assert records["error"]["message"] == "store failed on token …"
    text = path.read_text()
    assert session_id not in text and session_id.replace("-", "") not in text
    assert TOKEN[:16] not in text


def test_failed_polls_declarations_and_expiry_are_records_with_scrubbed_reasons(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    uuid = "3f0e8d7a-1c2b-4d5e-8f9a-0b1c2d3e4f50"
    journal.handle(PositivesPollFailed(reason=f"refused {uuid}", since=T0, attempts=3,
                                       next_poll_in_s=60.0, broker="health"))
    journal.handle(PositivePending(count=4, reason="ConnectionRefusedError", retry_in_s=2.0))
    journal.handle(PositiveRefused(reason="code_expired", count=4, message="expired"))
    journal.handle(PositiveDeclared(count=4, broker="health"))
    journal.handle(TokensExpired(count=2))
    journal.close()
    fields = [{k: v for k, v in r.items() if k not in ("v", "at", "device")}
              for r in _records(path)[1:-1]]
    assert fields == [
        {"kind": "poll_failed", "reason": "refused …", "since": "2026-12-01T09:00:00.000Z",
         "attempts": 3, "broker": "health"},
        {"kind": "pending", "count": 4, "reason": "ConnectionRefusedError", "broker": "main"},
        {"kind": "refused", "count": 4, "reason": "code_expired", "broker": "main"},
        {"kind": "declared", "count": 4, "broker": "health"},
        {"kind": "expired", "count": 2}]


def test_an_unopenable_journal_is_one_error_event_and_never_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    errors: list[Event] = []
    journal = Journal(blocker / "journal.jsonl", on_error=errors.append)
    journal.handle(MatchFound(peer=1, role="initiator"))
    journal.close()
    assert journal.failed
    assert len(errors) == 1 and isinstance(errors[0], EngineError)
    message = errors[0].message
    assert "journal" in message and "journal.jsonl" in message and "\n" not in message
    assert "(Not a directory)" in message  # the problem, not mkdir's "File exists"


def test_a_missing_directory_is_not_created(tmp_path):
    errors: list[Event] = []
    journal = Journal(tmp_path / "no" / "such" / "journal.jsonl", on_error=errors.append)
    journal.close()
    assert journal.failed and not (tmp_path / "no").exists()
    assert "(No such file or directory)" in errors[0].message  # type: ignore[attr-defined]


def test_check_path_names_journal_path_and_what_is_wrong(tmp_path):
    (tmp_path / "file").write_text("")
    assert check_path(tmp_path / "journal.jsonl") is None
    assert check_path(tmp_path / "file") is None  # an existing journal: appended to
    assert check_path(tmp_path / "no" / "dir" / "j.jsonl") == (
        f"journal.path: the directory {tmp_path}/no/dir does not exist ({tmp_path}/no is "
        "missing); create it first or choose another path")
    assert check_path(tmp_path / "file" / "j.jsonl") == (
        f"journal.path: {tmp_path}/file is not a directory")
    assert check_path(tmp_path) == f"journal.path: {tmp_path} is a directory, not a file"
    assert not (tmp_path / "no").exists()


def test_a_file_that_is_not_a_journal_is_refused_and_left_intact(tmp_path):
    # trial: `[journal] path` set to the config file itself appended JSON lines to it
    config = tmp_path / "device.toml"
    config.write_text('[broker]\nurl = "ws://127.0.0.1:8765"\n')
    before = config.read_bytes()
    assert check_path(config) == (
        f"journal.path: {config} is not a journal (its first line is not a journal record): "
        "choose a new file")
    errors: list[Event] = []
    journal = Journal(config, on_error=errors.append)
    journal.handle(MatchFound(peer=1, role="initiator"))
    journal.close()
    assert journal.failed and config.read_bytes() == before
    assert len(errors) == 1 and "is not a journal" in errors[0].message  # type: ignore[attr-defined]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert check_path(empty) is None  # an empty file: nothing to damage


def test_check_path_opens_the_file_instead_of_asking_os_access(tmp_path):
    # os.access says yes to root for everything; opening tells the truth (here: a name longer
    # than the file system takes, in a writable directory)
    too_long = tmp_path / ("j" * 300)
    problem = check_path(too_long)
    assert problem is not None and problem.startswith(f"journal.path: {too_long} cannot be ")
    assert "File name too long" in problem and "\n" not in problem
    assert check_path(tmp_path / "new.jsonl") is None
    assert not (tmp_path / "new.jsonl").exists()  # the check creates nothing


def test_a_journal_file_is_held_by_one_device_at_a_time(tmp_path):
    # trial: two devices on one file shared one label; the report merged them as one device
    path = tmp_path / "j.jsonl"
    first = Journal(path)
    assert check_path(path) == (
        f"journal.path: {path}: in use by another running device (two devices must not share "
        "one journal: the report would count them as one); give each device its own "
        "journal.path")
    errors: list[Event] = []
    second = Journal(path, on_error=errors.append)
    second.handle(MatchFound(peer=1, role="initiator"))
    assert second.failed and len(errors) == 1
    assert "in use by another running device" in errors[0].message  # type: ignore[attr-defined]
    first.close()
    assert check_path(path) is None  # released at close
    assert [r["kind"] for r in _records(path)] == ["start", "stop"]


def test_a_journal_that_cannot_be_written_reports_once_and_stops(tmp_path):
    # Linux's /dev/full: every write fails with ENOSPC, as on a full disk
    errors: list[Event] = []
    journal = Journal(Path("/dev/full"), on_error=errors.append)
    for peer in range(5):
        journal.handle(MatchFound(peer=peer, role="initiator"))
    journal.close()
    assert journal.failed
    assert len(errors) == 1
    assert "No space left on device" in errors[0].message  # type: ignore[attr-defined]


async def test_an_engine_with_an_unwritable_journal_runs_on(tmp_path):
    (tmp_path / "file").write_text("")
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "b.db")
    async with start_broker(settings) as broker:
        config = dataclasses.replace(
            device_config(broker.url),
            journal=JournalConfig(path=tmp_path / "file" / "journal.jsonl"))
        async with running_device(config, tmp_path / "a", fixed_at(accuracy_m=3.0)) as a:
            await a.wait_event("broker_connected", timeout=10 * TIME_UNIT)
            await a.wait_event("gps_fix", timeout=10 * TIME_UNIT)
    errors = [e.message for e in a.of("error")]  # type: ignore[attr-defined]
    assert len(errors) == 1 and "journal.jsonl" in errors[0]


def _needles(secrets: list[str], tokens: list[str],
             positions: list[tuple[float, float]]) -> list[bytes]:
    """Every form a secret could take in a file (as tests/test_privacy.py searches)."""
    out: list[bytes] = []
    for value in secrets:
        out += [value.encode(), value.replace("-", "").encode(),
                bytes.fromhex(value.replace("-", ""))]
    for token in tokens:
        out += [token.encode(), token[:16].encode(), token[-16:].encode(),
                bytes.fromhex(token)]
    for lat, lon in positions:
        for value in (lat, lon):
            out += [f"{value:.5f}".encode(), f"{value:.4f}".encode(), repr(value).encode(),
                    struct.pack("<d", value), struct.pack(">d", value)]
    return out


FIELDS = {
    "start": {"radius_m", "min_contact_s", "position_interval_s", "contact_gap_s",
              "max_contact_s", "rotation_interval_s", "gps_source", "gps_sample_s"},
    "stop": set(), "session": set(), "ids_rotated": {"reason"},
    "broker_up": {"outage_s", "failed_attempts"}, "broker_down": {"reason"},
    "gps": {"fix", "mode", "source", "satellites_used", "satellites_visible", "accuracy_m",
            "hdop", "reason"},
    "match": {"peer", "role"}, "channel_open": {"peer", "local_candidate", "remote_candidate"},
    "token": {"peer", "new", "digest", "match_to_token_s", "contact"},
    "failure": {"peer", "reason"}, "contact": {"peer", "reason", "token_stored", "digest",
                                                "contact"},
    "poll": {"received", "next_poll_in_s", "broker"},
    "poll_failed": {"reason", "since", "attempts", "broker"},
    "alert": {"count", "contacts", "broker"}, "declared": {"count", "broker"},
    "pending": {"count", "reason", "broker"}, "refused": {"count", "reason", "broker"},
    "expired": {"count"}, "error": {"message"},
}
"""Every kind's fields besides ``v``, ``at``, ``device`` and ``kind``: the module docstring's
table (a field added to a record, e.g. a position or a bearing, fails the real run's test)."""

CONTACT_FIELDS = {"duration_s", "closest_m", "median_m", "samples"}


def test_the_documented_kinds_are_the_kinds_checked_here():
    import fanny_tui.journal as journal_module

    table = (journal_module.__doc__ or "").split("============== ", 3)[2]
    documented = {line.split()[0] for line in table.splitlines()[1:]
                  if line and not line.startswith(" ")}
    assert documented == set(FIELDS)


async def test_journals_of_a_real_run_hold_the_kinds_and_no_id_token_or_position(tmp_path,
                                                                                 capsys):
    """Two real engines meet 3 m apart, store a token after min_contact_s, part (B walks
    200 m away: the real contact_closed), then A declares positive and B is alerted."""
    lat_b, lat_away = LAT + 3 * METRE_LAT, LAT + 200 * METRE_LAT
    min_contact = 1.0 * TIME_UNIT
    # max_speed_mps is high: B moves 200 m at once (the jump rule: tests/test_contact.py and,
    # on the broker, tests/broker/test_state.py)
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "broker.db",
                              open_declarations=True, max_speed_mps=1000.0)
    journals = {name: tmp_path / f"journal-{name}.jsonl" for name in "ab"}
    async with start_broker(settings) as broker:
        base = device_config(broker.url, poll_interval_s=1.0, position_interval_s=0.2,
                             min_contact_s=min_contact, contact_gap_s=1.0 * TIME_UNIT,
                             max_speed_mps=1000.0)
        config_a = dataclasses.replace(base, journal=JournalConfig(path=journals["a"]))
        config_b = dataclasses.replace(base, journal=JournalConfig(path=journals["b"]))
        walker = MovableSource(lat_b, LON, 3.0)
        async with running_device(config_a, tmp_path / "a",
                                  fixed_at(0.0, accuracy_m=3.0, interval_s=0.1)) as a, \
                running_device(config_b, tmp_path / "b", walker) as b:
            stored_a = await a.wait_event("token_stored", timeout=30 * TIME_UNIT)
            stored_b = await b.wait_event("token_stored", timeout=30 * TIME_UNIT)
            walker.move_to(lat_away, LON)
            closed = [await d.wait_event("contact_closed", timeout=10 * TIME_UNIT)
                      for d in (a, b)]
            await a.engine.declare_positive()
            await a.wait_event("positive_declared", timeout=10 * TIME_UNIT)
            await b.wait_event("exposure_alert", timeout=10 * TIME_UNIT)
            secrets = [a.engine._session_id, a.engine._contact_id,
                       b.engine._session_id, b.engine._contact_id]
    token = stored_a.token  # type: ignore[attr-defined]
    assert token == stored_b.token  # type: ignore[attr-defined]
    assert all(c.token_stored for c in closed)  # type: ignore[attr-defined]
    bearings = [u.bearing_deg for d in (a, b) for u in d.of("peer_update")]  # type: ignore[attr-defined]
    assert bearings, "the real engines exchanged positions (peer_update with a bearing)"

    records = {name: _records(path) for name, path in journals.items()}
    kinds = {name: [r["kind"] for r in rs] for name, rs in records.items()}
    for name in "ab":
        assert kinds[name][0] == "start" and kinds[name][-1] == "stop"
        assert {"session", "broker_up", "gps", "match", "channel_open", "token", "contact",
                "poll"} <= set(kinds[name])
        for record in records[name]:
            assert set(record) - {"v", "at", "device", "kind"} <= FIELDS[record["kind"]], record
            for contact in [record.get("contact"), *record.get("contacts", [])]:
                assert contact is None or set(contact) == CONTACT_FIELDS, record
        [opened] = [r for r in records[name] if r["kind"] == "channel_open"]
        assert (opened["local_candidate"], opened["remote_candidate"]) == ("host", "host")
        [stored] = [r for r in records[name] if r["kind"] == "token"]
        assert stored["match_to_token_s"] >= min_contact
        assert stored["contact"]["duration_s"] >= min_contact
        [contact] = [r for r in records[name] if r["kind"] == "contact"]
        # the real close: the pair parted (or the peer closed first), after the token
        assert contact["reason"] in {"parted", "peer_closed"} and contact["token_stored"]
        assert contact["digest"] == stored["digest"] == token_digest(token)
        assert contact["peer"] == stored["peer"]
        assert 2.5 < contact["contact"]["closest_m"] < 3.5
    assert "declared" in kinds["a"] and "alert" in kinds["b"]
    assert "ids_rotated" in kinds["a"]  # at once after a positive declaration
    for path in journals.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        data = path.read_bytes()
        for needle in _needles(secrets, [token], [(LAT, LON), (lat_b, LON), (lat_away, LON)]):
            assert needle not in data, f"{needle!r} found in {path.name}"
        assert b"bearing" not in data and b"latitude" not in data

    capsys.readouterr()
    assert main(["report", "--json", str(journals["a"]), str(journals["b"])]) == 0
    report = json.loads(capsys.readouterr().out)
    every = [r for rs in records.values() for r in rs]
    assert len(report["devices"]) == 2
    assert report["matches"] == sum(1 for r in every if r["kind"] == "match") == 2
    assert report["handshakes"]["stored"] == 2 and report["handshakes"]["success_rate"] == 1.0
    assert min_contact <= report["match_to_token_s"]["p50"] < 30 * TIME_UNIT
    assert report["pairing"] == {"both": 1, "one": 0, "without_token": 0}
    [row] = report["contact_list"]
    assert row["digest"] == token_digest(token) and len(row["sides"]) == 2
    assert sorted(row["devices"]) == sorted({r["device"] for r in every})
    assert row["duration_s"] >= min_contact and 2.5 < row["closest_m"] < 3.5
    assert report["alerts"] == 1 and report["ice_candidates"] == {"host/host": 2}
    assert all(d["no_fix_fraction"] < 1 for d in report["devices"])


def test_memory_of_peers_is_bounded(tmp_path):
    clock = Clock()
    path = tmp_path / "j.jsonl"
    journal = Journal(path, clock=clock)
    for peer in range(1, 301):  # matches that never finish
        journal.handle(MatchFound(peer=peer, role="initiator"))
    clock.advance(2)
    journal.handle(TokenStored(peer=1, token=TOKEN, expires_at=T0))    # forgotten: no latency
    journal.handle(TokenStored(peer=300, token=TOKEN, expires_at=T0))  # remembered
    journal.close()
    tokens = [r for r in _records(path) if r["kind"] == "token"]
    assert [(r["peer"], r["match_to_token_s"]) for r in tokens] == [(1, None), (300, 2.0)]
