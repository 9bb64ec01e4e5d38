"""Tests for fanny_tui.peer: real aiortc peers over loopback (127.0.0.1 only), no mocks.

Two peers run in one process; the broker is replaced by an in-memory queue pair that records
every SDP it carries. Misbehaving peers are real aiortc peers driven by the test (``RawPeer``).
Stores are dicts behind ``store_token``.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
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
    install_host_address_filter,
    restrict_host_addresses,
    run_witness,
)
from fanny_tui.protocol.handshake import HandshakeCompleted, HandshakeFailed
from fanny_tui.protocol.messages import (
    Abort,
    ContactIdMessage,
    TokenOffer,
    decode_peer_message,
    encode,
)
from fanny_tui.protocol.tokens import craft_token, new_id

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = WebRtcConfig(host_addresses=("127.0.0.1",))
TIMEOUT_S = 10.0  # generous for a loaded CI machine; loopback exchanges take ~0.1 s
SHORT_TIMEOUT_S = 2.0


def fresh_id() -> str:
    return new_id(os.urandom(16))


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
        return decode_peer_message(await asyncio.wait_for(self.received.get(), TIMEOUT_S))

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
    webrtc: WebRtcConfig = LOOPBACK,
) -> tuple[Any, Any, list[tuple[str, str]], str, str]:
    id_a = id_a or fresh_id()
    id_b = id_b or fresh_id()
    sig_a, sig_b, log = signaling_pair()
    result_a, result_b = await asyncio.gather(
        run_witness(role="initiator", contact_id=id_a, signaling=sig_a, webrtc=webrtc,
                    store_token=store_a, timeout_s=timeout_s),
        run_witness(role="responder", contact_id=id_b, signaling=sig_b, webrtc=webrtc,
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


# --- the happy path -------------------------------------------------------------------------


async def test_two_peers_complete_with_the_same_token_on_loopback_only() -> None:
    store_a, store_b = DictStore(), DictStore()
    progress: list[str] = []
    id_a, id_b = fresh_id(), fresh_id()
    sig_a, sig_b, log = signaling_pair()
    result_a, result_b = await asyncio.gather(
        run_witness(role="initiator", contact_id=id_a, signaling=sig_a, webrtc=LOOPBACK,
                    store_token=store_a, timeout_s=TIMEOUT_S, on_progress=progress.append),
        run_witness(role="responder", contact_id=id_b, signaling=sig_b, webrtc=LOOPBACK,
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
        run_witness(role="responder", contact_id=id_b, signaling=sig_b, webrtc=LOOPBACK,
                    store_token=slow_store, timeout_s=SHORT_TIMEOUT_S))
    initiator = asyncio.create_task(
        run_witness(role="initiator", contact_id=id_a, signaling=sig_a, webrtc=LOOPBACK,
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
    result = await run_witness(role="initiator", contact_id=fresh_id(), signaling=sig_a,
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
            run_witness(role="initiator", contact_id=fresh_id(), signaling=sig_a,
                        webrtc=LOOPBACK, store_token=store, timeout_s=SHORT_TIMEOUT_S),
            raw.answer(sig_b),
        )
        assert result == HandshakeFailed("timeout")
        assert store.calls == 0
        assert isinstance(await raw.next_message(), ContactIdMessage)
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
        run_witness(role="responder", contact_id=fresh_id(), signaling=sig_b, webrtc=LOOPBACK,
                    store_token=store_b, timeout_s=TIMEOUT_S, on_progress=progress))
    initiator = asyncio.create_task(
        run_witness(role="initiator", contact_id=fresh_id(), signaling=sig_a, webrtc=LOOPBACK,
                    store_token=store_a, timeout_s=SHORT_TIMEOUT_S))
    await exchanging
    responder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await responder
    result = await initiator
    assert isinstance(result, HandshakeFailed)
    assert result.reason in ("channel_closed", "timeout")
    assert store_a.tokens == {}


async def test_wrong_token_is_refused_and_nothing_stored() -> None:
    store = DictStore()
    sig_a, sig_b, _ = signaling_pair()
    raw = RawPeer()
    try:
        responder = asyncio.create_task(
            run_witness(role="responder", contact_id=fresh_id(), signaling=sig_b,
                        webrtc=LOOPBACK, store_token=store, timeout_s=TIMEOUT_S))
        await raw.offer(sig_a)
        await asyncio.wait_for(raw.opened.wait(), TIMEOUT_S)
        raw.channel.send(encode(ContactIdMessage(contact_id=fresh_id())))
        assert isinstance(await raw.next_message(), ContactIdMessage)
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
            run_witness(role="responder", contact_id=fresh_id(), signaling=sig_b,
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
    result = await run_witness(role=role, contact_id=fresh_id(), signaling=BrokenSignaling(),
                               webrtc=LOOPBACK, store_token=DictStore(), timeout_s=TIMEOUT_S)
    assert result == HandshakeFailed("signaling_failed: ConnectionError")


async def test_unexpected_signal_and_bad_sdp() -> None:
    sig_a, sig_b, _ = signaling_pair()
    await sig_a.send("answer", "v=0\r\n")
    result = await run_witness(role="responder", contact_id=fresh_id(), signaling=sig_b,
                               webrtc=LOOPBACK, store_token=DictStore(), timeout_s=TIMEOUT_S)
    assert result == HandshakeFailed("unexpected_signal")

    await sig_a.send("offer", "this is not SDP")
    result = await run_witness(role="responder", contact_id=fresh_id(), signaling=sig_b,
                               webrtc=LOOPBACK, store_token=DictStore(), timeout_s=TIMEOUT_S)
    assert result == HandshakeFailed("bad_sdp")

    await sig_a.send("offer", "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n")
    result = await run_witness(role="responder", contact_id=fresh_id(), signaling=sig_b,
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
        result = await run_witness(role="initiator", contact_id=fresh_id(), signaling=sig_a,
                                   webrtc=webrtc, store_token=store, timeout_s=TIMEOUT_S)
        assert result == HandshakeFailed("candidate_outside_allowed")
        assert log == []  # nothing reached the broker
        assert store.calls == 0
    finally:
        transport.close()


async def test_no_ice_server_by_default() -> None:
    """Never Google's STUN: an explicit, empty server list unless configured."""
    from fanny_tui.peer import _rtc_configuration

    assert _rtc_configuration(WebRtcConfig()).iceServers == []
    configured = _rtc_configuration(WebRtcConfig(ice_servers=(
        IceServer(urls=("turn:127.0.0.1:3478",), username="u", credential="c"),)))
    assert configured.iceServers is not None
    assert [s.urls for s in configured.iceServers] == [["turn:127.0.0.1:3478"]]


# --- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"role": "boss"}, "role"),
    ({"contact_id": "not-a-uuid"}, "contact_id"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": float("nan")}, "timeout_s"),
    ({"webrtc": WebRtcConfig(host_addresses=("localhost",))}, "host_addresses"),
])
async def test_bad_arguments_raise_value_error(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"role": "initiator", "contact_id": fresh_id(),
                            "signaling": BrokenSignaling(), "webrtc": LOOPBACK,
                            "store_token": DictStore(), "timeout_s": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        await run_witness(**args)


# --- figures ---------------------------------------------------------------------------------


async def test_print_latency() -> None:
    """Print (not assert) the median createOffer -> completed latency on loopback."""
    opened: list[float] = []
    completed: list[float] = []
    lingers: list[float] = []
    for _ in range(5):
        marks: dict[str, float] = {}
        sig_a, sig_b, _ = signaling_pair()

        def progress(step: str, marks: dict[str, float] = marks) -> None:
            marks[step] = time.perf_counter()

        async def responder(sig: QueueSignaling = sig_b,
                            marks: dict[str, float] = marks) -> Any:
            result = await run_witness(role="responder", contact_id=fresh_id(), signaling=sig,
                                       webrtc=LOOPBACK, store_token=DictStore(),
                                       timeout_s=TIMEOUT_S)
            marks["responder_done"] = time.perf_counter()
            return result

        async def initiator(sig: QueueSignaling = sig_a,
                            marks: dict[str, float] = marks) -> Any:
            result = await run_witness(role="initiator", contact_id=fresh_id(), signaling=sig,
                                       webrtc=LOOPBACK, store_token=DictStore(),
                                       timeout_s=TIMEOUT_S, on_progress=progress)
            marks["initiator_done"] = time.perf_counter()
            return result

        result_a, result_b = await asyncio.gather(initiator(), responder())
        done = marks["initiator_done"]
        assert isinstance(result_a, HandshakeCompleted) and isinstance(result_b,
                                                                       HandshakeCompleted)
        opened.append(marks["exchanging"] - marks["connecting"])
        completed.append(done - marks["connecting"])
        lingers.append(marks["responder_done"] - marks["connecting"])
    print(f"\nloopback, 5 runs: createOffer -> channel open median "
          f"{statistics.median(opened) * 1000:.1f} ms; -> initiator completed and closed "
          f"{statistics.median(completed) * 1000:.1f} ms; -> responder closed "
          f"{statistics.median(lingers) * 1000:.1f} ms (linger bound {LINGER_S} s)")
