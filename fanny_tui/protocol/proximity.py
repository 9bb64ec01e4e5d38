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
import struct
import sys
from array import array
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

EARTH_RADIUS_M = 6_371_008.8
"""Metres: the IUGG mean Earth radius R1, the sphere of every distance of the protocol."""
METRES_PER_DEGREE = math.pi * EARTH_RADIUS_M / 180.0

K = TypeVar("K", bound=Hashable)


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two WGS84 points given in degrees.

    The haversine formula on a sphere of radius :data:`EARTH_RADIUS_M`:
    ``h = sin²(Δφ/2) + cos φ1 cos φ2 sin²(Δλ/2)``, ``d = 2 R asin(min(1, sqrt(h)))`` (the
    ``min`` guards rounding near antipodal points). docs/protocol.md, "Distance", gives test
    vectors that tests/test_proximity.py checks.
    """
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


_RECORD = struct.Struct("=ddq")
"""One key of a grid cell: its latitude and longitude in degrees, then the key's slot."""
_COORDS = struct.Struct("=dd")
_SIZE = _RECORD.size
_SLOT_AT = _COORDS.size   # offset of the slot in a record


class ProximityGrid(Generic[K]):
    """Keys at positions, with neighbour queries that never scan every key.

    Layout (issue 7, point 5: no stall of CPython's cyclic garbage collector at a million
    keys): nothing per key or per cell is an object the collector tracks. Each key gets an
    integer *slot*; a cell is a :class:`bytearray` of 24-byte records (latitude, longitude,
    slot; native doubles and a 64-bit integer), in dicts keyed by row and by column index;
    ``key -> slot`` and ``slot -> key`` are dicts, a slot's cell and its record's index in it
    are items of one :class:`array.array`. CPython never tracks a dict whose keys and values
    are all atomic (str, int, float, None, bytearray are), so the collector tracks a handful
    of objects for the whole grid, whatever the number of keys (a full pass visits one entry
    per occupied row in the dict of rows), as long as the keys are atomic themselves (str or
    int, like the broker's session IDs).

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
        self._rows: dict[int, dict[int, bytearray]] = {}   # row -> column -> records
        self._slot: dict[K, int] = {}
        self._key: dict[int, K] = {}
        # By slot, at 3*slot, 3*slot+1 and 3*slot+2 (one cache line): the row and the column
        # of the key's cell and the index of its record in the cell.
        self._place = array("q")
        self._free = array("q")                             # slots to reuse

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: object) -> bool:
        return key in self._slot

    def position(self, key: K) -> Point | None:
        """The position of ``key``, or ``None``."""
        slot = self._slot.get(key)
        if slot is None:
            return None
        place = self._place
        at = 3 * slot
        cell = self._rows[place[at]][place[at + 1]]
        latitude, longitude = _COORDS.unpack_from(cell, _SIZE * place[at + 2])
        return Point(latitude, longitude)

    def put(self, key: K, latitude: float, longitude: float) -> None:
        """Place or move ``key`` (degrees). Raises ValueError for out-of-range or non-finite."""
        if not (math.isfinite(latitude) and -90.0 <= latitude <= 90.0):
            raise ValueError(f"latitude out of range: {latitude}")
        if not (math.isfinite(longitude) and -180.0 <= longitude <= 180.0):
            raise ValueError(f"longitude out of range: {longitude}")
        row = math.floor((latitude + 90.0) / self._cell_deg)
        col = math.floor((longitude + 180.0) / self._cell_deg) % self._columns
        place = self._place
        slot = self._slot.get(key)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot = len(place) // 3
                place.extend((0, 0, 0))
            self._slot[key] = slot
            self._key[slot] = key
        elif place[3 * slot] == row and place[3 * slot + 1] == col:   # same cell: in place
            _COORDS.pack_into(self._rows[row][col], _SIZE * place[3 * slot + 2],
                              latitude, longitude)
            return
        else:
            self._take_out(slot)
        cells = self._rows.get(row)
        if cells is None:
            cells = self._rows[row] = {}
        cell = cells.get(col)
        at = 3 * slot
        place[at] = row
        place[at + 1] = col
        if cell is None:
            place[at + 2] = 0
            cells[col] = bytearray(_RECORD.pack(latitude, longitude, slot))
        else:
            place[at + 2] = len(cell) // _SIZE
            cell += _RECORD.pack(latitude, longitude, slot)

    def remove(self, key: K) -> None:
        """Forget ``key``; no effect when absent."""
        slot = self._slot.pop(key, None)
        if slot is not None:
            self._take_out(slot)
            del self._key[slot]
            self._free.append(slot)

    def _take_out(self, slot: int) -> None:
        """Remove the record of ``slot`` from its cell (the cell's last record fills the hole)."""
        place = self._place
        row, col, index = place[3 * slot:3 * slot + 3]
        cells = self._rows[row]
        cell = cells[col]
        at = _SIZE * index
        last = len(cell) - _SIZE
        if at != last:
            cell[at:at + _SIZE] = cell[last:]
            moved = int.from_bytes(cell[at + _SLOT_AT:at + _SIZE], sys.byteorder, signed=True)
            place[3 * moved + 2] = index
        del cell[last:]
        if not cell:
            del cells[col]
            if not cells:
                del self._rows[row]

    def _column_ranges(self, latitude: float, longitude: float, radius_m: float
                       ) -> tuple[list[tuple[int, int]] | None, float]:
        """Column index ranges to visit (None: every occupied column), and the half-width in
        degrees of longitude of the bounding box (180.0 when it spans every longitude)."""
        angular = radius_m / EARTH_RADIUS_M
        phi = math.radians(latitude)
        # Bounding box (J. P. Matuschek); if the circle reaches a pole, every longitude.
        if abs(phi) + angular >= math.pi / 2 - 1e-9:
            return None, 180.0
        dlon = math.degrees(math.asin(min(1.0, math.sin(angular) / math.cos(phi))))
        lo, hi = longitude - dlon, longitude + dlon
        if hi - lo >= 360.0 - 2 * self._cell_deg:
            return None, 180.0
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
        return out, dlon

    def near(self, latitude: float, longitude: float, radius_m: float) -> Iterator[tuple[K, float]]:
        """``(key, distance_m)`` for every key within ``radius_m`` metres (inclusive).

        The keys are all found before the first is returned: the grid may change meanwhile.

        Raises:
            ValueError: ``radius_m`` larger than ``cell_m`` or not positive.
        """
        if not (0 < radius_m <= self.cell_m):
            raise ValueError(f"radius_m must be in (0, {self.cell_m}], got {radius_m}")
        max_dlat = radius_m / METRES_PER_DEGREE * (1.0 + 1e-9)
        # Only the rows the latitude band [latitude - max_dlat, latitude + max_dlat] touches
        # (one or two when radius_m <= cell_m), widened by 1e-9 degrees (0.1 mm) against
        # rounding: a key of any other row fails the band test below anyway. Fewer cells
        # visited, fewer cache misses at a million keys (docs/performance.md).
        band = max_dlat + 1e-9
        first_row = math.floor((latitude - band + 90.0) / self._cell_deg)
        last_row = math.floor((latitude + band + 90.0) / self._cell_deg)
        ranges, dlon = self._column_ranges(latitude, longitude, radius_m)
        # The same for longitude, on the wrapped difference: a key outside the box cannot be
        # within the radius (margin 1e-9 relative + 1e-9 degrees against rounding).
        max_dlon = dlon * (1.0 + 1e-9) + 1e-9
        rows = self._rows
        keys = self._key
        found: list[tuple[K, float]] = []
        for r in range(first_row, last_row + 1):
            cells = rows.get(r)
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
            for cell in candidates:
                # Only the records are read for a miss (the key only for a hit: at a
                # million keys every object reached is a likely cache miss).
                for lat, lon, slot in _RECORD.iter_unpack(cell):
                    # A great-circle distance is at least its north-south part: skip the
                    # haversine for a point whose latitude alone puts it out of range, and
                    # likewise outside the bounding box's longitudes.
                    if abs(lat - latitude) > max_dlat:
                        continue
                    east = abs(lon - longitude)
                    if east > 180.0:
                        east = 360.0 - east
                    if east > max_dlon:
                        continue
                    d = haversine_m(latitude, longitude, lat, lon)
                    if d <= radius_m:
                        found.append((keys[slot], d))
        return iter(found)


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


def coarsest_matching_accuracy_m(radius_m: float, peer_accuracy_m: float | None = None
                                 ) -> float:
    """The coarsest own accuracy (metres, 95 %) with which a sample can still be ``in``.

    From the accuracy gate of :func:`within_radius`, ``sqrt(a**2 + b**2) <= 3 r``: with the
    peer's accuracy ``b`` known, ``a <= sqrt((3 r)**2 - b**2)`` (0.0 when ``b`` alone is past
    the gate, ``b > 3 r``: nothing can match); with ``b`` not given, the peer is taken to be
    as accurate as this device (``b = a``), so ``a <= 3 r / sqrt(2)`` (about 2.12 r: 21.2 m
    for a 10 m radius). A fix coarser than that can never make a contact with such a peer
    (docs/protocol.md, "The accuracy rule").

    Args:
        radius_m: the radius, metres, > 0.
        peer_accuracy_m: the peer's 95 % accuracy in metres, None for "as accurate as this
            device".

    Returns:
        Metres, >= 0.

    Raises:
        ValueError: ``radius_m`` not positive and finite, or ``peer_accuracy_m`` negative or
            not finite.
    """
    if not (math.isfinite(radius_m) and radius_m > 0):
        raise ValueError(f"radius_m must be a positive number of metres, got {radius_m}")
    gate = UNCERTAINTY_FACTOR * radius_m
    if peer_accuracy_m is None:
        return gate / math.sqrt(2.0)
    if not (math.isfinite(peer_accuracy_m) and peer_accuracy_m >= 0):
        raise ValueError(f"peer_accuracy_m must be a number of metres >= 0, got "
                         f"{peer_accuracy_m}")
    return math.sqrt(max(0.0, gate * gate - peer_accuracy_m * peer_accuracy_m))


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
