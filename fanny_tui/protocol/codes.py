"""Declaration codes: single-use authorizations of a positive declaration (paper section 5).

The paper's "signature of compliance" becomes, as in the exposure notification verification
servers, a short single-use code an operator (health authority, test site) hands to a tester who
tested positive, read over the phone if need be. The broker stores only its SHA-256 and expiry.

Format: 16 symbols of Crockford's base32 (80 bits of entropy), shown in four groups of four,
e.g. ``K7QF-3M9X-TR2B-8HJD``. Reading is forgiving: case, spaces and hyphens are ignored and the
look-alikes ``I``/``L`` read as ``1`` and ``O`` as ``0`` (Crockford's rules).

A code is one declaration (issue 8, point 3): a declaration of more than 500 tokens is several
uploads, and the device binds them with a **declaration secret** (:func:`new_declaration`, 256
random bits, fresh per declaration, kept in memory only) sent with each of them. The broker keeps
its SHA-256 (:func:`declaration_hash`) beside the code's at the first commit and then accepts the
code again only with the same secret: a second device given the same code is refused at once.

Pure: the caller passes the random bytes (``os.urandom(10)``, ``os.urandom(32)``).
"""

from __future__ import annotations

import hashlib

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
"""Crockford's base32: no I, L, O, U."""

CODE_SYMBOLS = 16
CODE_RANDOM_BYTES = 10
"""80 bits: 16 base32 symbols."""

DECLARATION_RANDOM_BYTES = 32
"""256 bits: a declaration secret is 64 lowercase hex characters."""

_ALIASES = {"I": "1", "L": "1", "O": "0"}


def format_code(random10: bytes) -> str:
    """Make a code from 10 random bytes.

    Returns:
        ``XXXX-XXXX-XXXX-XXXX`` in Crockford base32 (uppercase).

    Raises:
        ValueError: not exactly 10 bytes.
    """
    if len(random10) != CODE_RANDOM_BYTES:
        raise ValueError(f"a declaration code needs {CODE_RANDOM_BYTES} random bytes")
    number = int.from_bytes(random10, "big")
    symbols = []
    for _ in range(CODE_SYMBOLS):
        number, digit = divmod(number, 32)
        symbols.append(ALPHABET[digit])
    text = "".join(reversed(symbols))
    return "-".join(text[i:i + 4] for i in range(0, CODE_SYMBOLS, 4))


def normalize_code(text: str) -> str:
    """The canonical 16-symbol form of a code as a person typed it.

    Raises:
        ValueError: wrong length or a character outside Crockford base32 (message says which).
    """
    cleaned = "".join(ch for ch in text.upper() if ch not in " -\t")
    cleaned = "".join(_ALIASES.get(ch, ch) for ch in cleaned)
    bad = sorted({ch for ch in cleaned if ch not in ALPHABET})
    if bad:
        raise ValueError(f"a declaration code has no {''.join(bad)!r}: use 0-9 and A-Z")
    if len(cleaned) != CODE_SYMBOLS:
        raise ValueError(f"a declaration code has {CODE_SYMBOLS} characters, got {len(cleaned)}")
    return cleaned


def code_hash(text: str) -> str:
    """SHA-256 (hex) of the normalized code: what the broker stores.

    Raises:
        ValueError: as :func:`normalize_code`.
    """
    return hashlib.sha256(normalize_code(text).encode("ascii")).hexdigest()


def new_declaration(random32: bytes) -> str:
    """A declaration secret: the 32 random bytes as 64 lowercase hex characters.

    Raises:
        ValueError: not exactly :data:`DECLARATION_RANDOM_BYTES` bytes.
    """
    if len(random32) != DECLARATION_RANDOM_BYTES:
        raise ValueError(f"a declaration secret needs {DECLARATION_RANDOM_BYTES} random bytes")
    return random32.hex()


def declaration_hash(secret: str) -> str:
    """SHA-256 (hex) of a declaration secret: what the broker stores beside the code's hash.

    Raises:
        ValueError: the secret is not 64 lowercase hex characters.
    """
    if len(secret) != 2 * DECLARATION_RANDOM_BYTES or secret.strip("0123456789abcdef"):
        raise ValueError("a declaration secret is 64 lowercase hex characters")
    return hashlib.sha256(secret.encode("ascii")).hexdigest()
