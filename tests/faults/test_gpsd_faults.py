"""gpsd goes away under a device and comes back: real gpsd (gpsfake), killed or frozen.

Scenario 3 in :mod:`tests.faults.scenarios`: the device reports ``gps_lost``, the broker gets
``position_lost`` and no position until the fix is back, then fixes and positions resume.
"""

from __future__ import annotations

import pytest

from .scenarios import gpsd_interrupted


@pytest.mark.parametrize("fault", ["killed", "frozen"])
async def test_gpsd_lost_sends_no_stale_position_and_recovers(tmp_path, fault):
    # Asserted inside: gps_lost, then position_lost on the broker's wire, the broker drops the
    # position, and the resumed positions are the receiver's own (gpsd's .chk).
    figures = await gpsd_interrupted(tmp_path, fault=fault)
    print(figures)
    assert figures.positions_while_lost == 0
