"""The broker under load (issue 7, point 5): live positions in the broker's own state.

Devices are placed on a square lattice 50 m apart (constant density whatever their number:
400 per square kilometre, about 36 in the 3 x 3 grid cells of 100 m that a lookup visits)
and fed through the public methods of the broker's :class:`~broker.state.BrokerState`
(``connect``, ``update_position``), the same calls the server makes for a ``hello`` and a
``position``; no WebSocket is opened for them (a million sockets would measure the kernel,
not the broker). Figures:

* ``update_us``: the CPU cost (thread time) of one position update (a device moving by up to
  2 m) with N live positions (1,000,000; ``--quick``: 20,000) beside the same at 1,000 (the
  peer), measured in alternating rounds (medians): the ratio is the growth.
  ``update_us_sparse``: the same with the devices 200 m apart (25 per square kilometre).
* ``position_bytes``: resident memory per live position (session + position + the pairs it
  matched), from the process's RSS before and after filling a running broker's state.
* ``gc_pause_ms``: one full pass of CPython's cyclic garbage collector in that broker process
  with the N positions, beside the same before they were added: a stall the broker's own code
  does not cause but its objects do (the collector walks every tracked object).
* ``housekeeping_stall_ms``: the longest event-loop stall of a running broker holding those
  N positions over two housekeeping intervals, beside the same broker's longest stall over
  the same time before they were added (the machine's own noise).
* ``expiry_stall_ms``: the same measure while housekeeping drops all N positions at once: the
  running broker's clock (its ``monotonic``) is moved ``position_timeout_s`` ahead, so that
  every position is stale at the next housekeeping (a million devices gone silent together,
  the worst case of the expiry); floor: the same idle stall. The note gives the time the
  expiry took and the positions left after it (0 expected). ``expiry_batch_cpu_ms``: the
  longest expiry batch of that drop in CPU time of the loop's thread (the broker's own code),
  beside its wall time in the note (the difference: the process was not running).
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from broker.server import BrokerSettings, start_broker
from broker.state import BrokerState
from fanny_tui.protocol.proximity import METRES_PER_DEGREE

from .common import LOOPBACK, Budget, Figure, LoopStall, Scale

SPACING_M = 50.0
SPARSE_SPACING_M = 200.0
RADIUS_M = 30.0
LAT0, LON0 = 48.80, 2.20


def rss_bytes() -> int:
    """This process's resident set size, bytes (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _place(i: int, side: int, spacing_m: float = SPACING_M) -> tuple[float, float]:
    row, col = divmod(i, side)
    lat = LAT0 + row * spacing_m / METRES_PER_DEGREE
    lon = LON0 + col * spacing_m / (METRES_PER_DEGREE * math.cos(math.radians(LAT0)))
    return lat, lon


def populate(state: BrokerState, count: int, now: float, budget: Budget,
             spacing_m: float = SPACING_M) -> tuple[str, ...]:
    """Connect ``count`` sessions and give each a position on a lattice ``spacing_m`` apart
    (bounded by ``budget``: fewer when it runs out). Returns the session IDs, as a tuple
    (the garbage collector untracks a tuple of str at its first pass, a list never)."""
    side = math.ceil(math.sqrt(count))
    sessions = []
    for i in range(count):
        if i % 10_000 == 0 and budget.over:
            break
        session_id = str(uuid.uuid4())
        state.connect(session_id, RADIUS_M, now)
        lat, lon = _place(i, side, spacing_m)
        state.update_position(session_id, lat, lon, 4.0, now)
        sessions.append(session_id)
    return tuple(sessions)


STEP_S = 0.25
"""Seconds between two updates of one session: its moves (at most 5.7 m) stay below the
broker's implausible-jump bound (30 m/s), so every update measured is accepted and matched."""


def update_cost(state: BrokerState, sessions: tuple[str, ...], updates: int, now: float,
                rng: random.Random, spacing_m: float = SPACING_M) -> tuple[float, float]:
    """Mean seconds per ``update_position`` of a random live session moved by up to 2 m from
    its lattice place, in CPU time of this thread (``time.thread_time``): on a shared machine
    the wall clock also counts the time the process was not running at all. The updates go
    in batches of distinct sessions, each batch :data:`STEP_S` after the one before, the
    first at ``now`` (at least :data:`STEP_S` after the sessions' previous updates).

    Returns:
        ``(seconds per update, the instant of the next batch)``.
    """
    side = math.ceil(math.sqrt(len(sessions)))
    jitter = 2.0 / METRES_PER_DEGREE
    moves = []
    batch_now = now
    while len(moves) < updates:
        for i in rng.sample(range(len(sessions)), min(updates - len(moves), len(sessions))):
            lat, lon = _place(i, side, spacing_m)
            moves.append((sessions[i], lat + rng.uniform(-jitter, jitter),
                          lon + rng.uniform(-jitter, jitter), batch_now))
        batch_now += STEP_S
    start = time.thread_time()
    for session_id, lat, lon, at in moves:
        state.update_position(session_id, lat, lon, 4.0, at)
    return (time.thread_time() - start) / updates, batch_now


Lattice = tuple[BrokerState, tuple[str, ...], float]


def _alternate(peer: Lattice, measured: Lattice, updates: int, rng: random.Random,
               rounds: int = 5) -> tuple[float, float]:
    """Mean seconds per update of ``peer`` and of ``measured``, in alternating rounds (the
    machine's load drifts: each figure is the median of its rounds)."""
    costs: tuple[list[float], list[float]] = ([], [])
    clocks = [time.monotonic() + STEP_S] * 2      # after the lattices' populate()
    for _ in range(rounds):
        for k, (cost, (state, sessions, spacing)) in enumerate(
                zip(costs, (peer, measured), strict=True)):
            seconds, clocks[k] = update_cost(state, sessions, updates // rounds,
                                             max(time.monotonic(), clocks[k]), rng, spacing)
            cost.append(seconds)
    return statistics.median(costs[0]), statistics.median(costs[1])


def _time_calls(obj: object, name: str) -> list[tuple[float, float]]:
    """Wrap ``obj``'s method ``name`` on the instance; each call appends (thread CPU seconds,
    wall seconds) to the returned list. ``del obj.name`` restores the class's method."""
    method = getattr(obj, name)
    calls: list[tuple[float, float]] = []

    def timed(*args: object, **kwargs: object) -> object:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return method(*args, **kwargs)
        finally:
            calls.append((time.thread_time() - cpu, time.perf_counter() - wall))

    setattr(obj, name, timed)
    return calls


def _full_collection() -> float:
    """Seconds of one full pass of the cyclic garbage collector (what CPython runs on its own
    once the long-lived objects grew by a quarter), on the event loop's thread: the second of
    two, since the first also untracks this benchmark's own tuple of session IDs (a broker
    holds no such thing; as a list, its million items would be walked by every pass)."""
    gc.collect()
    start = time.perf_counter()
    gc.collect()
    return time.perf_counter() - start


def _state(settings: BrokerSettings) -> BrokerState:
    return BrokerState(settings.radius_max_m, settings.cooldown_s, settings.position_timeout_s,
                       settings.route_ttl_s, max_speed_mps=settings.max_speed_mps)


async def run(scale: Scale) -> list[Figure]:
    big = scale.pick(1_000_000, 20_000)
    small = 1_000
    updates = scale.pick(50_000, 5_000)
    budget = Budget(scale.pick(600, 20))
    rng = random.Random(7)
    interval = scale.pick(5, 1)   # the default housekeeping interval in a full run

    with tempfile.TemporaryDirectory(prefix="fanny-bench-") as tmp:
        settings = BrokerSettings(host=LOOPBACK, port=0, db_path=Path(tmp) / "board.sqlite3",
                                  housekeeping_interval_s=interval)
        # The peer: the same cost with 1,000 live positions.
        peer_state = _state(settings)
        peer_sessions = populate(peer_state, small, time.monotonic(), budget)
        peer = (peer_state, peer_sessions, SPACING_M)

        async with start_broker(settings) as running:
            state: BrokerState = running._broker.state   # the running broker's own state
            async with LoopStall() as idle:
                await asyncio.sleep(2 * interval + 0.5)
            idle_gc_s = _full_collection()
            before = rss_bytes()
            sessions = populate(state, big, time.monotonic(), budget)
            loaded_gc_s = _full_collection()
            tracked = len(gc.get_objects())
            per_position = (rss_bytes() - before) / len(sessions)
            small_cost, big_cost = _alternate(peer, (state, sessions, SPACING_M), updates, rng)
            del peer, peer_state, peer_sessions
            live = state.position_count
            async with LoopStall() as loaded:
                await asyncio.sleep(2 * interval + 0.5)
            still = state.position_count

            # Every position stale at once: the broker's own clock moved past the timeout.
            ahead = settings.position_timeout_s + 1.0
            running._broker.monotonic = lambda: time.monotonic() + ahead
            batches = _time_calls(state, "expire")   # the batches, in CPU and wall time
            expiry_start = time.perf_counter()
            expiry_s = math.nan
            async with LoopStall() as expiring:
                while time.perf_counter() - expiry_start < 4 * interval + 60:   # bounded
                    if state.position_count == 0:
                        expiry_s = time.perf_counter() - expiry_start
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(interval)   # and the next housekeeping, nothing left
            left = state.position_count
            worst_after = expiring.worst_at - expiry_start
            del state.expire   # the instance's wrapper: the class's method again
            batch_cpu = max((cpu for cpu, _ in batches), default=math.nan)
            batch_wall = max((wall for _, wall in batches), default=math.nan)

        # The same growth at a sparser density (25 per square kilometre).
        lattices = []
        for count in (small, big):
            sparse_state = _state(settings)
            placed = populate(sparse_state, count, time.monotonic(), budget, SPARSE_SPACING_M)
            lattices.append((sparse_state, placed, SPARSE_SPACING_M))
        sparse_small, sparse_big = _alternate(lattices[0], lattices[1], updates, rng)
        sparse_n = len(lattices[1][1])
        del lattices

    short = "" if len(sessions) == big else f"; STOPPED at its bound: {len(sessions)} of {big}"
    sparse_short = "" if sparse_n == big else f"; STOPPED at its bound: {sparse_n} of {big}"
    return [
        Figure("update_us", 1e6 * big_cost, 1e6 * small_cost, "us", len(sessions),
               f"update_position with {len(sessions)} live positions; peer: with {small} "
               f"(same density, {SPACING_M:g} m apart, radius {RADIUS_M:g} m), {updates} "
               "updates each, thread CPU time; ratio = growth" + short, "growth <= 1.5x"),
        Figure("update_us_sparse", 1e6 * sparse_big, 1e6 * sparse_small, "us",
               sparse_n, f"the same {SPARSE_SPACING_M:g} m apart (25 per square kilometre, "
               f"a few devices in the cells a lookup visits); peer: {small} at that density; "
               "ratio = growth" + sparse_short, "growth <= 1.5x"),
        Figure("position_bytes", per_position, None, "B", len(sessions),
               "RSS growth of the broker process per live position (session, position, "
               "grid, matched pairs)" + short, "bounded"),
        Figure("gc_pause_ms", 1000 * loaded_gc_s, 1000 * idle_gc_s, "ms", len(sessions),
               f"one full collection of the cyclic garbage collector (gc.collect()) in the "
               f"broker process holding {len(sessions)} live positions ({tracked} objects "
               "tracked by the collector); CPython runs one by itself whenever the long-lived "
               "objects grew by a quarter (sessions replaced, a growing population); peer: the "
               "same before the positions were added" + short, "no stall over 10 ms"),
        Figure("housekeeping_stall_ms", 1000 * loaded.worst_s, 1000 * idle.worst_s, "ms", live,
               f"worst event-loop stall over {2 * interval + 0.5:g} s (housekeeping every "
               f"{interval:g} s) with {live} live positions ({still} after); peer: the same "
               "broker's worst stall before they were added" + short, "no stall over 10 ms"),
        Figure("expiry_stall_ms", 1000 * expiring.worst_s, 1000 * idle.worst_s, "ms", still,
               f"worst event-loop stall while housekeeping dropped all {still} positions gone "
               f"stale at once (the broker's clock moved {ahead:g} s ahead); all dropped "
               f"within {expiry_s:.1f} s of the move, which includes the wait for the next "
               f"housekeeping (every {interval:g} s); {left} left after; the worst stall "
               f"began {worst_after:.2f} s after the move; {len(batches)} expiry batches, the "
               f"longest {1000 * batch_cpu:.1f} ms of CPU, {1000 * batch_wall:.1f} ms of wall "
               "time (the rest: the process not running)"
               "; peer: the same broker's worst stall before the positions were added" + short,
               "no stall over 10 ms"),
        Figure("expiry_batch_cpu_ms", 1000 * batch_cpu, None, "ms", len(batches),
               f"the longest of the {len(batches)} expiry batches of that drop in CPU time of "
               f"the event loop's thread (the broker's own share of the stall; longest in wall "
               f"time: {1000 * batch_wall:.1f} ms)" + short, "no stall over 10 ms"),
    ]
