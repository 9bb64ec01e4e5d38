"""Shared fixtures for the whole suite (plain helper functions live in tests/helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.helpers import TIME_UNIT
from tests.pg import PostgresServer, postgres_server
from tests.servers import own_redis, redis_server, redis_url  # noqa: F401  (fixtures)


@pytest.fixture
def time_unit() -> float:
    """The suite's time unit in seconds (``FANNY_TIME_UNIT``, default 1): scale deadlines by it."""
    return TIME_UNIT


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """PEM files of a throw-away CA (``ca``), the broker's certificate for 127.0.0.1 signed by
    it (``cert``, ``key``), and an unrelated CA (``other``)."""
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "other", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    other.cert_pem.write_to_path(str(paths["other"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(paths["cert"]), append=i > 0)
    return paths


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """Debian's PostgreSQL, started once for the test session on a free loopback port and
    stopped after it (tests/pg.py)."""
    yield from postgres_server()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database on the test server, dropped after the test."""
    url = postgres.new_database()
    yield url
    postgres.drop_database(url)
