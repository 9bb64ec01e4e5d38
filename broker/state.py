"""The broker's in-memory state: who is where, who was matched, who may signal whom.

Pure: no asyncio, no sockets, no files, no clock of its own. Every method that depends on time
takes ``now``, in seconds of a monotonic clock (``time.monotonic()`` in the server).

What it holds, all in memory and only for as long as needed (paper section 3, step 2: "this
position is not stored by the server and does not feed any positions history"):

* per connected session: its effective radius and a connection *epoch* (to tell a reconnect
  from the connection it replaces);
* per session with a fix: the latest position only (WGS84 degrees, accuracy in metres) in a
  :class:`~fanny_tui.protocol.proximity.ProximityGrid`, dropped on ``position_lost``, on
  disconnect, or ``position_timeout_s`` seconds after its last update;
* per matched pair of session IDs: the instant of the last match, kept for
  ``max(cooldown_s, route_ttl_s)`` seconds. It enforces "one match per pair per cooldown" and
  is the signaling route of the pair (paper section 3, step 3).

Housekeeping never scans (issue 7, point 5): positions and pairs are each kept in the order
of their last update (an update moves the entry to the end; a doubly linked list, like an
:class:`~collections.OrderedDict`), so the stale ones are always at the front.
:meth:`BrokerState.expire` pops from the front until it meets a fresh entry, or until its
``limit`` of entries is spent: the server calls it in small batches and yields to the event
loop between them, so even a million positions going stale at once never stall the loop for
long. ``now`` must not go backwards (a monotonic clock); if it did, an entry would only be
dropped later, never early.

No garbage-collector stall (issue 7, point 5): the state holds no object per session, position
or pair that CPython's cyclic collector tracks. Each connected session has an integer slot;
its radius, fix and place in the expiry order are items of two :class:`array.array` (one
cache line each per session), the jump rule's memory seven items of a third; the slots,
the pairs and the grid's cells are in dicts of atomic keys and values (str, int, float,
``None``, ``bytearray``), which CPython leaves untracked. A full collection then walks a
few dozen objects for the whole state, not millions.

Matching (paper section 3, step 3): when a session reports a position, the grid yields its
neighbours (never a scan of every session); two sessions match when the accuracy rule
(:func:`~fanny_tui.protocol.proximity.within_radius`, the same rule the devices' contact meter
uses) says ``in`` for their great-circle distance, the smaller of their radii (each radius being
``min(hello.radius_m, radius_max_m)``) and their reported accuracies: the distance is within
the radius and the combined accuracy ``sqrt(a**2 + b**2)`` is at most three radii. The
lexicographically smaller session ID gets the role ``initiator`` (it opens the data channel
and crafts the token), the other ``responder``.

Implausible jumps (issue 6, point 1): a session's position update implying a speed above
``max_speed_mps`` since its last accepted one is rejected by the devices' own rule,
:func:`~fanny_tui.protocol.contact.jump_verdict` (re-anchoring after
:data:`~fanny_tui.protocol.contact.JUMP_CONFIRMATIONS` agreeing updates): it is not stored as
the session's position, makes no match and is no error to the device (an honest receiver
glitched); :attr:`BrokerState.jumps_rejected` counts them. The rule's positions are the
session's last accepted update and the last of a run of rejected ones, kept in a third array
by slot for as long as the connection lasts (a new connection starts afresh, like a device's
first fix), also after the position itself is dropped (``position_lost``, timeout).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Literal

from fanny_tui.protocol import validate
from fanny_tui.protocol.contact import (
    DEFAULT_MAX_SPEED_MPS,
    JUMP_ACCEPTED,
    JUMP_CONFIRMATIONS,
    jump_verdict,
)
from fanny_tui.protocol.errors import LocalProtocolError
from fanny_tui.protocol.proximity import ProximityGrid, within_radius

from . import Refusal

Role = Literal["initiator", "responder"]


@dataclass(frozen=True)
class MatchNotice:
    """Tell ``session_id`` that ``peer_session_id`` is within radius (a ``match`` message).

    Attributes:
        session_id: the session to notify.
        peer_session_id: the other session of the pair.
        role: the role of ``session_id`` in the handshake: the lexicographically smaller ID
            of the pair is ``"initiator"``, the other ``"responder"``.
    """

    session_id: str
    peer_session_id: str
    role: Role


@dataclass(frozen=True)
class Connected:
    """The outcome of :meth:`BrokerState.connect`.

    Attributes:
        epoch: identifies this connection of the session; pass it to
            :meth:`BrokerState.disconnect` and :meth:`BrokerState.is_current`.
        radius_m: the effective radius in metres, ``min(requested, radius_max_m)``.
        replaced: True when an older connection of the same session ID was replaced.
    """

    epoch: int
    radius_m: float
    replaced: bool


class _Recency:
    """str keys, each with a stamp (float seconds), oldest stamp-setting first (the pairs).

    :meth:`set` moves a key to the newest end, :meth:`oldest` gives the first one, both O(1):
    a doubly linked list through two dicts (``None`` is the list's head), like an
    ``OrderedDict`` but invisible to CPython's cyclic garbage collector: every key and value
    is a str, a float or ``None``, and CPython never tracks such a dict (an ``OrderedDict`` is
    always tracked, and a full collection would walk its million entries; issue 7, point 5).
    Five dict entries per move (about 1.7 us at 400,000 keys, 0.6 us for ``move_to_end``):
    fine for pairs, which change once per match; the fixes use the slot arrays instead.
    """

    __slots__ = ("stamps", "_next", "_prev")

    def __init__(self) -> None:
        self.stamps: dict[str, float] = {}
        """key -> its stamp; read it, change it only through :meth:`set` and :meth:`pop`."""
        self._next: dict[str | None, str | None] = {None: None}
        self._prev: dict[str | None, str | None] = {None: None}

    def __len__(self) -> int:
        return len(self.stamps)

    def __contains__(self, key: str) -> bool:
        return key in self.stamps

    def get(self, key: str) -> float | None:
        return self.stamps.get(key)

    def set(self, key: str, stamp: float) -> None:
        """Give ``key`` the stamp ``stamp`` and move it to the newest end."""
        after, before = self._next, self._prev
        following = after.get(key, key)      # key itself: absent (never its own successor)
        if following is None:                # already the newest
            self.stamps[key] = stamp
            return
        if following is not key:             # unlink it
            preceding = before[key]
            after[preceding] = following
            before[following] = preceding
        newest = before[None]
        after[newest] = key
        before[key] = newest
        after[key] = None
        before[None] = key
        self.stamps[key] = stamp

    def pop(self, key: str) -> bool:
        """Forget ``key``; True when it was there."""
        if self.stamps.pop(key, None) is None:
            return False
        following = self._next.pop(key)
        preceding = self._prev.pop(key)
        self._next[preceding] = following
        self._prev[following] = preceding
        return True

    def oldest(self) -> tuple[str, float] | None:
        """The key with the oldest stamp-setting and its stamp, or ``None`` when empty."""
        key = self._next[None]
        return None if key is None else (key, self.stamps[key])


def _pair(a: str, b: str) -> str:
    # One str per pair: a new tuple is tracked by the garbage collector until a pass, and
    # so is the dict it is put in. Unambiguous whatever the IDs contain: the length of the
    # smaller ID comes first.
    lo, hi = (a, b) if a < b else (b, a)
    return f"{len(lo)}:{lo}{hi}"


_NAN = float("nan")
_NO_TRACK = (0.0, 0.0, _NAN, 0.0, 0.0, 0.0, 0.0)
"""A slot's jump-rule memory before its first accepted update (see ``BrokerState._track``)."""


def _positive(name: str, value: float) -> float:
    return validate.number(name, value, low=0.0, low_open=True)


class BrokerState:
    """Sessions, positions, match cooldowns and signaling routes of one broker.

    Args:
        radius_max_m: the largest matching radius in metres; also the grid cell size.
        cooldown_s: seconds during which a pair that matched is not matched again.
        position_timeout_s: seconds after which a position without update is dropped.
        route_ttl_s: seconds after a match during which the pair may exchange ``signal``
            messages; defaults to ``cooldown_s``.
        max_speed_mps: the implausible-jump bound, metres per second (the devices' default).

    Raises:
        ValueError: a parameter is not a positive finite number.
    """

    def __init__(
        self,
        radius_max_m: float,
        cooldown_s: float,
        position_timeout_s: float,
        route_ttl_s: float | None = None,
        max_speed_mps: float = DEFAULT_MAX_SPEED_MPS,
    ) -> None:
        self.radius_max_m = _positive("radius_max_m", radius_max_m)
        self.cooldown_s = _positive("cooldown_s", cooldown_s)
        self.position_timeout_s = _positive("position_timeout_s", position_timeout_s)
        self.route_ttl_s = _positive(
            "route_ttl_s", self.cooldown_s if route_ttl_s is None else route_ttl_s
        )
        self.max_speed_mps = _positive("max_speed_mps", max_speed_mps)
        self._grid: ProximityGrid[str] = ProximityGrid(self.radius_max_m)
        # No object per session or per position that CPython's cyclic garbage collector
        # tracks (issue 7, point 5; docs/performance.md, "The garbage collector"): each
        # connected session has an integer slot, its data are items of three arrays.
        self._slot: dict[str, int] = {}      # connected session -> its slot
        self._session: dict[int, str] = {}   # and back
        # At 3*slot, 3*slot+1, 3*slot+2 (one cache line per array): the radius in metres,
        # the accuracy in metres of the latest fix (-1.0: unknown) and its monotonic seconds;
        # the epoch, then the previous and the next slot in the list of the sessions with a
        # fix, oldest first (-1: no fix). Slot 0 is the list's head: its previous slot is the
        # newest, its next the oldest (see "Housekeeping" above).
        self._num = array("d", (0.0, 0.0, 0.0))
        self._link = array("q", (0, 0, 0))
        # The jump rule's memory, at 7*slot .. 7*slot+6: the last accepted update (latitude,
        # longitude, monotonic seconds; NaN seconds: none since the connection), the last
        # rejected update of the current run (the same three) and the run's length.
        self._track = array("d", _NO_TRACK)
        self._free = array("q")              # slots to reuse
        self.jumps_rejected = 0
        """Position updates rejected as implausible jumps since the start (a count only)."""
        self._fix_count = 0
        # Pair -> instant of its match, oldest first.
        self._matched = _Recency()
        self._epochs = 0

    # --- sessions ------------------------------------------------------------------------

    @property
    def session_count(self) -> int:
        """Number of connected sessions."""
        return len(self._slot)

    @property
    def position_count(self) -> int:
        """Number of sessions with a current position."""
        return self._fix_count

    @property
    def pair_count(self) -> int:
        """Number of remembered matched pairs (cooldowns and routes)."""
        return len(self._matched)

    def connect(self, session_id: str, radius_m: float, now: float) -> Connected:
        """Register a session connection (the ``hello`` of paper section 3, step 1-2).

        A second connection with the same session ID replaces the first (a reconnect): the
        older epoch becomes stale and its position is dropped; cooldowns and routes of the
        session are kept.

        Args:
            session_id: the session ID (validated UUIDv4 text).
            radius_m: the radius requested in ``hello``, metres, > 0.
            now: monotonic seconds (unused today; kept for a uniform calling contract).

        Returns:
            The new :class:`Connected` record.

        Raises:
            ValueError: ``radius_m`` is not a positive finite number.
        """
        radius = min(_positive("radius_m", radius_m), self.radius_max_m)
        slot = self._slot.get(session_id)
        replaced = slot is not None
        if slot is not None:
            self.drop_position(session_id)
        elif self._free:
            slot = self._free.pop()
        else:
            slot = len(self._link) // 3
            self._num.extend((0.0, 0.0, 0.0))
            self._link.extend((0, -1, -1))
            self._track.extend(_NO_TRACK)
        self._slot[session_id] = slot
        self._session[slot] = session_id
        self._epochs += 1
        self._num[3 * slot] = radius
        self._link[3 * slot] = self._epochs
        self._track[7 * slot + 2] = _NAN           # a new connection: no accepted update yet
        self._track[7 * slot + 6] = 0.0
        return Connected(epoch=self._epochs, radius_m=radius, replaced=replaced)

    def is_current(self, session_id: str, epoch: int) -> bool:
        """True when ``epoch`` is the live connection of ``session_id``."""
        slot = self._slot.get(session_id)
        return slot is not None and self._link[3 * slot] == epoch

    def is_connected(self, session_id: str) -> bool:
        """True when ``session_id`` has a live connection."""
        return session_id in self._slot

    def disconnect(self, session_id: str, epoch: int) -> bool:
        """Forget a session connection and its position.

        Args:
            session_id: the session ID.
            epoch: the epoch returned by :meth:`connect` for this connection. A stale epoch
                (the connection was replaced by a reconnect) changes nothing.

        Returns:
            True when the session was removed.
        """
        if not self.is_current(session_id, epoch):
            return False
        self.drop_position(session_id)
        slot = self._slot.pop(session_id)
        del self._session[slot]
        self._free.append(slot)
        return True

    # --- positions and matching ----------------------------------------------------------

    def update_position(
        self,
        session_id: str,
        latitude: float,
        longitude: float,
        accuracy_m: float | None,
        now: float,
    ) -> list[MatchNotice]:
        """Replace the session's position and match it against its neighbours (steps 2-3).

        Neighbours come from the grid, never from a scan of every session. A neighbour
        matches when the accuracy rule (:func:`~fanny_tui.protocol.proximity.within_radius`)
        gives ``in`` for the haversine distance, ``min(radius of each session)`` and the two
        reported accuracies (an unknown accuracy counts as 0), and the pair has not matched
        in the last ``cooldown_s`` seconds; a neighbour whose position is older than
        ``position_timeout_s`` is ignored. Each new match opens the signaling route of the
        pair for ``route_ttl_s`` seconds.

        An implausible jump (:func:`~fanny_tui.protocol.contact.jump_verdict` with
        ``max_speed_mps``, after the session's last accepted update on this connection) is
        rejected: the previous position stays (and ages as before), nothing is matched, and
        :attr:`jumps_rejected` grows by one.

        Args:
            session_id: a connected session.
            latitude: WGS84 degrees, -90..90.
            longitude: WGS84 degrees, -180..180.
            accuracy_m: reported accuracy in metres (95 %, >= 0 as the ``position`` message
                allows), or ``None``; used by the accuracy rule and kept with the fix only
                (a negative value counts as ``None``).
            now: monotonic seconds.

        Returns:
            Two :class:`MatchNotice` per new match (one for each side), ordered by distance;
            none for a rejected jump.

        Raises:
            LocalProtocolError: ``session_id`` is not connected.
            ValueError: a coordinate is out of range or not finite.
        """
        slots = self._slot
        slot = slots.get(session_id)
        if slot is None:
            raise LocalProtocolError("update_position for a session that is not connected")
        if not -90.0 <= latitude <= 90.0:             # NaN and infinities fail too
            raise ValueError(f"latitude out of range: {latitude}")
        if not -180.0 <= longitude <= 180.0:
            raise ValueError(f"longitude out of range: {longitude}")
        track = self._track
        at = 7 * slot
        anchor_at = track[at + 2]
        run = track[at + 6]
        if anchor_at == anchor_at:                    # not NaN: an accepted update before
            verdict = jump_verdict(self.max_speed_mps, latitude, longitude, now,
                                   (track[at], track[at + 1], anchor_at),
                                   (track[at + 3], track[at + 4], track[at + 5]) if run else None,
                                   int(run), JUMP_CONFIRMATIONS)
            if verdict != JUMP_ACCEPTED:
                if verdict > 0:                       # the run's new last update
                    track[at + 3] = latitude
                    track[at + 4] = longitude
                    track[at + 5] = now
                    track[at + 6] = verdict
                self.jumps_rejected += 1
                return []
        track[at] = latitude
        track[at + 1] = longitude
        track[at + 2] = now
        if run:
            track[at + 6] = 0.0
        self._grid.put(session_id, latitude, longitude)
        num, link = self._num, self._link
        at = 3 * slot
        own_radius = num[at]
        num[at + 1] = -1.0 if accuracy_m is None else accuracy_m
        num[at + 2] = now
        following = link[at + 2]
        if following:                                 # 0: already the newest fix
            if following > 0:                         # unlink it from where it was
                preceding = link[at + 1]
                link[3 * preceding + 2] = following
                link[3 * following + 1] = preceding
            else:
                self._fix_count += 1
            newest = link[1]
            link[3 * newest + 2] = slot
            link[at + 1] = newest
            link[at + 2] = 0
            link[1] = slot
        found = [(distance, other)
                 for other, distance in self._grid.near(latitude, longitude, own_radius)
                 if other != session_id]
        found.sort()
        notices: list[MatchNotice] = []
        for distance, other in found:
            at = 3 * slots[other]       # the grid holds only sessions with a fix
            if now - num[at + 2] > self.position_timeout_s:
                continue
            radius = min(own_radius, num[at])
            accuracy = num[at + 1]
            if within_radius(distance, radius, accuracy_m,
                             None if accuracy < 0.0 else accuracy) != "in":
                continue
            pair = _pair(session_id, other)
            last = self._matched.get(pair)
            if last is not None and now - last < self.cooldown_s:
                continue
            self._matched.set(pair, now)
            first = session_id < other
            notices.append(MatchNotice(session_id, other,
                                       "initiator" if first else "responder"))
            notices.append(MatchNotice(other, session_id,
                                       "responder" if first else "initiator"))
        return notices

    def drop_position(self, session_id: str) -> bool:
        """Forget the session's position (``position_lost``). Returns True if it had one."""
        self._grid.remove(session_id)
        slot = self._slot.get(session_id)
        if slot is None:
            return False
        link = self._link
        at = 3 * slot
        following = link[at + 2]
        if following < 0:
            return False
        preceding = link[at + 1]
        link[3 * preceding + 2] = following
        link[3 * following + 1] = preceding
        link[at + 1] = link[at + 2] = -1
        self._fix_count -= 1
        return True

    def has_position(self, session_id: str) -> bool:
        """True when the session has a current position (for tests and health counts)."""
        slot = self._slot.get(session_id)
        return slot is not None and self._link[3 * slot + 2] >= 0

    # --- signaling -----------------------------------------------------------------------

    def check_route(self, source: str, destination: str, now: float) -> None:
        """Check that ``source`` may relay a ``signal`` to ``destination`` (step 3).

        Args:
            source: the sending session (connected).
            destination: the ``peer_session_id`` of the signal.
            now: monotonic seconds.

        Raises:
            Refusal: ``not_matched`` when the pair did not match in the last ``route_ttl_s``
                seconds; ``peer_unavailable`` when the destination is not connected. Both name
                the field ``peer_session_id``.
        """
        last = self._matched.get(_pair(source, destination))
        if source == destination or last is None or now - last > self.route_ttl_s:
            raise Refusal("no recent match with this peer: signal refused",
                          code="not_matched", field="peer_session_id")
        if destination not in self._slot:
            raise Refusal("the peer is not connected", code="peer_unavailable",
                          field="peer_session_id")

    # --- housekeeping --------------------------------------------------------------------

    def expire(self, now: float, limit: int | None = None) -> int:
        """Drop positions older than ``position_timeout_s`` and pairs older than
        ``max(cooldown_s, route_ttl_s)``, oldest first, without scanning the fresh ones.

        Args:
            now: monotonic seconds.
            limit: the most entries (positions and pairs together) to drop in this call, >= 1;
                ``None``: every stale entry. :meth:`expire_pending` tells whether more are due.

        Returns:
            The number of positions dropped.

        Raises:
            ValueError: ``limit`` is not a positive integer.
        """
        if limit is None:
            budget = self._fix_count + len(self._matched)
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        else:
            budget = limit
        num, link = self._num, self._link
        oldest = now - self.position_timeout_s
        dropped = 0
        while dropped < budget:
            slot = link[2]                            # the oldest fix (0: none)
            if not slot or num[3 * slot + 2] >= oldest:
                break
            self.drop_position(self._session[slot])
            dropped += 1
        positions = dropped
        matched = self._matched
        oldest = now - max(self.cooldown_s, self.route_ttl_s)
        while dropped < budget:
            first = matched.oldest()
            if first is None or first[1] >= oldest:
                break
            matched.pop(first[0])
            dropped += 1
        return positions

    def expire_pending(self, now: float) -> bool:
        """True when :meth:`expire` at ``now`` would drop something (O(1))."""
        slot = self._link[2]                          # the oldest fix (0: none)
        if slot and self._num[3 * slot + 2] < now - self.position_timeout_s:
            return True
        pair = self._matched.oldest()
        return pair is not None and pair[1] < now - max(self.cooldown_s, self.route_ttl_s)
