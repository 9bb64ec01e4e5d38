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


def _blocks(text: str, language: str) -> list[str]:
    return [part.split("```", 1)[0] for part in text.split(f"```{language}\n")[1:]]


def test_the_documented_device_config_and_scenario_file_load(tmp_path):
    import shutil
    import tomllib

    from fanny_tui.config import parse_config
    from fanny_tui.sim.scenario import load_scenario

    text = DOC.read_text(encoding="utf-8")
    blocks = _blocks(text, "toml")
    [device] = [b for b in blocks if b.startswith("[broker]")]
    config = parse_config(tomllib.loads(device))
    assert (config.gps.source, config.protocol.min_contact_s) == ("fixed", 20.0)
    assert config.journal.path is not None and config.journal.path.name == "journal-a.jsonl"
    [scenario] = [b for b in blocks if b.startswith("[scenario]")]
    shutil.copy(DOC.parents[1] / "scenarios" / "street.gpx", tmp_path / "street.gpx")
    (tmp_path / "street.toml").write_text(scenario)
    loaded = load_scenario(tmp_path / "street.toml")
    assert loaded.truth.close_radius_m == 3.0 and len(loaded.tracks) == 21  # 20 + 1 walk
