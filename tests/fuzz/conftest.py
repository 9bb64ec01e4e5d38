"""Hypothesis budgets for the fuzz suite and the summary of inputs tried.

``FANNY_FUZZ=long .venv/bin/pytest tests/fuzz`` runs the long budget (see ``__init__.py``).
"""

from __future__ import annotations

from typing import Any

from tests.fuzz import COUNTS, profile_name, register_profiles

register_profiles()


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
