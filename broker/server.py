"""The broker's WebSocket server: a thin asyncio adapter (paper sections 3 and 4).

Each connection's rules -- its kind, every refusal, limit and deadline -- are decided by the
sans-I/O :class:`~broker.protocol.BrokerConnection`; this module reads frames, feeds them to
it with the broker's monotonic clock, and executes the actions it returns: queue a frame,
close, call the stores of :mod:`broker.backends` (feeding their answers back). The connection
state machine is in docs/protocol.md ("The broker connection").

One endpoint; the first accepted message of a connection decides its kind:

* ``hello`` -> a **session** connection (answered with ``welcome``), then ``position``,
  ``position_lost`` and ``signal``; the broker sends ``match`` and relayed ``signal``.
* ``positive_upload`` or ``positives_poll`` -> an **anonymous** connection, which never
  carries a session ID: ``hello`` is refused on it, and uploads and polls are refused on a
  session connection, so a positive upload can never be linked to a session.

Every refusal is an ``error`` message ``{code, message, field}``; the connection stays open
(an oversized frame is the exception: websockets closes it with 1009; and a connection over the
per-address cap or the global cap ``max_connections`` gets ``too_many_connections`` and is
closed with 1008). Refusal codes:
``bad_message``, ``unknown_type``, ``unknown_field`` (decoding, see
:func:`~fanny_tui.protocol.messages.decode_client_message`), ``too_many_tokens``,
``hello_required``, ``already_hello``, ``unsupported_protocol``, ``wrong_connection``,
``rate_limited``, ``not_matched``, ``peer_unavailable``, ``code_required``, ``code_invalid``,
``code_expired``, ``code_used``, ``expiry_out_of_window``, ``duplicate_token``,
``upload_conflict``, ``too_many_connections``, ``unavailable`` (a store -- the board, Redis --
could not be reached: retry later)
and ``internal_error``.

Positive uploads (paper section 4, step 2; section 5): a real upload needs a declaration code
(:mod:`broker.positives`) unless the broker runs with ``open_declarations``; a code that is sent
is checked and consumed even then. A ``decoy`` upload is validated like a real one, answered
like one (the ack counts its distinct tokens) and discarded: nothing stored, no code looked at.
Every answer to a ``positive_upload`` (ack or error, real or decoy) leaves no earlier than
``upload_answer_delay_s`` after the upload was received, and is padded to
:data:`~fanny_tui.protocol.messages.ACK_SIZE_BYTES`, so neither timing nor size tells a network
observer how many tokens an upload held, whether it was a decoy, or whether it was refused.

Limits: ``max_message_bytes`` (default 65536: a padded upload fits exactly), 500 tokens per
upload (``too_many_tokens``), ``position_rate_per_s`` / ``position_burst`` per connection (a
token bucket; an excess position is ignored and answered ``rate_limited``),
``max_connections_per_address``, ``max_connections`` (all addresses together) and
``first_message_timeout_s``.

Each connection has one ordered outgoing queue. Answers to its own requests wait while the
queue is half full (a client that sends faster than it reads only slows itself); messages
caused by other clients (``match``, relayed ``signal``) never wait, and a client whose queue
is full is closed (1008) instead of slowing down the others. A client that stops reading
altogether is dropped once one message has waited ``send_timeout_s`` to be written: the
library's write buffer stays under its 32 KiB high-water mark, and the queue under
``outbox_size`` messages, so the memory a connection can hold is bounded.

Storage (:mod:`broker.backends`): sessions, positions and routes in
:class:`~broker.backends.LivePositions` (memory only), delivery of ``match``, ``signal`` and
``positives_available`` through a :class:`~broker.backends.Router`, positives in a
:class:`~broker.positives.PositiveBoard`; :func:`~broker.backends.open_backends` picks them.

Privacy: session IDs and positions live in the live-positions store (never persisted);
client addresses only as keys of the per-address connection counts (memory only).
Logs carry counts only: never a session ID, a position, a token, a declaration code or a client
address (the websockets library logger is limited to WARNING and above, because its DEBUG
output contains frames and headers). ``GET /healthz`` answers 200
``{"status": "ok", "declarations": "code" | "open", ...counts}``, or 503 ``"unavailable"``
naming the stores that do not answer (:meth:`_Broker.process_request`).

TLS: with ``certfile`` and ``keyfile`` the broker serves ``wss://`` (and ``https://`` for
``/healthz``) itself, TLS 1.2 or later.

Use :func:`start_broker` (an async context manager); ``python -m broker serve`` runs it until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from fanny_tui.protocol import validate
from fanny_tui.protocol.batch import encode_end_frame
from fanny_tui.protocol.contact import DEFAULT_MAX_SPEED_MPS
from fanny_tui.protocol.errors import FannyError
from fanny_tui.protocol.messages import PositivesAvailable, encode

from . import Refusal
from .backends import Backends, MemoryPositions, open_backends, store_unavailable
from .positives import (
    DEFAULT_CODE_GRACE,
    DEFAULT_MAX_EXPIRY_AHEAD,
    DEFAULT_MAX_UPLOADS_PER_CODE,
    BatchPages,
    BoardError,
    PositiveBoard,
    check_upload,
)
from .protocol import (
    INTERNAL_ERROR,
    Action,
    Admission,
    Announce,
    Attach,
    BrokerConnection,
    CheckDecoy,
    Close,
    Connect,
    ConnectionKind,
    ConnectionLimits,
    Disconnect,
    DropPosition,
    Post,
    ReadBoard,
    Record,
    RelaySignal,
    Send,
    StoreUpload,
    StreamBoard,
    UpdatePosition,
)
from .state import BrokerState

logger = logging.getLogger("broker.server")

Recorder = Callable[[str, str], None]
"""``recorder(kind, raw)``: called with every frame received; kind is ``"session"``,
``"anonymous"`` or ``"unknown"`` (the connection's kind is not decided yet)."""

_CLOSE_TOO_SLOW = 1008
_WARN_EVERY_S = 60.0
HEALTH_TIMEOUT_S = 2.0
"""How long ``/healthz`` waits for each store to answer before calling it failing."""
WRITE_LIMIT_BYTES = 32 * 1024
"""The library's write buffer high-water mark per connection: a send beyond it waits (at most
``send_timeout_s``) for the client to read."""


class SetupError(FannyError):
    """The broker cannot start with these settings (for example unreadable TLS files)."""


# --- settings ------------------------------------------------------------------------------


def _check_number(name: str, value: object, *, low: float = 0.0, high: float = math.inf,
                  low_open: bool = True) -> None:
    validate.number(f"BrokerSettings.{name}", value, low=low,
                    high=None if high == math.inf else high, low_open=low_open)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    validate.integer(f"BrokerSettings.{name}", value, low, high)


MAX_SPEED_LIMIT_MPS = 1_000_000.0
"""The largest ``max_speed_mps`` a broker takes, metres per second. A device takes at most
1000; a broker more only for load tests, where one connection's updates stand for many
devices' and follow each other within microseconds (benchmarks/region.py)."""


@dataclass(frozen=True)
class BrokerSettings:
    """Everything the broker needs to run. Validated when built.

    Attributes:
        host: address to bind (``127.0.0.1``; ``::1`` or ``0.0.0.0`` behind a reverse proxy).
        port: TCP port; 0 picks a free one (see :attr:`RunningBroker.port`).
        db_path: the SQLite file of the positive-token board; may be None with
            ``postgres_url`` (then unused). One of the two is required.
        radius_max_m: the largest matching radius, metres (also the grid cell size).
        cooldown_s: seconds before the same pair of sessions can match again.
        position_timeout_s: seconds after which a position without update is dropped.
        route_ttl_s: seconds after a match during which the pair may signal (None: cooldown_s).
        max_speed_mps: the implausible-jump bound, metres per second (> 0, at most
            :data:`MAX_SPEED_LIMIT_MPS`; default the devices' 30): a session's position update
            implying a higher speed since its last accepted one is not stored and matches
            nothing, unless it is the third of a run of updates each plausible after the one
            before (docs/protocol.md, "Contact measures").
        poll_limit: the most tokens in one ``positives`` answer.
        max_message_bytes: the largest frame accepted; larger ones close the connection (1009).
            The default, 65536, is exactly the size of a padded upload: a smaller value
            shuts out every padded upload.
        max_expiry_ahead_s: how far ahead an uploaded expiry may be, seconds (default 16 days:
            the 15-day lifetime plus the rounding to the deletion hour).
        housekeeping_interval_s: seconds between two expiries of stale positions.
        purge_interval_s: seconds between two purges of expired positive tokens.
        first_message_timeout_s: a connection that sends no valid first message in this many
            seconds is closed.
        ping_interval_s / ping_timeout_s: WebSocket keepalive, seconds (None disables).
        outbox_size: messages queued for one client before it counts as too slow and is closed.
        open_declarations: accept positive uploads without a declaration code (field tests);
            a code that is sent is still checked and consumed. Logged at WARNING at start and
            reported by ``/healthz``.
        upload_answer_delay_s: the least time, seconds, between receiving a
            ``positive_upload`` and sending its answer (ack or error, real or decoy), >= 0.
        code_grace_s: seconds after its first committed upload during which a code still
            authorizes the other uploads of the same declaration, those with the same
            ``declaration`` secret (>= 0).
        max_uploads_per_code: the most uploads one code authorizes (>= 1).
        position_rate_per_s: positions per second one connection may send on average (a
            token bucket refilled at this rate); an excess position is ignored, ``rate_limited``.
        position_burst: the bucket's size: positions accepted in a burst.
        poll_rate_per_s / poll_burst: the same token bucket for ``positives_poll`` on one
            connection (an excess poll is answered ``rate_limited``). One binary poll streams
            the whole board, so a device needs one poll per cycle.
        signal_rate_per_s / signal_burst: the same for ``signal`` on one session connection
            (an excess signal is not relayed, ``rate_limited``).
        batch_frame_tokens: board cursors (so at most tokens) per binary token frame.
        batch_cache_bytes: most bytes of encoded binary frames kept and shared (0: none).
        announce_positives: send ``positives_available`` to every session connection after
            new positives are committed (False: devices learn of them at their next poll).
        announce_interval_s: the least time between two ``positives_available``
            announcements; uploads committed meanwhile share the next one (0: announce each
            commit at once).
        max_connections_per_address: open connections allowed from one source address;
            0 disables the cap (behind a reverse proxy every client has the proxy's address).
        max_connections: open connections allowed in all (every address together); 0
            disables the cap. A connection over it is refused ``too_many_connections``.
        send_timeout_s: the longest one message may wait to be written to a client (its TCP
            window and the library's write buffer full); then the connection is dropped.
        certfile / keyfile: PEM certificate chain and private key: serve ``wss://`` (TLS >= 1.2).
            Both or neither.
        redis_url: ``redis://``, ``rediss://`` or ``unix://`` URL of the Redis server shared by
            a region's brokers (live positions and routing, nothing persisted); ``None``: in
            this process's memory (see :mod:`broker.backends`).
        postgres_url: ``postgresql://`` URL of the PostgreSQL database of the positive board
            shared by a region's brokers; ``None``: the SQLite file ``db_path``.

    Raises:
        ValueError: a value is out of range; the message names the attribute.
    """

    host: str
    port: int
    db_path: str | Path | None = None
    radius_max_m: float = 100.0
    cooldown_s: float = 300.0
    position_timeout_s: float = 60.0
    route_ttl_s: float | None = None
    max_speed_mps: float = DEFAULT_MAX_SPEED_MPS
    poll_limit: int = 1000
    max_message_bytes: int = 64 * 1024
    max_expiry_ahead_s: float = DEFAULT_MAX_EXPIRY_AHEAD.total_seconds()
    housekeeping_interval_s: float = 5.0
    purge_interval_s: float = 60.0
    first_message_timeout_s: float = 30.0
    ping_interval_s: float | None = 20.0
    ping_timeout_s: float | None = 20.0
    outbox_size: int = 64
    open_declarations: bool = False
    upload_answer_delay_s: float = 1.0
    code_grace_s: float = DEFAULT_CODE_GRACE.total_seconds()
    max_uploads_per_code: int = DEFAULT_MAX_UPLOADS_PER_CODE
    position_rate_per_s: float = 10.0
    position_burst: int = 20
    poll_rate_per_s: float = 0.2
    poll_burst: int = 5
    signal_rate_per_s: float = 10.0
    signal_burst: int = 60
    batch_frame_tokens: int = 8192
    batch_cache_bytes: int = 64 * 1024 * 1024
    announce_positives: bool = True
    announce_interval_s: float = 20.0
    max_connections_per_address: int = 128
    max_connections: int = 20_000
    send_timeout_s: float = 10.0
    certfile: str | Path | None = None
    keyfile: str | Path | None = None
    redis_url: str | None = None
    postgres_url: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"BrokerSettings.host: expected a host name or address, "
                             f"got {self.host!r}")
        _check_int("port", self.port, 0, 65535)
        if self.db_path is None:
            if self.postgres_url is None:
                raise ValueError("BrokerSettings.db_path: expected the positive board's SQLite "
                                 "file (or a postgres_url), got None")
        elif not isinstance(self.db_path, str | Path) or not str(self.db_path):
            raise ValueError(f"BrokerSettings.db_path: expected a file path, got {self.db_path!r}")
        _check_number("radius_max_m", self.radius_max_m, high=10_000.0)
        _check_number("cooldown_s", self.cooldown_s)
        _check_number("position_timeout_s", self.position_timeout_s)
        if self.route_ttl_s is not None:
            _check_number("route_ttl_s", self.route_ttl_s)
        _check_number("max_speed_mps", self.max_speed_mps, high=MAX_SPEED_LIMIT_MPS)
        _check_int("poll_limit", self.poll_limit, 1, 100_000)
        _check_int("max_message_bytes", self.max_message_bytes, 1024, 16 * 1024 * 1024)
        _check_number("max_expiry_ahead_s", self.max_expiry_ahead_s)
        _check_number("housekeeping_interval_s", self.housekeeping_interval_s)
        _check_number("purge_interval_s", self.purge_interval_s)
        _check_number("first_message_timeout_s", self.first_message_timeout_s)
        if self.ping_interval_s is not None:
            _check_number("ping_interval_s", self.ping_interval_s)
        if self.ping_timeout_s is not None:
            _check_number("ping_timeout_s", self.ping_timeout_s)
        _check_int("outbox_size", self.outbox_size, 1, 1_000_000)
        validate.boolean("BrokerSettings.open_declarations", self.open_declarations)
        _check_number("upload_answer_delay_s", self.upload_answer_delay_s, high=60.0,
                      low_open=False)
        _check_number("code_grace_s", self.code_grace_s, high=86_400.0, low_open=False)
        _check_int("max_uploads_per_code", self.max_uploads_per_code, 1, 10_000)
        _check_number("position_rate_per_s", self.position_rate_per_s, high=10_000.0)
        _check_int("position_burst", self.position_burst, 1, 100_000)
        _check_number("poll_rate_per_s", self.poll_rate_per_s, high=10_000.0)
        _check_int("poll_burst", self.poll_burst, 1, 100_000)
        _check_number("signal_rate_per_s", self.signal_rate_per_s, high=10_000.0)
        _check_int("signal_burst", self.signal_burst, 1, 100_000)
        _check_int("batch_frame_tokens", self.batch_frame_tokens, 1, 100_000)
        _check_int("batch_cache_bytes", self.batch_cache_bytes, 0, 2**40)
        validate.boolean("BrokerSettings.announce_positives", self.announce_positives)
        _check_number("announce_interval_s", self.announce_interval_s, high=86_400.0,
                      low_open=False)
        _check_int("max_connections_per_address", self.max_connections_per_address, 0, 1_000_000)
        _check_int("max_connections", self.max_connections, 0, 10_000_000)
        _check_number("send_timeout_s", self.send_timeout_s, high=3600.0)
        for name in ("certfile", "keyfile"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str | Path) or not str(value)):
                raise ValueError(f"BrokerSettings.{name}: expected a PEM file path, got {value!r}")
        if self.redis_url is not None:
            validate.redis_url("BrokerSettings.redis_url", self.redis_url)
        if self.postgres_url is not None:
            validate.url("BrokerSettings.postgres_url", self.postgres_url,
                         ("postgresql", "postgres"))
        if (self.certfile is None) != (self.keyfile is None):
            missing = "keyfile" if self.keyfile is None else "certfile"
            raise ValueError(f"BrokerSettings.{missing}: TLS needs both a certfile and a keyfile")

    @property
    def tls(self) -> bool:
        """True when the broker serves ``wss://`` itself."""
        return self.certfile is not None


def server_ssl_context(settings: BrokerSettings) -> ssl.SSLContext | None:
    """The TLS context of the server (TLS 1.2 or later), or ``None`` without TLS.

    Args:
        settings: uses ``certfile`` and ``keyfile`` (PEM).

    Returns:
        A server-side :class:`ssl.SSLContext` with the certificate chain loaded, or ``None``.

    Raises:
        SetupError: a file is missing or unreadable, or the key does not match the
            certificate (the message names ``certfile``/``keyfile``, not their content).
    """
    if settings.certfile is None or settings.keyfile is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(settings.certfile), str(settings.keyfile))
    except ssl.SSLError as exc:                  # a subclass of OSError: first
        raise SetupError(f"cannot load the TLS certificate {settings.certfile} with the key "
                         f"{settings.keyfile}: {exc.reason or exc}") from None
    except OSError as exc:
        which = exc.filename or f"{settings.certfile} / {settings.keyfile}"
        raise SetupError(f"cannot read the TLS certificate or key {which}: "
                         f"{exc.strerror or exc}") from None
    return context


# --- logging -------------------------------------------------------------------------------


class _LibraryLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The websockets library's logger, limited to WARNING and above.

    Its DEBUG lines contain every frame (session IDs, positions, tokens) and every request
    header; its INFO lines are one per connection. The broker logs its own counts instead.
    """

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (logging API name)
        return level >= logging.WARNING and self.logger.isEnabledFor(level)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs


def _log_internal_error(what: str, exc: BaseException) -> None:
    """Log an unexpected exception without its message (it could quote client data)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    logger.error("internal error %s: %s (message withheld)\n%s", what, type(exc).__name__, frames)


# --- per-connection plumbing ---------------------------------------------------------------


class _Client:
    """One WebSocket connection: its sans-I/O core (:class:`~broker.protocol.BrokerConnection`)
    and its outgoing queue.

    Every message to the client goes through one queue drained by one writer task, so the
    client receives them in the order the broker decided them. Answers to the client's own
    requests (:meth:`reply`) wait while the queue is half full: a client that sends faster
    than it reads only slows itself down. Messages from other clients' activity
    (:meth:`post`: matches, relayed signals) never wait: if the queue is full, this client does
    not read and is closed, so it cannot stall the sender.

    Memory (issue 7, point 5): an idle connection holds no queue, no event and no task; the
    queue, the writer task and the "space" event are created when first needed, and the writer
    ends whenever the queue is empty.
    """

    __slots__ = ("ws", "core", "address", "closing", "_tasks", "_limit", "_send_timeout_s",
                 "_soft_limit", "_queue", "_space", "_dead", "_writer")

    def __init__(self, ws: ServerConnection, core: BrokerConnection, outbox_size: int,
                 tasks: set[asyncio.Task[Any]], send_timeout_s: float):
        self.ws = ws
        self.core = core
        self.address: str | None = None      # set while admitted (memory only, never logged)
        self.closing = False
        self._tasks = tasks
        self._limit = outbox_size
        self._send_timeout_s = send_timeout_s
        self._soft_limit = max(1, outbox_size // 2)
        self._queue: deque[str | bytes] | None = None  # created with the first message
        self._space: asyncio.Event | None = None       # created when a reply first waits
        self._dead = False
        self._writer: asyncio.Task[None] | None = None  # runs while the queue is not empty

    def _pending(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    def _enqueue(self, text: str | bytes) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(text)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                text = queue.popleft()
                if self._space is not None:
                    self._space.set()
                await asyncio.wait_for(self.ws.send(text), self._send_timeout_s)
        except ConnectionClosed:
            self._dead = True
        except TimeoutError:
            # It does not read: its buffers would only grow. No close frame (it would wait
            # behind the rest): drop the TCP connection.
            logger.warning("dropping a client that does not read its messages (send timeout)")
            self._dead = True
            self.closing = True
            self.ws.transport.abort()
        except asyncio.CancelledError:
            self._dead = True
            raise
        finally:
            self._writer = None
            if self._space is not None:
                self._space.set()

    async def reply(self, frame: str | bytes, window: int | None = None) -> None:
        """Queue an answer to this client's own request; waits while the queue is half full.

        ``frame``: JSON text or the bytes of a binary frame. ``window``: wait until fewer
        than this many messages are queued (default: half the queue), e.g. 2 to stream large
        frames one by one.
        """
        limit = self._soft_limit if window is None else window
        while self._pending() >= limit and not self._dead:
            if self._space is None:
                self._space = asyncio.Event()
            self._space.clear()
            await self._space.wait()
        if not self._dead:
            self._enqueue(frame)

    def post(self, message: str) -> None:
        """Queue a text frame caused by another client, without waiting; a full queue closes
        this client (:class:`~broker.backends.Recipient`)."""
        if self.closing or self._dead:
            return
        if self._pending() >= self._limit:
            logger.warning("closing a client that does not read its messages (queue full)")
            self.closing = True
            self._spawn(self._close_slow())
            return
        self._enqueue(message)

    def replace(self) -> None:
        """A newer connection of the same session exists: close this one (4000)
        (:class:`~broker.backends.Recipient`). Only a session connection is attached to a
        session; on any other (already closed) it does nothing."""
        if self.core.kind is not ConnectionKind.SESSION:
            return
        self.core.replaced()
        for action in self.core.actions():   # only Close: the core decides nothing else here
            if isinstance(action, Close):
                self._spawn(self.ws.close(action.code, action.reason))

    async def _close_slow(self) -> None:
        # Its close frame would wait behind everything the client does not read: give the
        # closing handshake a moment, then drop the TCP connection.
        try:
            await asyncio.wait_for(self.ws.close(_CLOSE_TOO_SLOW, "too slow: queue full"), 1.0)
        except TimeoutError:
            self.ws.transport.abort()

    async def close_when_sent(self, code: int, reason: str, timeout: float = 2.0) -> None:
        """Close the connection once the queued messages went out (or ``timeout`` passed)."""
        if self._writer is not None:
            await asyncio.wait({self._writer}, timeout=timeout)
        await self.ws.close(code, reason)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self) -> None:
        """Stop the writer, if one runs (the connection is over)."""
        writer = self._writer
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await writer


# --- the broker ----------------------------------------------------------------------------


class _Broker:
    """The asyncio adapter: feeds each connection's :class:`~broker.protocol.BrokerConnection`
    and executes its actions against the client and the backends."""

    def __init__(
        self,
        settings: BrokerSettings,
        backends: Backends,
        recorder: Recorder | None,
        wall_clock: Callable[[], datetime],
        monotonic: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.limits = ConnectionLimits.from_settings(settings)
        self.backends = backends
        self.positions = backends.positions
        self.router = backends.router
        self.board = board = backends.board
        self.recorder = recorder
        self.wall_clock = wall_clock
        self.monotonic = monotonic
        self.connections = 0
        self.admission = Admission(settings.max_connections,
                                   settings.max_connections_per_address)
        self.refused_connections = 0              # since the last warning about them
        self.last_refusal_warning = -math.inf
        # per kind of shared-store failure: (when last logged, how many left out since)
        self.store_failures: dict[str, tuple[float, int]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.pages = BatchPages(board, settings.batch_frame_tokens, settings.batch_cache_bytes)
        self.announce_task: asyncio.Task[None] | None = None
        self.announced_at = -math.inf
        self.max_expiry_ahead = timedelta(seconds=settings.max_expiry_ahead_s)
        self._do: dict[type, Callable[[_Client, Any], Awaitable[None]]] = {
            Send: self._send, Post: self._post, Close: self._close, Record: self._record,
            Connect: self._connect, Attach: self._attach, Disconnect: self._disconnect,
            UpdatePosition: self._update_position, DropPosition: self._drop_position,
            RelaySignal: self._relay_signal, StoreUpload: self._store_upload,
            CheckDecoy: self._check_decoy, ReadBoard: self._read_board,
            StreamBoard: self._stream_board, Announce: self._announce_action,
        }

    @property
    def state(self) -> BrokerState | None:
        """The embedded positions' pure state (the broker benchmark fills it directly);
        ``None`` on a shared store."""
        positions = self.positions
        return positions.state if isinstance(positions, MemoryPositions) else None

    def counts(self) -> dict[str, int]:
        return {"connections": self.connections, **self.positions.counts()}

    @property
    def declarations(self) -> str:
        return "open" if self.settings.open_declarations else "code"

    # --- HTTP ----------------------------------------------------------------------------

    async def process_request(self, connection: ServerConnection,
                              request: Request) -> Response | None:
        """Answer ``GET /healthz`` (any other path goes on to the WebSocket handshake).

        200 ``{"status": "ok", "declarations": ..., counts}`` when the live-positions store
        and the positive board both answer within :data:`HEALTH_TIMEOUT_S`; else 503 with
        ``"status": "unavailable"`` and ``"failing": ["positions" | "board", ...]``, so that a
        load balancer stops sending devices to a broker cut off from Redis or PostgreSQL.
        """
        if urlsplit(request.path).path != "/healthz":
            return None
        failing = []
        try:
            await asyncio.wait_for(self.positions.ping(), HEALTH_TIMEOUT_S)
        except Exception:
            failing.append("positions")
        try:
            await asyncio.wait_for(asyncio.to_thread(self.board.last_cursor), HEALTH_TIMEOUT_S)
        except Exception:
            failing.append("board")
        answer: dict[str, Any] = {"status": "unavailable" if failing else "ok",
                                  "declarations": self.declarations, **self.counts()}
        if failing:
            answer["failing"] = failing
        response = connection.respond(
            HTTPStatus.SERVICE_UNAVAILABLE if failing else HTTPStatus.OK,
            json.dumps(answer) + "\n")
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    # --- connections ---------------------------------------------------------------------

    def _warn_refused_connection(self) -> None:
        # A count, never the address; at most one line a minute under a flood.
        self.refused_connections += 1
        now = time.monotonic()
        if now - self.last_refusal_warning >= _WARN_EVERY_S:
            logger.warning("refused %d connection(s) over the per-address cap of %d "
                           "or the global cap of %d",
                           self.refused_connections, self.settings.max_connections_per_address,
                           self.settings.max_connections)
            self.refused_connections = 0
            self.last_refusal_warning = now

    def _log_store_unavailable(self, what: str, exc: BaseException) -> None:
        """Log that a shared store cannot be reached (:func:`~broker.backends.store_unavailable`:
        Redis or PostgreSQL down): one line, without traceback or message (no data), at most
        one a minute for each ``what`` (every position of every device fails while it lasts:
        a line each would flood the log); the next line counts the ones left out."""
        now = time.monotonic()
        last, left_out = self.store_failures.get(what, (-math.inf, 0))
        if now - last < _WARN_EVERY_S:
            self.store_failures[what] = (last, left_out + 1)
            return
        self.store_failures[what] = (now, 0)
        more = f" ({left_out} more since the last line)" if left_out else ""
        logger.error("store unavailable %s: %s%s", what, type(exc).__name__, more)

    def _store_failure(self, what: str, exc: Exception) -> bool:
        """Log ``exc``, raised by a store or an action ``what`` (``"in housekeeping"``), and
        say whether a store failed.

        Returns:
            True when a store cannot be reached -- a :class:`~broker.positives.BoardError`
            (one line with its message, which holds no client data) or an error
            :func:`~broker.backends.store_unavailable` recognizes (:meth:`_log_store_unavailable`:
            no message, at most a line a minute): the caller answers ``unavailable``. False for
            anything else, logged as an internal error (traceback, no message): a bug.
        """
        if isinstance(exc, BoardError):
            logger.error("positive board failure %s: %s", what, exc)
        elif store_unavailable(exc):
            self._log_store_unavailable(what, exc)
        else:
            _log_internal_error(what, exc)
            return False
        return True

    async def handle(self, ws: ServerConnection) -> None:
        core = BrokerConnection(self.limits, self.monotonic(), record=self.recorder is not None)
        client = _Client(ws, core, self.settings.outbox_size, self.tasks,
                         self.settings.send_timeout_s)
        self.connections += 1
        logger.info("connection opened (%d open)", self.connections)
        try:
            remote = ws.remote_address
            address = str(remote[0]) if remote else "?"
            refusal = self.admission.admit(address)
            if refusal is None:
                client.address = address
                await self._serve(client)
            else:
                self._warn_refused_connection()
                core.refuse_connection(refusal)
                await self._run(client, core.actions())
        except ConnectionClosed:
            pass
        except Exception as exc:  # one bad client never harms the others
            _log_internal_error("in a connection", exc)
        finally:
            if client.address is not None:
                self.admission.release(client.address)
                client.address = None
            core.connection_lost()
            try:   # a shared store may fail: the connection is released all the same
                await self._run(client, core.actions())
            except Exception as exc:   # a store's entries expire in the store on their own
                self._store_failure("while ending a connection", exc)
            await client.finish()
            self.connections -= 1
            logger.info("connection closed (%d open)", self.connections)

    async def _serve(self, client: _Client) -> None:
        """Read frames until the connection closes; the core decides, :meth:`_run` acts."""
        core, ws, monotonic = client.core, client.ws, self.monotonic
        while (kind := core.kind) is not ConnectionKind.CLOSED:
            if kind is ConnectionKind.NEW:   # the first-message deadline runs
                deadline = core.deadline
                assert deadline is not None
                try:
                    raw = await asyncio.wait_for(ws.recv(), max(0.0, deadline - monotonic()))
                except TimeoutError:
                    core.tick(monotonic())
                    await self._run(client, core.actions())
                    continue
            else:
                raw = await ws.recv()
            try:
                core.receive_frame(raw, monotonic())
                await self._run(client, core.actions())
            except ConnectionClosed:
                raise
            except Exception as exc:   # a Post, Attach, DropPosition... on a store gone
                if self._store_failure("while handling a message", exc):
                    core.store_unavailable()
                    await self._run(client, core.actions())
                else:
                    await client.reply(INTERNAL_ERROR)

    async def _run(self, client: _Client, actions: list[Action]) -> None:
        """Execute ``actions`` (drained from the core) in order, feeding the stores' answers
        back to the core (a store call is always the last action of its batch: the actions of
        its answer follow)."""
        core = client.core
        do = self._do
        while actions:
            for action in actions:
                try:
                    await do[type(action)](client, action)
                except ConnectionClosed:
                    raise
                except Exception as exc:
                    if core.awaiting is None:
                        raise
                    if isinstance(exc, Refusal):
                        logger.debug("refused by a store: %s", exc.code)
                        core.refused(exc)
                    elif self._store_failure(f"in a store call ({core.awaiting.value})", exc):
                        core.unavailable()
                    else:
                        core.failed()
            actions = core.actions()

    # --- actions -------------------------------------------------------------------------

    async def _send(self, client: _Client, action: Send) -> None:
        if action.not_before is not None:
            wait = action.not_before - self.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        if action.error is not None:
            # Only the code: a field name comes from the client and could be anything.
            logger.debug("refused a message: %s", action.error)
        await client.reply(action.frame)

    async def _post(self, _client: _Client, action: Post) -> None:
        await self.router.post(action.session_id, action.frame)

    async def _close(self, client: _Client, action: Close) -> None:
        logger.info("closing a connection (%s)", action.reason)
        if action.flush:
            await client.close_when_sent(action.code, action.reason)
        else:
            client._spawn(client.ws.close(action.code, action.reason))

    async def _record(self, _client: _Client, action: Record) -> None:
        if self.recorder is None:
            return
        frame = action.frame
        text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
        try:
            self.recorder(action.kind, text)
        except Exception as exc:
            _log_internal_error("in the recorder", exc)

    async def _connect(self, client: _Client, action: Connect) -> None:
        connected = await self.positions.connect(action.session_id, action.radius_m, action.now)
        if connected.replaced:
            logger.info("session reconnected (old connection replaced)")
        client.core.connected(connected.epoch, connected.radius_m)

    async def _attach(self, client: _Client, action: Attach) -> None:
        await self.router.attach(action.session_id, client)
        logger.info("session started (%d sessions)", self.positions.counts()["sessions"])

    async def _disconnect(self, client: _Client, action: Disconnect) -> None:
        await self.router.detach(action.session_id, client)
        if await self.positions.disconnect(action.session_id, action.epoch):
            logger.info("session ended (%d sessions)", self.positions.counts()["sessions"])

    async def _update_position(self, client: _Client, action: UpdatePosition) -> None:
        notices = await self.positions.update_position(
            action.session_id, action.latitude, action.longitude, action.accuracy_m, action.now)
        if notices:
            logger.info("match (%d sessions with a position)",
                        self.positions.counts()["positions"])
        client.core.matched(notices)

    async def _drop_position(self, _client: _Client, action: DropPosition) -> None:
        await self.positions.drop_position(action.session_id)

    async def _relay_signal(self, client: _Client, action: RelaySignal) -> None:
        await self.positions.check_route(action.source, action.destination, action.now)
        if await self.router.post(action.destination, action.frame):
            logger.debug("signal relayed")
            client.core.relayed()
        else:
            client.core.peer_gone()

    async def _store_upload(self, client: _Client, action: StoreUpload) -> None:
        upload = action.upload
        count = await asyncio.to_thread(
            self.board.add, upload.upload_id, upload.tokens, self.wall_clock(),
            code_hash=action.code_hash, code_required=action.code_required,
            declaration_hash=action.declaration_hash)
        # Answered only now: the tokens are committed (paper section 4, step 2: the device
        # deletes its tokens when it receives the ack).
        logger.info("positive upload committed (%d tokens)", count)
        client.core.upload_done(count)

    async def _check_decoy(self, client: _Client, action: CheckDecoy) -> None:
        count = len(check_upload(action.tokens, self.wall_clock(), self.max_expiry_ahead))
        logger.info("decoy upload discarded")
        client.core.upload_done(count)

    async def _read_board(self, client: _Client, action: ReadBoard) -> None:
        tokens, cursor, more = await asyncio.to_thread(
            self.board.since, action.cursor, action.limit, self.wall_clock())
        logger.info("positives poll answered (%d tokens)", len(tokens))
        client.core.board_read(tokens, cursor, more)

    async def _stream_board(self, client: _Client, action: StreamBoard) -> None:
        """Every unexpired token after the cursor up to the board's last cursor when the poll
        came, in ``batch1`` frames from :class:`~broker.positives.BatchPages` (encoded once,
        shared), queued one at a time (``window=2``): a whole board in bounded memory."""
        now = self.wall_clock()
        cursor = action.cursor
        high = await asyncio.to_thread(self.board.last_cursor)
        if cursor > high:   # the board was reset: start over, never miss tokens
            cursor = 0
        sent = 0
        for lo, hi in self.pages.spans(cursor, high):
            frame = await asyncio.to_thread(self.pages.frame, lo, hi, now)
            if frame is not None:
                await client.reply(frame, window=2)
                sent += 1
        await client.reply(encode_end_frame(high), window=2)
        logger.info("positives poll answered (%d binary frames)", sent)
        client.core.board_streamed()

    async def _announce_action(self, _client: _Client, _action: Announce) -> None:
        self.announce()

    # --- announcements -------------------------------------------------------------------

    def announce(self) -> None:
        """Announce new positives to every session connection, at most once per
        ``announce_interval_s`` (commits in between share the next announcement)."""
        if self.announce_task is not None and not self.announce_task.done():
            return
        self.announce_task = asyncio.create_task(self._announce())
        self.tasks.add(self.announce_task)
        self.announce_task.add_done_callback(self.tasks.discard)

    async def _announce(self) -> None:
        wait = self.announced_at + self.settings.announce_interval_s - self.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self.announced_at = self.monotonic()
        try:
            cursor = await asyncio.to_thread(self.board.last_cursor)
            sent = await self.router.broadcast(encode(PositivesAvailable(cursor=cursor)))
        except Exception as exc:   # devices learn of the positives at their next poll
            self._store_failure("on announcement", exc)
            return
        logger.info("positives announced to %d sessions", sent)

    # --- housekeeping --------------------------------------------------------------------

    async def housekeeping(self) -> None:
        """Expire stale positions every interval; purge expired positives now and then."""
        next_purge = -math.inf
        while True:
            try:
                now = self.monotonic()
                dropped = await self.positions.expire(now)
                if dropped:
                    logger.info("dropped %d stale positions", dropped)
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self.settings.purge_interval_s
                    purged = await asyncio.to_thread(self.board.purge_expired, self.wall_clock())
                    if purged:
                        self.pages.invalidate()
                        logger.info("purged %d expired positive tokens", purged)
            except Exception as exc:
                self._store_failure("in housekeeping", exc)
            await asyncio.sleep(self.settings.housekeeping_interval_s)


# --- running -------------------------------------------------------------------------------


class RunningBroker:
    """A started broker (from :func:`start_broker`).

    Attributes:
        settings: the settings it runs with.
        host: the bound host as given in the settings.
        port: the bound TCP port (the real one when the settings said 0).
        url: ``ws://HOST:PORT`` to connect to (``wss://`` with TLS).
        backends: the stores in use (:class:`~broker.backends.Backends`: live positions,
            router, board).
        board: the positive-token board in use (for inspection; the server owns its calls).
        pages: the shared encoded binary frames of the board (for inspection).
    """

    def __init__(self, broker: _Broker, server: Server, port: int) -> None:
        self._broker = broker
        self._server = server
        self.settings = broker.settings
        self.host = broker.settings.host
        self.port = port
        self.backends = broker.backends
        self.board = broker.board
        self.pages = broker.pages
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{'wss' if self.settings.tls else 'ws'}://{host}:{port}"

    def counts(self) -> dict[str, int]:
        """Open connections, connected sessions, sessions with a position (no IDs)."""
        return self._broker.counts()


def bare_upgrade(connection: ServerConnection, request: Request, response: Response) -> None:
    """Send a ``101 Switching Protocols`` with only the fields RFC 6455 section 4.2.2 needs.

    Drops ``Date`` (optional in a 1xx answer, RFC 9110 section 6.6.1) and ``Server`` from
    the opening handshake's answer: every anonymous poll opens a fresh connection and pays
    its handshake (59 of its bytes; docs/performance.md). Other answers (``/healthz``,
    refusals) keep both.
    """
    if response.status_code == 101:
        del response.headers["Date"]
        del response.headers["Server"]


@asynccontextmanager
async def start_broker(
    settings: BrokerSettings,
    *,
    recorder: Recorder | None = None,
    board: PositiveBoard | None = None,
    wall_clock: Callable[[], datetime] | None = None,
    monotonic: Callable[[], float] | None = None,
) -> AsyncIterator[RunningBroker]:
    """Start the broker; stop it cleanly when the ``async with`` block ends.

    The socket is bound when the block is entered. On exit the server stops accepting,
    closes every connection (1001), waits for the handlers, stops housekeeping and closes the
    backends (the board only if it opened it).

    Args:
        settings: see :class:`BrokerSettings`.
        recorder: called as ``recorder(kind, raw)`` with every frame received (tests use it to
            prove the broker never sees a contact ID). Must not block.
        board: a :class:`~broker.positives.PositiveBoard` to use instead of opening
            the one the settings name; the caller keeps ownership (it is not closed here).
        wall_clock: returns the current aware UTC time (default ``datetime.now(UTC)``);
            used for token expiry.
        monotonic: returns monotonic seconds (default ``time.monotonic``); the one clock of
            the connections' rules (:mod:`broker.protocol`: rate limits, the first-message
            deadline, the upload answer delay) and of positions, cooldowns and routes.

    Yields:
        The :class:`RunningBroker`.

    Raises:
        SetupError: the TLS certificate or key cannot be loaded, or a store named in the
            settings cannot be reached.
        BoardError: the board cannot be opened.
        OSError: the address cannot be bound (in use, not local...).
    """
    context = server_ssl_context(settings)
    backends = await open_backends(settings, board)
    broker = _Broker(settings, backends, recorder, wall_clock or (lambda: datetime.now(UTC)),
                     monotonic or time.monotonic)
    try:
        server = await serve(
            broker.handle,
            settings.host,
            settings.port,
            compression=None,
            max_size=settings.max_message_bytes,
            max_queue=16,
            write_limit=WRITE_LIMIT_BYTES,
            process_request=broker.process_request,
            process_response=bare_upgrade,
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            logger=_LibraryLogger(logging.getLogger("broker.websockets"), {}),
            server_header="fanny-broker",
            ssl=context,
        )
    except BaseException:
        await backends.close()
        raise
    port = int(server.sockets[0].getsockname()[1])
    housekeeping = asyncio.create_task(broker.housekeeping())
    # Which stores, never their URLs (a URL may hold a password).
    logger.info("broker started (radius_max_m=%g cooldown_s=%g position_timeout_s=%g "
                "declarations=%s tls=%s positions=%s board=%s)", settings.radius_max_m,
                settings.cooldown_s, settings.position_timeout_s, broker.declarations,
                "on" if settings.tls else "off",
                "memory" if settings.redis_url is None else "redis",
                "sqlite" if settings.postgres_url is None else "postgresql")
    if settings.open_declarations:
        logger.warning("open declarations: positive uploads are accepted WITHOUT a declaration "
                       "code (field tests only); a code that is sent is still checked")
    try:
        yield RunningBroker(broker, server, port)
    finally:
        server.close()
        await server.wait_closed()
        housekeeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await housekeeping
        if broker.announce_task is not None:
            broker.announce_task.cancel()        # it may wait out announce_interval_s
        for task in list(broker.tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        await backends.close()
        logger.info("broker stopped")
