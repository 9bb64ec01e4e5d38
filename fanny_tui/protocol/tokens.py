"""Session IDs, contact IDs and witness tokens (paper section 3, steps 1 and 4).

A *session ID* identifies a running app to the broker; a *contact ID* is exchanged only over
the peer-to-peer data channel. Both are random UUIDv4 (RFC 4122 section 4.4), made at start,
kept in memory only and forgotten when the app stops. This module never makes them itself
(the core has no randomness): :func:`new_id` takes the 16 random bytes from the caller.

A witness *token* is the lowercase hex SHA-256 (RFC 6234) of the two contact IDs' canonical
text (lowercase, hyphenated, 36 characters) concatenated in ascending order, so both peers
compute the same 64-character token whatever their role. This matches the authors' public
prototype. The exact input (72 ASCII bytes, no separator) and test vectors are normative in
docs/protocol.md, "The witness token: exact byte input"; tests/test_tokens.py checks both agree.
"""

from __future__ import annotations

import hashlib
import re
import uuid

TOKEN_HEX_LENGTH = 64
"""Length of a token in lowercase hex characters (32 bytes of SHA-256)."""

_UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
_TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")
# Used with fullmatch(): with match(), "$" would also accept a trailing newline.


def new_id(random16: bytes) -> str:
    """Make a UUIDv4 in canonical text from 16 random bytes.

    Args:
        random16: exactly 16 bytes from a CSPRNG (``os.urandom(16)``).

    Returns:
        The canonical lowercase hyphenated UUIDv4 text, 36 characters.

    Raises:
        ValueError: ``random16`` is not 16 bytes long.
    """
    if len(random16) != 16:
        raise ValueError(f"a UUIDv4 needs 16 random bytes, got {len(random16)}")
    return str(uuid.UUID(bytes=bytes(random16), version=4))


def is_uuid4(text: str) -> bool:
    """True when ``text`` is a canonical lowercase hyphenated UUIDv4."""
    return isinstance(text, str) and _UUID4_RE.fullmatch(text) is not None


def is_token(text: str) -> bool:
    """True when ``text`` is 64 lowercase hex characters."""
    return isinstance(text, str) and _TOKEN_RE.fullmatch(text) is not None


def craft_token(contact_id_a: str, contact_id_b: str) -> str:
    """Craft the witness token of two contact IDs (paper section 3, step 4, figure 2).

    Args:
        contact_id_a: one contact ID, canonical UUIDv4 text.
        contact_id_b: the other contact ID, canonical UUIDv4 text.

    Returns:
        Lowercase hex SHA-256 of ``min(a, b) + max(a, b)`` encoded as ASCII (72 bytes, no
        separator): 64 characters.
        Symmetric: ``craft_token(a, b) == craft_token(b, a)``.

    Raises:
        ValueError: an ID is not a canonical UUIDv4, or both IDs are equal (a device never
            witnesses itself).
    """
    for name, value in (("contact_id_a", contact_id_a), ("contact_id_b", contact_id_b)):
        if not is_uuid4(value):
            raise ValueError(f"{name} is not a canonical lowercase UUIDv4")
    if contact_id_a == contact_id_b:
        raise ValueError("the two contact IDs are equal")
    low, high = sorted((contact_id_a, contact_id_b))
    return hashlib.sha256((low + high).encode("ascii")).hexdigest()
