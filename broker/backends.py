"""The broker's storage seams: live positions, session routing, the positive board (issue 8).

A broker process keeps three kinds of state, each behind a small interface so that several
stateless broker processes can share one region (paper section 4: servers per city or region;
section 5: several organizations' servers):

* :class:`LivePositions` -- connected sessions, their latest position, match cooldowns and
  signaling routes. Memory only, never persisted, no history (privacy invariant 2).
  Embedded: :class:`MemoryPositions` over :class:`~broker.state.BrokerState`. Scaled: Redis.
* :class:`Router` -- delivers a text frame to a session's connection wherever it is connected
  (``match``, relayed ``signal``, ``positives_available``), and closes an older connection of
  a session that reconnected. Embedded: :class:`LocalRouter` (a dict). Scaled: Redis pub/sub.
* :class:`~broker.positives.PositiveBoard` -- positive tokens and declaration codes, durable
  before acknowledged. Embedded: SQLite. Scaled: PostgreSQL.

:func:`open_backends` picks them from :class:`~broker.server.BrokerSettings`
(``redis_url``, ``postgres_url``); without those it is the embedded broker of one process.

Every method of :class:`LivePositions` and :class:`Router` is called from the event loop; an
implementation must not block it (the embedded ones are plain in-memory calls, the Redis ones
await the network).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .positives import BoardError, CodePolicy, PositiveBoard, SqlitePositiveBoard
from .state import BrokerState, Connected, MatchNotice

if TYPE_CHECKING:
    from .server import BrokerSettings

__all__ = [
    "Backends",
    "LivePositions",
    "LocalRouter",
    "MemoryPositions",
    "Recipient",
    "Router",
    "open_backends",
    "open_board",
    "store_unavailable",
]

EXPIRE_BATCH = 250
"""Stale entries dropped per step of housekeeping before yielding to the event loop (issue 7,
point 5). A timer that falls due during a step runs only after the next step too, so a stall
is about two steps: at a million live positions dropped in the order devices last moved
(random in memory), 1,000 took up to 5-6 ms of CPU, 250 take up to 1.3 ms
(docs/performance.md, "Expiry stall")."""


@runtime_checkable
class LivePositions(Protocol):
    """Sessions, latest positions, cooldowns and routes (paper section 3, steps 1-3).

    The contract of :class:`~broker.state.BrokerState`, awaited. ``now`` is monotonic seconds
    of this process; a shared implementation may ignore it and use its store's own expiry
    (entries that expire on their own), since monotonic clocks of two processes differ.
    """

    async def connect(self, session_id: str, radius_m: float, now: float) -> Connected:
        """Register a session connection (``hello``). See :meth:`BrokerState.connect`.

        Raises:
            ValueError: ``radius_m`` is not a positive finite number.
        """
        ...

    async def disconnect(self, session_id: str, epoch: int) -> bool:
        """Forget the session and its position unless ``epoch`` is stale (a reconnect)."""
        ...

    async def update_position(self, session_id: str, latitude: float, longitude: float,
                              accuracy_m: float | None, now: float) -> list[MatchNotice]:
        """Replace the session's position (WGS84 degrees; accuracy metres) and match it.

        Returns:
            Two :class:`~broker.state.MatchNotice` per new match (one per side), nearest
            first. Each pair matches at most once per cooldown, across every broker sharing
            the store.

        Raises:
            LocalProtocolError: the session is not connected.
        """
        ...

    async def drop_position(self, session_id: str) -> bool:
        """Forget the session's position (``position_lost``); True if it had one."""
        ...

    async def check_route(self, source: str, destination: str, now: float) -> None:
        """Check that ``source`` may relay a ``signal`` to ``destination``.

        Raises:
            Refusal: ``not_matched`` / ``peer_unavailable`` (field ``peer_session_id``).
        """
        ...

    async def expire(self, now: float) -> int:
        """One round of housekeeping: drop stale positions and pairs, yielding to the event
        loop between batches (no stall). Returns the number of positions dropped."""
        ...

    def counts(self) -> dict[str, int]:
        """``{"sessions": ..., "positions": ..., "jumps_rejected": ...}`` as this process knows
        them (no IDs; ``jumps_rejected``: position updates rejected as implausible jumps since
        the start)."""
        ...

    async def ping(self) -> None:
        """Check that the store answers (the broker's ``/healthz``).

        Raises:
            Exception: the store cannot be reached (any exception counts as "failing").
        """
        ...

    async def close(self) -> None:
        """Release connections; idempotent."""
        ...


class Recipient(Protocol):
    """One local session connection, as the router sees it (the server's connection)."""

    def post(self, message: str) -> None:
        """Queue a text frame without waiting (a client that does not read gets closed)."""
        ...

    def replace(self) -> None:
        """A newer connection of the same session exists: close this one (code 4000)."""
        ...


@runtime_checkable
class Router(Protocol):
    """Delivers text frames to sessions wherever they are connected."""

    async def attach(self, session_id: str, recipient: Recipient) -> None:
        """``recipient`` now holds ``session_id``'s connection on this process. An older
        connection of the same session (on any broker) gets :meth:`Recipient.replace`."""
        ...

    async def detach(self, session_id: str, recipient: Recipient) -> None:
        """The connection ended; nothing happens if a newer one holds the session."""
        ...

    async def post(self, session_id: str, message: str) -> bool:
        """Queue ``message`` to the session's connection; False when connected nowhere."""
        ...

    async def broadcast(self, message: str) -> int:
        """Queue ``message`` to every session on every broker (``positives_available``: the
        same text to all). Returns how many local sessions got it. Yields to the event loop
        every 1000 sessions."""
        ...

    def local_count(self) -> int:
        """Sessions connected to this process."""
        ...

    async def close(self) -> None:
        """Stop routing; idempotent."""
        ...


def store_unavailable(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a :class:`LivePositions` or :class:`Router` call, says that a
    shared store cannot be reached now (Redis down, restarting or too slow: retry later)
    rather than a bug.

    True for the built-in ``ConnectionError`` and ``TimeoutError`` and for redis-py's
    ``ConnectionError`` (``BusyLoadingError`` included) and ``TimeoutError``; the board's
    failures are :class:`~broker.positives.BoardError`, checked apart. redis-py is looked at
    only if it was imported (a process without ``redis_url`` never raises its errors).
    """
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    redis = sys.modules.get("redis.exceptions")
    return redis is not None and isinstance(exc, redis.ConnectionError | redis.TimeoutError)


class MemoryPositions:
    """:class:`LivePositions` of one process: :class:`~broker.state.BrokerState`, awaited.

    Args:
        state: the pure state; its methods are called directly (no thread, no copy).
    """

    def __init__(self, state: BrokerState) -> None:
        self.state = state

    async def connect(self, session_id: str, radius_m: float, now: float) -> Connected:
        return self.state.connect(session_id, radius_m, now)

    async def disconnect(self, session_id: str, epoch: int) -> bool:
        return self.state.disconnect(session_id, epoch)

    async def update_position(self, session_id: str, latitude: float, longitude: float,
                              accuracy_m: float | None, now: float) -> list[MatchNotice]:
        return self.state.update_position(session_id, latitude, longitude, accuracy_m, now)

    async def drop_position(self, session_id: str) -> bool:
        return self.state.drop_position(session_id)

    async def check_route(self, source: str, destination: str, now: float) -> None:
        self.state.check_route(source, destination, now)

    async def expire(self, now: float) -> int:
        dropped = self.state.expire(now, limit=EXPIRE_BATCH)
        while self.state.expire_pending(now):
            await asyncio.sleep(0)
            dropped += self.state.expire(now, limit=EXPIRE_BATCH)
        return dropped

    def counts(self) -> dict[str, int]:
        return {"sessions": self.state.session_count, "positions": self.state.position_count,
                "jumps_rejected": self.state.jumps_rejected}

    async def ping(self) -> None:
        return None           # this process's memory always answers

    async def close(self) -> None:
        return None


class LocalRouter:
    """:class:`Router` of one process: a dict from session ID to its connection."""

    def __init__(self) -> None:
        self._recipients: dict[str, Recipient] = {}

    async def attach(self, session_id: str, recipient: Recipient) -> None:
        old = self._recipients.get(session_id)
        self._recipients[session_id] = recipient
        if old is not None and old is not recipient:
            old.replace()

    async def detach(self, session_id: str, recipient: Recipient) -> None:
        if self._recipients.get(session_id) is recipient:
            del self._recipients[session_id]

    async def post(self, session_id: str, message: str) -> bool:
        recipient = self._recipients.get(session_id)
        if recipient is None:
            return False
        recipient.post(message)
        return True

    async def broadcast(self, message: str) -> int:
        recipients: Sequence[Recipient] = list(self._recipients.values())
        for i, recipient in enumerate(recipients):
            recipient.post(message)
            if i % 1000 == 999:
                await asyncio.sleep(0)   # many sessions: let the loop breathe
        return len(recipients)

    def local_count(self) -> int:
        return len(self._recipients)

    async def close(self) -> None:
        self._recipients.clear()


@dataclass
class Backends:
    """The three stores of a broker process (see the module docstring).

    Attributes:
        positions: live sessions, positions, cooldowns and routes.
        router: delivery of frames to sessions.
        board: the positive-token board (its methods block: call them in a thread).
        owns_board: close the board with the others (False when the caller passed it in).
    """

    positions: LivePositions
    router: Router
    board: PositiveBoard
    owns_board: bool = True

    async def close(self) -> None:
        """Close every store this object owns; idempotent."""
        await self.router.close()
        await self.positions.close()
        if self.owns_board:
            await asyncio.to_thread(self.board.close)


async def open_backends(settings: BrokerSettings,
                        board: PositiveBoard | None = None) -> Backends:
    """Open the stores the settings name: embedded (memory + SQLite ``db_path``) by default;
    Redis for positions and routing with ``redis_url``; PostgreSQL for the board with
    ``postgres_url``.

    Args:
        settings: the broker's settings.
        board: a board to use instead of opening one (the caller keeps it open).

    Raises:
        BoardError: the board cannot be opened.
        SetupError: a store named in the settings cannot be reached.
    """
    owns = board is None
    if board is None:
        board = await asyncio.to_thread(open_board, settings)
    try:
        positions, router = await _open_live(settings)
    except BaseException:
        if owns:
            await asyncio.to_thread(board.close)
        raise
    return Backends(positions, router, board, owns_board=owns)


async def _open_live(settings: BrokerSettings) -> tuple[LivePositions, Router]:
    """Positions and router: in this process's memory, or in Redis with ``redis_url`` (see
    :mod:`broker.redis_backend`; one client shared by both, closed with the positions).

    Raises:
        SetupError: Redis cannot be reached (one line naming ``redis_url``).
    """
    from .server import SetupError

    if settings.redis_url is None:
        state = BrokerState(settings.radius_max_m, settings.cooldown_s,
                            settings.position_timeout_s, settings.route_ttl_s,
                            max_speed_mps=settings.max_speed_mps)
        return MemoryPositions(state), LocalRouter()
    from .redis_backend import RedisPositions, RedisRouter, connect_redis

    try:
        client = await connect_redis(settings.redis_url)
    except ConnectionError as exc:
        raise SetupError(f"redis_url: {exc}") from None
    # A session key outlives a few housekeeping rounds (each refreshes it) and a position: a
    # broker that dies leaves its sessions behind in Redis no longer than that.
    session_ttl = max(settings.position_timeout_s, 4 * settings.housekeeping_interval_s, 10.0)
    positions = RedisPositions(client, settings.radius_max_m, settings.cooldown_s,
                               settings.position_timeout_s, settings.route_ttl_s,
                               max_speed_mps=settings.max_speed_mps,
                               session_ttl_s=session_ttl, owns_client=True)
    router = RedisRouter(client)
    try:
        await router.start()
    except Exception as exc:
        await router.close()
        await positions.close()
        raise SetupError(f"redis_url: cannot subscribe to Redis channels "
                         f"({type(exc).__name__})") from None
    except BaseException:
        await router.close()
        await positions.close()
        raise
    return positions, router


def open_board(settings: BrokerSettings) -> PositiveBoard:
    """Open the positive board the settings name (blocking: call it in a worker thread).

    PostgreSQL (:class:`~broker.postgres_board.PostgresPositiveBoard`) with
    ``settings.postgres_url``, else the SQLite file ``settings.db_path``; either with the
    settings' expiry window and code policy (``max_expiry_ahead_s``, ``code_grace_s``,
    ``max_uploads_per_code``).

    Raises:
        BoardError: the board cannot be opened (for PostgreSQL, one line naming
            ``postgres_url``).
    """
    max_expiry_ahead = timedelta(seconds=settings.max_expiry_ahead_s)
    policy = CodePolicy(grace=timedelta(seconds=settings.code_grace_s),
                        max_uploads=settings.max_uploads_per_code)
    if settings.postgres_url is not None:
        from .postgres_board import PostgresPositiveBoard

        return PostgresPositiveBoard(settings.postgres_url, max_expiry_ahead=max_expiry_ahead,
                                     code_policy=policy)
    if settings.db_path is None:        # BrokerSettings refuses neither; a type guard
        raise BoardError("db_path: expected the positive board's SQLite file (or a "
                         "postgres_url)")
    return SqlitePositiveBoard(settings.db_path, max_expiry_ahead=max_expiry_ahead,
                               code_policy=policy)
