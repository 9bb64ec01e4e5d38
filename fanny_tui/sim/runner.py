"""One simulated run: a real broker, K real engines on replayed tracks, then the verdict.

:func:`run_scenario` starts the broker in this process on a free loopback port (open
declarations, SQLite in the work directory), one :class:`~fanny_tui.engine.Engine` per track
(headless; real aiortc, ICE host candidates restricted to 127.0.0.1; a
:class:`~fanny_tui.sim.tracks.TrackSource` for positions), waits until every engine is
connected, starts the scenario clock, lets the scenario play, stops everything and reads each
device's token store.

Time compression (``speed`` = K): the tracks play K times faster. Divided by K: every protocol
duration given to the engines (``position_interval_s``, ``min_contact_s``, ``contact_gap_s``,
``max_contact_s``, ``poll_interval_s``), the ID rotation interval (``[privacy]
rotation_interval_s``) and the broker's match cool-down (300 s, or ``--sweep cooldown_s``),
position time-out and housekeeping
interval. Multiplied by K: ``max_speed_mps`` (the devices' and the broker's, which applies the
devices' value) and the broker's position rate limit. Times measured on the engines are
multiplied back by K: every figure reported is in scenario seconds. What is not compressed: the
network and aiortc (``handshake_timeout_s`` stays real, and with it the token's ack budget,
``token_timeout_s``; a 0.3 s handshake counts as 0.3 K scenario seconds of latency), so keep K
such that a handshake stays well under ``position_interval_s`` / K. The heartbeat loss,
``max(3 position_interval_s, contact_gap_s)``, follows its scaled parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, PrivacyConfig, parse_config
from ..events import (
    Contact,
    ContactClosed,
    Event,
    HandshakeFailed,
    IdsRotated,
    MatchFound,
    TokenStored,
)
from ..protocol.proximity import haversine_m
from ..store import TokenStore
from .history import History
from .metrics import CloseRecall, Metrics, close_recall, detections, evaluate
from .scenario import (
    NOISE_KEYS,
    PROTOCOL_KEYS,
    NoiseSpec,
    Scenario,
    Track,
    check_protocol,
    parse_noise,
)
from .tracks import NoiseModel, SimClock, TrackSource
from .truth import Pair, TrueContact, close_intervals, pair, true_contacts

log = logging.getLogger(__name__)

#: The devices' [privacy] keys ``--sweep`` may vary (scenario seconds, divided by the speed).
PRIVACY_KEYS = ("rotation_interval_s",)

#: The broker's [matching] keys ``--sweep`` may vary (scenario seconds, divided by the speed):
#: ``cooldown_s``, how long after a match the same pair is not matched again.
BROKER_KEYS = ("cooldown_s",)

#: The settings ``--sweep`` may vary: the devices' [protocol] and [privacy] keys, the [noise]
#: keys and the broker's [matching] keys.
SWEEP_KEYS = PROTOCOL_KEYS + PRIVACY_KEYS + NOISE_KEYS + BROKER_KEYS

#: Protocol durations divided by the speed (scenario seconds -> real seconds).
SCALED_DURATIONS = ("position_interval_s", "poll_interval_s", "min_contact_s", "contact_gap_s",
                    "max_contact_s")

#: The broker's time settings in scenario seconds (its defaults), divided by the speed.
BROKER_COOLDOWN_S = 300.0
BROKER_POSITION_TIMEOUT_S = 60.0
BROKER_HOUSEKEEPING_S = 5.0
BROKER_POSITION_RATE_PER_S = 10.0

CONNECT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class SimError(Exception):
    """A run could not be carried out (one line saying why)."""


def split_settings(settings: Mapping[str, float]) -> tuple[
        dict[str, float], dict[str, float], dict[str, float], dict[str, float]]:
    """Split ``--sweep``/override settings into (protocol, noise, privacy, broker) keys.

    Raises:
        SimError: an unknown key (one line listing the known ones), or a broker key that is
            not a number > 0 (named).
    """
    protocol, noise, privacy, broker = {}, {}, {}, {}
    for key, value in settings.items():
        if key in PROTOCOL_KEYS:
            protocol[key] = float(value)
        elif key in NOISE_KEYS:
            noise[key] = float(value)
        elif key in PRIVACY_KEYS:
            privacy[key] = float(value)
        elif key in BROKER_KEYS:
            if not (math.isfinite(float(value)) and float(value) > 0):
                raise SimError(f"{key}: expected a number of seconds > 0, got {value!r}")
            broker[key] = float(value)
        else:
            raise SimError(f"{key}: not a setting fanny-sim can vary; known: "
                           f"{', '.join(SWEEP_KEYS)}")
    return protocol, noise, privacy, broker


def device_protocol(scenario_protocol: Mapping[str, float], overrides: Mapping[str, float],
                    speed: float, *, speed_name: str = "--speed") -> dict[str, float]:
    """The devices' ``[protocol]`` table in real seconds for a run at ``speed``.

    Args:
        speed_name: how the message of a speed that scales a value out of range names where
            the speed came from (``--speed``, or the scenario's ``[scenario] speed``).

    Raises:
        ConfigError: a value is out of range before scaling (names the key).
        SimError: the speed scales a value out of range: one line in terms of the speed, e.g.
            ``--speed 40: max_speed_mps 30 x 40 = 1200 is out of range (expected a number > 0
            and <= 1000); the fastest speed for these settings is 33.3``.
    """
    merged = check_protocol({**scenario_protocol, **overrides})
    values = {key: float(getattr(merged, key)) for key in PROTOCOL_KEYS}
    try:
        return _scaled(values, speed)
    except ConfigError as exc:
        key = exc.key.removeprefix("protocol.")
        op, scaled = ("x", values[key] * speed) if key == "max_speed_mps" else (
            "/", values[key] / speed)
        expected = str(exc).partition(": expected ")[2].partition(", got ")[0]
        raise SimError(f"{speed_name} {speed:g}: {key} {values[key]:g} {op} {speed:g} = "
                       f"{scaled:g} is out of range (expected {expected}); "
                       f"{_speed_limit(values, speed)}") from None


def _scaled(values: Mapping[str, float], speed: float) -> dict[str, float]:
    """``values`` (scenario seconds) at ``speed``: durations divided, the speed bound
    multiplied; checked (ConfigError names the key)."""
    out = dict(values)
    for key in SCALED_DURATIONS:
        out[key] /= speed
    out["max_speed_mps"] *= speed
    check_protocol(out)
    return out


def _speed_limit(values: Mapping[str, float], speed: float) -> str:
    """The fastest (or slowest) speed that keeps ``values`` in range, as a hint; ``values``
    are in range at speed 1 (checked before), so the bound lies between 1 and ``speed``."""
    def fits(k: float) -> bool:
        try:
            _scaled(values, k)
        except ConfigError:
            return False
        return True

    good, bad = 1.0, speed
    for _ in range(60):
        middle = (good + bad) / 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    faster = speed > 1.0
    scale = 10.0 ** (2 - math.floor(math.log10(good)))   # 3 significant digits
    rounded = (math.floor if faster else math.ceil)(good * scale) / scale
    limit = rounded if fits(rounded) else good
    return f"the {'fastest' if faster else 'slowest'} speed for these settings is {limit:g}"


def prepare(scenario: Scenario, settings: Mapping[str, float], speed: float | None
            ) -> tuple[float, dict[str, float], NoiseSpec]:
    """Check one run's settings: (speed, the devices' scaled [protocol] table, the noise).

    Raises:
        SimError: a bad speed or setting (one line naming the key).
    """
    given = speed is not None
    speed = float(scenario.speed if speed is None else speed)
    if not speed > 0:
        raise SimError(f"--speed: expected a number > 0, got {speed!r}")
    protocol_over, noise_over, privacy_over, _ = split_settings(settings)
    speed_name = "--speed" if given else f"{scenario.name}: [scenario] speed"
    try:
        noise = parse_noise({**asdict(scenario.noise), **noise_over})
        protocol = device_protocol(scenario.protocol, protocol_over, speed,
                                   speed_name=speed_name)
        parse_config({"privacy": {k: v / speed for k, v in privacy_over.items()}})
    except ConfigError as exc:
        raise SimError(f"{scenario.name}: {exc} (at speed {speed:g})") from None
    return speed, protocol, noise


def device_config(broker_url: str, protocol: Mapping[str, float], speed: float,
                  rotation_interval_s: float = PrivacyConfig.rotation_interval_s) -> Config:
    """The configuration of every simulated device: loopback-only ICE, fast reconnects, the
    scaled ``[protocol]`` table (from :func:`device_protocol`) and the ID rotation interval
    (``[privacy] rotation_interval_s``, scenario seconds, default the device default) divided
    by ``speed``.

    Raises:
        ConfigError: the scaled rotation interval is out of range
            (``privacy.rotation_interval_s``).
    """
    return parse_config({
        "broker": {"url": broker_url, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
        "protocol": dict(protocol),
        "privacy": {"rotation_interval_s": rotation_interval_s / speed},
        "webrtc": {"host_addresses": ["127.0.0.1"]},
    })


def simulated_broker(db_path: Path, protocol: Mapping[str, float], speed: float,
                     cooldown_s: float = BROKER_COOLDOWN_S) -> Any:
    """The ``BrokerSettings`` of a run's broker: loopback, a free port, SQLite at ``db_path``,
    open declarations; its time settings (scenario seconds: ``cooldown_s``, the match
    cool-down, default :data:`BROKER_COOLDOWN_S`) divided by ``speed``, its position rate
    multiplied by it, and the devices' scaled ``max_speed_mps`` (from ``protocol``, the
    table of :func:`device_protocol`)."""
    from broker.server import BrokerSettings

    return BrokerSettings(
        host="127.0.0.1", port=0, db_path=db_path, cooldown_s=cooldown_s / speed,
        position_timeout_s=BROKER_POSITION_TIMEOUT_S / speed,
        housekeeping_interval_s=BROKER_HOUSEKEEPING_S / speed,
        position_rate_per_s=BROKER_POSITION_RATE_PER_S * speed, open_declarations=True,
        max_speed_mps=protocol["max_speed_mps"], upload_answer_delay_s=0.0)


def grid(sweep: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """The cartesian product of a sweep, in the order given (one empty setting if none)."""
    keys = list(sweep)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(sweep[k] for k in keys))]


@dataclass(frozen=True)
class PairReport:
    """One pair of devices, the truth beside what the devices measured (the ``--json`` record's
    ``pairs``: every detected pair and every missed true pair).

    Attributes:
        pair: the two device names (sorted).
        true: a true pair (at least one true contact); ``detected``: the stores share a token.
        close: a close pair (a true contact at ``[truth] close_radius_m`` too); None: the
            scenario has no closer tier.
        true_closest_m: the closest true distance over the scenario, metres (None: never both
            present).
        true_within_s: scenario seconds the true distance was within the truth radius, in all;
            ``true_longest_s``: the longest such interval.
        first_token_s: the scenario second a shared token was first on both devices (None:
            not detected).
        measured_within_s / measured_closest_m: the largest time within the radius and the
            smallest closest distance the two devices' stored contacts carried
            (``TokenStored.contact``, scenario seconds and metres; None: no measure).
        history: the pair's matches as the engines saw them, in order of time
            (:meth:`~fanny_tui.sim.history.History.pairs`: per match its scenario second,
            channel open or failure reason, token, close reason and second, measures at the
            close; ``{device: value}`` where the two sides differ).
    """

    pair: Pair
    true: bool
    detected: bool
    true_closest_m: float | None
    true_within_s: float
    true_longest_s: float
    first_token_s: float | None = None
    measured_within_s: float | None = None
    measured_closest_m: float | None = None
    close: bool | None = None
    history: tuple[dict[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record (metres to 0.1, seconds to 1)."""
        def r(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)
        return {"pair": list(self.pair), "true": self.true, "close": self.close,
                "detected": self.detected,
                "true_closest_m": r(self.true_closest_m, 1),
                "true_within_s": r(self.true_within_s, 0),
                "true_longest_s": r(self.true_longest_s, 0),
                "first_token_s": r(self.first_token_s, 0),
                "measured_within_s": r(self.measured_within_s, 0),
                "measured_closest_m": r(self.measured_closest_m, 1),
                "history": list(self.history)}


def pair_reports(scenario: Scenario, metrics: Metrics, first_token: Mapping[Pair, float],
                 measured: Mapping[Pair, Sequence[Contact]],
                 history: Mapping[Pair, Sequence[dict[str, Any]]] | None = None
                 ) -> tuple[PairReport, ...]:
    """The :class:`PairReport` of every detected pair and every missed true pair.

    Args:
        scenario: its tracks and ``[truth] radius_m`` give the true distances.
        metrics: the run's verdict (its false and missed pairs).
        first_token: per detected pair, its first token (from :func:`detections`).
        measured: per detected pair, the contact measures stored with its tokens, in
            scenario seconds (either device's).
        history: per pair, its matches (from :meth:`~fanny_tui.sim.history.History.pairs`).
    """
    tracks = {t.name: t for t in scenario.tracks}
    true_pairs = set(metrics.missed_pairs) | (set(first_token) - set(metrics.false_pairs))
    truth = scenario.truth
    out = []
    for key in sorted(set(first_token) | set(metrics.missed_pairs)):
        intervals = close_intervals(tracks[key[0]], tracks[key[1]], truth.radius_m,
                                    until_s=scenario.duration_s)
        close = None
        if truth.close_radius_m is not None:
            close = key in true_pairs and any(
                end - start >= truth.duration_s for start, end, _ in close_intervals(
                    tracks[key[0]], tracks[key[1]], truth.close_radius_m,
                    until_s=scenario.duration_s))
        spans = [end - start for start, end, _ in intervals]
        contacts = measured.get(key, ())
        durations = [c.duration_s for c in contacts]
        closest = [c.closest_m for c in contacts if c.closest_m is not None]
        out.append(PairReport(
            pair=key, true=key in true_pairs, detected=key in first_token,
            true_closest_m=_closest_m(tracks[key[0]], tracks[key[1]],
                                      until_s=scenario.duration_s),
            true_within_s=sum(spans), true_longest_s=max(spans, default=0.0),
            first_token_s=first_token.get(key),
            measured_within_s=max(durations) if durations else None,
            measured_closest_m=min(closest) if closest else None, close=close,
            history=tuple((history or {}).get(key, ()))))
    return tuple(out)


def scenario_truth(scenario: Scenario, radius_m: float | None = None) -> list[TrueContact]:
    """The scenario's true contacts (:func:`~fanny_tui.sim.truth.true_contacts`) over the
    simulated time only: from second 0 to ``[scenario] duration_s``, however long the tracks.

    Args:
        scenario: its tracks, ``duration_s`` and ``[truth]``.
        radius_m: the radius in metres (default ``[truth] radius_m``).
    """
    truth = scenario.truth
    return true_contacts(scenario.tracks, truth.radius_m if radius_m is None else radius_m,
                         truth.duration_s, until_s=scenario.duration_s)


def judge_close(scenario: Scenario, detected: Mapping[Pair, float]) -> CloseRecall | None:
    """The recall on the scenario's close pairs (``[truth] close_radius_m``, from the
    noise-free tracks); None when the scenario has no closer tier.

    Args:
        scenario: its tracks and ``[truth]``.
        detected: the detected pairs (from :func:`~fanny_tui.sim.metrics.detections`).
    """
    truth = scenario.truth
    if truth.close_radius_m is None:
        return None
    contacts = scenario_truth(scenario, truth.close_radius_m)
    return close_recall(truth.close_radius_m, contacts, detected)


def _closest_m(first: Track, second: Track, step_s: float = 1.0,
               until_s: float = math.inf) -> float | None:
    """The closest true distance of two tracks while both are present, up to scenario second
    ``until_s`` (sampled every second)."""
    begin = max(first.start_s, second.start_s)
    end = min(first.end_s, second.end_s, until_s)
    if begin > end:
        return None
    best = math.inf
    for k in range(int(math.floor((end - begin) / step_s + 1e-9)) + 1):
        p, q = first.position_at(begin + k * step_s), second.position_at(begin + k * step_s)
        if p is not None and q is not None:
            best = min(best, haversine_m(p[0], p[1], q[0], q[1]))
    return None if best == math.inf else best


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run (every duration in scenario seconds unless named ``real``).

    Attributes:
        scenario: its name; ``settings``: the values set for this run (sweep / overrides).
        speed: the time compression; ``devices``: how many engines ran.
        radius_m / sigma_m / min_contact_s: the run's effective values, for tables.
        contacts: the true contacts; ``metrics``: the verdict.
        matches: matches reported to the devices (each pair counts once per match).
        failures: handshake failure reasons and counts.
        measured_contacts_s: durations of the contacts the engines measured (ContactClosed).
        match_to_token_s: per stored token, match to token as the engine measured it.
        late_fixes: fixes skipped because the event loop was late (0 in a sane run).
        real_s / cpu_s: wall-clock and CPU seconds of the run (process time, all threads).
        closes: per device and contact, why its data channel closed (``ContactClosed.reason``:
            ``parted``, ``max_contact``, ``channel_lost``, ...) and how many times.
        rotations: ID rotations of all devices by reason (``schedule``, ``declared``).
        pairs: per detected, false or missed pair, a :class:`PairReport` (the truth beside
            what the devices measured), sorted by pair.
        close: the recall on the close pairs (``[truth] close_radius_m``); None: no closer
            tier.
        unlinked: exchanges (one device's side of a match) whose other device could not be
            told from the events, so in no pair's ``history``.
    """

    scenario: str
    settings: dict[str, float]
    speed: float
    devices: int
    radius_m: float
    sigma_m: float
    min_contact_s: float
    contacts: tuple[TrueContact, ...]
    metrics: Metrics
    matches: int
    failures: dict[str, int]
    measured_contacts_s: tuple[float, ...]
    late_fixes: int
    real_s: float
    cpu_s: float
    tokens: int = 0
    match_to_token_s: tuple[float, ...] = ()
    closes: dict[str, int] = field(default_factory=dict)
    rotations: dict[str, int] = field(default_factory=dict)
    pairs: tuple[PairReport, ...] = ()
    close: CloseRecall | None = None
    unlinked: int = 0

    @property
    def cpu_percent(self) -> float:
        """CPU time over wall-clock time, percent of one core."""
        return 100.0 * self.cpu_s / self.real_s if self.real_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the run."""
        return {"scenario": self.scenario, "settings": self.settings, "speed": self.speed,
                "devices": self.devices, "radius_m": self.radius_m, "sigma_m": self.sigma_m,
                "min_contact_s": self.min_contact_s, **self.metrics.as_dict(),
                "true_contacts": [{"pair": list(c.pair), "start_s": c.start_s,
                                   "end_s": c.end_s, "closest_m": round(c.closest_m, 2)}
                                  for c in self.contacts],
                "matches": self.matches, "tokens": self.tokens, "failures": self.failures,
                "measured_contacts_s": list(self.measured_contacts_s),
                "match_to_token_s": list(self.match_to_token_s),
                "closes": self.closes, "rotations": self.rotations,
                "pairs": [p.as_dict() for p in self.pairs],
                "close": None if self.close is None else self.close.as_dict(),
                "unlinked": self.unlinked,
                "late_fixes": self.late_fixes, "real_s": round(self.real_s, 2),
                "cpu_s": round(self.cpu_s, 2), "cpu_percent": round(self.cpu_percent, 1)}


class _Recorder:
    """What one device did, in scenario seconds."""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.first_stored: dict[str, float] = {}
        self.matches = 0
        self.failures: Counter[str] = Counter()
        self.contacts_s: list[float] = []
        self.match_to_token_s: list[float] = []
        self.closes: Counter[str] = Counter()
        self.rotations: Counter[str] = Counter()
        self.measured: dict[str, list[Contact]] = {}    # per token, in scenario seconds

    def __call__(self, event: Event) -> None:
        speed = self.clock.speed
        if isinstance(event, TokenStored):
            self.first_stored.setdefault(event.token, self.clock.now_s())
            if event.match_to_token_s is not None:
                self.match_to_token_s.append(event.match_to_token_s * speed)
            if event.contact is not None:
                c = event.contact
                self.measured.setdefault(event.token, []).append(
                    Contact(c.duration_s * speed, c.closest_m, c.median_m, c.samples))
        elif isinstance(event, MatchFound):
            self.matches += 1
        elif isinstance(event, HandshakeFailed):
            self.failures[event.reason.split(":", 1)[0]] += 1
        elif isinstance(event, ContactClosed):
            self.contacts_s.append(event.contact.duration_s * speed)
            self.closes[event.reason] += 1
        elif isinstance(event, IdsRotated):
            self.rotations[event.reason] += 1


async def run_scenario(scenario: Scenario, workdir: Path, *, speed: float | None = None,
                       settings: Mapping[str, float] | None = None,
                       connect_timeout_s: float = CONNECT_TIMEOUT_S) -> RunResult:
    """Run ``scenario`` once with real engines and a real broker (see the module docstring).

    Args:
        scenario: the loaded scenario.
        workdir: an empty directory for the broker's SQLite file and the devices' stores.
        speed: time compression K (default: the scenario's ``speed``).
        settings: protocol, privacy, noise or broker keys overriding the scenario's or the
            broker's defaults (see :data:`SWEEP_KEYS`).
        connect_timeout_s: real seconds to wait for every engine to reach the broker.

    Returns:
        The :class:`RunResult`.

    Raises:
        SimError: a bad setting or speed, or the engines could not all connect.
    """
    # The engines import aiortc at their first match: ~0.2 s or more of a blocked event loop,
    # i.e. seconds of scenario time at speed K. Import it before the clock starts.
    import aiortc  # noqa: F401

    from broker.server import start_broker

    from ..engine import Engine

    settings = dict(settings or {})
    speed, protocol, noise = prepare(scenario, settings, speed)
    protocol_over, _, privacy_over, broker_over = split_settings(settings)
    model = NoiseModel(noise)
    contacts = scenario_truth(scenario)
    clock = SimClock(speed)
    observations = [model.observe(track, scenario.duration_s, f"{scenario.seed}:{track.name}")
                    for track in scenario.tracks]
    history = History(clock.now_s, speed,
                      position_interval_s=protocol["position_interval_s"] * speed)
    workdir.mkdir(parents=True, exist_ok=True)
    broker_settings = simulated_broker(workdir / "broker.sqlite3", protocol, speed,
                                       **broker_over)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    sources: list[TrackSource] = []
    recorders: list[_Recorder] = []
    dirs: list[Path] = []
    async with start_broker(broker_settings) as broker:
        config = device_config(broker.url, protocol, speed, **privacy_over)
        engines = []
        for index, (track, seen) in enumerate(zip(scenario.tracks, observations, strict=True)):
            source = TrackSource(seen, clock, accuracy_m=model.accuracy_m,
                                 fix_interval_s=noise.fix_interval_s)
            data_dir = workdir / f"device-{index:03d}"
            engine = Engine(config, data_dir, source=source)
            recorder = _Recorder(clock)
            engine.subscribe(recorder)
            engine.subscribe(history.recorder(track.name))
            sources.append(source)
            recorders.append(recorder)
            dirs.append(data_dir)
            engines.append(engine)
            log.debug("device %d is %s", index, track.name)
        tasks = [asyncio.create_task(engine.run(), name=f"fanny-sim-{i}")
                 for i, engine in enumerate(engines)]
        try:
            await _all_connected(engines, tasks, connect_timeout_s)
            clock.start()
            await clock.sleep_until(scenario.duration_s)
        finally:
            for engine in engines:
                await engine.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                       STOP_TIMEOUT_S)
    real_s, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
    stored: dict[str, dict[str, float]] = {}
    for track, recorder, data_dir in zip(scenario.tracks, recorders, dirs, strict=True):
        store = TokenStore.in_dir(data_dir, read_only=True)
        try:
            on_disk = {t.token for t in store.tokens()}
        finally:
            store.close()
        # The store is what the device holds; the events say when it got each token (one
        # stored as the engines were stopped, before its event, counts at the scenario's end).
        stored[track.name] = {token: recorder.first_stored.get(token, scenario.duration_s)
                              for token in on_disk}
    failures: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    rotations: Counter[str] = Counter()
    for recorder in recorders:
        failures.update(recorder.failures)
        closes.update(recorder.closes)
        rotations.update(recorder.rotations)
    effective = check_protocol({**scenario.protocol, **protocol_over})
    first_token = detections(stored)
    metrics = evaluate(contacts, first_token)
    measured: dict[Pair, list[Contact]] = {}
    for (name_a, tokens_a), (name_b, tokens_b) in itertools.combinations(stored.items(), 2):
        shared = tokens_a.keys() & tokens_b.keys()
        key = pair(name_a, name_b)
        for token in shared:
            for recorder in recorders:
                measured.setdefault(key, []).extend(recorder.measured.get(token, ()))
    return RunResult(
        scenario=scenario.name, settings=settings, speed=speed, devices=len(engines),
        radius_m=effective.radius_m, sigma_m=noise.sigma_m,
        min_contact_s=effective.min_contact_s, contacts=tuple(contacts),
        metrics=metrics,
        matches=sum(r.matches for r in recorders) // 2, failures=dict(failures),
        measured_contacts_s=tuple(sorted(s for r in recorders for s in r.contacts_s)),
        late_fixes=sum(s.late for s in sources), real_s=real_s, cpu_s=cpu_s,
        tokens=len({t for tokens in stored.values() for t in tokens}),
        match_to_token_s=tuple(sorted(s for r in recorders for s in r.match_to_token_s)),
        closes=dict(closes), rotations=dict(rotations),
        pairs=pair_reports(scenario, metrics, first_token, measured, history.pairs()),
        close=judge_close(scenario, first_token), unlinked=history.unlinked())


async def _all_connected(engines: Sequence[Any], tasks: Sequence[asyncio.Task[None]],
                         timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not all(engine.broker_connected for engine in engines):
        crashed = next((t for t in tasks if t.done()), None)
        if crashed is not None:
            exc = crashed.exception() if not crashed.cancelled() else None
            raise SimError(f"a device stopped before the scenario began: {exc!r}")
        if loop.time() > deadline:
            missing = sum(1 for engine in engines if not engine.broker_connected)
            raise SimError(f"{missing} of {len(engines)} devices could not connect to the "
                           f"broker within {timeout_s:g} s")
        await asyncio.sleep(0.05)
