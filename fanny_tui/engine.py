"""The client engine: GPS source, broker link, aiortc peers and token store, behind events.

The engine imports no Textual. The Textual UI and ``--headless`` both run it and subscribe to
its :mod:`~fanny_tui.events`; commands are plain coroutine methods
(:meth:`Engine.declare_positive`, :meth:`Engine.stop`).

Lifecycle (paper section 3, step 1): a fresh session ID and contact ID (UUIDv4 from
``os.urandom``) are made when the engine is built and live only in this object's memory; they are
never written, logged or put in an event. Then :meth:`Engine.run` keeps these loops going until
:meth:`Engine.stop`:

* GPS: every fix or loss from the position source is emitted; a loss tells the broker at once
  (``position_lost``) so no stale position stays there;
* positions: the latest fix is sent every ``position_interval_s`` (and at once after a loss or a
  reconnection) — never a position without a real fix;
* broker link: ``match`` starts one witness exchange per peer (aiortc, data channel), whose SDP
  offer/answer goes through the broker, whose contact IDs never do;
* polling: every ``poll_interval_s`` the positive tokens are fetched on an anonymous connection
  and compared locally (paper 4, steps 3-4);
* uploads: pending positive declarations are retried with backoff until acknowledged, or until
  the broker refuses their declaration code (the tokens then stay, un-marked: ``positive_refused``);
* decoys (``[privacy] decoy_uploads``, off by default): a decoy upload, padded like a real one,
  on a fresh anonymous connection at exponentially distributed intervals of mean
  ``decoy_interval_s`` (cover traffic: nothing changes on the device);
* sweep: expired tokens are deleted (paper 3, step 6).

Storage failures (disk full, read-only data directory) never stop the engine: each is an
``error`` event, the failed write changed nothing, and the loops carry on (a witness exchange
that cannot store its token fails as ``store_failed`` with nothing stored on this side).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .config import Config
from .datadir import DataDirLock
from .events import (
    EngineError,
    Event,
    ExposureAlert,
    GpsFix,
    GpsLost,
    HandshakeFailed,
    HandshakeProgress,
    MatchFound,
    PositiveDeclared,
    PositivePending,
    PositiveRefused,
    PositivesPolled,
    SessionStarted,
    TokensExpired,
    TokenStored,
)
from .link import BrokerLink, backoff, ssl_context_for
from .positives import UploadOutcome, declare, poll_once, send_decoy, upload_pending
from .protocol.expiry import expiry_for
from .protocol.messages import Hello, Match, Position, PositionLost, Signal
from .protocol.tokens import new_id
from .store import Alert, StoredToken, StoreError, TokenStore

log = logging.getLogger(__name__)

MAX_CONCURRENT_HANDSHAKES = 8
SWEEP_INTERVAL_S = 60.0
CANCEL_AGAIN_S = 1.0
"""While stopping, a task still running this long after its cancellation is cancelled again."""
MAX_ACCURACY_M = 100_000.0
"""The largest ``accuracy_m`` the wire accepts (fanny_tui.protocol.messages.AccuracyM)."""


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
    role: str
    signaling: _PeerSignaling
    task: asyncio.Task[None] | None = None


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
        ConfigError: ``broker.ca_file`` is unusable (one line naming the key).
    """

    def __init__(self, config: Config, data_dir: Path, *, source: object | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        self._session_id = new_id(os.urandom(16))
        self._contact_id = new_id(os.urandom(16))
        self._source = source
        if ssl_context is None:
            ssl_context = ssl_context_for(config.broker)
        self._ssl = ssl_context
        self._subscribers: list[Callable[[Event], None]] = []
        self._store: TokenStore | None = None
        self._fix: GpsFix | None = None
        self._position_wakeup = asyncio.Event()
        self._upload_wakeup = asyncio.Event()
        self._poll_wakeup = asyncio.Event()
        self._stopped = asyncio.Event()
        self._exchanges: dict[str, _Exchange] = {}
        self._handshake_slots = asyncio.Semaphore(MAX_CONCURRENT_HANDSHAKES)
        self._next_ordinal = 1
        self._unrecorded_alerts: set[str] = set()  # matches the store could not record yet
        self._link = BrokerLink(
            config.broker.url,
            Hello(session_id=self._session_id, radius_m=config.protocol.radius_m),
            on_message=self._on_broker_message, on_event=self.emit,
            on_connected=self._position_wakeup.set,
            reconnect_min_s=config.broker.reconnect_min_s,
            reconnect_max_s=config.broker.reconnect_max_s, ssl_context=ssl_context)

    # -- observation ----------------------------------------------------------------------

    @property
    def session_short(self) -> str:
        """The first 8 characters of the session ID, for display on this device only."""
        return self._session_id[:8]

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

    async def declare_positive(self, code: str | None = None) -> int:
        """Declare positive (paper 4, steps 1-2; paper 5 for the code).

        Every token not already pending is marked for upload at once, with the code (in
        uploads of at most ``MAX_TOKENS_PER_UPLOAD`` tokens), and deleted only after the
        broker's ack; each upload is retried until then, even after a restart. If the broker
        refuses the code, that upload's tokens stay here, un-marked, ``positive_refused`` is
        emitted and the upload is not retried.

        Args:
            code: the declaration code as typed (``K7QF-3M9X-TR2B-8HJD``; case, spaces and
                hyphens do not matter); None for a broker with open declarations.

        Returns:
            The number of tokens in this declaration (0: nothing to upload).

        Raises:
            ValueError: the code is malformed (checked before anything changes).
            RuntimeError: the engine is not running.
            StoreError: the store could not be written (nothing changed).
        """
        if self._store is None:
            raise RuntimeError("the engine is not running")
        declaration = declare(self._store, code)
        if declaration.count == 0:
            self.emit(PositiveDeclared(count=0))
        self._upload_wakeup.set()
        return declaration.count

    async def poll_now(self) -> None:
        """Poll the positive tokens now instead of at the next interval."""
        self._poll_wakeup.set()

    async def stop(self) -> None:
        """Ask :meth:`run` to finish (idempotent)."""
        self._stopped.set()

    # -- main loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`stop`. Opens the store first.

        The data directory is locked for the whole run (:mod:`fanny_tui.datadir`), so that no
        other engine or ``fanny-tui declare-positive`` uses the same store meanwhile.

        Raises:
            DataDirBusy: another process holds the data directory (the message names both).
            StoreError: the token store cannot be opened.
        """
        lock = DataDirLock(self.data_dir)
        lock.acquire()
        try:
            self._store = TokenStore.in_dir(self.data_dir)
        except BaseException:
            lock.release()
            raise
        if self._source is None:
            from .gps import make_source
            self._source = make_source(self.config.gps)
        self.emit(SessionStarted())
        loops: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("gps", self._gps_loop), ("broker link", self._link.run),
            ("positions", self._position_loop), ("poll", self._poll_loop),
            ("uploads", self._upload_loop), ("sweep", self._sweep_loop)]
        if self.config.privacy.decoy_uploads:
            loops.append(("decoys", self._decoy_loop))
        tasks = [asyncio.create_task(self._guard(name, fn), name=f"fanny-{name}")
                 for name, fn in loops]
        try:
            await self._stopped.wait()
        finally:
            for exchange in list(self._exchanges.values()):
                if exchange.task is not None:
                    tasks.append(exchange.task)
            await _cancel_all(tasks)
            self._exchanges.clear()
            self._store.close()
            lock.release()

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

    # -- GPS and positions (paper 3, step 2) ----------------------------------------------

    async def _gps_loop(self) -> None:
        async for item in self._source.stream():  # type: ignore[union-attr]
            if isinstance(item, GpsFix):
                was_lost = self._fix is None
                self._fix = item
                self.emit(item)
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
            self._start_exchange(message.peer_session_id, message.role)
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

    def _start_exchange(self, peer_session_id: str, role: str) -> None:
        if peer_session_id in self._exchanges:
            return
        exchange = _Exchange(self._next_ordinal, role, _PeerSignaling(self, peer_session_id))
        self._next_ordinal += 1
        self._exchanges[peer_session_id] = exchange
        self.emit(MatchFound(peer=exchange.ordinal, role=role))
        exchange.task = asyncio.create_task(self._exchange(peer_session_id, exchange),
                                            name=f"fanny-witness-{exchange.ordinal}")

    async def _exchange(self, peer_session_id: str, exchange: _Exchange) -> None:
        from . import peer  # aiortc is heavy: imported when the first match comes

        protocol = self.config.protocol
        stored_expiry: list[datetime] = []
        store_errors: list[StoreError] = []

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

        def progress(state: str) -> None:
            self.emit(HandshakeProgress(peer=exchange.ordinal, state=state))

        try:
            async with self._handshake_slots:
                result = await peer.run_witness(
                    role=exchange.role, contact_id=self._contact_id,  # type: ignore[arg-type]
                    signaling=exchange.signaling, webrtc=self.config.webrtc,
                    store_token=store_token, timeout_s=protocol.handshake_timeout_s,
                    on_progress=progress)
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
        if isinstance(result, peer.HandshakeCompleted):
            expires_at = stored_expiry[-1] if stored_expiry else expiry_for(
                datetime.now(UTC), lifetime_days=protocol.token_lifetime_days,
                deletion_hour_utc=protocol.deletion_hour_utc)
            self.emit(HandshakeProgress(peer=exchange.ordinal, state="stored"))
            self.emit(TokenStored(peer=exchange.ordinal, token=result.token,
                                  expires_at=expires_at, new=result.new))
        else:
            self._finish_failed(exchange, result.reason)
            if result.reason.startswith("store_failed"):
                why = str(store_errors[-1]) if store_errors else result.reason
                self.emit(EngineError(message=f"a witness token could not be stored: {why}"))

    def _finish_failed(self, exchange: _Exchange, reason: str) -> None:
        self.emit(HandshakeProgress(peer=exchange.ordinal, state="failed"))
        self.emit(HandshakeFailed(peer=exchange.ordinal, reason=reason))

    # -- positives (paper 4) --------------------------------------------------------------

    async def _upload_loop(self) -> None:
        assert self._store is not None
        broker = self.config.broker
        retry_delays = backoff(broker.reconnect_min_s, broker.reconnect_max_s)
        delays = retry_delays()
        while True:
            if not self._store.pending_count():
                delays = retry_delays()
                # Woken by declare_positive(); the periodic look also picks up a declaration
                # made by `fanny-tui declare-positive` in another process on the same store.
                await self._sleep_or(self._upload_wakeup, self.config.protocol.poll_interval_s)
                continue
            try:
                await upload_pending(self._store, broker.url, ssl_context=self._ssl,
                                     on_outcome=self._upload_answered)
                continue
            except StoreError as exc:
                reason = str(exc)
                self.emit(EngineError(message=reason))
            except Exception as exc:  # broker down, dropped, rate limited: keep tokens, retry
                reason = _describe(exc)
            delay = next(delays)
            count = self._store.pending_count()
            if count:
                self.emit(PositivePending(count=count, reason=reason,
                                          retry_in_s=round(delay, 1)))
            await self._sleep_or(self._upload_wakeup, delay)

    def _upload_answered(self, outcome: UploadOutcome) -> None:
        if outcome.acknowledged:
            self.emit(PositiveDeclared(count=outcome.count))
        else:
            assert outcome.refused is not None
            self.emit(PositiveRefused(reason=outcome.refused, count=outcome.count,
                                      message=outcome.message))

    async def _decoy_loop(self) -> None:
        """Cover traffic: decoy uploads at exponentially distributed intervals (Poisson)."""
        rng = random.SystemRandom()
        rate = 1.0 / self.config.privacy.decoy_interval_s
        while True:
            await asyncio.sleep(rng.expovariate(rate))
            answered = await send_decoy(self.config.broker.url, ssl_context=self._ssl, rng=rng)
            log.debug("decoy upload %s", "answered" if answered else "not answered")

    async def _poll_loop(self) -> None:
        assert self._store is not None
        while True:
            try:
                result = await poll_once(
                    self._store, self.config.broker.url, ssl_context=self._ssl,
                    on_match=lambda count: self.emit(ExposureAlert(count=count)),
                    on_unrecorded_match=self._alert_unrecorded)
            except StoreError as exc:
                self.emit(EngineError(message=str(exc)))
            except Exception as exc:
                log.info("positives poll failed: %s", _describe(exc))
            else:
                self.emit(PositivesPolled(received=result.received))
            await self._sleep_or(self._poll_wakeup, self.config.protocol.poll_interval_s)

    def _alert_unrecorded(self, tokens: set[str]) -> None:
        """Alert on matches the store could not record (it cannot be written): once each."""
        new = tokens - self._unrecorded_alerts
        if new:
            self._unrecorded_alerts |= new
            self.emit(ExposureAlert(count=len(new)))

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


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
