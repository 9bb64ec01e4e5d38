"""The UI's pure text functions; broker failures mapped from the real strings the link makes."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from fanny_tui.events import (
    BrokerDisconnected,
    Contact,
    ContactClosed,
    ExposureAlert,
    HandshakeProgress,
    PeerUpdate,
    PositivePending,
    PositivesPolled,
    TokenStored,
)
from fanny_tui.link import _describe, anonymous_connection, ssl_context_for
from fanny_tui.positives import FINAL_REFUSALS
from fanny_tui.protocol.messages import Error, PositivesPoll, encode
from fanny_tui.ui.formatting import (
    EXPOSURE_NEXT_STEP,
    REFUSAL_TEXTS,
    compass_point,
    describe_event,
    describe_exposure,
    describe_failure,
    describe_gps_source,
    describe_refusal,
    format_accuracy,
    format_bearing,
    format_contact,
    format_distance,
    format_duration,
    format_retry,
    format_seconds,
    peer_name,
)
from tests.test_link import _collect_disconnects, _config, pki, tls_broker  # noqa: F401

from .kit import loopback_port

CONTACT = Contact(duration_s=125.0, closest_m=2.14, median_m=4.0, samples=25)


# -- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(("bearing", "point"), [
    (0, "N"), (22.4, "N"), (22.6, "NE"), (45, "NE"), (90, "E"), (135, "SE"), (180, "S"),
    (225, "SW"), (270, "W"), (315, "NW"), (337.6, "N"), (359.9, "N"), (-90, "W"), (720, "N"),
])
def test_compass_points(bearing, point):
    assert compass_point(bearing) == point


def test_bearing_distance_and_accuracy():
    assert format_bearing(47.3) == "047° NE"
    assert format_bearing(359.7) == "000° N"
    assert format_bearing(None) == "–"
    assert format_distance(4.26) == "4.3 m"
    assert format_distance(14.2) == "14 m"
    assert format_distance(1234) == "1.2 km"
    assert format_distance(None) == "–"
    assert format_accuracy(4.2) == "±4.2 m"
    assert format_accuracy(None) == "–"


def test_durations():
    assert format_duration(0) == "0s"
    assert format_duration(59.9) == "59s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3725) == "1h02m"
    assert format_duration(-3) == "0s"
    assert format_duration(None) == "–"
    assert format_seconds(1.26) == "1.3 s"
    assert format_seconds(125) == "2m05s"
    assert format_seconds(None) == "–"


def test_retry_is_counted_down_in_whole_seconds_rounded_up():
    assert format_retry(27.76) == "retry in 28 s"
    assert format_retry(0.2) == "retry in 1 s"
    assert format_retry(0) == "retrying…"
    assert format_retry(-4) == "retrying…"


def test_peer_names_and_contacts():
    assert peer_name(3) == "peer 3"
    assert format_contact(CONTACT) == "2m05s ≤2.1 m"
    assert format_contact(Contact(40, None, None, 0)) == "40s"
    assert format_contact(None) == "–"


def test_gps_sources_that_are_not_receivers_say_so():
    assert describe_gps_source("gpsd") is None
    assert describe_gps_source("nmea") is None
    assert describe_gps_source("fixed") == "fixed position (no GPS)"
    assert describe_gps_source("walk") == "simulated walk (no GPS)"
    assert describe_gps_source("track") == "simulated track (no GPS)"
    assert describe_gps_source("replay") == "replay (no GPS)"


def test_exposure_gives_the_contacts_and_a_next_step():
    text = describe_exposure(2, [CONTACT, Contact(40, 8.0, 9.0, 8)])
    assert text.startswith("⚠ EXPOSURE ALERT: 2 stored tokens were declared positive")
    assert "2m05s within the radius, closest 2.1 m, median 4.0 m; 40s" in text
    compact = describe_exposure(1, [CONTACT], compact=True)
    assert compact == ("⚠ EXPOSURE ALERT: 1 stored token was declared positive: "
                       "contact 2m05s ≤2.1 m")
    assert len(compact) <= 78 and len(EXPOSURE_NEXT_STEP) <= 78   # one line each at 80x24
    assert "get tested" in EXPOSURE_NEXT_STEP and "? help" in EXPOSURE_NEXT_STEP


# -- the log: what matters, not what is routine ---------------------------------------------


def test_routine_events_are_not_logged():
    assert describe_event(PositivesPolled(received=0, next_poll_in_s=300)) is None
    assert describe_event(HandshakeProgress(peer=1, state="connecting")) is None
    assert describe_event(PeerUpdate(peer=1, distance_m=3, bearing_deg=0, peer_accuracy_m=4,
                                     within="in", within_s=3, samples=2)) is None
    assert describe_event(PositivesPolled(received=4)) is not None


def test_contacts_are_logged_with_their_measures():
    expires = datetime(2099, 1, 5, 4, tzinfo=UTC)
    stored = describe_event(TokenStored(peer=2, token="ab" * 32, expires_at=expires,
                                        contact=CONTACT, match_to_token_s=1.2))
    assert stored is not None and stored.plain == (
        "peer 2: token abababab… stored, expires 2099-01-05 04:00 UTC "
        "(2m05s within the radius, closest 2.1 m, median 4.0 m)")
    closed = describe_event(ContactClosed(peer=2, reason="parted", contact=CONTACT,
                                          token_stored=False))
    assert closed is not None and closed.plain == (
        "peer 2: contact over (parted): 2m05s within the radius, closest 2.1 m, "
        "median 4.0 m; no token")
    alert = describe_event(ExposureAlert(count=1, contacts=(CONTACT,)))
    assert alert is not None and "closest 2.1 m" in alert.plain


def test_failures_are_logged_in_plain_words_with_the_raw_reason():
    reason = "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 9)"
    line = describe_event(BrokerDisconnected(reason=reason, retry_in_s=3.0))
    assert line is not None and line.plain == f"no broker answers at that address ({reason})"
    pending = describe_event(PositivePending(count=2, reason=reason, retry_in_s=1.0))
    assert pending is not None and pending.plain.startswith(
        "2 tokens kept until the broker has them: no broker answers at that address")


# -- broker failures, from the real strings -------------------------------------------------


async def test_a_refused_connection_in_plain_words():
    with loopback_port(listening=False) as port:
        [event] = await _collect_disconnects(f"ws://127.0.0.1:{port}", 1)
    assert event.reason.startswith("ConnectionRefusedError: [Errno 111]"), event.reason
    failure = describe_failure(event.reason)
    assert failure.problem == "no broker answers at that address"
    assert failure.hint == "start fanny-broker or fix [broker] url"


async def _tls_failure(url: str, ca_file: Any) -> str:
    context = ssl_context_for(_config(url, ca_file).broker)
    try:
        async with anonymous_connection(url, ssl_context=context, timeout_s=5) as channel:
            await channel.request(PositivesPoll(cursor=0))
    except Exception as exc:  # the engine reports it this way (positive_pending)
        return _describe(exc)
    raise AssertionError("the TLS connection should have failed")


async def test_tls_failures_in_plain_words(tmp_path, pki):  # noqa: F811 (pki: a fixture)
    async with tls_broker(tmp_path, pki, []) as broker:
        untrusted = await _tls_failure(broker.url, pki["other"])
        wrong_name = await _tls_failure(broker.url.replace("127.0.0.1", "localhost"), pki["ca"])
    assert untrusted.startswith("SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED]")
    assert describe_failure(untrusted).problem == "the broker's certificate is not trusted"
    assert "[broker] ca_file" in describe_failure(untrusted).hint
    assert "mismatch" in wrong_name, wrong_name
    assert describe_failure(wrong_name).problem == "certificate is for another host name"


async def test_a_server_that_is_not_a_broker_in_plain_words():
    async def forbid(connection: ServerConnection, request: Any) -> Any:
        return connection.respond(403, "no\n")

    async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=forbid) as server:
        port = server.sockets[0].getsockname()[1]
        [event] = await _collect_disconnects(f"ws://127.0.0.1:{port}", 1)
    assert describe_failure(event.reason).problem == (
        "[broker] url is not a FANNY broker (HTTP 403)"), event.reason


async def test_a_busy_broker_in_plain_words():
    async def refuse(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(encode(Error(code="too_many_connections", message="try later")))
        with contextlib.suppress(Exception):
            await ws.close(1008)

    async with serve(refuse, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        [event] = await _collect_disconnects(f"ws://127.0.0.1:{port}", 1)
    failure = describe_failure(event.reason)
    assert failure.problem == (
        "the broker turned this device away (too_many_connections)"), event.reason


@pytest.mark.parametrize(("reason", "problem"), [
    # Formatted by fanny_tui.link.BrokerLink.run itself:
    ("connection closed (1001)", "the broker is restarting or stopping"),
    ("connection closed (no close frame)", "the connection to the broker dropped"),
    ("no answer to hello", "the broker did not answer in time"),
    ("bad answer to hello: expected welcome, got Matched",
     "the broker's answer was not understood"),
    # As Python words these errors (socket.gaierror, OSError, TimeoutError):
    ("gaierror: [Errno -2] Name or service not known", "the broker's host name is unknown"),
    ("OSError: [Errno 101] Network is unreachable", "no network route to the broker"),
    ("TimeoutError: timed out during opening handshake", "the broker did not answer in time"),
])
def test_other_failures_in_plain_words(reason, problem):
    assert describe_failure(reason).problem == problem


def test_an_unknown_failure_keeps_its_first_words_as_the_hint():
    failure = describe_failure("ValueError: " + "x" * 100 + "\nsecond line")
    assert failure.problem == "cannot reach the broker"
    assert failure.hint.startswith("ValueError: xxx") and failure.hint.endswith("…")
    assert len(failure.hint) == 60
    assert describe_failure("").hint == "no reason given"


def test_every_failure_fits_the_session_panel_at_80_columns():
    # At 80 columns the broker half has 40 characters a line: the problem takes one (its
    # detail in parentheses may wrap), the hint ("→ " first) at most two.
    reasons = ["ConnectionRefusedError", "CERTIFICATE_VERIFY_FAILED", "Hostname mismatch",
               "SSLError", "gaierror", "Network is unreachable", "InvalidStatus",
               "too_many_connections", "broker refused", "bad answer to hello",
               "no answer to hello", "connection closed (1001)", "connection closed"]
    for reason in reasons:
        failure = describe_failure(reason)
        assert len(failure.problem) <= 40, failure
        assert len(failure.hint) <= 2 * 38, failure


def test_every_final_refusal_is_explained_with_what_to_do():
    assert set(REFUSAL_TEXTS) == FINAL_REFUSALS
    clock = describe_refusal("expiry_out_of_window", 4)
    assert "clock" in clock and "4 tokens stay on this device" in clock
    assert clock.endswith("declare again once this is fixed")
    assert describe_refusal("code_used", 1).endswith("declare again with a valid code")
