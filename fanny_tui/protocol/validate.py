"""Value validators shared by the client's config, the broker's settings and both command lines.

Pure: each function takes a value (as read from TOML, passed to a dataclass, or typed on a
command line) and returns it typed, or raises :class:`Invalid`, whose text is one line in the
house format ``KEY: expected WHAT, got VALUE`` (for example
``limits.position_rate_per_s: expected a number > 0 and <= 10000, got -1``). Callers choose the
key: a config key (``protocol.radius_m``), a dataclass attribute (``BrokerSettings.port``) or a
command-line option (``--port``).

Used by :mod:`fanny_tui.config`, :class:`broker.server.BrokerSettings`, :mod:`broker.config`
and :mod:`broker.__main__`.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit


def shown(value: object) -> str:
    """A refused value as an error shows it: ``repr``, but a bool as TOML spells it (``true``,
    ``false``: what the user wrote in the file)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


class Invalid(ValueError):
    """A value of the wrong type or range.

    Attributes:
        key: what was wrong (a config key, attribute or option name).
        expected: what is accepted, e.g. ``"an integer in [1, 65535]"``.
        got: the value refused (``...`` when there is none to show).

    ``str(error)`` is ``"{key}: expected {expected}, got {got!r}"`` (a bool as TOML spells it:
    ``got true``, not ``got True``); :attr:`detail` is the same without the key.
    """

    def __init__(self, key: str, expected: str, got: object = ...) -> None:
        self.key, self.expected, self.got = key, expected, got
        super().__init__(f"{key}: {self.detail}" if key else self.detail)

    @property
    def detail(self) -> str:
        """``"expected {expected}, got {got!r}"``: the message without the key."""
        if self.got is ...:
            return f"expected {self.expected}"
        return f"expected {self.expected}, got {shown(self.got)}"


def _show(bound: float) -> str:
    """A bound as people write it: ``0``, ``0.05``, ``10000``, not ``0.0`` or ``1e+04``."""
    if isinstance(bound, int) or (math.isfinite(bound) and float(bound).is_integer()
                                  and abs(bound) < 1e15):
        return str(int(bound))
    return repr(float(bound))


def number_range(low: float | None = None, high: float | None = None, *,
                 low_open: bool = False) -> str:
    """How a number range is said in an error: ``"a number > 0 and <= 60"``.

    Args:
        low / high: the bounds (None: unbounded on that side); ``high`` is included.
        low_open: ``low`` itself is refused (``> low`` instead of ``>= low``).
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {_show(low)}")
    if high is not None:
        parts.append(f"<= {_show(high)}")
    return "a number " + " and ".join(parts) if parts else "a number"


def number(key: str, value: object, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
    """A finite int or float (not a bool) within ``[low, high]`` (``(low, high]`` if ``low_open``).

    Returns:
        The value as a float.

    Raises:
        Invalid: not a finite number (``expected a finite number ...``), or out of range.
    """
    wanted = number_range(low, high, low_open=low_open)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value)):
        raise Invalid(key, wanted.replace("a number", "a finite number", 1), value)
    if low is not None and (value <= low if low_open else value < low):
        raise Invalid(key, wanted, value)
    if high is not None and value > high:
        raise Invalid(key, wanted, value)
    return float(value)


def integer(key: str, value: object, low: int, high: int | None = None) -> int:
    """An int (not a bool, not a float) within ``[low, high]`` (``high`` None: no upper bound).

    Raises:
        Invalid: ``expected an integer in [low, high]`` (or ``an integer >= low``).
    """
    wanted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if (isinstance(value, bool) or not isinstance(value, int) or value < low
            or (high is not None and value > high)):
        raise Invalid(key, wanted, value)
    return value


def boolean(key: str, value: object) -> bool:
    """``True`` or ``False`` (not 0/1, not ``"yes"``).

    Raises:
        Invalid: ``expected true or false``.
    """
    if not isinstance(value, bool):
        raise Invalid(key, "true or false", value)
    return value


def string(key: str, value: object, *, what: str = "a string", empty_ok: bool = True) -> str:
    """A str (non-empty unless ``empty_ok``).

    Args:
        what: how the expected value is named in the error (``"a file path"``).

    Raises:
        Invalid: ``expected {what}``.
    """
    if not isinstance(value, str) or (not empty_ok and not value):
        raise Invalid(key, what, value)
    return value


def choice(key: str, value: object, options: Iterable[str]) -> str:
    """One of ``options`` (compared exactly).

    Raises:
        Invalid: ``expected one of "a", "b"``.
    """
    allowed = tuple(options)
    if not isinstance(value, str) or value not in allowed:
        raise Invalid(key, "one of " + ", ".join(f'"{o}"' for o in allowed), value)
    return value


def url(key: str, value: object, schemes: Iterable[str], *, host: bool = False) -> str:
    """A URL whose scheme is one of ``schemes`` (and, with ``host``, that names a host).

    Raises:
        Invalid: ``expected a URL starting with ws:// or wss://`` (``... with a host``); the
            value shown has its password, if any, replaced by ``***``.
    """
    allowed = tuple(schemes)
    wanted = "a URL starting with " + " or ".join(f"{s}://" for s in allowed)
    if host:
        wanted += " and naming a host"
    if not isinstance(value, str):
        raise Invalid(key, wanted, value)
    shown = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", value)   # never echo a password
    try:
        parts = urlsplit(value)
        named, _ = parts.hostname, parts.port
    except ValueError:                   # a malformed port or IPv6 literal
        raise Invalid(key, wanted, shown) from None
    if parts.scheme not in allowed or not value.lower().startswith(f"{parts.scheme}://") or (
            host and not named):
        raise Invalid(key, wanted, shown)
    return value


def redis_url(key: str, value: object) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL (:func:`url`) whose path, if any, is
    a database number (``redis://HOST:PORT/0``): redis-py reads any other path (``/fanny``,
    a typo) as database 0, silently.

    Raises:
        Invalid: another scheme, or a path that is not ``/`` and a number.
    """
    text = url(key, value, ("redis", "rediss", "unix"))
    parts = urlsplit(text)
    if parts.scheme != "unix" and not re.fullmatch(r"/?|/\d+", parts.path):
        shown = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", text)
        raise Invalid(key, "a database number as the URL's path (redis://HOST:PORT/0)", shown)
    return text


# --- text typed on a command line -------------------------------------------------------------


def number_text(key: str, text: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> float:
    """:func:`number` of a command-line argument (``"2.5"``).

    Raises:
        Invalid: not a number, or out of range (``got`` is the text as typed).
    """
    try:
        value = float(text)
    except ValueError:
        raise Invalid(key, number_range(low, high, low_open=low_open), text) from None
    try:
        return number(key, value, low=low, high=high, low_open=low_open)
    except Invalid as exc:
        raise Invalid(key, exc.expected, text) from None


def integer_text(key: str, text: str, low: int, high: int | None = None) -> int:
    """:func:`integer` of a command-line argument (``"8765"``).

    Raises:
        Invalid: not a base-10 integer, or out of range (``got`` is the text as typed).
    """
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    try:
        return integer(key, value, low, high)
    except Invalid as exc:
        raise Invalid(key, exc.expected, text) from None


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
"""Seconds in each unit of :func:`duration_text`."""


def duration_text(key: str, text: str, *, high_s: float) -> float:
    """A duration with its unit: ``90s``, ``30m``, ``2h``, ``1d``, ``1.5h``.

    A bare number is refused: ``1`` could be meant as one second, one hour or one day.

    Returns:
        Seconds, > 0 and <= ``high_s``.

    Raises:
        Invalid: no unit, an unknown unit, or out of range.
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text.lower())
    if not found:
        raise Invalid(key, "a duration with its unit (s, m, h or d), like 90s, 30m, 2h or 1d"
                      " (a bare number is refused: it does not say which unit)", text)
    seconds = float(found.group(1)) * DURATION_UNITS[found.group(2)]
    if not 0 < seconds <= high_s:
        raise Invalid(key, f"a duration > 0s and at most {_duration(high_s)}", text)
    return seconds


def argument_type(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[str], Any]:
    """An argparse ``type=``: ``check("", text, *args, **kwargs)``, one of the ``*_text``
    validators above; its :class:`Invalid` becomes :class:`argparse.ArgumentTypeError` with
    the detail only (argparse names the option: ``argument --timeout: expected ...``)."""

    def parse(text: str) -> Any:
        try:
            return check("", text, *args, **kwargs)
        except Invalid as exc:
            raise argparse.ArgumentTypeError(exc.detail) from None

    return parse


def _duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds % DURATION_UNITS[unit] == 0:
            return f"{_show(seconds / DURATION_UNITS[unit])}{unit}"
    return f"{_show(seconds)}s"
