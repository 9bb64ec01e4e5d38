"""fanny_tui.protocol.validate: the one set of validators of both configs and both CLIs."""

from __future__ import annotations

import math

import pytest

from fanny_tui.protocol import validate
from fanny_tui.protocol.validate import Invalid


def message(call, *args, **kwargs) -> str:
    with pytest.raises(Invalid) as raised:
        call(*args, **kwargs)
    assert isinstance(raised.value, ValueError)
    return str(raised.value)


def test_number_ranges_and_their_wording():
    assert validate.number("k", 5) == 5.0 and type(validate.number("k", 5)) is float
    assert validate.number("k", 0, low=0) == 0.0
    assert message(validate.number, "k", 0, low=0, low_open=True) == (
        "k: expected a number > 0, got 0")
    assert message(validate.number, "a.b", 61.0, low=0, high=60) == (
        "a.b: expected a number >= 0 and <= 60, got 61.0")
    assert message(validate.number, "k", 0.01, low=0.05, high=3600.0) == (
        "k: expected a number >= 0.05 and <= 3600, got 0.01")
    for bad in (True, "5", None, math.nan, math.inf, [1]):
        assert message(validate.number, "k", bad, low=0, low_open=True).startswith(
            "k: expected a finite number > 0, got ")
    assert message(validate.number, "k", "x") == "k: expected a finite number, got 'x'"


def test_integer_boolean_string_choice():
    assert validate.integer("p", 8765, 0, 65535) == 8765
    for bad in (70000, -1, 1.0, "80"):
        assert message(validate.integer, "p", bad, 0, 65535) == (
            f"p: expected an integer in [0, 65535], got {bad!r}")
    assert message(validate.integer, "n", -1, 0) == "n: expected an integer >= 0, got -1"
    assert validate.boolean("b", False) is False
    assert message(validate.boolean, "b", 0) == "b: expected true or false, got 0"
    assert message(validate.string, "s", "", what="a file path", empty_ok=False) == (
        "s: expected a file path, got ''")
    assert validate.choice("c", "all", ("all", "relay")) == "all"
    assert message(validate.choice, "c", "none", ("all", "relay")) == (
        "c: expected one of \"all\", \"relay\", got 'none'")


def test_a_boolean_refused_is_shown_as_toml_spells_it():
    # Trial finding: `radius_m = true` said "got True" (Python's spelling, not the file's).
    assert message(validate.integer, "p", True, 0, 65535) == (
        "p: expected an integer in [0, 65535], got true")
    assert message(validate.number, "protocol.radius_m", False, low=0, low_open=True) == (
        "protocol.radius_m: expected a finite number > 0, got false")
    assert message(validate.string, "s", True) == "s: expected a string, got true"
    assert Invalid("k", "a name", "true").detail == "expected a name, got 'true'"  # a string


def test_url():
    assert validate.url("u", "redis://127.0.0.1:6379/0", ("redis", "unix")) == (
        "redis://127.0.0.1:6379/0")
    assert validate.url("u", "unix:///run/redis.sock", ("redis", "unix"))
    assert validate.url("u", "wss://[::1]:8765", ("ws", "wss"), host=True)
    for bad in ("http://x", "redis:x", 5, "", "redis://x:port"):
        assert message(validate.url, "u", bad, ("redis", "unix")).startswith(
            "u: expected a URL starting with redis:// or unix://, got ")
    assert message(validate.url, "u", "ws://:80/", ("ws",), host=True) == (
        "u: expected a URL starting with ws:// and naming a host, got 'ws://:80/'")
    # a password in a refused URL is not echoed to the operator's terminal or journal
    text = message(validate.url, "u", "http://broker:s3cret@db:5432/x", ("postgresql",))
    assert "s3cret" not in text and text.endswith("got 'http://broker:***@db:5432/x'")
    assert "p:w" not in message(validate.url, "u", "redis://u:p:w@h:99999", ("redis",))


def test_command_line_text():
    assert validate.number_text("--r", "2.5", low=0, low_open=True) == 2.5
    assert validate.integer_text("--p", "80", 0, 65535) == 80
    assert message(validate.number_text, "--r", "fast", low=0, low_open=True) == (
        "--r: expected a number > 0, got 'fast'")
    assert message(validate.number_text, "--r", "-1", low=0) == (
        "--r: expected a number >= 0, got '-1'")           # the text as typed, not -1.0
    assert message(validate.integer_text, "--p", "http", 0, 65535) == (
        "--p: expected an integer in [0, 65535], got 'http'")
    assert message(validate.integer_text, "--p", "1.5", 0, 65535).endswith("got '1.5'")


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1.5h", 5400), (" 2H ", 7200),
])
def test_duration_needs_its_unit(text, seconds):
    assert validate.duration_text("--ttl", text, high_s=30 * 86400) == seconds


@pytest.mark.parametrize("text", ["1", "600", "1w", "h", "-1h", "1 hour", "", "nan"])
def test_duration_without_a_known_unit_is_refused(text):
    assert message(validate.duration_text, "--ttl", text, high_s=86400) == (
        "--ttl: expected a duration with its unit (s, m, h or d), like 90s, 30m, 2h or 1d (a "
        f"bare number is refused: it does not say which unit), got {text!r}")


def test_duration_range():
    assert message(validate.duration_text, "--ttl", "31d", high_s=30 * 86400) == (
        "--ttl: expected a duration > 0s and at most 30d, got '31d'")
    assert message(validate.duration_text, "--ttl", "0s", high_s=90) == (
        "--ttl: expected a duration > 0s and at most 90s, got '0s'")


def test_a_key_may_be_left_to_the_caller():
    error = Invalid("", "true or false", 3)
    assert str(error) == error.detail == "expected true or false, got 3"


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379", "redis://127.0.0.1:6379/",
                                 "rediss://u:p@h:6380/15", "unix:///run/redis.sock?db=2"])
def test_redis_url_takes_a_database_number_or_none(url):
    assert validate.redis_url("k", url) == url


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/fanny", "redis://h/0/1",
                                 "redis://h/-1", "postgresql://h/0"])
def test_redis_url_refuses_a_path_redis_would_read_as_database_0(url):
    with pytest.raises(validate.Invalid):
        validate.redis_url("k", url)
