"""``fanny-tui report JOURNAL...``: one report over several devices' run journals.

Reads the JSON-lines journals that :mod:`fanny_tui.journal` writes (one per device, ``[journal]
path``) and merges them: matches, handshake outcomes and success rate, match-to-token latency
percentiles, failure reasons, ICE candidate types, contact durations and distances, contacts seen
by both devices (paired by token digest) or by one, time without a GPS fix per device, GPS
accuracy distribution, broker outages, polls and alerts. Printed as rich tables with terminal
histograms, or with ``--json`` as one JSON object.

Bad input never stops the report: a missing or unreadable file, or a file whose first line is not
a journal record (a config file, a database: not a journal at all), is one line on stderr naming
the file, and the file is skipped; a later line that is not a journal record (not JSON, missing
``v``/``at``/``device``/``kind``, a field of the wrong type) is one line on stderr naming the
file and line number (at most 20 per file, then their count), and is skipped and counted.
Records of an unknown ``kind`` are ignored (a later journal version may add kinds). Exit code:
0 when every line was read, 1 when the report was made but some input was skipped, 2 when
nothing was readable.

Handshake outcome of each ``match`` (per device, run and peer): ``stored`` (a ``token`` record
followed), ``failed`` (a ``failure``), ``no_token`` (the contact closed without a token and
without a failure: the pair parted before ``min_contact_s``) or ``unfinished`` (none of them
before the run ended). The success rate is stored / (stored + failed). Percentiles are
nearest-rank (p-th: the smallest value with at least p % of the values at or below it).

A device is without a fix from the start of each run until its first ``gps`` record with a fix,
and from each ``gps`` record without a fix until the next with one; a run ends at its ``stop``
record (else at its last record). A contact is measured by its ``contact`` record (else by the
``contact`` of its ``token`` record); it is seen by ``both`` devices when its token digest
appears in the journals of two or more devices, by ``one`` when in one device's only.

Every contact is also listed (``contact_list``), to be compared with a field test's ground truth:
the sides (one per device's witness exchange: its ``match``, ``token`` and ``contact`` records)
with the same token digest are one contact, paired in time order when a device has several (a
repeated meeting under the same token); a side without a token is a contact of its own. A
contact's ``start`` is its earliest ``match`` time (else its first record's), ``end`` its latest
``contact`` record's (null while none closed it); ``duration_s`` is the longest of its sides'
durations, ``closest_m`` the smallest closest distance, ``median_m`` the mean of the sides'
medians, ``match_to_token_s`` the slowest side's. Each input lists the device labels its records
carry, so that each file (and label) can be noted against its tester.

A journal given twice is read once: the same file (one line on stderr), or a run (a device label
and the time of its ``start`` record) already read from another file (one line on stderr, the run
counted once). A device whose GPS source is not a receiver (``gps_source`` of its ``start``
records, ``source`` of its fixes: anything but ``gpsd``, e.g. ``fixed`` or an ``nmea`` replay)
has ``gps_receiver`` false, is marked in the tables and named on stderr: its fix and accuracy
figures do not measure GPS in the field. The settings of the ``start`` records (``radius_m``,
``min_contact_s``, ...) are shown with the devices that ran with each value (``settings``);
devices that ran with different settings (the GPS source aside) are one line on stderr, as
their figures are merged as if they had not. These warnings (also in ``warnings``) leave the
exit code as it is.

``--json`` schema (``v`` 1; seconds, metres; null where there is no value)::

    {
      "v": 1,
      "inputs": [{"file": str, "records": int, "skipped": int, "error": str | null,
                  "devices": [str]}],
      "devices": [{"device": str, "files": [str], "gps_sources": [str], "gps_receiver": bool,
                   "runs": int, "observed_s": float, "matches": int,
                   "tokens": int, "failures": int, "no_fix_s": float,
                   "no_fix_fraction": float | null, "fix_losses": int,
                   "accuracy_m": DIST, "outages": int, "outage_s": float, "polls": int,
                   "alerts": int, "exposed_contacts": int, "ids_rotated": int, "errors": int,
                   "settings": {...the last start record's settings...}}],
      "matches": int,
      "handshakes": {"stored": int, "failed": int, "no_token": int, "unfinished": int,
                     "success_rate": float | null},
      "match_to_token_s": DIST,
      "failure_reasons": {reason: count},
      "ice_candidates": {"LOCAL/REMOTE": count},
      "contacts": {"count": int, "duration_s": DIST, "closest_m": DIST, "median_m": DIST},
      "pairing": {"both": int, "one": int, "without_token": int},
      "contact_list": [{"digest": str | null, "devices": [str], "start": UTC | null,
                        "end": UTC | null, "duration_s": float | null,
                        "closest_m": float | null, "median_m": float | null,
                        "match_to_token_s": float | null,
                        "sides": [{"device": str, "file": str, "run": int, "peer": int,
                                   "matched_at": UTC | null, "closed_at": UTC | null,
                                   "duration_s": float | null, "closest_m": float | null,
                                   "median_m": float | null,
                                   "match_to_token_s": float | null}]}],
      "accuracy_m": DIST,
      "polls": int, "alerts": int, "outages": int, "ids_rotated": int,
      "settings": [{"setting": str,
                    "values": [{"value": number | str | null, "devices": [str]}]}],
      "warnings": [str]
    }

    UTC = "2026-12-01T09:00:30.000Z" (ISO 8601, milliseconds); contact_list sorted by start;
    run counted from 0 in each file.

    DIST = {"count": int, "p50": float | null, "p90": float | null, "p95": float | null,
            "max": float | null,
            "histogram": [{"low": float, "high": float | null, "count": int}]}

(``high`` null: the last bin, open-ended; bins are ``low <= value < high``.)
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from .journal import not_a_journal

MAX_PROBLEMS_PER_FILE = 20
"""Problem lines printed per file; the rest are only counted."""

DURATION_BINS_S = (0.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
DISTANCE_BINS_M = (0.0, 1.0, 2.0, 5.0, 10.0, 15.0, 25.0, 50.0)
ACCURACY_BINS_M = (0.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
LATENCY_BINS_S = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

EXIT_OK, EXIT_SKIPPED, EXIT_NOTHING = 0, 1, 2


# -- reading ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One journal line: where it came from, and its fields."""

    file: str
    line: int
    at: datetime
    device: str
    kind: str
    data: dict[str, Any]


@dataclass
class Input:
    """What was read from one file."""

    file: str
    records: list[Record] = field(default_factory=list)
    skipped: int = 0
    error: str | None = None
    problems: list[str] = field(default_factory=list)


def _number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _contact_ok(value: Any) -> bool:
    return (isinstance(value, dict) and _number(value.get("duration_s"))
            and all(value.get(k) is None or _number(value.get(k))
                    for k in ("closest_m", "median_m"))
            and isinstance(value.get("samples"), int) and not isinstance(value["samples"], bool))


_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "num": ("a number", _number),
    "num?": ("a number or null", lambda v: v is None or _number(v)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "str?": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "contact": ("a contact object", _contact_ok),
    "contact?": ("a contact object or null", lambda v: v is None or _contact_ok(v)),
    "contacts": ("a list of contact objects",
                 lambda v: isinstance(v, list) and all(_contact_ok(c) for c in v)),
}

FIELDS: dict[str, dict[str, str]] = {
    "start": {"radius_m": "num", "min_contact_s": "num"},
    "stop": {}, "session": {},
    "ids_rotated": {"reason": "str"},
    "broker_up": {"outage_s": "num?", "failed_attempts": "int"},
    "broker_down": {"reason": "str"},
    "gps": {"fix": "bool"},
    "match": {"peer": "int", "role": "str"},
    "channel_open": {"peer": "int", "local_candidate": "str?", "remote_candidate": "str?"},
    "token": {"peer": "int", "new": "bool", "digest": "str", "match_to_token_s": "num?",
              "contact": "contact?"},
    "failure": {"peer": "int", "reason": "str"},
    "contact": {"peer": "int", "reason": "str", "token_stored": "bool", "digest": "str?",
                "contact": "contact"},
    "poll": {"received": "int"},
    "alert": {"count": "int", "contacts": "contacts"},
    "declared": {"count": "int"}, "pending": {"count": "int", "reason": "str"},
    "refused": {"count": "int", "reason": "str"}, "expired": {"count": "int"},
    "error": {"message": "str"},
}
"""The fields the report reads, per record kind, and their types (others are ignored)."""


def parse_record(text: str, file: str, line: int) -> Record:
    """One journal line as a :class:`Record`.

    Raises:
        ValueError: the line is not a version-1 journal record; the message names what is wrong
            (a field, the JSON error).
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc.args[0].split(':')[0]})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("v") != 1:
        raise ValueError(f"v: expected 1, got {data.get('v')!r}")
    for key in ("at", "device", "kind"):
        if not isinstance(data.get(key), str):
            raise ValueError(f"{key}: expected a string, got {data.get(key)!r}")
    try:
        at = datetime.fromisoformat(data["at"])
    except ValueError:
        raise ValueError(f"at: expected an ISO 8601 time, got {data['at']!r}") from None
    if at.tzinfo is None:
        raise ValueError(f"at: expected a UTC time (ending in Z), got {data['at']!r}")
    kind = data["kind"]
    checks = dict(FIELDS.get(kind, {}))
    if kind == "gps" and data.get("fix") is True:
        checks["accuracy_m"] = "num?"
    for name, check in checks.items():
        expected, ok = _CHECKS[check]
        if name not in data:
            raise ValueError(f"{kind}.{name}: missing")
        if not ok(data[name]):
            raise ValueError(f"{kind}.{name}: expected {expected}, got {data[name]!r}")
    return Record(file, line, at, data["device"], kind, data)


def read_journal(path: Path | str) -> Input:
    """Read one journal file; bad lines are skipped and described in ``problems``.

    A file whose first non-blank line is not a journal record is not a journal: no
    records, ``error`` ``"not a journal"`` and one line in ``problems``."""
    name = str(path)
    result = Input(name)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        result.error = exc.strerror or type(exc).__name__
        result.problems.append(f"{name}: cannot read ({result.error})")
        return result
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            result.records.append(parse_record(line.decode("utf-8"), name, number))
        except (ValueError, UnicodeDecodeError) as exc:
            if not result.records and not result.skipped:  # its first line
                result.error = "not a journal"
                result.problems.append(f"{not_a_journal(name)}; file skipped")
                return result
            result.skipped += 1
            if len(result.problems) < MAX_PROBLEMS_PER_FILE:
                why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
                result.problems.append(f"{name}:{number}: {why}; line skipped")
    hidden = result.skipped - len(result.problems)
    if hidden > 0:
        result.problems.append(f"{name}: {hidden} more bad lines skipped")
    return result


# -- statistics ---------------------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank ``p``-th percentile (0 < p <= 100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def histogram(values: Iterable[float], bins: Sequence[float]) -> list[dict[str, Any]]:
    """Counts per bin ``low <= value < high``; the last bin is open-ended (``high`` None)."""
    edges = list(bins)
    counts = [0] * len(edges)
    for value in values:
        index = 0
        for i, low in enumerate(edges):
            if value >= low:
                index = i
        counts[index] += 1
    return [{"low": low, "high": edges[i + 1] if i + 1 < len(edges) else None, "count": count}
            for i, (low, count) in enumerate(zip(edges, counts, strict=True))]


def distribution(values: Sequence[float], bins: Sequence[float]) -> dict[str, Any]:
    """``{"count", "p50", "p90", "p95", "max", "histogram"}`` of ``values``."""
    return {"count": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p95": percentile(values, 95), "max": max(values) if values else None,
            "histogram": histogram(values, bins)}


@dataclass
class _Device:
    name: str
    files: list[str] = field(default_factory=list)
    gps_sources: set[str] = field(default_factory=set)
    runs: int = 0
    observed_s: float = 0.0
    no_fix_s: float = 0.0
    fix_losses: int = 0
    accuracy: list[float] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    outage_s: float = 0.0
    exposed_contacts: int = 0
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Side:
    """One device's witness exchange (a peer of one run of one file): one side of a contact."""

    device: str
    file: str
    run: int
    peer: int
    first_at: datetime
    matched_at: datetime | None = None
    closed_at: datetime | None = None
    digest: str | None = None
    contact: dict[str, Any] | None = None
    match_to_token_s: float | None = None


_NOT_SETTINGS = {"v", "at", "device", "kind"}
GPS_RECEIVER_SOURCES = frozenset({"gpsd"})
"""GPS sources that are a receiver in the field (``fixed`` and an ``nmea`` replay are not)."""


def build_report(inputs: Sequence[Input]) -> dict[str, Any]:
    """The report (the ``--json`` object, see the module docstring) of what was read."""
    devices: dict[str, _Device] = {}
    outcome: dict[tuple[str, str, int, int], str] = {}
    contacts: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    contact_digest: dict[tuple[str, str, int, int], str | None] = {}
    sides: dict[tuple[str, str, int, int], _Side] = {}
    digests: dict[str, set[str]] = defaultdict(set)
    latencies: list[float] = []
    reasons: Counter[str] = Counter()
    ice: Counter[str] = Counter()
    runs_seen: dict[tuple[str, datetime], str] = {}
    settings_seen: dict[str, dict[str, tuple[Any, list[str]]]] = defaultdict(dict)
    warnings: list[str] = []
    for source in inputs:
        by_device: dict[str, list[Record]] = defaultdict(list)
        for record in source.records:
            by_device[record.device].append(record)
        for name, records in by_device.items():
            device = devices.setdefault(name, _Device(name))
            if source.file not in device.files:
                device.files.append(source.file)
            for run, run_records in enumerate(_runs(records)):
                run_id = (name, run_records[0].at)
                if run_id in runs_seen and runs_seen[run_id] != source.file:
                    warnings.append(
                        f"{source.file}: the run of {name} from {_iso(run_id[1])} is also in "
                        f"{runs_seen[run_id]} (the same journal given twice?); counted once")
                    continue
                runs_seen[run_id] = source.file
                _timeline(device, run_records)
                for r in run_records:
                    key = (source.file, name, run, r.data.get("peer", 0))
                    device.counts[r.kind] += 1
                    side = None
                    if r.kind in ("match", "token", "failure", "contact"):
                        side = sides.setdefault(key, _Side(name, source.file, run, key[3], r.at))
                    if r.kind == "match":
                        outcome.setdefault(key, "unfinished")
                        if side is not None and side.matched_at is None:
                            side.matched_at = r.at
                    elif r.kind == "token":
                        outcome[key] = "stored"
                        digests[r.data["digest"]].add(name)
                        contact_digest[key] = r.data["digest"]
                        if r.data["match_to_token_s"] is not None:
                            latencies.append(float(r.data["match_to_token_s"]))
                        if r.data["contact"] is not None:
                            contacts.setdefault(key, r.data["contact"])
                        if side is not None:
                            side.digest = r.data["digest"]
                            if side.match_to_token_s is None:
                                side.match_to_token_s = r.data["match_to_token_s"]
                    elif r.kind == "failure":
                        if outcome.get(key) != "stored":
                            outcome[key] = "failed"
                        reasons[r.data["reason"]] += 1
                    elif r.kind == "contact":
                        contacts[key] = r.data["contact"]  # the final measures win
                        if r.data["digest"] is not None:
                            digests[r.data["digest"]].add(name)
                            contact_digest[key] = r.data["digest"]
                        else:
                            contact_digest.setdefault(key, None)
                        if outcome.get(key) in (None, "unfinished") and not r.data["token_stored"]:
                            outcome[key] = "no_token"
                        if side is not None:
                            side.closed_at = r.at
                            side.digest = r.data["digest"] or side.digest
                    elif r.kind == "channel_open":
                        ice[f"{r.data['local_candidate'] or '?'}/"
                            f"{r.data['remote_candidate'] or '?'}"] += 1
                    elif r.kind == "alert":
                        device.exposed_contacts += r.data["count"]
                    elif r.kind == "start":
                        device.settings = {k: v for k, v in r.data.items()
                                           if k not in _NOT_SETTINGS}
                        for k, v in device.settings.items():
                            users = settings_seen[k].setdefault(
                                json.dumps(v, sort_keys=True), (v, []))[1]
                            if name not in users:
                                users.append(name)
                        if isinstance(r.data.get("gps_source"), str):
                            device.gps_sources.add(r.data["gps_source"])
                    elif r.kind == "gps" and isinstance(r.data.get("source"), str):
                        device.gps_sources.add(r.data["source"])
    for key, measures in contacts.items():
        if key in sides:
            sides[key].contact = measures
    for d in sorted(devices.values(), key=lambda d: d.name):
        if d.gps_sources - GPS_RECEIVER_SOURCES:
            warnings.append(
                f"{d.name}: GPS source {', '.join(sorted(d.gps_sources))}, not a receiver: its "
                f"fix and accuracy figures do not measure GPS in the field")
    settings = _settings_json(settings_seen)
    differ = [f"{entry['setting']} " + ", ".join(
        f"{_value(v['value'])} ({' '.join(v['devices'])})" for v in entry["values"])
        for entry in settings if len(entry["values"]) > 1 and entry["setting"] != "gps_source"]
    if differ:   # (a GPS source that is not a receiver has its own warning above)
        warnings.append(f"the devices ran with different settings ({'; '.join(differ)}): "
                        f"their figures are merged as if they had not")
    outcomes = Counter(outcome.values())
    stored, failed = outcomes["stored"], outcomes["failed"]
    measured = list(contacts.values())
    seen = {d for d in contact_digest.values() if d}
    accuracy = [a for d in devices.values() for a in d.accuracy]
    labels: dict[str, list[str]] = defaultdict(list)
    for d in sorted(devices.values(), key=lambda d: d.name):
        for file in d.files:
            labels[file].append(d.name)
    return {
        "v": 1,
        "inputs": [{"file": i.file, "records": len(i.records), "skipped": i.skipped,
                    "error": i.error, "devices": labels.get(i.file, [])} for i in inputs],
        "devices": [_device_json(d) for d in sorted(devices.values(), key=lambda d: d.name)],
        "matches": sum(d.counts["match"] for d in devices.values()),
        "handshakes": {"stored": stored, "failed": failed, "no_token": outcomes["no_token"],
                       "unfinished": outcomes["unfinished"],
                       "success_rate": stored / (stored + failed) if stored + failed else None},
        "match_to_token_s": distribution(latencies, LATENCY_BINS_S),
        "failure_reasons": dict(reasons.most_common()),
        "ice_candidates": dict(ice.most_common()),
        "contacts": {
            "count": len(measured),
            "duration_s": distribution([c["duration_s"] for c in measured], DURATION_BINS_S),
            "closest_m": distribution([c["closest_m"] for c in measured
                                       if c["closest_m"] is not None], DISTANCE_BINS_M),
            "median_m": distribution([c["median_m"] for c in measured
                                      if c["median_m"] is not None], DISTANCE_BINS_M)},
        "pairing": {"both": sum(1 for d in seen if len(digests[d]) >= 2),
                    "one": sum(1 for d in seen if len(digests[d]) == 1),
                    "without_token": sum(1 for d in contact_digest.values() if d is None)},
        "contact_list": _contact_list(
            [s for s in sides.values() if s.digest is not None or s.contact is not None]),
        "accuracy_m": distribution(accuracy, ACCURACY_BINS_M),
        "polls": sum(d.counts["poll"] for d in devices.values()),
        "alerts": sum(d.counts["alert"] for d in devices.values()),
        "outages": sum(d.counts["broker_down"] for d in devices.values()),
        "ids_rotated": sum(d.counts["ids_rotated"] for d in devices.values()),
        "settings": settings,
        "warnings": warnings,
    }


SETTINGS_ORDER = ("radius_m", "min_contact_s", "position_interval_s", "contact_gap_s",
                  "max_contact_s", "rotation_interval_s", "gps_source", "gps_sample_s")
"""The ``start`` record's settings in the order the report shows them (others after, sorted)."""


def _settings_json(seen: dict[str, dict[str, tuple[Any, list[str]]]]) -> list[dict[str, Any]]:
    """Per setting of the ``start`` records, each value and the devices that ran with it."""
    order = {key: i for i, key in enumerate(SETTINGS_ORDER)}
    return [{"setting": key,
             "values": [{"value": value, "devices": sorted(users)}
                        for value, users in seen[key].values()]}
            for key in sorted(seen, key=lambda k: (order.get(k, len(order)), k))]


def _value(value: Any) -> str:
    """A setting's value as the report prints it (``15``, ``gpsd``, ``–`` for null)."""
    if value is None:
        return "–"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _side_start(side: _Side) -> datetime:
    return side.matched_at or side.first_at


def _contact_list(all_sides: list[_Side]) -> list[dict[str, Any]]:
    """The contacts made of ``all_sides`` (see the module docstring), sorted by start."""
    groups: list[list[_Side]] = []
    by_digest: dict[str, dict[str, list[_Side]]] = defaultdict(lambda: defaultdict(list))
    for side in all_sides:
        if side.digest is None:
            groups.append([side])
        else:
            by_digest[side.digest][side.device].append(side)
    for per_device in by_digest.values():
        ordered = [sorted(s, key=_side_start) for _, s in sorted(per_device.items())]
        for i in range(max(len(s) for s in ordered)):
            groups.append([s[i] for s in ordered if i < len(s)])
    result = [_contact_json(group) for group in groups]
    result.sort(key=lambda c: (c["start"] or "", c["devices"]))
    return result


def _contact_json(group: list[_Side]) -> dict[str, Any]:
    def figures(name: str) -> list[float]:
        return [float(s.contact[name]) for s in group
                if s.contact is not None and s.contact.get(name) is not None]

    durations, closest, medians = figures("duration_s"), figures("closest_m"), figures("median_m")
    latencies = [float(s.match_to_token_s) for s in group if s.match_to_token_s is not None]
    closed = [s.closed_at for s in group if s.closed_at is not None]
    return {
        "digest": group[0].digest,
        "devices": [s.device for s in group],
        "start": _iso(min(_side_start(s) for s in group)),
        "end": _iso(max(closed)) if closed else None,
        "duration_s": max(durations) if durations else None,
        "closest_m": round(min(closest), 3) if closest else None,
        "median_m": round(sum(medians) / len(medians), 3) if medians else None,
        "match_to_token_s": max(latencies) if latencies else None,
        "sides": [{"device": s.device, "file": s.file, "run": s.run, "peer": s.peer,
                   "matched_at": _iso(s.matched_at), "closed_at": _iso(s.closed_at),
                   "duration_s": None if s.contact is None else s.contact.get("duration_s"),
                   **{k: _metres(None if s.contact is None else s.contact.get(k))
                      for k in ("closest_m", "median_m")},
                   "match_to_token_s": s.match_to_token_s} for s in group]}


def _metres(value: float | None) -> float | None:
    """A distance of the contact list, rounded to the millimetre (None stays None)."""
    return None if value is None else round(float(value), 3)


def _runs(records: list[Record]) -> list[list[Record]]:
    """One device's records of one file, split at each ``start`` record."""
    runs: list[list[Record]] = []
    for record in records:
        if record.kind == "start" or not runs:
            runs.append([])
        runs[-1].append(record)
    return runs


def _timeline(device: _Device, records: list[Record]) -> None:
    """Add one run's observed time, time without a fix, losses, accuracy and outages."""
    start = records[0].at
    end = next((r.at for r in records if r.kind == "stop"), records[-1].at)
    device.runs += 1
    device.observed_s += max(0.0, (end - start).total_seconds())
    no_fix_since: datetime | None = start
    outage_since: datetime | None = None
    for r in records:
        if r.kind == "gps":
            if r.data["fix"]:
                if r.data.get("accuracy_m") is not None:
                    device.accuracy.append(float(r.data["accuracy_m"]))
                if no_fix_since is not None:
                    device.no_fix_s += max(0.0, (r.at - no_fix_since).total_seconds())
                    no_fix_since = None
            elif no_fix_since is None:
                no_fix_since = r.at
                device.fix_losses += 1
        elif r.kind == "broker_down" and outage_since is None:
            outage_since = r.at
        elif r.kind == "broker_up" and outage_since is not None:
            device.outage_s += max(0.0, (r.at - outage_since).total_seconds())
            outage_since = None
    if no_fix_since is not None:
        device.no_fix_s += max(0.0, (end - no_fix_since).total_seconds())
    if outage_since is not None:
        device.outage_s += max(0.0, (end - outage_since).total_seconds())


def _device_json(d: _Device) -> dict[str, Any]:
    return {"device": d.name, "files": d.files, "gps_sources": sorted(d.gps_sources),
            "gps_receiver": not d.gps_sources - GPS_RECEIVER_SOURCES, "runs": d.runs,
            "observed_s": round(d.observed_s, 3),
            "matches": d.counts["match"], "tokens": d.counts["token"],
            "failures": d.counts["failure"], "no_fix_s": round(d.no_fix_s, 3),
            "no_fix_fraction": (round(d.no_fix_s / d.observed_s, 4) if d.observed_s > 0
                                else None),
            "fix_losses": d.fix_losses, "accuracy_m": distribution(d.accuracy, ACCURACY_BINS_M),
            "outages": d.counts["broker_down"], "outage_s": round(d.outage_s, 3),
            "polls": d.counts["poll"], "alerts": d.counts["alert"],
            "exposed_contacts": d.exposed_contacts, "ids_rotated": d.counts["ids_rotated"],
            "errors": d.counts["error"], "settings": d.settings}


# -- output -------------------------------------------------------------------------------

def _num(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _bin_label(bin_: dict[str, Any], unit: str) -> str:
    low = f"{bin_['low']:g}"
    return f"≥ {low} {unit}" if bin_["high"] is None else f"{low}–{bin_['high']:g} {unit}"


def _bar(count: int, most: int, width: int = 30) -> str:
    if count == 0 or most == 0:
        return ""
    return "█" * max(1, round(width * count / most))


def print_report(report: dict[str, Any], out: TextIO) -> None:
    """Print ``report`` as rich tables and histograms on ``out``.

    Raises:
        BrokenPipeError: ``out``'s reader went away (``| head``; rich's own handling would
            exit with status 1).
    """
    from functools import partial

    from rich import box
    from rich.table import Table as RichTable

    from .pipe import rich_console

    console = rich_console(file=out, highlight=False, emoji=False)
    Table = partial(RichTable, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")

    inputs = Table(title="Journals")
    for column in ("file", "device", "records", "skipped"):
        inputs.add_column(column, justify="left" if column in ("file", "device") else "right",
                          no_wrap=column == "device")
    for i in report["inputs"]:
        inputs.add_row(i["file"], "\n".join(i["devices"]) or "–", str(i["records"]),
                       i["error"] if i["error"] else str(i["skipped"]))
    console.print(inputs)

    devices = Table(title="Devices: witness exchanges")
    for column in ("device", "runs", "observed", "matches", "tokens", "failed", "alerts"):
        devices.add_column(column, justify="left" if column == "device" else "right",
                           no_wrap=column == "device")
    for d in report["devices"]:
        devices.add_row(d["device"], str(d["runs"]), _span(d["observed_s"]), str(d["matches"]),
                        str(d["tokens"]), str(d["failures"]), str(d["alerts"]))
    console.print(devices)

    quality = Table(title="Devices: GPS and broker")
    for column in ("device", "no fix", "fix losses", "accuracy p50 / p95", "broker outages"):
        quality.add_column(column, justify="left" if column == "device" else "right",
                           no_wrap=column == "device")
    for d in report["devices"]:
        share = d["no_fix_fraction"]
        acc = d["accuracy_m"]
        quality.add_row(
            d["device"] + ("" if d["gps_receiver"] else " *"),
            _span(d["no_fix_s"]) + ("" if share is None else f" ({share:.0%})"),
            str(d["fix_losses"]), f"{_num(acc['p50'])} / {_num(acc['p95'], ' m')}",
            f"{d['outages']} ({_span(d['outage_s'])})")
    not_receivers = [d for d in report["devices"] if not d["gps_receiver"]]
    if not_receivers:
        quality.caption = "* GPS source not a receiver (" + "; ".join(
            f"{d['device']}: {', '.join(d['gps_sources'])}" for d in not_receivers) + ")"
        quality.caption_justify = "left"
    console.print(quality)

    if report["settings"]:
        settings = Table(title="Settings (start records)", show_header=False)
        settings.add_column("setting", no_wrap=True)
        settings.add_column("value")
        differ = False
        for entry in report["settings"]:
            values = entry["values"]
            if len(values) == 1:
                settings.add_row(entry["setting"], _value(values[0]["value"]))
                continue
            differ = True
            settings.add_row(entry["setting"] + " ≠", "\n".join(
                f"{_value(v['value'])}: {', '.join(v['devices'])}" for v in values))
        if differ:
            settings.caption = "≠ differs between devices, whose figures are merged here"
            settings.caption_justify = "left"
        console.print(settings)

    hs = report["handshakes"]
    lat = report["match_to_token_s"]
    pairing = report["pairing"]
    rate = hs["success_rate"]
    summary = Table(title="Witness exchanges", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("matches (each device counts its own)", str(report["matches"]))
    summary.add_row("tokens stored / failed", f"{hs['stored']} / {hs['failed']}")
    summary.add_row("handshake success rate", "–" if rate is None else f"{rate:.1%}")
    summary.add_row("closed without token / unfinished",
                    f"{hs['no_token']} / {hs['unfinished']}")
    summary.add_row("match → token p50 / p90 / p95 / max",
                    " / ".join(_num(lat[k], digits=2) for k in ("p50", "p90", "p95", "max"))
                    + " s")
    summary.add_row("contacts seen by both / one device(s)",
                    f"{pairing['both']} / {pairing['one']}")
    summary.add_row("contacts without a token", str(pairing["without_token"]))
    summary.add_row("polls / exposure alerts / broker outages",
                    f"{report['polls']} / {report['alerts']} / {report['outages']}")
    summary.add_row("ID rotations", str(report["ids_rotated"]))
    console.print(summary)

    if report["contact_list"]:
        console.print(_contact_table(report["contact_list"], Table))

    for title, counts in (("Failure reasons", report["failure_reasons"]),
                          ("ICE candidate types (local/remote)", report["ice_candidates"])):
        if counts:
            table = Table(title=title)
            table.add_column("what")
            table.add_column("count", justify="right")
            table.add_column("")
            most = max(counts.values())
            for what, count in counts.items():
                table.add_row(what, str(count), _bar(count, most))
            console.print(table)

    contacts = report["contacts"]
    for title, dist, unit, digits in (
            ("Contact duration", contacts["duration_s"], "s", 1),
            ("Contact closest distance", contacts["closest_m"], "m", 1),
            ("Contact median distance", contacts["median_m"], "m", 1),
            ("Match to token", report["match_to_token_s"], "s", 2),
            ("GPS accuracy (sampled fixes)", report["accuracy_m"], "m", 1)):
        if not dist["count"]:
            continue
        table = Table(title=title, caption_justify="left",
                      caption=f"n = {dist['count']}, p50 {_num(dist['p50'], digits=digits)}, "
                              f"p95 {_num(dist['p95'], digits=digits)}, "
                              f"max {_num(dist['max'], digits=digits)} {unit}")
        table.add_column("bin", justify="right")
        table.add_column("count", justify="right")
        table.add_column("")
        bins = dist["histogram"]
        used = [i for i, b in enumerate(bins) if b["count"]]
        most = max(b["count"] for b in bins)
        for bin_ in bins[used[0]:used[-1] + 1]:  # empty bins at either end are not shown
            table.add_row(_bin_label(bin_, unit), str(bin_["count"]), _bar(bin_["count"], most))
        console.print(table)


def _contact_table(contact_list: list[dict[str, Any]], table: Callable[..., Any]) -> Any:
    """The "Contacts" table: one row per contact, to compare with the ground truth."""
    days = sorted({c["start"][:10] for c in contact_list if c["start"]})
    one_day = len(days) <= 1
    contacts = table(title="Contacts (start in UTC" + (f", {days[0]})" if len(days) == 1
                                                         else ")"))
    for column in ("devices", "start", "duration", "closest", "median", "m→token"):
        contacts.add_column(column, justify="left" if column == "devices" else "right",
                            no_wrap=column in ("devices", "start"))
    for c in contact_list:
        who = " + ".join(c["devices"])
        if c["digest"] is None:
            who += " (no token)"
        elif len(c["devices"]) == 1:
            who += " only"
        start = c["start"] or ""
        start = start[11:19] if one_day else f"{start[5:10]} {start[11:19]}"
        contacts.add_row(who, start or "–",
                         "–" if c["duration_s"] is None else _span(c["duration_s"]),
                         _num(c["closest_m"], " m"), _num(c["median_m"], " m"),
                         _num(c["match_to_token_s"], " s", digits=2))
    return contacts


def run_report(paths: Sequence[str], *, as_json: bool, out: TextIO | None = None,
               err: TextIO | None = None, prog: str = "fanny-tui report") -> int:
    """Read ``paths``, print the report on ``out`` and each input problem on ``err``
    (default: stdout, stderr).

    Returns:
        The exit code: 0 all read, 1 some input skipped, 2 nothing readable.

    Raises:
        BrokenPipeError: ``out``'s reader went away (``fanny-tui`` then exits quietly, 141).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    inputs: list[Input] = []
    read: dict[str, str] = {}  # the real path of each file read: the name it was given as
    for path in paths:
        real = os.path.realpath(path)
        if real in read:
            print(f"{prog}: {path}: the same file as {read[real]}, given twice; read once",
                  file=err)
            continue
        read[real] = str(path)
        inputs.append(read_journal(path))
    for source in inputs:
        for problem in source.problems:
            print(f"{prog}: {problem}", file=err)
        if not source.records and not source.skipped and source.error is None:
            print(f"{prog}: {source.file}: empty, no journal record (did the device run with "
                  f"this [journal] path?)", file=err)
    if not any(source.records for source in inputs):
        print(f"{prog}: no journal record could be read", file=err)
        return EXIT_NOTHING
    report = build_report(inputs)
    for warning in report["warnings"]:
        print(f"{prog}: {warning}", file=err)
    if as_json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        print_report(report, out)
    skipped = any(source.skipped or source.error for source in inputs)
    return EXIT_SKIPPED if skipped else EXIT_OK
