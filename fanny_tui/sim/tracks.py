"""What a simulated receiver reports along a true track: noise, outliers, fix losses.

:class:`NoiseModel` turns a :class:`~fanny_tui.sim.scenario.Track` into one observation per
``fix_interval_s`` (pure, seeded: the same seed gives the same observations on every run).
:class:`TrackSource` replays them as a :class:`~fanny_tui.gps.PositionSource` for the real
engine, on a :class:`SimClock` that can run K times faster than real time.

The error model (per device, in local east/north metres):

* **Correlated noise**: each axis follows a first-order autoregressive process (AR(1), a
  discrete Gauss-Markov process) ``e[k] = phi * e[k-1] + sqrt(1 - phi^2) * sigma_m * N(0, 1)``
  with ``phi = exp(-fix_interval_s / correlation_s)``: stationary standard deviation
  ``sigma_m`` per axis, correlation time ``correlation_s``. Real GPS error wanders slowly
  (multipath, atmosphere, satellite geometry change over tens of seconds to minutes); white
  noise (``correlation_s = 0``) would average out over a contact and make the protocol look
  better than it is in the field.
* **Outliers**: with probability ``outlier_rate`` a fix is moved ``outlier_m`` metres in a
  uniformly random direction (that fix only: a multipath jump).
* **Fix losses**: a loss starts with probability ``1 - exp(-loss_rate * fix_interval_s)`` per
  fix and lasts ``loss_s`` seconds (no fix at all: the engine tells the broker).

The accuracy reported with every fix (``GpsFix.accuracy_m``) is the 95 % radius of the
noise model: for an isotropic 2-D normal error of standard deviation ``sigma_m`` per axis,
``sigma_m * sqrt(-2 ln 0.05)`` = 2.448 ``sigma_m`` (the error radius is Rayleigh distributed).
Outliers are not in that figure, as a real receiver's estimate does not cover them either.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ..events import GpsFix, GpsLost
from ..gps import _LossGate
from ..protocol.proximity import METRES_PER_DEGREE
from .scenario import NoiseSpec, Track

#: sqrt(-2 ln 0.05): the 95 % radius of a 2-D normal error, in units of its per-axis sigma.
R95_PER_SIGMA = math.sqrt(-2.0 * math.log(0.05))

ABSENT = "not in the scenario at this time"
LOST = "simulated fix loss"


@dataclass(frozen=True)
class Observation:
    """One simulated receiver epoch at scenario second ``t_s``.

    ``latitude``/``longitude`` (WGS84 degrees) are None when there is no fix; ``reason`` then
    says why (:data:`ABSENT` or :data:`LOST`). ``outlier`` marks a jumped fix.
    """

    t_s: float
    latitude: float | None
    longitude: float | None
    reason: str = ""
    outlier: bool = False

    @property
    def fix(self) -> bool:
        return self.latitude is not None


class NoiseModel:
    """The GPS error model of a scenario (see the module docstring for the process).

    Args:
        spec: the ``[noise]`` table: sigma_m, correlation_s, outlier_rate, outlier_m (metres,
            scenario seconds), loss_rate (per scenario second), loss_s, fix_interval_s.
    """

    def __init__(self, spec: NoiseSpec) -> None:
        self.spec = spec

    @property
    def accuracy_m(self) -> float:
        """The 95 % radius of the noise, metres: what each fix reports as ``accuracy_m``."""
        return self.spec.sigma_m * R95_PER_SIGMA

    def observe(self, track: Track, duration_s: float, seed: int | str) -> list[Observation]:
        """The epochs a receiver on ``track`` reports from second 0 to ``duration_s``.

        Pure: the same arguments give the same list. Every epoch draws the same count of
        random numbers whatever happens, so two settings that differ only in, say,
        ``outlier_rate`` share the same underlying noise path (common random numbers).

        Args:
            track: the true path.
            duration_s: scenario seconds covered (epochs at 0, dt, 2 dt, ... <= duration_s).
            seed: seeds this device's generator (e.g. ``f"{scenario seed}:{device name}"``).

        Returns:
            One :class:`Observation` per ``fix_interval_s``.
        """
        spec = self.spec
        dt = spec.fix_interval_s
        rng = random.Random(seed)
        phi = math.exp(-dt / spec.correlation_s) if spec.correlation_s > 0 else 0.0
        innovation = spec.sigma_m * math.sqrt(1.0 - phi * phi)
        loss_p = 1.0 - math.exp(-spec.loss_rate * dt)
        loss_epochs = int(math.ceil(spec.loss_s / dt)) if spec.loss_s > 0 else 0
        east = rng.gauss(0.0, 1.0) * spec.sigma_m        # start in the stationary state
        north = rng.gauss(0.0, 1.0) * spec.sigma_m
        lost_for = 0
        out: list[Observation] = []
        for k in range(int(math.floor(duration_s / dt + 1e-9)) + 1):
            t = k * dt
            if k:
                east = phi * east + innovation * rng.gauss(0.0, 1.0)
                north = phi * north + innovation * rng.gauss(0.0, 1.0)
            else:
                rng.gauss(0.0, 1.0), rng.gauss(0.0, 1.0)
            loss_draw, outlier_draw, angle = rng.random(), rng.random(), rng.uniform(0, math.tau)
            true = track.position_at(t)
            if true is None:
                out.append(Observation(t, None, None, ABSENT))
                continue
            if lost_for == 0 and loss_p > 0 and loss_draw < loss_p:
                lost_for = loss_epochs
            if lost_for > 0:
                lost_for -= 1
                out.append(Observation(t, None, None, LOST))
                continue
            de, dn = east, north
            outlier = spec.outlier_rate > 0 and outlier_draw < spec.outlier_rate
            if outlier:
                de += spec.outlier_m * math.cos(angle)
                dn += spec.outlier_m * math.sin(angle)
            lat, lon = offset(true[0], true[1], de, dn)
            out.append(Observation(t, lat, lon, outlier=outlier))
        return out


def offset(latitude: float, longitude: float, east_m: float, north_m: float
           ) -> tuple[float, float]:
    """The point ``east_m``/``north_m`` metres from a WGS84 point (local flat earth: good to
    well under a millimetre over a few hundred metres)."""
    lat = latitude + north_m / METRES_PER_DEGREE
    lon = longitude + east_m / (METRES_PER_DEGREE * math.cos(math.radians(latitude)))
    return lat, lon


class SimClock:
    """Scenario time on the event loop's clock, ``speed`` times faster than real time.

    Scenario second 0 is the moment :meth:`start` is called; sources wait for it.
    """

    def __init__(self, speed: float) -> None:
        """Args: speed: scenario seconds per real second (> 0)."""
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed: expected a number > 0, got {speed!r}")
        self.speed = speed
        self.started = asyncio.Event()
        self._t0: float | None = None

    def start(self) -> None:
        """Make now scenario second 0 (once)."""
        if self._t0 is None:
            self._t0 = asyncio.get_running_loop().time()
            self.started.set()

    def now_s(self) -> float:
        """Scenario seconds since :meth:`start` (0 before it)."""
        if self._t0 is None:
            return 0.0
        return (asyncio.get_running_loop().time() - self._t0) * self.speed

    async def sleep_until(self, t_s: float) -> None:
        """Sleep until scenario second ``t_s`` (at once if it has passed)."""
        await self.started.wait()
        delay = (t_s - self.now_s()) / self.speed
        if delay > 0:
            await asyncio.sleep(delay)


class TrackSource:
    """Replays a list of :class:`Observation` as live fixes (``GpsFix.source == "track"``).

    Waits for the clock to start, then yields the observation of the current scenario second
    at each epoch: a :class:`GpsFix` (mode 3, the noise model's 95 % ``accuracy_m``, ``time``:
    now, UTC — the engine's own clocks and timestamps are real, only the track is compressed),
    or one :class:`GpsLost` per run of epochs without a fix. An epoch whose moment has already
    passed when the loop gets to it (an overloaded event loop) is skipped and counted in
    :attr:`late`. After the last epoch: one ``GpsLost("end of the scenario")``, then quiet.
    """

    def __init__(self, observations: Sequence[Observation], clock: SimClock, *,
                 accuracy_m: float, fix_interval_s: float) -> None:
        self.observations = list(observations)
        self.clock = clock
        self.accuracy_m = accuracy_m
        self.fix_interval_s = fix_interval_s
        self.late = 0

    async def stream(self) -> AsyncIterator[GpsFix | GpsLost]:
        """Yield the epochs on the scenario clock (see the class docstring)."""
        gate = _LossGate()
        await self.clock.started.wait()
        k = 0
        while k < len(self.observations):
            current = int(self.clock.now_s() / self.fix_interval_s)
            if current > k:
                self.late += current - k
                k = current
                continue
            observation = self.observations[k]
            if observation.latitude is not None and observation.longitude is not None:
                gate.fix()
                yield GpsFix(latitude=observation.latitude, longitude=observation.longitude,
                             accuracy_m=self.accuracy_m, mode=3, time=datetime.now(UTC),
                             source="track")
            elif gate.lose():
                yield GpsLost(reason=observation.reason)
            k += 1
            await self.clock.sleep_until(k * self.fix_interval_s)
        if gate.lose():
            yield GpsLost(reason="end of the scenario")
        await asyncio.Event().wait()
