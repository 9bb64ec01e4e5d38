"""Shared fixtures for the whole suite (plain helper functions live in tests/helpers.py)."""

from __future__ import annotations

import pytest

from tests.helpers import TIME_UNIT


@pytest.fixture
def time_unit() -> float:
    """The suite's time unit in seconds (``FANNY_TIME_UNIT``, default 1): scale deadlines by it."""
    return TIME_UNIT
