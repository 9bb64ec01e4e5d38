"""Docs follow the code: every wire message and field is in docs/protocol.md, with its presence,
default and (data channel) one example frame the kit sends."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import msgspec
import pytest

from fanny_tui.protocol.messages import (
    ALL_MESSAGES,
    PeerMessage,
    PeerPosition,
    PositiveToken,
    decode_peer_message,
    encode,
    message_type,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "protocol.md"


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


# --- data channel messages: presence, `type` and one example frame each (docs/protocol.md) ---

PEER_MESSAGES = typing.get_args(PeerMessage)
_PRESENCE_ROW = re.compile(
    r"^\| `(\w+)` \| [^|]+ \| [^|]+ \| (required|optional, default `([^`]*)`) \|", re.M)
_OPTIONAL_ROW = re.compile(r"^\| `(\w+)` \| `(\w+)` \| `([^`]*)` \|", re.M)


def _section(text: str, heading_start: str) -> str:
    return text.split(heading_start, 1)[1].split("\n### ", 1)[0]


def _optional_fields(cls: type) -> dict[str, str]:
    """Field name -> JSON text of its default, for every field that may be omitted."""
    defaults = cls.__struct_defaults__
    fields = cls.__struct_fields__[len(cls.__struct_fields__) - len(defaults):]
    return {name: msgspec.json.encode(_value(default)).decode() for name, default in zip(
        fields, defaults, strict=True)}


def _value(default: object) -> object:
    """A struct default as a value: a mutable default (``[]``) is held as a factory."""
    factory = getattr(default, "factory", None)
    return factory() if callable(factory) else default


@pytest.mark.parametrize("cls", PEER_MESSAGES, ids=lambda c: c.__struct_config__.tag)
def test_every_data_channel_field_says_its_presence_and_default(cls: type) -> None:
    tag = cls.__struct_config__.tag
    section = _section(DOC.read_text(), f"### `{tag}`")
    rows = {name: default if presence != "required" else None
            for name, presence, default in _PRESENCE_ROW.findall(section)}
    assert set(rows) == {"type", *cls.__struct_fields__}, tag
    assert f'| `type` | string | `"{tag}"` | required |' in section
    optional = _optional_fields(cls)
    for name in cls.__struct_fields__:
        assert rows[name] == optional.get(name), f"{tag}.{name}: presence/default"


@pytest.mark.parametrize("cls", PEER_MESSAGES, ids=lambda c: c.__struct_config__.tag)
def test_every_data_channel_message_has_an_example_frame_the_kit_sends(cls: type) -> None:
    tag = cls.__struct_config__.tag
    section = _section(DOC.read_text(), f"### `{tag}`")
    examples = re.findall(r"```json\n(.*?)\n```", section, re.S)
    assert len(examples) == 1, f"{tag}: one example frame"
    message = decode_peer_message(examples[0])
    assert type(message) is cls
    assert encode(message) == examples[0]  # exactly the kit's compact encoding
    assert len(examples[0].encode()) < 512  # "every version 2 message is under 512 bytes"


def test_the_optional_fields_table_matches_the_schemas() -> None:
    section = DOC.read_text().split("\n## Optional fields and padding\n", 1)[1].split("\n## ")[0]
    documented = {(tag, name): default for tag, name, default in _OPTIONAL_ROW.findall(section)}
    schemas = {(cls.__struct_config__.tag, name): default
               for cls in ALL_MESSAGES for name, default in _optional_fields(cls).items()}
    assert documented == schemas
    assert documented  # the table was read


def test_a_documented_default_is_what_an_omitted_field_decodes_to() -> None:
    bare = '{"type":"peer_position","latitude":43.6,"longitude":1.4}'
    assert decode_peer_message(bare) == PeerPosition(latitude=43.6, longitude=1.4,
                                                     accuracy_m=None)


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
