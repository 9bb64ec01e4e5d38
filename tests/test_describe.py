"""Failures in plain words (fanny_tui.describe): real failures of the real client on loopback.

Each failure is produced for real where it can be on this machine (a closed loopback port, the
real broker serving wss:// with a throw-away CA from trustme, wss:// against a plain broker);
name resolution and HTTP refusals are given as the exception or reason text they produce, never
looked up on a network.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from fanny_tui.describe import Explanation, explain, explain_gps
from fanny_tui.events import GpsLost
from fanny_tui.gps import GpsdSource
from fanny_tui.link import _describe, anonymous_connection
from fanny_tui.protocol.messages import Error, encode

from .broker.kit import running
from .helpers import TIME_UNIT, collect_disconnects, loopback_port, tls_broker

_EXCEPTION_NAMES = ("Error", "Exception", "Errno", "SSL:", "InvalidStatus")


async def _failure(url: str, context: ssl.SSLContext | None = None) -> BaseException:
    """The exception the client's anonymous connection (polls, uploads) raises for ``url``."""
    try:
        async with anonymous_connection(url, timeout_s=5 * TIME_UNIT, ssl_context=context):
            pass
    except Exception as exc:
        return exc
    raise AssertionError(f"{url} did not fail")


def _check_plain(explanation: Explanation) -> None:
    """One line, no exception names; the headline and the next step fit the Session panel at
    80 columns (40 characters a line: the headline on one, the next step on two)."""
    line = str(explanation)
    assert "\n" not in line
    assert not any(name in explanation.what + explanation.todo + explanation.headline
                   for name in _EXCEPTION_NAMES), line
    assert 0 < len(explanation.headline) <= 40, explanation.headline
    assert len(explanation.todo) <= 2 * 38, explanation.todo


async def test_a_broker_that_is_not_running():
    with loopback_port(listening=False) as port:
        url = f"ws://127.0.0.1:{port}"
        exc = await _failure(url)
    explained = explain(exc, url=url)
    assert explained.what.startswith(f"nothing accepts connections at {url}")
    assert explained.headline == "no broker answers at that address"
    assert "start the broker" in explained.todo and "[broker] url" in explained.todo
    assert "Connect call failed" in explained.detail or "refused" in explained.detail
    assert explained.kind == "ConnectionRefusedError"
    _check_plain(explained)
    # The same words from the reason an event carries (broker_disconnected, positive_pending).
    assert explain(_describe(exc), url=url) == explained


async def test_tls_certificates_the_device_cannot_trust(tmp_path, pki):
    async with tls_broker(tmp_path, pki, []) as broker:
        exc = await _failure(broker.url, ssl.create_default_context())   # system CAs only
        explained = explain(exc, url=broker.url)
        assert "not signed by a CA this device trusts" in explained.what
        assert explained.headline == "the broker's certificate is not trusted"
        assert "[broker] ca_file" in explained.todo
        assert "CERTIFICATE_VERIFY_FAILED" in explained.detail
        _check_plain(explained)
        assert explain(_describe(exc), url=broker.url) == explained

        trusting = ssl.create_default_context(cafile=str(pki["ca"]))
        exc = await _failure(broker.url, ssl.create_default_context(cafile=str(pki["other"])))
        assert explain(exc).headline == "the broker's certificate is not trusted"

        url = broker.url.replace("127.0.0.1", "localhost")   # the certificate is for the IP
        exc = await _failure(url, trusting)
        assert "mismatch" in str(exc), exc
        explained = explain(exc, url=url)
        assert "for another host name" in explained.what, explained
        assert explained.headline == "certificate is for another host name"
        assert "host name the certificate names" in explained.todo
        _check_plain(explained)
        assert explain(_describe(exc), url=url) == explained


async def test_wss_to_a_broker_without_tls_and_ws_to_one_with_tls(tmp_path, pki):
    async with running(tmp_path) as broker:
        url = broker.url.replace("ws://", "wss://")
        explained = explain(await _failure(url, ssl.create_default_context()), url=url)
        assert "may not speak TLS" in explained.what, explained
        assert "ws:// or wss://" in explained.todo
        _check_plain(explained)
    async with tls_broker(tmp_path, pki, []) as broker:
        url = broker.url.replace("wss://", "ws://")
        explained = explain(await _failure(url), url=url)
        assert "ws:// or wss://" in explained.todo, explained
        _check_plain(explained)


# -- the reasons the broker link itself reports (broker_disconnected), made for real ----------


async def test_the_link_reports_a_refused_connection():
    with loopback_port(listening=False) as port:
        [event] = await collect_disconnects(f"ws://127.0.0.1:{port}", 1)
    assert event.reason.startswith("ConnectionRefusedError: [Errno 111]"), event.reason
    explained = explain(event.reason)
    assert explained.headline == "no broker answers at that address"
    assert explained.todo == "start the broker, or check [broker] url"


async def test_the_link_reports_a_server_that_is_not_a_broker():
    async def forbid(connection: ServerConnection, request: Any) -> Any:
        return connection.respond(403, "no\n")

    async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=forbid) as server:
        port = server.sockets[0].getsockname()[1]
        [event] = await collect_disconnects(f"ws://127.0.0.1:{port}", 1)
    explained = explain(event.reason)
    assert explained.headline == "not a FANNY broker (HTTP 403)", event.reason
    assert "path in [broker] url" in explained.todo and "reverse proxy" in explained.todo
    _check_plain(explained)


async def test_the_link_reports_a_busy_broker():
    async def refuse(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(encode(Error(code="too_many_connections", message="try later")))
        with contextlib.suppress(Exception):
            await ws.close(1008)

    async with serve(refuse, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        [event] = await collect_disconnects(f"ws://127.0.0.1:{port}", 1)
    assert event.reason.startswith("bad answer to hello: broker refused: too_many_connections")
    explained = explain(event.reason)
    assert explained.headline == "broker busy (too_many_connections)", event.reason
    assert "retries by itself" in explained.todo
    _check_plain(explained)


@pytest.mark.parametrize(("reason", "headline"), [
    # Formatted by fanny_tui.link.BrokerLink.run itself:
    ("connection closed (1001)", "the broker is restarting or stopping"),
    ("connection closed (no close frame)", "the connection to the broker dropped"),
    ("closed by the broker", "the connection to the broker dropped"),
    ("no answer to hello", "the broker did not answer in time"),
    ("bad answer to hello: expected welcome, got Matched",
     "the broker's answer was not understood"),
    ("bad answer to hello: broker refused: unsupported_protocol: version 9 (field protocol)",
     "broker refused (unsupported_protocol)"),
    # As Python words these errors (socket.gaierror, OSError, TimeoutError):
    ("gaierror: [Errno -2] Name or service not known", "the broker's host name is unknown"),
    ("OSError: [Errno 101] Network is unreachable", "no network route to the broker"),
    ("TimeoutError: timed out during opening handshake", "the broker did not answer in time"),
])
def test_the_link_reasons_have_short_headlines(reason, headline):
    explained = explain(reason)
    assert explained.headline == headline
    _check_plain(explained)


# -- the rest, from the exception or the reason text ---------------------------------------


@pytest.mark.parametrize(("failure", "what", "todo"), [
    (socket.gaierror(-2, "Name or service not known"), "cannot be resolved", "(DNS)"),
    ("gaierror: [Errno -3] Temporary failure in name resolution", "cannot be resolved", "DNS"),
    (OSError(101, "Network is unreachable"), "no network route", "network connection"),
    ("InvalidStatus: server rejected WebSocket connection: HTTP 503", "overloaded or "
     "unavailable (HTTP 503)", "retries by itself"),
    ("InvalidStatus: server rejected WebSocket connection: HTTP 404", "answered HTTP 404",
     "reverse proxy"),
    (TimeoutError(), "did not answer in time", "network"),
    ("timeout", "did not answer in time", "network"),
    ("no answer to hello", "did not answer in time", "network"),
    ("bad answer to hello: expected welcome, got Error", "did not answer the hello",
     "same kit version"),
    ("connection closed (1001)", "is restarting or stopping", "reconnects by itself"),
    ("connection closed (no close frame)", "was closed", "reconnects by itself"),
    ("SSLError: [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
     "does not speak TLS", "use ws://"),
    ("ConnectionError: the broker is not connected", "not connected", "wait"),
    ("SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
     "certificate has expired (_ssl.c:1006)", "has expired", "clock"),
    ("ConnectionResetError: [Errno 104] Connection reset by peer", "dropped the connection",
     "ws:// or wss://"),
    ("InvalidMessage: did not receive a valid HTTP response", "does not answer like a FANNY",
     "ws:// or wss://"),
    ("bad answer to hello: broker refused: rate_limited: slow down", "is busy", "retries"),
    ("broker refused: unavailable: try again later", "could not use its positive-token board",
     "operator"),
])
def test_known_failures_in_plain_words(failure, what, todo):
    explained = explain(failure, url="ws://broker.example:8765")
    assert "broker.example" not in explained.headline
    assert what in explained.what, explained
    assert todo in explained.todo, explained
    _check_plain(explained)


def test_an_unknown_failure_keeps_its_text_on_one_line():
    explained = explain(RuntimeError("something\nnew " + "x" * 300))
    assert explained.what.startswith("unexpected failure (RuntimeError: something new x")
    assert "\n" not in str(explained)
    assert len(explained.detail) == 160 and explained.detail.endswith("…")
    assert "check the log" in explained.todo
    assert explained.headline == "unexpected failure"
    assert str(explain("")) == "an unknown failure: retry; if it lasts, check the log"
    assert explained.kind == "RuntimeError"
    assert explain("no answer to hello").kind == ""       # a phrase names no type
    assert explain(ConnectionRefusedError(111, "x")).what.startswith(
        "nothing accepts connections at the broker's address")


# -- GPS failures ----------------------------------------------------------------------------


async def _first_loss(port: int) -> str:
    """The reason of the first ``gps_lost`` the real gpsd client gives for ``port``."""
    stream = GpsdSource("127.0.0.1", port, stale_after_s=30.0, connect_timeout_s=TIME_UNIT
                        ).stream()
    try:
        item = await anext(stream)
    finally:
        await stream.aclose()
    assert isinstance(item, GpsLost)
    return item.reason


def _check_gps_plain(explanation: Explanation) -> None:
    """The headline fits the GPS half of the Session panel at 80 columns (25 characters), the
    next step three of its lines; no exception names."""
    _check_plain(explanation)
    assert len(explanation.headline) <= 25, explanation.headline


async def test_gpsd_not_running_says_start_gpsd():
    with loopback_port(listening=False) as port:
        reason = await _first_loss(port)
    explained = explain_gps(reason)
    assert explained.headline == "gpsd is not running", (reason, explained)
    assert "start gpsd" in explained.todo and "[gps] host and port" in explained.todo
    assert explained.detail == reason
    _check_gps_plain(explained)


@pytest.mark.parametrize(("reason", "headline", "todo"), [
    # As fanny_tui.gps makes them (the other real ones need a receiver or gpsd's states).
    ("gpsd at 127.0.0.1:2947 did not answer within 5 s", "gpsd does not answer",
     "systemctl status gpsd"),
    ("gpsd at 127.0.0.1:2947 unreachable: Network is unreachable", "gpsd does not answer",
     "[gps] host and port"),
    ("connection to gpsd at 127.0.0.1:2947 lost: Connection reset by peer", "gpsd went away",
     "reconnecting"),
    ("gpsd closed the connection", "gpsd went away", "restart gpsd"),
    ("no position from gpsd for 5 s", "gpsd sends no position", "cgps"),
    ("no fix (gpsd mode 1)", "the receiver has no fix", "sky"),
    ("receiver in simulation mode (gpsd status 8)", "position not measured", "cgps"),
    ("receiver in dead-reckoning mode, position not measured (NMEA GGA quality 6)",
     "position not measured", "normal GNSS"),
    ("no fix in the NMEA log (RMC status V or GGA quality 0)", "no fix in the NMEA log",
     "[gps] path"),
    ("something new", "no usable position", "cgps"),
])
def test_gps_failures_in_plain_words(reason, headline, todo):
    explained = explain_gps(reason)
    assert explained.headline == headline, explained
    assert todo in explained.todo, explained
    _check_gps_plain(explained)
