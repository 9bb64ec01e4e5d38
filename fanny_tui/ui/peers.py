"""The live peers a tester sees, and the radar that draws them: pure, no Textual, no clock.

:class:`LivePeers` folds the engine's peer events (``match``, ``handshake``, ``channel_open``,
``peer_update``, ``token_stored``, ``handshake_failed``, ``contact_closed``) into one row per
peer that is live now. A row goes :data:`LINGER_S` seconds after its contact closed or its
exchange failed (so the tester sees how it ended), or :data:`SILENT_S` seconds after the last
event about it (an exchange that ended without a ``contact_closed``). Every method takes
``now``; the widgets pass the app's clock.

:func:`radar_cells` places the live peers on a character grid by bearing and distance (paper
2: the radius is the ring), for :class:`~fanny_tui.ui.widgets.RadarView`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from ..events import (
    ChannelOpen,
    Contact,
    ContactClosed,
    Event,
    HandshakeFailed,
    HandshakeProgress,
    MatchFound,
    PeerUpdate,
    TokenStored,
)
from ..protocol.contact import ContactMeasures, merge_measures

LINGER_S = 10.0
"""Seconds a peer's row stays after its contact closed or its exchange failed."""

SILENT_S = 60.0
"""Seconds a peer's row stays after the last event about it (ended without contact_closed)."""

ENDED_STATES = ("closed", "failed")


@dataclass
class LivePeer:
    """What is known of one live peer (all relative to this device; never its position).

    Attributes:
        peer: the engine's in-memory ordinal.
        role: ``offerer`` or ``answerer`` (SDP), ``?`` when the match was not seen.
        state: ``matched``, ``connecting``, ``exchanging``, ``stored``, ``closed``, ``failed``.
        matched_at: when the match arrived (UTC, from the clock given).
        last_heard: when the last event about this peer arrived.
        ended_at: when the contact closed or the exchange failed (None while live).
        distance_m, bearing_deg, peer_accuracy_m, within, within_s, samples: the latest
            :class:`~fanny_tui.events.PeerUpdate` (None/0 before the first).
        match_to_token_s: seconds from the match to the token (the engine's figure when it
            gives one, else measured here between the two events).
        contact: the contact's measures once the token is stored (grown by each later
            ``peer_update``, see :func:`grown_contact`), final once the contact closed.
        reason: why the exchange failed or the contact closed.
        token: the witness token stored for this contact (from ``token_stored``), to update
            its row in the Tokens panel when the contact closes; None before.
        candidates: the ICE candidate types of the data channel's selected pair, from
            :class:`~fanny_tui.events.ChannelOpen` (see :func:`candidate_pair`); None before
            the channel opened or when aiortc did not tell.
    """

    peer: int
    role: str
    state: str
    matched_at: datetime
    last_heard: datetime
    ended_at: datetime | None = None
    distance_m: float | None = None
    bearing_deg: float | None = None
    peer_accuracy_m: float | None = None
    within: str | None = None
    within_s: float = 0.0
    samples: int = 0
    match_to_token_s: float | None = None
    contact: Contact | None = None
    reason: str | None = None
    token: str | None = None
    candidates: str | None = None


def merged_contact(earlier: Contact | None, latest: Contact) -> Contact:
    """A token's exposure after one more contact of the same pair (same session, same token):
    as the store merges it (:func:`fanny_tui.protocol.contact.merge_measures`: durations and
    samples add up, the closest is the smaller, the median the latest's)."""
    if earlier is None:
        return latest
    merged = merge_measures(ContactMeasures(earlier.duration_s, earlier.closest_m,
                                            earlier.median_m, earlier.samples),
                            ContactMeasures(latest.duration_s, latest.closest_m,
                                            latest.median_m, latest.samples))
    return Contact(duration_s=merged.duration_s, closest_m=merged.closest_m,
                   median_m=merged.median_m, samples=merged.samples)


def grown_contact(contact: Contact | None, update: PeerUpdate) -> Contact:
    """The measures of an open contact so far after one more sample (``peer_update``): its
    time within the radius and sample count are the update's, its closest distance the
    smaller of the two (closest over every sample, paper 2); the median is the last one the
    engine gave (a median of samples not kept here cannot be updated)."""
    if contact is None:
        return Contact(duration_s=update.within_s, closest_m=update.distance_m, median_m=None,
                       samples=update.samples)
    closest = update.distance_m if contact.closest_m is None else min(contact.closest_m,
                                                                      update.distance_m)
    return Contact(duration_s=max(contact.duration_s, update.within_s), closest_m=closest,
                   median_m=contact.median_m, samples=max(contact.samples, update.samples))


def candidate_pair(local: str | None, remote: str | None) -> str | None:
    """The ICE candidate types of a selected pair (RFC 8445 5.1.1: ``host``, ``srflx``,
    ``prflx``, ``relay``) in a few characters: ``host`` when both ends are of one type,
    ``srflx/prflx`` (local/remote) when not, the one known when the other is None; None when
    neither is known."""
    if local is None or remote is None or local == remote:
        return local or remote
    return f"{local}/{remote}"


class LivePeers:
    """One :class:`LivePeer` per peer that is live now, updated by events.

    Args:
        linger_s: see :data:`LINGER_S`.
        silent_s: see :data:`SILENT_S`.
    """

    def __init__(self, *, linger_s: float = LINGER_S, silent_s: float = SILENT_S) -> None:
        self.linger_s = linger_s
        self.silent_s = silent_s
        self._peers: dict[int, LivePeer] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers

    def __getitem__(self, peer: int) -> LivePeer:
        return self._peers[peer]

    @property
    def peers(self) -> list[LivePeer]:
        """The live peers: those in contact now (not ``closed`` nor ``failed``) first, then
        those that ended (lingering :data:`LINGER_S`); each group in the order matched.

        So that after an ID rotation, which closes every contact at once, the rows of the peers
        met since are not pushed below the edge of a small terminal by the ended ones."""
        return sorted(self._peers.values(), key=lambda p: (p.state in ENDED_STATES, p.peer))

    def _get(self, peer: int, now: datetime) -> LivePeer:
        known = self._peers.get(peer)
        if known is None:
            known = self._peers[peer] = LivePeer(peer, "?", "matched", now, now)
        known.last_heard = now
        return known

    def apply(self, event: Event, now: datetime) -> bool:
        """Take one event into account.

        Args:
            event: any engine event (those not about a peer are ignored).
            now: when it arrived (aware, UTC).

        Returns:
            True when a row was added or changed.
        """
        match event:
            case MatchFound(peer=peer, role=role):
                if peer in self._peers and self._peers[peer].state not in ENDED_STATES:
                    self._peers[peer].role = role
                    self._peers[peer].last_heard = now
                else:  # a new contact with this ordinal starts afresh
                    self._peers[peer] = LivePeer(peer, role, "matched", now, now)
            case HandshakeProgress(peer=peer, state=state):
                live = self._get(peer, now)
                if live.state != "closed":
                    live.state = state
                if state == "failed":
                    live.ended_at = live.ended_at or now
            case ChannelOpen(peer=peer, local_candidate=local, remote_candidate=remote):
                live = self._get(peer, now)
                if live.state in ("matched", "connecting"):
                    live.state = "exchanging"
                live.candidates = candidate_pair(local, remote)
            case PeerUpdate():
                live = self._get(event.peer, now)
                live.distance_m, live.bearing_deg = event.distance_m, event.bearing_deg
                live.peer_accuracy_m, live.within = event.peer_accuracy_m, event.within
                live.within_s, live.samples = event.within_s, event.samples
                if live.token is not None and live.state not in ENDED_STATES:
                    live.contact = grown_contact(live.contact, event)
            case TokenStored(peer=peer, token=token, contact=contact, match_to_token_s=latency):
                live = self._get(peer, now)
                live.token = token
                if live.state not in ENDED_STATES:
                    live.state = "stored"
                if latency is None and live.match_to_token_s is None and live.role != "?":
                    latency = (now - live.matched_at).total_seconds()
                if latency is not None:
                    live.match_to_token_s = latency
                if contact is not None:
                    live.contact = contact
            case HandshakeFailed(peer=peer, reason=reason):
                live = self._get(peer, now)
                live.state, live.reason = "failed", reason
                live.ended_at = live.ended_at or now
            case ContactClosed(peer=peer, reason=reason, contact=contact):
                live = self._get(peer, now)
                live.state, live.reason, live.contact = "closed", reason, contact
                live.within_s = contact.duration_s
                live.ended_at = now
            case _:
                return False
        return True

    def expire(self, now: datetime) -> list[int]:
        """Drop the peers whose time is up (see the module docstring).

        Returns:
            The ordinals dropped.
        """
        gone = [p.peer for p in self._peers.values()
                if (p.ended_at is not None
                    and (now - p.ended_at).total_seconds() >= self.linger_s)
                or (now - p.last_heard).total_seconds() >= self.silent_s]
        for peer in gone:
            del self._peers[peer]
        return gone


# -- radar ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RadarCell:
    """One character of the radar: what to draw and what it is (``ring``, ``axis``, ``self``,
    ``peer-in``, ``peer-uncertain``, ``peer-out``, ``peer-far``, ``label``)."""

    char: str
    kind: str


RANGE_RINGS = 2.0
"""The radar shows up to this many radii; a peer further away is drawn on the edge."""


def radar_cells(peers: list[LivePeer], radius_m: float, width: int, height: int
                ) -> list[list[RadarCell | None]]:
    """A radar of the live peers: this device at the centre, true north up.

    Rings are drawn at the radius and at :data:`RANGE_RINGS` radii (the edge). Each peer with
    a distance and bearing is drawn as its ordinal (last digit) at its bearing and distance;
    beyond the edge, just inside it with an arrow on the edge pointing its way (both kind
    ``peer-far``, see :data:`ARROWS`). Every peer is drawn: one whose cell is taken (or that
    would touch another's digit sideways) goes to the nearest free cell. Terminal cells are
    about twice as tall as wide, so one row spans two columns' worth of metres.

    Args:
        peers: the live peers (those without a sample yet are not drawn).
        radius_m: the match radius in metres (> 0).
        width, height: the grid in characters (at least 5 x 3).

    Returns:
        ``height`` rows of ``width`` cells; None is empty space.
    """
    grid: list[list[RadarCell | None]] = [[None] * width for _ in range(height)]
    cx, cy = (width - 1) / 2, (height - 1) / 2
    half_w, half_h = cx, cy
    # metres per row, choosing the axis that limits the circle (a row ~ 2 columns).
    reach = min(half_w / 2, half_h)
    if reach <= 0:
        return grid
    span_m = radius_m * RANGE_RINGS
    per_row_m = span_m / reach

    def to_cell(distance_m: float, bearing_deg: float) -> tuple[int, int]:
        theta = math.radians(bearing_deg)
        rows = distance_m / per_row_m
        return round(cx + 2 * rows * math.sin(theta)), round(cy - rows * math.cos(theta))

    steps = max(64, 8 * (width + height))
    for ring, kind in ((radius_m, "ring"), (span_m, "edge")):
        for i in range(steps):
            x, y = to_cell(ring, 360 * i / steps)
            if 0 <= x < width and 0 <= y < height:
                grid[y][x] = RadarCell("·" if kind == "ring" else "˙", kind)
    for label, bearing in (("N", 0.0), ("E", 90.0), ("S", 180.0), ("W", 270.0)):
        x, y = to_cell(span_m * 1.0, bearing)
        x, y = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
        grid[y][x] = RadarCell(label, "label")
    centre = (round(cx), round(cy))
    grid[centre[1]][centre[0]] = RadarCell("◉", "self")
    taken: set[tuple[int, int]] = {centre}       # self, peers' digits and far peers' arrows
    digits: set[tuple[int, int]] = {centre}    # nothing touches them sideways (reads "34")
    for live in peers:
        if live.distance_m is None or live.bearing_deg is None:
            continue
        far = live.distance_m > span_m
        if far:   # the arrow on the edge, pointing the peer's way; the digit just inside
            ax, ay = _clamp(to_cell(span_m, live.bearing_deg), width, height)
            if (ax, ay) not in taken:
                grid[ay][ax] = RadarCell(ARROWS[round(live.bearing_deg / 45) % 8], "peer-far")
                taken.add((ax, ay))
            ideal = _clamp(to_cell(max(0.0, span_m - per_row_m), live.bearing_deg),
                           width, height)
        else:
            ideal = _clamp(to_cell(live.distance_m, live.bearing_deg), width, height)
        x, y = _free_cell(ideal, taken, digits, width, height)
        kind = "peer-far" if far else f"peer-{live.within or 'out'}"
        grid[y][x] = RadarCell(str(live.peer % 10), kind)
        taken.add((x, y))
        digits.add((x, y))
    return grid


ARROWS = "↑↗→↘↓↙←↖"
"""A far peer's arrow on the radar's edge, by bearing (north, north-east, ... clockwise)."""

_NEARBY = sorted(((dx, dy) for dx in range(-4, 5) for dy in range(-2, 3)),
                 key=lambda d: (d[0] ** 2 + 4 * d[1] ** 2, abs(d[1]), d[1], d[0]))
"""Cells near a peer's place, nearest first (a row is about two columns' worth of metres)."""


def _clamp(cell: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    return min(max(cell[0], 0), width - 1), min(max(cell[1], 0), height - 1)


def _free_cell(ideal: tuple[int, int], taken: set[tuple[int, int]],
               digits: set[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    """The cell nearest ``ideal`` where a peer's digit neither hides another nor touches one
    sideways (``3`` beside ``4`` would read ``34``); ``ideal`` itself if the grid is full."""
    for dx, dy in _NEARBY:
        x, y = ideal[0] + dx, ideal[1] + dy
        if (0 <= x < width and 0 <= y < height and (x, y) not in taken
                and (x - 1, y) not in digits and (x + 1, y) not in digits):
            return x, y
    return ideal
