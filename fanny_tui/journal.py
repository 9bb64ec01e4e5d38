"""The run journal: JSON lines of what a field test needs, with no ID, token or position.

Opt-in with ``[journal] path`` (issue 6, point 4). A :class:`Journal` subscribes to the engine's
events (:mod:`fanny_tui.events`) and appends one JSON object per line to the file, which
``fanny-tui report`` reads (:mod:`fanny_tui.report`). The file is created with mode 0600, opened
for appending (a restarted device goes on in the same file, under the same device label),
line-buffered and flushed after every line. While a device runs it holds an exclusive
:func:`fcntl.flock` on the file (as on its data directory, :mod:`fanny_tui.datadir`): two devices
on one file would write under one device label, and the report would merge them as one device.
``fanny-tui`` refuses at start a journal file that another device holds, or that is not a
journal (:func:`check_path`). A journal that cannot be opened, locked or written is one
``error`` event and then stops; it never stops the engine.

Every record::

    {"v": 1, "at": "2026-12-01T04:31:59.123Z", "device": "dev-3fa9c1", "kind": KIND, ...}

``at`` is UTC, milliseconds. ``device`` is a random label chosen when the journal file is created
(``dev-`` and 6 hex digits from :mod:`secrets`); it is none of the protocol's IDs and is never
sent anywhere. Kinds and their fields (``peer`` is the engine's in-memory ordinal of a witness
exchange, counted from 1 in each run; a ``contact`` object is ``{"duration_s", "closest_m",
"median_m", "samples"}`` in seconds, metres, metres, count, or null):

============== ===================================================================================
kind           fields
============== ===================================================================================
start          ``radius_m``, ``min_contact_s``, ``position_interval_s``, ``contact_gap_s``,
               ``max_contact_s``, ``rotation_interval_s``, ``gps_source``, ``gps_sample_s``:
               the settings this run measured with (the journal was attached)
stop           the engine stopped (the journal was closed)
session        a session began (``session_started``)
ids_rotated    ``reason``: ``schedule`` or ``declared``
broker_up      ``outage_s`` (seconds since ``broker_down``, null for the first connection),
               ``failed_attempts`` (reconnections that failed during the outage)
broker_down    ``reason``: the start of a broker outage (later failed attempts are counted, not
               written)
gps            ``fix`` (bool); with a fix: ``mode`` (2 or 3), ``source``, ``satellites_used``,
               ``satellites_visible``, ``accuracy_m`` (metres, 95 %), ``hdop``; without:
               ``reason``. Written at every change of fix state (fix / no fix) and otherwise at
               most once per ``gps_sample_s`` seconds (default 10).
match          ``peer``, ``role`` (``initiator`` or ``responder``)
channel_open   ``peer``, ``local_candidate``, ``remote_candidate``: ICE candidate types of the
               selected pair (RFC 8445: ``host``, ``srflx``, ``prflx``, ``relay``; null: unknown)
token          ``peer``, ``new`` (bool), ``digest``, ``match_to_token_s``, ``contact``
failure        ``peer``, ``reason`` (``handshake_failed``)
contact        ``peer``, ``reason``, ``token_stored`` (bool), ``digest`` (of the token this
               contact stored, else null), ``contact`` (``contact_closed``)
poll           ``received``, ``next_poll_in_s``, ``broker``
poll_failed    ``reason``, ``since``, ``attempts``, ``broker`` (a poll of positives failed;
               exposure checks are not happening)
alert          ``count``, ``contacts`` (list of ``contact`` objects), ``broker``
declared       ``count``, ``broker`` (the broker acknowledged a positive upload)
pending        ``count``, ``reason``, ``broker`` (a positive upload not acknowledged yet)
refused        ``count``, ``reason``, ``broker`` (the broker refused the declaration code)
expired        ``count`` (expired tokens deleted)
error          ``message``
============== ===================================================================================

``match_to_token_s`` is the engine's figure when it gives one, else the seconds between this
journal's ``match`` and ``token`` records for that peer.

What is never written (privacy invariants 1 and 2): session ID, contact ID, token, position
(latitude, longitude, GPS time) and the bearing to a peer. A distance alone puts the peer
somewhere on a circle around the device; a distance *and* a bearing put it at one point relative
to the device, whose own track a tester knows (they walked it), so together they are a position
on disk by another name; the journal keeps distances (closest and median of a contact) and drops
bearings (``peer_update`` events, per sample, are not journaled at all). Free text (failure
reasons, error messages) has anything shaped like a UUID or a long hex string replaced by ``…``.

``digest`` pairs the two devices' records of one contact without the token: the first 8 hex
digits (32 bits) of SHA-256 over the UTF-8 bytes of ``"fanny-journal-v1:" + token``. Both
devices of a contact hold the same token, so their journals show the same digest. What it
reveals: the digest cannot be turned back into the token, nor used to poll or declare, but
whoever holds a journal and the list of published positive tokens (public to every poller) can
hash those tokens the same way and see which journaled contact, with its time, duration and
distance, was with someone who later declared positive; with 32 bits, a wrong match between one
digest and N published tokens has a probability of about N / 2**32. A journal therefore tells
more than the token store (whose expiry is rounded to the deletion hour, invariant 5): keep it to
field tests with consenting testers, and treat it like the device (docs/threat-model.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .config import Config
from .datadir import try_lock
from .events import (
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
    IdsRotated,
    MatchFound,
    PositiveDeclared,
    PositivePending,
    PositiveRefused,
    PositivesPolled,
    PositivesPollFailed,
    SessionStarted,
    TokensExpired,
    TokenStored,
)

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)

VERSION = 1
"""The record format's version (``"v"`` in every record)."""

DIGEST_PREFIX = "fanny-journal-v1:"
GPS_SAMPLE_S = 10.0
"""Default: at most one ``gps`` record per this many seconds while the fix state is unchanged."""

_SECRET_SHAPES = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{16,}")


def token_digest(token: str) -> str:
    """The journal's digest of a witness token: 8 lowercase hex digits.

    The first 32 bits of SHA-256(UTF-8 of ``"fanny-journal-v1:" + token``); see the module
    docstring for what it reveals.
    """
    return hashlib.sha256((DIGEST_PREFIX + token).encode()).hexdigest()[:8]


def not_a_journal(path: Path | str) -> str:
    """The words for a file whose first line is not a journal record (the config file, say),
    shared by the device (``journal.path``) and ``fanny-tui report``."""
    return f"{path} is not a journal (its first line is not a journal record)"


def new_device_label() -> str:
    """A random label for a new journal: ``dev-`` and 6 hex digits (not a protocol ID)."""
    return f"dev-{secrets.token_hex(3)}"


def scrub(text: str) -> str:
    """``text`` with every UUID-shaped or 16+ hex-digit run replaced by ``…``."""
    return _SECRET_SHAPES.sub("…", text)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _contact(contact: Contact | None) -> dict[str, Any] | None:
    return None if contact is None else asdict(contact)


class Journal:
    """An append-only JSON-lines journal of one device's runs; :meth:`handle` is the subscriber.

    Args:
        path: the journal file (created 0600 if missing, appended to otherwise); its directory
            must exist (it is not created). A file with data whose first line is not a journal
            record (a config file, say) is left untouched: one ``on_error`` call. The file is
            locked (flock) until :meth:`close`; a file another journal holds is one
            ``on_error`` call.
        settings: the ``start`` record's fields (see :func:`settings_of`).
        on_error: called once with an :class:`~fanny_tui.events.EngineError` when the journal
            cannot be opened or written (then it writes nothing more).
        gps_sample_s: at most one ``gps`` record per this many seconds while the fix state is
            unchanged (every change is written).
        clock: the time of each record (default: now, UTC).
        device: the device label (default: the label of the file's first record, else new).

    Never raises on I/O: a failure goes to ``on_error``.
    """

    def __init__(self, path: Path, *, settings: dict[str, Any] | None = None,
                 on_error: Callable[[Event], None] | None = None,
                 gps_sample_s: float = GPS_SAMPLE_S,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 device: str | None = None) -> None:
        self.path = Path(path)
        self._on_error = on_error
        self._gps_sample_s = gps_sample_s
        self._clock = clock
        self._file: IO[str] | None = None
        self._failed = False
        self._gps_fix: bool | None = None  # last written fix state
        self._gps_written_at: datetime | None = None
        self._outage_since: datetime | None = None
        self._outage_failures = 0
        self._matched_at: dict[int, datetime] = {}
        self._digests: dict[int, str] = {}
        self._unsubscribe: Callable[[], None] | None = None
        try:
            if device is None and _not_a_journal(self.path):
                self.device = "dev-unknown"
                self._fail(None, f"journal {self.path}: not a journal (its first line is not a "
                                 f"journal record), left untouched; no journal lines")
                return
            self.device = device or _existing_label(self.path) or new_device_label()
            fd = _open_for_append(self.path)
            if not _lock(fd):
                self._fail(None, f"journal {self.path}: {IN_USE}; no journal lines")
                return
            self._file = open(fd, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            self.device = device or "dev-unknown"
            self._fail(exc)
            return
        self._write("start", {**(settings or {}), "gps_sample_s": gps_sample_s})

    @property
    def failed(self) -> bool:
        """True once the journal could not be opened or written (it writes nothing more)."""
        return self._failed

    def close(self) -> None:
        """Unsubscribe, write the ``stop`` record and close the file (idempotent)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._file is None:
            return
        self._write("stop", {})
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)
            self._file = None

    def handle(self, event: Event) -> None:
        """Journal ``event`` (the engine subscriber). Events of no interest are ignored."""
        if self._file is None:
            return
        kind_fields = self._record_for(event)
        if kind_fields is not None:
            self._write(*kind_fields)

    # -- events to records ---------------------------------------------------------------

    def _record_for(self, event: Event) -> tuple[str, dict[str, Any]] | None:
        now = self._clock()
        if isinstance(event, GpsFix | GpsLost):
            return self._gps(event, now)
        if isinstance(event, MatchFound):
            _remember(self._matched_at, event.peer, now)
            return "match", {"peer": event.peer, "role": event.role}
        if isinstance(event, ChannelOpen):
            return "channel_open", {"peer": event.peer, "local_candidate": event.local_candidate,
                                    "remote_candidate": event.remote_candidate}
        if isinstance(event, TokenStored):
            digest = token_digest(event.token)
            _remember(self._digests, event.peer, digest)
            latency = event.match_to_token_s
            matched = self._matched_at.pop(event.peer, None)
            if latency is None and matched is not None:
                latency = round((now - matched).total_seconds(), 3)
            return "token", {"peer": event.peer, "new": event.new, "digest": digest,
                             "match_to_token_s": latency, "contact": _contact(event.contact)}
        if isinstance(event, HandshakeFailed):
            self._matched_at.pop(event.peer, None)
            return "failure", {"peer": event.peer, "reason": scrub(event.reason)}
        if isinstance(event, ContactClosed):
            self._matched_at.pop(event.peer, None)
            held = self._digests.pop(event.peer, None)
            return "contact", {"peer": event.peer, "reason": scrub(event.reason),
                               "token_stored": event.token_stored,
                               "digest": held if event.token_stored else None,
                               "contact": _contact(event.contact)}
        if isinstance(event, BrokerConnected):
            outage_s = None
            if self._outage_since is not None:
                outage_s = round((now - self._outage_since).total_seconds(), 3)
            fields = {"outage_s": outage_s, "failed_attempts": self._outage_failures}
            self._outage_since, self._outage_failures = None, 0
            return "broker_up", fields
        if isinstance(event, BrokerDisconnected):
            if self._outage_since is not None:
                self._outage_failures += 1
                return None
            self._outage_since = now
            return "broker_down", {"reason": scrub(event.reason)}
        if isinstance(event, PositivesPolled):
            return "poll", {"received": event.received, "next_poll_in_s": event.next_poll_in_s,
                            "broker": event.broker}
        if isinstance(event, PositivesPollFailed):
            return "poll_failed", {"reason": scrub(event.reason), "since": _iso(event.since),
                                   "attempts": event.attempts, "broker": event.broker}
        if isinstance(event, ExposureAlert):
            return "alert", {"count": event.count,
                             "contacts": [_contact(c) for c in event.contacts],
                             "broker": event.broker}
        if isinstance(event, SessionStarted):
            return "session", {}
        if isinstance(event, IdsRotated):
            return "ids_rotated", {"reason": event.reason}
        if isinstance(event, PositiveDeclared):
            return "declared", {"count": event.count, "broker": event.broker}
        if isinstance(event, PositivePending):
            return "pending", {"count": event.count, "reason": scrub(event.reason),
                               "broker": event.broker}
        if isinstance(event, PositiveRefused):
            return "refused", {"count": event.count, "reason": scrub(event.reason),
                               "broker": event.broker}
        if isinstance(event, TokensExpired):
            return "expired", {"count": event.count}
        if isinstance(event, EngineError):
            return "error", {"message": scrub(event.message)}
        return None  # handshake progress, peer updates (bearings): not journaled

    def _gps(self, event: GpsFix | GpsLost, now: datetime) -> tuple[str, dict[str, Any]] | None:
        has_fix = isinstance(event, GpsFix)
        if (has_fix == self._gps_fix and self._gps_written_at is not None
                and (now - self._gps_written_at).total_seconds() < self._gps_sample_s):
            return None
        self._gps_fix, self._gps_written_at = has_fix, now
        if isinstance(event, GpsFix):
            return "gps", {"fix": True, "mode": event.mode, "source": event.source,
                           "satellites_used": event.satellites_used,
                           "satellites_visible": event.satellites_visible,
                           "accuracy_m": event.accuracy_m, "hdop": event.hdop}
        return "gps", {"fix": False, "reason": scrub(event.reason)}

    # -- file ----------------------------------------------------------------------------

    def _write(self, kind: str, fields: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = {"v": VERSION, "at": _iso(self._clock()), "device": self.device, "kind": kind,
                  **_json_safe(fields)}
        try:
            self._file.write(json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n")
            self._file.flush()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: Exception | None, message: str | None = None) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self._failed:
            return
        self._failed = True
        if message is None:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            message = f"journal {self.path}: cannot be written ({reason}); no more journal lines"
        log.warning("%s", message)
        if self._on_error is not None:
            self._on_error(EngineError(message=message))


MAX_REMEMBERED_PEERS = 256
"""Peers whose match time and token digest are kept for later records (oldest dropped)."""


def _remember(memory: dict[int, Any], peer: int, value: Any) -> None:
    memory[peer] = value
    while len(memory) > MAX_REMEMBERED_PEERS:
        del memory[next(iter(memory))]


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def settings_of(config: Config) -> dict[str, Any]:
    """The settings a ``start`` record carries, from the configuration."""
    protocol = config.protocol
    return {"radius_m": protocol.radius_m, "min_contact_s": protocol.min_contact_s,
            "position_interval_s": protocol.position_interval_s,
            "contact_gap_s": protocol.contact_gap_s, "max_contact_s": protocol.max_contact_s,
            "rotation_interval_s": config.privacy.rotation_interval_s,
            "gps_source": config.gps.source}


def check_path(path: Path) -> str | None:
    """What makes ``path`` unusable as a journal file, as one line naming ``journal.path``;
    None when it can be opened for appending and holds no other data.

    Checked at start, so that a typo in the path is not a journal silently written elsewhere
    nor a directory tree created (directories are never created), and so that a file that is
    not a journal (the config file, say) is never appended to. The file is really opened for
    appending (a missing one is created and removed again): ``os.access`` answers yes to root
    for every file, and knows nothing of names the file system refuses.
    """
    path = Path(path)
    parent = path.parent
    try:
        if path.is_dir():
            return f"journal.path: {path} is a directory, not a file"
        if not parent.exists():
            missing = parent
            while not missing.parent.exists():
                missing = missing.parent
            return (f"journal.path: the directory {parent} does not exist ({missing} is "
                    f"missing); create it first or choose another path")
        if not parent.is_dir():
            return f"journal.path: {parent} is not a directory"
        existed = path.exists()
        if existed and _not_a_journal(path):
            return f"journal.path: {not_a_journal(path)}: choose a new file"
    except OSError as exc:
        return f"journal.path: {path} cannot be used ({exc.strerror or exc})"
    try:
        fd = _open_for_append(path, create=not existed, exclusive=not existed)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = getattr(exc, "strerror", None) or str(exc)
        return f"journal.path: {path} cannot be opened for appending ({reason})"
    try:
        free = try_lock(fd)
        if not existed:
            path.unlink()
    except OSError:
        free = True   # no lock to be had here (ENOLCK): the journal works without one
    finally:
        os.close(fd)  # the probe's lock goes with it
    return None if free else f"journal.path: {path}: {IN_USE}"


IN_USE = ("in use by another running device (two devices must not share one journal: the "
          "report would count them as one); give each device its own journal.path")


def _lock(fd: int) -> bool:
    """Lock the open journal ``fd`` for this device's run (False: another device holds it;
    ``fd`` is then closed). A file system without locks: True, unlocked."""
    try:
        if try_lock(fd):
            return True
    except OSError:
        return True
    os.close(fd)
    return False


def _open_for_append(path: Path, *, create: bool = True, exclusive: bool = False) -> int:
    """A file descriptor of ``path`` opened for appending (created 0600 when ``create``; a FIFO
    is not waited on: O_NONBLOCK)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
    if create:
        flags |= os.O_CREAT | (os.O_EXCL if exclusive else 0)
    fd = os.open(path, flags, 0o600)
    os.set_blocking(fd, True)
    return fd


def _not_a_journal(path: Path) -> bool:
    """True if ``path`` is a regular file with data whose first line is not a journal record
    (appending to it would damage someone else's file)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        return False  # a device such as /dev/full, or an empty file: nothing to damage
    return _existing_label(path) is None


def attach(engine: Engine) -> Journal | None:
    """Journal ``engine``'s events to ``engine.config.journal.path`` (None: no journal).

    The journal is subscribed to the engine; an unusable file is one ``error`` event.
    Call :meth:`Journal.close` when the engine stops.
    """
    path = engine.config.journal.path
    if path is None:
        return None
    journal = Journal(path, settings=settings_of(engine.config), on_error=engine.emit)
    journal._unsubscribe = engine.subscribe(journal.handle)
    return journal


def _existing_label(path: Path) -> str | None:
    """The device label of the journal's first record, if the file exists and has one."""
    try:
        with open(path, encoding="utf-8") as existing:
            first = existing.readline(4096)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return None
    try:
        device = json.loads(first).get("device")
    except (ValueError, AttributeError):
        return None
    return device if isinstance(device, str) and re.fullmatch(r"dev-[0-9a-f]{6}", device) else None
