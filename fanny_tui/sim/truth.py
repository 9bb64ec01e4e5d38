"""Ground truth: the true contacts of a scenario, from its noise-free tracks (paper 2).

A **true contact** of two devices is a maximal interval during which both are present and
their true distance (great circle, :func:`~fanny_tui.protocol.proximity.haversine_m`) is at
most ``radius_m``, lasting at least ``duration_s``. Tracks are sampled every ``step_s``
scenario seconds (default 1 s; tracks are linear between their points), and the edges of each
interval are then refined by bisection to the instant the distance crosses ``radius_m``
(to a millisecond); an encounter shorter than one step may be missed. A **true pair** is a
pair of devices with at least one true contact. Only the simulated time counts: with
``until_s`` (the scenario's ``[scenario] duration_s``) a track ends there, and a contact still
going on at that second ends with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from ..protocol.proximity import haversine_m
from .scenario import Track

Pair = tuple[str, str]
"""Two device names, in sorted order."""


def pair(a: str, b: str) -> Pair:
    """The :data:`Pair` of two device names (sorted)."""
    return (a, b) if a <= b else (b, a)


@dataclass(frozen=True)
class TrueContact:
    """One true contact: devices ``a`` < ``b``, from ``start_s`` to ``end_s`` (scenario
    seconds), closest true distance ``closest_m`` (metres)."""

    a: str
    b: str
    start_s: float
    end_s: float
    closest_m: float

    @property
    def pair(self) -> Pair:
        return (self.a, self.b)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def close_intervals(first: Track, second: Track, radius_m: float, *, step_s: float = 1.0,
                    until_s: float = math.inf) -> list[tuple[float, float, float]]:
    """Every maximal interval with both tracks present and within ``radius_m`` metres, up to
    scenario second ``until_s`` (default: the tracks' end).

    Returns:
        ``(start_s, end_s, closest_m)`` per interval, in time order (sampled every ``step_s``
        from the later of the two starts; the last sample is ``until_s`` when it cuts the
        tracks).
    """
    if not (math.isfinite(step_s) and step_s > 0):
        raise ValueError(f"step_s: expected a number > 0, got {step_s!r}")
    begin = max(first.start_s, second.start_s)
    end = min(first.end_s, second.end_s, until_s)
    out: list[tuple[float, float, float]] = []
    if begin > end:
        return out
    def distance(t: float) -> float:
        p, q = first.position_at(t), second.position_at(t)
        return math.inf if p is None or q is None else haversine_m(p[0], p[1], q[0], q[1])

    def crossing(outside: float, inside: float) -> float:
        """The instant between a sample out of the radius and one within it where it crosses."""
        for _ in range(40):
            if abs(inside - outside) < 1e-3:
                break
            middle = (outside + inside) / 2
            if distance(middle) <= radius_m:
                inside = middle
            else:
                outside = middle
        return inside

    run_start: float | None = None
    previous = last_in = closest = math.inf
    steps = int(math.floor((end - begin) / step_s + 1e-9))
    times = [begin + k * step_s for k in range(steps + 1)]
    if end - times[-1] > 1e-9 and end == until_s:
        times.append(end)   # the simulated time's last second counts, not the step before
    for k, t in enumerate(times):
        d = distance(t)
        if d <= radius_m:
            if run_start is None:
                run_start = t if k == 0 else crossing(previous, t)
                closest = d
            closest = min(closest, d)
            last_in = t
        elif run_start is not None:
            out.append((run_start, crossing(t, last_in), closest))
            run_start = None
        previous = t
    if run_start is not None:
        out.append((run_start, last_in, closest))
    return out


def true_contacts(tracks: Sequence[Track], radius_m: float, duration_s: float, *,
                  step_s: float = 1.0, until_s: float = math.inf) -> list[TrueContact]:
    """The true contacts of every pair of tracks (see the module docstring).

    Args:
        tracks: the devices' true tracks (names unique).
        radius_m: the contact radius, metres.
        duration_s: the least duration of a contact, scenario seconds.
        step_s: the sampling step, scenario seconds.
        until_s: the end of the simulated time, scenario seconds (the scenario's
            ``duration_s``): nothing after it counts.

    Returns:
        The contacts, ordered by pair and start.
    """
    out = []
    for first, second in combinations(sorted(tracks, key=lambda t: t.name), 2):
        for start, end, closest in close_intervals(first, second, radius_m, step_s=step_s,
                                                   until_s=until_s):
            if end - start >= duration_s:
                out.append(TrueContact(first.name, second.name, start, end, closest))
    return out


def true_pairs(contacts: Sequence[TrueContact]) -> set[Pair]:
    """The pairs with at least one true contact."""
    return {c.pair for c in contacts}
