"""Stop signals with a bounded shutdown (fanny_tui.stopping), in real processes: a run whose
event loop is blocked for ever once it starts stopping (as Textual's was, in a write to a
closed terminal) still ends, its cleanup done, with 128 + the signal's number."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .helpers import TIME_UNIT

PROBE = textwrap.dedent("""
    import asyncio, pathlib, sys, threading, time
    from fanny_tui.stopping import StopSignals

    marker, grace_s, stuck = pathlib.Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "stuck"

    async def main():
        stopped = asyncio.Event()

        def on_stop(signum):
            print("stopping", signum, flush=True)
            if stuck:                       # the loop blocks for ever, on a lock
                lock = threading.Lock()
                lock.acquire()
                lock.acquire()
            stopped.set()

        with StopSignals(asyncio.get_running_loop(), on_stop, grace_s=grace_s, name="probe",
                         cleanup=lambda: marker.write_text("cleaned")):
            print("ready", flush=True)
            await stopped.wait()

    asyncio.run(main())
    time.sleep(2 * grace_s)                 # the watchdog, stopped, must not fire meanwhile
    print("done", flush=True)
""")


def _probe(tmp_path: Path, grace_s: float, stuck: bool) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(tmp_path / "cleaned"), str(grace_s),
         "stuck" if stuck else "fine"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    return process


def _finish(process: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"still running {timeout:.0f} s after the signal") from None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stuck_shutdown_ends_after_the_grace_period_cleaned_up(tmp_path, signum):
    grace_s = 1.0 * TIME_UNIT
    process = _probe(tmp_path, grace_s, stuck=True)
    started = time.monotonic()
    process.send_signal(signum)
    out, err = _finish(process, grace_s + 10 * TIME_UNIT)
    elapsed = time.monotonic() - started
    assert out == f"stopping {signum}\n"        # on_stop ran on the loop, which then blocked
    assert process.returncode == 128 + signum
    assert grace_s <= elapsed < grace_s + 5 * TIME_UNIT, elapsed
    assert (tmp_path / "cleaned").read_text() == "cleaned"
    name = signal.Signals(signum).name
    assert err == f"probe: did not stop within {grace_s:g} s of {name}; exiting now\n"


def test_a_second_signal_ends_a_stuck_shutdown_at_once(tmp_path):
    # SIGHUP (the terminal closed), the shutdown stuck, then SIGTERM: no waiting for the
    # (here long) grace period.
    process = _probe(tmp_path, 600.0, stuck=True)
    process.send_signal(signal.SIGHUP)
    assert process.stdout is not None and process.stdout.readline() == f"stopping {signal.SIGHUP}\n"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = _finish(process, 10 * TIME_UNIT)
    assert time.monotonic() - started < 3 * TIME_UNIT
    assert process.returncode == 128 + signal.SIGTERM
    assert (tmp_path / "cleaned").read_text() == "cleaned"
    assert err == "probe: SIGTERM while stopping; exiting now\n"


def test_a_shutdown_in_time_is_left_alone(tmp_path):
    # The loop stops normally: the handlers are given back and the watchdog is stopped, so
    # nothing is cleaned up behind the program's back and its own exit status stands.
    grace_s = 0.5 * TIME_UNIT
    process = _probe(tmp_path, grace_s, stuck=False)
    process.send_signal(signal.SIGTERM)
    out, err = _finish(process, 10 * TIME_UNIT + 2 * grace_s)
    assert (process.returncode, out, err) == (0, f"stopping {signal.SIGTERM}\ndone\n", "")
    assert not (tmp_path / "cleaned").exists()
