"""The client engine: GPS source, broker link, aiortc peers and token store, behind events.

The engine imports no Textual. The Textual UI and ``--headless`` both run it and subscribe to
its :mod:`~fanny_tui.events`; commands are plain coroutine methods
(:meth:`Engine.declare_positive`, :meth:`Engine.stop`).

Lifecycle (paper section 3, step 1): a fresh session ID and contact ID (UUIDv4 from
``os.urandom``) are made when the engine is built and live only in this object's memory; they are
never written, logged or put in an event. They are replaced by fresh ones on a schedule and at
once after a positive declaration (see "ID rotation" below). Then :meth:`Engine.run` keeps these
loops going until :meth:`Engine.stop`:

* GPS: every fix or loss from the position source is emitted; a loss tells the broker at once
  (``position_lost``) so no stale position stays there. A fix implying a speed above
  ``max_speed_mps`` since the previous accepted one (an implausible jump, docs/protocol.md,
  "Contact measures") is rejected for the whole device, before anything uses it: never
  emitted as a fix, never sent to the broker nor to a peer, so a single GPS outlier never
  makes a match (with ``min_contact_s`` 0 the match alone is the witness) nor seeds a
  contact's meter. An NMEA log replayed ``rate`` times faster than it was recorded moves that
  many times faster: the bound is multiplied by its ``rate`` (here and in the contacts);
* positions: the latest fix is sent every ``position_interval_s`` (and at once after a loss or a
  reconnection) — never a position without a real fix;
* broker link: ``match`` starts one witness exchange per peer (aiortc, data channel), whose SDP
  offer/answer goes through the broker, whose contact IDs and positions never do. The channel
  stays open while the pair is in contact (data channel version 2, docs/protocol.md): positions
  are exchanged peer to peer (``peer_update``), the token is stored once the pair was within
  the radius for ``min_contact_s`` (``token_stored`` with the contact's measures), and the
  contact's final measures go to the store when it closes (``contact_closed``). A handshake
  slot (:data:`MAX_CONCURRENT_HANDSHAKES`) is held for the establishment only. The wait for a
  slot has a deadline and an order (crowds, issue 7 point 6): an exchange must be established
  within ``handshake_timeout_s`` of its match, the budget its peer has too (both got the match
  at the same moment), so it never starts after its peer gave up; one that would get less than
  :data:`MIN_HANDSHAKE_BUDGET_S` fails as ``no_slot`` without starting. A freed slot goes first
  to an exchange whose peer already sent its SDP offer or answer (that peer holds a slot and
  its clock runs), then to the one matched first;
* polling: every ``poll_interval_s`` the positive tokens are fetched on an anonymous connection
  and compared locally (paper 4, steps 3-4), in one streamed binary poll however many there are;
  when the broker announces new ones on the session connection (``positives_available``), a
  poll follows after a random delay of at most ``poll_interval_s`` / 10; a failed poll is a
  ``positives_poll_failed`` event. Each ``[[positives]]`` broker (paper 5, issue 8) has its own
  poll loop and durable cursor, so one broker down never holds up the others; those brokers
  only ever see anonymous polls and the uploads the tester sends them;
* uploads: pending positive declarations are retried with backoff until acknowledged, or until
  the broker refuses them for good (their declaration code, or content a retry would meet again:
  the tokens then stay, un-marked: ``positive_refused``); one loop per broker, each sending
  the declarations made to it;
* decoys (``[privacy] decoy_uploads``, off by default; to each broker a declaration may go
  to): a decoy upload, padded like a real one,
  on a fresh anonymous connection at exponentially distributed intervals of mean
  ``decoy_interval_s`` (cover traffic: nothing changes on the device);
* sweep: expired tokens are deleted (paper 3, step 6);
* rotation: the session ID and contact ID are replaced every ``[privacy] rotation_interval_s``
  (with jitter), see below.

Storage failures (disk full, read-only data directory) never stop the engine: each is an
``error`` event, the failed write changed nothing, and the loops carry on (a witness exchange
that cannot store its token fails as ``store_failed`` with nothing stored on this side).

ID rotation
-----------
Without it, one session ID and one contact ID would last the whole run: two devices meeting
again would make the identical token (a token just declared positive would be stored again
minutes later), a peer could recognise a device met before, and the broker could follow one
session all day. So the engine makes a fresh session ID and contact ID (``os.urandom``, UUIDv4)
every ``[privacy] rotation_interval_s`` seconds (default 900), each interval drawn uniformly
from [1 - :data:`ROTATION_JITTER`, 1 + :data:`ROTATION_JITTER`] times it (720-1080 s by default,
the 10-20 minutes of exposure-notification key rotation), so that devices started together do
not rotate in step and the instant of the next rotation is not known in advance. A rotation
reconnects the session connection with a new ``hello`` (:meth:`BrokerLink.rehello
<fanny_tui.link.BrokerLink.rehello>`: the broker drops the old session and its position at
disconnect), forgets the old IDs (no reference is kept) and emits ``ids_rotated``.

A rotation never cuts a contact short of its token: an exchange keeps the contact ID it
started with, and a contact whose pair has not yet stayed ``min_contact_s`` within the radius
would lose its accumulated time if it were closed and started again under new IDs. So when a
scheduled rotation is due, it waits until every running exchange either ended or holds its
token (with ``min_contact_s = 0`` that is the end of the establishment); then the contacts that
hold their token are closed (``contact_closed`` with reason ``rotated``: their measures so far
are in the store; on the wire the peer hears ``close`` ``stopped``) and the IDs rotate. The
pair, still together, is matched again by the broker under the new session IDs and starts a
new contact with a new token: a long contact is recorded as several tokens of at most one
rotation interval each, never as a contact cut before its token. While a rotation waits, new
``match`` messages are declined (no exchange is started; the peer's side fails by its own
time-out) so that the wait ends: at most ``min_contact_s`` plus an
establishment (or, for a contact that never reaches its token, until it parts, ``max_contact_s``
at worst). A declined pair is matched again as soon as the new session reports its position.
A positive declaration (:meth:`Engine.declare_positive`) cancels the running exchanges (their
open contacts close with reason ``rotated`` too) and rotates at once (``ids_rotated`` with
reason ``declared``), so no token with the declared contact ID can be made after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, PositivesBrokerConfig
from .datadir import DataDirLock
from .events import (
    ChannelOpen,
    Contact,
    ContactClosed,
    EngineError,
    Event,
    ExposureAlert,
    GpsFix,
    GpsLost,
    HandshakeFailed,
    HandshakeProgress,
    IdsRotated,
    MatchFound,
    PeerUpdate,
    PositiveDeclared,
    PositivePending,
    PositiveRefused,
    PositivesPolled,
    PositivesPollFailed,
    SessionStarted,
    TokensExpired,
    TokenStored,
)
from .journal import attach as attach_journal
from .link import BrokerLink, backoff, ssl_context_for
from .positives import UploadOutcome, declare, poll_once, send_decoy, upload_pending
from .protocol.codes import normalize_code
from .protocol.contact import ContactMeasures, ContactSettings, Fix, JumpFilter
from .protocol.expiry import expiry_for
from .protocol.handshake import ContactEnded, Established, PeerSample
from .protocol.handshake import HandshakeCompleted as WitnessCompleted
from .protocol.handshake import HandshakeFailed as WitnessFailed
from .protocol.messages import (
    Hello,
    Match,
    Position,
    PositionLost,
    PositivesAvailable,
    Role,
    Signal,
)
from .protocol.tokens import new_id
from .store import Alert, StoredToken, StoreError, TokenStore

if TYPE_CHECKING:
    from .gps import PositionSource  # pynmea2 is imported with the first source built

log = logging.getLogger(__name__)

MAX_CONCURRENT_HANDSHAKES = 8
MIN_HANDSHAKE_BUDGET_S = 1.0
"""An exchange that would get a handshake slot with less of its budget left fails ``no_slot``
(at most half of ``handshake_timeout_s``)."""
SWEEP_INTERVAL_S = 60.0
_ENDED_NOT_FAILED = frozenset({"parted", "max_contact", "peer_closed", "stopped"})
"""How a contact may end before its token without the exchange counting as failed."""
CANCEL_AGAIN_S = 1.0
"""While stopping, a task still running this long after its cancellation is cancelled again."""
MAX_ACCURACY_M = 100_000.0
"""The largest ``accuracy_m`` the wire accepts (fanny_tui.protocol.messages.AccuracyM)."""
ROTATION_JITTER = 0.2
"""Each ID rotation interval is ``rotation_interval_s`` times a uniform draw in [0.8, 1.2]."""
CLOCK_SKEW_LIMIT_S = 300.0
"""A receiver's fix time this far (seconds) from the device clock is reported (issue 7, 7)."""
RECEIVER_SOURCES = frozenset({"gpsd", "nmea"})
"""Fix sources whose ``time`` is the receiver's (GPS time), not the device clock's."""


def clock_disagreement(fix: GpsFix, now: datetime) -> str | None:
    """A one-line warning when the device clock disagrees with a receiver's GPS time, else None.

    Token expiries (and so the broker's ``expiry_out_of_window``, 16 days), alerts and the
    deletion hour all follow the device clock; a device without a real-time clock (a Raspberry
    Pi) may start a day off. Only fixes from a receiver (:data:`RECEIVER_SOURCES`) carry GPS
    time; a replayed log carries the time it was recorded, and is reported too.

    Args:
        fix: the fix (its ``time`` and ``source``).
        now: the device clock, aware (UTC).

    Returns:
        None when the fix has no GPS time or they agree within :data:`CLOCK_SKEW_LIMIT_S`.
    """
    if fix.time is None or fix.source not in RECEIVER_SOURCES:
        return None
    skew = (now - fix.time).total_seconds()
    if abs(skew) <= CLOCK_SKEW_LIMIT_S:
        return None
    hours = abs(skew) / 3600
    amount = f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours"
    return (f"the device clock is {amount} {'ahead of' if skew > 0 else 'behind'} GPS time "
            f"({fix.time:%Y-%m-%d %H:%M} UTC from {fix.source}): token expiries follow the "
            "device clock, so set it (e.g. chrony with gpsd), or positive declarations may be "
            "refused (a replayed log carries the time it was recorded)")


class _PeerSignaling:
    """Signaling for one exchange: SDP out through the broker, SDP in from a queue."""

    def __init__(self, engine: Engine, peer_session_id: str) -> None:
        self._engine = engine
        self._peer = peer_session_id
        self.inbox: asyncio.Queue[tuple[str, str]] = asyncio.Queue(maxsize=4)

    async def send(self, sdp_type: str, sdp: str) -> None:
        message = Signal(peer_session_id=self._peer, sdp_type=sdp_type,  # type: ignore[arg-type]
                         sdp=sdp)
        if not await self._engine._link.send(message):
            raise ConnectionError("the broker is not connected")

    async def receive(self) -> tuple[str, str]:
        return await self.inbox.get()


@dataclass
class _Exchange:
    ordinal: int
    role: Role
    signaling: _PeerSignaling
    contact_id: str = ""
    """The contact ID this exchange uses, read once when it starts (memory only)."""
    matched_at: float = 0.0
    """``time.monotonic()`` of the broker's match."""
    deadline: float = 0.0
    """``time.monotonic()`` by which the establishment must be done (its peer's deadline too)."""
    token_held: bool = False
    """This contact's token is in the store: closing it now loses no witness."""
    closing_reason: str | None = None
    """Why this device cancels the exchange (``rotated``), reported instead of the protocol's
    ``stopped`` in ``contact_closed``; None: the exchange was not cancelled by the engine's
    rotation (an app stop stays ``stopped``)."""
    task: asyncio.Task[None] | None = None


class _HandshakeSlots:
    """At most ``size`` establishments at once; the wait has a deadline and an order.

    A freed slot goes to the waiting exchange whose peer already signalled (an SDP offer or
    answer in its inbox: that peer holds a slot and its budget runs), then to the earliest
    deadline (the first matched). Both sides of a pair thus favour the same pairs.
    """

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: list[tuple[_Exchange, asyncio.Future[None]]] = []

    @property
    def free(self) -> int:
        """Slots free now."""
        return self._free

    @property
    def waiting(self) -> int:
        """Exchanges waiting for a slot."""
        return len(self._waiters)

    async def acquire(self, exchange: _Exchange) -> bool:
        """Wait for a slot until ``exchange.deadline`` (``time.monotonic()`` seconds).

        Returns:
            True with a slot held (call :meth:`release`), False when the deadline came first.

        Raises:
            asyncio.CancelledError: cancelled while waiting (no slot is kept).
        """
        if self._free and not self._waiters:
            self._free -= 1
            return True
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (exchange, granted)
        self._waiters.append(entry)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, exchange.deadline - time.monotonic())):
                    await asyncio.shield(granted)
        except asyncio.CancelledError:
            if granted.done():        # handed over just before the cancellation: give it back
                self.release()
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        return granted.done()

    def release(self) -> None:
        """Give a slot back: to the best waiter (see the class), or to the pool."""
        if not self._waiters:
            self._free += 1
            return
        best = min(self._waiters,
                   key=lambda e: (e[0].signaling.inbox.empty(), e[0].deadline))
        self._waiters.remove(best)
        best[1].set_result(None)


@dataclass
class EngineSnapshot:
    """What a UI needs at start-up, before events arrive."""

    session_short: str
    tokens: list[StoredToken] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)


class Engine:
    """One field device: run it, subscribe to its events, send it commands.

    Args:
        config: the parsed configuration.
        data_dir: where the token store lives.
        source: the position source (default: built from ``config.gps``).
        ssl_context: for a ``wss://`` broker (None: built from ``[broker]`` by
            :func:`~fanny_tui.link.ssl_context_for`: ``ca_file``, else the system's CAs).

    Raises:
        ConfigError: ``broker.ca_file`` or a ``positives[N].ca_file`` is unusable (one line
            naming the key).
    """

    def __init__(self, config: Config, data_dir: Path, *, source: PositionSource | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        self._session_id = new_id(os.urandom(16))
        self._contact_id = new_id(os.urandom(16))
        self._source = source
        if ssl_context is None:
            ssl_context = ssl_context_for(config.broker)
        self._ssl = ssl_context
        # The [[positives]] brokers, polled for positive tokens only (issue 8, paper 5).
        self._others: dict[str, tuple[PositivesBrokerConfig, ssl.SSLContext | None]] = {
            other.name: (other, ssl_context_for(other, key=f"positives[{i}]"))
            for i, other in enumerate(config.positives)}
        self._upload_wakeups = {name: asyncio.Event() for name in self._others}
        self._poll_wakeups = {name: asyncio.Event() for name in self._others}
        self._subscribers: list[Callable[[Event], None]] = []
        self._store: TokenStore | None = None
        self._fix: GpsFix | None = None
        # The device's own implausible-jump rule, kept for the whole run (not per contact).
        self._jumps = JumpFilter(config.protocol.max_speed_mps)
        self._position_wakeup = asyncio.Event()
        self._upload_wakeup = asyncio.Event()
        self._poll_wakeup = asyncio.Event()
        self._announced_poll: asyncio.TimerHandle | None = None   # a poll after an announcement
        self._stopped = asyncio.Event()
        self._exchanges: dict[str, _Exchange] = {}
        self._handshake_slots = _HandshakeSlots(MAX_CONCURRENT_HANDSHAKES)
        self._next_ordinal = 1
        self._unrecorded_alerts: set[str] = set()  # matches the store could not record yet
        self._clock_checked = False              # the device clock was compared with GPS time
        self._rotation_lock = asyncio.Lock()     # one ID rotation at a time
        self._rotation_pending = False           # True: matches are declined (module docstring)
        self._exchanges_changed = asyncio.Event()  # an exchange held its token or ended
        self._rotations = 0
        self._rng = random.SystemRandom()
        self._preload: asyncio.Task[None] | None = None   # aiortc imported in a thread
        self._link = BrokerLink(
            config.broker.urls,
            Hello(session_id=self._session_id, radius_m=config.protocol.radius_m),
            on_message=self._on_broker_message, on_event=self.emit,
            on_connected=self._on_broker_connected,
            reconnect_min_s=config.broker.reconnect_min_s,
            reconnect_max_s=config.broker.reconnect_max_s, ssl_context=ssl_context,
            name=config.broker.name)

    # -- observation ----------------------------------------------------------------------

    @property
    def session_short(self) -> str:
        """The first 8 characters of the session ID, for display on this device only."""
        return self._session_id[:8]

    @property
    def broker_names(self) -> tuple[str, ...]:
        """The brokers a declaration may go to: ``[broker] name`` first (the default), then
        the ``[[positives]]`` names, as configured."""
        return (self.config.broker.name, *self._others)

    @property
    def broker_connected(self) -> bool:
        """True while the session connection is up."""
        return self._link.connected

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to every subscriber (a failing subscriber is logged, not fatal)."""
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a UI bug must not stop the witness machinery
                log.exception("an event subscriber failed on %s", event.event)

    def snapshot(self) -> EngineSnapshot:
        """Current tokens and alerts (empty before the store is open)."""
        if self._store is None:
            return EngineSnapshot(self.session_short)
        return EngineSnapshot(self.session_short, self._store.tokens(), self._store.alerts())

    # -- commands -------------------------------------------------------------------------

    async def declare_positive(self, code: str | None = None, *,
                               broker: str | None = None) -> int:
        """Declare positive (paper 4, steps 1-2; paper 5 for the code).

        Every token not already pending is marked for upload at once, with the code (in
        uploads of at most ``MAX_TOKENS_PER_UPLOAD`` tokens), and deleted only after the
        broker's ack; each upload is retried until then, even after a restart. If the broker
        refuses the code, that upload's tokens stay here, un-marked, ``positive_refused`` is
        emitted and the upload is not retried.

        Args:
            code: the declaration code as typed (``K7QF-3M9X-TR2B-8HJD``; case, spaces and
                hyphens do not matter); None for a broker with open declarations.
            broker: the name of the broker the declaration goes to (one of
                :attr:`broker_names`; the code must be one it issued); None: ``[broker]``.

        Returns:
            The number of tokens in this declaration (0: nothing to upload).

        Raises:
            ValueError: the code is malformed, or ``broker`` is not a configured broker's name
                (checked before anything changes).
            RuntimeError: the engine is not running.
            StoreError: the store could not be written (nothing changed; the IDs are rotated
                all the same).

        Before the tokens are marked, the running witness exchanges are cancelled (a token
        whose store call already runs is stored and declared); after, the session ID and
        contact ID are rotated (``ids_rotated``, reason ``declared``): no token made with the
        declared contact ID can be stored after this call.
        """
        if self._store is None:
            raise RuntimeError("the engine is not running")
        if code is not None:
            normalize_code(code)  # a malformed code changes nothing, not even the IDs
        if broker is not None and broker not in self.broker_names:
            raise ValueError(f"unknown broker {broker!r}: expected one of "
                             f"{', '.join(self.broker_names)}")
        target = None if broker in (None, self.config.broker.name) else broker
        async with self._rotation_lock:
            await self._decline_matches_while(self._cancel_exchanges())
            try:
                declaration = declare(self._store, code, broker=target)
            finally:
                await self._rotate_now("declared")
        if declaration.count == 0:
            self.emit(PositiveDeclared(count=0, broker=broker or self.config.broker.name))
        (self._upload_wakeup if target is None else self._upload_wakeups[target]).set()
        return declaration.count

    async def poll_now(self) -> None:
        """Poll the positive tokens now (every broker) instead of at the next interval."""
        self._poll_wakeup.set()
        for wakeup in self._poll_wakeups.values():
            wakeup.set()

    async def stop(self) -> None:
        """Ask :meth:`run` to finish (idempotent)."""
        self._stopped.set()

    # -- main loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`stop`. Opens the store first, and the journal if ``[journal] path``
        is set (:mod:`fanny_tui.journal`; a journal that cannot be written is an ``error`` event).

        The data directory is locked for the whole run (:mod:`fanny_tui.datadir`), so that no
        other engine or ``fanny-tui declare-positive`` uses the same store meanwhile.

        Raises:
            DataDirBusy: another process holds the data directory (the message names both).
            StoreError: the token store cannot be opened.
        """
        with contextlib.ExitStack() as cleanup:
            lock = DataDirLock(self.data_dir)
            lock.acquire()
            cleanup.callback(lock.release)
            self._store = store = TokenStore.in_dir(self.data_dir)
            cleanup.callback(store.close)
            if self._source is None:
                from .gps import make_source
                self._source = make_source(self.config.gps)
            journal = attach_journal(self)  # [journal] path: JSON lines of this run (default none)
            if journal is not None:
                cleanup.callback(journal.close)
            self.emit(SessionStarted())
            loops: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("gps", self._gps_loop), ("broker link", self._link.run),
                ("positions", self._position_loop), ("poll", self._poll_loop),
                ("uploads", self._upload_loop), ("sweep", self._sweep_loop),
                ("rotation", self._rotation_loop)]
            for name, (other, context) in self._others.items():
                loops.append((f"poll {name}", self._poll_loop_for(other, context)))
                loops.append((f"uploads {name}", self._upload_loop_for(other, context)))
            if self.config.privacy.decoy_uploads:
                loops.append(("decoys", self._decoy_loop))
                for name, (other, context) in self._others.items():
                    loops.append((f"decoys {name}", self._decoy_loop_for(other, context)))
            tasks = [asyncio.create_task(self._guard(name, fn), name=f"fanny-{name}")
                     for name, fn in loops]
            try:
                await self._stopped.wait()
            finally:
                if self._preload is not None:
                    tasks.append(self._preload)
                for exchange in list(self._exchanges.values()):
                    if exchange.task is not None:
                        tasks.append(exchange.task)
                await _cancel_all(tasks)
                self._exchanges.clear()
                if self._announced_poll is not None:
                    self._announced_poll.cancel()
                    self._announced_poll = None

    async def _guard(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one loop forever; an unexpected crash is reported and the loop restarted."""
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("the %s loop failed; restarting it", name)
                self.emit(EngineError(message=f"{name} failed: {type(exc).__name__}: {exc}"))
                await asyncio.sleep(1.0)

    async def _sleep_or(self, wakeup: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), seconds)
        wakeup.clear()

    def _on_broker_connected(self) -> None:
        self._position_wakeup.set()
        if self._preload is None:
            # No match can come before the link is up; the app's first paint is already done
            # (it starts the engine once its panels are mounted). See _preload_aiortc.
            self._preload = asyncio.create_task(self._preload_aiortc(), name="fanny-preload")

    async def _preload_aiortc(self) -> None:
        """Import aiortc in a worker thread, so that the first match costs what later ones do
        (issue 7, point 4). The event loop keeps running meanwhile (the import holds the GIL
        only between the interpreter's switch intervals). A failed import is logged: the
        first exchange then fails with the same error, as it did before."""
        from . import peer
        try:
            await asyncio.to_thread(peer.preload)
        except ImportError as exc:
            log.warning("aiortc could not be imported: %s", exc)

    # -- GPS and positions (paper 3, step 2) ----------------------------------------------

    async def _gps_loop(self) -> None:
        assert self._source is not None  # built by run() before the loops start
        self._jumps = JumpFilter(self._speed_bound())
        async for item in self._source.stream():
            if isinstance(item, GpsFix):
                if not self._jumps.accept(Fix(item.latitude, item.longitude, item.accuracy_m),
                                          time.monotonic()):
                    log.info("GPS fix rejected: an implausible jump (faster than "
                             "max_speed_mps = %s m/s since the last accepted fix)",
                             self._jumps.max_speed_mps)
                    continue
                was_lost = self._fix is None
                self._fix = item
                self.emit(item)
                if not self._clock_checked and item.time is not None:
                    self._clock_checked = item.source in RECEIVER_SOURCES
                    warning = clock_disagreement(item, datetime.now(UTC))
                    if warning is not None:
                        self.emit(EngineError(message=warning))
                if was_lost:
                    self._position_wakeup.set()
            elif isinstance(item, GpsLost):
                had_fix = self._fix is not None
                self._fix = None
                self.emit(item)
                if had_fix:
                    await self._link.send(PositionLost())

    async def _position_loop(self) -> None:
        while True:
            fix = self._fix
            if fix is not None:
                await self._link.send(position_message(fix))
            await self._sleep_or(self._position_wakeup, self.config.protocol.position_interval_s)

    # -- matches and witness exchanges (paper 3, steps 3-5) --------------------------------

    def _on_broker_message(self, message: object) -> None:
        if isinstance(message, Match):
            if self._rotation_pending:  # see "ID rotation" in the module docstring
                log.debug("match declined: the IDs are about to rotate")
                return
            self._start_exchange(message.peer_session_id, message.role)
        elif isinstance(message, PositivesAvailable):
            self._on_announcement(message.cursor)
        elif isinstance(message, Signal):
            exchange = self._exchanges.get(message.peer_session_id)
            if exchange is None:
                log.debug("signal for no running exchange dropped")
                return
            try:
                exchange.signaling.inbox.put_nowait((message.sdp_type, message.sdp))
            except asyncio.QueueFull:
                log.warning("signaling flood from a peer dropped")
        else:
            log.debug("broker message %s ignored on the session connection",
                      type(message).__name__)

    def _start_exchange(self, peer_session_id: str, role: Role) -> None:
        if peer_session_id in self._exchanges:
            return
        # The contact ID is read once: an open contact keeps the ID it started with.
        now = time.monotonic()
        exchange = _Exchange(self._next_ordinal, role, _PeerSignaling(self, peer_session_id),
                             contact_id=self._contact_id, matched_at=now,
                             deadline=now + self.config.protocol.handshake_timeout_s)
        self._next_ordinal += 1
        self._exchanges[peer_session_id] = exchange
        self.emit(MatchFound(peer=exchange.ordinal, role=role))
        exchange.task = asyncio.create_task(self._exchange(peer_session_id, exchange),
                                            name=f"fanny-witness-{exchange.ordinal}")

    def _speed_bound(self) -> float:
        """``max_speed_mps`` in the source's time (metres per second): a replayed NMEA log
        runs ``rate`` times faster than it was recorded, and so do its receiver's moves."""
        from .gps import NmeaReplaySource
        speed = self.config.protocol.max_speed_mps
        if isinstance(self._source, NmeaReplaySource):
            speed *= self._source.rate
        return speed

    def _own_fix(self) -> Fix | None:
        """This device's latest fix for the data channel (accuracy capped like the wire's)."""
        fix = self._fix
        if fix is None:
            return None
        accuracy = None if fix.accuracy_m is None else min(fix.accuracy_m, MAX_ACCURACY_M)
        return Fix(fix.latitude, fix.longitude, accuracy)

    async def _exchange(self, peer_session_id: str, exchange: _Exchange) -> None:
        """One witness exchange and the contact that follows (paper 3, steps 3-5; issue 6).

        A handshake slot (:data:`MAX_CONCURRENT_HANDSHAKES`) is held only for the
        establishment (signaling, ICE, DTLS, hellos), not for the open contact.
        """
        from . import peer  # aiortc is heavy: imported when the first match comes

        protocol = self.config.protocol
        settings = ContactSettings(
            radius_m=protocol.radius_m, min_contact_s=protocol.min_contact_s,
            contact_gap_s=protocol.contact_gap_s, max_contact_s=protocol.max_contact_s,
            max_speed_mps=self._jumps.max_speed_mps,
            position_interval_s=protocol.position_interval_s,
            token_timeout_s=protocol.handshake_timeout_s)
        stored_expiry: list[datetime] = []
        store_errors: list[StoreError] = []
        held: dict[str, ContactMeasures] = {}  # token -> measures already in the store
        ended: list[ContactEnded] = []

        def store_token(token: str) -> bool:
            assert self._store is not None
            expires_at = expiry_for(datetime.now(UTC), lifetime_days=protocol.token_lifetime_days,
                                    deletion_hour_utc=protocol.deletion_hour_utc)
            try:
                new = self._store.add(token, expires_at)
            except StoreError as exc:  # the peer hears "store_failed", the tester hears why
                store_errors.append(exc)
                raise
            stored_expiry.append(expires_at)
            return new

        def grow(token: str, more: ContactMeasures) -> None:
            assert self._store is not None
            try:
                self._store.grow_contact(token, more)
            except StoreError as exc:
                self.emit(EngineError(message=f"a contact's measures could not be stored: {exc}"))

        def on_event(event: object) -> None:
            if isinstance(event, peer.ChannelOpened):
                self.emit(ChannelOpen(peer=exchange.ordinal,
                                      local_candidate=event.local_candidate,
                                      remote_candidate=event.remote_candidate))
            elif isinstance(event, Established):
                release()
            elif isinstance(event, PeerSample):
                sample = event.sample
                self.emit(PeerUpdate(peer=exchange.ordinal, distance_m=sample.distance_m,
                                     bearing_deg=sample.bearing_deg,
                                     peer_accuracy_m=sample.peer_accuracy_m,
                                     within=sample.verdict, within_s=sample.within_s,
                                     samples=sample.samples))
            elif isinstance(event, WitnessCompleted):
                exchange.token_held = True
                self._exchanges_changed.set()
                measures = event.measures or ContactMeasures()
                grow(event.token, measures)
                held[event.token] = measures
                expires_at = stored_expiry[-1] if stored_expiry else expiry_for(
                    datetime.now(UTC), lifetime_days=protocol.token_lifetime_days,
                    deletion_hour_utc=protocol.deletion_hour_utc)
                self.emit(HandshakeProgress(peer=exchange.ordinal, state="stored"))
                self.emit(TokenStored(
                    peer=exchange.ordinal, token=event.token, expires_at=expires_at,
                    new=event.new, contact=_contact(measures),
                    match_to_token_s=round(time.monotonic() - exchange.matched_at, 3)))
            elif isinstance(event, ContactEnded):
                ended.append(event)
                if event.token is not None and event.token in held:
                    before = held[event.token]
                    final = event.measures
                    grow(event.token, ContactMeasures(
                        duration_s=max(0.0, final.duration_s - before.duration_s),
                        closest_m=final.closest_m, median_m=final.median_m,
                        samples=max(0, final.samples - before.samples)))
                reason = event.reason
                if reason == "stopped" and exchange.closing_reason is not None:
                    reason = exchange.closing_reason  # the IDs rotated, the app runs on
                self.emit(ContactClosed(peer=exchange.ordinal, reason=reason,
                                        contact=_contact(event.measures),
                                        token_stored=event.token is not None))

        def progress(state: str) -> None:
            self.emit(HandshakeProgress(peer=exchange.ordinal, state=state))

        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._handshake_slots.release()

        try:
            released = not await self._handshake_slots.acquire(exchange)
            budget = exchange.deadline - time.monotonic()
            if budget < min(MIN_HANDSHAKE_BUDGET_S, protocol.handshake_timeout_s / 2):
                release()   # too late: the peer gives up at the same deadline
                log.info("witness exchange %d not started: no handshake slot in time",
                         exchange.ordinal)
                self._finish_failed(exchange, "no_slot")
                return
            try:
                result = await peer.run_witness(
                    role=exchange.role, contact_id=exchange.contact_id,
                    signaling=exchange.signaling, webrtc=self.config.webrtc,
                    store_token=store_token, timeout_s=budget,
                    on_progress=progress, contact=settings, own_fix=self._own_fix,
                    on_event=on_event)
            finally:
                release()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # aiortc or signaling trouble: this exchange only
            log.warning("witness exchange %d failed: %s", exchange.ordinal, type(exc).__name__)
            reason = "broker_unavailable" if isinstance(exc, ConnectionError) else (
                f"error: {type(exc).__name__}")
            self._finish_failed(exchange, reason)
            return
        finally:
            self._exchanges.pop(peer_session_id, None)  # forget the peer's session ID
            self._exchanges_changed.set()
        if isinstance(result, WitnessFailed):
            if ended and ended[-1].reason in _ENDED_NOT_FAILED:
                return  # the pair parted (or a side stopped) before the token: not a failure
            self._finish_failed(exchange, result.reason)
            if result.reason.startswith("store_failed"):
                why = str(store_errors[-1]) if store_errors else result.reason
                self.emit(EngineError(message=f"a witness token could not be stored: {why}"))

    def _finish_failed(self, exchange: _Exchange, reason: str) -> None:
        self.emit(HandshakeProgress(peer=exchange.ordinal, state="failed"))
        self.emit(HandshakeFailed(peer=exchange.ordinal, reason=reason))

    # -- positives (paper 4) --------------------------------------------------------------

    async def _upload_loop(self) -> None:
        """Send the declarations made to the device's own broker (to its current URL).

        A declaration made to a ``[[positives]]`` broker that is no longer configured stays
        pending (it is never sent to another organization's broker): reported once.
        """
        assert self._store is not None
        try:
            counts = await asyncio.to_thread(self._store.pending_counts)
        except StoreError:
            counts = {}
        for target, count in counts.items():
            if target is not None and target not in self._others:
                self.emit(EngineError(
                    message=f"{plural_tokens(count)} declared to the broker {target!r} wait "
                    "for it, but no [[positives]] table names it any more: add it back to "
                    "send them"))
        await self._uploads(None, self.config.broker.name, lambda: self._link.url, self._ssl,
                            self._upload_wakeup)

    def _upload_loop_for(self, other: PositivesBrokerConfig, context: ssl.SSLContext | None
                         ) -> Callable[[], Awaitable[None]]:
        """The upload loop of one ``[[positives]]`` broker (declarations made to it)."""
        return lambda: self._uploads(other.name, other.name, lambda: other.url, context,
                                     self._upload_wakeups[other.name])

    async def _uploads(self, target: str | None, name: str, url: Callable[[], str],
                       context: ssl.SSLContext | None, wakeup: asyncio.Event) -> None:
        """Upload the pending declarations for ``target`` (None: the device's own broker)
        until acknowledged, retrying with the ``[broker]`` backoff; events name ``name``."""
        assert self._store is not None
        store = self._store
        broker = self.config.broker
        retry_delays = backoff(broker.reconnect_min_s, broker.reconnect_max_s)
        delays = retry_delays()

        def answered(outcome: UploadOutcome) -> None:
            self._upload_answered(outcome, name)

        while True:
            if not (await asyncio.to_thread(store.pending_counts)).get(target):
                delays = retry_delays()
                # Woken by declare_positive(); the periodic look also picks up a declaration
                # made by `fanny-tui declare-positive` in another process on the same store.
                await self._sleep_or(wakeup, self.config.protocol.poll_interval_s)
                continue
            try:
                await upload_pending(store, url(), ssl_context=context,
                                     on_outcome=answered, broker=target)
                continue
            except StoreError as exc:
                reason = str(exc)
                self.emit(EngineError(message=reason))
            except Exception as exc:  # broker down, dropped, rate limited: keep tokens, retry
                reason = _describe(exc)
            delay = next(delays)
            count = (await asyncio.to_thread(store.pending_counts)).get(target)
            if count:
                self.emit(PositivePending(count=count, reason=reason,
                                          retry_in_s=round(delay, 1), broker=name))
            await self._sleep_or(wakeup, delay)

    def _upload_answered(self, outcome: UploadOutcome, broker: str) -> None:
        if outcome.acknowledged:
            self.emit(PositiveDeclared(count=outcome.count, broker=broker))
        else:
            assert outcome.refused is not None
            self.emit(PositiveRefused(reason=outcome.refused, count=outcome.count,
                                      message=outcome.message, broker=broker))

    async def _decoy_loop(self) -> None:
        """Cover traffic: decoy uploads at exponentially distributed intervals (Poisson), to
        the device's own broker (its current URL)."""
        await self._decoys(lambda: self._link.url, self._ssl)

    def _decoy_loop_for(self, other: PositivesBrokerConfig, context: ssl.SSLContext | None
                        ) -> Callable[[], Awaitable[None]]:
        """Decoys to one ``[[positives]]`` broker: a declaration may go there too, so its
        uploads need the same cover as the device's own broker's."""
        return lambda: self._decoys(lambda: other.url, context)

    async def _decoys(self, url: Callable[[], str], context: ssl.SSLContext | None) -> None:
        rng = random.SystemRandom()
        rate = 1.0 / self.config.privacy.decoy_interval_s
        while True:
            await asyncio.sleep(rng.expovariate(rate))
            answered = await send_decoy(url(), ssl_context=context, rng=rng)
            log.debug("decoy upload %s", "answered" if answered else "not answered")

    async def _poll_loop(self) -> None:
        """Poll the device's own broker's positives every ``poll_interval_s``, at once on
        :meth:`poll_now`, and after a random delay when the broker announces new positives
        (:meth:`_on_announcement`). Polls go to the URL the session link uses now."""
        await self._polls(None, self.config.broker.name, lambda: self._link.url, self._ssl,
                          self._poll_wakeup)

    def _poll_loop_for(self, other: PositivesBrokerConfig, context: ssl.SSLContext | None
                       ) -> Callable[[], Awaitable[None]]:
        """The poll loop of one ``[[positives]]`` broker, with its own cursor."""
        return lambda: self._polls(other.name, other.name, lambda: other.url, context,
                                   self._poll_wakeups[other.name])

    async def _polls(self, target: str | None, name: str, url: Callable[[], str],
                     context: ssl.SSLContext | None, wakeup: asyncio.Event) -> None:
        """Poll one broker forever (``target`` None: the device's own; events name ``name``)."""
        assert self._store is not None
        interval = self.config.protocol.poll_interval_s
        failed_since: datetime | None = None
        attempts = 0
        while True:
            try:
                result = await poll_once(
                    self._store, url(), ssl_context=context, broker=target,
                    on_match=lambda count, contacts: self.emit(ExposureAlert(
                        count=count, contacts=tuple(_contact(c) for c in contacts),
                        broker=name)),
                    on_unrecorded_match=lambda tokens: self._alert_unrecorded(tokens, name))
            except StoreError as exc:
                self.emit(EngineError(message=str(exc)))
            except Exception as exc:
                attempts += 1
                failed_since = failed_since or datetime.now(UTC)
                log.info("positives poll of %s failed (%d in a row): %s", name, attempts,
                         _describe(exc))
                self.emit(PositivesPollFailed(reason=_describe(exc), since=failed_since,
                                              attempts=attempts, next_poll_in_s=interval,
                                              broker=name))
            else:
                failed_since, attempts = None, 0
                self.emit(PositivesPolled(received=result.received, next_poll_in_s=interval,
                                          broker=name))
            await self._sleep_or(wakeup, interval)

    def _on_announcement(self, cursor: int) -> None:
        """The broker announced new positives up to ``cursor`` on the session connection.

        Unless this device already holds them or a poll is already scheduled for an
        announcement, poll after a random delay, uniform in [0, ``poll_interval_s`` / 10]
        (30 s at the default 300 s), so that the poll on the anonymous connection is not
        timed to the session (docs/protocol.md, ``positives_available``).
        """
        if self._announced_poll is not None or self._store is None:
            return
        if cursor <= self._store.poll_cursor():
            return
        delay = self._rng.uniform(0.0, self.config.protocol.poll_interval_s / 10)

        def due() -> None:
            self._announced_poll = None
            if self._store is not None and cursor > self._store.poll_cursor():
                self._poll_wakeup.set()

        self._announced_poll = asyncio.get_running_loop().call_later(delay, due)

    def _alert_unrecorded(self, tokens: set[str], broker: str) -> None:
        """Alert on matches the store could not record (it cannot be written): once each."""
        new = tokens - self._unrecorded_alerts
        if new:
            self._unrecorded_alerts |= new
            self.emit(ExposureAlert(count=len(new), broker=broker))

    async def _sweep_loop(self) -> None:
        assert self._store is not None
        while True:
            try:
                deleted = self._store.sweep_expired(datetime.now(UTC))
            except StoreError as exc:
                self.emit(EngineError(message=str(exc)))
            else:
                if deleted:
                    self.emit(TokensExpired(count=deleted))
            await asyncio.sleep(SWEEP_INTERVAL_S)

    # -- ID rotation (privacy invariant 1; "ID rotation" in the module docstring) -----------

    def _rotation_delay_s(self) -> float:
        """Seconds until the next scheduled rotation: ``rotation_interval_s`` +-20 % (uniform)."""
        interval = self.config.privacy.rotation_interval_s
        return interval * self._rng.uniform(1 - ROTATION_JITTER, 1 + ROTATION_JITTER)

    async def _rotation_loop(self) -> None:
        while True:
            await asyncio.sleep(self._rotation_delay_s())
            await self._rotate_ids()

    async def _rotate_ids(self) -> None:
        """A scheduled rotation: decline matches, wait until every contact holds its token (or
        ended), close those contacts, rotate (module docstring, "ID rotation").

        The lock is taken only once the contacts are settled, so that a declaration meanwhile is
        not held up; if it rotated the IDs meanwhile, this rotation is not needed any more.
        """
        rotations = self._rotations
        await self._decline_matches_while(self._contacts_settled())
        async with self._rotation_lock:
            if self._rotations != rotations:
                self._rotation_pending = False
                return
            await self._rotate_now("schedule")

    async def _decline_matches_while(self, step: Awaitable[None]) -> None:
        """Decline matches from now on; if ``step`` fails or is cancelled, accept them again."""
        self._rotation_pending = True
        try:
            await step
        except BaseException:
            self._rotation_pending = False
            raise

    async def _contacts_settled(self) -> None:
        """Wait until every running exchange holds its token or has ended (matches declined)."""
        while any(not e.token_held for e in self._exchanges.values()):
            self._exchanges_changed.clear()
            if any(not e.token_held for e in self._exchanges.values()):
                await self._exchanges_changed.wait()

    async def _exchanges_ended(self) -> None:
        """Wait until ``self._exchanges`` is empty (no new one starts: matches are declined)."""
        while self._exchanges:
            running = {e.task for e in self._exchanges.values()
                       if e.task is not None and not e.task.done()}
            if running:
                await asyncio.wait(running)
            else:  # an ended exchange leaves the dict in its own finally: let it run
                await asyncio.sleep(0.01)

    async def _cancel_exchanges(self) -> None:
        """Cancel every running exchange and wait for each to end (its peer connection closed).

        Only a rotation (scheduled, or after a declaration) cancels exchanges this way: their
        contacts close with reason ``rotated`` (the peer hears ``close`` ``stopped``).
        """
        for exchange in self._exchanges.values():
            exchange.closing_reason = "rotated"
        tasks = [e.task for e in self._exchanges.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._exchanges_ended()

    async def _rotate_now(self, reason: str) -> None:
        """Replace both IDs and start the new session (caller holds the lock, matches declined).

        Running exchanges (contacts holding their token, or any left by a declaration) are
        closed first; matches are declined meanwhile, so no exchange can start with the old
        contact ID. The old IDs are no longer referenced by
        this engine or its link once this returns.
        """
        try:
            if self._exchanges:  # contacts holding their token: close them (measures stored)
                await self._cancel_exchanges()
            self._session_id = new_id(os.urandom(16))
            self._contact_id = new_id(os.urandom(16))
            self._rotations += 1
            await self._link.rehello(
                Hello(session_id=self._session_id, radius_m=self.config.protocol.radius_m))
        finally:
            self._rotation_pending = False
        self.emit(IdsRotated(reason=reason))


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until every one has finished.

    A task that swallowed its cancellation is cancelled again (every ``CANCEL_AGAIN_S``):
    Python 3.11's ``asyncio.wait_for`` returns the result instead of raising CancelledError when
    the awaited operation completes in the same loop iteration as the cancellation (CPython
    gh-86296; a poll's answer arriving as the engine stops did it), and a single cancel then
    left :meth:`Engine.run` waiting forever for a poll loop that carried on.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)


def position_message(fix: GpsFix) -> Position:
    """The wire position for a fix (paper 3, step 2).

    An accuracy worse than the wire's ceiling (100 km, a receiver's nonsense estimate) is sent
    as that ceiling rather than making the broker refuse the position.
    """
    accuracy = fix.accuracy_m
    if accuracy is not None:
        accuracy = min(accuracy, MAX_ACCURACY_M)
    return Position(latitude=fix.latitude, longitude=fix.longitude, accuracy_m=accuracy)


def _contact(measures: ContactMeasures) -> Contact:
    """The event form of a contact's measures."""
    return Contact(duration_s=round(measures.duration_s, 3), closest_m=measures.closest_m,
                   median_m=measures.median_m, samples=measures.samples)


def plural_tokens(count: int) -> str:
    """``1 token``, ``2 tokens``."""
    return f"{count} token{'' if count == 1 else 's'}"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
