"""Token expiry rounded up to the fixed deletion hour (paper section 3, step 6, footnote 3).

"The date of expiration is not an exact delay of 15 days, it must be 15 days plus the number of
hours, minutes and seconds necessary to achieve the fixed suppression hour." Every token stored
on a device therefore expires at ``HH:00:00`` UTC of some day, and the moment of the contact
cannot be read back from it beyond "some time in the 24 hours before".
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

DEFAULT_LIFETIME_DAYS = 15
DEFAULT_DELETION_HOUR_UTC = 4


def require_utc(moment: datetime, name: str = "now") -> datetime:
    """Return ``moment`` converted to UTC.

    Raises:
        ValueError: ``moment`` is naive (has no time zone).
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime (UTC), got a naive one")
    return moment.astimezone(UTC)


def expiry_for(
    contact_time: datetime,
    *,
    lifetime_days: int = DEFAULT_LIFETIME_DAYS,
    deletion_hour_utc: int = DEFAULT_DELETION_HOUR_UTC,
) -> datetime:
    """Expiry of a token witnessed at ``contact_time``.

    Args:
        contact_time: aware datetime of the contact (any zone; converted to UTC).
        lifetime_days: token lifetime in days (paper: 15), >= 1.
        deletion_hour_utc: the fixed deletion hour, 0-23 (UTC).

    Returns:
        The first instant at or after ``contact_time + lifetime_days`` whose UTC time is
        exactly ``deletion_hour_utc:00:00`` (aware, UTC, no microseconds). It is never earlier
        than the lifetime and less than 24 hours later.

    Raises:
        ValueError: naive ``contact_time``, or an argument out of range.
    """
    if not 0 <= deletion_hour_utc <= 23:
        raise ValueError(f"deletion_hour_utc must be 0-23, got {deletion_hour_utc}")
    if lifetime_days < 1:
        raise ValueError(f"lifetime_days must be >= 1, got {lifetime_days}")
    earliest = require_utc(contact_time, "contact_time") + timedelta(days=lifetime_days)
    candidate = earliest.replace(hour=deletion_hour_utc, minute=0, second=0, microsecond=0)
    if candidate < earliest:
        candidate += timedelta(days=1)
    return candidate


def is_on_deletion_hour(moment: datetime, deletion_hour_utc: int) -> bool:
    """True when ``moment`` (aware) is exactly ``deletion_hour_utc:00:00`` UTC."""
    utc = require_utc(moment, "moment")
    return (utc.hour, utc.minute, utc.second, utc.microsecond) == (deletion_hour_utc, 0, 0, 0)


def is_on_the_hour(moment: datetime) -> bool:
    """True when ``moment`` (aware) is exactly on a UTC hour (HH:00:00.000000)."""
    utc = require_utc(moment, "moment")
    return (utc.minute, utc.second, utc.microsecond) == (0, 0, 0)
