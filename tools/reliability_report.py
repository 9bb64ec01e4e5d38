"""Run the fault scenarios of ``tests/faults`` N times (and the fuzz suite) and print the figures.

The figures of ``docs/reliability.md`` come from this command. From the repository root::

    .venv/bin/python tools/reliability_report.py                # every fault once (~1 minute)
    .venv/bin/python tools/reliability_report.py --runs 10      # ten times each (~10 minutes)
    .venv/bin/python tools/reliability_report.py --fuzz         # also the fuzz suite, CI budget
    .venv/bin/python tools/reliability_report.py --fuzz-long    # ... FANNY_FUZZ=long (~30 min)
    .venv/bin/python tools/reliability_report.py --only broker-kill --runs 50 --seed 100

Each run of a scenario injects one fault into real processes on 127.0.0.1 (see
``tests/faults/scenarios.py``) and checks its invariants; a run whose invariant broke is
counted as failed and its message printed. The random kill moments are seeded: run ``i`` of a
scenario uses seed ``--seed + i``, so a failing run can be replayed alone.

Output: Markdown tables on stdout (progress on stderr). Exit status: 0 when every run held,
1 when one failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

GROUPS = ("broker-kill", "broker-restart", "gpsd", "peer", "peer-race")


@dataclass
class Kind:
    """One kind of fault: how to run it once and how to summarize its runs."""

    group: str
    label: str
    run: Callable[[Path, int], Awaitable[Any]]
    summarize: Callable[[list[Any]], str]
    results: list[Any] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _mm(values: Sequence[float], unit: str = "s") -> str:
    if not values:
        return "n/a"
    return (f"median {statistics.median(values):.3f} {unit}, max {max(values):.3f} {unit} "
            f"(n = {len(values)})")


def _tally(values: Sequence[str]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in sorted(Counter(values).items())) or "n/a"


def _kinds() -> list[Kind]:
    """The fault kinds, importing the scenarios (the repository must be on ``sys.path``)."""
    from tests.faults import scenarios as s

    def uploads(rs: list[Any]) -> str:
        return (f"uploads acknowledged before the kill: {sum(r.uploads_acked for r in rs)} "
                f"({sum(r.tokens_acked for r in rs)} tokens); cut by the kill: "
                f"{sum(r.uploads_unacked for r in rs)}, of which already committed (ack lost): "
                f"{sum(r.uploads_in_doubt for r in rs)}; acked tokens lost: "
                f"{sum(r.acked_tokens_lost for r in rs)}; after the retries the board holds "
                f"{sum(r.tokens_on_board for r in rs)} of {sum(r.tokens_total for r in rs)} "
                f"tokens made")

    def restart(rs: list[Any]) -> str:
        return (f"time to recover (broker listening -> broker_connected): "
                f"{_mm([x for r in rs for x in r.recovery_s])}; exposure alert after a positive "
                f"uploaded post-restart: {_mm([r.exposure_after_s for r in rs])}")

    def gps(rs: list[Any]) -> str:
        return (f"gps_lost after the fault: {_mm([r.lost_after_s for r in rs])}; positions "
                f"sent while lost: {sum(r.positions_while_lost for r in rs)}; gps_fix after gpsd "
                f"is back: {_mm([r.fix_after_s for r in rs])}")

    def peer(rs: list[Any]) -> str:
        return (f"survivor: {_tally([r.survivor_reason for r in rs])}, after "
                f"{_mm([r.failed_after_s for r in rs])} (handshake_timeout_s "
                f"{s.HANDSHAKE_TIMEOUT_S:g} s); victim role: {_tally([r.victim_role for r in rs])};"
                f" both stored a token again {_mm([r.rematched_after_s for r in rs])} later")

    def race(rs: list[Any]) -> str:
        return (f"victim's last state: {_tally([r.victim_state for r in rs])}; survivor: "
                f"{_tally([r.survivor_outcome for r in rs])}; tokens left on the killed victim: "
                f"{_tally([str(r.victim_tokens) for r in rs])}")

    return [
        Kind("broker-kill", "broker SIGKILL during concurrent positive uploads (4 token stores, "
             "20 tokens per upload), restart on the same port and database",
             lambda d, seed: s.broker_killed_mid_uploads(d, seed=seed), uploads),
        Kind("broker-restart", "broker SIGTERM under 2 headless devices, restart after 2 s",
             lambda d, seed: s.broker_restarted(d, stop_signal=signal.SIGTERM), restart),
        Kind("broker-restart", "broker SIGKILL under 2 headless devices, restart after 2 s",
             lambda d, seed: s.broker_restarted(d, stop_signal=signal.SIGKILL), restart),
        Kind("gpsd", "gpsd killed (SIGKILL to gpsfake's process group), restarted on its port "
             "after 2 s", lambda d, seed: s.gpsd_interrupted(d, fault="killed"), gps),
        Kind("gpsd", "gpsd frozen (SIGSTOP to the group) for stale_after_s 1.5 s + 2 s",
             lambda d, seed: s.gpsd_interrupted(d, fault="frozen"), gps),
        Kind("peer", "peer SIGKILL mid-handshake (after its 'connecting')",
             lambda d, seed: s.peer_vanishes_mid_handshake(d, fault=signal.SIGKILL), peer),
        Kind("peer", "peer SIGSTOP mid-handshake, SIGCONT after the survivor failed",
             lambda d, seed: s.peer_vanishes_mid_handshake(d, fault=signal.SIGSTOP), peer),
        Kind("peer-race", "peer SIGKILL at a random moment 0-0.12 s after its 'connecting'",
             lambda d, seed: s.peer_killed_at_random(d, seed=seed), race),
    ]


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _run_kinds(kinds: list[Kind], runs: int, seed: int, keep: bool) -> None:
    for kind in kinds:
        for i in range(runs):
            tmp = tempfile.mkdtemp(prefix="fanny-faults-")
            start = time.monotonic()
            try:
                kind.results.append(await kind.run(Path(tmp), seed + i))
                verdict = "ok"
            except AssertionError as exc:
                kind.failures.append(f"seed {seed + i}: {exc}")
                verdict = f"FAILED: {exc}"
            except Exception as exc:  # a crash of the harness is a failed run too
                text = "".join(traceback.format_exception_only(exc)).strip()
                kind.failures.append(f"seed {seed + i}: {text}")
                verdict = f"FAILED: {text}"
            finally:
                if not keep:
                    shutil.rmtree(tmp, ignore_errors=True)
            _progress(f"{kind.group} | {kind.label[:60]} | run {i + 1}/{runs} "
                      f"(seed {seed + i}): {verdict} [{time.monotonic() - start:.1f} s]"
                      + (f" in {tmp}" if keep else ""))


@dataclass
class FuzzCounts:
    """What the fuzz suite printed: inputs per fuzz test, and whether pytest passed."""

    budget: str
    command: str
    counts: dict[str, int]
    passed: bool
    summary: str


_FUZZ_LINE = re.compile(r"fuzz: (?P<name>.+?): (?P<n>\d+) inputs(?: \(.*\))?$")
"""A fuzz count line; with ``-q -s`` it may follow pytest's progress dots on the same line."""


def _fuzz_group(name: str) -> str:
    """``messages.mutation.Hello`` -> ``messages.mutation``; ``broker handler, x`` -> its head."""
    if "," in name:
        return name.split(",", 1)[0]
    return ".".join(name.split(".")[:2])


def run_fuzz(long: bool) -> FuzzCounts:
    """Run the fuzz suite with pytest and collect its ``fuzz: NAME: N inputs`` lines.

    The suite is ``tests/fuzz`` plus any ``tests/**/test_*fuzz*.py`` outside it. ``long``
    sets ``FANNY_FUZZ=long`` and lifts pytest's per-test time-out.
    """
    paths = ["tests/fuzz"] if (REPO / "tests" / "fuzz").is_dir() else []
    paths += sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*fuzz*.py")
                    if "fuzz" not in p.relative_to(REPO / "tests").parts[:-1])
    budget = "long run (FANNY_FUZZ=long)" if long else "CI budget"
    env = dict(os.environ)
    if long:
        env["FANNY_FUZZ"] = "long"
    else:
        env.pop("FANNY_FUZZ", None)
    # The long budget outlasts pytest-timeout's 180 s per test (pyproject.toml): no limit there.
    options = ["-q", "-s", "-p", "no:cacheprovider", *(["--timeout", "0"] if long else [])]
    command = [sys.executable, "-m", "pytest", *options, *paths]
    shown = (("FANNY_FUZZ=long " if long else "") + ".venv/bin/pytest " + " ".join(options)
             + " " + " ".join(paths))
    if not paths:
        return FuzzCounts(budget, shown, {}, False, "no fuzz tests found")
    _progress(f"fuzz: running {shown}")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=6 * 3600)
    counts: dict[str, int] = {}
    for line in done.stdout.splitlines():
        found = _FUZZ_LINE.search(line.strip())
        if found and found["name"] != "total":
            counts[found["name"]] = int(found["n"])
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    return FuzzCounts(budget, shown, counts, done.returncode == 0, last.strip("= "))


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def render(kinds: list[Kind], runs: int, seed: int, fuzz: Sequence[FuzzCounts],
           argv: Sequence[str], only: str | None = None) -> str:
    """The report as Markdown."""
    tool = "tools/reliability_report.py"
    lines = [
        f"Reliability report: `.venv/bin/python {tool} {' '.join(argv)}`".rstrip() + "  ",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, revision {_git_revision()}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {runs} run(s) per fault, "
        f"seeds {seed}..{seed + runs - 1}",
        "",
        "| fault injected (real processes on 127.0.0.1) | injected | invariants held | figures |",
        "|---|---:|---:|---|",
    ]
    for kind in kinds:
        injected = len(kind.results) + len(kind.failures)
        figures = kind.summarize(kind.results) if kind.results else "n/a"
        lines.append(f"| {kind.label} | {injected} | {len(kind.results)} | {figures} |")
    injected = sum(len(k.results) + len(k.failures) for k in kinds)
    by_group = Counter({g: 0 for g in GROUPS})
    for kind in kinds:
        by_group[kind.group] += len(kind.results) + len(kind.failures)
    uploads = [r for k in kinds if k.group == "broker-kill" for r in k.results]
    recovery = [x for k in kinds if k.group == "broker-restart" for r in k.results
                for x in r.recovery_s]
    lines += [
        "",
        "| figure | value | reproduce |",
        "|---|---|---|",
    ]
    for suite in fuzz:
        total = sum(suite.counts.values())
        groups: Counter[str] = Counter()
        for name, n in suite.counts.items():
            groups[_fuzz_group(name)] += n
        detail = ", ".join(f"{name} {n}" for name, n in sorted(groups.items()))
        state = "passed" if suite.passed else f"FAILED ({suite.summary})"
        lines.append(f"| fuzz inputs tried, {suite.budget} | {total} ({detail}); pytest {state} "
                     f"| `{suite.command}` |")
    lines += [
        f"| faults injected | {injected} ("
        + ", ".join(f"{g} {n}" for g, n in by_group.items() if n) + ") | "
        f"`.venv/bin/python {tool} --runs {runs} --seed {seed}"
        + (f" --only {only}" if only else "") + "` |",
    ]
    if uploads or any(k.group == "broker-kill" for k in kinds):
        lost = sum(r.acked_tokens_lost for r in uploads)
        acked = sum(r.tokens_acked for r in uploads)
        lines.append(f"| acked tokens lost | {lost} (of {acked} acknowledged, "
                     f"{len(uploads)} broker SIGKILLs) | "
                     f"`.venv/bin/python {tool} --only broker-kill --runs {runs} --seed {seed}` |")
    if recovery or any(k.group == "broker-restart" for k in kinds):
        lines.append(f"| time to recover after a broker restart | {_mm(recovery)} "
                     f"(device reconnect backoff 0.2-1.0 s) | "
                     f"`.venv/bin/python {tool} --only broker-restart --runs {runs}` |")
    failures = [(k.label, f) for k in kinds for f in k.failures]
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {label}: {text}" for label, text in failures]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reliability_report.py",
        description="Inject the faults of tests/faults into real processes N times and print "
                    "the figures of docs/reliability.md.")
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="runs of each fault (default 1, as in CI)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the first run; run i uses SEED+i (default 1)")
    parser.add_argument("--only", default=None, metavar="GROUPS",
                        help=f"comma-separated subset of: {', '.join(GROUPS)}")
    parser.add_argument("--fuzz", action="store_true",
                        help="also run the fuzz suite (CI budget) and report its input counts")
    parser.add_argument("--fuzz-long", action="store_true",
                        help="the same with FANNY_FUZZ=long (about 50 times more inputs, "
                             "about half an hour); with --fuzz, both budgets")
    parser.add_argument("--keep", action="store_true",
                        help="keep each run's work directory (logs, stores, board)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report. Returns 0 when every run held its invariants, 1 if not, 2 on bad usage."""
    parser = _parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    if args.runs < 1:
        parser.error(f"--runs: expected an integer >= 1, got {args.runs}")
    groups = GROUPS if args.only is None else tuple(g.strip() for g in args.only.split(","))
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; expected some of {', '.join(GROUPS)}")
    if not (BIN / "fanny-broker").exists():
        print("reliability_report.py: run it with the kit's virtualenv: "
              ".venv/bin/python tools/reliability_report.py", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    kinds = [k for k in _kinds() if k.group in groups]
    fuzz = [run_fuzz(long) for long, wanted in ((False, args.fuzz), (True, args.fuzz_long))
            if wanted]
    asyncio.run(_run_kinds(kinds, args.runs, args.seed, args.keep))
    print(render(kinds, args.runs, args.seed, fuzz, args_list, args.only))
    failed = any(k.failures for k in kinds) or any(not suite.passed for suite in fuzz)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
