"""broker.config: the broker's TOML config file, broker.example.toml, and ``serve --config``."""

from __future__ import annotations

import os
import re
import signal
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from broker.__main__ import create_board, main
from broker.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    NONE_VALUES,
    TABLE_OF,
    TABLES,
    BrokerConfigError,
    broker_settings,
    default_values,
    load_broker_config,
    parse_broker_config,
)
from broker.server import BrokerSettings
from fanny_tui.config import parse_config
from tests.servers import start_broker_process, stop_broker_process

from .kit import Client, healthz

EXAMPLE = Path(__file__).resolve().parents[2] / "broker.example.toml"
DEPLOYMENT = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
SETTINGS = {f.name for f in fields(BrokerSettings)}


def write(tmp_path: Path, text: str, name: str = "broker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_tables_name_every_setting_once():
    keys = [key for table in TABLES.values() for key in table]
    assert len(keys) == len(set(keys))
    assert set(keys) == SETTINGS | {"log_level"}
    # every setting that may be None has a file value that says so (TOML has no null)
    optional = {f.name for f in fields(BrokerSettings) if "None" in str(f.type)}
    assert optional == set(NONE_VALUES)


def test_the_example_has_every_setting_documented_in_its_table():
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert {table: set(keys) for table, keys in data.items()} == {
        table: set(keys) for table, keys in TABLES.items()}
    # each key is documented: a comment stands above it, within its group of keys
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            above = number - 1
            while "=" in lines[above] and not lines[above].startswith("#"):
                above -= 1
            assert lines[above].startswith("# "), f"line {number + 1}: {line} has no comment"


def test_the_example_parses_to_the_defaults():
    settings, log_level = broker_settings(load_broker_config(EXAMPLE), {})
    defaults = BrokerSettings(DEFAULT_HOST, DEFAULT_PORT, settings.db_path)
    assert settings == defaults and log_level == "INFO"
    for f in fields(BrokerSettings):     # 300 is not 300.0: types as well as values
        assert type(getattr(settings, f.name)) is type(getattr(defaults, f.name)), f.name
    assert settings.db_path == Path("/var/lib/fanny-broker/positives.sqlite3")


def test_values_none_and_relative_paths(tmp_path):
    values = parse_broker_config({
        "server": {"certfile": "tls/cert.pem", "keyfile": "/etc/k.pem", "ping_interval_s": 0,
                   "ping_timeout_s": 0.0, "log_level": "debug"},
        "storage": {"db_path": "board.sqlite3", "redis_url": "", "postgres_url": ""},
        "matching": {"route_ttl_s": 0, "cooldown_s": 30},
    }, base_dir=tmp_path)
    assert values == {
        "certfile": tmp_path / "tls/cert.pem", "keyfile": Path("/etc/k.pem"),
        "ping_interval_s": None, "ping_timeout_s": None, "log_level": "DEBUG",
        "db_path": tmp_path / "board.sqlite3", "redis_url": None, "postgres_url": None,
        "route_ttl_s": None, "cooldown_s": 30}
    settings, level = broker_settings(values, {})
    assert (settings.cooldown_s, type(settings.cooldown_s), level) == (30.0, float, "DEBUG")
    assert settings.route_ttl_s is None and settings.ping_interval_s is None


def test_the_command_line_overrides_the_file(tmp_path):
    values = {"port": 9000, "radius_max_m": 50.0, "db_path": Path("a.sqlite3")}
    settings, _ = broker_settings(values, {"port": 0, "db_path": "b.sqlite3"})
    assert (settings.port, settings.radius_max_m, settings.db_path) == (0, 50.0, "b.sqlite3")


def test_db_path_is_optional_with_a_postgres_url(tmp_path):
    """A region's broker keeps its board in PostgreSQL: no SQLite file to name (issue 8)."""
    url = "postgresql://fanny@127.0.0.1:5432/fanny"
    path = tmp_path / "region.toml"
    path.write_text(f'[storage]\npostgres_url = "{url}"\n')
    settings, _ = broker_settings(load_broker_config(path), {})
    assert (settings.db_path, settings.postgres_url) == (None, url)
    path.write_text(f'[storage]\ndb_path = ""\npostgres_url = "{url}"\n')   # "" = none
    assert broker_settings(load_broker_config(path), {})[0].db_path is None
    settings, _ = broker_settings({}, {"postgres_url": url})
    assert settings.db_path is None
    assert BrokerSettings("127.0.0.1", 0, postgres_url=url).db_path is None
    with pytest.raises(ValueError, match=r"^BrokerSettings\.db_path: expected the positive "
                                         r"board's SQLite file \(or a postgres_url\)"):
        BrokerSettings("127.0.0.1", 0)
    path.write_text('[storage]\ndb_path = ""\n')
    with pytest.raises(BrokerConfigError, match=r"^storage.db_path: expected the positive "
                                                r"board's SQLite file .* or its PostgreSQL"):
        broker_settings(load_broker_config(path), {})


@pytest.mark.parametrize("text, message", [
    ("[limits]\nposition_rate_per_s = -1\n",
     "limits.position_rate_per_s: expected a number > 0 and <= 10000, got -1"),
    ("[limits]\nposition_rate_per_s = \"fast\"\n",
     "limits.position_rate_per_s: expected a finite number > 0 and <= 10000, got 'fast'"),
    ("[server]\nport = 70000\n", "server.port: expected an integer in [0, 65535], got 70000"),
    ("[matching]\nmax_speed_mps = 0\n",
     "matching.max_speed_mps: expected a number > 0 and <= 1000000, got 0"),
    ("[positives]\nopen_declarations = 1\n",
     "positives.open_declarations: expected true or false, got 1"),
    ("[storage]\nredis_url = \"http://127.0.0.1\"\n",
     "storage.redis_url: expected a URL starting with redis:// or rediss:// or unix://, "
     "got 'http://127.0.0.1'"),
    ("[storage]\nredis_url = \"redis://:pw@127.0.0.1:6379/fanny\"\n",
     "storage.redis_url: expected a database number as the URL's path (redis://HOST:PORT/0), "
     "got 'redis://:***@127.0.0.1:6379/fanny'"),
    ("[server]\nlog_level = \"loud\"\n",
     "server.log_level: expected one of \"DEBUG\", \"INFO\", \"WARNING\", \"ERROR\", "
     "\"CRITICAL\", got 'LOUD'"),
    ("[server]\ncertfile = \"c.pem\"\n",
     "server.keyfile: TLS needs both a certfile and a keyfile"),
    ("[limits]\nposition_rate = 5\n", "limits.position_rate: expected one of the known keys "
     "['max_connections', 'max_connections_per_address', 'poll_burst', 'poll_rate_per_s', "
     "'position_burst', 'position_rate_per_s', 'signal_burst', 'signal_rate_per_s']"),
    ("[broker]\nport = 1\n", "broker: expected one of the tables "
     "['limits', 'matching', 'positives', 'server', 'storage']"),
    ("limits = 3\n", "limits: expected a table [limits]"),
    ("[storage]\ndb_path = 5\n", "storage.db_path: expected a file path, got 5"),
    ("[server]\n[server]\n", "file: expected valid TOML (Cannot declare ('server',) twice"),
])
def test_errors_are_one_line_naming_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(BrokerConfigError) as raised:
        broker_settings(load_broker_config(path), {"db_path": "b.sqlite3"}, source=str(path))
    assert str(raised.value).startswith(f"{path}: {message}")
    assert "\n" not in str(raised.value)


def _file_error(key: str, value: object) -> str | None:
    """The error the config file gives for ``key = value`` (None: accepted)."""
    try:
        broker_settings(parse_broker_config({TABLE_OF[key]: {key: value}}),
                        {"db_path": "b.sqlite3"})
    except BrokerConfigError as exc:
        assert exc.key == f"{TABLE_OF[key]}.{key}", exc     # refused for this key, not another
        return str(exc)
    return None


NUMBER_SETTINGS = sorted(key for key, value in default_values().items()
                         if type(value) in (int, float) or NONE_VALUES.get(key) == 0)


@pytest.mark.parametrize("key", NUMBER_SETTINGS)
def test_every_number_settings_error_states_the_range_it_checks(key):
    # Trial finding: route_ttl_s = -1 said "expected a number > 0", though 0 is valid there.
    message = _file_error(key, -1)
    assert message is not None
    found = re.search(r"expected (a number|an integer) (?:(>=|>) (\S+?)(?: and <= (\S+?))?"
                      r"|in \[(\S+), (\S+)\])(?: \(0 = [^)]+\))?, got -1$", message)
    assert found, message
    kind, op, low, high, int_low, int_high = found.groups()
    if kind == "an integer":
        op, low, high = ">=", int_low, int_high
    convert = int if kind == "an integer" else float
    low_value = convert(low)
    if op == ">=":
        assert _file_error(key, low_value) is None, message
    else:
        assert _file_error(key, low_value) is not None, message
        assert _file_error(key, low_value + 0.5) is None, message
    assert _file_error(key, low_value - 1) is not None, message
    if high is not None:
        assert _file_error(key, convert(high)) is None, message
        assert _file_error(key, convert(high) + 1) is not None, message


def test_a_zero_that_means_none_is_in_the_stated_range():
    assert _file_error("route_ttl_s", -1) == ("matching.route_ttl_s: expected a number >= 0 "
                                              "(0 = the same as cooldown_s), got -1")
    assert _file_error("ping_interval_s", -0.5) == ("server.ping_interval_s: expected a number "
                                                    ">= 0 (0 = no pings), got -0.5")
    assert _file_error("ping_timeout_s", "1s") == ("server.ping_timeout_s: expected a finite "
                                                   "number >= 0 (0 = no timeout), got '1s'")


def test_a_missing_file_and_a_missing_board_path(tmp_path):
    with pytest.raises(BrokerConfigError, match=r"nope.toml: file: expected a readable TOML"):
        load_broker_config(tmp_path / "nope.toml")
    with pytest.raises(BrokerConfigError, match=r"^storage.db_path: expected the positive board's"):
        broker_settings(parse_broker_config({"server": {"port": 0}}), {})


def test_serve_prints_a_config_error_in_the_clients_format(tmp_path, capsys):
    path = write(tmp_path, "[storage]\ndb_path = \"b.sqlite3\"\n"
                           "[limits]\nposition_rate_per_s = 0\n")
    assert main(["serve", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"fanny-broker: config error: {path}: limits.position_rate_per_s: expected a number > 0 "
        "and <= 10000, got 0\n")
    # a bad value given as an option is named as the option, the file notwithstanding
    assert main(["serve", "--config", str(path), "--position-rate-per-s", "20",
                 "--radius-max-m", "20000"]) == 2
    assert capsys.readouterr().err == (
        "fanny-broker: error: --radius-max-m: expected a number > 0 and <= 10000, got 20000.0\n")
    # the file's path to the board is checked like --db's (relative to the file's folder)
    assert main(["serve", "--config", str(path), "--position-rate-per-s", "20"]) == 2
    board = tmp_path / "b.sqlite3"
    assert capsys.readouterr().err == (
        f"fanny-broker: error: cannot open the positive board {board}: no such file (create "
        f"it with: fanny-broker create-board --db {board})\n")


async def test_serve_runs_on_the_file_and_options_override_it(tmp_path):
    """A real ``fanny-broker serve --config``: the file's settings apply, options win."""
    create_board(tmp_path / "b.sqlite3")
    path = write(tmp_path, "[server]\nport = 1\nlog_level = \"debug\"\n"
                           "[storage]\ndb_path = \"b.sqlite3\"\n"
                           "[matching]\nradius_max_m = 40\n"
                           "[positives]\nopen_declarations = true\n")
    process, url = await start_broker_process("--config", str(path), "--port", "0")
    try:
        port = int(url.rsplit(":", 1)[1])
        assert port != 1                                  # --port 0 won over the file's 1
        status, body = await healthz(port)
        assert status == 200 and body["declarations"] == "open"      # from the file
        async with Client.open(url) as a:
            assert (await a.hello(radius_m=500.0)).radius_m == 40.0  # capped by the file
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    status, err, _ = await stop_broker_process(process, signal.SIGTERM)
    assert status == 0, err
    assert " DEBUG " in err                               # log_level from the file


def test_the_deployment_guides_toml_blocks_are_valid_configs():
    """Every ```toml block of docs/deployment.md is a valid broker config (or, with [broker],
    a valid device config): the region's steps can be copied as they are."""
    blocks = re.findall(r"^```toml\n(.*?)^```$", DEPLOYMENT.read_text(encoding="utf-8"),
                        flags=re.S | re.M)
    devices = 0
    for text in blocks:
        data = tomllib.loads(text)
        if "broker" in data or "positives" in data:
            config = parse_config(data)
            assert config.broker.url, text
            devices += 1
        else:
            settings, _ = broker_settings(parse_broker_config(data), {})
            assert settings.postgres_url and settings.redis_url and settings.db_path is None
    assert devices >= 2 and len(blocks) > devices      # the region's files and the devices'
