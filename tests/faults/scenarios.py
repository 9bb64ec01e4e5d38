"""The fault scenarios of issue 3: real processes on loopback, killed or stopped on purpose.

Each scenario is a coroutine that takes a fresh work directory, injects one fault, asserts the
invariants (an :class:`AssertionError` names what broke) and returns its figures. The tests in
this package run each once; ``tools/reliability_report.py --runs N`` runs them N times and
prints the table quoted in docs/reliability.md.

1. :func:`broker_killed_mid_uploads`: ``fanny-broker serve`` is SIGKILLed at a random moment
   while several token stores upload positives concurrently through the real client code;
   after a restart on the same port and database every acknowledged token is on the board,
   every unacknowledged upload is still pending on its device and, retried, ends on the board.
2. :func:`broker_restarted`: two ``fanny-tui --headless`` devices; the broker is stopped
   (SIGTERM or SIGKILL) and restarted on the same port: both report the outage, reconnect,
   send positions again, match again and poll again (a positive uploaded after the restart
   reaches both as an exposure alert). Measures the time to recover.
3. :func:`gpsd_interrupted`: a device reading a real gpsd (gpsfake) next to a broker that
   records every frame; gpsd is killed (or frozen): the device reports the loss, the broker
   gets ``position_lost`` and no position until gpsd is back; then fixes and positions resume.
4. :func:`peer_vanishes_mid_handshake`: one ``fanny-tui --headless`` process is SIGKILLed or
   SIGSTOPped in the middle of a witness handshake: the other fails it within its
   ``handshake_timeout_s``, stores nothing half-way, and the pair (or a new peer) matches again
   and both store the token. :func:`peer_killed_at_random` kills the peer at a random moment of
   a live handshake instead and checks that every outcome leaves consistent stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.server import BrokerSettings, start_broker
from fanny_tui.config import parse_config
from fanny_tui.events import Event
from fanny_tui.peer import LINGER_S
from fanny_tui.positives import declare, upload_pending
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.protocol.proximity import haversine_m
from fanny_tui.protocol.tokens import is_token
from fanny_tui.store import TokenStore
from tests.gpsfake import GpsFake
from tests.helpers import LAT, METRE_LAT, free_port, running_device

from .procs import (
    BIN,
    CHILD_ENV,
    BrokerProcess,
    HeadlessDevice,
    Processes,
    board_tokens,
    board_upload_ids,
    event_time,
    tokens_json,
    wait_healthz,
    write_device_config,
)

NMEA = Path(__file__).resolve().parents[1] / "data" / "nmea"
GPS_LOG = "bu353s4.log"
"""A clean 3D fix from a real receiver (gpsd's regression log, see tests/data/nmea/README.md)."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _declare_positive_cli(config: Path, data_dir: Path, timeout_s: float = 30.0) -> str:
    """``fanny-tui declare-positive``; returns its stdout. Fails the scenario on a non-zero exit."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "fanny-tui"), "declare-positive", "--config", str(config), "--data-dir",
        str(data_dir), "--timeout", str(timeout_s), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=CHILD_ENV)
    out, err = await asyncio.wait_for(process.communicate(), timeout_s + 30)
    assert process.returncode == 0, (f"fanny-tui declare-positive exited {process.returncode}: "
                                     f"{err.decode(errors='replace')}")
    return out.decode()


def _check_complete(token: dict[str, Any]) -> None:
    """A token listed by ``fanny-tui tokens --json`` is whole: 64 hex, expiry on 04:00 UTC."""
    assert is_token(token["token"]), token
    assert token["expires_at"].endswith("T04:00:00Z"), token
    assert token["pending_upload"] is False, token


# -- 1. broker SIGKILLed in the middle of a stream of positive uploads ----------------------


@dataclass
class UploadKillFigures:
    """What one broker SIGKILL during concurrent positive uploads did.

    Attributes:
        seed: the random seed (kill moment).
        kill_after_s: seconds after the first acknowledgement when the broker was killed.
        uploads_acked: uploads the devices saw acknowledged before the kill.
        tokens_acked: their tokens.
        uploads_unacked: uploads on their way at the kill, left pending on their devices.
        uploads_in_doubt: of those, the ones the broker had committed (its ack died with it).
        acked_tokens_lost: acknowledged tokens missing from the board after restart (must be 0).
        tokens_total: every token the devices made.
        tokens_on_board: tokens on the board once the pending uploads were retried.
    """

    seed: int
    kill_after_s: float
    uploads_acked: int
    tokens_acked: int
    uploads_unacked: int
    uploads_in_doubt: int
    acked_tokens_lost: int
    tokens_total: int
    tokens_on_board: int


@dataclass
class _Uploader:
    """One device's token store streaming positive uploads through the real client code."""

    store: TokenStore
    created: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    acked_uploads: set[str] = field(default_factory=set)
    failure: str | None = None

    def _new_declaration(self, count: int) -> None:
        expires = expiry_for(datetime.now(UTC))
        for _ in range(count):
            token = os.urandom(32).hex()
            self.store.add(token, expires)
            self.created.add(token)
        declare(self.store)

    def _settle(self, before: dict[str, set[str]]) -> None:
        """Record the uploads of ``before`` that the device saw acknowledged.

        The client deletes an upload's tokens only once it received the broker's ack (privacy
        invariant 6), so an upload whose tokens left the store is one whose ack the client saw.
        """
        held = {t.token for t in self.store.tokens()}
        still_pending = self.store.pending_uploads()
        for upload_id, tokens in before.items():
            if upload_id in still_pending:
                continue
            assert not tokens & held, "an upload was refused (its tokens are back, unmarked)"
            self.acked |= tokens
            self.acked_uploads.add(upload_id)

    async def stream(self, url: str, tokens_per_upload: int, stop: asyncio.Event,
                     first_ack: asyncio.Event) -> None:
        """Declare and upload, again and again, until ``stop`` or the first failed upload."""
        while not stop.is_set():
            await asyncio.to_thread(self._new_declaration, tokens_per_upload)
            before = {upload_id: {t.token for t in tokens}
                      for upload_id, tokens in self.store.pending_uploads().items()}
            try:
                await upload_pending(self.store, url, timeout_s=10.0)
            except Exception as exc:  # the broker died: the upload stays pending here
                self.failure = _describe(exc)
                self._settle(before)
                return
            self._settle(before)
            first_ack.set()


async def broker_killed_mid_uploads(workdir: Path, *, seed: int, devices: int = 4,
                                    tokens_per_upload: int = 20,
                                    max_kill_after_s: float = 1.0) -> UploadKillFigures:
    """Scenario 1: SIGKILL the broker at a random moment of a stream of positive uploads.

    ``devices`` token stores (real :class:`~fanny_tui.store.TokenStore` files) each declare
    ``tokens_per_upload`` fresh tokens and upload them (``declare`` + ``upload_pending``),
    again and again, concurrently, each upload on its own anonymous connection. Between 0 and
    ``max_kill_after_s`` seconds (seeded) after the first ack the broker gets SIGKILL; it is
    restarted on the same port and database. Then:

    * every token whose upload the devices saw acknowledged is on the board (read-only SQLite);
    * every other token is still on its device, marked pending; none vanished;
    * the pending uploads are retried (device 0 with ``fanny-tui declare-positive``, the others
      with ``upload_pending``), acknowledged, and the board holds every token exactly once.

    Raises:
        AssertionError: an invariant broke (the message names it).
    """
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    db = workdir / "board.sqlite3"
    uploaders = [_Uploader(TokenStore.in_dir(workdir / f"device{i}")) for i in range(devices)]
    try:
        async with Processes() as procs:
            broker = procs.add(BrokerProcess(port, db, workdir / "broker-1.log"))
            await broker.start()
            stop, first_ack = asyncio.Event(), asyncio.Event()
            tasks = [asyncio.create_task(u.stream(broker.url, tokens_per_upload, stop, first_ack))
                     for u in uploaders]
            try:
                waiter = asyncio.create_task(first_ack.wait())
                await asyncio.wait([waiter, *tasks], timeout=30,
                                   return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if not first_ack.is_set():
                    for task in tasks:
                        if task.done() and task.exception() is not None:
                            raise task.exception()  # type: ignore[misc]
                    raise AssertionError(f"no upload was acknowledged: "
                                         f"{[u.failure for u in uploaders]}")
                kill_after_s = rng.uniform(0.0, max_kill_after_s)
                await asyncio.sleep(kill_after_s)
                assert await broker.signal(signal.SIGKILL) == -signal.SIGKILL
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
            finally:
                stop.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            acked = set().union(*(u.acked for u in uploaders))
            pending = {uid: {t.token for t in tokens}
                       for u in uploaders for uid, tokens in u.store.pending_uploads().items()}
            # Nothing vanished from a device: what it did not see acked is still there, pending.
            for i, u in enumerate(uploaders):
                held = u.store.tokens()
                assert all(t.pending for t in held), f"device {i} holds a non-pending token"
                held_set = {t.token for t in held}
                assert not held_set & u.acked, f"device {i} kept an acknowledged token"
                assert held_set | u.acked == u.created, (
                    f"device {i} lost {len(u.created - held_set - u.acked)} unacknowledged "
                    f"tokens")

            restarted = procs.add(BrokerProcess(port, db, workdir / "broker-2.log"))
            await restarted.start()
            on_board = board_tokens(db)
            lost = acked - on_board
            assert not lost, f"acked tokens lost: {len(lost)} of {len(acked)}"
            committed = board_upload_ids(db)
            in_doubt = [uid for uid in pending if uid in committed]
            for uid in in_doubt:
                assert pending[uid] <= on_board, "a committed upload is only partly on the board"
            for uid in pending:
                if uid not in committed:
                    assert not pending[uid] & on_board, "an uncommitted upload is partly stored"

            # Retry: device 0 as a tester would (the CLI, after its process restarted), the
            # others through the engine's own retry path (upload_pending).
            uploaders[0].store.close()
            config = write_device_config(workdir / "device0.toml", port=port)
            await _declare_positive_cli(config, workdir / "device0")
            uploaders[0].store = TokenStore.in_dir(workdir / "device0")
            for u in uploaders[1:]:
                await upload_pending(u.store, restarted.url, timeout_s=10.0)
            for i, u in enumerate(uploaders):
                assert u.store.count() == 0, f"device {i} still holds tokens after the retry"
            created = set().union(*(u.created for u in uploaders))
            final = board_tokens(db)
            assert created <= final, f"{len(created - final)} tokens never reached the board"
            assert final == created, "the board holds tokens nobody uploaded"
            assert await restarted.signal(signal.SIGTERM) == 0, restarted.log()
    finally:
        for u in uploaders:
            u.store.close()
    return UploadKillFigures(
        seed=seed, kill_after_s=round(kill_after_s, 3),
        uploads_acked=sum(len(u.acked_uploads) for u in uploaders), tokens_acked=len(acked),
        uploads_unacked=len(pending), uploads_in_doubt=len(in_doubt),
        acked_tokens_lost=len(lost), tokens_total=len(created), tokens_on_board=len(final))


# -- 2. broker restarted under two running devices ----------------------------------------


@dataclass
class RestartFigures:
    """One broker restart under two ``fanny-tui --headless`` devices.

    Attributes:
        signal: how the broker was stopped (``SIGTERM`` or ``SIGKILL``).
        outage_s: seconds between the broker's end and its restart.
        recovery_s: per device, seconds from the restarted broker listening to the device's
            ``broker_connected``.
        exposure_after_s: seconds from the positive upload (after the restart) to the later of
            the two ``exposure_alert`` events.
    """

    signal: str
    outage_s: float
    recovery_s: list[float]
    exposure_after_s: float


async def broker_restarted(workdir: Path, *, stop_signal: int = signal.SIGTERM,
                           outage_s: float = 2.0) -> RestartFigures:
    """Scenario 2: stop the broker under two witnessing devices, restart it on the same port.

    Devices reconnect with backoff 0.2-1.0 s, send positions every 0.3 s and poll every 0.5 s.

    Raises:
        AssertionError: an invariant broke (the message names it).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    db = workdir / "board.sqlite3"
    async with Processes() as procs:
        broker = procs.add(BrokerProcess(port, db, workdir / "broker-1.log"))
        await broker.start()
        devices = [procs.device(workdir, name, port=port, latitude=latitude, poll_interval_s=0.5)
                   for name, latitude in (("a", LAT), ("b", LAT + 2 * METRE_LAT))]
        for device in devices:
            await device.start()
        stored = [(await d.wait_for("token_stored"))[1] for d in devices]
        token = stored[0]["token"]
        assert stored[1]["token"] == token, "the two devices stored different tokens"

        # The fault.
        connected_at = [len(d.events) for d in devices]
        code = await broker.signal(stop_signal)
        ended_at = time.time()
        assert code == (0 if stop_signal == signal.SIGTERM else -stop_signal), broker.log()
        down = [(await d.wait_for("broker_disconnected", after=i, timeout_s=20))[0]
                for d, i in zip(devices, connected_at, strict=True)]
        await asyncio.sleep(max(0.0, ended_at + outage_s - time.time()))
        for device in devices:
            assert device.process is not None and device.process.returncode is None, (
                f"{device.name} died during the outage: {device.log()}")

        # Back on the same port and database.
        restarted = procs.add(BrokerProcess(port, db, workdir / "broker-2.log"))
        back_at = await restarted.start()
        recovery, up = [], []
        for device, index in zip(devices, down, strict=True):
            at, event = await device.wait_for("broker_connected", after=index, timeout_s=30)
            up.append(at)
            recovery.append(max(0.0, event_time(event) - back_at))
        # Positions resume: the new broker holds both (it learnt them after the restart).
        await wait_healthz(port, lambda h: h["sessions"] == 2 and h["positions"] == 2)
        # ... and their contact, peer to peer, lived through the outage (data channel v2: the
        # channel stays open while the pair is in contact): positions still flow between them,
        # the contact never closed, and the new broker's match of the same pair starts no
        # second exchange while it is open.
        for device, index in zip(devices, up, strict=True):
            await device.wait_for("peer_update", after=index)
            assert "contact_closed" not in device.names(), device.names()
            assert device.names().count("token_stored") == 1

        # Polling resumes: a positive declared after the restart reaches both devices.
        before = [len(d.events) for d in devices]
        uploader = workdir / "positive"
        store = TokenStore.in_dir(uploader)
        store.add(token, datetime.fromisoformat(stored[0]["expires_at"]))
        store.close()
        declared_at = time.time()
        out = await _declare_positive_cli(write_device_config(workdir / "positive.toml",
                                                              port=port), uploader)
        assert "1 token acknowledged" in out, out
        alerts = [(await d.wait_for("exposure_alert", after=i, timeout_s=20))[1]
                  for d, i in zip(devices, before, strict=True)]
        assert all(a["count"] == 1 for a in alerts), alerts
        exposure_after_s = max(event_time(a) for a in alerts) - declared_at
        for device in devices:
            assert await tokens_json(device.data_dir) == [], "the exposed token was kept"

        for device in devices:
            assert await device.stop() == 0, device.log()
            assert "Traceback" not in device.log(), device.log()
        assert await restarted.signal(signal.SIGTERM) == 0, restarted.log()
    return RestartFigures(signal=signal.Signals(stop_signal).name, outage_s=outage_s,
                          recovery_s=[round(r, 3) for r in recovery],
                          exposure_after_s=round(exposure_after_s, 3))


# -- 3. gpsd stopped and restarted --------------------------------------------------------


def chk_positions(log: str) -> list[tuple[float, float]]:
    """The positions gpsd itself reports for ``log`` (its ``.chk``: TPVs with mode >= 2)."""
    points = []
    for line in (NMEA / f"{log}.chk").read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            obj = json.loads(line)
            if (obj.get("class") == "TPV" and obj.get("mode", 0) >= 2 and "lat" in obj
                    and "lon" in obj):
                points.append((obj["lat"], obj["lon"]))
    return points


@dataclass
class GpsFigures:
    """One gpsd interruption under a device.

    Attributes:
        fault: ``killed`` (gpsfake's process group SIGKILLed, restarted on the same port) or
            ``frozen`` (the group SIGSTOPped, then SIGCONT).
        lost_after_s: seconds from the fault to the device's ``gps_lost``.
        outage_s: seconds from ``gps_lost`` to gpsd being back.
        positions_while_lost: positions the broker received after the ``position_lost`` that
            followed ``gps_lost`` and before the next ``gps_fix`` (must be 0).
        fix_after_s: seconds from gpsd being back to the device's next ``gps_fix``.
    """

    fault: str
    lost_after_s: float
    outage_s: float
    positions_while_lost: int
    fix_after_s: float


async def gpsd_interrupted(workdir: Path, *, fault: str = "killed", outage_s: float = 2.0,
                           stale_after_s: float = 1.5) -> GpsFigures:
    """Scenario 3: gpsd goes away under a device on ``[gps] source = "gpsd"``, then comes back.

    A broker (in this process) records every frame it receives and the device's events go to
    the same timeline, so their order is exact. The device is built from its configuration
    (``source = "gpsd"``, ``stale_after_s``), as ``fanny-tui`` builds it.

    Raises:
        AssertionError: an invariant broke (the message names it).
        ValueError: an unknown ``fault``.
    """
    if fault not in ("killed", "frozen"):
        raise ValueError(f"fault: expected 'killed' or 'frozen', got {fault!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    expected = chk_positions(GPS_LOG)
    timeline: list[tuple[str, str, Any]] = []  # ("frame", type, message) / ("event", name, ev)

    def record(kind: str, raw: str) -> None:
        message = json.loads(raw)
        timeline.append(("frame", message.get("type", "?"), message))

    def on_event(event: Event) -> None:
        timeline.append(("event", event.event, event))

    async def first(kind: str, name: str, after: int, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        index = after
        while True:
            while index < len(timeline):
                if timeline[index][:2] == (kind, name):
                    return index
                index += 1
            if time.monotonic() > deadline:
                seen = [entry[1] for entry in timeline[after:]]
                raise AssertionError(f"no {kind} {name} within {timeout_s} s; saw {seen}")
            await asyncio.sleep(0.02)

    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=workdir / "board.sqlite3")
    fake = GpsFake(NMEA / GPS_LOG, cycle=0.05)
    async with start_broker(settings, recorder=record) as broker:
        fake.start()
        try:
            config = parse_config({
                "broker": {"url": broker.url, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
                "gps": {"source": "gpsd", "host": "127.0.0.1", "port": fake.port,
                        "stale_after_s": stale_after_s},
                "protocol": {"position_interval_s": 0.2},
                "webrtc": {"host_addresses": ["127.0.0.1"]},
            })
            async with running_device(config, workdir / "device", None) as device:
                device.engine.subscribe(on_event)
                await device.wait_event("gps_fix", timeout=30)
                await first("frame", "position", 0)

                # The fault: gpsfake and its gpsd, the whole process group.
                assert fake.process is not None
                group = fake.process.pid
                fault_index, fault_at = len(timeline), time.monotonic()
                os.killpg(group, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
                lost = await first("event", "gps_lost", fault_index, timeout_s=30)
                lost_at = time.monotonic()
                dropped = await first("frame", "position_lost", lost, timeout_s=10)
                assert broker.counts()["positions"] == 0, "the broker kept the stale position"
                await asyncio.sleep(outage_s)

                # gpsd back: on the same port, or continued.
                back_index = len(timeline)
                if fault == "killed":
                    fake.stop()  # reaps the dead group, removes gpsd's shared memory
                    fake = GpsFake(NMEA / GPS_LOG, port=config.gps.port, cycle=0.05)
                    fake.start()
                else:
                    os.killpg(group, signal.SIGCONT)
                back_at = time.monotonic()
                fixed = await first("event", "gps_fix", back_index, timeout_s=60)
                fixed_at = time.monotonic()
                resumed = await first("frame", "position", fixed, timeout_s=10)
        finally:
            if fake.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(fake.process.pid, signal.SIGCONT)
            fake.stop()

    # Frames sent before the loss may still be on their way when gps_lost is emitted; TCP keeps
    # their order, so none may come after position_lost (sent right after gps_lost).
    while_lost = [entry for entry in timeline[dropped:fixed] if entry[:2] == ("frame", "position")]
    assert not while_lost, f"{len(while_lost)} positions reached the broker while the fix was lost"
    assert not [e for e in timeline[lost:fixed] if e[:2] == ("event", "gps_fix")]
    message = timeline[resumed][2]
    point = (message["latitude"], message["longitude"])
    assert min(haversine_m(*point, *p) for p in expected) < 0.5, (
        f"the resumed position {point} is not one of the receiver's")
    return GpsFigures(fault=fault, lost_after_s=round(lost_at - fault_at, 3),
                      outage_s=round(back_at - lost_at, 3), positions_while_lost=len(while_lost),
                      fix_after_s=round(fixed_at - back_at, 3))


# -- 4. a peer that vanishes mid-handshake ------------------------------------------------


@dataclass
class PeerFigures:
    """One peer vanishing in the middle of a witness handshake.

    Attributes:
        fault: ``SIGKILL`` or ``SIGSTOP``.
        victim_role: the vanished device's role (``initiator`` sends the offer).
        survivor_reason: the survivor's ``handshake_failed`` reason.
        failed_after_s: seconds from the survivor's ``handshake connecting`` to its
            ``handshake_failed`` (its own clock).
        rematched_after_s: seconds from the failure to both devices holding the same token
            again (a new peer for SIGKILL, the same pair after the cooldown for SIGSTOP).
    """

    fault: str
    victim_role: str
    survivor_reason: str
    failed_after_s: float
    rematched_after_s: float


HANDSHAKE_TIMEOUT_S = 2.0
"""The devices' ``handshake_timeout_s`` in scenario 4 (seconds)."""

DEADLINE_MARGIN_S = 3.0
"""How much later than ``handshake_timeout_s`` the failure may be reported (closing aiortc)."""


async def peer_vanishes_mid_handshake(workdir: Path, *, fault: int = signal.SIGKILL,
                                      after_connecting_s: float = 0.3) -> PeerFigures:
    """Scenario 4: a peer is killed or frozen in the middle of a witness handshake.

    Deterministic order: the survivor connects and reports its position, then is frozen
    (SIGSTOP) so that the handshake cannot progress without it. The victim starts next to it,
    gets the match and starts the handshake (``handshake connecting``; an initiator has sent its
    offer ``after_connecting_s`` later); it is then killed or frozen, and only then is the
    survivor continued: it processes the match, talks to a peer that is gone, and must fail
    with ``timeout`` or ``channel_closed`` within ``handshake_timeout_s`` + a margin, holding
    no token. Both stores stay readable and consistent. Then the pair matches again: a new
    device process for SIGKILL, the same victim continued for SIGSTOP (after the broker's
    cooldown), and both store the same token.

    Raises:
        AssertionError: an invariant broke (the message names it).
    """
    if fault not in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError("fault: expected signal.SIGKILL or signal.SIGSTOP")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cooldown_s = HANDSHAKE_TIMEOUT_S + after_connecting_s + 4.0
    async with Processes() as procs:
        broker = procs.add(BrokerProcess(port, workdir / "board.sqlite3", workdir / "broker.log",
                                         cooldown_s=cooldown_s, position_timeout_s=60.0))
        await broker.start()

        def device(name: str, latitude: float) -> HeadlessDevice:
            return procs.device(workdir, name, port=port, latitude=latitude,
                                handshake_timeout_s=HANDSHAKE_TIMEOUT_S)

        survivor = await device("survivor", LAT).start()
        await survivor.wait_for("broker_connected")
        await wait_healthz(port, lambda h: h["positions"] == 1)
        survivor.send_signal(signal.SIGSTOP)

        victim = await device("victim", LAT + 2 * METRE_LAT).start()
        _, match = await victim.wait_for("match")
        await victim.wait_for("handshake", where=lambda e: e["state"] == "connecting")
        await asyncio.sleep(after_connecting_s)
        if fault == signal.SIGKILL:
            assert await victim.kill() == -signal.SIGKILL
        else:
            victim.send_signal(signal.SIGSTOP)

        survivor.send_signal(signal.SIGCONT)
        _, connecting = await survivor.wait_for(
            "handshake", where=lambda e: e["state"] == "connecting", timeout_s=30)
        index, failed = await survivor.wait_for(
            "handshake_failed", timeout_s=HANDSHAKE_TIMEOUT_S + DEADLINE_MARGIN_S + 10)
        failed_after_s = event_time(failed) - event_time(connecting)
        assert failed["reason"] in ("timeout", "channel_closed"), failed
        assert failed_after_s <= HANDSHAKE_TIMEOUT_S + DEADLINE_MARGIN_S, (
            f"the handshake failed {failed_after_s:.1f} s after it started, beyond "
            f"handshake_timeout_s {HANDSHAKE_TIMEOUT_S} s + {DEADLINE_MARGIN_S} s")
        assert "token_stored" not in survivor.names(), "the survivor stored a token"
        assert await tokens_json(survivor.data_dir) == [], "the failed handshake left a token"

        if fault == signal.SIGKILL:
            # The killed device's store is still a valid, empty store.
            assert await tokens_json(victim.data_dir) == []
            peer = await device("newcomer", LAT + 2 * METRE_LAT).start()
        else:
            victim.send_signal(signal.SIGCONT)
            # Its own exchange ran out while it was stopped: it fails too, storing nothing.
            await victim.wait_for("handshake_failed", timeout_s=HANDSHAKE_TIMEOUT_S + 10)
            assert "token_stored" not in victim.names()
            assert await tokens_json(victim.data_dir) == []
            peer = victim
        failed_at = event_time(failed)
        _, mine = await survivor.wait_for("token_stored", after=index, timeout_s=3 * cooldown_s)
        _, theirs = await peer.wait_for("token_stored", timeout_s=3 * cooldown_s)
        assert mine["token"] == theirs["token"], "the pair stored different tokens"
        rematched_after_s = max(event_time(mine), event_time(theirs)) - failed_at
        for holder in (survivor, peer):
            listed = await tokens_json(holder.data_dir)
            assert [t["token"] for t in listed] == [mine["token"]], listed
            _check_complete(listed[0])
        for holder in (survivor, peer):
            assert await holder.stop() == 0, holder.log()
            assert "Traceback" not in holder.log(), holder.log()
        assert await broker.signal(signal.SIGTERM) == 0, broker.log()
    return PeerFigures(fault=signal.Signals(fault).name, victim_role=match["role"],
                       survivor_reason=failed["reason"], failed_after_s=round(failed_after_s, 3),
                       rematched_after_s=round(rematched_after_s, 3))


@dataclass
class RaceFigures:
    """One peer SIGKILLed at a random moment of a live handshake (no process frozen).

    Attributes:
        seed: the random seed (kill moment).
        kill_after_s: seconds after the victim's ``handshake connecting`` when it was killed.
        victim_state: the last handshake state the victim printed before it died
            (``connecting``, ``exchanging``, ``stored``).
        survivor_outcome: ``stored`` or ``failed: <reason>``.
        victim_tokens: tokens left in the killed victim's store (0 or 1, each complete).
    """

    seed: int
    kill_after_s: float
    victim_state: str
    survivor_outcome: str
    victim_tokens: int


async def peer_killed_at_random(workdir: Path, *, seed: int,
                                max_kill_after_s: float = 0.12) -> RaceFigures:
    """Scenario 4, racing variant: SIGKILL a peer at a random moment of a running handshake.

    Nothing is frozen, so the kill lands anywhere from before the offer to after the token
    (seeded, between 0 and ``max_kill_after_s`` seconds after the victim's ``handshake
    connecting``; on loopback the data channel opens ~0.05-0.15 s after it and the token is
    stored ~0.02 s later). The
    outcome varies; the invariants do not: the survivor ends its exchange within
    ``handshake_timeout_s`` + a margin, a failed exchange left no token, every stored token is
    complete, two stored tokens are the same token, and the survivor then witnesses a new
    device normally.

    Raises:
        AssertionError: an invariant broke (the message names it).
    """
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    async with Processes() as procs:
        broker = procs.add(BrokerProcess(port, workdir / "board.sqlite3", workdir / "broker.log"))
        await broker.start()

        def device(name: str, latitude: float) -> HeadlessDevice:
            return procs.device(workdir, name, port=port, latitude=latitude,
                                handshake_timeout_s=HANDSHAKE_TIMEOUT_S)

        survivor = await device("survivor", LAT).start()
        await survivor.wait_for("broker_connected")
        await wait_healthz(port, lambda h: h["positions"] == 1)
        victim = await device("victim", LAT + 2 * METRE_LAT).start()
        await victim.wait_for("handshake", where=lambda e: e["state"] == "connecting")
        kill_after_s = rng.uniform(0.0, max_kill_after_s)
        await asyncio.sleep(kill_after_s)
        assert await victim.kill() == -signal.SIGKILL
        await victim.output_ended()
        states = [e["state"] for e in victim.events if e["event"] == "handshake"]
        victim_state = states[-1]

        _, connecting = await survivor.wait_for(
            "handshake", where=lambda e: e["state"] == "connecting" and e["peer"] == 1)
        end_index, end = await survivor.wait_for(
            "handshake", where=lambda e: e["peer"] == 1 and e["state"] in ("stored", "failed"),
            timeout_s=HANDSHAKE_TIMEOUT_S + DEADLINE_MARGIN_S + 10)
        took = event_time(end) - event_time(connecting)
        assert took <= HANDSHAKE_TIMEOUT_S + DEADLINE_MARGIN_S + LINGER_S, (
            f"the survivor's exchange ended {took:.1f} s after it started")
        mine = await tokens_json(survivor.data_dir)
        theirs = await tokens_json(victim.data_dir)
        for token in mine + theirs:
            _check_complete(token)
        if end["state"] == "failed":
            _, failed = await survivor.wait_for("handshake_failed", where=lambda e: e["peer"] == 1)
            outcome = f"failed: {failed['reason']}"
            assert mine == [], "a failed exchange left a token on the survivor"
        else:
            outcome = "stored"
            assert len(mine) == 1, mine
        assert len(theirs) <= 1, theirs
        if mine and theirs:
            assert mine[0]["token"] == theirs[0]["token"], "the pair stored different tokens"

        newcomer = await device("newcomer", LAT + 2 * METRE_LAT).start()
        _, a = await survivor.wait_for("token_stored", after=end_index,
                                       where=lambda e: e["peer"] == 2)
        _, b = await newcomer.wait_for("token_stored")
        assert a["token"] == b["token"], "the survivor and the newcomer stored different tokens"
        for holder in (survivor, newcomer):
            assert await holder.stop() == 0, holder.log()
            assert "Traceback" not in holder.log(), holder.log()
        assert await broker.signal(signal.SIGTERM) == 0, broker.log()
    return RaceFigures(seed=seed, kill_after_s=round(kill_after_s, 3), victim_state=victim_state,
                       survivor_outcome=outcome, victim_tokens=len(theirs))
