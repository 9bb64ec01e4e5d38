"""Client configuration: a pure parse of a mapping into frozen dataclasses, plus file loading.

:func:`parse_config` takes the mapping read from TOML and returns a :class:`Config` or raises
:class:`ConfigError` naming the key (``gps.source``) and what was expected. :func:`load_config`
is the only function here that touches a file. ``config.example.toml`` documents every key.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .protocol import validate
from .protocol.contact import DEFAULT_MAX_SPEED_MPS
from .protocol.expiry import DEFAULT_LIFETIME_DAYS

_T = TypeVar("_T")


class ConfigError(Exception):
    """A configuration key has a bad value. ``str(error)`` is one line naming the key."""

    def __init__(self, key: str, expected: str, got: object = ..., *, source: str | None = None):
        where = f"{source}: " if source else ""
        got_text = "" if got is ... else f", got {validate.shown(got)}"
        super().__init__(f"{where}{key}: expected {expected}{got_text}")
        self.key = key
        self.source = source


MAIN_BROKER = "main"
"""The default ``[broker] name``: how events, the UI and the store name the main broker."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
"""A broker name: 1-32 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or digit."""


@dataclass(frozen=True)
class BrokerConfig:
    """``[broker]``: the device's own broker (positions, signaling, positives), how to
    reconnect (seconds).

    ``urls``: one region's broker URLs (``[broker] url``, one URL or a list): the session
    connection goes to one of them and fails over to the next when it fails (issue 8;
    :class:`~fanny_tui.link.BrokerLink`). ``name``: how events, the UI and the store call it.
    """

    urls: tuple[str, ...] = ("ws://127.0.0.1:8765",)
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    ca_file: Path | None = None
    name: str = MAIN_BROKER

    @property
    def url(self) -> str:
        """The first URL of ``urls`` (the one tried first)."""
        return self.urls[0]


@dataclass(frozen=True)
class PositivesBrokerConfig:
    """One ``[[positives]]`` table: a broker polled for positive tokens only (paper 5:
    several organizations' servers), never told a session ID or a position.

    ``name``: how events, the UI, the store (its poll cursor) and ``declare-positive --broker``
    call it; ``url``: its ``ws://`` or ``wss://`` URL; ``ca_file``: as ``[broker] ca_file``.
    """

    name: str
    url: str
    ca_file: Path | None = None

    @property
    def urls(self) -> tuple[str, ...]:
        """``(url,)``: the same shape as :attr:`BrokerConfig.urls`."""
        return (self.url,)


@dataclass(frozen=True)
class GpsConfig:
    """``[gps]``: the position source. ``source`` is ``gpsd``, ``nmea`` or ``fixed``."""

    source: str = "gpsd"
    host: str = "127.0.0.1"
    port: int = 2947
    path: Path | None = None
    rate: float = 1.0
    loop: bool = True
    latitude: float | None = None
    longitude: float | None = None
    accuracy_m: float = 5.0
    stale_after_s: float = 5.0


MAX_TOKEN_LIFETIME_DAYS = DEFAULT_LIFETIME_DAYS
"""The longest ``[protocol] token_lifetime_days`` (15, the paper's): the broker publishes expiries
at most 16 days ahead (``broker.positives.DEFAULT_MAX_EXPIRY_AHEAD``: the lifetime plus the
rounding up to the deletion hour, under a day), so a longer lifetime would make every positive
declaration of this device be refused ``expiry_out_of_window``."""


@dataclass(frozen=True)
class ProtocolConfig:
    """``[protocol]``: FANNY parameters (metres, days, hours UTC, seconds)."""

    radius_m: float = 10.0
    token_lifetime_days: int = 15
    deletion_hour_utc: int = 4
    position_interval_s: float = 5.0
    poll_interval_s: float = 300.0
    handshake_timeout_s: float = 20.0
    min_contact_s: float = 0.0
    contact_gap_s: float = 30.0
    max_contact_s: float = 3600.0
    max_speed_mps: float = DEFAULT_MAX_SPEED_MPS


@dataclass(frozen=True)
class IceServer:
    """One STUN or TURN server (W3C RTCIceServer)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class WebRtcConfig:
    """``[webrtc]``: ICE servers (default none), host addresses offered, transport policy.

    ``ice_transport_policy``: ``"all"`` or ``"relay"`` (W3C RTCIceTransportPolicy): relay-only
    offers no host candidate and goes through the configured TURN server, hiding this device's
    addresses from peers.
    """

    ice_servers: tuple[IceServer, ...] = ()
    host_addresses: tuple[str, ...] = ()
    ice_transport_policy: str = "all"


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: cover traffic. ``decoy_uploads`` sends decoy positive uploads (which the
    broker discards) about every ``decoy_interval_s`` seconds (exponentially distributed)."""

    decoy_uploads: bool = False
    decoy_interval_s: float = 3600.0
    rotation_interval_s: float = 900.0


@dataclass(frozen=True)
class JournalConfig:
    """``[journal]``: the opt-in run journal (JSON lines; no ID, token or position).
    ``path`` None: no journal."""

    path: Path | None = None


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: where the token store lives (default: the platformdirs user data dir)."""

    data_dir: Path | None = None


@dataclass(frozen=True)
class Config:
    """The whole client configuration."""

    broker: BrokerConfig = field(default_factory=BrokerConfig)
    positives: tuple[PositivesBrokerConfig, ...] = ()
    """``[[positives]]``: more brokers polled for positive tokens only (default none)."""
    gps: GpsConfig = field(default_factory=GpsConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    webrtc: WebRtcConfig = field(default_factory=WebRtcConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)


class ConfigSection:
    """Typed, checked reads from one TOML table of a configuration file: the section validator
    of the client configuration here and of simulation scenarios (:mod:`fanny_tui.sim.scenario`).

    Every read takes the key and its default (the value used when the key is absent) and
    returns the value checked (by :mod:`fanny_tui.protocol.validate`); a bad value raises
    :class:`ConfigError` whose one line names ``section.key`` (e.g. ``gps.latitude``), what was
    expected and what was found. ``data`` is the table as read, ``name`` its dotted name.

    Usage::

        s = ConfigSection(data.get("gps", {}), "gps", {"latitude", "longitude"})
        latitude = s.number("latitude", 0.0, low=-90.0, high=90.0)
    """

    def __init__(self, data: Mapping[str, Any], name: str, known: set[str]) -> None:
        """Args:
            data: the table (a mapping of key to value, as :mod:`tomllib` reads it).
            name: the table's name in errors (``"broker"``, ``"ice_servers[0]"``).
            known: the keys the table may have.

        Raises:
            ConfigError: ``data`` is not a table (names ``name``), or it has a key not in
                ``known`` (names ``name.key`` and lists the known keys).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(name, "a table", data)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{name}.{unknown[0]}", f"one of the known keys {sorted(known)}")
        self.data, self.name = data, name

    def key(self, key: str) -> str:
        """``key``'s dotted name in errors: ``section.key``."""
        return f"{self.name}.{key}"

    def number(self, key: str, default: float, *, low: float | None = None,
               high: float | None = None, positive: bool = False) -> float:
        """A finite number in ``[low, high]`` (``> 0`` with ``positive``)."""
        if positive and low is None:
            low = 0.0
        return self._valid(validate.number, key, default, low=low, high=high,
                           low_open=positive)

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        """An integer (not a boolean) in ``[low, high]``."""
        return self._valid(validate.integer, key, default, low, high)

    def url(self, value: object, key: str) -> str:
        """A ``ws://`` or ``wss://`` URL with a host (``key``: the name in errors)."""
        try:
            return validate.url(key, value, ("ws", "wss"), host=True)
        except validate.Invalid as exc:
            raise ConfigError(exc.key, exc.expected, exc.got) from None

    def broker_name(self, key: str, default: str | None) -> str:
        """A broker name (:data:`_NAME`)."""
        value = self.data.get(key, default)
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise ConfigError(self.key(key), "a name of 1-32 letters, digits, '.', '_' or '-'",
                              value)
        return value

    def string(self, key: str, default: str | None) -> str | None:
        """A string, or None if the key is absent and ``default`` is None."""
        value = self.data.get(key, default)
        return None if value is None else self._valid(validate.string, key, default)

    def boolean(self, key: str, default: bool) -> bool:
        """``true`` or ``false`` (not a number)."""
        return self._valid(validate.boolean, key, default)

    def _valid(self, check: Callable[..., _T], key: str, default: object, *args: Any,
               **kwargs: Any) -> _T:
        """``check(section.key, value, ...)``, its :class:`validate.Invalid` a ConfigError."""
        try:
            return check(self.key(key), self.data.get(key, default), *args, **kwargs)
        except validate.Invalid as exc:
            raise ConfigError(exc.key, exc.expected, exc.got) from None


def _path(s: ConfigSection, key: str, base: Path | None) -> Path | None:
    text = s.string(key, None)
    if text is None:
        return None
    path = Path(text).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return path


def _broker(data: Mapping[str, Any], base: Path | None) -> BrokerConfig:
    s = ConfigSection(data, "broker", {"url", "reconnect_min_s", "reconnect_max_s", "ca_file",
                                  "name"})
    value = data.get("url", BrokerConfig.urls[0])
    if isinstance(value, list):
        if not value:
            raise ConfigError("broker.url", "a ws:// or wss:// URL, or a non-empty list of them",
                              value)
        urls = tuple(s.url(item, f"broker.url[{i}]") for i, item in enumerate(value))
        for i, url in enumerate(urls):
            if url in urls[:i]:
                raise ConfigError(f"broker.url[{i}]", "a URL not already in the list", url)
    else:
        urls = (s.url(value, "broker.url"),)
    low = s.number("reconnect_min_s", BrokerConfig.reconnect_min_s, positive=True)
    high = s.number("reconnect_max_s", BrokerConfig.reconnect_max_s, positive=True)
    if high < low:
        raise ConfigError("broker.reconnect_max_s", f"a number >= reconnect_min_s ({low})", high)
    return BrokerConfig(urls=urls, reconnect_min_s=low, reconnect_max_s=high,
                        ca_file=_path(s, "ca_file", base), name=s.broker_name("name", MAIN_BROKER))


def _positives(data: object, main: BrokerConfig, base: Path | None
               ) -> tuple[PositivesBrokerConfig, ...]:
    if not isinstance(data, list):
        raise ConfigError("positives", "an array of tables ([[positives]] with url and name)",
                          data)
    names = {main.name}
    urls = set(main.urls)
    out: list[PositivesBrokerConfig] = []
    for i, item in enumerate(data):
        key = f"positives[{i}]"
        s = ConfigSection(item, key, {"url", "name", "ca_file"})
        if "url" not in item:
            raise ConfigError(f"{key}.url", "the ws:// or wss:// URL of a broker polled for "
                              "positive tokens")
        url = s.url(item["url"], f"{key}.url")
        if url in urls:
            raise ConfigError(f"{key}.url", "a broker not already configured (broker.url or "
                              "another [[positives]])", url)
        if "name" not in item:
            raise ConfigError(f"{key}.name", "a name for this broker (shown in the UI, used by "
                              "declare-positive --broker)")
        name = s.broker_name("name", None)
        if name in names:
            raise ConfigError(f"{key}.name", "a name not used by another broker", name)
        names.add(name)
        urls.add(url)
        out.append(PositivesBrokerConfig(name=name, url=url, ca_file=_path(s, "ca_file", base)))
    return tuple(out)


def _gps(data: Mapping[str, Any], base: Path | None) -> GpsConfig:
    s = ConfigSection(data, "gps", {"source", "host", "port", "path", "rate", "loop", "latitude",
                               "longitude", "accuracy_m", "stale_after_s"})
    source = s.string("source", GpsConfig.source)
    if source not in ("gpsd", "nmea", "fixed"):
        raise ConfigError("gps.source", 'one of "gpsd", "nmea", "fixed"', source)
    path = _path(s, "path", base)
    if source == "nmea" and path is None:
        raise ConfigError("gps.path", 'the path of an NMEA log when source = "nmea"')
    lat = data.get("latitude")
    lon = data.get("longitude")
    if source == "fixed" and (lat is None or lon is None):
        missing = "gps.latitude" if lat is None else "gps.longitude"
        raise ConfigError(missing, 'a WGS84 value in degrees when source = "fixed"')
    if source != "fixed" and (lat is not None or lon is not None):
        # A fixed position typed in but source left at its default: the device would wait
        # for a receiver that is not there, the position ignored without a word.
        given = "gps.latitude" if lat is not None else "gps.longitude"
        raise ConfigError("gps.source", f'"fixed" for {given} to be used (a fixed position)',
                          source)
    return GpsConfig(
        source=source,
        host=s.string("host", GpsConfig.host) or GpsConfig.host,
        port=s.integer("port", GpsConfig.port, 1, 65535),
        path=path,
        rate=s.number("rate", GpsConfig.rate, positive=True, high=1000.0),
        loop=s.boolean("loop", GpsConfig.loop),
        latitude=None if lat is None else s.number("latitude", 0.0, low=-90.0, high=90.0),
        longitude=None if lon is None else s.number("longitude", 0.0, low=-180.0, high=180.0),
        accuracy_m=s.number("accuracy_m", GpsConfig.accuracy_m, low=0.0, high=100_000.0),
        stale_after_s=s.number("stale_after_s", GpsConfig.stale_after_s, positive=True),
    )


def _protocol(data: Mapping[str, Any]) -> ProtocolConfig:
    s = ConfigSection(data, "protocol", {"radius_m", "token_lifetime_days", "deletion_hour_utc",
                                    "position_interval_s", "poll_interval_s",
                                    "handshake_timeout_s", "min_contact_s", "contact_gap_s",
                                    "max_contact_s", "max_speed_mps"})
    d = ProtocolConfig
    max_contact = s.number("max_contact_s", d.max_contact_s, low=1.0, high=86_400.0)
    return ProtocolConfig(
        radius_m=s.number("radius_m", d.radius_m, positive=True, high=10_000.0),
        token_lifetime_days=s.integer("token_lifetime_days", d.token_lifetime_days, 1,
                                      MAX_TOKEN_LIFETIME_DAYS),
        deletion_hour_utc=s.integer("deletion_hour_utc", d.deletion_hour_utc, 0, 23),
        position_interval_s=s.number("position_interval_s", d.position_interval_s,
                                     low=0.05, high=3600.0),
        poll_interval_s=s.number("poll_interval_s", d.poll_interval_s, low=0.1, high=86_400.0),
        handshake_timeout_s=s.number("handshake_timeout_s", d.handshake_timeout_s,
                                     low=0.5, high=600.0),
        min_contact_s=s.number("min_contact_s", d.min_contact_s, low=0.0, high=max_contact),
        contact_gap_s=s.number("contact_gap_s", d.contact_gap_s, low=0.1, high=3600.0),
        max_contact_s=max_contact,
        max_speed_mps=s.number("max_speed_mps", d.max_speed_mps, positive=True, high=1000.0),
    )


def _ice_server(item: object, index: int) -> IceServer:
    key = f"webrtc.ice_servers[{index}]"
    if not isinstance(item, Mapping):
        raise ConfigError(key, "a table { urls = [...], username = ..., credential = ... }", item)
    s = ConfigSection(item, key, {"urls", "username", "credential"})
    urls = item.get("urls")
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ConfigError(f"{key}.urls", "a list of stun:/turn:/turns: URLs", urls)
    for url in urls:
        if url.split(":", 1)[0] not in ("stun", "stuns", "turn", "turns"):
            raise ConfigError(f"{key}.urls", "URLs starting with stun:, turn: or turns:", url)
    return IceServer(tuple(urls), s.string("username", None), s.string("credential", None))


def _webrtc(data: Mapping[str, Any]) -> WebRtcConfig:
    s = ConfigSection(data, "webrtc", {"ice_servers", "host_addresses", "ice_transport_policy"})
    policy = s.string("ice_transport_policy", WebRtcConfig.ice_transport_policy)
    if policy not in ("all", "relay"):
        raise ConfigError("webrtc.ice_transport_policy", 'one of "all", "relay"', policy)
    servers = data.get("ice_servers", [])
    if not isinstance(servers, list):
        raise ConfigError("webrtc.ice_servers", "a list of tables", servers)
    addresses = data.get("host_addresses", [])
    if not isinstance(addresses, list):
        raise ConfigError("webrtc.host_addresses", 'a list of IP addresses like ["127.0.0.1"]',
                          addresses)
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except (ValueError, TypeError):
            raise ConfigError("webrtc.host_addresses", "IP addresses", address) from None
    ice_servers = tuple(_ice_server(item, i) for i, item in enumerate(servers))
    if policy == "relay" and not any(u.startswith("turn") for srv in ice_servers
                                     for u in srv.urls):
        raise ConfigError("webrtc.ice_transport_policy",
                          '"all", or a turn: server in ice_servers for "relay"', policy)
    return WebRtcConfig(ice_servers, tuple(addresses), policy)


def _storage(data: Mapping[str, Any], base: Path | None) -> StorageConfig:
    s = ConfigSection(data, "storage", {"data_dir"})
    return StorageConfig(data_dir=_path(s, "data_dir", base))


def _privacy(data: Mapping[str, Any]) -> PrivacyConfig:
    s = ConfigSection(data, "privacy", {"decoy_uploads", "decoy_interval_s", "rotation_interval_s"})
    return PrivacyConfig(
        decoy_uploads=s.boolean("decoy_uploads", PrivacyConfig.decoy_uploads),
        decoy_interval_s=s.number("decoy_interval_s", PrivacyConfig.decoy_interval_s,
                                  low=1.0, high=30 * 86_400.0),
        rotation_interval_s=s.number("rotation_interval_s", PrivacyConfig.rotation_interval_s,
                                     low=1.0, high=86_400.0))


def _journal(data: Mapping[str, Any], base: Path | None) -> JournalConfig:
    s = ConfigSection(data, "journal", {"path"})
    return JournalConfig(path=_path(s, "path", base))


def parse_config(data: Mapping[str, Any], *, base_dir: Path | None = None) -> Config:
    """Build a :class:`Config` from a mapping (as read from TOML). Pure.

    Args:
        data: the TOML document as a mapping; missing tables and keys take their defaults.
        base_dir: relative paths (``gps.path``, ``storage.data_dir``) are resolved against it.

    Raises:
        ConfigError: an unknown table or key, or a value of the wrong type or range.
    """
    sections = {"broker", "positives", "gps", "protocol", "webrtc", "storage", "privacy",
                "journal"}
    unknown = sorted(set(data) - sections)
    if unknown:
        raise ConfigError(unknown[0], f"one of the tables {sorted(sections)}")
    broker = _broker(data.get("broker", {}), base_dir)
    return Config(
        broker=broker,
        positives=_positives(data.get("positives", []), broker, base_dir),
        gps=_gps(data.get("gps", {}), base_dir),
        protocol=_protocol(data.get("protocol", {})),
        webrtc=_webrtc(data.get("webrtc", {})),
        storage=_storage(data.get("storage", {}), base_dir),
        privacy=_privacy(data.get("privacy", {})),
        journal=_journal(data.get("journal", {}), base_dir),
    )


def load_config(path: Path) -> Config:
    """Read and parse a TOML config file.

    Raises:
        ConfigError: the file is missing or unreadable, not valid TOML, or has a bad value;
            the message starts with the file name.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:   # says why: "No such file or directory", "Permission denied"
        raise ConfigError("file", f"a readable TOML file ({exc.strerror or exc})",
                          source=str(path)) from exc
    except UnicodeDecodeError:
        raise ConfigError("file", "UTF-8 text", source=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", f"valid TOML ({exc})", source=str(path)) from None
    try:
        return parse_config(data, base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(exc.key, str(exc).split(": expected ", 1)[1], source=str(path)) from None
