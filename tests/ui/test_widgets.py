"""Tests for the pure parts of fanny_tui.ui.widgets (the widgets themselves are exercised
through the app: tests/ui/test_screens.py, tests/ui/test_snapshots.py)."""

from __future__ import annotations

from rich.text import Text

from fanny_tui.ui.widgets import PanelRow, fit_rows


def rows() -> list[PanelRow]:
    return [PanelRow("Broker", Text("disconnected"), 10),
            PanelRow("", Text("no broker answers at that address"), 6, wrap=True),
            PanelRow("", Text("→ start the broker, or check [broker] url"), 9, wrap=True),
            PanelRow("", Text("since 09:30:00, 1 attempt"), 3),
            PanelRow("", Text("ConnectionRefusedError: [Errno 111] Connect call failed"), 1)]


def labels(kept: list[PanelRow]) -> list[str]:
    return [row.value.plain.split()[0] for row in kept]


def test_every_row_is_kept_when_they_fit():
    assert fit_rows(rows(), 6, 60) == rows()
    assert fit_rows(rows(), 0, 0) == rows()        # not laid out yet


def test_the_rows_that_matter_least_go_first_and_the_order_stays():
    assert labels(fit_rows(rows(), 4, 60)) == ["disconnected", "no", "→", "since"]
    assert labels(fit_rows(rows(), 3, 60)) == ["disconnected", "no", "→"]
    assert labels(fit_rows(rows(), 2, 60)) == ["disconnected", "→"]


def test_a_wrapped_row_counts_every_line_it_takes():
    # At 30 columns the headline and the next step take two lines each: with 4, the
    # headline goes, not the step; with 5 both stay.
    assert labels(fit_rows(rows(), 4, 30)) == ["disconnected", "→"]
    assert labels(fit_rows(rows(), 5, 30)) == ["disconnected", "no", "→"]
