"""The runner: settings, time compression, and a real run (broker + 3 real engines)."""

from __future__ import annotations

import pytest

from fanny_tui.config import ConfigError
from fanny_tui.sim.runner import (
    SimError,
    device_config,
    device_protocol,
    grid,
    prepare,
    run_scenario,
    split_settings,
)
from fanny_tui.sim.scenario import load_scenario
from tests.helpers import TIME_UNIT


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


def test_a_speed_that_pushes_a_setting_out_of_range_is_named():
    with pytest.raises(ConfigError, match="protocol.max_speed_mps"):
        device_protocol({}, {}, speed=100.0)


def test_settings_are_split_into_protocol_and_noise_keys():
    assert split_settings({"radius_m": 15, "sigma_m": 3}) == ({"radius_m": 15.0},
                                                              {"sigma_m": 3.0})
    with pytest.raises(SimError, match="radius: not a setting"):
        split_settings({"radius": 15})


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
