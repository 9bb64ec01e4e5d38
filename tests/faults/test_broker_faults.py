"""The broker dies under its clients: SIGKILL mid-upload stream, SIGTERM/SIGKILL and restart.

Real ``fanny-broker serve`` processes on a loopback port, restarted on the same port and
database; real token stores and the real client code (scenarios 1 and 2 in
:mod:`tests.faults.scenarios`). ``tools/reliability_report.py`` runs the same scenarios many
times for docs/reliability.md.
"""

from __future__ import annotations

import signal

import pytest

from .scenarios import broker_killed_mid_uploads, broker_restarted


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_broker_sigkill_mid_upload_stream_loses_no_acknowledged_token(tmp_path, seed):
    figures = await broker_killed_mid_uploads(tmp_path, seed=seed)
    print(figures)
    assert figures.acked_tokens_lost == 0
    # The kill did land mid-stream: uploads were acknowledged before it, others were cut.
    assert figures.uploads_acked > 0
    assert figures.uploads_unacked > 0
    assert figures.tokens_on_board == figures.tokens_total


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGTERM", "SIGKILL"])
async def test_devices_reconnect_resume_positions_and_polling_after_broker_restart(
        tmp_path, stop_signal):
    # Asserted inside: both devices report the outage, reconnect, are sent positions again,
    # match again (same token, not stored twice) and receive a positive uploaded after the
    # restart as an exposure alert; they stop cleanly with no traceback.
    figures = await broker_restarted(tmp_path, stop_signal=stop_signal)
    print(f"time to recover after a broker restart ({figures.signal}): "
          f"{', '.join(f'{r:.3f} s' for r in figures.recovery_s)}; {figures}")
