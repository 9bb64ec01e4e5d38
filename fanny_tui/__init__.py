"""FANNY field kit client.

This package imports nothing on purpose (:func:`kit_version` imports lazily): the broker
imports :mod:`fanny_tui.protocol` without pulling in Textual, aiortc or any I/O.
"""

DISTRIBUTION = "fanny-field-kit"
"""The distribution (``pip install`` name) of the kit: the client and the broker."""


def kit_version() -> str:
    """The installed distribution's version (package metadata), e.g. ``0.1.0``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
