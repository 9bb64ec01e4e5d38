"""docs/field-testing.md follows the simulator: every key it can vary, no figure left to measure."""

from __future__ import annotations

from pathlib import Path

from fanny_tui.sim.runner import SWEEP_KEYS

DOC = Path(__file__).resolve().parents[2] / "docs" / "field-testing.md"


def test_every_sweep_key_is_documented():
    text = DOC.read_text(encoding="utf-8")
    missing = [key for key in SWEEP_KEYS if f"`{key}`" not in text]
    assert not missing, f"sweep keys missing from docs/field-testing.md: {missing}"


def test_the_frontier_is_measured_and_gives_its_command():
    text = DOC.read_text(encoding="utf-8")
    assert "to be measured" not in text.lower()
    frontier = text.split("## 3. Measured frontier (street, sigma = 5 m)", 1)[1]
    assert "fanny-sim scenarios/street.toml --sweep radius_m=10,15,25 min_contact_s=0,60,300" \
        in frontier
    assert "| precision | recall |" in frontier
