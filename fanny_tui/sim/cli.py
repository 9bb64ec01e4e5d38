"""``fanny-sim``: run scenarios with real engines and a real broker, judge them against the truth.

    fanny-sim SCENARIO.toml [SCENARIO.toml ...] [--speed K] [--sweep KEY=V1,V2 ...] [--json]
    fanny-sim --version

Every scenario is run once per setting of the sweep (the cartesian product of the ``--sweep``
lists; keys: the devices' ``[protocol]`` keys and the ``[noise]`` keys). The tables (rich, two
that fit 80 columns: the runs, then their verdict) or the JSON list (``--json``) give, per run:
true pairs, detected pairs, precision, recall, detection latency percentiles (scenario seconds),
and the run's real time and CPU use; with a closer tier of truth (``[truth] close_radius_m``),
the recall on the close pairs too (``close``: detected close pairs / close pairs).

Exit status: 0 done, 1 a run failed, 2 bad arguments or scenario file (one line on stderr),
141 stdout closed by its reader (``| head``: nothing more is printed, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .. import kit_version
from ..config import ConfigError
from ..pipe import EXIT_BROKEN_PIPE, rich_console, silence_stdout
from .runner import SWEEP_KEYS, RunResult, SimError, grid, prepare, run_scenario
from .scenario import Scenario, load_scenario


def parse_sweep(items: Sequence[str]) -> dict[str, list[float]]:
    """``["radius_m=10,15", "min_contact_s=0,60"]`` -> ``{"radius_m": [10.0, 15.0], ...}``.

    Raises:
        ValueError: a malformed item, an unknown key or a value that is not a number
            (one line naming it).
    """
    out: dict[str, list[float]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--sweep {item!r}: expected KEY=V1,V2,...")
        if key not in SWEEP_KEYS:
            raise ValueError(f"--sweep {key}: not a setting fanny-sim can vary; known: "
                             f"{', '.join(SWEEP_KEYS)}")
        if key in out:
            raise ValueError(f"--sweep {key}: given twice")
        try:
            out[key] = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--sweep {key}: expected numbers separated by commas, "
                             f"got {values!r}") from None
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fanny-sim",
        description="Run FANNY scenarios (real engines, real broker, loopback only) and "
                    "compare the devices' tokens with the true contacts of the tracks.")
    parser.add_argument("scenarios", nargs="+", type=Path, metavar="SCENARIO.toml")
    parser.add_argument("--speed", type=float, default=None, metavar="K",
                        help="time compression: play the scenario K times faster "
                             "(default: the scenario's [scenario] speed)")
    parser.add_argument("--sweep", nargs="+", default=[], metavar="KEY=V1,V2",
                        help=f"run every combination; keys: {', '.join(SWEEP_KEYS)}")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log the engines' warnings to stderr")
    parser.add_argument("--version", action="version", version=f"fanny-sim {kit_version()}",
                        help="print the kit's version and exit")
    return parser


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _counts(counts: dict[str, int]) -> str:
    """``{"parted": 3, "stopped": 1}`` -> ``"parted 3, stopped 1"`` (``"none"`` if empty)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def results_table(results: Sequence[RunResult], swept: Sequence[str]) -> Group:
    """The results of a set of runs as two rich tables that fit 80 columns, one row per run
    in each, joined by the run number ``#``: the runs (scenario, settings with the swept ones
    first, real seconds, CPU %) and the verdict (true, detected pairs, hits, precision,
    recall, close recall with a closer tier of truth, detection latency p50 / p90 in scenario
    seconds; a caption says what the short headers mean). ``--json`` has every figure."""
    runs = Table(title="fanny-sim: runs", title_justify="left")
    runs.add_column("#", justify="right", no_wrap=True)
    runs.add_column("scenario", overflow="fold")
    runs.add_column("settings", overflow="fold")
    runs.add_column("real s", justify="right", no_wrap=True)
    runs.add_column("CPU %", justify="right", no_wrap=True)
    keys = list(dict.fromkeys([*swept, "radius_m", "min_contact_s", "sigma_m"]))
    closer = any(r.close is not None for r in results)
    verdict = Table(title="pairs judged against the true contacts", title_justify="left",
                    caption=_caption(results, closer), caption_justify="left")
    names = ["#", "true", "detected", "hits", "precision", "recall"]
    names += ["close"] if closer else []
    for name in (*names, "p50/p90 s"):
        verdict.add_column(name, justify="right", no_wrap=True)
    for number, r in enumerate(results, 1):
        values = {"radius_m": r.radius_m, "min_contact_s": r.min_contact_s,
                  "sigma_m": r.sigma_m, **r.settings}
        runs.add_row(str(number), r.scenario, " ".join(f"{k}={values[k]:g}" for k in keys),
                     f"{r.real_s:.1f}", f"{r.cpu_percent:.0f}")
        m = r.metrics
        close = [_close(r)] if closer else []
        verdict.add_row(str(number), str(m.true_pairs), str(m.detected_pairs), str(m.hits),
                        _fmt(m.precision), _fmt(m.recall), *close,
                        f"{_fmt(m.latency(50), '.0f')}/{_fmt(m.latency(90), '.0f')}")
    return Group(runs, verdict)


def _caption(results: Sequence[RunResult], closer: bool) -> Text:
    """What the verdict's short headers mean."""
    text = "p50/p90 s: detection latency, 50th / 90th percentile, scenario seconds"
    if closer:
        radii = sorted({r.close.radius_m for r in results if r.close is not None})
        within = " or ".join(f"{radius:g} m" for radius in radii)
        text += (f"; close: recall on the close pairs (within {within}, [truth] "
                 f"close_radius_m): hits / close pairs")
    return Text(text)


def _close(result: RunResult, *, radius: bool = False) -> str:
    """``"0.86 (6/7)"`` (``radius``: ``"0.86 (6/7 within 3 m)"``): the recall on the close
    pairs; ``"-"`` without a tier."""
    c = result.close
    if c is None:
        return "-"
    within = f" within {c.radius_m:g} m" if radius else ""
    return f"{_fmt(c.recall)} ({c.hits}/{c.true_pairs}{within})"


async def _run_all(scenarios: Sequence[Scenario], settings: Sequence[dict[str, float]],
                   speed: float | None, err: Console) -> list[RunResult]:
    results = []
    total = len(scenarios) * len(settings)
    done = 0
    for scenario in scenarios:
        for setting in settings:
            done += 1
            label = " ".join(f"{k}={v:g}" for k, v in setting.items()) or "as in the file"
            k = scenario.speed if speed is None else speed
            err.print(f"[{done}/{total}] {scenario.name}: {len(scenario.tracks)} devices, "
                      f"{scenario.duration_s:g} s at speed {k:g}, {label}", highlight=False)
            with tempfile.TemporaryDirectory(prefix="fanny-sim-") as tmp:
                result = await run_scenario(scenario, Path(tmp), speed=speed, settings=setting)
            close = ("" if result.close is None
                     else f", close recall {_close(result, radius=True)}")
            err.print(f"    precision {_fmt(result.metrics.precision)}, recall "
                      f"{_fmt(result.metrics.recall)}{close}; real {result.real_s:.1f} s, CPU "
                      f"{result.cpu_percent:.0f} % of one core, late fixes "
                      f"{result.late_fixes}", highlight=False, soft_wrap=True)
            err.print(f"    contacts closed: {_counts(result.closes)}; ID rotations: "
                      f"{_counts(result.rotations)}; handshake failures: "
                      f"{_counts(result.failures)}", highlight=False, soft_wrap=True)
            results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fanny-sim``; returns the exit status."""
    args = _parser().parse_args(argv)
    err = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        sweep = parse_sweep(args.sweep)
        if args.speed is not None and not args.speed > 0:
            raise ValueError(f"--speed: expected a number > 0, got {args.speed:g}")
        scenarios = [load_scenario(path) for path in args.scenarios]
        settings = grid(sweep)
        for scenario in scenarios:
            for setting in settings:
                prepare(scenario, setting, args.speed)
    except (ValueError, ConfigError, SimError) as exc:
        print(f"fanny-sim: {exc}", file=sys.stderr)
        return 2
    try:
        results = asyncio.run(_run_all(scenarios, settings, args.speed, err))
    except SimError as exc:
        print(f"fanny-sim: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        if args.json:
            print(json.dumps([r.as_dict() for r in results], indent=2))
        else:
            out = rich_console()
            if not out.is_terminal:  # a file or a pipe: as wide as the tables want
                out = rich_console(width=160)
            out.print(results_table(results, list(sweep)))
        sys.stdout.flush()   # a closed pipe shows here, not at the interpreter's exit
    except BrokenPipeError:  # stdout closed by its reader (| head): quiet, as fanny-tui
        silence_stdout()
        return EXIT_BROKEN_PIPE
    wall = sum(r.real_s for r in results)
    print(f"fanny-sim: {len(results)} run(s), real time {wall:.1f} s in all", file=sys.stderr)
    return 0
