"""Distance on the WGS84 sphere and the spatial grid the broker matches with (paper 3, step 3).

:func:`haversine_m` gives the great-circle distance in metres (mean Earth radius, IUGG
R1 = 6 371 008.8 m; error against the ellipsoid below 0.5 %, far below GPS accuracy).

:class:`ProximityGrid` buckets keys by latitude rows and longitude columns of ``cell_m`` metres
(at the equator) so that a query for every key within ``radius_m <= cell_m`` looks at the few
occupied cells of at most three rows, never at every key. Columns get narrower towards the
poles; the query widens its longitude span with the standard bounding-box formula and, near a
pole, walks only the occupied cells of the row. The antimeridian wraps.

:func:`within_radius` is the one accuracy rule deciding whether two fixes are within a radius
(``in``, ``uncertain`` or ``out``); the data-channel contact meter
(:mod:`fanny_tui.protocol.contact`) and the broker's matcher (:mod:`broker.state`) both use it.
:func:`bearing_deg` gives the initial bearing shown to testers.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

EARTH_RADIUS_M = 6_371_008.8
METRES_PER_DEGREE = math.pi * EARTH_RADIUS_M / 180.0

K = TypeVar("K", bound=Hashable)


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two WGS84 points given in degrees."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlmb = math.radians(lon2 - lon1)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


@dataclass(frozen=True, slots=True)
class Point:
    """A WGS84 position in degrees."""

    latitude: float
    longitude: float


class ProximityGrid(Generic[K]):
    """Keys at positions, with neighbour queries that never scan every key.

    Args:
        cell_m: cell size in metres (north-south); queries accept ``radius_m <= cell_m``.

    Raises:
        ValueError: ``cell_m`` not positive and finite.
    """

    def __init__(self, cell_m: float) -> None:
        if not (math.isfinite(cell_m) and cell_m > 0):
            raise ValueError(f"cell_m must be a positive number of metres, got {cell_m}")
        self.cell_m = cell_m
        self._cell_deg = cell_m / METRES_PER_DEGREE
        self._columns = math.ceil(360.0 / self._cell_deg)
        self._rows: dict[int, dict[int, dict[K, Point]]] = {}
        self._where: dict[K, tuple[int, int, Point]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def position(self, key: K) -> Point | None:
        """The position of ``key``, or ``None``."""
        found = self._where.get(key)
        return found[2] if found else None

    def _cell(self, point: Point) -> tuple[int, int]:
        row = math.floor((point.latitude + 90.0) / self._cell_deg)
        col = math.floor((point.longitude + 180.0) / self._cell_deg) % self._columns
        return row, col

    def put(self, key: K, latitude: float, longitude: float) -> None:
        """Place or move ``key`` (degrees). Raises ValueError for out-of-range or non-finite."""
        if not (math.isfinite(latitude) and -90.0 <= latitude <= 90.0):
            raise ValueError(f"latitude out of range: {latitude}")
        if not (math.isfinite(longitude) and -180.0 <= longitude <= 180.0):
            raise ValueError(f"longitude out of range: {longitude}")
        point = Point(latitude, longitude)
        row, col = self._cell(point)
        found = self._where.get(key)
        if found is not None and found[0] == row and found[1] == col:
            self._rows[row][col][key] = point       # same cell: replace in place
        else:
            self.remove(key)
            self._rows.setdefault(row, {}).setdefault(col, {})[key] = point
        self._where[key] = (row, col, point)

    def remove(self, key: K) -> None:
        """Forget ``key``; no effect when absent."""
        found = self._where.pop(key, None)
        if found is None:
            return
        row, col, _ = found
        cells = self._rows[row]
        members = cells[col]
        del members[key]
        if not members:
            del cells[col]
            if not cells:
                del self._rows[row]

    def _column_ranges(self, latitude: float, longitude: float, radius_m: float
                       ) -> list[tuple[int, int]] | None:
        """Column index ranges to visit, or None for "every occupied column"."""
        angular = radius_m / EARTH_RADIUS_M
        phi = math.radians(latitude)
        # Bounding box (J. P. Matuschek); if the circle reaches a pole, every longitude.
        if abs(phi) + angular >= math.pi / 2 - 1e-9:
            return None
        dlon = math.degrees(math.asin(min(1.0, math.sin(angular) / math.cos(phi))))
        lo, hi = longitude - dlon, longitude + dlon
        if hi - lo >= 360.0 - 2 * self._cell_deg:
            return None
        spans = [(lo, hi)]
        if lo < -180.0:
            spans = [(lo + 360.0, 180.0), (-180.0, hi)]
        elif hi > 180.0:
            spans = [(lo, 180.0), (-180.0, hi - 360.0)]
        out = []
        for a, b in spans:
            first = max(0, math.floor((a + 180.0) / self._cell_deg))
            last = min(self._columns - 1, math.floor((b + 180.0) / self._cell_deg))
            out.append((first, last))
        return out

    def near(self, latitude: float, longitude: float, radius_m: float) -> Iterator[tuple[K, float]]:
        """Yield ``(key, distance_m)`` for every key within ``radius_m`` metres (inclusive).

        Raises:
            ValueError: ``radius_m`` larger than ``cell_m`` or not positive.
        """
        if not (0 < radius_m <= self.cell_m):
            raise ValueError(f"radius_m must be in (0, {self.cell_m}], got {radius_m}")
        row = math.floor((latitude + 90.0) / self._cell_deg)
        max_dlat = radius_m / METRES_PER_DEGREE * (1.0 + 1e-9)
        ranges = self._column_ranges(latitude, longitude, radius_m)
        for r in (row - 1, row, row + 1):
            cells = self._rows.get(r)
            if not cells:
                continue
            if ranges is None:
                candidates = list(cells.values())
            else:
                candidates = []
                for first, last in ranges:
                    if last - first + 1 > len(cells):
                        candidates.extend(m for c, m in cells.items() if first <= c <= last)
                    else:
                        candidates.extend(cells[c] for c in range(first, last + 1) if c in cells)
            for members in candidates:
                for key, point in members.items():
                    # A great-circle distance is at least its north-south part: skip the
                    # haversine for a point whose latitude alone puts it out of range.
                    if abs(point.latitude - latitude) > max_dlat:
                        continue
                    d = haversine_m(latitude, longitude, point.latitude, point.longitude)
                    if d <= radius_m:
                        yield key, d


# -- the accuracy rule (issue 6; docs/protocol.md, "The accuracy rule") ---------------------------

Verdict = Literal["in", "uncertain", "out"]

UNCERTAINTY_FACTOR = 3.0
"""A sample whose combined accuracy exceeds this many radii says nothing about the radius."""


def combined_accuracy_m(accuracy_a: float | None, accuracy_b: float | None) -> float:
    """The combined 95 % accuracy of two fixes: ``sqrt(a**2 + b**2)`` in metres.

    An unknown accuracy (``None``, a receiver that reports none, or a configured fixed
    position) counts as 0: the distance is then taken as measured.
    """
    a = accuracy_a or 0.0
    b = accuracy_b or 0.0
    return math.hypot(a, b)


def within_radius(distance_m: float, radius_m: float, accuracy_a: float | None,
                  accuracy_b: float | None) -> Verdict:
    """The one accuracy rule, used by the contact meter and by the broker's matcher.

    With ``c = sqrt(a**2 + b**2)`` the combined 95 % accuracy of the two fixes (metres):

    * ``"in"`` when ``distance_m <= radius_m`` and ``c <= 3 * radius_m``;
    * ``"out"`` when ``distance_m - c > radius_m`` (even the most favourable reading of the
      two fixes is outside the radius);
    * ``"uncertain"`` otherwise (the fixes cannot tell; such a sample never counts as within).

    Args:
        distance_m: haversine distance between the two fixes, metres, >= 0.
        radius_m: the radius, metres, > 0.
        accuracy_a, accuracy_b: each fix's 95 % horizontal accuracy in metres, or None.

    Returns:
        ``"in"``, ``"uncertain"`` or ``"out"``.
    """
    c = combined_accuracy_m(accuracy_a, accuracy_b)
    if distance_m <= radius_m and c <= UNCERTAINTY_FACTOR * radius_m:
        return "in"
    if distance_m - c > radius_m:
        return "out"
    return "uncertain"


def bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial great-circle bearing from point 1 to point 2, degrees clockwise from true north,
    in [0, 360). Points in WGS84 degrees; 0.0 for two identical points."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dlmb = math.radians(lon2 - lon1)
    y = math.sin(dlmb) * math.cos(phi2)
    x = math.cos(phi1) * math.sin(phi2) - math.sin(phi1) * math.cos(phi2) * math.cos(dlmb)
    if x == 0.0 and y == 0.0:
        return 0.0
    bearing = math.degrees(math.atan2(y, x)) % 360.0
    return 0.0 if bearing >= 360.0 else bearing  # -1e-17 % 360.0 == 360.0
