"""Live positions and routing in Redis: several broker processes share one region (issue 8, 2).

:class:`RedisPositions` implements :class:`~broker.backends.LivePositions` and
:class:`RedisRouter` implements :class:`~broker.backends.Router` over one Redis server (or a
primary with replicas; not Redis Cluster: the scripts touch keys they compute). Every broker
process of a region points at the same Redis; no broker holds state another one needs, so a
load balancer needs no sticky sessions and a broker may die at any time.

Privacy (paper section 3, step 2: the position "is not stored by the server and does not feed
any positions history"): Redis holds the latest position of each session only, in keys that
expire on their own; nothing is written to disk as long as the operator runs Redis without
RDB snapshots and without AOF (``save ""``, ``appendonly no``: docs/deployment.md). The broker
neither checks nor changes that setting (it may lack the rights to, and a managed Redis hides
it); the tests' Redis runs that way and a test checks what is left in it after a scenario.
Key names carry no session ID: a session is named by :func:`session_hash` (SHA-256 of the
session ID, truncated to 128 bits: a UUIDv4 cannot be recovered from it), and a pair of
sessions by :func:`pair_hash`. The session ID itself appears only as a value of the session's
position key and inside routed frames (pub/sub is never stored).

Keys (``P`` is the prefix, ``fanny:`` by default; ``H`` a session hash, ``Q`` a pair hash):

* ``P s:H`` -- a connected session: hash ``r`` (effective radius, metres), ``e`` (epoch).
  Expires ``session_ttl_s`` after the last activity (a position, or the housekeeping of the
  broker holding it, which refreshes its sessions): a broker that dies leaves nothing behind.
* ``P f:H`` -- the session's latest position: hash ``sid``, ``lat``, ``lon`` (WGS84 degrees,
  as sent), ``acc`` (metres, empty when unknown). Expires ``position_timeout_s`` after the
  last update: a stale position is never matched, whatever a broker does.
* ``P geo`` (GEO set of ``H``) and ``P polar`` (set of ``H`` beyond Redis' GEO latitude limit,
  |latitude| > 85.05112878 degrees) -- the spatial index; ``P t`` (sorted set of ``H`` by the
  last update, Redis server milliseconds) lets housekeeping drop stale index entries oldest
  first without a scan. The three keys themselves expire ``position_timeout_s`` after the last
  update of any position (a region whose brokers all died empties itself).
* ``P c:Q`` -- the pair's match cooldown: ``SET NX PX cooldown``, so that of two brokers
  matching the same pair at once only one wins (one match per pair per cooldown).
* ``P r:Q`` -- the pair's signaling route, ``PX route_ttl``.
* ``P epoch`` -- a counter: connection epochs unique across the region.

Matching uses the kit's rule, not Redis' distance: Redis' GEO search (its own Earth radius,
52-bit geohash cells) only yields candidates within a slightly larger circle; the broker then
computes :func:`~fanny_tui.protocol.proximity.haversine_m` on the exact coordinates of each
candidate and applies :func:`~fanny_tui.protocol.proximity.within_radius` with the smaller of
the two radii, exactly as :class:`~broker.state.BrokerState` does. The implausible-jump rule
(:func:`~fanny_tui.protocol.contact.jump_verdict`, as in BrokerState) is applied before
anything reaches Redis, by the broker holding the session's connection, from what it keeps of
that connection (the last accepted update and the pending run, in its memory only, seconds of
its monotonic clock): a rejected update costs no round trip and changes nothing in Redis.
A connection to another broker starts afresh, as a new connection does in BrokerState. Times
come from the Redis
server's clock (``TIME`` and key expiry), one clock for every broker: the ``now`` arguments of
the contract (monotonic seconds of one process) are not used.

Routing: one pub/sub channel per connected session (``P to:H``), subscribed by the broker
holding it, and one channel ``P all`` that every broker subscribes to (``broadcast``).
Why a channel per session rather than one per broker with a session -> broker key: the
subscription lives and dies with the subscriber's TCP connection, so a broker that is killed
stops holding its sessions at once (no ownership key to keep alive, nothing stale to time
out), and ``PUBLISH`` answers "is this session connected anywhere?" in the same round trip
that delivers the frame (its receiver count). A subscription costs Redis one dictionary entry;
``SUBSCRIBE`` and ``UNSUBSCRIBE`` are one command each on a connection kept for them. Channel
names carry the session hash, never the session ID.

Messages on a session channel are ``m:`` + the frame (deliver) or ``r:`` + the sender's
process nonce (a newer connection of the session attached elsewhere: call
:meth:`~broker.backends.Recipient.replace` on the local one). On ``P all``: ``b:`` + nonce +
``:`` + the frame; each broker delivers its own broadcasts locally and skips them on the
channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from fanny_tui.protocol.contact import (
    DEFAULT_MAX_SPEED_MPS,
    JUMP_ACCEPTED,
    JUMP_CONFIRMATIONS,
    Stamped,
    jump_verdict,
)
from fanny_tui.protocol.errors import LocalProtocolError
from fanny_tui.protocol.proximity import METRES_PER_DEGREE, haversine_m, within_radius

from . import Refusal
from .backends import EXPIRE_BATCH, Recipient
from .state import Connected, MatchNotice, Role, _positive

__all__ = [
    "DEFAULT_PREFIX",
    "RedisPositions",
    "RedisRouter",
    "connect_redis",
    "pair_hash",
    "session_hash",
]

logger = logging.getLogger("broker.redis")

DEFAULT_PREFIX = "fanny:"
"""Prefix of every key and channel the broker uses (one region per Redis database)."""

GEO_LATITUDE_LIMIT = 85.05112878
"""Degrees: Redis' GEO commands index latitudes within +-this only (the Web Mercator limit);
positions beyond it go to a plain set scanned by the queries that reach it."""

SEARCH_SLACK = 1e-3
SEARCH_MARGIN_M = 2.0
"""The GEO search circle is ``radius * (1 + SEARCH_SLACK) + SEARCH_MARGIN_M`` metres: it covers
Redis' other Earth radius (0.03 % larger) and its geohash rounding (< 1 m), so that every
session the kit's haversine puts within the radius is a candidate."""

SUBSCRIBE_TIMEOUT_S = 5.0
RESUBSCRIBE_DELAY_S = 1.0
"""Seconds between two attempts to read the subscriptions again while Redis is gone."""
SUBSCRIPTION_WARN_EVERY_S = 60.0
"""At most one warning this often while the subscriptions keep failing (an outage is one
line a minute, not one a second), then one line when they work again."""
"""Seconds :meth:`RedisRouter.attach` waits for Redis to confirm a subscription."""


def session_hash(session_id: str) -> str:
    """The name of a session in Redis keys and channels: 32 hex digits of
    SHA-256(``"fanny-session\\0"`` + session ID). A UUIDv4 (122 random bits) cannot be
    recovered from it."""
    return hashlib.sha256(b"fanny-session\0" + session_id.encode()).hexdigest()[:32]


def pair_hash(a: str, b: str) -> str:
    """The name of an unordered pair of sessions in Redis keys (cooldowns, routes): 32 hex
    digits of SHA-256 over both session IDs, the smaller first."""
    first, second = (a, b) if a < b else (b, a)
    digest = hashlib.sha256(b"fanny-pair\0" + first.encode() + b"\0" + second.encode())
    return digest.hexdigest()[:32]


def _redacted(url: str) -> str:
    """``url`` without its user information (a password must not reach a log line)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


POOL_CONNECTIONS = 100
"""Connections to Redis one broker process opens at most (commands in flight beyond wait)."""
POOL_WAIT_S = 10.0
"""The longest a command waits for a free connection; then it fails (``unavailable``)."""


async def connect_redis(url: str, timeout_s: float = 5.0) -> Redis:
    """Open a client of the Redis server at ``url`` and check that it answers.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL (``BrokerSettings.redis_url``).
        timeout_s: seconds to wait for the connection and the ``PING``.

    Returns:
        A client (a connection pool) answering text (``decode_responses``).

    Raises:
        ConnectionError: the server cannot be reached or refused the client; the one-line
            message names the URL without its password.
    """
    # A blocking pool: with more commands in flight than connections, a command waits for a
    # free connection (at most POOL_WAIT_S) instead of failing at once (redis-py's default pool
    # raised MaxConnectionsError for 0.7-2 % of updates at 100 sessions per broker: the region
    # benchmark, docs/performance.md).
    pool: BlockingConnectionPool = BlockingConnectionPool.from_url(
        url, max_connections=POOL_CONNECTIONS, timeout=POOL_WAIT_S, decode_responses=True,
        socket_connect_timeout=timeout_s, socket_timeout=None, health_check_interval=30)
    client: Redis = Redis.from_pool(pool)
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
    except (RedisError, OSError, TimeoutError) as exc:
        await client.aclose()
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConnectionError(f"cannot reach Redis at {_redacted(url)}: {reason}") from None
    return client


# --- Lua scripts (each runs atomically in Redis) --------------------------------------------

_NOW_MS = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: session, fix, geo, t, polar, epoch. ARGV: hash, radius, session_ttl_ms.
# Returns {epoch, replaced (0/1)}.
_CONNECT = """
local replaced = redis.call('EXISTS', KEYS[1])
if replaced == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('SREM', KEYS[5], ARGV[1])
end
local epoch = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[1], 'r', ARGV[2], 'e', epoch)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {epoch, replaced}
"""

# KEYS: session, fix, geo, t, polar. ARGV: hash, epoch. Returns 1 when removed.
_DISCONNECT = """
if redis.call('HGET', KEYS[1], 'e') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
return 1
"""

# KEYS: fix, geo, t, polar. ARGV: hash. Returns 1 when the session had a position.
_DROP = """
local had = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
return had
"""

# KEYS: session, fix, geo, t, polar.
# ARGV: hash, session ID, latitude, longitude, accuracy ('' = unknown), position_timeout_ms,
#       session_ttl_ms, polar (1: index in the polar set), prefix,
#       search latitude, search radius m (0: no GEO search), scan polar (0/1),
#       radius and epoch of this process's connection of the session ('' when none: then a
#       session key that expired, or that Redis lost in a restart, is written again).
# Returns false when the session is not connected, else {own radius, then for each candidate
# (a fresh position of a connected session): session ID, lat, lon, accuracy, radius}. Values
# stay strings: a Lua number would be truncated to an integer on the way back.
_UPDATE = _NOW_MS + """
local radius = redis.call('HGET', KEYS[1], 'r')
if not radius then
  if ARGV[13] == '' then return false end
  radius = ARGV[13]
  redis.call('HSET', KEYS[1], 'r', radius, 'e', ARGV[14])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('HSET', KEYS[2], 'sid', ARGV[2], 'lat', ARGV[3], 'lon', ARGV[4], 'acc', ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
if ARGV[8] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('SADD', KEYS[5], ARGV[1])
  redis.call('PEXPIRE', KEYS[5], ARGV[6])
else
  redis.call('SREM', KEYS[5], ARGV[1])
  redis.call('GEOADD', KEYS[3], ARGV[4], ARGV[3], ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
redis.call('ZADD', KEYS[4], now_ms, ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
local candidates = {}
if ARGV[11] ~= '0' and redis.call('EXISTS', KEYS[3]) == 1 then
  candidates = redis.call('GEOSEARCH', KEYS[3], 'FROMLONLAT', ARGV[4], ARGV[10],
                          'BYRADIUS', ARGV[11], 'm')
end
if ARGV[12] == '1' then
  for _, h in ipairs(redis.call('SMEMBERS', KEYS[5])) do table.insert(candidates, h) end
end
local out = {radius}
for _, h in ipairs(candidates) do
  if h ~= ARGV[1] then
    local fix = redis.call('HMGET', ARGV[9] .. 'f:' .. h, 'sid', 'lat', 'lon', 'acc')
    if fix[1] then
      local r = redis.call('HGET', ARGV[9] .. 's:' .. h, 'r')
      if r then
        table.insert(out, fix[1]); table.insert(out, fix[2]); table.insert(out, fix[3])
        table.insert(out, fix[4]); table.insert(out, r)
      end
    end
  end
end
return out
"""

# KEYS: cooldown keys then route keys (n each). ARGV: cooldown_ms, route_ms.
# Returns one 0/1 per pair: 1 when this call claimed the pair (and opened its route).
_CLAIM = """
local n = #KEYS / 2
local out = {}
for i = 1, n do
  if redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[1]) then
    redis.call('SET', KEYS[n + i], '1', 'PX', ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: geo, t, polar. ARGV: position_timeout_ms, limit. Returns the entries dropped.
_SWEEP = _NOW_MS + """
local stale = redis.call('ZRANGE', KEYS[2], '-inf', now_ms - tonumber(ARGV[1]),
                         'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
for _, h in ipairs(stale) do
  redis.call('ZREM', KEYS[1], h)
  redis.call('ZREM', KEYS[2], h)
  redis.call('SREM', KEYS[3], h)
end
return #stale
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


@dataclass(slots=True)
class _Local:
    """A session connected to this process: its epoch, effective radius (metres), the
    monotonic instant of its last position (None: it has none), and the implausible-jump
    rule's memory: the last accepted update and the last one of the current run of rejected
    ones (latitude, longitude, monotonic seconds; None: none) and the run's length."""

    epoch: int
    radius_m: float
    updated: float | None = None
    anchor: Stamped | None = None
    run: Stamped | None = None
    run_length: int = 0


class RedisPositions:
    """:class:`~broker.backends.LivePositions` shared by every broker on one Redis.

    Args:
        client: an open client (see :func:`connect_redis`), answering text.
        radius_max_m: the largest matching radius, metres.
        cooldown_s: seconds before the same pair can match again (across every broker).
        position_timeout_s: seconds after which a position without update expires.
        route_ttl_s: seconds after a match during which the pair may signal (None: cooldown_s).
        max_speed_mps: the implausible-jump bound, metres per second (the devices' default).
        session_ttl_s: seconds a session key lives without activity (None: the larger of
            ``position_timeout_s`` and 30 s); the holding broker refreshes it in
            :meth:`expire` every quarter of it, so :meth:`expire` must run at least that
            often. A position of a session this process holds writes its key again if it
            expired (or Redis restarted).
        prefix: prefix of every key (one region per Redis database).
        owns_client: close ``client`` in :meth:`close`.

    Raises:
        ValueError: a duration or radius is not a positive finite number.
    """

    def __init__(self, client: Redis, radius_max_m: float, cooldown_s: float,
                 position_timeout_s: float, route_ttl_s: float | None = None, *,
                 max_speed_mps: float = DEFAULT_MAX_SPEED_MPS,
                 session_ttl_s: float | None = None, prefix: str = DEFAULT_PREFIX,
                 owns_client: bool = True) -> None:
        self.client = client
        self.radius_max_m = _positive("radius_max_m", radius_max_m)
        self.cooldown_s = _positive("cooldown_s", cooldown_s)
        self.position_timeout_s = _positive("position_timeout_s", position_timeout_s)
        self.route_ttl_s = _positive("route_ttl_s",
                                     self.cooldown_s if route_ttl_s is None else route_ttl_s)
        self.max_speed_mps = _positive("max_speed_mps", max_speed_mps)
        self.jumps_rejected = 0
        """Position updates of this process's sessions rejected as implausible jumps."""
        self.session_ttl_s = _positive(
            "session_ttl_s",
            max(self.position_timeout_s, 30.0) if session_ttl_s is None else session_ttl_s)
        self.prefix = prefix
        self.owns_client = owns_client
        self._geo, self._times, self._polar = prefix + "geo", prefix + "t", prefix + "polar"
        self._epoch = prefix + "epoch"
        self._connect = client.register_script(_CONNECT)
        self._disconnect = client.register_script(_DISCONNECT)
        self._drop = client.register_script(_DROP)
        self._update = client.register_script(_UPDATE)
        self._claim = client.register_script(_CLAIM)
        self._sweep = client.register_script(_SWEEP)
        # What this process knows of its own connections (see _Local): for the GEO search
        # radius, counts() and the refresh of session keys.
        self._local: dict[str, _Local] = {}
        self._refreshed = -math.inf        # when expire() last refreshed the session keys
        self._closed = False

    def _session_key(self, h: str) -> str:
        return f"{self.prefix}s:{h}"

    def _fix_key(self, h: str) -> str:
        return f"{self.prefix}f:{h}"

    async def connect(self, session_id: str, radius_m: float, now: float) -> Connected:
        """Register a session connection; an existing one (on any broker) is replaced and its
        position dropped; cooldowns and routes are kept. See
        :meth:`broker.state.BrokerState.connect`.

        Raises:
            ValueError: ``radius_m`` is not a positive finite number.
            redis.exceptions.RedisError: Redis failed.
        """
        radius = min(_positive("radius_m", radius_m), self.radius_max_m)
        h = session_hash(session_id)
        epoch, replaced = await self._connect(
            keys=[self._session_key(h), self._fix_key(h), self._geo, self._times, self._polar,
                  self._epoch],
            args=[h, repr(radius), _ms(self.session_ttl_s)])
        self._local[session_id] = _Local(int(epoch), radius)
        return Connected(epoch=int(epoch), radius_m=radius, replaced=bool(replaced))

    async def disconnect(self, session_id: str, epoch: int) -> bool:
        """Forget the session and its position unless ``epoch`` is stale (it reconnected,
        here or on another broker). Returns True when removed."""
        local = self._local.get(session_id)
        if local is not None and local.epoch == epoch:
            del self._local[session_id]
        h = session_hash(session_id)
        removed = await self._disconnect(
            keys=[self._session_key(h), self._fix_key(h), self._geo, self._times, self._polar],
            args=[h, str(epoch)])
        return bool(removed)

    def _search_plan(self, latitude: float, radius_m: float) -> tuple[float, float, bool]:
        """Where to search the GEO index and whether to scan the polar set.

        Returns:
            ``(latitude of the centre, radius in metres (0: skip the GEO index), scan polar)``.
            A centre beyond the GEO limit is moved to the limit and the radius grown by the
            distance moved: the circle still covers every candidate.
        """
        search = radius_m * (1.0 + SEARCH_SLACK) + SEARCH_MARGIN_M
        reach = search / METRES_PER_DEGREE
        scan_polar = abs(latitude) + reach >= GEO_LATITUDE_LIMIT
        if abs(latitude) <= GEO_LATITUDE_LIMIT:
            return latitude, search, scan_polar
        if abs(latitude) - reach > GEO_LATITUDE_LIMIT:
            return latitude, 0.0, True              # nothing of the GEO index is that close
        edge = math.copysign(GEO_LATITUDE_LIMIT, latitude)
        moved = (abs(latitude) - GEO_LATITUDE_LIMIT) * METRES_PER_DEGREE
        return edge, search + moved + SEARCH_MARGIN_M, True

    async def update_position(self, session_id: str, latitude: float, longitude: float,
                              accuracy_m: float | None, now: float) -> list[MatchNotice]:
        """Replace the session's position (WGS84 degrees; accuracy metres, 95 %) and match it
        against the fresh positions near it, on every broker (paper section 3, steps 2-3).

        An implausible jump after the connection's last accepted update (see the module
        docstring) is rejected here, before Redis: no notice, :attr:`jumps_rejected` + 1.

        Returns:
            Two :class:`~broker.state.MatchNotice` per new match (one per side), nearest
            first; a pair matches at most once per ``cooldown_s`` across every broker.

        Raises:
            LocalProtocolError: the session is not connected.
            ValueError: a coordinate is out of range or not finite.
            redis.exceptions.RedisError: Redis failed.
        """
        if not (math.isfinite(latitude) and -90.0 <= latitude <= 90.0):
            raise ValueError(f"latitude out of range: {latitude}")
        if not (math.isfinite(longitude) and -180.0 <= longitude <= 180.0):
            raise ValueError(f"longitude out of range: {longitude}")
        local = self._local.get(session_id)
        if local is not None:
            verdict = jump_verdict(self.max_speed_mps, latitude, longitude, now, local.anchor,
                                   local.run, local.run_length, JUMP_CONFIRMATIONS)
            if verdict != JUMP_ACCEPTED:
                if verdict > 0:
                    local.run, local.run_length = (latitude, longitude, now), verdict
                self.jumps_rejected += 1
                return []
        # The session's own radius bounds the search (as BrokerState's grid query); the script
        # returns the radius Redis holds and the exact rule below uses that one.
        own_radius = self.radius_max_m if local is None else local.radius_m
        h = session_hash(session_id)
        centre, search, scan_polar = self._search_plan(latitude, own_radius)
        reply = await self._update(
            keys=[self._session_key(h), self._fix_key(h), self._geo, self._times, self._polar],
            args=[h, session_id, repr(latitude), repr(longitude),
                  "" if accuracy_m is None else repr(accuracy_m),
                  _ms(self.position_timeout_s), _ms(self.session_ttl_s),
                  "1" if abs(latitude) > GEO_LATITUDE_LIMIT else "0", self.prefix,
                  repr(centre), repr(search), "1" if scan_polar else "0",
                  "" if local is None else repr(local.radius_m),
                  "" if local is None else str(local.epoch)])
        if reply is None:
            raise LocalProtocolError("update_position for a session that is not connected")
        if local is not None:
            local.updated = now
            local.anchor, local.run, local.run_length = (latitude, longitude, now), None, 0
        radius_self = float(reply[0])
        found: list[tuple[float, str]] = []
        for i in range(1, len(reply), 5):
            other, lat, lon, acc, radius_other = reply[i:i + 5]
            distance = haversine_m(latitude, longitude, float(lat), float(lon))
            if distance > radius_self:
                continue                 # BrokerState's grid query uses the own radius too
            radius = min(radius_self, float(radius_other))
            if within_radius(distance, radius, accuracy_m, float(acc) if acc else None) != "in":
                continue
            found.append((distance, other))
        found.sort()
        if not found:
            return []
        pairs = [pair_hash(session_id, other) for _, other in found]
        claimed = await self._claim(
            keys=[f"{self.prefix}c:{q}" for q in pairs] + [f"{self.prefix}r:{q}" for q in pairs],
            args=[_ms(self.cooldown_s), _ms(self.route_ttl_s)])
        notices: list[MatchNotice] = []
        for (_, other), won in zip(found, claimed, strict=True):
            if not won:
                continue
            mine: Role = "initiator" if session_id < other else "responder"
            theirs: Role = "responder" if mine == "initiator" else "initiator"
            notices.append(MatchNotice(session_id, other, mine))
            notices.append(MatchNotice(other, session_id, theirs))
        return notices

    async def drop_position(self, session_id: str) -> bool:
        """Forget the session's position (``position_lost``); True if it had one."""
        local = self._local.get(session_id)
        if local is not None:
            local.updated = None
        h = session_hash(session_id)
        had = await self._drop(keys=[self._fix_key(h), self._geo, self._times, self._polar],
                               args=[h])
        return bool(had)

    async def check_route(self, source: str, destination: str, now: float) -> None:
        """Check that ``source`` may relay a ``signal`` to ``destination`` (step 3).

        Raises:
            Refusal: ``not_matched`` when the pair did not match in the last ``route_ttl_s``
                seconds (on any broker); ``peer_unavailable`` when the destination is not
                connected to any broker. Both name the field ``peer_session_id``.
            redis.exceptions.RedisError: Redis failed.
        """
        if source == destination:
            routed, connected = 0, 1
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.exists(f"{self.prefix}r:{pair_hash(source, destination)}")
                pipe.exists(self._session_key(session_hash(destination)))
                routed, connected = await pipe.execute()
        if not routed:
            raise Refusal("no recent match with this peer: signal refused",
                          code="not_matched", field="peer_session_id")
        if not connected:
            raise Refusal("the peer is not connected", code="peer_unavailable",
                          field="peer_session_id")

    async def expire(self, now: float) -> int:
        """One round of housekeeping: drop stale entries of the spatial index (their positions
        already expired on their own) in batches of :data:`~broker.backends.EXPIRE_BATCH`,
        yielding between them, and refresh the keys of this process's sessions (once every
        quarter of ``session_ttl_s`` of ``now``, monotonic seconds).

        Returns:
            The number of stale index entries dropped (by this broker: another one may have
            swept them first).
        """
        keys = [self._geo, self._times, self._polar]
        args = [_ms(self.position_timeout_s), EXPIRE_BATCH]
        dropped = batch = int(await self._sweep(keys=keys, args=args))
        while batch == EXPIRE_BATCH:
            await asyncio.sleep(0)
            batch = int(await self._sweep(keys=keys, args=args))
            dropped += batch
        for local in self._local.values():
            if local.updated is not None and now - local.updated > self.position_timeout_s:
                local.updated = None
        if now - self._refreshed < self.session_ttl_s / 4:
            return dropped
        self._refreshed = now
        sessions = list(self._local)
        ttl = _ms(self.session_ttl_s)
        for start in range(0, len(sessions), EXPIRE_BATCH):
            async with self.client.pipeline(transaction=False) as pipe:
                for session_id in sessions[start:start + EXPIRE_BATCH]:
                    pipe.pexpire(self._session_key(session_hash(session_id)), ttl)
                await pipe.execute()
        return dropped

    def counts(self) -> dict[str, int]:
        """``{"sessions": ..., "positions": ..., "jumps_rejected": ...}`` of this process's own
        connections (no IDs; a position counts until this process's housekeeping finds it
        stale; ``jumps_rejected`` since this process started)."""
        positions = sum(1 for local in self._local.values() if local.updated is not None)
        return {"sessions": len(self._local), "positions": positions,
                "jumps_rejected": self.jumps_rejected}

    async def ping(self) -> None:
        """``PING`` the Redis server (``/healthz``); raises when it does not answer."""
        await self.client.ping()

    async def close(self) -> None:
        """Close the client when this object owns it; idempotent. Redis keeps the sessions
        until their keys expire (a stopping broker's connections are closed by the server,
        which disconnects each session first)."""
        if self._closed:
            return
        self._closed = True
        self._local.clear()
        if self.owns_client:
            await self.client.aclose()


class RedisRouter:
    """:class:`~broker.backends.Router` over Redis pub/sub: one channel per session (see the
    module docstring for why), one channel for broadcasts.

    Await :meth:`start` before anything else.

    Args:
        client: an open client (see :func:`connect_redis`), answering text; the router takes
            one more connection of its pool for its subscriptions.
        prefix: prefix of every channel (as :class:`RedisPositions`).
        owns_client: close ``client`` in :meth:`close`.
    """

    def __init__(self, client: Redis, *, prefix: str = DEFAULT_PREFIX,
                 owns_client: bool = False) -> None:
        self.client = client
        self.prefix = prefix
        self.owns_client = owns_client
        self.nonce = secrets.token_hex(8)   # names this process in control messages only
        self._all = prefix + "all"
        self._recipients: dict[str, Recipient] = {}
        self._by_channel: dict[str, str] = {}           # channel -> session ID (local only)
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        self.subscription_failures = 0    # consecutive failed reads; 0 while Redis answers

    def _channel(self, session_id: str) -> str:
        return f"{self.prefix}to:{session_hash(session_id)}"

    async def start(self) -> None:
        """Subscribe to the broadcast channel and start delivering.

        Raises:
            redis.exceptions.RedisError: Redis failed.
        """
        self._pubsub = self.client.pubsub()
        confirmed = self._expect_confirmation(self._all)
        await self._pubsub.subscribe(self._all)
        self._listener = asyncio.create_task(self._listen(), name="redis-router")
        await asyncio.wait_for(confirmed, SUBSCRIBE_TIMEOUT_S)

    def _expect_confirmation(self, channel: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations[channel] = future
        return future

    async def _listen(self) -> None:
        assert self._pubsub is not None
        last_warning = -math.inf
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # Redis gone: redis-py reconnects and resubscribes
                self.subscription_failures += 1
                now = time.monotonic()
                if now - last_warning >= SUBSCRIPTION_WARN_EVERY_S:
                    last_warning = now
                    logger.warning("Redis subscription failed (%s), %d attempt(s) in a row; "
                                   "retrying every %g s", type(exc).__name__,
                                   self.subscription_failures, RESUBSCRIBE_DELAY_S)
                await asyncio.sleep(RESUBSCRIBE_DELAY_S)
                continue
            if self.subscription_failures:
                logger.warning("Redis subscription restored after %d failed attempt(s)",
                               self.subscription_failures)
                self.subscription_failures = 0
                last_warning = -math.inf
            if message is None:
                continue
            try:
                await self._on_message(message)
            except Exception as exc:  # one bad message never stops the delivery
                logger.error("failed to deliver a routed message (%s)", type(exc).__name__)

    async def _on_message(self, message: dict[str, Any]) -> None:
        kind, channel, data = message["type"], message["channel"], message["data"]
        if kind == "subscribe":
            future = self._confirmations.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
            return
        if kind != "message" or not isinstance(data, str):
            return
        if channel == self._all:
            nonce, _, text = data[2:].partition(":")
            if data.startswith("b:") and nonce != self.nonce:
                await self._deliver_all(text)
            return
        session_id = self._by_channel.get(channel)
        recipient = None if session_id is None else self._recipients.get(session_id)
        if session_id is None or recipient is None:
            return                       # detached meanwhile
        if data.startswith("m:"):
            recipient.post(data[2:])
        elif data.startswith("r:") and data[2:] != self.nonce:
            del self._recipients[session_id]
            del self._by_channel[channel]
            assert self._pubsub is not None
            await self._pubsub.unsubscribe(channel)
            recipient.replace()

    async def _deliver_all(self, message: str) -> int:
        recipients = list(self._recipients.values())
        for i, recipient in enumerate(recipients):
            recipient.post(message)
            if i % 1000 == 999:
                await asyncio.sleep(0)   # many sessions: let the loop breathe
        return len(recipients)

    async def attach(self, session_id: str, recipient: Recipient) -> None:
        """``recipient`` holds ``session_id`` on this process from now on; an older
        connection of the session here is replaced at once, one on another broker when that
        broker receives the ``r:`` message (before this call subscribes, so this process does
        not hear its own).

        Raises:
            redis.exceptions.RedisError: Redis failed.
            TimeoutError: Redis did not confirm the subscription in
                :data:`SUBSCRIBE_TIMEOUT_S` seconds.
        """
        assert self._pubsub is not None, "RedisRouter.start() was not awaited"
        channel = self._channel(session_id)
        old = self._recipients.get(session_id)
        self._recipients[session_id] = recipient
        if old is not None:
            if old is not recipient:
                old.replace()
            return                       # already subscribed
        self._by_channel[channel] = session_id
        await self.client.publish(channel, "r:" + self.nonce)
        confirmed = self._expect_confirmation(channel)
        await self._pubsub.subscribe(channel)
        await asyncio.wait_for(confirmed, SUBSCRIBE_TIMEOUT_S)
        if session_id not in self._recipients:       # detached meanwhile by another task
            await self._pubsub.unsubscribe(channel)

    async def detach(self, session_id: str, recipient: Recipient) -> None:
        """The connection ended: stop holding the session unless a newer connection does."""
        if self._recipients.get(session_id) is not recipient:
            return
        del self._recipients[session_id]
        channel = self._channel(session_id)
        self._by_channel.pop(channel, None)
        self._confirmations.pop(channel, None)
        if self._pubsub is not None and not self._closed:
            await self._pubsub.unsubscribe(channel)

    async def post(self, session_id: str, message: str) -> bool:
        """Queue ``message`` to the session wherever it is connected: directly when here,
        else through its channel.

        Returns:
            False when no broker holds the session (nobody subscribed to its channel).

        Raises:
            redis.exceptions.RedisError: Redis failed.
        """
        recipient = self._recipients.get(session_id)
        if recipient is not None:
            recipient.post(message)
            return True
        receivers = await self.client.publish(self._channel(session_id), "m:" + message)
        return bool(receivers)

    async def broadcast(self, message: str) -> int:
        """Queue ``message`` to every session on every broker: the local ones at once, the
        others through ``P all``. Returns how many local sessions got it.

        Raises:
            redis.exceptions.RedisError: Redis failed (the local sessions got it already).
        """
        count = await self._deliver_all(message)
        await self.client.publish(self._all, f"b:{self.nonce}:{message}")
        return count

    def local_count(self) -> int:
        """Sessions connected to this process."""
        return len(self._recipients)

    async def close(self) -> None:
        """Stop routing (unsubscribes by closing the subscription connection); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
        for future in self._confirmations.values():
            future.cancel()
        self._confirmations.clear()
        self._recipients.clear()
        self._by_channel.clear()
        if self.owns_client:
            await self.client.aclose()
