"""Tests for fanny_tui.protocol.tokens: IDs and the witness token (paper section 3, steps 1, 4)."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanny_tui.protocol.tokens import (
    TOKEN_HEX_LENGTH,
    craft_token,
    is_token,
    is_uuid4,
    new_id,
)
from tests.helpers import uuid4s

distinct_pairs = st.lists(uuid4s, min_size=2, max_size=2, unique=True)


@given(distinct_pairs)
def test_token_is_symmetric(ids: list[str]) -> None:
    a, b = ids
    assert craft_token(a, b) == craft_token(b, a)


@given(distinct_pairs)
def test_token_is_sha256_of_the_sorted_canonical_ids(ids: list[str]) -> None:
    a, b = ids
    low, high = sorted(ids)
    expected = hashlib.sha256(f"{low}{high}".encode("ascii")).hexdigest()
    assert craft_token(a, b) == expected
    assert len(expected) == TOKEN_HEX_LENGTH and is_token(expected)


@given(distinct_pairs, uuid4s)
def test_different_pairs_give_different_tokens(ids: list[str], third: str) -> None:
    a, b = ids
    if third not in ids:
        assert craft_token(a, b) != craft_token(a, third)


# The vectors of docs/protocol.md, "The witness token: exact byte input": contact ID A, contact ID
# B, the 72 input bytes written out by hand (low then high, no separator) and the token.
VECTORS = [
    ("7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69",
     b"0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69" b"7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
     "2b50617cda6fce170c3f976a7fe67e343d501ef49b5bb9e162839399723ba471"),
    ("00000000-0000-4000-8000-000000000000", "ffffffff-ffff-4fff-bfff-ffffffffffff",
     b"00000000-0000-4000-8000-000000000000" b"ffffffff-ffff-4fff-bfff-ffffffffffff",
     "457251bc1b8fd10aa187662c636a2f662025bf7c195edefdd172abd755482548"),
    ("3b241101-e2bb-4255-8caf-4136c566a962", "3b241101-e2bb-4255-8caf-4136c566a963",
     b"3b241101-e2bb-4255-8caf-4136c566a962" b"3b241101-e2bb-4255-8caf-4136c566a963",
     "ba0cc150356c0b2f4ea6c413f8e6df042e7008617337115ec54ba0fbea5bf942"),
    ("a8098c1a-f86e-41b2-9e6d-2c9a1f0b3d7e", "9d5f2c4e-1a3b-4c7d-a8e9-0f1b2c3d4e5f",
     b"9d5f2c4e-1a3b-4c7d-a8e9-0f1b2c3d4e5f" b"a8098c1a-f86e-41b2-9e6d-2c9a1f0b3d7e",
     "f13ca7035b656c40bf06823e294422c5c3cf7b4bac15b57a46bd62e3d3d48352"),
]

_DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
_ROW = re.compile(r"^\| `([0-9a-f-]{36})` \| `([0-9a-f-]{36})` \| `([0-9a-f]{64})` \|$", re.M)


def _documented_vectors() -> list[tuple[str, str, str]]:
    text = _DOC.read_text(encoding="utf-8")
    section = text.split("## The witness token: exact byte input", 1)[1].split("\n## ", 1)[0]
    return _ROW.findall(section)


@pytest.mark.parametrize(("a", "b", "data", "token"), VECTORS)
def test_vector_bytes_hash_to_the_token_and_craft_token_agrees(
        a: str, b: str, data: bytes, token: str) -> None:
    assert len(data) == 72
    assert hashlib.sha256(data).hexdigest() == token
    assert craft_token(a, b) == craft_token(b, a) == token


def test_the_documented_vectors_are_the_tested_ones() -> None:
    documented = _documented_vectors()
    assert len(documented) >= 3
    assert documented == [(a, b, token) for a, b, _, token in VECTORS]
    for a, b, token in documented:
        assert craft_token(a, b) == token


def test_known_vector() -> None:
    a = "0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69"
    b = "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    assert craft_token(b, a) == hashlib.sha256((a + b).encode()).hexdigest()


@given(st.binary(min_size=16, max_size=16))
def test_new_id_is_a_canonical_uuid4(random16: bytes) -> None:
    made = new_id(random16)
    assert is_uuid4(made)
    parsed = uuid.UUID(made)
    assert parsed.version == 4 and str(parsed) == made
    assert new_id(random16) == made  # no randomness of its own


@pytest.mark.parametrize("size", [0, 15, 17, 32])
def test_new_id_needs_16_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="16 random bytes"):
        new_id(b"\x00" * size)


@pytest.mark.parametrize("text", [
    "0F6C7B2A-3D1E-4C5B-9A8F-1E2D3C4B5A69",    # uppercase
    "0f6c7b2a3d1e4c5b9a8f1e2d3c4b5a69",        # no hyphens
    "{0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69}",  # braces
    "0f6c7b2a-3d1e-1c5b-9a8f-1e2d3c4b5a69",    # version 1
    "0f6c7b2a-3d1e-4c5b-7a8f-1e2d3c4b5a69",    # wrong variant
    "0f6c7b2a-3d1e-4c5b-9a8f-1e2d3c4b5a69\n",  # trailing newline
    "",
])
def test_non_canonical_ids_are_refused(text: str) -> None:
    assert not is_uuid4(text)
    with pytest.raises(ValueError, match="contact_id_a"):
        craft_token(text, "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")
    with pytest.raises(ValueError, match="contact_id_b"):
        craft_token("7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", text)


def test_non_strings_are_not_ids_or_tokens() -> None:
    assert not is_uuid4(None)  # type: ignore[arg-type]
    assert not is_token(b"a" * 64)  # type: ignore[arg-type]


@given(uuid4s)
def test_a_device_never_witnesses_itself(a: str) -> None:
    with pytest.raises(ValueError, match="equal"):
        craft_token(a, a)


@pytest.mark.parametrize(("text", "ok"), [
    ("a" * 64, True), ("0123456789abcdef" * 4, True), ("A" * 64, False), ("a" * 63, False),
    ("a" * 65, False), ("g" * 64, False), ("a" * 64 + "\n", False),
])
def test_is_token(text: str, ok: bool) -> None:
    assert is_token(text) is ok
