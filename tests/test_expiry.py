"""Tests for fanny_tui.protocol.expiry (paper section 3, step 6 and footnote 3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanny_tui.protocol.expiry import (
    DEFAULT_DELETION_HOUR_UTC,
    DEFAULT_LIFETIME_DAYS,
    expiry_for,
    is_on_deletion_hour,
    is_on_the_hour,
    require_utc,
)

# Any fixed offset a real zone has used (-23:59 .. +23:59), at minute resolution or finer.
offsets = st.timedeltas(min_value=timedelta(hours=-23, minutes=-59),
                        max_value=timedelta(hours=23, minutes=59)).map(timezone)
moments = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                       timezones=st.one_of(st.just(UTC), offsets))
lifetimes = st.integers(min_value=1, max_value=365)
hours = st.integers(min_value=0, max_value=23)


@given(moments, lifetimes, hours)
def test_expiry_is_on_the_deletion_hour_within_a_day_after_the_lifetime(
        contact: datetime, lifetime: int, hour: int) -> None:
    expiry = expiry_for(contact, lifetime_days=lifetime, deletion_hour_utc=hour)
    earliest = contact + timedelta(days=lifetime)
    assert expiry >= earliest, "never earlier than the lifetime"
    assert expiry - earliest < timedelta(hours=24), "less than 24 h later"
    assert expiry.tzinfo is UTC
    assert (expiry.hour, expiry.minute, expiry.second, expiry.microsecond) == (hour, 0, 0, 0)
    assert is_on_deletion_hour(expiry, hour) and is_on_the_hour(expiry)


@given(moments)
def test_defaults_are_15_days_and_4_utc(contact: datetime) -> None:
    assert (DEFAULT_LIFETIME_DAYS, DEFAULT_DELETION_HOUR_UTC) == (15, 4)
    assert expiry_for(contact) == expiry_for(contact, lifetime_days=15, deletion_hour_utc=4)


@given(moments, lifetimes, hours)
def test_the_zone_of_the_input_does_not_matter(contact: datetime, lifetime: int, hour: int
                                               ) -> None:
    in_utc = contact.astimezone(UTC)
    assert (expiry_for(contact, lifetime_days=lifetime, deletion_hour_utc=hour)
            == expiry_for(in_utc, lifetime_days=lifetime, deletion_hour_utc=hour))


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)), hours)
def test_all_contacts_of_one_day_share_one_expiry(start: datetime, hour: int) -> None:
    """The moment of the contact cannot be read back beyond "some time in those 24 hours"."""
    window_start = start.replace(hour=hour, minute=0, second=0, microsecond=0, tzinfo=UTC)
    first = window_start + timedelta(microseconds=1)
    last = window_start + timedelta(hours=24)
    assert expiry_for(first, deletion_hour_utc=hour) == expiry_for(last, deletion_hour_utc=hour)


def test_examples() -> None:
    assert expiry_for(datetime(2026, 11, 29, 9, 21, 36, tzinfo=UTC)) == datetime(
        2026, 12, 15, 4, tzinfo=UTC)
    # Exactly on the deletion hour: no extra day.
    assert expiry_for(datetime(2026, 11, 29, 4, tzinfo=UTC)) == datetime(
        2026, 12, 14, 4, tzinfo=UTC)
    # 05:30 in Paris (UTC+1) is 04:30 UTC: past the hour, so the next day.
    paris = timezone(timedelta(hours=1))
    assert expiry_for(datetime(2026, 11, 29, 5, 30, tzinfo=paris)) == datetime(
        2026, 12, 15, 4, tzinfo=UTC)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="contact_time.*naive"):
        expiry_for(datetime(2026, 11, 29, 9, 0))
    with pytest.raises(ValueError, match="now.*naive"):
        require_utc(datetime(2026, 11, 29, 9, 0))
    with pytest.raises(ValueError, match="moment.*naive"):
        is_on_the_hour(datetime(2026, 11, 29, 9, 0))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lifetime_days": 0}, "lifetime_days"), ({"lifetime_days": -3}, "lifetime_days"),
    ({"deletion_hour_utc": 24}, "deletion_hour_utc"), ({"deletion_hour_utc": -1},
                                                       "deletion_hour_utc"),
])
def test_out_of_range_arguments(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expiry_for(datetime(2026, 1, 1, tzinfo=UTC), **kwargs)
