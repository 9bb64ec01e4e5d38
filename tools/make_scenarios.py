#!/usr/bin/env python3
"""Write the shipped fanny-sim scenarios' tracks: scenarios/street.gpx and scenarios/queue.gpx.

Deterministic (no randomness, fixed start time): running it again gives the same files. Paths
are piecewise linear in local metres (x east, y north) around a point in Toulouse, written as
GPX 1.1 with a point every 5 s and at every waypoint (the tracks are exact under the linear
interpolation fanny-sim uses).

    python tools/make_scenarios.py          # from the repository root
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fanny_tui.sim.scenario import Track, tracks_to_gpx
from fanny_tui.sim.tracks import offset

ORIGIN_LAT, ORIGIN_LON = 43.600800, 1.433500     # a street in Toulouse (WGS84 degrees)
START = datetime(2026, 5, 4, 9, 0, 0, tzinfo=UTC)
STEP_S = 5.0
OUT = Path(__file__).resolve().parents[1] / "scenarios"

Waypoints = list[tuple[float, float, float]]     # (t_s, x_m, y_m)


def track(name: str, waypoints: Waypoints) -> Track:
    """A :class:`Track` through ``waypoints`` (times increasing), sampled every STEP_S."""
    times = {t for t, _, _ in waypoints}
    t0, t1 = waypoints[0][0], waypoints[-1][0]
    k = int(t0 // STEP_S) + 1
    while k * STEP_S < t1:
        times.add(k * STEP_S)
        k += 1
    lats, lons, ordered = [], [], sorted(times)
    for t in ordered:
        for (ta, xa, ya), (tb, xb, yb) in zip(waypoints, waypoints[1:], strict=False):
            if ta <= t <= tb:
                f = (t - ta) / (tb - ta)
                x, y = xa + f * (xb - xa), ya + f * (yb - ya)
                break
        else:
            _, x, y = waypoints[-1]
        lat, lon = offset(ORIGIN_LAT, ORIGIN_LON, x, y)
        lats.append(lat)
        lons.append(lon)
    return Track(name, tuple(ordered), tuple(lats), tuple(lons))


def walk(t0: float, x0: float, x1: float, y: float, speed: float) -> Waypoints:
    """Walking along the street at ``y`` from ``x0`` to ``x1`` at ``speed`` m/s from ``t0``."""
    return [(t0, x0, y), (t0 + abs(x1 - x0) / speed, x1, y)]


def street() -> list[Track]:
    """15 minutes, 20 devices on a 600 m street (sidewalks at y = +7 and -7 m).

    True contacts (10 m / 5 min): a couple strolling together the whole time; two people
    chatting at a corner for 7 minutes; a person joining another at a cafe table for 7 minutes.
    Encounters that must not count: 3 pairs standing across the street 20-26 m apart for
    7-9 minutes (bus stop, terrace, shop window, doorways); 8 passers-by (1.2-1.6 m/s, both
    directions, both sidewalks) who pass everyone within seconds.
    """
    T = 900.0
    tracks = [
        # the couple: side by side, 1.5 m apart, strolling east at 0.6 m/s
        track("couple-1", walk(0, -270, 270, 7.0, 0.6)),
        track("couple-2", walk(0, -270, 270, 5.5, 0.6)),
        # two friends meet at the corner (x = -200, south side), chat 7 min, leave
        track("corner-1", [(0, -300, -7), (100, -200.8, -7), (120, -200.8, -8.5),
                           (540, -200.8, -8.5), (560, -200.8, -7), (760, -300, -7)]),
        track("corner-2", [(0, -40, -7), (120, -199.2, -7), (120.5, -199.2, -8.5),
                           (540, -199.2, -8.5), (560, -199.2, -7), (760, -40, -7)]),
        # at the cafe terrace (x = 150, south): one sits all along, a friend joins for 7 min
        track("cafe-1", [(0, 150, -11), (T, 150, -11)]),
        track("cafe-2", [(300, 300, -7), (420, 151, -7), (425, 151, -11.5), (840, 151, -11.5),
                         (845, 151, -7), (900, 80, -7)]),
        # across the street, 20-26 m apart, for minutes
        track("bus-stop", [(60, 50, 9), (720, 50, 9)]),
        track("terrace-across", [(0, 58, -10), (600, 58, -10)]),
        track("shop-window", [(200, -120, 10), (660, -120, 10)]),
        track("waiting-across", [(240, -110, -10), (700, -110, -10)]),
        track("doorway-north", [(400, 200, 9), (900, 200, 9)]),
        track("doorway-south", [(380, 215, -12), (900, 215, -12)]),
    ]
    passers = [  # (name, start s, from x, to x, sidewalk y, speed m/s)
        ("passer-1", 0, -300, 300, 7, 1.4),
        ("passer-2", 30, 300, -300, 7, 1.3),
        ("passer-3", 90, 300, -300, -7, 1.5),
        ("passer-4", 150, -300, 300, -7, 1.2),
        ("passer-5", 250, -300, 300, 7, 1.6),
        ("passer-6", 330, 300, -300, 7, 1.4),
        ("passer-7", 420, -300, 300, -7, 1.3),
        ("passer-8", 480, 300, -300, -7, 1.5),
    ]
    for name, t0, x0, x1, y, speed in passers:
        tracks.append(track(name, walk(t0, x0, x1, y, speed)))
    return tracks


def queue() -> list[Track]:
    """15 minutes, 10 devices queueing at a pharmacy door (x = 0) along y = 0.

    Slots 2.2 m apart (people 1-3 m apart with their sideways offsets); the head is served
    every 120 s (walks in through the door: track ends); everyone then steps forward one slot.
    Six people queue at the start, four join at the tail later (walking in from the west).
    """
    slot_x = [-(1.5 + 2.2 * i) for i in range(12)]
    sideways = [0.3, -0.4, 0.2, -0.2, 0.4, -0.3, 0.1, -0.1, 0.35, -0.25]
    serve_every, T = 120.0, 900.0
    arrivals = {7: 60.0, 8: 180.0, 9: 300.0, 10: 420.0}
    # the order of the queue: person n is served n-th; people 1-6 are there at t = 0
    tracks = []
    for n in range(1, 11):
        y = sideways[n - 1]
        served = n * serve_every
        arrive = arrivals.get(n, 0.0)
        # slot at time t: (n - 1) - number of services done by t
        def slot(t: float, n: int = n) -> int:
            return (n - 1) - int(t // serve_every)
        points: Waypoints = []
        if arrive > 0:
            tail = slot(arrive)
            points += [(arrive - 50.0, slot_x[tail] - 60.0, -3.0),
                       (arrive - 2.0, slot_x[tail] - 2.0, y), (arrive, slot_x[tail], y)]
        else:
            points.append((0.0, slot_x[n - 1], y))
        k = int(points[-1][0] // serve_every) + 1
        while k * serve_every < min(served, T):
            s = slot(k * serve_every)
            points += [(k * serve_every, slot_x[s + 1], y), (k * serve_every + 2.0, slot_x[s], y)]
            k += 1
        if served <= T:
            points += [(served, slot_x[0], y), (served + 3.0, 0.5, 0.0)]
        else:
            points.append((T, points[-1][1], y))
        tracks.append(track(f"queue-{n:02d}", points))
    return tracks


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, tracks in (("street", street()), ("queue", queue())):
        path = OUT / f"{name}.gpx"
        path.write_text(tracks_to_gpx(tracks, START, creator="fanny-sim tools/make_scenarios.py"),
                        encoding="utf-8")
        print(f"{path.name}: {len(tracks)} tracks")


if __name__ == "__main__":
    main()
