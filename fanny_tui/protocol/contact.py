"""The narrow contact, measured peer to peer (paper section 2; issue 6, point 1). Pure.

While the data channel is open both devices send each other their latest fix; each side feeds
its own fixes (:meth:`ContactMeter.own`) and the peer's (:meth:`ContactMeter.peer`) to a
:class:`ContactMeter`, which turns them into samples and the contact's measures:

* a **sample** is made for every accepted peer position while this side has an accepted fix:
  the haversine distance between the two latest fixes (metres), the bearing to the peer and the
  verdict of the one accuracy rule, :func:`~fanny_tui.protocol.proximity.within_radius`
  (``in``, ``uncertain`` or ``out``; ``uncertain`` never counts as within);
* **implausible jumps** are rejected: a fix implying a speed above ``max_speed_mps`` since the
  same device's previous *accepted* fix is never used (so one outlier never makes a contact).
  The first fix of each device is accepted; a rejected fix leaves the previous one in place, so
  a device that really moved is accepted again once the elapsed time makes the move plausible,
  or after :data:`JUMP_CONFIRMATIONS` consecutive rejected fixes that agree with each other;
* **duration within the radius** (``duration_s``): the span from the first ``in`` sample to the
  latest, where a gap between two consecutive ``in`` samples shorter than ``contact_gap_s``
  is bridged; a longer gap starts a new span and the spans add up;
* **closest / median distance** (``closest_m``, ``median_m``, metres) over every sample of the
  contact (any verdict), and the **sample count**.

Times are seconds of a monotonic clock passed in (``now``); nothing here reads a clock. No
absolute time and no position leaves this object: the measures are relative (docs/protocol.md,
"Contact measures").
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .proximity import METRES_PER_DEGREE, Verdict, bearing_deg, haversine_m, within_radius

DEFAULT_MAX_SPEED_MPS = 30.0
"""The implausible-jump bound by default, metres per second (108 km/h): the devices'
``[protocol] max_speed_mps`` and the broker's ``[matching] max_speed_mps``."""


@dataclass(frozen=True)
class Fix:
    """A position: WGS84 degrees and the 95 % horizontal accuracy in metres (None: unknown)."""

    latitude: float
    longitude: float
    accuracy_m: float | None = None


@dataclass(frozen=True)
class ContactMeasures:
    """The measures of one contact: seconds within the radius, closest and median distance in
    metres (None before any sample), number of samples. No timestamp, no position."""

    duration_s: float = 0.0
    closest_m: float | None = None
    median_m: float | None = None
    samples: int = 0


@dataclass(frozen=True)
class Sample:
    """One position sample of a contact, as seen from this device.

    ``distance_m`` (metres), ``bearing_deg`` (this device to the peer, degrees clockwise from
    true north), ``peer_accuracy_m`` (metres, 95 %, None: unknown), ``verdict`` (the accuracy
    rule), ``within_s`` (duration within the radius so far) and ``samples`` (count so far).
    """

    distance_m: float
    bearing_deg: float
    peer_accuracy_m: float | None
    verdict: Verdict
    within_s: float
    samples: int


@dataclass(frozen=True)
class ContactSettings:
    """The contact parameters of one device (``[protocol]`` in the config).

    ``radius_m`` (metres, > 0), ``min_contact_s`` (seconds within the radius before the token,
    >= 0), ``contact_gap_s`` (seconds without an ``in`` sample that end the contact, > 0),
    ``max_contact_s`` (longest contact, seconds), ``max_speed_mps`` (metres per second above
    which a move is an implausible jump), ``position_interval_s`` (seconds between two
    positions sent to the peer), ``token_timeout_s`` (seconds from sending the token, or from
    being asked to store it, to the ack). Defaults are the config's.

    Raises:
        ValueError: a value out of range (named).
    """

    radius_m: float = 10.0
    min_contact_s: float = 0.0
    contact_gap_s: float = 30.0
    max_contact_s: float = 3600.0
    max_speed_mps: float = DEFAULT_MAX_SPEED_MPS
    position_interval_s: float = 5.0
    token_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("radius_m", "contact_gap_s", "max_contact_s", "max_speed_mps",
                     "position_interval_s", "token_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        value = self.min_contact_s
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"min_contact_s must be a number >= 0, got {value!r}")

    @property
    def silence_s(self) -> float:
        """Seconds without any frame from the peer that end the contact (heartbeat loss):
        ``max(3 * position_interval_s, contact_gap_s)``."""
        return max(3 * self.position_interval_s, self.contact_gap_s)


JUMP_CONFIRMATIONS = 3
"""Consecutive rejected fixes, each plausible after the one before, that show the device
really is elsewhere: the last of them is accepted (docs/protocol.md, "Contact measures")."""

JUMP_ACCEPTED = 0
""":func:`jump_verdict`: the fix is accepted."""
JUMP_REPEATED = -1
""":func:`jump_verdict`: the fix is rejected and repeats the run's last position."""

Stamped = tuple[float, float, float]
"""A position and when it was seen: (latitude, longitude in WGS84 degrees, seconds)."""


def _plausible(max_speed_mps: float, lat1: float, lon1: float, at: float,
               lat2: float, lon2: float, now: float) -> bool:
    """Whether moving from (lat1, lon1) seen at ``at`` to (lat2, lon2) seen at ``now`` is at
    most ``max_speed_mps``: the haversine distance against the speed times the seconds."""
    reach = max_speed_mps * max(0.0, now - at)
    # A meridian then a parallel is never shorter than the great circle: under the bound
    # (with a margin far above rounding) the haversine is too, and is not computed (the
    # broker's hot path: most updates move a few metres in seconds).
    if (abs(lat2 - lat1) + abs(lon2 - lon1)) * METRES_PER_DEGREE < 0.999999 * reach:
        return True
    return haversine_m(lat1, lon1, lat2, lon2) <= reach


def jump_verdict(max_speed_mps: float, latitude: float, longitude: float, now: float,
                 anchor: Stamped | None, run: Stamped | None, run_length: int,
                 confirmations: int = JUMP_CONFIRMATIONS) -> int:
    """The implausible-jump rule for one device's next fix (docs/protocol.md, "Contact
    measures"; issue 6, point 1). Pure: the one copy of the rule, applied by
    :class:`JumpFilter` on the devices and by the broker (``broker.state.BrokerState`` and
    ``broker.redis_backend``) to each session's position updates.

    A fix is plausible when its haversine distance from ``anchor`` (the last accepted fix) is
    at most ``max_speed_mps`` times the seconds since the anchor. An implausible fix is
    rejected, unless it ends a run of ``confirmations`` rejected fixes, each plausible after
    the one before: the device then really is elsewhere. A fix at the position of the run's
    last one (the same fix fed or sent again) confirms nothing.

    Args:
        max_speed_mps: the bound, metres per second (> 0).
        latitude: the fix, WGS84 degrees.
        longitude: the fix, WGS84 degrees.
        now: when the fix was seen, seconds of a monotonic clock.
        anchor: the last accepted fix and when it was seen; None: none yet (accepted).
        run: the last fix of the current run of rejected fixes and when it was seen; None: no
            run (``run_length`` 0).
        run_length: rejected fixes in the current run (0 .. ``confirmations - 1``).
        confirmations: rejected fixes in a run that re-anchor (>= 2).

    Returns:
        :data:`JUMP_ACCEPTED` (0): accepted; it becomes the anchor and the run is emptied.
        :data:`JUMP_REPEATED` (-1): rejected; the run is unchanged.
        n >= 1: rejected; the run now holds n fixes and ends with this one (1: a new run).
    """
    if anchor is None:
        return JUMP_ACCEPTED
    a_lat, a_lon, a_at = anchor
    if _plausible(max_speed_mps, a_lat, a_lon, a_at, latitude, longitude, now):
        return JUMP_ACCEPTED
    if run is None or run_length <= 0:
        length = 1
    else:
        r_lat, r_lon, r_at = run
        if r_lat == latitude and r_lon == longitude:
            return JUMP_REPEATED
        plausible = _plausible(max_speed_mps, r_lat, r_lon, r_at, latitude, longitude, now)
        length = run_length + 1 if plausible else 1
    return JUMP_ACCEPTED if length >= confirmations else length


class JumpFilter:
    """Accepts one device's fixes unless one implies a speed above ``max_speed_mps``
    (the rule: :func:`jump_verdict`).

    A fix is plausible when the distance from the last accepted fix (metres) is at most
    ``max_speed_mps`` times the seconds since it was accepted. An implausible fix is rejected,
    unless it ends a run of :data:`JUMP_CONFIRMATIONS` rejected fixes, each plausible after the
    one before (a fix at the position of the one before, such as the same fix fed again at
    every tick, confirms nothing and is skipped): the device then really is elsewhere (a
    receiver's wrong first fix after a cold start, a ride faster than the bound) and that fix
    is accepted. A single jump, or two in a row, is never accepted; without the confirmations
    one wrong first fix would hold off every true one for distance / ``max_speed_mps`` seconds
    (an hour for 100 km at 30 m/s).
    """

    def __init__(self, max_speed_mps: float, confirmations: int = JUMP_CONFIRMATIONS) -> None:
        if confirmations < 2:
            raise ValueError(f"confirmations must be at least 2, got {confirmations}")
        self.max_speed_mps = max_speed_mps
        self.confirmations = confirmations
        self.last: Fix | None = None
        self._at = 0.0
        self._run: Stamped | None = None   # the last rejected fix of the current run
        self._run_length = 0
        self.rejected = 0

    def accept(self, fix: Fix, now: float) -> bool:
        """True (and remembered) when ``fix`` is plausible after the last accepted one, or
        confirms a run of rejected fixes (see the class docstring)."""
        last = self.last
        verdict = jump_verdict(
            self.max_speed_mps, fix.latitude, fix.longitude, now,
            None if last is None else (last.latitude, last.longitude, self._at),
            self._run, self._run_length, self.confirmations)
        if verdict == JUMP_ACCEPTED:
            self._run, self._run_length = None, 0
            self.last, self._at = fix, now
            return True
        if verdict > 0:
            self._run, self._run_length = (fix.latitude, fix.longitude, now), verdict
        self.rejected += 1
        return False

    def forget(self) -> None:
        """Drop every fix held (the accepted one and a pending run); the count stays."""
        self.last, self._at = None, 0.0
        self._run, self._run_length = None, 0


class ContactMeter:
    """Samples and measures of one contact (see the module docstring for the rules).

    Args:
        radius_m: the effective radius in metres (the smaller of the two devices').
        contact_gap_s: gaps between ``in`` samples shorter than this are bridged (seconds).
        max_speed_mps: the implausible-jump bound, metres per second.
    """

    def __init__(self, radius_m: float, contact_gap_s: float, max_speed_mps: float) -> None:
        self.radius_m = radius_m
        self.contact_gap_s = contact_gap_s
        self._own = JumpFilter(max_speed_mps)
        self._peer = JumpFilter(max_speed_mps)
        self._mine: Fix | None = None     # this device's current fix (None: none now)
        self._distances: list[float] = []
        self._spans_s = 0.0           # closed spans
        self._span_start: float | None = None
        self.last_in: float | None = None
        """``now`` of the latest ``in`` sample, None before the first."""

    @property
    def rejected(self) -> int:
        """Fixes rejected as implausible jumps (both devices)."""
        return self._own.rejected + self._peer.rejected

    @property
    def within_s(self) -> float:
        """Seconds within the radius so far (bridged spans added up)."""
        if self._span_start is None or self.last_in is None:
            return self._spans_s
        return self._spans_s + (self.last_in - self._span_start)

    def own(self, fix: Fix | None, now: float) -> bool:
        """This device's latest fix (None: no fix now, e.g. the receiver lost it).

        While this device has no fix, the peer's positions make no sample: the distance to a
        last known position is not a measure of where the device is now (a device that left
        with its fix lost would otherwise go on counting time within the radius). The jump
        rule keeps its anchor across the loss.

        Returns:
            True when ``fix`` is this device's position from now on; False for None or a
            rejected jump (the fix before it stays current).
        """
        if fix is None:
            self._mine = None
            return False
        if not self._own.accept(fix, now):
            return False
        self._mine = fix
        return True

    def peer(self, fix: Fix, now: float) -> Sample | None:
        """The peer's position, received at ``now``.

        Returns:
            The sample, or None when the fix is a rejected jump or this side has no fix yet.
        """
        if not self._peer.accept(fix, now):
            return None
        mine = self._mine
        if mine is None:
            return None
        distance = haversine_m(mine.latitude, mine.longitude, fix.latitude, fix.longitude)
        verdict = within_radius(distance, self.radius_m, mine.accuracy_m, fix.accuracy_m)
        self._distances.append(distance)
        if verdict == "in":
            if self.last_in is None or self._span_start is None:
                self._span_start = now
            elif now - self.last_in >= self.contact_gap_s:
                self._spans_s += self.last_in - self._span_start
                self._span_start = now
            self.last_in = now
        return Sample(distance_m=distance,
                      bearing_deg=bearing_deg(mine.latitude, mine.longitude,
                                              fix.latitude, fix.longitude),
                      peer_accuracy_m=fix.accuracy_m, verdict=verdict,
                      within_s=self.within_s, samples=len(self._distances))

    def forget_positions(self) -> None:
        """Drop both devices' last fixes (the contact ended); the measures stay."""
        self._own.forget()
        self._peer.forget()
        self._mine = None

    def measures(self) -> ContactMeasures:
        """The contact's measures so far."""
        if not self._distances:
            return ContactMeasures(duration_s=self.within_s)
        return ContactMeasures(duration_s=self.within_s, closest_m=min(self._distances),
                               median_m=statistics.median(self._distances),
                               samples=len(self._distances))


def merge_measures(earlier: ContactMeasures, latest: ContactMeasures) -> ContactMeasures:
    """The exposure of one token after the same pair met again (same session, same token).

    Durations and sample counts add up, the closest distance is the smaller of the two, the
    median is the latest contact's (the medians of two contacts do not combine into a median,
    and the latest is the one the expiry follows).
    """
    closest = [m for m in (earlier.closest_m, latest.closest_m) if m is not None]
    return ContactMeasures(
        duration_s=earlier.duration_s + latest.duration_s,
        closest_m=min(closest) if closest else None,
        median_m=latest.median_m if latest.median_m is not None else earlier.median_m,
        samples=earlier.samples + latest.samples)
