"""Hypothesis budgets for the fuzz suite and the summary of inputs tried.

``FANNY_FUZZ=long .venv/bin/pytest tests/fuzz`` runs the long budget (see ``__init__.py``).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.fuzz import COUNTS, is_long, profile_name, register_profiles

register_profiles()

LONG_TIMEOUT_S = 3 * 3600
"""pytest-timeout per test in the long run (the project default, 180 s, is for CI)."""


def pytest_collection_modifyitems(config: Any, items: list[pytest.Item]) -> None:
    """In the long run, give each fuzz test hours instead of the CI time-out."""
    if not is_long():
        return
    for item in items:
        if "fuzz" in item.path.parts:
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_S))


def pytest_report_header(config: Any) -> str:
    """Say which fuzz budget runs."""
    return f"fanny fuzz profile: {profile_name()} (FANNY_FUZZ=long for the long run)"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    """Print the inputs each fuzz test tried, and their total."""
    if not COUNTS:
        return
    terminalreporter.section(f"fuzz inputs tried ({profile_name()})")
    for name, n in sorted(COUNTS.items()):
        terminalreporter.write_line(f"fuzz: {name}: {n} inputs")
    terminalreporter.write_line(f"fuzz: total: {sum(COUNTS.values())} inputs")
