"""The runner: settings, time compression, and a real run (broker + 3 real engines)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from fanny_tui.config import ConfigError
from fanny_tui.events import Contact, ContactClosed, IdsRotated, MatchFound, TokenStored
from fanny_tui.sim.metrics import evaluate
from fanny_tui.sim.runner import (
    BROKER_COOLDOWN_S,
    SimError,
    _Recorder,
    device_config,
    device_protocol,
    grid,
    judge_close,
    pair_reports,
    prepare,
    run_scenario,
    scenario_truth,
    simulated_broker,
    split_settings,
)
from fanny_tui.sim.scenario import Scenario, TruthSpec, load_scenario
from fanny_tui.sim.tracks import SimClock
from fanny_tui.sim.truth import TrueContact, true_contacts
from tests.helpers import TIME_UNIT
from tests.sim.conftest import standing


def test_protocol_durations_are_divided_by_the_speed_and_the_speed_bound_multiplied():
    values = device_protocol({"position_interval_s": 5.0, "min_contact_s": 300.0},
                             {"radius_m": 15.0, "min_contact_s": 60.0}, speed=10.0)
    assert values["radius_m"] == 15.0                       # distances are not scaled
    assert values["position_interval_s"] == 0.5
    assert values["min_contact_s"] == 6.0                   # the override wins, then scaled
    assert values["contact_gap_s"] == 3.0                   # the default 30 s, scaled
    assert values["max_contact_s"] == 360.0
    assert values["poll_interval_s"] == 30.0
    assert values["max_speed_mps"] == 300.0
    assert values["handshake_timeout_s"] == 20.0            # network time is real time


def test_the_device_configuration_is_loopback_only_and_scaled():
    config = device_config("ws://127.0.0.1:9", device_protocol({}, {}, 10.0), 10.0)
    assert config.webrtc.host_addresses == ("127.0.0.1",)
    assert config.protocol.position_interval_s == 0.5
    assert config.privacy.rotation_interval_s == 90.0       # the default 900 s, scaled
    assert config.broker.url == "ws://127.0.0.1:9"


def test_a_swept_rotation_interval_is_scaled_like_the_default(small_scenario):
    config = device_config("ws://127.0.0.1:9", device_protocol({}, {}, 10.0), 10.0,
                           rotation_interval_s=300.0)
    assert config.privacy.rotation_interval_s == 30.0
    scenario = load_scenario(small_scenario)
    prepare(scenario, {"rotation_interval_s": 300.0}, None)        # 30 s real: fine
    with pytest.raises(SimError, match="privacy.rotation_interval_s"):
        prepare(scenario, {"rotation_interval_s": 5.0}, None)      # 0.5 s real: below 1 s


def test_a_speed_that_pushes_a_setting_out_of_range_is_said_in_terms_of_the_speed():
    # trial: --speed 40 blamed protocol.max_speed_mps, a setting the user never set
    with pytest.raises(SimError) as raised:
        device_protocol({}, {}, speed=40.0)
    assert str(raised.value) == (
        "--speed 40: max_speed_mps 30 x 40 = 1200 is out of range (expected a number > 0 and "
        "<= 1000); the fastest speed for these settings is 33.3")
    device_protocol({}, {}, speed=33.3)   # the speed it names works
    with pytest.raises(SimError, match=r"^\[scenario\] speed 0.01: max_contact_s 3600 / 0.01 = "
                                       r"360000 .* the slowest speed for these settings is "
                                       r"0.0417$"):
        device_protocol({}, {}, speed=0.01, speed_name="[scenario] speed")
    device_protocol({}, {}, speed=0.0417)
    with pytest.raises(ConfigError, match="protocol.max_speed_mps"):  # wrong before scaling
        device_protocol({"max_speed_mps": 2000.0}, {}, speed=1.0)


def test_the_brokers_cooldown_is_swept_in_scenario_seconds_and_scaled(tmp_path):
    protocol = device_protocol({}, {}, 10.0)
    default = simulated_broker(tmp_path / "b.sqlite3", protocol, 10.0)
    assert default.cooldown_s == BROKER_COOLDOWN_S / 10.0 == 30.0
    _, _, _, broker = split_settings({"cooldown_s": 60.0})
    swept = simulated_broker(tmp_path / "b.sqlite3", protocol, 10.0, **broker)
    assert swept.cooldown_s == 6.0 and swept.host == "127.0.0.1"
    assert swept.max_speed_mps == protocol["max_speed_mps"] == 300.0


def test_settings_are_split_into_protocol_noise_and_privacy_keys():
    assert split_settings({"radius_m": 15, "sigma_m": 3, "rotation_interval_s": 300,
                           "cooldown_s": 60}) == (
        {"radius_m": 15.0}, {"sigma_m": 3.0}, {"rotation_interval_s": 300.0},
        {"cooldown_s": 60.0})
    with pytest.raises(SimError, match="radius: not a setting"):
        split_settings({"radius": 15})
    with pytest.raises(SimError, match="cooldown_s: expected a number of seconds > 0"):
        split_settings({"cooldown_s": 0})


def test_the_sweep_is_the_cartesian_product_in_order():
    assert grid({}) == [{}]
    assert grid({"radius_m": [10, 15], "min_contact_s": [0, 60, 300]}) == [
        {"radius_m": 10, "min_contact_s": 0}, {"radius_m": 10, "min_contact_s": 60},
        {"radius_m": 10, "min_contact_s": 300}, {"radius_m": 15, "min_contact_s": 0},
        {"radius_m": 15, "min_contact_s": 60}, {"radius_m": 15, "min_contact_s": 300}]


def test_prepare_checks_a_run_before_it_starts(small_scenario):
    scenario = load_scenario(small_scenario)
    speed, protocol, noise = prepare(scenario, {"sigma_m": 4.0}, None)
    assert speed == 10.0 and protocol["position_interval_s"] == 0.5 and noise.sigma_m == 4.0
    with pytest.raises(SimError, match="noise.sigma_m"):
        prepare(scenario, {"sigma_m": -1.0}, None)
    with pytest.raises(SimError, match="--speed"):
        prepare(scenario, {}, 0.0)


async def test_a_small_scenario_with_real_engines_finds_the_one_true_pair(small_scenario,
                                                                           tmp_path):
    scenario = load_scenario(small_scenario)
    result = await run_scenario(scenario, tmp_path / "run",
                                connect_timeout_s=20 * TIME_UNIT)
    m = result.metrics
    assert [c.pair for c in result.contacts] == [("a", "b")]
    # the truth comes from the noise-free tracks (3 m apart all along), not from the fixes the
    # devices saw (sigma 1 m: their closest would be nearer or farther than 3 m)
    [contact] = result.contacts
    assert (contact.start_s, contact.end_s) == (0.0, 150.0)
    assert contact.closest_m == pytest.approx(3.0, abs=0.01)
    assert (m.true_pairs, m.detected_pairs, m.hits) == (1, 1, 1), m
    assert (m.precision, m.recall) == (1.0, 1.0)
    assert result.tokens == 1 and result.matches >= 1 and result.failures == {}
    # the token came after the scenario began and before it ended (scenario seconds)
    assert 0.0 < m.latencies_s[0] < scenario.duration_s
    assert result.devices == 3 and result.speed == 10.0
    assert result.real_s >= scenario.duration_s / result.speed
    assert result.cpu_s > 0.0
    record = result.as_dict()
    assert record["precision"] == 1.0 and record["true_contacts"][0]["pair"] == ["a", "b"]
    # the pair's truth beside its measures: 3 m apart all along, measured within the radius
    [report] = result.pairs
    assert (report.pair, report.true, report.detected) == (("a", "b"), True, True)
    assert report.true_closest_m == pytest.approx(3.0, abs=0.01)
    assert report.true_within_s == pytest.approx(150.0)
    assert report.first_token_s == m.latencies_s[0]
    assert report.measured_closest_m is not None and report.measured_closest_m < 10.0
    assert record["pairs"][0]["pair"] == ["a", "b"]
    # the pair's history from the engines' events: the match that made the token, its channel
    # opened on both sides, and the contact's measures at the close (the end of the run)
    # (a second the two sides round apart is given per device: each() takes both)
    first = report.history[0]
    match_s, channel_s, token_s = (each(first[k]) for k in ("match_s", "channel_s", "token_s"))
    assert min(match_s) >= 0.0 and max(match_s) <= min(channel_s) + 1
    assert max(channel_s) <= min(token_s) + 1 and max(token_s) <= report.first_token_s + 1
    assert first["role"] in ({"a": "initiator", "b": "responder"},
                             {"a": "responder", "b": "initiator"})
    assert first["failure"] is None
    assert record["pairs"][0]["history"] == list(report.history)
    assert result.unlinked == 0 == record["unlinked"]   # every exchange's peer was told
    # the closer tier ([truth] close_radius_m = 5): a and b, 3 m apart, are a close pair
    assert report.close is True and result.close is not None
    assert (result.close.true_pairs, result.close.hits, result.close.recall) == (1, 1, 1.0)
    assert record["close"] == {"radius_m": 5.0, "true_pairs": 1, "hits": 1, "recall": 1.0,
                               "missed_pairs": []}
    # nothing rotates in 150 s (the interval is 900 s), and no contact was cut by a rotation
    assert result.rotations == {}
    assert set(result.closes) <= {"stopped", "peer_closed", "channel_lost"}, result.closes


def each(value: Any) -> list[Any]:
    """The values of a history field: one, or one per device where the two sides differ."""
    return list(value.values()) if isinstance(value, dict) else [value]


def test_the_recorder_counts_closes_and_rotations_and_scales_measures_back():
    recorder = _Recorder(SimClock(10.0))
    contact = Contact(duration_s=12.5, closest_m=1.5, median_m=4.0, samples=20)
    recorder(MatchFound(peer=1, role="initiator"))
    recorder(TokenStored(peer=1, token="t1", expires_at=datetime(2026, 5, 20, 4, tzinfo=UTC),
                         contact=contact, match_to_token_s=0.8))
    recorder(ContactClosed(peer=1, reason="parted", contact=contact, token_stored=True))
    recorder(ContactClosed(peer=2, reason="parted", contact=contact, token_stored=False))
    recorder(ContactClosed(peer=3, reason="max_contact", contact=contact, token_stored=True))
    recorder(IdsRotated(reason="schedule"))
    assert recorder.matches == 1
    assert dict(recorder.closes) == {"parted": 2, "max_contact": 1}
    assert dict(recorder.rotations) == {"schedule": 1}
    # engine (real) seconds times the speed: scenario seconds; distances unchanged
    assert recorder.match_to_token_s == [8.0]
    assert recorder.contacts_s == [125.0, 125.0, 125.0]
    [stored] = recorder.measured["t1"]
    assert (stored.duration_s, stored.closest_m, stored.median_m) == (125.0, 1.5, 4.0)


def test_pair_reports_set_the_truth_beside_the_measures():
    tracks = (standing("a", 0, 0, 0, 400), standing("b", 3, 0, 0, 400),
              standing("c", 40, 0, 0, 400), standing("d", 0, 5, 100, 150))
    scenario = Scenario(name="t", tracks=tracks, duration_s=400.0,
                        truth=TruthSpec(radius_m=10.0, duration_s=300.0))
    contacts = true_contacts(tracks, 10.0, 300.0)
    assert [c.pair for c in contacts] == [("a", "b")]
    # a-c detected though 40 m apart (a false pair), a-b missed, b-d never a true contact
    first = {("a", "c"): 50.0}
    metrics = evaluate(contacts, first)
    reports = pair_reports(scenario, metrics, first,
                           {("a", "c"): [Contact(90.0, 6.0, 9.0, 18), Contact(40.0, 8.0, 9.5, 8)]})
    assert [r.pair for r in reports] == [("a", "b"), ("a", "c")]
    missed, false = reports
    assert (missed.true, missed.detected, missed.first_token_s) == (True, False, None)
    assert missed.true_closest_m == pytest.approx(3.0, abs=0.01)
    assert missed.true_within_s == pytest.approx(400.0) == missed.true_longest_s
    assert missed.measured_within_s is None and missed.measured_closest_m is None
    assert (false.true, false.detected, false.first_token_s) == (False, True, 50.0)
    assert false.true_closest_m == pytest.approx(40.0, abs=0.01) and false.true_within_s == 0
    assert (false.measured_within_s, false.measured_closest_m) == (90.0, 6.0)
    assert false.as_dict()["pair"] == ["a", "c"]


def test_the_truth_covers_the_simulated_time_only():
    # a-b stand 3 m apart for 400 s of track, but the scenario simulates 100 s of it
    tracks = (standing("a", 0, 0, 0, 400), standing("b", 3, 0, 0, 400),
              standing("c", 0, 20, 150, 400))
    truth = TruthSpec(radius_m=10.0, duration_s=60.0, close_radius_m=5.0)
    scenario = Scenario(name="t", tracks=tracks, duration_s=100.0, truth=truth)
    [contact] = scenario_truth(scenario)
    assert (contact.pair, contact.start_s, contact.end_s) == (("a", "b"), 0.0, 100.0)
    short = Scenario(name="t", tracks=tracks, duration_s=50.0, truth=truth)
    assert scenario_truth(short) == []          # 50 s < the truth's 60 s
    close = judge_close(short, {})
    assert close is not None and close.true_pairs == 0
    metrics = evaluate(scenario_truth(scenario), {})
    [report] = pair_reports(scenario, metrics, {}, {})
    assert report.true_within_s == pytest.approx(100.0) == report.true_longest_s
    # c is present only after the simulated time: no closest distance to a
    metrics = evaluate([TrueContact("a", "c", 0.0, 1.0, 1.0)], {})
    [report] = pair_reports(scenario, metrics, {}, {})
    assert report.true_closest_m is None


def test_a_true_contact_that_never_overlaps_in_time_has_no_closest_distance():
    tracks = (standing("a", 0, 0, 0, 100), standing("b", 1, 0, 200, 300))
    scenario = Scenario(name="t", tracks=tracks, duration_s=300.0)
    metrics = evaluate([TrueContact("a", "b", 0.0, 1.0, 1.0)], {})
    [report] = pair_reports(scenario, metrics, {}, {})
    assert report.true_closest_m is None and report.true_within_s == 0


def test_the_closer_tier_judges_only_the_pairs_within_its_radius_for_the_duration():
    # a-b 2 m apart and a-c 7 m apart for 400 s; b-d 2 m apart for 100 s only
    tracks = (standing("a", 0, 0, 0, 400), standing("b", 2, 0, 0, 400),
              standing("c", 0, 7, 0, 400), standing("d", 2, 2, 300, 400))
    truth = TruthSpec(radius_m=10.0, duration_s=300.0, close_radius_m=3.0)
    scenario = Scenario(name="t", tracks=tracks, duration_s=400.0, truth=truth)
    detected = {("a", "c"): 40.0, ("b", "c"): 50.0}  # the 7 m pairs, not the 2 m one
    close = judge_close(scenario, detected)
    assert close is not None
    assert (close.true_pairs, close.hits, close.recall) == (1, 0, 0.0)
    assert close.missed_pairs == (("a", "b"),)
    assert judge_close(scenario, {("a", "b"): 10.0}).recall == 1.0  # type: ignore[union-attr]
    without = Scenario(name="t", tracks=tracks, duration_s=400.0, truth=TruthSpec())
    assert judge_close(without, detected) is None
    # each pair's report says whether it is a close pair (None: no closer tier)
    contacts = true_contacts(tracks, 10.0, 300.0)
    metrics = evaluate(contacts, detected)
    reports = {r.pair: r for r in pair_reports(scenario, metrics, detected, {})}
    assert {k: (r.true, r.close) for k, r in reports.items()} == {
        ("a", "b"): (True, True), ("a", "c"): (True, False), ("b", "c"): (True, False)}
    assert reports[("a", "b")].as_dict()["close"] is True
    plain = pair_reports(without, metrics, detected, {})
    assert {r.close for r in plain} == {None}
