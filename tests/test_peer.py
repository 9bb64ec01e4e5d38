"""Tests for fanny_tui.peer: real aiortc peers over loopback (127.0.0.1 only), no mocks.

Two peers run in one process; the broker is replaced by an in-memory queue pair that records
every SDP it carries. Misbehaving peers are real aiortc peers driven by the test (``RawPeer``).
Stores are dicts behind ``store_token``. Relay-only ICE goes through a real coturn on a free
loopback port (``tests/turn.py``, Debian ``coturn``), one server for this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fanny_tui.config import IceServer, WebRtcConfig
from fanny_tui.peer import (
    CHANNEL_LABEL,
    FLUSH_S,
    LINGER_S,
    candidates_outside,
    drop_hostname_candidates,
    hostname_candidates,
    install_host_address_filter,
    restrict_host_addresses,
    run_witness,
)
from fanny_tui.protocol.contact import ContactSettings, Fix
from fanny_tui.protocol.handshake import (
    ContactEnded,
    Established,
    HandshakeCompleted,
    HandshakeFailed,
    PeerSample,
)
from fanny_tui.protocol.messages import (
    DATA_CHANNEL_VERSION,
    Abort,
    Heartbeat,
    PeerHello,
    PeerPosition,
    TokenOffer,
    decode_peer_message,
    encode,
)
from fanny_tui.protocol.tokens import craft_token, new_id
from tests.helpers import TIME_UNIT
from tests.turn import TurnServer

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = WebRtcConfig(host_addresses=("127.0.0.1",))
TIMEOUT_S = 10.0  # generous for a loaded CI machine; loopback exchanges take ~0.1 s
SHORT_TIMEOUT_S = 2.0
GONE_TIMEOUT_S = 1.0  # for a side whose peer is known to have given up already
QUICK = ContactSettings(contact_gap_s=0.3 * TIME_UNIT, position_interval_s=0.1,
                        token_timeout_s=TIMEOUT_S)
"""No fixes in these tests: the contact ends as ``parted`` ``contact_gap_s`` after the hellos."""


def witness(**kwargs: Any) -> Any:
    """run_witness with the QUICK contact settings unless the test gives its own."""
    kwargs.setdefault("contact", QUICK)
    return run_witness(**kwargs)


def hello(contact_id: str, **fields: Any) -> PeerHello:
    values: dict[str, Any] = {"version": DATA_CHANNEL_VERSION, "contact_id": contact_id,
                              "min_contact_s": 0.0, "radius_m": 10.0}
    values.update(fields)
    return PeerHello(**values)


def fresh_id() -> str:
    return new_id(os.urandom(16))


@pytest.fixture(scope="module")
def turn() -> Any:
    """One real coturn for the module, on a free loopback port; stopped (group killed) after."""
    with TurnServer() as server:
        yield server


def relay_config(turn: TurnServer, *, password: str | None = None) -> WebRtcConfig:
    """Relay-only ICE through ``turn``, as a tester would configure it (no host_addresses)."""
    server = turn.ice_server() if password is None else turn.ice_server(password=password)
    return WebRtcConfig(ice_servers=(server,), ice_transport_policy="relay")


class QueueSignaling:
    """One end of an in-memory broker: what it sends lands in the other end's inbox."""

    def __init__(self, inbox: asyncio.Queue[tuple[str, str]],
                 outbox: asyncio.Queue[tuple[str, str]], log: list[tuple[str, str]]) -> None:
        self.inbox, self.outbox, self.log = inbox, outbox, log

    async def send(self, sdp_type: str, sdp: str) -> None:
        self.log.append((sdp_type, sdp))
        await self.outbox.put((sdp_type, sdp))

    async def receive(self) -> tuple[str, str]:
        return await self.inbox.get()


class RewritingSignaling(QueueSignaling):
    """A QueueSignaling whose outgoing SDP is rewritten first, as a hostile peer would send it."""

    def __init__(self, inner: QueueSignaling, rewrite: Callable[[str], str]) -> None:
        super().__init__(inner.inbox, inner.outbox, inner.log)
        self.rewrite = rewrite

    async def send(self, sdp_type: str, sdp: str) -> None:
        await super().send(sdp_type, self.rewrite(sdp))


def signaling_pair() -> tuple[QueueSignaling, QueueSignaling, list[tuple[str, str]]]:
    a: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    b: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    log: list[tuple[str, str]] = []
    return QueueSignaling(a, b, log), QueueSignaling(b, a, log), log


class DictStore:
    """A token store in a dict; ``fail`` makes the next calls raise like a full disk."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.tokens: dict[str, int] = {}
        self.calls = 0
        self.fail = fail

    def __call__(self, token: str) -> bool:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        new = token not in self.tokens
        self.tokens[token] = self.tokens.get(token, 0) + 1
        return new


class RawPeer:
    """A real aiortc peer that the test drives by hand, to play a misbehaving device."""

    def __init__(self) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection

        install_host_address_filter()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel: Any = None
        self.opened = asyncio.Event()
        self.received: asyncio.Queue[str | bytes] = asyncio.Queue()

    def _attach(self, channel: Any) -> None:
        self.channel = channel
        channel.on("message", self.received.put_nowait)
        if channel.readyState == "open":
            self.opened.set()
        channel.on("open", self.opened.set)

    async def _set_local(self, description: Any) -> str:
        with restrict_host_addresses(("127.0.0.1",)):
            await self.pc.setLocalDescription(description)
        return str(self.pc.localDescription.sdp)

    async def answer(self, signaling: QueueSignaling) -> None:
        """Play the responder up to the open channel."""
        from aiortc import RTCSessionDescription

        self.pc.on("datachannel", self._attach)
        sdp_type, sdp = await signaling.receive()
        assert sdp_type == "offer"
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await signaling.send("answer", await self._set_local(await self.pc.createAnswer()))

    async def offer(self, signaling: QueueSignaling) -> None:
        """Play the initiator up to the remote answer (the channel opens shortly after)."""
        from aiortc import RTCSessionDescription

        self._attach(self.pc.createDataChannel(CHANNEL_LABEL))
        await signaling.send("offer", await self._set_local(await self.pc.createOffer()))
        sdp_type, sdp = await signaling.receive()
        assert sdp_type == "answer"
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def next_message(self) -> Any:
        """The next frame from the peer that is not a position or heartbeat."""
        while True:
            message = decode_peer_message(
                await asyncio.wait_for(self.received.get(), TIMEOUT_S))
            if not isinstance(message, PeerPosition | Heartbeat):
                return message

    async def close(self) -> None:
        await self.pc.close()


@pytest.fixture(autouse=True)
async def no_leaks() -> Any:
    """Fail a test that leaves tasks pending or makes the loop report an error."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    yield
    await asyncio.sleep(0.05)
    gc.collect()
    await asyncio.sleep(0)
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert pending == [], f"tasks left pending: {pending}"
    assert reported == [], f"event loop reported: {[c.get('message') for c in reported]}"


def candidate_lines(sdp: str) -> list[str]:
    return [line for line in sdp.splitlines() if line.startswith("a=candidate:")]


async def run_pair(
    *, store_a: Callable[[str], bool], store_b: Callable[[str], bool],
    id_a: str | None = None, id_b: str | None = None, timeout_s: float = TIMEOUT_S,
    webrtc: WebRtcConfig = LOOPBACK, webrtc_b: WebRtcConfig | None = None,
) -> tuple[Any, Any, list[tuple[str, str]], str, str]:
    id_a = id_a or fresh_id()
    id_b = id_b or fresh_id()
    sig_a, sig_b, log = signaling_pair()
    result_a, result_b = await asyncio.gather(
        witness(role="initiator", contact_id=id_a, signaling=sig_a, webrtc=webrtc,
                    store_token=store_a, timeout_s=timeout_s),
        witness(role="responder", contact_id=id_b, signaling=sig_b,
                    webrtc=webrtc if webrtc_b is None else webrtc_b,
                    store_token=store_b, timeout_s=timeout_s),
    )
    return result_a, result_b, log, id_a, id_b


# --- import boundary -------------------------------------------------------------------------


def test_module_imports_without_aiortc() -> None:
    code = textwrap.dedent("""
        import sys
        import fanny_tui.peer
        heavy = sorted(m for m in ("aiortc", "aioice", "av") if m in sys.modules)
        print(",".join(heavy))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.strip() == ""


def test_preload_warms_the_first_exchange_on_loopback_only() -> None:
    """peer.preload() (issue 7, point 4) pays in advance what a process's first exchange paid:
    the import, the DTLS certificate's OpenSSL backend (loaded on first use), one whole
    exchange. Its warm-up offers and answers host candidates on 127.0.0.1 only, completes
    (no failure logged), is done once per process and skipped inside a running event loop."""
    code = textwrap.dedent("""
        import asyncio, json, logging, sys
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())
        logging.getLogger("fanny_tui.peer").addHandler(Keep())
        logging.getLogger("fanny_tui.peer").setLevel(logging.DEBUG)
        from fanny_tui import peer
        from fanny_tui.peer import candidates_outside
        import aiortc
        backend = "cryptography.hazmat.backends.openssl"
        before = backend in sys.modules
        sdps = []
        original = aiortc.RTCPeerConnection.setLocalDescription
        async def recording(self, description):
            await original(self, description)
            sdps.append(self.localDescription.sdp)
        aiortc.RTCPeerConnection.setLocalDescription = recording

        async def inside_a_loop():
            peer.preload()      # a running loop in this thread: no warm-up exchange
        asyncio.run(inside_a_loop())
        skipped = len(sdps)
        peer.preload()          # no loop running: the warm-up
        peer.preload()          # once per process
        print(json.dumps({
            "before": before, "after": backend in sys.modules, "skipped": skipped,
            "sdps": len(sdps),
            "candidates": sum(l.startswith("a=candidate:") for s in sdps for l in s.splitlines()),
            "outside": [a for s in sdps for a in candidates_outside(s, ["127.0.0.1"])],
            "failed": [m for m in records if "warm-up" in m]}))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60 * TIME_UNIT, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] is False and seen["after"] is True
    assert seen["skipped"] == 0
    assert seen["sdps"] == 2            # one offer, one answer: a single warm-up exchange
    assert seen["candidates"] >= 2 and seen["outside"] == []
    assert seen["failed"] == []


# --- the happy path -------------------------------------------------------------------------


async def test_two_peers_complete_with_the_same_token_on_loopback_only() -> None:
    store_a, store_b = DictStore(), DictStore()
    progress: list[str] = []
    id_a, id_b = fresh_id(), fresh_id()
    sig_a, sig_b, log = signaling_pair()
    result_a, result_b = await asyncio.gather(
        witness(role="initiator", contact_id=id_a, signaling=sig_a, webrtc=LOOPBACK,
                    store_token=store_a, timeout_s=TIMEOUT_S, on_progress=progress.append),
        witness(role="responder", contact_id=id_b, signaling=sig_b, webrtc=LOOPBACK,
                    store_token=store_b, timeout_s=TIMEOUT_S),
    )
    token = craft_token(*sorted((id_a, id_b)))
    assert result_a == HandshakeCompleted(token=token, new=True)
    assert result_b == HandshakeCompleted(token=token, new=True)
    assert store_a.tokens == {token: 1}
    assert store_b.tokens == {token: 1}
    assert progress == ["connecting", "exchanging"]

    # Exactly one offer and one answer went through the broker, and no contact ID did.
    assert [t for t, _ in log] == ["offer", "answer"]
    for _, sdp in log:
        assert id_a not in sdp and id_b not in sdp
        lines = candidate_lines(sdp)
        assert lines, "an SDP without candidates cannot connect"
        for line in lines:
            assert line.split()[4] == "127.0.0.1", line
        assert candidates_outside(sdp, ["127.0.0.1"]) == []


async def test_duplicate_token_completes_with_new_false() -> None:
    store_a, store_b = DictStore(), DictStore()
    id_a, id_b = fresh_id(), fresh_id()
    first = await run_pair(store_a=store_a, store_b=store_b, id_a=id_a, id_b=id_b)
    again = await run_pair(store_a=store_a, store_b=store_b, id_a=id_a, id_b=id_b)
    token = craft_token(id_a, id_b)
    assert first[:2] == (HandshakeCompleted(token, True), HandshakeCompleted(token, True))
    assert again[:2] == (HandshakeCompleted(token, False), HandshakeCompleted(token, False))
    # The store was asked twice per side and holds the token once.
    assert store_a.calls == store_b.calls == 2
    assert list(store_a.tokens) == list(store_b.tokens) == [token]


async def test_store_returning_false_is_reported_as_not_new() -> None:
    result_a, result_b, _, id_a, id_b = await run_pair(store_a=lambda t: False,
                                                       store_b=lambda t: False)
    token = craft_token(id_a, id_b)
    assert result_a == HandshakeCompleted(token, False)
    assert result_b == HandshakeCompleted(token, False)


# --- store failures -------------------------------------------------------------------------


async def test_responder_store_failure_fails_both_and_nothing_is_stored() -> None:
    store_a = DictStore()
    store_b = DictStore(fail=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    result_a, result_b, *_ = await run_pair(store_a=store_a, store_b=store_b)
    assert isinstance(result_b, HandshakeFailed)
    assert result_b.reason == f"store_failed: OSError ({os.strerror(errno.ENOSPC)})"
    assert result_a == HandshakeFailed("peer_aborted: store_failed")
    assert store_a.tokens == {} and store_a.calls == 0
    assert store_b.tokens == {}


async def test_initiator_store_failure_leaves_the_token_on_the_responder_only() -> None:
    """Documented partial outcome: a token held by one side only is harmless (never matches)."""
    store_a = DictStore(fail=PermissionError(errno.EROFS, "Read-only file system"))
    store_b = DictStore()
    result_a, result_b, _, id_a, id_b = await run_pair(store_a=store_a, store_b=store_b)
    token = craft_token(id_a, id_b)
    assert result_a == HandshakeFailed("store_failed: PermissionError (Read-only file system)")
    assert result_b == HandshakeCompleted(token, True)
    assert store_a.tokens == {}
    assert store_b.tokens == {token: 1}


async def test_store_error_of_any_class_fails_cleanly() -> None:
    class StoreError(Exception):
        pass

    store_a, store_b = DictStore(), DictStore(fail=StoreError("database is locked"))
    result_a, result_b, *_ = await run_pair(store_a=store_a, store_b=store_b)
    assert result_b == HandshakeFailed("store_failed: StoreError")
    assert result_a == HandshakeFailed("peer_aborted: store_failed")
    assert store_a.tokens == {}


async def test_store_running_when_the_timer_fires_decides_the_outcome() -> None:
    """A store call already in its thread is awaited: HandshakeFailed means nothing stored."""
    store_a = DictStore()
    store_b = DictStore()
    in_store = threading.Event()
    release = threading.Event()

    def slow_store(token: str) -> bool:
        in_store.set()
        release.wait(TIMEOUT_S)
        return store_b(token)

    sig_a, sig_b, _ = signaling_pair()
    id_a, id_b = fresh_id(), fresh_id()
    responder = asyncio.create_task(
        witness(role="responder", contact_id=id_b, signaling=sig_b, webrtc=LOOPBACK,
                    store_token=slow_store, timeout_s=SHORT_TIMEOUT_S))
    initiator = asyncio.create_task(
        witness(role="initiator", contact_id=id_a, signaling=sig_a, webrtc=LOOPBACK,
                    store_token=store_a, timeout_s=TIMEOUT_S))
    await asyncio.to_thread(in_store.wait, TIMEOUT_S)
    # Let the responder's timer fire while its store is still running.
    await asyncio.sleep(SHORT_TIMEOUT_S + 0.2)
    assert not responder.done()
    release.set()
    token = craft_token(id_a, id_b)
    assert await responder == HandshakeCompleted(token, True)
    assert await initiator == HandshakeCompleted(token, True)
    assert store_a.tokens == store_b.tokens == {token: 1}


# --- vanishing and misbehaving peers ---------------------------------------------------------


async def test_responder_that_never_answers_times_out() -> None:
    store = DictStore()
    sig_a, _sig_b, log = signaling_pair()
    started = time.monotonic()
    result = await witness(role="initiator", contact_id=fresh_id(), signaling=sig_a,
                               webrtc=LOOPBACK, store_token=store, timeout_s=SHORT_TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert result == HandshakeFailed("timeout")
    assert store.calls == 0
    assert [t for t, _ in log] == ["offer"]
    # Our own timer, not aiortc's ~30 s: a loose bound that only catches that regression.
    assert elapsed < SHORT_TIMEOUT_S + FLUSH_S + 5.0
    print(f"\ninitiator gave up after {elapsed:.2f} s (timeout_s={SHORT_TIMEOUT_S})")


async def test_silent_peer_times_out_and_gets_an_abort() -> None:
    """The peer connects and opens the channel, then says nothing: timeout, abort flushed."""
    store = DictStore()
    sig_a, sig_b, _ = signaling_pair()
    raw = RawPeer()
    try:
        result, _ = await asyncio.gather(
            witness(role="initiator", contact_id=fresh_id(), signaling=sig_a,
                        webrtc=LOOPBACK, store_token=store, timeout_s=SHORT_TIMEOUT_S),
            raw.answer(sig_b),
        )
        assert result == HandshakeFailed("timeout")
        assert store.calls == 0
        assert isinstance(await raw.next_message(), PeerHello)
        assert await raw.next_message() == Abort(reason="timeout")
    finally:
        await raw.close()


async def test_responder_cancelled_mid_way_fails_the_initiator() -> None:
    store_a, store_b = DictStore(), DictStore()
    sig_a, sig_b, _ = signaling_pair()
    loop = asyncio.get_running_loop()
    exchanging = loop.create_future()

    def progress(step: str) -> None:
        if step == "exchanging" and not exchanging.done():
            exchanging.set_result(None)

    responder = asyncio.create_task(
        witness(role="responder", contact_id=fresh_id(), signaling=sig_b, webrtc=LOOPBACK,
                    store_token=store_b, timeout_s=TIMEOUT_S, on_progress=progress))
    initiator = asyncio.create_task(
        witness(role="initiator", contact_id=fresh_id(), signaling=sig_a, webrtc=LOOPBACK,
                    store_token=store_a, timeout_s=SHORT_TIMEOUT_S))
    await exchanging
    responder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await responder
    result = await initiator
    assert isinstance(result, HandshakeFailed)
    # The cancelled side sends "abort: stopped" before the token is held (or, if the frame
    # cannot leave in time, the channel closes).
    assert result.reason in ("peer_aborted: stopped", "channel_closed")
    assert store_a.tokens == {}


async def test_wrong_token_is_refused_and_nothing_stored() -> None:
    store = DictStore()
    sig_a, sig_b, _ = signaling_pair()
    raw = RawPeer()
    try:
        responder = asyncio.create_task(
            witness(role="responder", contact_id=fresh_id(), signaling=sig_b,
                        webrtc=LOOPBACK, store_token=store, timeout_s=TIMEOUT_S))
        await raw.offer(sig_a)
        await asyncio.wait_for(raw.opened.wait(), TIMEOUT_S)
        raw.channel.send(encode(hello(fresh_id())))
        assert isinstance(await raw.next_message(), PeerHello)
        raw.channel.send(encode(TokenOffer(token="0" * 64)))
        assert await raw.next_message() == Abort(reason="token_mismatch")
        assert await responder == HandshakeFailed("token_mismatch")
        assert store.calls == 0
    finally:
        await raw.close()


async def test_garbage_from_the_peer_fails_with_bad_message() -> None:
    store = DictStore()
    sig_a, sig_b, _ = signaling_pair()
    raw = RawPeer()
    try:
        responder = asyncio.create_task(
            witness(role="responder", contact_id=fresh_id(), signaling=sig_b,
                        webrtc=LOOPBACK, store_token=store, timeout_s=TIMEOUT_S))
        await raw.offer(sig_a)
        await asyncio.wait_for(raw.opened.wait(), TIMEOUT_S)
        raw.channel.send(b"\xff\x00 not json")
        result = await responder
        assert result == HandshakeFailed("bad_message")
        assert store.calls == 0
    finally:
        await raw.close()


# --- signaling problems ----------------------------------------------------------------------


class BrokenSignaling:
    async def send(self, sdp_type: str, sdp: str) -> None:
        raise ConnectionError("broker gone")

    async def receive(self) -> tuple[str, str]:
        raise ConnectionError("broker gone")


@pytest.mark.parametrize("role", ["initiator", "responder"])
async def test_signaling_failure_fails_the_exchange(role: Any) -> None:
    result = await witness(role=role, contact_id=fresh_id(), signaling=BrokenSignaling(),
                               webrtc=LOOPBACK, store_token=DictStore(), timeout_s=TIMEOUT_S)
    assert result == HandshakeFailed("signaling_failed: ConnectionError")


async def test_unexpected_signal_and_bad_sdp() -> None:
    sig_a, sig_b, _ = signaling_pair()
    await sig_a.send("answer", "v=0\r\n")
    result = await witness(role="responder", contact_id=fresh_id(), signaling=sig_b,
                               webrtc=LOOPBACK, store_token=DictStore(), timeout_s=TIMEOUT_S)
    assert result == HandshakeFailed("unexpected_signal")

    await sig_a.send("offer", "this is not SDP")
    result = await witness(role="responder", contact_id=fresh_id(), signaling=sig_b,
                               webrtc=LOOPBACK, store_token=DictStore(), timeout_s=TIMEOUT_S)
    assert result == HandshakeFailed("bad_sdp")

    await sig_a.send("offer", "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n")
    result = await witness(role="responder", contact_id=fresh_id(), signaling=sig_b,
                               webrtc=LOOPBACK, store_token=DictStore(), timeout_s=TIMEOUT_S)
    assert result == HandshakeFailed("bad_sdp")


# --- ICE candidates: loopback only, scoped restriction --------------------------------------


async def test_host_address_wrapper_is_inactive_outside_a_scope() -> None:
    from aioice import ice

    install_host_address_filter()
    install_host_address_filter()  # idempotent: not wrapped twice
    wrapper = ice.get_host_addresses
    original = wrapper.__wrapped__  # type: ignore[attr-defined]
    assert not getattr(original, "_fanny_filter", False)
    # Unset: exactly aioice's own answer (which never includes loopback).
    assert wrapper(True, True) == original(True, True)
    assert "127.0.0.1" not in wrapper(True, False)
    with restrict_host_addresses(["127.0.0.1", "::1"]):
        assert wrapper(True, False) == ["127.0.0.1"]
        assert wrapper(False, True) == ["::1"]
        assert wrapper(True, True) == ["127.0.0.1", "::1"]
        # A task created inside the scope inherits it.
        seen = await asyncio.create_task(_ask(wrapper))
        assert seen == ["127.0.0.1"]
    assert wrapper(True, True) == original(True, True)
    # An empty list means no restriction at all.
    with restrict_host_addresses([]):
        assert wrapper(True, True) == original(True, True)
    with pytest.raises(ValueError, match="host_addresses"), \
            restrict_host_addresses(["localhost"]):
        pass


async def _ask(wrapper: Callable[[bool, bool], list[str]]) -> list[str]:
    return wrapper(True, False)


async def test_scope_does_not_leak_into_a_concurrent_task() -> None:
    from aioice import ice

    install_host_address_filter()
    wrapper = ice.get_host_addresses
    original = wrapper.__wrapped__  # type: ignore[attr-defined]
    release = asyncio.Event()
    answers: list[list[str]] = []

    async def outsider() -> None:
        await release.wait()
        answers.append(wrapper(True, False))

    task = asyncio.create_task(outsider())
    with restrict_host_addresses(["127.0.0.1"]):
        release.set()
        await task
    assert answers == [original(True, False)]


async def test_run_witness_leaves_no_restriction_behind() -> None:
    from aioice import ice

    await run_pair(store_a=DictStore(), store_b=DictStore())
    wrapper = ice.get_host_addresses
    assert wrapper(True, True) == wrapper.__wrapped__(True, True)  # type: ignore[attr-defined]


def test_candidates_outside_parses_rfc8839_lines() -> None:
    sdp = "\r\n".join([
        "v=0",
        "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host",
        "a=candidate:2 1 udp 1694498815 203.0.113.7 40001 typ srflx raddr 127.0.0.1 rport 1",
        "a=candidate:3 1 udp 16777215 198.51.100.9 3478 typ relay raddr 0.0.0.0 rport 9",
        "a=candidate:4 1 udp 2130706431 abcd.local 40002 typ host",
        "a=candidate:garbage",
        "a=candidate:5 1 udp 2130706431 ::1 40003 typ host",
    ])
    assert candidates_outside(sdp, ["127.0.0.1"]) == ["203.0.113.7", "abcd.local", "?", "::1"]
    assert candidates_outside(sdp, ["127.0.0.1", "0:0::1", "203.0.113.7"]) == ["abcd.local", "?"]


def test_candidates_outside_relay_only_allows_hidden_relay_candidates_only() -> None:
    relay_hidden = "a=candidate:3 1 udp 16777215 127.0.0.1 50000 typ relay raddr 0.0.0.0 rport 9"
    relay_bare = "a=candidate:4 1 udp 16777215 127.0.0.1 50001 typ relay"
    relay_v6 = "a=candidate:5 1 udp 16777215 ::1 50002 typ relay raddr :: rport 9"
    assert candidates_outside("\r\n".join(["v=0", relay_hidden, relay_bare, relay_v6]), [],
                              relay_only=True) == []
    sdp = "\r\n".join([
        "v=0",
        relay_hidden,
        "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host",
        "a=candidate:2 1 udp 1694498815 203.0.113.7 40001 typ srflx raddr 127.0.0.1 rport 1",
        # A relay candidate that names this device's own (mapped) address: a leak.
        "a=candidate:6 1 udp 16777215 127.0.0.1 50003 typ relay raddr 198.51.100.4 rport 6",
        "a=candidate:garbage",
    ])
    # Allowed host addresses do not matter with relay_only: a host candidate is refused.
    assert candidates_outside(sdp, ["127.0.0.1"], relay_only=True) == [
        "127.0.0.1", "203.0.113.7", "198.51.100.4", "?"]


def test_drop_hostname_candidates_keeps_everything_else_byte_for_byte() -> None:
    name = f"{uuid.uuid4()}.local"
    lines = [
        "v=0",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host",
        f"a=candidate:2 1 udp 2130706431 {name} 40001 typ host",
        "a=candidate:3 1 udp 2130706431 ::1 40003 typ host",
        "a=candidate:4 1 udp 2130706431 peer.example 40004 typ host",
        f"a=candidate:5 1 udp 16777215 {name.upper()} 40005 typ relay raddr 0.0.0.0 rport 9",
        "a=candidate:garbage",
        "a=end-of-candidates",
    ]
    sdp = "\r\n".join(lines) + "\r\n"
    cleaned, dropped = drop_hostname_candidates(sdp)
    assert dropped == 3
    assert cleaned == "\r\n".join(lines[:3] + [lines[4]] + lines[7:]) + "\r\n"
    assert drop_hostname_candidates(cleaned) == (cleaned, 0)
    assert drop_hostname_candidates("") == ("", 0)


class FakeMappingStun(asyncio.DatagramProtocol):
    """A real STUN server on loopback that maps every client to 127.0.0.2 (RFC 5389).

    127.0.0.2 is still loopback, yet outside ``host_addresses = ["127.0.0.1"]``: the server
    reflexive candidate it produces must make the exchange fail before anything is sent.
    """

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        from aioice import stun

        request = stun.parse_message(data)
        response = stun.Message(message_method=stun.Method.BINDING,
                                message_class=stun.Class.RESPONSE,
                                transaction_id=request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = ("127.0.0.2", addr[1])
        self.transport.sendto(bytes(response), addr)


async def test_candidate_outside_host_addresses_fails_before_signaling() -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(FakeMappingStun,
                                                       local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        webrtc = WebRtcConfig(ice_servers=(IceServer(urls=(f"stun:127.0.0.1:{port}",)),),
                              host_addresses=("127.0.0.1",))
        sig_a, _, log = signaling_pair()
        store = DictStore()
        result = await witness(role="initiator", contact_id=fresh_id(), signaling=sig_a,
                                   webrtc=webrtc, store_token=store, timeout_s=TIMEOUT_S)
        assert result == HandshakeFailed("candidate_outside_allowed")
        assert log == []  # nothing reached the broker
        assert store.calls == 0
    finally:
        transport.close()


async def test_no_ice_server_by_default() -> None:
    """Never Google's STUN: an explicit, empty server list unless configured."""
    from aiortc import RTCIceTransportPolicy

    from fanny_tui.peer import _rtc_configuration

    default = _rtc_configuration(WebRtcConfig())
    assert default.iceServers == []
    assert default.iceTransportPolicy is RTCIceTransportPolicy.ALL
    turn_server = IceServer(urls=("turn:127.0.0.1:3478",), username="u", credential="c")
    configured = _rtc_configuration(WebRtcConfig(ice_servers=(turn_server,)))
    assert configured.iceServers is not None
    assert [s.urls for s in configured.iceServers] == [["turn:127.0.0.1:3478"]]
    assert configured.iceTransportPolicy is RTCIceTransportPolicy.ALL
    relay = _rtc_configuration(WebRtcConfig(ice_servers=(turn_server,),
                                            ice_transport_policy="relay"))
    assert relay.iceTransportPolicy is RTCIceTransportPolicy.RELAY
    assert relay.iceServers is not None
    assert [(s.username, s.credential) for s in relay.iceServers] == [("u", "c")]


# --- relay-only ICE through a real TURN server (coturn on loopback) --------------------------


def assert_relay_only(sdp: str) -> list[int]:
    """Every candidate is a relay one on 127.0.0.1 with its related address hidden; ports."""
    lines = candidate_lines(sdp)
    assert lines, "a relay-only SDP without candidates cannot connect"
    ports: list[int] = []
    for line in lines:
        fields = line.split()
        assert fields[4] == "127.0.0.1" and fields[7] == "relay", line
        if "raddr" in fields:
            assert fields[fields.index("raddr") + 1] == "0.0.0.0", line
        ports.append(int(fields[5]))
    assert "c=IN IP4 127.0.0.1" in sdp.splitlines()
    assert candidates_outside(sdp, [], relay_only=True) == []
    return ports


async def test_relay_only_peers_complete_through_turn(turn: TurnServer) -> None:
    store_a, store_b = DictStore(), DictStore()
    webrtc = relay_config(turn)
    assert webrtc.host_addresses == ()  # relay alone keeps every candidate off this host
    result_a, result_b, log, id_a, id_b = await run_pair(store_a=store_a, store_b=store_b,
                                                         webrtc=webrtc)
    token = craft_token(id_a, id_b)
    assert result_a == HandshakeCompleted(token, True)
    assert result_b == HandshakeCompleted(token, True)
    assert store_a.tokens == store_b.tokens == {token: 1}
    assert [t for t, _ in log] == ["offer", "answer"]
    offer_ports = assert_relay_only(log[0][1])
    answer_ports = assert_relay_only(log[1][1])
    # Two allocations on the TURN server (never its own listening port).
    assert turn.port not in offer_ports + answer_ports
    assert set(offer_ports).isdisjoint(answer_ports)


async def test_relay_peer_meets_a_host_peer_and_shows_it_only_the_relay(turn: TurnServer) -> None:
    store_a, store_b = DictStore(), DictStore()
    result_a, result_b, log, id_a, id_b = await run_pair(
        store_a=store_a, store_b=store_b, webrtc=relay_config(turn), webrtc_b=LOOPBACK)
    token = craft_token(id_a, id_b)
    assert (result_a, result_b) == (HandshakeCompleted(token, True),
                                     HandshakeCompleted(token, True))
    assert_relay_only(log[0][1])
    answer = candidate_lines(log[1][1])
    assert answer and all(line.split()[4:8:3] == ["127.0.0.1", "host"] for line in answer)


async def test_wrong_turn_password_fails_cleanly_and_stores_nothing(turn: TurnServer) -> None:
    wrong = relay_config(turn, password="not-the-secret")
    # An initiator without a relay candidate stops before anything reaches the broker.
    sig_a, _, log = signaling_pair()
    store = DictStore()
    result = await witness(role="initiator", contact_id=fresh_id(), signaling=sig_a,
                               webrtc=wrong, store_token=store, timeout_s=TIMEOUT_S)
    assert result == HandshakeFailed("no_relay_candidate")
    assert log == [] and store.calls == 0
    assert "credentials are incorrect" in turn.log_text()  # refused by coturn itself

    # A responder without one sends no answer; its initiator's own timer ends the exchange.
    store_a, store_b = DictStore(), DictStore()
    result_a, result_b, log, *_ = await run_pair(
        store_a=store_a, store_b=store_b, webrtc=relay_config(turn), webrtc_b=wrong,
        timeout_s=GONE_TIMEOUT_S)
    assert result_a == HandshakeFailed("timeout")
    assert result_b == HandshakeFailed("no_relay_candidate")
    assert [t for t, _ in log] == ["offer"]
    assert store_a.calls == store_b.calls == 0


async def test_relay_policy_without_a_turn_server_fails_before_signaling() -> None:
    """Config refuses this; a WebRtcConfig built by hand still fails cleanly, not silently."""
    sig_a, _, log = signaling_pair()
    store = DictStore()
    result = await witness(role="initiator", contact_id=fresh_id(), signaling=sig_a,
                               webrtc=WebRtcConfig(ice_transport_policy="relay"),
                               store_token=store, timeout_s=TIMEOUT_S)
    assert result == HandshakeFailed("no_relay_candidate")
    assert log == [] and store.calls == 0


# --- mDNS (.local) remote candidates: never resolved by multicast when restricted ------------


@pytest.fixture
def mdns_tripwire(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """aioice opening its mDNS socket is recorded and refused, so no query can leave loopback."""
    import aioice.mdns

    calls: list[str] = []

    async def refuse() -> Any:
        calls.append("create_mdns_protocol")
        raise OSError("mDNS refused by the test: its multicast would leave loopback")

    monkeypatch.setattr(aioice.mdns, "create_mdns_protocol", refuse)
    return calls


def mdns_name() -> str:
    return f"{uuid.uuid4()}.local"


def add_mdns_candidate(sdp: str) -> str:
    """The SDP with one more host candidate, named by mDNS, after its real ones."""
    lines = sdp.split("\r\n")
    last = max(i for i, line in enumerate(lines) if line.startswith("a=candidate:"))
    lines.insert(last + 1, f"a=candidate:mdns1 1 udp 2130706431 {mdns_name()} 40000 typ host")
    return "\r\n".join(lines)


def only_mdns_candidates(sdp: str) -> str:
    """The SDP with every candidate address replaced by an mDNS name."""
    out = []
    for line in sdp.split("\r\n"):
        if line.startswith("a=candidate:"):
            fields = line.split(" ")
            fields[4] = mdns_name()
            line = " ".join(fields)
        out.append(line)
    return "\r\n".join(out)


async def test_mdns_tripwire_catches_aioice_resolving(mdns_tripwire: list[str]) -> None:
    """Control: without our filter, aioice does go for multicast DNS on an mDNS candidate."""
    from aioice import Candidate, Connection

    connection = Connection(ice_controlling=True)
    try:
        with pytest.raises(OSError, match="mDNS refused"):
            await connection.add_remote_candidate(Candidate(
                foundation="1", component=1, transport="udp", priority=2130706431,
                host=mdns_name(), port=40000, type="host"))
    finally:
        await connection.close()
    assert mdns_tripwire == ["create_mdns_protocol"]


async def test_mdns_candidate_beside_real_ones_is_dropped(mdns_tripwire: list[str]) -> None:
    store_a, store_b = DictStore(), DictStore()
    sig_a, sig_b, log = signaling_pair()
    hostile = RewritingSignaling(sig_a, add_mdns_candidate)
    id_a, id_b = fresh_id(), fresh_id()
    result_a, result_b = await asyncio.gather(
        witness(role="initiator", contact_id=id_a, signaling=hostile, webrtc=LOOPBACK,
                    store_token=store_a, timeout_s=TIMEOUT_S),
        witness(role="responder", contact_id=id_b, signaling=sig_b, webrtc=LOOPBACK,
                    store_token=store_b, timeout_s=TIMEOUT_S),
    )
    token = craft_token(id_a, id_b)
    assert (result_a, result_b) == (HandshakeCompleted(token, True),
                                     HandshakeCompleted(token, True))
    assert ".local " in log[0][1]  # the offer the responder got did carry one
    assert mdns_tripwire == []


@pytest.mark.parametrize("policy", ["host_addresses", "relay"])
async def test_peer_offering_only_mdns_candidates_is_refused(
    policy: str, mdns_tripwire: list[str], request: pytest.FixtureRequest,
) -> None:
    # Relay alone (no host_addresses) refuses them too.
    webrtc = relay_config(request.getfixturevalue("turn")) if policy == "relay" else LOOPBACK
    store_a, store_b = DictStore(), DictStore()
    sig_a, sig_b, log = signaling_pair()
    hostile = RewritingSignaling(sig_a, only_mdns_candidates)
    result_a, result_b = await asyncio.gather(
        witness(role="initiator", contact_id=fresh_id(), signaling=hostile, webrtc=webrtc,
                    store_token=store_a, timeout_s=GONE_TIMEOUT_S),
        witness(role="responder", contact_id=fresh_id(), signaling=sig_b, webrtc=webrtc,
                    store_token=store_b, timeout_s=TIMEOUT_S),
    )
    assert result_b == HandshakeFailed("mdns_candidate_refused")
    assert result_a == HandshakeFailed("timeout")
    assert [t for t, _ in log] == ["offer"]
    assert candidate_lines(log[0][1]) and all(".local " in c for c in candidate_lines(log[0][1]))
    assert store_a.calls == store_b.calls == 0
    assert mdns_tripwire == []


# --- mDNS (.local) remote candidates resolved on the allowed addresses only -------------------


def names_for_loopback(records: dict[str, str]) -> Callable[[str], str]:
    """A rewrite that names every 127.0.0.1 candidate by mDNS, as a browser offers it, and
    publishes each name in ``records`` (a responder's table) as 127.0.0.1."""

    def rewrite(sdp: str) -> str:
        out = []
        for line in sdp.split("\r\n"):
            if line.startswith("a=candidate:"):
                fields = line.split(" ")
                assert fields[4] == "127.0.0.1"
                fields[4] = mdns_name()
                records[fields[4]] = "127.0.0.1"
                line = " ".join(fields)
            out.append(line)
        return "\r\n".join(out)

    return rewrite


@pytest.mark.parametrize("named", ["initiator", "responder"])
async def test_a_peer_offering_only_mdns_names_witnesses_when_they_resolve_on_loopback(
    named: str, mdns_tripwire: list[str],
) -> None:
    from .mdns_responder import loopback_responder

    records: dict[str, str] = {}
    store_a, store_b = DictStore(), DictStore()
    sig_a, sig_b, log = signaling_pair()
    if named == "initiator":
        sig_a = RewritingSignaling(sig_a, names_for_loopback(records))
    else:
        sig_b = RewritingSignaling(sig_b, names_for_loopback(records))
    id_a, id_b = fresh_id(), fresh_id()
    async with loopback_responder(records) as responder:
        result_a, result_b = await asyncio.gather(
            run_witness(role="initiator", contact_id=id_a, signaling=sig_a, webrtc=LOOPBACK,
                        store_token=store_a, timeout_s=TIMEOUT_S),
            run_witness(role="responder", contact_id=id_b, signaling=sig_b, webrtc=LOOPBACK,
                        store_token=store_b, timeout_s=TIMEOUT_S),
        )
    token = craft_token(id_a, id_b)
    assert (result_a, result_b) == (HandshakeCompleted(token, True),
                                     HandshakeCompleted(token, True))
    carried = log[0][1] if named == "initiator" else log[1][1]
    assert candidate_lines(carried)
    assert all(c.split(" ")[4].endswith(".local") for c in candidate_lines(carried))
    # Each of our names was asked (other programs on this machine may ask for theirs too).
    assert records and set(records) <= set(responder.questions)
    assert mdns_tripwire == []                                     # never by aioice


def test_drop_hostname_candidates_puts_resolved_addresses_in_place() -> None:
    sdp = ("v=0\r\n"
           "a=candidate:1 1 udp 2130706431 ABC-1.local 40000 typ host\r\n"
           "a=candidate:2 1 udp 2130706431 dfe-2.local 40001 typ host generation 0\r\n"
           "a=candidate:3 1 udp 2130706431 10.1.2.3 40002 typ host\r\n"
           "a=end-of-candidates\r\n")
    cleaned, dropped = drop_hostname_candidates(sdp, {"abc-1.local": "127.0.0.1"})
    assert dropped == 1
    assert cleaned == ("v=0\r\n"
                       "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n"
                       "a=candidate:3 1 udp 2130706431 10.1.2.3 40002 typ host\r\n"
                       "a=end-of-candidates\r\n")
    assert hostname_candidates(sdp) == ["ABC-1.local", "dfe-2.local"]
    assert hostname_candidates(cleaned) == []


# --- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"role": "boss"}, "role"),
    ({"contact_id": "not-a-uuid"}, "contact_id"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": float("nan")}, "timeout_s"),
    ({"webrtc": WebRtcConfig(host_addresses=("localhost",))}, "host_addresses"),
    ({"webrtc": WebRtcConfig(ice_transport_policy="stun")}, "ice_transport_policy"),
])
async def test_bad_arguments_raise_value_error(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"role": "initiator", "contact_id": fresh_id(),
                            "signaling": BrokenSignaling(), "webrtc": LOOPBACK,
                            "store_token": DictStore(), "timeout_s": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        await run_witness(**args)


# --- figures ---------------------------------------------------------------------------------


async def _latencies(webrtc: WebRtcConfig, runs: int) -> dict[str, list[float]]:
    """Seconds from createOffer to channel open, initiator done and responder done, per run."""
    figures: dict[str, list[float]] = {"opened": [], "completed": [], "lingered": []}
    for _ in range(runs):
        marks: dict[str, float] = {}
        sig_a, sig_b, _ = signaling_pair()

        def progress(step: str, marks: dict[str, float] = marks) -> None:
            marks[step] = time.perf_counter()

        async def responder(sig: QueueSignaling = sig_b,
                            marks: dict[str, float] = marks) -> Any:
            result = await witness(role="responder", contact_id=fresh_id(), signaling=sig,
                                       webrtc=webrtc, store_token=DictStore(),
                                       timeout_s=TIMEOUT_S)
            marks["responder_done"] = time.perf_counter()
            return result

        async def initiator(sig: QueueSignaling = sig_a,
                            marks: dict[str, float] = marks) -> Any:
            result = await witness(role="initiator", contact_id=fresh_id(), signaling=sig,
                                       webrtc=webrtc, store_token=DictStore(),
                                       timeout_s=TIMEOUT_S, on_progress=progress)
            marks["initiator_done"] = time.perf_counter()
            return result

        result_a, result_b = await asyncio.gather(initiator(), responder())
        assert isinstance(result_a, HandshakeCompleted) and isinstance(result_b,
                                                                       HandshakeCompleted)
        figures["opened"].append(marks["exchanging"] - marks["connecting"])
        figures["completed"].append(marks["initiator_done"] - marks["connecting"])
        figures["lingered"].append(marks["responder_done"] - marks["connecting"])
    return figures


async def test_print_latency(turn: TurnServer) -> None:
    """Print (not assert) createOffer -> completed latency: host candidates and relay-only.

    Relay-only is often ~0.5 s slower: the first connectivity check through TURN can reach the
    peer's allocation before it has a permission for us, and is dropped until the STUN
    retransmission (RTO 0.5 s, RFC 8489); when the race goes the other way it is as fast as host.
    """
    runs = 5
    print(f"\nwitness exchange latency over {runs} runs, median [min-max] in ms, from createOffer "
          f"to: channel open / initiator completed and closed / responder closed "
          f"(linger bound {LINGER_S} s)")
    for name, webrtc in (("loopback host candidates", LOOPBACK),
                         ("relay-only via local coturn", relay_config(turn))):
        figures = await _latencies(webrtc, runs)
        cells = [f"{statistics.median(v) * 1000:6.1f} [{min(v) * 1000:.1f}-{max(v) * 1000:.1f}]"
                 for v in figures.values()]
        print(f"  {name:28s} " + " / ".join(cells))


# --- the contact over the open channel (data channel v2) ---------------------------------------


async def test_positions_flow_and_a_cancelled_side_closes_with_stopped() -> None:
    """Two peers 3 m apart: samples on both sides, the token after min_contact_s, the channel
    open after it; cancelling one side sends ``close`` ``stopped`` and the other ends as
    ``peer_closed`` with its token kept."""
    from fanny_tui.peer import ChannelOpened
    from fanny_tui.protocol.contact import Fix
    from fanny_tui.protocol.handshake import ContactEnded, Established, PeerSample

    lat, lon = 43.6045, 1.444
    contact = ContactSettings(min_contact_s=0.5 * TIME_UNIT, contact_gap_s=60.0,
                              position_interval_s=0.1, token_timeout_s=TIMEOUT_S)
    events: dict[str, list[Any]] = {"a": [], "b": []}
    store_a, store_b = DictStore(), DictStore()
    sig_a, sig_b, log = signaling_pair()
    id_a, id_b = fresh_id(), fresh_id()
    responder = asyncio.create_task(witness(
        role="responder", contact_id=id_b, signaling=sig_b, webrtc=LOOPBACK,
        store_token=store_b, timeout_s=TIMEOUT_S, contact=contact,
        own_fix=lambda: Fix(lat + 3 / 111_195.0, lon, 4.0), on_event=events["b"].append))
    initiator = asyncio.create_task(witness(
        role="initiator", contact_id=id_a, signaling=sig_a, webrtc=LOOPBACK,
        store_token=store_a, timeout_s=TIMEOUT_S, contact=contact,
        own_fix=lambda: Fix(lat, lon, 4.0), on_event=events["a"].append))
    token = craft_token(id_a, id_b)
    deadline = time.monotonic() + TIMEOUT_S
    while not (store_a.tokens and store_b.tokens) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert store_a.tokens == store_b.tokens == {token: 1}
    assert not initiator.done() and not responder.done(), "the channel stays open"
    responder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await responder
    assert await initiator == HandshakeCompleted(token, True)
    for side in ("a", "b"):
        kinds = [type(e) for e in events[side]]
        assert kinds[0] is ChannelOpened and kinds[1] is Established
        samples = [e.sample for e in events[side] if isinstance(e, PeerSample)]
        assert samples and all(2.5 < s.distance_m < 3.5 for s in samples)
        assert samples[-1].within_s >= 0.5 * TIME_UNIT
        completed = [e for e in events[side] if isinstance(e, HandshakeCompleted)]
        assert completed == [HandshakeCompleted(token, True)]
        assert completed[0].measures is not None
        assert completed[0].measures.duration_s >= 0.5 * TIME_UNIT
        assert isinstance(events[side][-1], ContactEnded)
    assert events["b"][-1].reason == "stopped" and events["b"][-1].token == token
    assert events["a"][-1].reason == "peer_closed" and events["a"][-1].token == token
    for _, sdp in log:  # positions never in the signaling
        assert "43.6045" not in sdp


# --- an independent peer written from docs/protocol.md alone (issue 6, point 6) ---------------


class DocPeer(RawPeer):
    """The data channel protocol, version 2, as docs/protocol.md states it, without the kit's
    protocol code: ``json`` and ``hashlib`` only, the label, frame layouts, haversine radius,
    accuracy rule and token bytes copied from the document. Plays either role against the
    kit's :func:`run_witness`; only the ICE plumbing of :class:`RawPeer` is shared (loopback)."""

    LABEL = "fanny-witness"                      # "Channel parameters"
    EARTH_RADIUS_M = 6_371_008.8                 # "Distance"

    def __init__(self, contact_id: str, *, min_contact_s: float, radius_m: float,
                 fix: tuple[float, float, float]) -> None:
        super().__init__()
        self.contact_id, self.min_contact_s, self.radius_m = contact_id, min_contact_s, radius_m
        self.fix = fix                           # latitude, longitude, accuracy_m
        self.frames: list[dict[str, Any]] = []   # every frame received, decoded
        self.closed_by_peer = asyncio.Event()

    def _attach(self, channel: Any) -> None:
        assert channel.label == self.LABEL
        super()._attach(channel)
        channel.on("close", self.closed_by_peer.set)

    async def offer(self, signaling: QueueSignaling) -> None:
        """The initiator opens the channel before its offer ("who opens it")."""
        from aiortc import RTCSessionDescription
        self._attach(self.pc.createDataChannel(self.LABEL, ordered=True))
        await signaling.send("offer", await self._set_local(await self.pc.createOffer()))
        sdp_type, sdp = await signaling.receive()
        assert sdp_type == "answer"
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    def send(self, **frame: Any) -> None:
        self.channel.send(json.dumps(frame))     # a str: a text frame (PPID 51)

    async def receive(self) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.received.get(), TIMEOUT_S)
        assert isinstance(raw, str), "the kit sends text frames only"
        frame = json.loads(raw)
        self.frames.append(frame)
        return frame

    def send_position(self) -> None:
        latitude, longitude, accuracy = self.fix
        self.send(type="peer_position", latitude=latitude, longitude=longitude,
                  accuracy_m=accuracy)

    @classmethod
    def distance_m(cls, a: tuple[float, float], b: tuple[float, float]) -> float:
        import math
        phi1, phi2 = math.radians(a[0]), math.radians(b[0])
        h = (math.sin((phi2 - phi1) / 2) ** 2
             + math.cos(phi1) * math.cos(phi2) * math.sin(math.radians(b[1] - a[1]) / 2) ** 2)
        return 2 * cls.EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))

    def verdict(self, frame: dict[str, Any], radius_m: float) -> str:
        """"The accuracy rule": in, out or uncertain."""
        d = self.distance_m(self.fix[:2], (frame["latitude"], frame["longitude"]))
        c = (self.fix[2] ** 2 + (frame.get("accuracy_m") or 0.0) ** 2) ** 0.5
        if d <= radius_m and c <= 3 * radius_m:
            return "in"
        return "out" if d - c > radius_m else "uncertain"

    def token_for(self, peer_contact_id: str) -> str:
        """"The witness token: exact byte input"."""
        import hashlib
        low, high = sorted((self.contact_id, peer_contact_id))
        return hashlib.sha256((low + high).encode("ascii")).hexdigest()

    async def hellos(self) -> dict[str, Any]:
        """"The exchange", step 1: our hello at once, the peer's must be its first frame."""
        await asyncio.wait_for(self.opened.wait(), TIMEOUT_S)
        self.send(type="peer_hello", version=2, contact_id=self.contact_id,
                  min_contact_s=self.min_contact_s, radius_m=self.radius_m)
        hello_ = await self.receive()
        assert hello_["type"] == "peer_hello" and hello_["version"] >= 2
        assert set(hello_) == {"type", "version", "contact_id", "min_contact_s", "radius_m"}
        self.send_position()                     # step 2: right after the hellos
        return hello_

    async def close_contact(self, reason: str) -> None:
        """Step 4: ``close``, then wait up to 2 s for the peer to close, then close."""
        self.send(type="close", reason=reason)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed_by_peer.wait(), 2.0)
        await self.close()


KIT_FIX = Fix(43.6045, 1.444, 4.0)
DOC_FIX = (43.6045 + 3 / 111_195.0, 1.444, 4.0)   # 3 m north of the kit


async def test_a_peer_written_from_the_document_witnesses_as_initiator() -> None:
    """The document's initiator, ``min_contact_s`` 0.5 TU (stricter than the kit's 0), against
    the kit's responder: hellos, positions both ways, the token only after the effective
    ``min_contact_s`` measured by the document's own rule, the ack, then ``close``."""
    min_contact = 0.5 * TIME_UNIT
    sig_doc, sig_kit, log = signaling_pair()
    doc = DocPeer(fresh_id(), min_contact_s=min_contact, radius_m=10.0, fix=DOC_FIX)
    kit_id, store, events = fresh_id(), DictStore(), []
    kit = asyncio.create_task(witness(
        role="responder", contact_id=kit_id, signaling=sig_kit, webrtc=LOOPBACK,
        store_token=store, timeout_s=TIMEOUT_S, own_fix=lambda: KIT_FIX,
        contact=ContactSettings(contact_gap_s=60.0, position_interval_s=0.1,
                                token_timeout_s=TIMEOUT_S), on_event=events.append))
    try:
        await doc.offer(sig_doc)
        kit_hello = await doc.hellos()
        assert kit_hello["contact_id"] == kit_id and kit_hello["min_contact_s"] == 0.0
        radius = min(doc.radius_m, kit_hello["radius_m"])
        token = doc.token_for(kit_hello["contact_id"])
        first_in: float | None = None
        loop = asyncio.get_running_loop()
        while True:                              # measure until min_contact_s within
            frame = await doc.receive()
            assert frame["type"] in ("peer_position", "heartbeat"), frame
            doc.send_position()
            if frame["type"] == "peer_position" and doc.verdict(frame, radius) == "in":
                first_in = loop.time() if first_in is None else first_in
                if loop.time() - first_in >= min_contact:
                    break
        assert store.tokens == {}, "the responder stores only the token it is sent"
        doc.send(type="token", token=token)
        while (frame := await doc.receive())["type"] != "ack":
            assert frame["type"] in ("peer_position", "heartbeat"), frame
        assert frame == {"type": "ack", "token": token}
        assert store.tokens == {token: 1}
        await doc.close_contact("stopped")
        assert await asyncio.wait_for(kit, TIMEOUT_S) == HandshakeCompleted(token, True)
    finally:
        kit.cancel()
        await doc.close()
    ended = [e for e in events if isinstance(e, ContactEnded)]
    assert [e.reason for e in ended] == ["peer_closed"] and ended[0].token == token
    samples = [e.sample for e in events if isinstance(e, PeerSample)]
    assert samples and all(2.5 < s.distance_m < 3.5 and s.verdict == "in" for s in samples)
    positions = [f for f in doc.frames if f["type"] == "peer_position"]
    assert positions and positions[0] == {"type": "peer_position", "latitude": 43.6045,
                                          "longitude": 1.444, "accuracy_m": 4.0}
    assert all(doc.contact_id not in sdp for _, sdp in log)


async def test_a_peer_written_from_the_document_witnesses_as_responder() -> None:
    """The kit's initiator (``min_contact_s`` 0) against the document's responder, which
    checks the token from the two contact IDs, stores it, acks, and later parts."""
    sig_kit, sig_doc, _log = signaling_pair()
    doc = DocPeer(fresh_id(), min_contact_s=0.0, radius_m=15.0, fix=DOC_FIX)
    kit_id, store, events = fresh_id(), DictStore(), []
    kit = asyncio.create_task(witness(
        role="initiator", contact_id=kit_id, signaling=sig_kit, webrtc=LOOPBACK,
        store_token=store, timeout_s=TIMEOUT_S, own_fix=lambda: KIT_FIX,
        contact=ContactSettings(contact_gap_s=60.0, position_interval_s=0.1,
                                token_timeout_s=TIMEOUT_S), on_event=events.append))
    try:
        await doc.answer(sig_doc)
        kit_hello = await doc.hellos()
        expected = doc.token_for(kit_hello["contact_id"])
        while (frame := await doc.receive())["type"] != "token":
            assert frame["type"] in ("peer_position", "heartbeat"), frame
        assert frame == {"type": "token", "token": expected}
        doc.send(type="ack", token=expected)     # "stored" on this side, then the ack
        kept = 0
        while kept < 3:                          # the contact goes on: positions both ways
            frame = await doc.receive()
            assert frame["type"] in ("peer_position", "heartbeat"), frame
            doc.send_position()
            kept += 1
        await doc.close_contact("parted")
        assert await asyncio.wait_for(kit, TIMEOUT_S) == HandshakeCompleted(expected, True)
    finally:
        kit.cancel()
        await doc.close()
    assert store.tokens == {expected: 1}
    ended = [e for e in events if isinstance(e, ContactEnded)]
    assert [e.reason for e in ended] == ["peer_closed"] and ended[0].token == expected
    established = [e for e in events if isinstance(e, Established)]
    assert established == [Established(radius_m=10.0, min_contact_s=0.0)]
