"""Each pair's history in a run, as the engines saw it: ``pairs[].history`` of ``fanny-sim --json``.

Per match of a pair: the scenario second of the match, when the data channel opened or why the
exchange failed, when the token was stored, why and when the channel closed, and the contact's
final measures (seconds within the radius, closest distance, samples). A field the two devices
agree on is one value; where they differ (or one side is not known) it is ``{device: value}``.

Only what the engines emit is used: their events, each stamped with the scenario second it came
at. Events name a peer by an ordinal of the device's own (no session or contact ID, privacy
invariant 1), so the other device of an exchange is found from the events themselves:

* a ``peer_update`` carries the distance and bearing between this device's fix and the peer's,
  both fixes that the two engines emitted as ``gps_fix`` shortly before: the other device is
  the one (and it must be the only one) with a recent fix at exactly that distance and
  bearing from one of this device's recent fixes (the same haversine, to a micrometre);
* an exchange with no sample (it failed before the channel opened, or closed before any
  sample) is linked to an exchange of the opposite role matched at the same scenario second
  on another device, when each of the two is the other's only candidate;
* a token stored on both devices links the two exchanges that stored it.

The positions stay in this process's memory for the run; none is reported, and no token or ID
is (a record names devices by their track names).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..events import (
    ChannelOpen,
    ContactClosed,
    Event,
    GpsFix,
    HandshakeFailed,
    MatchFound,
    PeerUpdate,
    TokenStored,
)
from ..protocol.proximity import bearing_deg, haversine_m
from .truth import Pair, pair

#: Scenario seconds before a sample in which the two fixes it was computed from are looked for
#: (at least; three position intervals when longer): the peer's fix is at most one position
#: interval old when it arrives, this device's is its latest.
FIX_WINDOW_S = 20.0
#: Scenario seconds between the two devices' ``match`` events of one match (the broker sends
#: both at once; the run's event loop delivers them within milliseconds of real time).
MATCH_TOLERANCE_S = 2.0
#: Samples per exchange kept to find its peer.
SAMPLES_KEPT = 3
#: The same distance (metres) and bearing (degrees) as the engine's sample, to rounding.
SAME_DISTANCE_M = 1e-6
SAME_BEARING_DEG = 1e-6


@dataclass
class Side:
    """One device's exchange of one match (scenario seconds; measures scaled back).

    ``token`` is kept only to link the two sides; it is never reported.
    """

    device: str
    ordinal: int
    role: str
    match_s: float
    peer: str | None = None
    channel_s: float | None = None
    failure: str | None = None
    token_s: float | None = None
    closed: str | None = None
    closed_s: float | None = None
    within_s: float | None = None
    closest_m: float | None = None
    samples: int | None = None
    token: str | None = field(default=None, repr=False)
    updates: list[tuple[float, float, float]] = field(default_factory=list, repr=False)

    def fields(self) -> dict[str, Any]:
        """The reported fields, rounded (seconds to 1, metres to 0.1)."""
        def r(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)
        return {"match_s": r(self.match_s, 0), "role": self.role,
                "channel_s": r(self.channel_s, 0), "failure": self.failure,
                "token_s": r(self.token_s, 0), "closed": self.closed,
                "closed_s": r(self.closed_s, 0), "within_s": r(self.within_s, 0),
                "closest_m": r(self.closest_m, 1), "samples": self.samples}


class History:
    """Collects every device's events of one run and links the exchanges into pairs.

    Args:
        now_s: the scenario second now (``SimClock.now_s``).
        speed: the run's time compression: engine seconds (``within_s``) times ``speed`` are
            scenario seconds.
        position_interval_s: the devices' ``position_interval_s``, scenario seconds.
    """

    def __init__(self, now_s: Callable[[], float], speed: float,
                 position_interval_s: float = 5.0) -> None:
        self._now_s = now_s
        self._speed = speed
        self._window_s = max(FIX_WINDOW_S, 3 * position_interval_s)
        self._fixes: dict[str, list[tuple[float, float, float]]] = {}
        self._sides: dict[str, dict[int, Side]] = {}

    def recorder(self, device: str) -> Callable[[Event], None]:
        """The event callback of ``device`` (subscribe it to that device's engine)."""
        self._fixes.setdefault(device, [])
        self._sides.setdefault(device, {})
        return lambda event: self.observe(device, event)

    def observe(self, device: str, event: Event) -> None:
        """Record one event of ``device`` at the scenario second now."""
        now = self._now_s()
        sides = self._sides.setdefault(device, {})
        if isinstance(event, GpsFix):
            self._fixes.setdefault(device, []).append((now, event.latitude, event.longitude))
            return
        if isinstance(event, MatchFound):
            sides[event.peer] = Side(device, event.peer, event.role, now)
            return
        side = sides.get(getattr(event, "peer", -1))
        if side is None:
            return
        if isinstance(event, ChannelOpen):
            side.channel_s = now
        elif isinstance(event, PeerUpdate):
            if len(side.updates) < SAMPLES_KEPT:
                side.updates.append((now, event.distance_m, event.bearing_deg))
        elif isinstance(event, HandshakeFailed):
            side.failure = event.reason
        elif isinstance(event, TokenStored):
            if side.token_s is None:
                side.token_s, side.token = now, event.token
        elif isinstance(event, ContactClosed):
            c = event.contact
            side.closed, side.closed_s = event.reason, now
            side.within_s, side.closest_m = c.duration_s * self._speed, c.closest_m
            side.samples = c.samples

    # -- linking (after the run) -----------------------------------------------------------

    def _peer_of(self, side: Side) -> str | None:
        """The one device whose fixes explain ``side``'s samples (None: none or several)."""
        found: set[str] = set()
        own = self._fixes.get(side.device, [])
        for t_s, distance, bearing in side.updates:
            mine = _recent(own, t_s, self._window_s)
            for device, fixes in self._fixes.items():
                if device == side.device:
                    continue
                theirs = _recent(fixes, t_s, self._window_s)
                if any(_same(a, b, distance, bearing) for a in mine for b in theirs):
                    found.add(device)
            if found:
                break
        return found.pop() if len(found) == 1 else None

    def _link(self) -> None:
        everyone = [s for sides in self._sides.values() for s in sides.values()]
        for side in everyone:
            if side.peer is None:
                side.peer = self._peer_of(side)
        by_token: dict[str, list[Side]] = {}
        for side in everyone:
            if side.token is not None:
                by_token.setdefault(side.token, []).append(side)
        for holders in by_token.values():
            if len(holders) == 2:
                a, b = holders
                a.peer = a.peer or b.device
                b.peer = b.peer or a.device
        def candidates(side: Side) -> list[Side]:
            return sorted((o for o in everyone
                           if o.device != side.device and o.role != side.role
                           and o.peer in (None, side.device)
                           and abs(o.match_s - side.match_s) <= MATCH_TOLERANCE_S),
                          key=lambda o: abs(o.match_s - side.match_s))

        for side in everyone:
            if side.peer is not None:
                continue
            found = candidates(side)
            if len({o.device for o in found}) != 1:
                continue
            other = found[0]
            if other.peer is None and {o.device for o in candidates(other)} != {side.device}:
                continue   # the other side could be another device's peer as well
            side.peer, other.peer = other.device, side.device

    def unlinked(self) -> int:
        """How many exchanges (one device's side of a match) no device could be told for
        (they are in no pair's history)."""
        self._link()
        return sum(1 for sides in self._sides.values() for side in sides.values()
                   if side.peer is None)

    def pairs(self) -> dict[Pair, list[dict[str, Any]]]:
        """Per pair of devices, its matches in order of time, each a merged record (see the
        module docstring); exchanges whose peer could not be told are left out."""
        self._link()
        by_pair: dict[Pair, dict[str, list[Side]]] = {}
        for sides in self._sides.values():
            for side in sides.values():
                if side.peer is not None:
                    key = pair(side.device, side.peer)
                    by_pair.setdefault(key, {}).setdefault(side.device, []).append(side)
        out: dict[Pair, list[dict[str, Any]]] = {}
        for key, per_device in sorted(by_pair.items()):
            first = sorted(per_device.get(key[0], []), key=lambda s: s.match_s)
            second = sorted(per_device.get(key[1], []), key=lambda s: s.match_s)
            matches: list[tuple[Side | None, Side | None]] = []
            for a in first:
                b = next((s for s in second
                          if abs(s.match_s - a.match_s) <= MATCH_TOLERANCE_S), None)
                if b is not None:
                    second.remove(b)
                matches.append((a, b))
            matches += [(None, b) for b in second]
            matches.sort(key=lambda m: min(s.match_s for s in m if s is not None))
            out[key] = [merge(key, a, b) for a, b in matches]
        return out


def merge(key: Pair, a: Side | None, b: Side | None) -> dict[str, Any]:
    """One match's record from its two sides (``a`` on ``key[0]``, ``b`` on ``key[1]``;
    either None when not known): a field the sides agree on is its value, otherwise
    ``{device: value}`` for the sides known."""
    known = {name: side.fields() for name, side in zip(key, (a, b), strict=True)
             if side is not None}
    record: dict[str, Any] = {}
    for name in Side("", 0, "", 0.0).fields():
        values = {device: f[name] for device, f in known.items()}
        same = len(values) == 2 and len(set(map(repr, values.values()))) == 1
        record[name] = next(iter(values.values())) if same else values
    return record


def _recent(fixes: list[tuple[float, float, float]], t_s: float, window_s: float
            ) -> list[tuple[float, float, float]]:
    """The fixes of the ``window_s`` scenario seconds up to ``t_s`` (``fixes`` in time order)."""
    low = bisect.bisect_left(fixes, (t_s - window_s,))
    high = bisect.bisect_right(fixes, (t_s, math.inf, math.inf))
    return fixes[low:high]


def _same(a: tuple[float, float, float], b: tuple[float, float, float],
          distance: float, bearing: float) -> bool:
    d = haversine_m(a[1], a[2], b[1], b[2])
    if abs(d - distance) > SAME_DISTANCE_M:
        return False
    if distance < 0.01:   # the bearing of two near points says little
        return True
    turn = abs(bearing_deg(a[1], a[2], b[1], b[2]) - bearing) % 360.0
    return min(turn, 360.0 - turn) <= SAME_BEARING_DEG

