"""Position sources: gpsd, NMEA log replay, a fixed point and a simulated walker (paper 3, step 2).

gpsd is read through its own streaming JSON interface (``?WATCH``) with asyncio instead of
gpsd-py3, whose ``?POLL`` turns partial epochs into (0, 0), blocks on connect and raises
IndexError on an empty TPV list.

Every source has one method, :meth:`PositionSource.stream`: an async iterator of
:class:`~fanny_tui.events.GpsFix` and :class:`~fanny_tui.events.GpsLost` that runs until the
consumer stops iterating (or its task is cancelled). Device, file and network trouble never
raises out of it: the source yields one ``GpsLost(reason)`` and keeps retrying.

Rules shared by every source:

* A :class:`GpsFix` is only ever built from a real position: finite WGS84 latitude and longitude
  in range, and never exactly (0, 0) ("null island", what broken clients report for "no
  position"; a town of devices sent there would all meet each other).
* ``GpsLost`` is yielded once when the fix goes away and not repeated while it stays away; a
  source that has no fix ``stale_after_s`` seconds after it starts also yields one, so the UI
  can show "no fix".
* A position the receiver says it did not measure (simulation mode, dead reckoning only,
  time-only/manual input) is not a fix either: it is never yielded as a :class:`GpsFix` (so
  never sent to the broker) but reported as a ``GpsLost`` with the reason. gpsd (TPV
  ``status``) and the NMEA replay (GGA quality, RMC mode indicator) are judged by the same
  table, :data:`RECEIVER_STATUS`, through :func:`unmeasured_reason`. gpsd does not always put
  the receiver's indicators into ``status`` (gpsd 3.22 leaves it out for an RMC mode S or M
  without a GGA quality saying the same, e.g. a receiver that sends RMC only, or the first
  epoch after gpsd activates a device), so the gpsd source also asks for the receiver's NMEA
  sentences (``"nmea":true``) and refuses a TPV of an epoch whose RMC or GGA says "not
  measured", exactly as the NMEA replay does.
* Nothing here logs or stores a position (privacy: positions are shown, never written).

What a :class:`GpsFix` carries, per source (``source`` field): ``gpsd`` and ``nmea`` come from
a receiver, ``fixed`` is a configured position (not a receiver), ``walk`` is the demo's
simulated walker. ``mode`` is 2 (2D) or 3 (3D). ``accuracy_m`` is, from gpsd, its ``eph``
(gpsd's estimated horizontal position error in metres; gpsd computes it from HDOP and a range
error and documents its confidence as unknown), else ``hypot(epx, epy)``; from NMEA,
``hdop * NMEA_UERE_M``; from ``fixed``/``walk`` the configured figure. ``hdop`` is the
horizontal dilution of precision (gpsd SKY ``hdop``; NMEA GGA, else GSA). ``satellites_used``
and ``satellites_visible`` are counts (gpsd SKY ``uSat``/``nSat``; NMEA GGA/GSA and GSV).
``time`` is the receiver's UTC time of the fix (from a replayed log: the log's time), or the
host clock for ``fixed``/``walk``: the age of a fix is measured against it.

The gpsd side is split in two: :class:`GpsdDecoder` (bytes in, JSON objects out) and
:class:`GpsdFixTracker` (gpsd objects in, fixes out) are pure and need no event loop;
:class:`GpsdSource` only adds the socket, the timers and the reconnect loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pynmea2

from .config import ConfigError, GpsConfig
from .events import GpsFix, GpsLost
from .protocol.proximity import EARTH_RADIUS_M

log = logging.getLogger(__name__)

__all__ = [
    "FAA_MODE_STATUS",
    "GGA_QUALITY_STATUS",
    "FixedSource",
    "GpsdDecoder",
    "GpsdFixTracker",
    "GpsdSource",
    "NMEA_UERE_M",
    "NmeaReplaySource",
    "PositionSource",
    "RECEIVER_STATUS",
    "WalkSource",
    "make_source",
    "parse_nmea_log",
    "unmeasured_reason",
    "usable_position",
]

#: The command that starts gpsd's JSON stream (gpsd_json(5), "?WATCH"), with the receiver's
#: NMEA sentences beside it (``"nmea":true``: each raw sentence before the TPV gpsd makes of
#: it), so that an epoch the receiver did not measure is refused even when gpsd's TPV has no
#: ``status`` saying so (see :class:`GpsdFixTracker`).
WATCH_COMMAND = b'?WATCH={"enable":true,"json":true,"nmea":true};\n'

#: The ``class`` :class:`GpsdDecoder` gives a raw NMEA sentence line (``{"class": NMEA_LINE,
#: "line": "$GPRMC,..."}``); gpsd itself has no class starting with ``_``.
NMEA_LINE = "_nmea"

#: Metres of position error per unit of HDOP used by the NMEA replay: ``accuracy_m = hdop * 5``.
#: A rough 95 % horizontal figure (twice a typical 2.5 m user range error); NMEA logs carry no
#: better estimate in the standard sentences.
NMEA_UERE_M = 5.0


@runtime_checkable
class PositionSource(Protocol):
    """Anything the engine can take positions from."""

    def stream(self) -> AsyncIterator[GpsFix | GpsLost]:
        """Yield fixes and losses until the consumer stops; never raise for device trouble."""
        ...


# -- shared checks ----------------------------------------------------------------------


def _finite(value: object) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # a JSON integer too large for a float (json.loads keeps it exact)
        return None
    return number if math.isfinite(number) else None


def usable_position(latitude: object, longitude: object) -> tuple[float, float] | None:
    """Validate a position before it may become a :class:`GpsFix`.

    Args:
        latitude: WGS84 degrees, north positive.
        longitude: WGS84 degrees, east positive.

    Returns:
        ``(latitude, longitude)`` as floats, or None if either is missing, not a finite number,
        out of range (|lat| > 90, |lon| > 180), or the position is exactly (0, 0).
    """
    lat, lon = _finite(latitude), _finite(longitude)
    if lat is None or lon is None or abs(lat) > 90.0 or abs(lon) > 180.0:
        return None
    if lat == 0.0 and lon == 0.0:
        return None
    return lat, lon


def _check_position(latitude: float, longitude: float) -> tuple[float, float]:
    lat, lon = _finite(latitude), _finite(longitude)
    if lat is None or not -90.0 <= lat <= 90.0:
        raise ValueError(f"latitude: expected WGS84 degrees in [-90, 90], got {latitude!r}")
    if lon is None or not -180.0 <= lon <= 180.0:
        raise ValueError(f"longitude: expected WGS84 degrees in [-180, 180], got {longitude!r}")
    return lat, lon


def _check_positive(name: str, value: float) -> float:
    number = _finite(value)
    if number is None or number <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return number


# -- measured or not: one rule for gpsd and NMEA ---------------------------------------------

#: What a receiver's fix status says, keyed by gpsd's TPV ``status`` (gpsd_json(5), TPV; the
#: values of libgps ``gps_fix_t.status``): ``(name, reason)``, where ``reason`` is None for a
#: position the receiver measured from satellite signals and otherwise why it is not a fix.
#:
#: * 5 (dead reckoning only), 7 (time only: a surveyed or manually entered position, NMEA
#:   "manual input") and 8 (simulated: a receiver in demo mode) are not fixes.
#: * 6 (GNSS + dead reckoning) IS a fix: satellites measured it and inertial sensors only
#:   carry it between measurements (u-blox NAV-STATUS "GPS + dead reckoning combined"). A
#:   receiver that loses the satellites falls back to 5, which is refused.
#: * 0 (unknown) is a fix, and so is an absent ``status``: gpsd 3.17 documents ``status`` as
#:   sent for DGPS (2) only, and gpsd 3.22 leaves it out for a normal fix.
#:
#: The NMEA replay maps its indicators to these codes (:data:`GGA_QUALITY_STATUS`,
#: :data:`FAA_MODE_STATUS`) and judges them by the same table. gpsd 3.22 turns GGA quality
#: 8/6/7 with RMC mode S/E/M into status 8/5/7 (measured on tests/data/derived); the other
#: codes follow the NMEA 0183 meanings.
RECEIVER_STATUS: dict[int, tuple[str, str | None]] = {
    0: ("unknown", None),
    1: ("GNSS fix", None),
    2: ("DGPS fix", None),
    3: ("RTK fixed", None),
    4: ("RTK float", None),
    5: ("dead reckoning only", "receiver in dead-reckoning mode, position not measured"),
    6: ("GNSS + dead reckoning", None),
    7: ("time only", "receiver in time-only or manual-input mode, position not measured"),
    8: ("simulated", "receiver in simulation mode"),
    9: ("P(Y) fix", None),
}

#: NMEA 0183 GGA fix quality (field 6) -> gpsd status. 0 (invalid) is no fix at all.
GGA_QUALITY_STATUS: dict[int, int] = {1: 1, 2: 2, 3: 9, 4: 3, 5: 4, 6: 5, 7: 7, 8: 8}

#: NMEA 0183 (2.3 and later) FAA mode indicator (RMC field 12) -> gpsd status: A autonomous,
#: D differential, P precise, R RTK fixed, F RTK float, E estimated (dead reckoning),
#: M manual input, S simulator. N (not valid) is no fix at all; a letter not listed counts as
#: unknown (0), as gpsd does.
FAA_MODE_STATUS: dict[str, int] = {"A": 1, "D": 2, "P": 9, "R": 3, "F": 4, "E": 5, "M": 7,
                                   "S": 8}


def unmeasured_reason(status: object) -> str | None:
    """Why a position with this receiver status is not a fix, or None if it is one.

    Args:
        status: gpsd's TPV ``status`` (an int, see :data:`RECEIVER_STATUS`); an unknown code
            (a newer gpsd's) counts as 0 (unknown), as gpsd clients do; so does a value that
            is not an int (callers refuse malformed input before asking).

    Returns:
        The reason (one line, e.g. ``"receiver in simulation mode"``) for 5, 7 and 8; else None.
    """
    if isinstance(status, bool) or not isinstance(status, int):
        return None
    entry = RECEIVER_STATUS.get(status)
    return None if entry is None else entry[1]


class _LossGate:
    """Lets one GpsLost through per loss; a fix re-arms it."""

    def __init__(self) -> None:
        self.lost = False

    def fix(self) -> None:
        self.lost = False

    def lose(self) -> bool:
        """Mark the fix lost; True if this is news (a GpsLost should be yielded)."""
        news = not self.lost
        self.lost = True
        return news


# -- gpsd -------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not a number gpsd sends")


class GpsdDecoder:
    """Split gpsd's byte stream into JSON objects (sans-I/O).

    gpsd sends one JSON object per line (``\\r\\n`` ended), and with ``"nmea":true`` the
    receiver's NMEA sentences as lines of their own (``$``, ``$$`` or ``!`` first): such a line
    of printable ASCII is returned as ``{"class": NMEA_LINE, "line": text}``. :meth:`feed`
    takes bytes as they arrive, in chunks of any size, and returns the complete objects. A
    line that is neither (garbage, a truncated object, trailing bytes after the object,
    invalid UTF-8, ``NaN``/``Infinity``) is skipped and counted in :attr:`skipped`; so is a
    line longer than ``max_line`` bytes, without buffering more than that.
    """

    def __init__(self, max_line: int = 256 * 1024) -> None:
        """Args: max_line: longest line kept, in bytes (gpsd's own limit is far lower)."""
        self.max_line = max_line
        self.skipped = 0
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add received bytes; return the JSON objects completed by them, in order."""
        self._buffer += data
        out: list[dict[str, Any]] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            obj = self._decode(line)
            if obj is not None:
                out.append(obj)
        if len(self._buffer) > self.max_line:
            self._buffer.clear()
            self._discarding = True
            self.skipped += 1
        return out

    def _decode(self, line: bytes) -> dict[str, Any] | None:
        line = line.strip()
        if not line:
            return None
        if line[:1] in (b"$", b"!"):
            if not all(32 <= byte < 127 for byte in line):
                self.skipped += 1
                return None
            return {"class": NMEA_LINE, "line": line.decode("ascii")}
        try:
            obj = json.loads(line, parse_constant=_reject_constant)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError too
            self.skipped += 1
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("class"), str):
            self.skipped += 1
            return None
        return obj


def _second_of_day(moment: time) -> int:
    """The whole UTC second of the day of a time of day (NMEA ``hhmmss.ss`` or gpsd's)."""
    return moment.hour * 3600 + moment.minute * 60 + moment.second


def _gpsd_time(value: object) -> datetime | None:
    """gpsd's ISO 8601 ``time`` as an aware UTC datetime, or None."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: 9999-12-31T23:59:59-01:00 and the like
        return None


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


class GpsdFixTracker:
    """Turn gpsd JSON objects into fixes and losses (sans-I/O).

    Reads what is there and ignores what it does not know, across gpsd releases (protocol
    versions 3.x and newer; VERSION is not checked):

    * ``TPV`` with ``mode`` 2 or 3 and usable ``lat``/``lon`` (see :func:`usable_position`)
      gives a :class:`GpsFix` (``source="gpsd"``). ``accuracy_m`` is ``eph`` if present, else
      ``hypot(epx, epy)`` if both are, else None; ``time`` is the TPV ``time`` (UTC).
    * ``TPV`` with ``mode`` 0 or 1 gives a :class:`GpsLost`.
    * ``TPV`` with mode 2/3 and a ``status`` that says the position was not measured
      (:func:`unmeasured_reason`: dead reckoning only, time only, simulated) gives a
      :class:`GpsLost` with that reason, position or not.
    * ``TPV`` with mode 2/3 but no position (a partial epoch), or a ``status`` that is not an
      integer, gives nothing.
    * ``SKY`` updates the satellite counts and the HDOP put on later fixes: ``uSat``/``nSat``,
      else counted from ``satellites`` (``used``); ``hdop`` if a finite number > 0. A SKY
      without them keeps the previous values.
    * An NMEA sentence line (:data:`NMEA_LINE`, from ``"nmea":true``): an RMC mode indicator
      or a GGA fix quality saying the position was not measured (:data:`FAA_MODE_STATUS`,
      :data:`GGA_QUALITY_STATUS`, judged by :func:`unmeasured_reason`) marks its epoch (its
      UTC second); a TPV of that second then gives a :class:`GpsLost` with that reason, even
      without a ``status`` (gpsd 3.22 leaves it out for RMC mode S or M alone). The mark goes
      with the next epoch.
    * ``GST`` (its ``lat``/``lon`` are error estimates in metres) and everything else: nothing.
    """

    def __init__(self) -> None:
        self.satellites_used: int | None = None
        self.satellites_visible: int | None = None
        self.hdop: float | None = None
        self._epoch_second: int | None = None    # UTC second of the NMEA epoch being read
        self._unmeasured: str | None = None      # why that epoch is not a fix, if it is not

    def handle(self, message: dict[str, Any]) -> GpsFix | GpsLost | None:
        """Take one gpsd object; return the fix or loss it reports, if any."""
        kind = message.get("class")
        if kind == "SKY":
            self._sky(message)
            return None
        if kind == NMEA_LINE:
            self._nmea(message.get("line"))
            return None
        if kind != "TPV":
            return None
        mode = message.get("mode")
        if isinstance(mode, bool) or not isinstance(mode, int):
            return None
        if mode in (0, 1):
            return GpsLost(reason=f"no fix (gpsd mode {mode})")
        if mode not in (2, 3):
            return None
        status = message.get("status", 0)
        if isinstance(status, bool) or not isinstance(status, int):
            return None  # gpsd sends an integer or nothing: a malformed TPV says nothing
        unmeasured = unmeasured_reason(status)
        if unmeasured is not None:
            return GpsLost(reason=f"{unmeasured} (gpsd status {status})")
        position = usable_position(message.get("lat"), message.get("lon"))
        if position is None:
            return None
        moment = _gpsd_time(message.get("time"))
        if (self._unmeasured is not None and moment is not None
                and _second_of_day(moment.time()) == self._epoch_second):
            return GpsLost(reason=self._unmeasured)
        return GpsFix(latitude=position[0], longitude=position[1],
                      accuracy_m=self._accuracy(message), mode=mode,
                      satellites_used=self.satellites_used,
                      satellites_visible=self.satellites_visible,
                      time=moment, hdop=self.hdop, source="gpsd")

    def _nmea(self, line: object) -> None:
        """Mark the epoch of an RMC or GGA sentence that says "not measured"."""
        if not isinstance(line, str):
            return
        if line.startswith("$$"):  # ST Teseo receivers, as in the NMEA replay
            line = line[1:]
        try:
            message = pynmea2.parse(line, check=True)
        except (pynmea2.ParseError, ValueError, TypeError, AttributeError, IndexError):
            return
        kind = getattr(message, "sentence_type", "")
        if kind not in ("RMC", "GGA"):
            return
        stamp = _field(message, "timestamp")
        if not isinstance(stamp, time):
            return
        second = _second_of_day(stamp)
        if second != self._epoch_second:
            self._epoch_second, self._unmeasured = second, None
        if kind == "RMC":
            mode = _field(message, "mode_indicator")
            status = FAA_MODE_STATUS.get(mode) if isinstance(mode, str) else None
            what = f"NMEA RMC mode {mode}"
        else:
            quality = _int_text(_field(message, "gps_qual"))
            status = GGA_QUALITY_STATUS.get(quality) if quality is not None else None
            what = f"NMEA GGA quality {quality}"
        reason = unmeasured_reason(status)
        if reason is not None and self._unmeasured is None:
            self._unmeasured = f"{reason} ({what}, via gpsd)"

    @staticmethod
    def _accuracy(message: dict[str, Any]) -> float | None:
        eph = _finite(message.get("eph"))
        if eph is not None and eph >= 0:
            return eph
        epx, epy = _finite(message.get("epx")), _finite(message.get("epy"))
        if epx is not None and epy is not None:
            return _finite(math.hypot(epx, epy))  # hypot of two huge values is inf
        return None

    def _sky(self, message: dict[str, Any]) -> None:
        raw = message.get("satellites")
        satellites = [s for s in raw if isinstance(s, dict)] if isinstance(raw, list) else None
        used = _count(message.get("uSat"))
        if used is None and satellites is not None:
            used = sum(1 for s in satellites if s.get("used") is True)
        visible = _count(message.get("nSat"))
        if visible is None and satellites is not None:
            visible = len(satellites)
        if used is not None:
            self.satellites_used = used
        if visible is not None:
            self.satellites_visible = visible
        hdop = _finite(message.get("hdop"))
        if hdop is not None and hdop > 0:
            self.hdop = hdop


class GpsdSource:
    """Positions from a running gpsd, over its JSON streaming interface (``?WATCH``).

    Connects with a timeout, sends :data:`WATCH_COMMAND` and reads newline-delimited JSON
    without blocking the event loop. Yields ``GpsLost`` once when: a TPV reports no fix
    (mode < 2); no usable TPV came for ``stale_after_s`` seconds (also at start); or gpsd cannot
    be reached or the connection drops. It then reconnects with exponential backoff from
    ``reconnect_min_s`` to ``reconnect_max_s`` seconds, reset once gpsd answers ``?WATCH``.
    A fix identical to the previous one (gpsd repeats a TPV within an epoch) is not repeated.

    Only one :meth:`stream` per instance should run at a time.
    """

    def __init__(self, host: str, port: int, *, stale_after_s: float = 5.0,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 10.0,
                 connect_timeout_s: float = 5.0) -> None:
        """Args:
            host: gpsd's host name or address (normally ``127.0.0.1``).
            port: gpsd's TCP port (normally 2947).
            stale_after_s: seconds without a usable TPV before the fix counts as lost.
            reconnect_min_s: first reconnect delay, seconds.
            reconnect_max_s: longest reconnect delay, seconds.
            connect_timeout_s: how long one connection attempt may take, seconds.

        Raises:
            ValueError: a bad port or a non-positive / inverted duration, named in the message.
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"port: expected an integer in [1, 65535], got {port!r}")
        if not isinstance(host, str) or not host:
            raise ValueError(f"host: expected a host name or address, got {host!r}")
        self.host = host
        self.port = port
        self.stale_after_s = _check_positive("stale_after_s", stale_after_s)
        self.reconnect_min_s = _check_positive("reconnect_min_s", reconnect_min_s)
        self.reconnect_max_s = _check_positive("reconnect_max_s", reconnect_max_s)
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s: expected >= reconnect_min_s "
                             f"({reconnect_min_s}), got {reconnect_max_s!r}")
        self.connect_timeout_s = _check_positive("connect_timeout_s", connect_timeout_s)
        self._watching = False

    @property
    def watching(self) -> bool:
        """True while connected to gpsd and gpsd has acknowledged ``?WATCH``."""
        return self._watching

    @property
    def _where(self) -> str:
        return f"gpsd at {self.host}:{self.port}"

    async def stream(self) -> AsyncIterator[GpsFix | GpsLost]:
        """Yield fixes from gpsd and one GpsLost per loss, forever (see the class docstring)."""
        loop = asyncio.get_running_loop()
        gate = _LossGate()
        tracker = GpsdFixTracker()
        last_usable = loop.time()  # no fix within stale_after_s of the start is a loss too
        delay = self.reconnect_min_s
        while True:
            reason: str
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that races with the read finishing, and the stream would then never stop.
                async with asyncio.timeout(self.connect_timeout_s):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
            except TimeoutError:
                reason = f"{self._where} did not answer within {self.connect_timeout_s:g} s"
            except OSError as exc:
                reason = f"{self._where} unreachable: {exc.strerror or exc}"
            else:
                log.info("connected to %s", self._where)
                decoder = GpsdDecoder()
                last_fix: GpsFix | None = None
                reason = "gpsd closed the connection"
                try:
                    writer.write(WATCH_COMMAND)
                    await writer.drain()
                    while True:
                        timeout = None
                        if not gate.lost:
                            timeout = max(0.0, last_usable + self.stale_after_s - loop.time())
                        try:
                            async with asyncio.timeout(timeout):
                                data = await reader.read(65536)
                        except TimeoutError:
                            gate.lose()
                            last_fix = None
                            yield GpsLost(reason=f"no position from gpsd for "
                                                 f"{self.stale_after_s:g} s")
                            continue
                        if not data:
                            break
                        for message in decoder.feed(data):
                            if message.get("class") == "WATCH" and not self._watching:
                                self._watching = True
                                delay = self.reconnect_min_s
                            item = tracker.handle(message)
                            if isinstance(item, GpsFix):
                                last_usable = loop.time()
                                gate.fix()
                                if item != last_fix:
                                    last_fix = item
                                    yield item
                            elif isinstance(item, GpsLost) and gate.lose():
                                last_fix = None
                                yield item
                except OSError as exc:
                    reason = f"connection to {self._where} lost: {exc.strerror or exc}"
                finally:
                    self._watching = False
                    writer.close()
                log.info("%s; retrying in %g s", reason, delay)
            if gate.lose():
                yield GpsLost(reason=reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_s)


# -- NMEA replay ------------------------------------------------------------------------

_DM = re.compile(r"^(\d{1,3})(\d\d(?:\.\d+)?)$")


def _nmea_degrees(value: str, hemisphere: str, positive: str, negative: str) -> float | None:
    """``dddmm.mmmm`` + hemisphere letter -> signed degrees, or None if malformed/empty."""
    match = _DM.match(value or "")
    if match is None or hemisphere not in (positive, negative):
        return None
    minutes = float(match.group(2))
    if minutes >= 60.0:
        return None
    degrees = int(match.group(1)) + minutes / 60.0
    return -degrees if hemisphere == negative else degrees


def _field(message: pynmea2.NMEASentence, name: str) -> Any:
    """A pynmea2 attribute, or None when the field is missing or fails to convert."""
    try:
        return getattr(message, name)
    except (ValueError, TypeError, AttributeError, IndexError):
        return None


def _float_text(value: object) -> float | None:
    if not isinstance(value, str) or not value:
        return _finite(value)
    try:
        return _finite(float(value))
    except ValueError:
        return None


@dataclass
class _Epoch:
    """What one NMEA epoch (sentences sharing a UTC time) said."""

    stamp: time | None = None
    valid: list[bool] = field(default_factory=list)
    statuses: list[tuple[int, str]] = field(default_factory=list)
    gga_position: tuple[float, float] | None = None
    rmc_position: tuple[float, float] | None = None
    hdop: float | None = None
    gsa_hdop: float | None = None
    used: int | None = None
    gsa_used: dict[str, set[str]] = field(default_factory=dict)
    day: date | None = None

    @property
    def reported(self) -> bool:
        return bool(self.valid)


def _int_text(value: object) -> int | None:
    """A non-negative decimal integer field (``"08"``), or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


class _NmeaReader:
    """Groups NMEA sentences into epochs and turns each into a fix or a loss."""

    def __init__(self) -> None:
        self.reports: list[GpsFix | GpsLost] = []
        self.epoch = _Epoch()
        self.day: date | None = None
        self.mode3 = False
        self.gsa_used: int | None = None
        self.in_view: dict[tuple[str, str], int] = {}

    def line(self, text: str) -> None:
        text = text.strip()
        if text.startswith("$$"):  # ST Teseo receivers: "$$GNRMC,...*hh", checksum as usual
            text = text[1:]
        if not text.startswith(("$", "!")):
            return
        try:
            message = pynmea2.parse(text, check=True)
        except (pynmea2.ParseError, ValueError, TypeError, AttributeError, IndexError):
            return
        kind = getattr(message, "sentence_type", "")
        if kind in ("RMC", "GGA", "GLL"):
            stamp = _field(message, "timestamp")
            if not isinstance(stamp, time):
                return
            if self.epoch.stamp is not None and stamp != self.epoch.stamp:
                self.finish()
            self.epoch.stamp = stamp
        if kind == "RMC":
            self._rmc(message)
        elif kind == "GGA":
            self._gga(message)
        elif kind == "GSA":
            self._gsa(message)
        elif kind == "GSV":
            self._gsv(message)

    def _rmc(self, message: pynmea2.NMEASentence) -> None:
        status = _field(message, "status")
        if status not in ("A", "V"):
            return
        mode = _field(message, "mode_indicator")
        mode = mode[:1] if isinstance(mode, str) else ""
        self.epoch.valid.append(status == "A" and mode != "N")
        if mode in FAA_MODE_STATUS:
            self.epoch.statuses.append((FAA_MODE_STATUS[mode], f"RMC mode {mode}"))
        day = _field(message, "datestamp")
        if isinstance(day, date):
            self.day = self.epoch.day = day
        lat = _nmea_degrees(_field(message, "lat"), _field(message, "lat_dir"), "N", "S")
        lon = _nmea_degrees(_field(message, "lon"), _field(message, "lon_dir"), "E", "W")
        self.epoch.rmc_position = usable_position(lat, lon)

    def _gga(self, message: pynmea2.NMEASentence) -> None:
        quality = _field(message, "gps_qual")
        if isinstance(quality, str):
            quality = int(quality) if quality.isdigit() else None
        if not isinstance(quality, int):
            return
        self.epoch.valid.append(quality > 0)
        if quality in GGA_QUALITY_STATUS:
            self.epoch.statuses.append((GGA_QUALITY_STATUS[quality], f"GGA quality {quality}"))
        lat = _nmea_degrees(_field(message, "lat"), _field(message, "lat_dir"), "N", "S")
        lon = _nmea_degrees(_field(message, "lon"), _field(message, "lon_dir"), "E", "W")
        self.epoch.gga_position = usable_position(lat, lon)
        hdop = _float_text(_field(message, "horizontal_dil"))
        self.epoch.hdop = hdop if hdop is not None and hdop > 0 else None
        self.epoch.used = _int_text(_field(message, "num_sats"))

    def _gsa(self, message: pynmea2.NMEASentence) -> None:
        """GSA: 2D/3D, the satellites used (one GSA per constellation since NMEA 4.10: the
        epoch's GSAs are added up, keyed by their system ID or talker) and the HDOP."""
        self.mode3 = _field(message, "mode_fix_type") == "3"
        ids = {sv for sv in (_field(message, f"sv_id{i:02d}") for i in range(1, 13))
               if isinstance(sv, str) and sv}
        data = getattr(message, "data", [])
        system = data[17] if len(data) > 17 and data[17] else getattr(message, "talker", "")
        self.epoch.gsa_used.setdefault(str(system), set()).update(ids)
        hdop = _float_text(_field(message, "hdop"))
        if hdop is not None and hdop > 0:
            self.epoch.gsa_hdop = hdop

    def _gsv(self, message: pynmea2.NMEASentence) -> None:
        """GSV: satellites in view, per constellation (talker); since NMEA 4.10 one GSV group
        per signal, so a constellation counts with its largest group, not their sum."""
        count = _int_text(_field(message, "num_sv_in_view"))
        if count is None:
            return
        data = getattr(message, "data", [])
        # A signal ID follows the satellite blocks: 3 + 4 * n fields, then one more.
        signal = data[-1] if len(data) > 3 and (len(data) - 3) % 4 == 1 else ""
        self.in_view[(getattr(message, "talker", ""), signal)] = count

    @property
    def visible(self) -> int | None:
        if not self.in_view:
            return None
        best: dict[str, int] = {}
        for (talker, _signal), count in self.in_view.items():
            best[talker] = max(count, best.get(talker, 0))
        return sum(best.values())

    def finish(self) -> None:
        epoch, self.epoch = self.epoch, _Epoch()
        if epoch.gsa_used:
            self.gsa_used = sum(len(ids) for ids in epoch.gsa_used.values())
        if not epoch.reported:
            return
        position = epoch.gga_position or epoch.rmc_position
        if not all(epoch.valid) or position is None:
            self.reports.append(GpsLost(reason="no fix in the NMEA log (RMC status V or GGA "
                                               "quality 0)"))
            return
        for status, what in epoch.statuses:
            unmeasured = unmeasured_reason(status)
            if unmeasured is not None:
                self.reports.append(GpsLost(reason=f"{unmeasured} (NMEA {what})"))
                return
        day = epoch.day or self.day
        moment = (datetime.combine(day, epoch.stamp.replace(tzinfo=None), tzinfo=UTC)
                  if day is not None and epoch.stamp is not None else None)
        hdop = epoch.hdop if epoch.hdop is not None else epoch.gsa_hdop
        self.reports.append(GpsFix(
            latitude=position[0], longitude=position[1],
            accuracy_m=None if hdop is None else hdop * NMEA_UERE_M,
            mode=3 if self.mode3 else 2,
            satellites_used=epoch.used if epoch.used is not None else self.gsa_used,
            satellites_visible=self.visible, time=moment, hdop=hdop, source="nmea"))


def parse_nmea_log(lines: Iterable[str]) -> list[GpsFix | GpsLost]:
    """Turn NMEA 0183 lines into one report per epoch (pure; parsing by pynmea2).

    An epoch is the run of sentences sharing one UTC time (RMC, GGA, GLL carry it; GSA, GSV
    and others join the current epoch). An epoch with an RMC or GGA gives:

    * a :class:`GpsFix` (``source="nmea"``) if every RMC says status ``A`` (and no mode
      indicator ``N``), every GGA quality > 0, no RMC mode indicator or GGA quality says the
      position was not measured (mapped to gpsd's status, judged by :func:`unmeasured_reason`:
      RMC mode E, M, S; GGA quality 6, 7, 8), and a usable position is present (GGA's, else
      RMC's; see :func:`usable_position`). ``mode`` is 3 if the latest GSA says 3D, else 2.
      ``hdop`` is GGA's HDOP, else the epoch's GSA HDOP; ``accuracy_m`` is
      ``hdop * NMEA_UERE_M`` or None. ``satellites_used`` is GGA's count, else the satellites
      of the latest epoch's GSAs (one per constellation, added up); ``satellites_visible`` is
      the GSV count, added up over the constellations (talkers) seen. ``time`` is the epoch's
      UTC time on the latest RMC date, or None without a date.
    * a :class:`GpsLost` otherwise, whose reason says which (no fix, or not measured: e.g.
      ``"receiver in simulation mode (NMEA RMC mode S)"``).

    Sentences may start with ``$$`` instead of ``$`` (ST Teseo receivers; gpsd accepts them).
    Lines that are not NMEA, fail their checksum (a checksum is required) or do not parse are
    skipped.

    Args:
        lines: the log's lines (comments and blank lines are allowed).

    Returns:
        The reports in log order.
    """
    reader = _NmeaReader()
    for text in lines:
        reader.line(text)
    reader.finish()
    return reader.reports


def _load_nmea(path: Path) -> list[GpsFix | GpsLost]:
    with path.open("rb") as handle:
        return parse_nmea_log(raw.decode("ascii", "replace") for raw in handle)


class NmeaReplaySource:
    """Replays an NMEA 0183 log file as live positions (for the field kit without a receiver).

    Reports come from :func:`parse_nmea_log`, one epoch every ``1 / rate`` seconds. With
    ``loop`` the log starts again at its end; without it, the source yields one
    ``GpsLost("end of NMEA log")`` at the end and then stays quiet until stopped.

    The file is read when :meth:`stream` starts, not at construction. A missing or unreadable
    file, or one with no RMC/GGA sentence, gives one ``GpsLost`` naming the file and the
    problem (no traceback), and the source tries again every ``retry_s`` seconds. (Built from
    the configuration by :func:`make_source`, a file missing at start is a ``ConfigError``
    instead; the retry covers a file that goes away or is replaced later.)
    """

    def __init__(self, path: Path, *, rate: float = 1.0, loop: bool = True,
                 retry_s: float = 5.0) -> None:
        """Args:
            path: the NMEA log file.
            rate: epochs replayed per second (> 0).
            loop: start again at the end of the log.
            retry_s: seconds between attempts to read a missing or unusable file.

        Raises:
            ValueError: ``rate`` or ``retry_s`` is not a finite number > 0.
        """
        self.path = Path(path)
        self.rate = _check_positive("rate", rate)
        self.loop = bool(loop)
        self.retry_s = _check_positive("retry_s", retry_s)

    async def stream(self) -> AsyncIterator[GpsFix | GpsLost]:
        """Yield the log's epochs at ``rate`` per second (see the class docstring)."""
        gate = _LossGate()
        reports: list[GpsFix | GpsLost] = []
        while not reports:
            try:
                reports = await asyncio.to_thread(_load_nmea, self.path)
                problem = "it has no RMC or GGA sentence"
            except OSError as exc:
                problem = f"cannot read it: {exc.strerror or type(exc).__name__}"
            if not reports:
                log.warning("NMEA log %s: %s; retrying in %g s", self.path, problem,
                            self.retry_s)
                if gate.lose():
                    yield GpsLost(reason=f"NMEA log {self.path.name}: {problem}")
                await asyncio.sleep(self.retry_s)
        interval = 1.0 / self.rate
        while True:
            for report in reports:
                if isinstance(report, GpsFix):
                    gate.fix()
                    yield report
                elif gate.lose():
                    yield report
                await asyncio.sleep(interval)
            if not self.loop:
                break
        if gate.lose():
            yield GpsLost(reason="end of NMEA log")
        await asyncio.Event().wait()  # stay quiet until the consumer stops


# -- simulated sources ------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


class FixedSource:
    """A configured position, not a receiver: the same fix every ``interval_s`` seconds.

    Its fixes say ``source="fixed"`` (mode 3, no satellites, no HDOP) so that the UI can show
    that no receiver measured them.
    """

    def __init__(self, latitude: float, longitude: float, accuracy_m: float | None, *,
                 interval_s: float = 1.0) -> None:
        """Args:
            latitude: WGS84 degrees.
            longitude: WGS84 degrees.
            accuracy_m: reported accuracy in metres (>= 0), or None.
            interval_s: seconds between fixes.

        Raises:
            ValueError: a coordinate out of range, a negative accuracy or a bad interval.
        """
        self.latitude, self.longitude = _check_position(latitude, longitude)
        if accuracy_m is not None and (_finite(accuracy_m) is None or accuracy_m < 0):
            raise ValueError(f"accuracy_m: expected metres >= 0 or None, got {accuracy_m!r}")
        self.accuracy_m = None if accuracy_m is None else float(accuracy_m)
        self.interval_s = _check_positive("interval_s", interval_s)

    async def stream(self) -> AsyncIterator[GpsFix | GpsLost]:
        """Yield the fix (time: now, UTC) at once and then every ``interval_s`` seconds."""
        while True:
            yield GpsFix(latitude=self.latitude, longitude=self.longitude,
                         accuracy_m=self.accuracy_m, mode=3, time=_now(), source="fixed")
            await asyncio.sleep(self.interval_s)


class WalkSource:
    """A simulated walker for the demo: a smooth random walk around a start point.

    Each step the heading turns by a small random angle (normal, sigma 0.3 rad) and the walker
    moves ``speed_m_s * interval_s`` metres; near the edge the heading is pulled towards the
    start point, and no position is ever more than ``radius_m`` from it. Positions use a local
    flat-earth approximation (good to well under a millimetre over a few hundred metres).
    With a ``seed`` the sequence of positions is the same on every run.
    """

    def __init__(self, latitude: float, longitude: float, *, radius_m: float,
                 speed_m_s: float = 1.2, interval_s: float = 1.0, seed: int | None = None,
                 accuracy_m: float = 4.0) -> None:
        """Args:
            latitude: start point, WGS84 degrees (|lat| < 89).
            longitude: start point, WGS84 degrees.
            radius_m: the walker stays within this many metres of the start point (> 0).
            speed_m_s: walking speed, metres per second (>= 0).
            interval_s: seconds between fixes (> 0).
            seed: seed of the walk's random generator; None for a different walk each run.
            accuracy_m: reported accuracy, metres (>= 0).

        Raises:
            ValueError: a value out of range, named in the message.
        """
        self.latitude, self.longitude = _check_position(latitude, longitude)
        if abs(self.latitude) >= 89.0:
            raise ValueError(f"latitude: the walker needs |latitude| < 89, got {latitude!r}")
        self.radius_m = _check_positive("radius_m", radius_m)
        speed = _finite(speed_m_s)
        if speed is None or speed < 0:
            raise ValueError(f"speed_m_s: expected metres per second >= 0, got {speed_m_s!r}")
        self.speed_m_s = speed
        self.interval_s = _check_positive("interval_s", interval_s)
        accuracy = _finite(accuracy_m)
        if accuracy is None or accuracy < 0:
            raise ValueError(f"accuracy_m: expected metres >= 0, got {accuracy_m!r}")
        self.accuracy_m = accuracy
        self.seed = seed

    def positions(self) -> Iterator[tuple[float, float]]:
        """The walk as an endless iterator of (latitude, longitude), starting at the start point.

        Pure apart from its own seeded generator: what :meth:`stream` yields, without clocks.
        """
        rng = random.Random(self.seed)
        heading = rng.uniform(-math.pi, math.pi)
        east = north = 0.0
        step = self.speed_m_s * self.interval_s
        metres_per_deg_lat = math.pi * EARTH_RADIUS_M / 180.0
        metres_per_deg_lon = metres_per_deg_lat * math.cos(math.radians(self.latitude))
        while True:
            yield (self.latitude + north / metres_per_deg_lat,
                   self.longitude + east / metres_per_deg_lon)
            heading += rng.gauss(0.0, 0.3)
            distance = math.hypot(east, north)
            edge = 0.6 * self.radius_m
            if distance > edge:
                home = math.atan2(-north, -east)
                pull = min(1.0, (distance - edge) / (self.radius_m - edge)) * 0.5
                turn = math.remainder(home - heading, math.tau)
                heading += pull * turn
            east += step * math.cos(heading)
            north += step * math.sin(heading)
            distance = math.hypot(east, north)
            limit = 0.98 * self.radius_m
            if distance > limit:
                east, north = east * limit / distance, north * limit / distance
                heading = math.atan2(-north, -east) + rng.uniform(-0.8, 0.8)

    async def stream(self) -> AsyncIterator[GpsFix | GpsLost]:
        """Yield a 3D fix (``source="walk"``, time: now, UTC) every ``interval_s`` seconds."""
        for latitude, longitude in self.positions():
            yield GpsFix(latitude=latitude, longitude=longitude, accuracy_m=self.accuracy_m,
                         mode=3, time=_now(), source="walk")
            await asyncio.sleep(self.interval_s)


# -- from configuration -----------------------------------------------------------------


NMEA_SNIFF_BYTES = 1 << 20
"""How much of an NMEA log :func:`make_source` reads at start looking for one NMEA sentence."""


def _is_nmea_sentence(text: str) -> bool:
    """True if ``text`` is one NMEA 0183 sentence that parses, checksum included (as
    :func:`parse_nmea_log` requires)."""
    text = text.strip()
    if text.startswith("$$"):
        text = text[1:]
    if not text.startswith(("$", "!")):
        return False
    try:
        pynmea2.parse(text, check=True)
    except (pynmea2.ParseError, ValueError, TypeError, AttributeError, IndexError):
        return False
    return True


def _check_log_file(path: Path) -> None:
    """Raise ConfigError (``gps.path``) unless ``path`` is a file that can be opened for reading
    and holds an NMEA sentence in its first :data:`NMEA_SNIFF_BYTES` (a GPX track or another
    file given by mistake would otherwise be retried forever)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(NMEA_SNIFF_BYTES)
    except OSError as exc:
        raise ConfigError("gps.path", f"an NMEA log file that can be read "
                          f"({exc.strerror or type(exc).__name__})", str(path)) from None
    text = head.decode("ascii", "replace")
    if any(_is_nmea_sentence(line) for line in text.splitlines()):
        return
    if not head.strip():
        why = "it is empty"
    elif "<gpx" in text[:4096]:
        why = ("it is a GPX track, which fanny-sim plays (a scenario's [scenario] gpx), not "
               "[gps] source = \"nmea\"")
    else:
        why = "it holds no NMEA sentence ($GPRMC,... with its checksum)"
    raise ConfigError("gps.path", f"an NMEA 0183 log ({why})", str(path))


def make_source(gps: GpsConfig) -> PositionSource:
    """Build the position source a ``[gps]`` configuration asks for.

    Args:
        gps: the parsed ``[gps]`` table; ``source`` is ``gpsd``, ``nmea`` or ``fixed``.

    Returns:
        A :class:`GpsdSource`, :class:`NmeaReplaySource` or :class:`FixedSource`.

    Raises:
        ConfigError: ``source = "nmea"`` and ``gps.path`` does not exist, cannot be read, or
            holds no NMEA sentence at all (a GPX track, say) in its first
            :data:`NMEA_SNIFF_BYTES` (checked here, at start, rather than retried forever: one
            line naming ``gps.path``, which the CLI prints as a config error). A log with NMEA
            sentences but no RMC or GGA is retried by the source, as a file replaced later.
        ValueError: an unknown source, or a value the source needs is missing or bad
            (the message names the ``gps.`` key).
    """
    try:
        if gps.source == "gpsd":
            return GpsdSource(gps.host, gps.port, stale_after_s=gps.stale_after_s)
        if gps.source == "nmea":
            if gps.path is None:
                raise ValueError('path: the NMEA log to replay is required when source = "nmea"')
            _check_log_file(Path(gps.path))
            return NmeaReplaySource(gps.path, rate=gps.rate, loop=gps.loop)
        if gps.source == "fixed":
            if gps.latitude is None or gps.longitude is None:
                raise ValueError('latitude, longitude: required when source = "fixed"')
            return FixedSource(gps.latitude, gps.longitude, gps.accuracy_m)
    except ValueError as exc:
        raise ValueError(f"gps.{exc}") from None
    raise ValueError(f'gps.source: expected one of "gpsd", "nmea", "fixed", got {gps.source!r}')
