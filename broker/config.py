"""The broker's config file: TOML (``fanny-broker serve --config FILE``) -> :class:`BrokerSettings`.

The file has five tables; every key is a :class:`~broker.server.BrokerSettings` attribute of
the same name (plus ``server.log_level``), and ``broker.example.toml`` documents each one with
its meaning, unit and default::

    [server]     host, port, certfile, keyfile, log_level, max_message_bytes, ...
    [storage]    db_path, redis_url, postgres_url
    [matching]   radius_max_m, cooldown_s, position_timeout_s, route_ttl_s, max_speed_mps, ...
    [positives]  poll_limit, open_declarations, upload_answer_delay_s, ...
    [limits]     position_rate_per_s, position_burst, ..., max_connections

A key left out takes the default. Settings that may be "none" take ``""`` (paths and URLs:
no TLS, embedded stores) or ``0`` (``route_ttl_s``: the cool-down; ``ping_*``: no keepalive;
their range in the file is ``>= 0``, and their errors say so).
Relative paths are resolved against the file's directory. An unknown table or key is refused
by name.

:func:`parse_broker_config` is pure; :func:`load_broker_config` reads the file;
:func:`broker_settings` merges the file with command-line values and builds the settings. Every
error is one line naming the key: ``broker.toml: limits.position_rate_per_s: expected a number
> 0 and <= 10000, got -1`` (the format of the client's config, :mod:`fanny_tui.config`).
"""

from __future__ import annotations

import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

from fanny_tui.protocol import validate

from .server import BrokerSettings

TABLES: dict[str, tuple[str, ...]] = {
    "server": ("host", "port", "certfile", "keyfile", "log_level", "max_message_bytes",
               "first_message_timeout_s", "ping_interval_s", "ping_timeout_s", "outbox_size",
               "send_timeout_s"),
    "storage": ("db_path", "redis_url", "postgres_url"),
    "matching": ("radius_max_m", "cooldown_s", "position_timeout_s", "route_ttl_s",
                 "housekeeping_interval_s", "max_speed_mps"),
    "positives": ("poll_limit", "max_expiry_ahead_s", "purge_interval_s", "open_declarations",
                  "upload_answer_delay_s", "code_grace_s", "max_uploads_per_code",
                  "batch_frame_tokens", "batch_cache_bytes", "announce_positives",
                  "announce_interval_s"),
    "limits": ("position_rate_per_s", "position_burst", "poll_rate_per_s", "poll_burst",
               "signal_rate_per_s", "signal_burst", "max_connections_per_address",
               "max_connections"),
}
"""Each table's keys: every :class:`BrokerSettings` attribute once, plus ``log_level``."""

TABLE_OF = {key: table for table, keys in TABLES.items() for key in keys}
"""The table of each key (``"radius_max_m"`` -> ``"matching"``)."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_LOG_LEVEL = "INFO"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

NONE_VALUES: dict[str, object] = {
    "db_path": "", "certfile": "", "keyfile": "", "redis_url": "", "postgres_url": "",
    "route_ttl_s": 0, "ping_interval_s": 0, "ping_timeout_s": 0,
}
"""Settings that may be None, and the file value that means None (TOML has no null)."""

ZERO_MEANS = {"route_ttl_s": "the same as cooldown_s", "ping_interval_s": "no pings",
              "ping_timeout_s": "no timeout"}
"""What the file's ``0`` means for each duration in :data:`NONE_VALUES`: in the file their
range is ``>= 0`` (the settings' own check, ``> 0``, sees None instead of 0)."""

PATHS = ("db_path", "certfile", "keyfile")
"""Settings that are file paths: relative ones are resolved against the config file's folder."""


class BrokerConfigError(ValueError):
    """A bad key in the broker's config. ``str(error)``: ``[SOURCE: ]table.key: DETAIL``.

    Attributes:
        field: the :class:`BrokerSettings` attribute (or ``log_level``, ``file``) concerned.
        key: the key as written in the file (``limits.position_rate_per_s``).
        detail: what was wrong (``expected ..., got ...``).
        source: the file name, or None.
    """

    def __init__(self, field: str, detail: str, *, source: str | None = None) -> None:
        self.field, self.detail, self.source = field, detail, source
        self.key = f"{TABLE_OF[field]}.{field}" if field in TABLE_OF else field
        super().__init__(f"{source}: {self.key}: {detail}" if source else
                         f"{self.key}: {detail}")


def _field_types() -> dict[str, tuple[type, ...]]:
    """The types each :class:`BrokerSettings` attribute takes (``float | None`` -> float, None)."""
    hints = typing.get_type_hints(BrokerSettings)
    return {f.name: typing.get_args(hints[f.name]) or (hints[f.name],)
            for f in fields(BrokerSettings)}


def default_values() -> dict[str, object]:
    """Every setting as it is when the file does not give it (``db_path``: None, which
    :func:`broker_settings` refuses unless ``postgres_url`` is given)."""
    values: dict[str, object] = {f.name: f.default for f in fields(BrokerSettings)
                                 if f.default is not MISSING}
    values.update(host=DEFAULT_HOST, port=DEFAULT_PORT, log_level=DEFAULT_LOG_LEVEL)
    return values


def parse_broker_config(data: Mapping[str, Any], *, base_dir: Path | None = None,
                        source: str | None = None) -> dict[str, object]:
    """The settings a TOML document gives, as ``{attribute: value}``. Pure.

    Values are typed here (``""``/``0`` become None where :data:`NONE_VALUES` says, paths are
    resolved against ``base_dir``); their types and ranges are checked by
    :class:`BrokerSettings` (see :func:`broker_settings`).

    Args:
        data: the document as read by :mod:`tomllib`.
        base_dir: the folder relative paths are resolved against (None: kept relative).
        source: the file name, for errors.

    Returns:
        Only the keys the document sets, by attribute name (``log_level`` included).

    Raises:
        BrokerConfigError: an unknown table or key, a table that is not a table, or a value of
            the wrong type.
    """
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise BrokerConfigError(unknown[0], f"expected one of the tables {sorted(TABLES)}",
                                source=source)
    values: dict[str, object] = {}
    for table, table_data in data.items():
        if not isinstance(table_data, Mapping):
            raise BrokerConfigError(table, f"expected a table [{table}]", source=source)
        for key, value in table_data.items():
            if key not in TABLES[table]:
                raise BrokerConfigError(f"{table}.{key}",
                                        f"expected one of the known keys {sorted(TABLES[table])}",
                                        source=source)
            try:
                values[key] = _typed(key, value, base_dir)
            except validate.Invalid as exc:
                raise BrokerConfigError(key, exc.detail, source=source) from None
    return values


def _typed(key: str, value: object, base_dir: Path | None) -> object:
    if key in ZERO_MEANS:
        try:
            validate.number(key, value, low=0)
        except validate.Invalid as exc:
            raise validate.Invalid(key, f"{exc.expected} (0 = {ZERO_MEANS[key]})",
                                   value) from None
    if key in NONE_VALUES and (value == "" if NONE_VALUES[key] == "" else (
            isinstance(value, int | float) and not isinstance(value, bool) and value == 0)):
        return None
    if key == "log_level":
        return validate.choice(key, value.upper() if isinstance(value, str) else value,
                               LOG_LEVELS)
    if key in PATHS:
        text = validate.string(key, value, what="a file path", empty_ok=False)
        path = Path(text).expanduser()
        return base_dir / path if base_dir is not None and not path.is_absolute() else path
    return value                                  # BrokerSettings checks type and range


def load_broker_config(path: Path) -> dict[str, object]:
    """Read and parse a broker config file (see :func:`parse_broker_config`).

    Raises:
        BrokerConfigError: the file is missing or unreadable, not UTF-8 TOML, or has a bad
            key; the message starts with the file name.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BrokerConfigError("file", f"expected a readable TOML file ({exc.strerror or exc})",
                                source=source) from None
    except UnicodeDecodeError:
        raise BrokerConfigError("file", "expected UTF-8 text", source=source) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BrokerConfigError("file", f"expected valid TOML ({exc})", source=source) from None
    return parse_broker_config(data, base_dir=path.parent, source=source)


def broker_settings(from_file: Mapping[str, object], overrides: Mapping[str, object], *,
                    source: str | None = None) -> tuple[BrokerSettings, str]:
    """Build the settings: command-line ``overrides`` over ``from_file`` over the defaults.

    Args:
        from_file: :func:`parse_broker_config`'s result (``{}`` without a file).
        overrides: values given on the command line, by attribute name.
        source: the config file's name, for errors.

    Returns:
        ``(settings, log_level)``.

    Raises:
        BrokerConfigError: a value out of range, or neither ``db_path`` nor ``postgres_url``
            (the error names ``db_path``). Its ``field`` is the
            attribute; when the value came from ``overrides`` its ``source`` is None (the
            caller names the option instead of the key).
    """
    values: dict[str, Any] = {**default_values(), **from_file, **overrides}
    log_level = str(values.pop("log_level"))
    if values.get("db_path") is None and values.get("postgres_url") is None:
        raise BrokerConfigError("db_path", "expected the positive board's SQLite file (--db "
                                "PATH, or db_path in [storage] of --config FILE) or its "
                                "PostgreSQL database (--postgres URL, or postgres_url)")
    try:
        settings = BrokerSettings(**values)
    except ValueError as exc:
        found = re.match(r"BrokerSettings\.(\w+): (.*)", str(exc))
        if found is None:                           # every check names its attribute
            raise
        field, detail = found.groups()
        raise BrokerConfigError(field, detail,
                                source=None if field in overrides else source) from None
    types = _field_types()
    floats: dict[str, Any] = {name: float(value) for name, value in vars(settings).items()
                              if float in types[name] and type(value) is int}
    return replace(settings, **floats), log_level    # TOML's 300 for a setting of 300.0
