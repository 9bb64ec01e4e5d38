"""The client's broker connections: wss:// verification, reconnection backoff, padded requests.

TLS runs end to end against the real broker serving ``wss://`` (``certfile``/``keyfile``) with a
throw-away CA made by trustme: a device trusting that CA connects, polls and declares over TLS;
a device trusting another CA reports the certificate failure and never says hello.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.server import ServerConnection, serve

from benchmarks.common import byte_relay, websocket_parts
from broker.server import BrokerSettings, start_broker
from fanny_tui.config import ConfigError
from fanny_tui.events import BrokerConnected, BrokerDisconnected, Event
from fanny_tui.link import BrokerLink, anonymous_connection, ssl_context_for
from fanny_tui.protocol.expiry import expiry_for
from fanny_tui.protocol.messages import (
    Error,
    Hello,
    PositivesPoll,
    encode,
)
from fanny_tui.store import TokenStore

from .helpers import (
    SESSION_ID,
    TIME_UNIT,
    collect_disconnects,
    fixed_at,
    link_config,
    loopback_port,
    running_device,
    tls_broker,
)


def _one_token(data_dir: Path) -> None:
    store = TokenStore.in_dir(data_dir)
    store.add("c" * 64, expiry_for(datetime.now(UTC)))
    store.close()


# -- the anonymous connection's opening handshake -----------------------------------------


async def test_an_empty_poll_opens_with_only_the_fields_rfc6455_requires(tmp_path, time_unit):
    """Each poll pays a fresh connection's handshake (docs/performance.md): the device sends
    no User-Agent on it, the broker's 101 carries no Date and no Server; /healthz keeps Date."""
    from fanny_tui.positives import poll_once

    store = TokenStore.in_dir(tmp_path / "device")
    try:
        settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "board.sqlite3")
        async with start_broker(settings) as broker, byte_relay(broker.port) as (port, counts):
            counts.capture = True
            result = await poll_once(store, f"ws://127.0.0.1:{port}", timeout_s=10 * time_unit)
            assert result.received == 0
            await asyncio.sleep(0.1 * time_unit)   # the last close frame crosses the relay
            parts = websocket_parts(bytes(counts.up_raw), bytes(counts.down_raw))
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            health = await asyncio.wait_for(reader.read(), 5 * time_unit)
            writer.close()
    finally:
        store.close()
    assert parts.request_fields == ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key",
                                    "Sec-WebSocket-Version"]
    assert parts.response_fields == ["Upgrade", "Connection", "Sec-WebSocket-Accept"]
    assert parts.total == parts.minimal_total + len("Switching Protocols")
    assert b"\r\nDate: " in health.partition(b"\r\n\r\n")[0]


# -- ssl_context_for ------------------------------------------------------------------------


def test_ws_needs_no_context():
    assert ssl_context_for(link_config("ws://127.0.0.1:1").broker) is None


def test_wss_verifies_against_the_system_cas_by_default():
    context = ssl_context_for(link_config("wss://broker.example:443").broker)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_wss_with_a_ca_file_trusts_that_ca(tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = ssl_context_for(link_config("wss://127.0.0.1:1", tmp_path / "ca.pem").broker)
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1


KEY_ONLY = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize("content", [None, "dir", "", "not a certificate\n", KEY_ONLY])
def test_a_bad_ca_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "ca.pem"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        ssl_context_for(link_config("wss://127.0.0.1:1", path).broker)
    text = str(caught.value)
    assert text.startswith("broker.ca_file: expected a readable PEM file") and str(path) in text
    assert "\n" not in text


def test_a_ca_file_for_a_ws_broker_is_a_mistake(tmp_path):
    with pytest.raises(ConfigError, match="broker.ca_file.*wss://"):
        ssl_context_for(link_config("ws://127.0.0.1:1", tmp_path / "ca.pem").broker)


# -- wss:// end to end ----------------------------------------------------------------------


async def test_a_device_trusting_the_ca_works_over_wss(tmp_path, pki):
    frames: list[str] = []
    async with tls_broker(tmp_path, pki, frames) as broker:
        _one_token(tmp_path / "dev")
        config = link_config(broker.url, pki["ca"])
        async with running_device(config, tmp_path / "dev", fixed_at()) as device:
            connected = await device.wait_event("broker_connected")
            assert connected.url == broker.url
            await device.wait_event("positives_polled")      # anonymous connection over TLS
            assert await device.engine.declare_positive() == 1
            declared = await device.wait_event("positive_declared")
            assert declared.count == 1
            # The declaration's ID rotation is the only disconnect: a new session at once.
            await device.wait_event("broker_disconnected")
            assert [e.reason for e in device.of("broker_disconnected")] == ["new session"]
    types = [json.loads(raw)["type"] for raw in frames]
    assert {"hello", "positives_poll", "positive_upload"} <= set(types)


async def test_a_device_trusting_another_ca_never_says_hello(tmp_path, pki):
    frames: list[str] = []
    async with tls_broker(tmp_path, pki, frames) as broker:
        _one_token(tmp_path / "dev")
        config = link_config(broker.url, pki["other"])
        async with running_device(config, tmp_path / "dev", fixed_at()) as device:
            first = await device.wait_event("broker_disconnected")
            await device.wait_for(lambda e: e.event == "broker_disconnected" and e is not first)
            # The anonymous connections fail the same way: the upload stays pending.
            assert await device.engine.declare_positive() == 1
            pending = await device.wait_event("positive_pending")
    assert "CERTIFICATE_VERIFY_FAILED" in first.reason, first.reason
    assert "CERTIFICATE_VERIFY_FAILED" in pending.reason, pending.reason
    assert not device.of("broker_connected") and not device.of("positive_declared")
    assert frames == []                        # not a byte of the protocol reached the broker


async def test_the_wrong_host_name_is_refused(tmp_path, pki):
    frames: list[str] = []
    async with tls_broker(tmp_path, pki, frames) as broker:
        url = broker.url.replace("127.0.0.1", "localhost")   # the certificate is for the IP
        context = ssl_context_for(link_config(url, pki["ca"]).broker)
        with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
            async with anonymous_connection(url, ssl_context=context, timeout_s=5) as ch:
                await ch.request(PositivesPoll(cursor=0))
    assert frames == []


# -- reconnection backoff -------------------------------------------------------------------


def _assert_backs_off(delays: list[float]) -> None:
    """0.1, 0.2, 0.4, 0.4... seconds, each +-20 %."""
    expected = [min(0.4, 0.1 * 2 ** i) for i in range(len(delays))]
    for got, want in zip(delays, expected, strict=True):
        assert want * 0.8 - 0.01 <= got <= want * 1.2 + 0.01, (delays, expected)


async def test_refused_connections_back_off_and_say_so():
    with loopback_port(listening=False) as port:        # connection refused
        url = f"ws://127.0.0.1:{port}"
        events = await collect_disconnects(url, 5)
    assert all("ConnectionRefusedError" in e.reason for e in events)
    assert len({e.reason for e in events}) == 1   # identical: the UI shows it once
    _assert_backs_off([e.retry_in_s for e in events])


async def test_a_broker_that_turns_the_hello_away_is_not_hammered():
    connections = 0

    async def refuse(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.recv()
        await ws.send(encode(Error(code="too_many_connections", message="try later")))
        await ws.close(1008)

    async with serve(refuse, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        events = await collect_disconnects(f"ws://127.0.0.1:{port}", 4)
    assert all("too_many_connections" in e.reason for e in events), events
    _assert_backs_off([e.retry_in_s for e in events])
    assert connections <= len(events) + 1        # one connection per announced retry


async def test_a_proxy_refusing_the_handshake_is_backed_off_not_fatal():
    async def forbid(connection: ServerConnection, request: Any) -> Any:
        return connection.respond(403, "no\n")

    async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=forbid) as server:
        port = server.sockets[0].getsockname()[1]
        events = await collect_disconnects(f"ws://127.0.0.1:{port}", 3)
    assert all("InvalidStatus" in e.reason and "403" in e.reason for e in events), events
    _assert_backs_off([e.retry_in_s for e in events])


# -- a new session (ID rotation) ------------------------------------------------------------

OTHER_SESSION_ID = "1f1e1d1c-1b1a-4918-9716-151413121110"


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_rehello_ends_the_session_and_starts_the_new_one_at_once(tmp_path):
    hellos: list[str] = []

    def record(kind: str, raw: str) -> None:
        if json.loads(raw).get("type") == "hello":
            hellos.append(json.loads(raw)["session_id"])

    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "board.sqlite3")
    events: list[Event] = []
    async with start_broker(settings, recorder=record) as broker:
        link = BrokerLink(broker.url, Hello(session_id=SESSION_ID, radius_m=10.0),
                          on_message=lambda m: None, on_event=events.append)
        task = asyncio.create_task(link.run())
        try:
            await _until(lambda: link.connected)
            await link.rehello(Hello(session_id=OTHER_SESSION_ID, radius_m=10.0))
            assert not link.connected   # nothing more is sent on the old session
            assert not await link.send(PositivesPoll(cursor=0))
            await _until(lambda: link.connected)
            assert broker.counts()["sessions"] == 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert hellos == [SESSION_ID, OTHER_SESSION_ID]
    kinds = [(type(e).__name__, getattr(e, "reason", None), getattr(e, "retry_in_s", None))
             for e in events]
    assert kinds == [("BrokerConnected", None, None), ("BrokerDisconnected", "new session", 0.0),
                     ("BrokerConnected", None, None)]


async def test_rehello_while_waiting_for_welcome_says_the_new_hello_before_any_message():
    """A rotation during the hello: the old session is never announced nor dispatched."""
    hellos: list[str] = []
    release = asyncio.Event()
    received: list[object] = []

    async def slow_broker(ws: ServerConnection) -> None:
        hello = json.loads(await ws.recv())
        hellos.append(hello["session_id"])
        if len(hellos) == 1:
            await release.wait()   # the first welcome comes after the rotation
        await ws.send(json.dumps({"type": "welcome", "radius_m": 10.0,
                                  "position_timeout_s": 60.0}))
        await ws.send(json.dumps({"type": "match", "peer_session_id": SESSION_ID,
                                  "role": "initiator"}))
        with contextlib.suppress(Exception):
            await ws.wait_closed()

    events: list[Event] = []
    async with serve(slow_broker, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        link = BrokerLink(f"ws://127.0.0.1:{port}", Hello(session_id=SESSION_ID, radius_m=10.0),
                          on_message=received.append, on_event=events.append)
        task = asyncio.create_task(link.run())
        try:
            await _until(lambda: hellos)
            await link.rehello(Hello(session_id=OTHER_SESSION_ID, radius_m=10.0))
            release.set()
            await _until(lambda: link.connected and received)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert hellos == [SESSION_ID, OTHER_SESSION_ID]
    assert len(received) == 1   # the match of the new session only
    assert [type(e).__name__ for e in events] == ["BrokerDisconnected", "BrokerConnected"]


# -- one region's brokers (issue 8): failover ------------------------------------------------


async def test_a_region_of_brokers_fails_over_in_turn_and_retries_the_failed_one(tmp_path):
    events: list[Event] = []
    with loopback_port(listening=False) as dead_port:
        dead = f"ws://127.0.0.1:{dead_port}"
        settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "board.sqlite3")
        async with start_broker(settings) as broker:
            live, port = broker.url, broker.port
            link = BrokerLink([dead, live], Hello(session_id=SESSION_ID, radius_m=10.0),
                              on_message=lambda m: None, on_event=events.append,
                              reconnect_min_s=0.05, reconnect_max_s=0.2, name="region")
            task = asyncio.create_task(link.run())
            try:
                await _until(lambda: link.connected, 5 * TIME_UNIT)
                assert link.url == live
                first = [e for e in events if isinstance(e, BrokerDisconnected)]
                assert [(e.url, e.broker) for e in first] == [(dead, "region")]
                assert first[0].retry_in_s > 0           # the backoff, then the next URL
                assert isinstance(events[-1], BrokerConnected)
                assert (events[-1].url, events[-1].broker) == (live, "region")
                seen = len(events)
            except BaseException:
                task.cancel()
                raise
        try:
            # The live broker stopped: resumed on it at once (a restart?), then back to the
            # first URL, round robin, which is still refused...
            await _until(lambda: sum(isinstance(e, BrokerDisconnected) and e.url == dead
                                     for e in events[seen:]) >= 2, 5 * TIME_UNIT)
            lost = [e for e in events[seen:] if isinstance(e, BrokerDisconnected)]
            assert (lost[0].url, lost[0].retry_in_s) == (live, 0.0)
            assert lost[1].url == live and lost[1].retry_in_s > 0
            assert {e.url for e in lost} == {dead, live}   # both tried in turn
            assert not link.connected
            # ...and the broker that failed is tried again: back up, the link returns to it.
            settings = BrokerSettings(host="127.0.0.1", port=port,
                                      db_path=tmp_path / "board.sqlite3")
            async with start_broker(settings):
                await _until(lambda: link.connected, 5 * TIME_UNIT)
                assert link.url == live
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
