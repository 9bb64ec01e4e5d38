"""The UI's pure text functions (broker failures in plain words: tests/test_describe.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from rich.text import Text

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
from fanny_tui.positives import FINAL_REFUSALS
from fanny_tui.ui.formatting import (
    CLOSE_REASONS,
    EXPOSURE_NEXT_STEP,
    MAX_STATE,
    REFUSAL_TEXTS,
    compass_point,
    describe_event,
    describe_exposure,
    describe_gps_source,
    describe_refusal,
    fix_measured_at,
    format_accuracy,
    format_bearing,
    format_contact,
    format_distance,
    format_duration,
    format_fix_age,
    format_peer_state,
    format_retry,
    format_seconds,
    peer_name,
    poll_only_todo,
    too_coarse,
)

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
    # A log replay is not a receiver (fanny-tui report says so too).
    assert describe_gps_source("nmea") == "NMEA replay (no GPS)"
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
    lost = describe_event(ContactClosed(peer=2, reason="peer_closed", contact=CONTACT,
                                        token_stored=True))
    assert lost is not None and lost.plain.startswith(
        "peer 2: contact over (the peer closed it): ")
    assert lost.plain.endswith("; token stored")
    assert closed is not None and closed.plain == (
        "peer 2: contact over (parted): 2m05s within the radius, closest 2.1 m, "
        "median 4.0 m; no token")
    alert = describe_event(ExposureAlert(count=1, contacts=(CONTACT,)))
    assert alert is not None and "closest 2.1 m" in alert.plain


def test_failures_are_logged_in_plain_words_with_the_raw_reason():
    reason = "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 9)"
    line = describe_event(BrokerDisconnected(reason=reason, retry_in_s=3.0))
    assert line is not None and line.plain == f"no broker answers at that address ({reason})"
    # The words are fanny_tui.describe's (tests/test_describe.py), shared with the CLI.
    pending = describe_event(PositivePending(count=2, reason=reason, retry_in_s=1.0))
    assert pending is not None and pending.plain.startswith(
        "2 tokens kept until the broker has them: no broker answers at that address")


# -- the age of a fix -----------------------------------------------------------------------

ARRIVED = datetime(2026, 12, 1, 5, 30, 0, tzinfo=UTC)


@pytest.mark.parametrize(("gps_time", "measured", "from_gps"), [
    (None, ARRIVED, False),                                           # no GPS time
    (ARRIVED - timedelta(seconds=1.5), ARRIVED - timedelta(seconds=1.5), True),
    (ARRIVED + timedelta(seconds=2), ARRIVED + timedelta(seconds=2), True),   # clock behind
    (ARRIVED - timedelta(seconds=5), ARRIVED - timedelta(seconds=5), True),   # the bound
    (ARRIVED - timedelta(seconds=5.1), ARRIVED, False),
    (ARRIVED + timedelta(minutes=3), ARRIVED, False),
    (datetime(2005, 6, 8, 17, 15, 2, tzinfo=UTC), ARRIVED, False),   # a replayed log
    ((ARRIVED - timedelta(seconds=1)).replace(tzinfo=None), ARRIVED - timedelta(seconds=1),
     True),                                                           # zoneless: UTC
])
def test_a_fix_is_aged_from_its_gps_time_only_when_that_is_plausible(gps_time, measured,
                                                                     from_gps):
    assert fix_measured_at(gps_time, ARRIVED) == (measured, from_gps)


def test_the_age_says_when_it_counts_from_the_arrival():
    assert format_fix_age(1.25, ARRIVED, True) == (Text("1.2 s"), None)
    assert format_fix_age(0.0, None, False) == (Text("0.0 s"), None)
    age, note = format_fix_age(3.0, datetime(2005, 6, 8, 17, 15, 2, tzinfo=UTC), False)
    assert age.plain == "3.0 s since arrival"
    assert note is not None and note.plain == "GPS time 2005-06-08 17:15"
    assert len(note.plain) <= 25                      # the GPS half's value column at 80x24
    age, note = format_fix_age(None, ARRIVED.replace(tzinfo=None), False)
    assert age.plain == "– since arrival" and note is not None
    assert note.plain == "GPS time 2026-12-01 05:30"


def test_every_final_refusal_is_explained_with_what_to_do():
    assert set(REFUSAL_TEXTS) == FINAL_REFUSALS
    clock = describe_refusal("expiry_out_of_window", 4)
    assert "clock" in clock and "4 tokens stay on this device" in clock
    assert clock.endswith("declare again once this is fixed")
    assert describe_refusal("code_used", 1).endswith("declare again with a valid code")


def test_log_lines_about_another_broker_start_with_its_name():
    # Issue 8: events name their broker; the device's own broker's lines stay as they were.
    from fanny_tui.events import PositivesPolled, PositivesPollFailed

    assert describe_event(PositivesPolled(received=2)).plain == (
        "2 positive tokens received and compared here")
    assert describe_event(PositivesPolled(received=2, broker="city"), main="city").plain == (
        "2 positive tokens received and compared here")
    assert describe_event(PositivesPolled(received=2, broker="health")).plain == (
        "health: 2 positive tokens received and compared here")
    failed = PositivesPollFailed(reason="TimeoutError", since=datetime(2099, 1, 1, tzinfo=UTC),
                                 attempts=1, broker="health")
    assert describe_event(failed).plain == (
        "health: checking positives failed: the broker did not answer in time (TimeoutError)")
    assert describe_event(PositivesPolled(received=0, broker="health")) is None


# Every reason a witness exchange fails with (fanny_tui/protocol/handshake.py _fail,
# fanny_tui/peer.py _Abandon, fanny_tui/engine.py), as the engine reports it.
FAILURES = {
    "timeout": "timed out", "channel_closed": "channel closed",
    "broker_unavailable": "broker unreachable", "bad_message: binary frame": "bad message",
    "unexpected_message": "unexpected message", "store_failed: disk I/O error": "could not store",
    "stopped": "app stopped", "unsupported_version": "other version",
    "same_contact_id": "same contact ID", "token_mismatch": "token mismatch",
    "ack_mismatch": "ack mismatch", "bad_sdp": "bad SDP", "unexpected_signal": "bad signaling",
    "signaling_failed: ConnectionError": "signaling failed",
    "mdns_candidate_refused": ".local candidate", "no_relay_candidate": "no TURN relay",
    "candidate_outside_allowed": "address refused", "error: KeyError": "error",
    "peer_aborted: timeout": "peer: timed out", "peer_aborted: bad_sdp": "peer: bad SDP",
}


@pytest.mark.parametrize(("reason", "words"), FAILURES.items())
def test_a_failed_exchange_says_why_in_words_that_fit_80_columns(reason, words):
    shown = format_peer_state("failed", None, reason)
    assert shown == f"failed: {words}" and len(shown) <= MAX_STATE


def test_the_peer_state_says_how_a_contact_ended_and_fits_80_columns():
    assert format_peer_state("exchanging", "host", None) == "open (host)"
    assert format_peer_state("stored", "srflx/relay", None) == "stored (srflx/relay)"
    assert format_peer_state("closed", "host", "parted") == "closed: parted"
    # A rotation closes contacts while the app runs on: not "app stopped".
    assert format_peer_state("closed", "host", "rotated") == "closed: IDs rotated"
    assert format_peer_state("closed", "host", "stopped") == "closed: app stopped"
    assert format_peer_state("failed", None, None) == "failed"
    for reason in CLOSE_REASONS:
        assert len(format_peer_state("closed", "srflx/prflx", reason)) <= MAX_STATE
    long = "a remote reason far longer than the table's column"
    assert format_peer_state("failed", None, long) == "failed: a remote reason f…"
    assert len(format_peer_state("failed", None, long)) == MAX_STATE


def test_a_fix_too_coarse_for_the_radius_is_said_in_plain_words():
    # 3 r / sqrt(2): 21.21 m at 10 m (docs/protocol.md, "The accuracy rule").
    assert too_coarse(23.0, 10.0) == ("⚠ too coarse for 10 m contacts", "needs ±21 m or better")
    assert too_coarse(21.2, 10.0) is None and too_coarse(None, 10.0) is None
    assert too_coarse(4.3, 2.0) == ("⚠ too coarse for 2.0 m contacts", "needs ±4.2 m or better")


def test_a_poll_only_brokers_next_step_names_its_own_keys():
    assert poll_only_todo("start the broker, or check [broker] url") == (
        "start the broker, or check its url")
    assert poll_only_todo("set [broker] ca_file to the deployment's CA certificate (PEM)") == (
        "set its ca_file to the deployment's CA certificate (PEM)")
