"""Fixtures of the UI tests: a test store, broker addresses that refuse or never answer, a
settable clock (helpers: tests/ui/kit.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fanny_tui.config import Config
from fanny_tui.store import TokenStore
from tests.helpers import loopback_port

from .kit import TOKEN_DAYS, TOKENS, SettableClock, expiry, ui_config


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory whose store holds the three TOKENS, expiring 5, 10 and 15 days after
    T0 at 04:00 UTC."""
    store = TokenStore.in_dir(tmp_path)
    for days, token in zip(TOKEN_DAYS, TOKENS, strict=True):
        store.add(token, expiry(days))
    store.close()
    return tmp_path


@pytest.fixture
def config() -> Iterator[Config]:
    """A device whose broker port refuses connections: it stays disconnected, retrying."""
    with loopback_port(listening=False) as port:
        yield ui_config(port)


@pytest.fixture
def quiet() -> Iterator[Config]:
    """A device whose broker address accepts connections and never answers."""
    with loopback_port(listening=True) as port:
        yield ui_config(port)


@pytest.fixture
def quiet_region() -> Iterator[Config]:
    """As ``quiet``, with two ``[[positives]]`` brokers (``health``, ``region-2``) whose
    addresses accept connections and never answer either."""
    with loopback_port(listening=True) as port, loopback_port(listening=True) as health, \
            loopback_port(listening=True) as region:
        yield ui_config(port, {"health": health, "region-2": region})


@pytest.fixture
def clock() -> SettableClock:
    """The app's clock, at T0 until the test moves it."""
    return SettableClock()
