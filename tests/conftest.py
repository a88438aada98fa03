"""Shared fixtures. The suite runs against real PostgreSQL and Redis, never stand-ins."""

from __future__ import annotations

import pytest
import redis
from django.conf import settings
from django.db import connection


def pytest_configure(config: pytest.Config) -> None:
    engine = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in engine:
        raise pytest.UsageError(
            f"The tests need PostgreSQL (DATABASE_URL=postgres://...), got {engine}. Use `make test`."
        )


@pytest.fixture(scope="session")
def redis_url() -> str:
    return settings.REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    """A client on the tests' own Redis database, emptied before each test."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at {redis_url} is unreachable: {exc}")
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def db_vendor() -> str:
    return connection.vendor


# --- provider simulator (delivery/simulator, docs/simulator.md) ----------------------------------
# One simulator process per front for the whole session; each test gets it reset (counters, per-token
# attempts and knobs), so tests stay independent without paying a start per test.
@pytest.fixture(scope="session")
def _simulator_fast_process():
    from delivery.simulator.testing import SimulatorProcess

    with SimulatorProcess(front="fast", tls=True) as sim:
        yield sim


@pytest.fixture(scope="session")
def _simulator_strict_process():
    from delivery.simulator.testing import SimulatorProcess

    with SimulatorProcess(front="strict", tls=True) as sim:
        yield sim


@pytest.fixture
def simulator_fast(_simulator_fast_process):
    _simulator_fast_process.reset(config=True)
    return _simulator_fast_process


@pytest.fixture
def simulator_strict(_simulator_strict_process):
    _simulator_strict_process.reset(config=True)
    return _simulator_strict_process
