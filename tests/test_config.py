"""Config parsing: defaults, every key's validation, one clear line naming the key."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.positives import DEFAULT_MAX_EXPIRY_AHEAD
from fanny_tui.config import (
    MAX_TOKEN_LIFETIME_DAYS,
    Config,
    ConfigError,
    load_config,
    parse_config,
)
from fanny_tui.protocol.expiry import expiry_for

ROOT = Path(__file__).resolve().parents[1]


def test_defaults():
    config = parse_config({})
    assert config == Config()
    assert config.protocol.token_lifetime_days == 15
    assert config.webrtc.ice_servers == ()          # never a public STUN server by default
    assert config.webrtc.host_addresses == ()


def test_example_file_parses_and_documents_every_key(tmp_path):
    example = ROOT / "config.example.toml"
    config = load_config(example)
    assert config.webrtc.host_addresses == ("127.0.0.1",)
    text = example.read_text()
    # every key of every section appears in the example, documented (commented or set)
    for section, cls in (("broker", config.broker), ("gps", config.gps),
                         ("protocol", config.protocol), ("webrtc", config.webrtc),
                         ("storage", config.storage), ("privacy", config.privacy)):
        assert f"[{section}]" in text
        for key in cls.__dataclass_fields__:
            key = "url" if (section, key) == ("broker", "urls") else key  # url = one or a list
            assert f"{key} =" in text, f"{section}.{key} is not documented in the example"
    assert "[[positives]]" in text
    for key in ("name", "url", "ca_file"):
        assert f"# {key} = " in text.split("[[positives]]", 1)[1], f"positives.{key}"


@pytest.mark.parametrize(("data", "key"), [
    ({"broker": {"url": "http://x"}}, "broker.url"),
    ({"broker": {"url": []}}, "broker.url"),
    ({"broker": {"url": "ws://[::1"}}, "broker.url"),
    ({"broker": {"url": ["ws://a:1", "ws://b:99999"]}}, "broker.url[1]"),
    ({"positives": [{"url": "ws://h:port", "name": "h"}]}, "positives[0].url"),
    ({"broker": {"url": ["ws://a:1", "http://b"]}}, "broker.url[1]"),
    ({"broker": {"url": ["ws://a:1", 8765]}}, "broker.url[1]"),
    ({"broker": {"url": ["ws://a:1", "ws://b:2", "ws://a:1"]}}, "broker.url[2]"),
    ({"broker": {"name": "main broker"}}, "broker.name"),
    ({"positives": {"url": "ws://h:1", "name": "h"}}, "positives"),
    ({"positives": ["ws://h:1"]}, "positives[0]"),
    ({"positives": [{"name": "h"}]}, "positives[0].url"),
    ({"positives": [{"url": "ws://h:1"}]}, "positives[0].name"),
    ({"positives": [{"url": "ws://h:1", "name": "h"}, {"url": "https://g", "name": "g"}]},
     "positives[1].url"),
    ({"positives": [{"url": "ws://127.0.0.1:8765", "name": "h"}]}, "positives[0].url"),
    ({"positives": [{"url": "ws://h:1", "name": "main"}]}, "positives[0].name"),
    ({"positives": [{"url": "ws://h:1", "name": "h"}, {"url": "ws://g:1", "name": "h"}]},
     "positives[1].name"),
    ({"positives": [{"url": "ws://h:1", "name": "h", "code": "x"}]}, "positives[0].code"),
    ({"broker": {"reconnect_min_s": 0}}, "broker.reconnect_min_s"),
    ({"broker": {"reconnect_min_s": 5, "reconnect_max_s": 1}}, "broker.reconnect_max_s"),
    ({"gps": {"source": "glonass"}}, "gps.source"),
    ({"gps": {"source": "nmea"}}, "gps.path"),
    ({"gps": {"source": "fixed", "longitude": 1.0}}, "gps.latitude"),
    ({"gps": {"source": "fixed", "latitude": 91, "longitude": 1.0}}, "gps.latitude"),
    ({"gps": {"port": 70000}}, "gps.port"),
    ({"gps": {"port": True}}, "gps.port"),
    ({"gps": {"rate": "fast"}}, "gps.rate"),
    ({"protocol": {"radius_m": float("nan")}}, "protocol.radius_m"),
    ({"protocol": {"radius_m": 0}}, "protocol.radius_m"),
    ({"protocol": {"token_lifetime_days": 0}}, "protocol.token_lifetime_days"),
    ({"protocol": {"token_lifetime_days": 16}}, "protocol.token_lifetime_days"),
    ({"protocol": {"deletion_hour_utc": 24}}, "protocol.deletion_hour_utc"),
    ({"protocol": {"poll_interval_s": 0}}, "protocol.poll_interval_s"),
    ({"protocol": {"colour": 1}}, "protocol.colour"),
    ({"webrtc": {"host_addresses": "127.0.0.1"}}, "webrtc.host_addresses"),
    ({"webrtc": {"host_addresses": ["localhost"]}}, "webrtc.host_addresses"),
    ({"webrtc": {"ice_servers": [{"urls": ["http://x"]}]}}, "webrtc.ice_servers[0].urls"),
    ({"webrtc": {"ice_servers": [{"urls": "turn:x", "user": "a"}]}}, "webrtc.ice_servers[0].user"),
    ({"nonsense": {}}, "nonsense"),
    ({"webrtc": {"ice_transport_policy": "stun"}}, "webrtc.ice_transport_policy"),
    ({"webrtc": {"ice_transport_policy": "relay"}}, "webrtc.ice_transport_policy"),
    ({"privacy": {"decoy_uploads": "yes"}}, "privacy.decoy_uploads"),
    ({"privacy": {"decoy_interval_s": 0}}, "privacy.decoy_interval_s"),
    ({"broker": {"ca_file": 3}}, "broker.ca_file"),
    # A fixed position with the default source: it would be ignored without a word.
    ({"gps": {"latitude": 43.6, "longitude": 1.44}}, "gps.source"),
    ({"gps": {"source": "nmea", "path": "a.nmea", "longitude": 1.44}}, "gps.source"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: expected ")
    assert "\n" not in str(info.value)


def test_relative_paths_resolve_against_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[gps]\nsource = "nmea"\npath = "logs/a.nmea"\n[storage]\ndata_dir = "d"\n')
    config = load_config(path)
    assert config.gps.path == tmp_path / "logs/a.nmea"
    assert config.storage.data_dir == tmp_path / "d"


def test_ice_servers_parsed():
    config = parse_config({"webrtc": {"ice_servers": [
        {"urls": "turn:127.0.0.1:3478", "username": "u", "credential": "p"}]}})
    server = config.webrtc.ice_servers[0]
    assert (server.urls, server.username, server.credential) == (("turn:127.0.0.1:3478",), "u", "p")


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[gps\n")
    with pytest.raises(ConfigError, match="bad.toml: file: expected valid TOML"):
        load_config(bad)
    # Why it cannot be read (a fresh tester's typo looked like a permissions problem).
    with pytest.raises(ConfigError, match=r"missing.toml: file: expected a readable TOML file "
                                          r"\(No such file or directory\)"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"file: expected a readable TOML file \(Is a dir"):
        load_config(tmp_path)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[protocol]\nradius_m = "ten"\n')
    with pytest.raises(ConfigError, match=r"wrong.toml: protocol.radius_m: expected a finite"):
        load_config(wrong)


def test_a_boolean_where_a_number_goes_is_shown_as_written(tmp_path):
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[protocol]\nradius_m = true\n")
    with pytest.raises(ConfigError) as raised:
        load_config(wrong)
    assert str(raised.value) == (f"{wrong}: protocol.radius_m: expected a finite number > 0 "
                                 f"and <= 10000, got true")


def test_tomllib_is_the_reader():
    # config.example.toml is plain TOML 1.0 (no tool-specific syntax)
    tomllib.loads((ROOT / "config.example.toml").read_text())


def test_the_longest_token_lifetime_fits_the_brokers_expiry_window():
    """Issue 7, point 7: the config allowed 365 days while the broker refuses expiries more
    than 16 days ahead; every allowed lifetime must give expiries the broker publishes."""
    start = datetime(2026, 12, 1, tzinfo=UTC)
    for minutes in range(0, 24 * 60, 7):               # contacts at every time of day
        now = start + timedelta(minutes=minutes)
        for hour in (0, 4, 23):
            ahead = expiry_for(now, lifetime_days=MAX_TOKEN_LIFETIME_DAYS,
                                deletion_hour_utc=hour) - now
            assert ahead <= DEFAULT_MAX_EXPIRY_AHEAD
    # One day more would not fit, at some time of day: the bound is the tightest.
    assert any(expiry_for(start + timedelta(hours=h),
                          lifetime_days=MAX_TOKEN_LIFETIME_DAYS + 1)
               - (start + timedelta(hours=h)) > DEFAULT_MAX_EXPIRY_AHEAD for h in range(24))
    config = parse_config({"protocol": {"token_lifetime_days": MAX_TOKEN_LIFETIME_DAYS}})
    assert config.protocol.token_lifetime_days == 15


def test_broker_url_may_be_one_regions_list_and_positives_brokers_are_listed():
    config = parse_config({
        "broker": {"url": ["wss://b1.example:8765", "wss://b2.example:8765"], "name": "city"},
        "positives": [{"name": "health-org", "url": "wss://p.health.example"},
                      {"name": "region.2", "url": "ws://127.0.0.1:9000", "ca_file": "x.pem"}],
    }, base_dir=Path("/etc/fanny"))
    assert config.broker.urls == ("wss://b1.example:8765", "wss://b2.example:8765")
    assert config.broker.url == "wss://b1.example:8765" and config.broker.name == "city"
    assert [(p.name, p.url) for p in config.positives] == [
        ("health-org", "wss://p.health.example"), ("region.2", "ws://127.0.0.1:9000")]
    assert config.positives[1].ca_file == Path("/etc/fanny/x.pem")
    assert parse_config({}).positives == () and parse_config({}).broker.name == "main"


def test_a_positives_ca_file_for_a_ws_broker_names_its_table():
    from fanny_tui.link import ssl_context_for

    config = parse_config({"positives": [{"name": "h", "url": "ws://h:1", "ca_file": "x.pem"}]})
    with pytest.raises(ConfigError, match=r"^positives\[0\]\.ca_file: "):
        ssl_context_for(config.positives[0], key="positives[0]")


def test_positives_tables_from_a_toml_file(tmp_path):
    path = tmp_path / "device.toml"
    text = ('[broker]\nurl = ["ws://127.0.0.1:8765", "ws://127.0.0.1:8766"]\n\n'
            '[[positives]]\nname = "health"\nurl = "ws://127.0.0.1:9000"\n\n'
            '[[positives]]\nname = "other"\nurl = "ws://127.0.0.1:{port}"\n')
    path.write_text(text.format(port=9000))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: positives[1].url: expected a broker not already "
                               "configured (broker.url or another [[positives]]), got "
                               "'ws://127.0.0.1:9000'")
    path.write_text(text.format(port=9001))
    config = load_config(path)
    assert [p.url for p in config.positives] == ["ws://127.0.0.1:9000", "ws://127.0.0.1:9001"]
    assert len(config.broker.urls) == 2
