"""Docs follow the code: every wire message and field is in docs/protocol.md."""

from __future__ import annotations

from pathlib import Path

from fanny_tui.protocol.messages import ALL_MESSAGES, PositiveToken, message_type

ROOT = Path(__file__).resolve().parents[1]


def test_every_message_and_field_is_documented():
    text = (ROOT / "docs" / "protocol.md").read_text()
    for cls in ALL_MESSAGES:
        tag = cls.__struct_config__.tag
        assert f"### `{tag}`" in text, f"message {tag} missing from docs/protocol.md"
        section = text.split(f"### `{tag}`", 1)[1].split("\n### ", 1)[0]
        for field in cls.__struct_fields__:
            assert f"`{field}`" in section, f"{tag}.{field} missing from docs/protocol.md"
    for field in PositiveToken.__struct_fields__:
        assert f"`tokens[].{field}`" in text


def test_message_type_helper():
    from fanny_tui.protocol.messages import Match, PositionLost
    assert message_type(PositionLost()) == "position_lost"
    assert message_type(Match(peer_session_id="3f0e8d7a-1c2b-4d5e-8f9a-0b1c2d3e4f50",
                              role="initiator")) == "match"


def _event_names() -> set[str]:
    from fanny_tui import events

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    return {cls.event for cls in subclasses(events.Event)}


def test_readme_lists_every_headless_event_and_where_its_fields_are():
    text = (ROOT / "README.md").read_text()
    [row] = [line for line in text.splitlines() if line.startswith("| `fanny-tui --headless")]
    names = _event_names()
    assert len(names) >= 20  # the contract's events included (channel_open, peer_update...)
    missing = sorted(name for name in names if f"`{name}`" not in row)
    assert missing == [], f"--headless events missing from the README: {missing}"
    assert "fanny_tui/events.py" in row
    assert "positions and tokens" in row  # the warning: redirected to a file, they are on disk
