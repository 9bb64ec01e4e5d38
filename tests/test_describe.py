"""Failures in plain words (fanny_tui.describe): real failures of the real client on loopback.

Each failure is produced for real where it can be on this machine (a closed loopback port, the
real broker serving wss:// with a throw-away CA from trustme, wss:// against a plain broker);
name resolution and HTTP refusals are given as the exception or reason text they produce, never
looked up on a network.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import trustme

from fanny_tui.describe import Explanation, explain
from fanny_tui.link import anonymous_connection

from .broker.kit import running
from .helpers import TIME_UNIT

_EXCEPTION_NAMES = ("Error", "Exception", "Errno", "SSL:", "InvalidStatus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _failure(url: str, context: ssl.SSLContext | None = None) -> BaseException:
    """The exception the client's anonymous connection (polls, uploads) raises for ``url``."""
    try:
        async with anonymous_connection(url, timeout_s=5 * TIME_UNIT, ssl_context=context):
            pass
    except Exception as exc:
        return exc
    raise AssertionError(f"{url} did not fail")


def _as_event_reason(exc: BaseException) -> str:
    """The reason text events carry (fanny_tui.engine / fanny_tui.link ``_describe``)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_plain(explanation: Explanation) -> None:
    line = str(explanation)
    assert "\n" not in line
    assert not any(name in explanation.what + explanation.todo for name in _EXCEPTION_NAMES), line


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    """A throw-away CA and a broker certificate for 127.0.0.1 (and one for another name)."""
    ca = trustme.CA()
    paths = {name: tmp_path / f"{name}.pem"
             for name in ("ca", "cert", "key", "other_cert", "other_key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for host, cert, key in (("127.0.0.1", "cert", "key"),
                            ("broker.example", "other_cert", "other_key")):
        issued = ca.issue_cert(host)
        issued.private_key_pem.write_to_path(str(paths[key]))
        for i, blob in enumerate(issued.cert_chain_pems):
            blob.write_to_path(str(paths[cert]), append=i > 0)
    return paths


async def test_a_broker_that_is_not_running():
    url = f"ws://127.0.0.1:{_free_port()}"
    exc = await _failure(url)
    explained = explain(exc, url=url)
    assert explained.what.startswith(f"nothing accepts connections at {url}")
    assert "start the broker" in explained.todo and "[broker] url" in explained.todo
    assert "Connect call failed" in explained.detail or "refused" in explained.detail
    _check_plain(explained)
    # The same words from the reason an event carries (broker_disconnected, positive_pending).
    assert explain(_as_event_reason(exc), url=url) == explained


async def test_tls_certificates_the_device_cannot_trust(tmp_path, pem):
    async with running(tmp_path, certfile=pem["cert"], keyfile=pem["key"]) as broker:
        exc = await _failure(broker.url, ssl.create_default_context())   # system CAs only
        explained = explain(exc, url=broker.url)
        assert "not signed by a CA this device trusts" in explained.what
        assert "[broker] ca_file" in explained.todo
        assert "CERTIFICATE_VERIFY_FAILED" in explained.detail
        _check_plain(explained)
        assert explain(_as_event_reason(exc), url=broker.url) == explained

    async with running(tmp_path, certfile=pem["other_cert"], keyfile=pem["other_key"]) as broker:
        trusting = ssl.create_default_context(cafile=str(pem["ca"]))
        exc = await _failure(broker.url, trusting)
        explained = explain(exc, url=broker.url)
        assert "for another host name" in explained.what, explained
        assert "host name the certificate names" in explained.todo
        _check_plain(explained)


async def test_wss_to_a_broker_without_tls_and_ws_to_one_with_tls(tmp_path, pem):
    async with running(tmp_path) as broker:
        url = broker.url.replace("ws://", "wss://")
        explained = explain(await _failure(url, ssl.create_default_context()), url=url)
        assert "may not speak TLS" in explained.what, explained
        assert "ws:// or wss://" in explained.todo
        _check_plain(explained)
    async with running(tmp_path, certfile=pem["cert"], keyfile=pem["key"]) as broker:
        url = broker.url.replace("wss://", "ws://")
        explained = explain(await _failure(url), url=url)
        assert "ws:// or wss://" in explained.todo, explained
        _check_plain(explained)


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
    ("connection closed (1001)", "was closed", "reconnects by itself"),
    ("SSLError: [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
     "does not speak TLS", "use ws://"),
    ("ConnectionError: the broker is not connected", "not connected", "wait"),
])
def test_known_failures_in_plain_words(failure, what, todo):
    explained = explain(failure, url="ws://broker.example:8765")
    assert what in explained.what, explained
    assert todo in explained.todo, explained
    _check_plain(explained)


def test_an_unknown_failure_keeps_its_text_on_one_line():
    explained = explain(RuntimeError("something\nnew " + "x" * 300))
    assert explained.what.startswith("unexpected failure (RuntimeError: something new x")
    assert "\n" not in str(explained)
    assert len(explained.detail) == 160 and explained.detail.endswith("…")
    assert "check the log" in explained.todo
    assert str(explain("")) == "an unknown failure: retry; if it lasts, check the log"
    assert explain(ConnectionRefusedError(111, "x")).what.startswith(
        "nothing accepts connections at the broker's address")
