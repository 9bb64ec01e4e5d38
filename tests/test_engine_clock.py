"""The device clock against GPS time (issue 7, point 7): a device a day off is told so.

Real engines against a real broker on loopback; GPS time from a real receiver's NMEA log
(bu353s4.log, recorded years ago: its time is far from this machine's clock) replayed by the
kit's own source, and the host clock from a ``fixed`` source.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.server import BrokerSettings, start_broker
from fanny_tui.engine import CLOCK_SKEW_LIMIT_S, clock_disagreement
from fanny_tui.events import GpsFix
from fanny_tui.gps import NmeaReplaySource
from tests.helpers import LAT, LON, device_config, fixed_at, running_device

LOG = Path(__file__).parent / "data" / "nmea" / "bu353s4.log"
NOW = datetime(2026, 12, 1, 5, 30, tzinfo=UTC)


def _fix(time: datetime | None, source: str = "gpsd") -> GpsFix:
    return GpsFix(latitude=LAT, longitude=LON, accuracy_m=5.0, mode=3, time=time,
                  source=source)


def test_a_clock_a_day_ahead_or_behind_is_named_in_one_line():
    ahead = clock_disagreement(_fix(NOW - timedelta(days=1)), NOW)
    assert ahead is not None and "\n" not in ahead
    assert ahead.startswith("the device clock is 24.0 hours ahead of GPS time (2026-11-30 05:30")
    behind = clock_disagreement(_fix(NOW + timedelta(days=3), "nmea"), NOW)
    assert behind is not None and behind.startswith("the device clock is 3.0 days behind")


def test_agreeing_clocks_and_host_clock_sources_say_nothing():
    limit = timedelta(seconds=CLOCK_SKEW_LIMIT_S)
    assert clock_disagreement(_fix(NOW - limit), NOW) is None
    assert clock_disagreement(_fix(NOW + limit), NOW) is None
    assert clock_disagreement(_fix(None), NOW) is None
    for source in ("fixed", "walk", "track"):           # their time is the host clock itself
        assert clock_disagreement(_fix(NOW - timedelta(days=1), source), NOW) is None


async def test_the_engine_reports_a_clock_off_gps_time_once(tmp_path):
    settings = BrokerSettings(host="127.0.0.1", port=0, db_path=tmp_path / "board.sqlite3")
    async with start_broker(settings) as broker:
        config = device_config(broker.url)
        source = NmeaReplaySource(LOG, rate=20.0)
        async with running_device(config, tmp_path / "a", source) as a:
            error = await a.wait_event("error")
            assert error.message.startswith("the device clock is ")  # type: ignore[attr-defined]
            assert "GPS time" in error.message                        # type: ignore[attr-defined]
            fixes = len(a.of("gps_fix"))
            await a.wait_for(lambda e: len(a.of("gps_fix")) >= fixes + 10)
            assert len(a.of("error")) == 1                            # once, not every fix
        async with running_device(config, tmp_path / "b", fixed_at(interval_s=0.05)) as b:
            await b.wait_for(lambda e: len(b.of("gps_fix")) >= 5)
            assert not b.of("error")
