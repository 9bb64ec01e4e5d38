"""fanny_tui.protocol.codes: declaration secrets (issue 8, point 3) beside declaration codes."""

from __future__ import annotations

import hashlib

import pytest

from fanny_tui.protocol.codes import (
    DECLARATION_RANDOM_BYTES,
    declaration_hash,
    new_declaration,
)


def test_a_declaration_secret_is_its_random_bytes_in_hex():
    secret = new_declaration(bytes(range(32)))
    assert secret == bytes(range(32)).hex() and len(secret) == 2 * DECLARATION_RANDOM_BYTES
    for size in (0, 16, 31, 33):
        with pytest.raises(ValueError, match="32 random bytes"):
            new_declaration(bytes(size))


def test_the_broker_keeps_the_sha256_of_the_secret_never_the_secret():
    secret = new_declaration(bytes(range(32)))
    hashed = declaration_hash(secret)
    assert hashed == hashlib.sha256(secret.encode("ascii")).hexdigest() and hashed != secret
    assert declaration_hash(new_declaration(bytes(32))) != hashed
    for bad in (secret.upper(), secret[:-1], secret + "0", secret[:-1] + "g", " " + secret[1:]):
        with pytest.raises(ValueError, match="64 lowercase hex"):
            declaration_hash(bad)

