"""``benchmarks/run [NAME...] [--quick] [--json PATH]``: run the benchmarks, print the table.

Each benchmark measures the kit's figure and its floor (or peer) in the same run. The table
has one row per figure: value, floor, ratio (value / floor), n and unit. The exit status is
0 when every benchmark ran (whatever the figures: benchmarks never judge timings), 1 when one
of them crashed (its error is printed; the others still run), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from .common import Figure, Scale

BENCHMARKS = {
    "positives": "bytes per token, catch-up of an empty cursor, the device's check, empty poll",
    "broker": "housekeeping stall, cost per position update, memory per live position",
    "connections": "broker memory per connection beside a bare websockets server",
    "first_contact": "first contact after start vs a later one vs bare aiortc peers",
    "alert": "alert latency after an acknowledged declaration (p95, default settings)",
    "region": "1, 2 and 3 brokers on Redis + PostgreSQL beside the embedded broker",
}
"""Name -> what it measures; each name is a module of this package with ``run(scale)``."""


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 0.01 <= abs(value) < 100_000:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.3g}"


def table(figures: list[Figure]) -> str:
    """The figures as a plain-text table (figure, value, floor, ratio, n, unit)."""
    rows = [("figure", "value", "floor", "ratio", "n", "unit")]
    rows += [(f.name, _fmt(f.value), _fmt(f.floor), _fmt(f.ratio), str(f.n), f.unit)
             for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run", description="FANNY benchmarks beside their floors (loopback).",
        epilog="benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run (default: all): " + ", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small sizes, the whole run in under a minute")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHMARKS)}")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("broker").setLevel(logging.ERROR)   # refusals under load are expected
    scale = Scale(quick=args.quick)
    figures: list[Figure] = []
    failed: list[str] = []
    started = time.monotonic()
    for name in args.names or list(BENCHMARKS):
        print(f"running {name}...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            got = asyncio.run(module.run(scale))
        except Exception:
            failed.append(name)
            print(f"benchmark {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        print(f"  {name}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        figures.extend(got)
    print(table(figures))
    for f in figures:
        print(f"  {f.name}: {f.note}" + (f" [target: {f.target}]" if f.target else ""))
    if args.json is not None:
        report = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "machine": {"python": platform.python_version(), "system": platform.platform(),
                        "cpus": _cpus()},
            "seconds": round(time.monotonic() - started, 1),
            "failed": failed,
            "figures": {f.name: f.as_json() for f in figures},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


def _cpus() -> int | None:
    import os
    return os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
