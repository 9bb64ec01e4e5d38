"""Scenario files for ``fanny-sim``: a TOML description plus GPX 1.1 tracks or generated walks.

A scenario file (TOML; every table optional except that there must be at least one device)::

    [scenario]
    name = "street"            # default: the file's stem
    gpx = "street.gpx"         # GPX 1.1, one <trk> per device (timestamps required);
                               # relative to the TOML file
    duration_s = 900           # scenario seconds; default: the span of the GPX timestamps
    seed = 1                   # seeds the GPS noise (and walks without their own seed)
    speed = 10                 # default time compression (fanny-sim --speed overrides it)

    [[walk]]                   # a generated walk (fanny_tui.gps.WalkSource), any number
    name = "walker-1"
    latitude = 43.6045         # centre, WGS84 degrees
    longitude = 1.444
    radius_m = 30              # stays within this many metres of the centre
    speed_m_s = 1.2            # default 1.2
    seed = 7                   # default: scenario seed + index
    start_s = 0                # default 0: present from this scenario second...
    end_s = 900                # ...to this one (default: duration_s, else the GPX's end)

    [noise]                    # the GPS error model (fanny_tui.sim.tracks.NoiseModel)
    sigma_m = 5.0              # standard deviation per axis (east, north), metres
    correlation_s = 60.0       # AR(1) correlation time, scenario seconds (0: white noise)
    outlier_rate = 0.0         # probability that one fix is an outlier
    outlier_m = 100.0          # an outlier's jump, metres, in a random direction
    loss_rate = 0.0            # fix losses starting per scenario second
    loss_s = 30.0              # a fix loss's duration, scenario seconds
    fix_interval_s = 1.0       # seconds between two fixes of the simulated receiver

    [truth]                    # what counts as a true contact (the judge, not the devices)
    radius_m = 10.0            # true distance <= radius_m...
    duration_s = 300.0         # ...for at least this long (a maximal interval)
    close_radius_m = 3.0       # optional: a closer tier, the contacts that must count (true
                               # distance <= close_radius_m for duration_s); recall on it is
                               # reported beside the main one. At most radius_m.

    [protocol]                 # the devices' [protocol] keys, in scenario seconds
    radius_m = 10.0
    min_contact_s = 0.0

Times in tracks are UTC; the scenario's second 0 is the earliest GPX timestamp. A device is
present (has a fix) only between its track's first and last point.

Errors are :class:`~fanny_tui.config.ConfigError`: one line naming the file and the key.
"""

from __future__ import annotations

import bisect
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import gpxpy
import gpxpy.gpx

from ..config import ConfigError, ConfigSection, ProtocolConfig, parse_config
from ..gps import WalkSource

#: The device ``[protocol]`` keys a scenario may set (and ``--sweep`` may vary).
PROTOCOL_KEYS = ("radius_m", "position_interval_s", "poll_interval_s", "handshake_timeout_s",
                 "min_contact_s", "contact_gap_s", "max_contact_s", "max_speed_mps")


@dataclass(frozen=True)
class Track:
    """One device's true path (noise-free).

    Attributes:
        name: the device's name (the GPX ``<trk><name>``, or the walk's name).
        times_s: strictly increasing scenario seconds of the points.
        latitudes / longitudes: WGS84 degrees of the points.

    Between two points the device moves in a straight line at constant speed; before the first
    and after the last it is absent (no fix).
    """

    name: str
    times_s: tuple[float, ...]
    latitudes: tuple[float, ...]
    longitudes: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.times_s:
            raise ValueError(f"track {self.name!r}: no point")
        if not len(self.times_s) == len(self.latitudes) == len(self.longitudes):
            raise ValueError(f"track {self.name!r}: times and coordinates differ in length")
        if any(b <= a for a, b in zip(self.times_s, self.times_s[1:], strict=False)):
            raise ValueError(f"track {self.name!r}: times must be strictly increasing")

    @property
    def start_s(self) -> float:
        return self.times_s[0]

    @property
    def end_s(self) -> float:
        return self.times_s[-1]

    def position_at(self, t_s: float) -> tuple[float, float] | None:
        """The true (latitude, longitude) at scenario second ``t_s``; None when absent."""
        times = self.times_s
        if t_s < times[0] or t_s > times[-1]:
            return None
        i = bisect.bisect_right(times, t_s) - 1
        if i >= len(times) - 1:
            return self.latitudes[-1], self.longitudes[-1]
        f = (t_s - times[i]) / (times[i + 1] - times[i])
        return (self.latitudes[i] + f * (self.latitudes[i + 1] - self.latitudes[i]),
                self.longitudes[i] + f * (self.longitudes[i + 1] - self.longitudes[i]))


@dataclass(frozen=True)
class NoiseSpec:
    """``[noise]``: see :class:`~fanny_tui.sim.tracks.NoiseModel` (metres, scenario seconds)."""

    sigma_m: float = 0.0
    correlation_s: float = 60.0
    outlier_rate: float = 0.0
    outlier_m: float = 100.0
    loss_rate: float = 0.0
    loss_s: float = 30.0
    fix_interval_s: float = 1.0


#: The ``[noise]`` keys (``--sweep`` may vary them too).
NOISE_KEYS = tuple(f.name for f in fields(NoiseSpec))


@dataclass(frozen=True)
class TruthSpec:
    """``[truth]``: a true contact is a maximal interval with true distance <= ``radius_m``
    metres lasting >= ``duration_s`` scenario seconds.

    ``close_radius_m`` (metres, at most ``radius_m``; None: no closer tier): a **close
    contact** is a true contact of the same definition at this radius (the contacts that must
    count, e.g. people 1-3 m apart for minutes); its pairs are a subset of the true pairs, and
    ``fanny-sim`` reports the recall on them beside the main recall.
    """

    radius_m: float = 10.0
    duration_s: float = 300.0
    close_radius_m: float | None = None


@dataclass(frozen=True)
class Scenario:
    """A loaded scenario.

    Attributes:
        name: the scenario's name.
        tracks: one per device, names unique.
        duration_s: scenario seconds simulated (from second 0).
        noise / truth: the GPS error model and the contact definition.
        protocol: the devices' ``[protocol]`` settings given in the file (scenario seconds).
        seed: the seed of the noise.
        speed: the default time compression factor (>= 1 plays faster than real time).
    """

    name: str
    tracks: tuple[Track, ...]
    duration_s: float
    noise: NoiseSpec = NoiseSpec()
    truth: TruthSpec = TruthSpec()
    protocol: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0
    speed: float = 1.0


# -- GPX -------------------------------------------------------------------------------------


def tracks_from_gpx(text: str, *, what: str = "GPX") -> tuple[list[Track], datetime]:
    """Read one :class:`Track` per ``<trk>`` of a GPX 1.0/1.1 document (parsed by gpxpy).

    Args:
        text: the GPX document.
        what: how errors name the document (its file name).

    Returns:
        The tracks, their times in seconds from the earliest timestamp of the document, and
        that earliest timestamp (aware UTC).

    Raises:
        ValueError: not GPX, no track, a track without a name or duplicated, a point without a
            timestamp, or timestamps that do not increase (one line, naming the track).
    """
    try:
        document = gpxpy.parse(text)
    except (gpxpy.gpx.GPXException, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{what}: not a readable GPX document ({first})") from None
    raw: list[tuple[str, list[tuple[datetime, float, float]]]] = []
    for index, trk in enumerate(document.tracks):
        name = (trk.name or "").strip() or f"track-{index + 1}"
        points = []
        for segment in trk.segments:
            for number, point in enumerate(segment.points, start=1):
                if point.time is None:
                    raise ValueError(f"{what}: track {name!r} point {number} has no <time>")
                moment = point.time if point.time.tzinfo else point.time.replace(tzinfo=UTC)
                points.append((moment.astimezone(UTC), point.latitude, point.longitude))
        if not points:
            raise ValueError(f"{what}: track {name!r} has no point")
        raw.append((name, points))
    if not raw:
        raise ValueError(f"{what}: no <trk> (one track per device is expected)")
    names = [name for name, _ in raw]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ValueError(f"{what}: two tracks are named {duplicate!r}")
    origin = min(p[0] for _, points in raw for p in points)
    tracks = []
    for name, points in raw:
        times = tuple((p[0] - origin).total_seconds() for p in points)
        if any(b <= a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"{what}: track {name!r}: timestamps must increase")
        tracks.append(Track(name, times, tuple(p[1] for p in points),
                            tuple(p[2] for p in points)))
    return tracks, origin


def tracks_to_gpx(tracks: Sequence[Track], origin: datetime, *, creator: str = "fanny-sim"
                  ) -> str:
    """The GPX 1.1 document of ``tracks`` (one ``<trk>`` each; times from ``origin``, UTC)."""
    document = gpxpy.gpx.GPX()
    document.creator = creator
    for track in tracks:
        trk = gpxpy.gpx.GPXTrack(name=track.name)
        segment = gpxpy.gpx.GPXTrackSegment()
        for t, lat, lon in zip(track.times_s, track.latitudes, track.longitudes, strict=True):
            segment.points.append(gpxpy.gpx.GPXTrackPoint(
                round(lat, 7), round(lon, 7), time=origin + timedelta(seconds=t)))
        trk.segments.append(segment)
        document.tracks.append(trk)
    return document.to_xml(version="1.1")


# -- walks ------------------------------------------------------------------------------------


def walk_track(name: str, latitude: float, longitude: float, *, radius_m: float,
               speed_m_s: float, seed: int, start_s: float, end_s: float) -> Track:
    """A generated walk (:class:`~fanny_tui.gps.WalkSource`'s seeded walk), one point a second.

    Raises:
        ValueError: a bad value (named), or ``end_s <= start_s``.
    """
    if not end_s > start_s:
        raise ValueError(f"end_s: expected more than start_s ({start_s}), got {end_s!r}")
    walker = WalkSource(latitude, longitude, radius_m=radius_m, speed_m_s=speed_m_s,
                        interval_s=1.0, seed=seed)
    count = int(math.floor(end_s - start_s)) + 1
    points = list(islice(walker.positions(), count))
    return Track(name, tuple(start_s + i for i in range(count)),
                 tuple(p[0] for p in points), tuple(p[1] for p in points))


# -- TOML -------------------------------------------------------------------------------------


def parse_noise(data: Mapping[str, Any]) -> NoiseSpec:
    """The ``[noise]`` table as a :class:`NoiseSpec` (errors name ``noise.KEY``)."""
    s = ConfigSection(data, "noise", set(NOISE_KEYS))
    d = NoiseSpec
    return NoiseSpec(
        sigma_m=s.number("sigma_m", d.sigma_m, low=0.0, high=1000.0),
        correlation_s=s.number("correlation_s", d.correlation_s, low=0.0, high=86_400.0),
        outlier_rate=s.number("outlier_rate", d.outlier_rate, low=0.0, high=1.0),
        outlier_m=s.number("outlier_m", d.outlier_m, low=0.0, high=100_000.0),
        loss_rate=s.number("loss_rate", d.loss_rate, low=0.0, high=1.0),
        loss_s=s.number("loss_s", d.loss_s, low=0.0, high=86_400.0),
        fix_interval_s=s.number("fix_interval_s", d.fix_interval_s, low=0.1, high=60.0))


def _truth(data: Mapping[str, Any]) -> TruthSpec:
    s = ConfigSection(data, "truth", {"radius_m", "duration_s", "close_radius_m"})
    radius_m = s.number("radius_m", TruthSpec.radius_m, positive=True, high=10_000.0)
    close_radius_m = None
    if "close_radius_m" in data:
        close_radius_m = s.number("close_radius_m", radius_m, positive=True, high=10_000.0)
        if close_radius_m > radius_m:
            raise ConfigError("truth.close_radius_m",
                              f"a number <= truth.radius_m ({radius_m:g})", close_radius_m)
    return TruthSpec(radius_m=radius_m,
                     duration_s=s.number("duration_s", TruthSpec.duration_s, low=0.0,
                                         high=86_400.0),
                     close_radius_m=close_radius_m)


def check_protocol(values: Mapping[str, Any]) -> ProtocolConfig:
    """The devices' ``[protocol]`` table as the engine will parse it (errors name the key).

    Raises:
        ConfigError: an unknown or bad key (``protocol.KEY``).
    """
    return parse_config({"protocol": dict(values)}).protocol


def _walks(items: object, seed: int, duration_s: float | None) -> list[Track]:
    if not isinstance(items, list):
        raise ConfigError("walk", "an array of tables [[walk]]", items)
    tracks = []
    for index, item in enumerate(items):
        key = f"walk[{index}]"
        s = ConfigSection(item, key, {"name", "latitude", "longitude", "radius_m", "speed_m_s",
                                 "seed", "start_s", "end_s"})
        name = s.string("name", None) or f"walker-{index + 1}"
        if "latitude" not in item or "longitude" not in item:
            raise ConfigError(f"{key}.latitude", "the walk's centre (latitude and longitude)")
        if "end_s" in item:
            end = s.number("end_s", 0.0, low=0.0, high=7 * 86_400.0)
        elif duration_s is not None:
            end = duration_s
        else:
            raise ConfigError(f"{key}.end_s", "the walk's end (or [scenario] duration_s)")
        try:
            tracks.append(walk_track(
                name, s.number("latitude", 0.0, low=-89.0, high=89.0),
                s.number("longitude", 0.0, low=-180.0, high=180.0),
                radius_m=s.number("radius_m", 30.0, positive=True, high=10_000.0),
                speed_m_s=s.number("speed_m_s", 1.2, low=0.0, high=100.0),
                seed=s.integer("seed", seed + index, -(2**63), 2**63 - 1),
                start_s=s.number("start_s", 0.0, low=0.0, high=7 * 86_400.0), end_s=end))
        except ValueError as exc:  # WalkSource's own checks: "name: expected ..."
            what, _, expected = str(exc).partition(": expected ")
            raise ConfigError(f"{key}.{what}", expected) from None
    return tracks


def parse_scenario(data: Mapping[str, Any], *, base_dir: Path, default_name: str = "scenario"
                   ) -> Scenario:
    """Build a :class:`Scenario` from its TOML mapping (reads the GPX file it names).

    Raises:
        ConfigError: an unknown table or key, a bad value, an unreadable or invalid GPX file
            (one line naming the key).
    """
    tables = {"scenario", "walk", "noise", "truth", "protocol"}
    unknown = sorted(set(data) - tables)
    if unknown:
        raise ConfigError(unknown[0], f"one of the tables {sorted(tables)}")
    s = ConfigSection(data.get("scenario", {}), "scenario",
                 {"name", "description", "gpx", "duration_s", "seed", "speed"})
    name = s.string("name", None) or default_name
    s.string("description", None)
    seed = s.integer("seed", 0, -(2**63), 2**63 - 1)
    speed = s.number("speed", 1.0, low=0.01, high=1000.0)
    duration = s.number("duration_s", 1.0, positive=True, high=7 * 86_400.0) \
        if "duration_s" in s.data else None
    noise, truth = parse_noise(data.get("noise", {})), _truth(data.get("truth", {}))
    protocol = data.get("protocol", {})
    if not isinstance(protocol, Mapping):
        raise ConfigError("protocol", "a table", protocol)
    check_protocol(protocol)
    tracks: list[Track] = []
    gpx_name = s.string("gpx", None)
    if gpx_name is not None:
        path = base_dir / gpx_name
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError("scenario.gpx", f"a readable GPX 1.1 file ({path.name}: {why})") \
                from None
        try:
            tracks, _origin = tracks_from_gpx(text, what=path.name)
        except ValueError as exc:
            raise ConfigError("scenario.gpx", f"one <trk> per device with timestamps ({exc})") \
                from None
    walk_end = duration if duration is not None or not tracks else max(t.end_s for t in tracks)
    tracks += _walks(data.get("walk", []), seed, walk_end)
    if not tracks:
        raise ConfigError("scenario.gpx", "a GPX file or at least one [[walk]] (no device)")
    names = [t.name for t in tracks]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError("walk", f"device names that are unique ({duplicate!r} twice)")
    if duration is None:
        duration = max(t.end_s for t in tracks)
        if duration <= 0:
            raise ConfigError("scenario.duration_s", "a duration (the tracks span no time)")
    return Scenario(name=name, tracks=tuple(tracks), duration_s=duration, noise=noise, truth=truth,
                    protocol={k: float(v) for k, v in protocol.items()}, seed=seed, speed=speed)


def load_scenario(path: Path) -> Scenario:
    """Read a scenario TOML file (and the GPX file it names, relative to it).

    Raises:
        ConfigError: one line starting with the file name and naming the key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise ConfigError("file", "a readable scenario TOML file", source=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("file", "UTF-8 text", source=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", f"valid TOML ({exc})", source=str(path)) from None
    try:
        return parse_scenario(data, base_dir=path.parent, default_name=path.stem)
    except ConfigError as exc:
        raise ConfigError(exc.key, str(exc).split(": expected ", 1)[1], source=str(path)) \
            from None
