"""Shared fixtures. The suite runs against real PostgreSQL and Redis, never stand-ins."""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterator

import psycopg2
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


# --- two lanes: `make test-fast` runs what is not slow (in-process, a couple of minutes) ------------
# Slow: whatever starts Celery workers (the start_worker / worker_env fixtures), the fault tests,
# the browser and schemathesis. Marked here, from what a test uses, so a new worker test cannot
# land in the fast lane by forgetting a marker.
SLOW_FIXTURES = frozenset({"start_worker", "worker_env"})
SLOW_PATHS = (
    "tests/reliability/",
    "tests/browser/",
    "tests/multihost/",  # network namespaces, workers on two hosts
    "tests/test_schemathesis.py",
    "tests/test_health_flower.py",  # starts a worker and Flower
    "tests/test_hygiene_celery.py",  # starts workers and beat
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW_PATHS) or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# --- test database: one of its own per pytest run -------------------------------------------------
# pytest-django would create `test_<NAME>` (test_test under `make test`), so two runs on one server
# clobbered each other's database: a run starting (or the restart tests' inner pytest process, which
# inherits DATABASE_URL) dropped and recreated the database another run was using, and dropped it
# again at its end ("Error when trying to teardown test databases: database "test_test" does not
# exist"). Each run now gets `test_<NAME>_run_<8 hex>` and holds a PostgreSQL advisory lock named
# after it (on the server's maintenance database) until its database is dropped. A run killed
# before its teardown leaves its database behind with the lock released (the server drops a dead
# session's locks), so every run starts by dropping the run databases whose lock is free.
RUN_DB_SUFFIX = re.compile(r"_run_[0-9a-f]{8}$")
RUN_DB_LOCK_CLASS = 1919  # advisory lock namespace (the two-int form): (this, hashtext(database name))


def _maintenance_connection(db: dict) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(
        dbname="postgres",
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        host=db.get("HOST") or "127.0.0.1",
        port=db.get("PORT") or 5432,
    )
    conn.autocommit = True
    return conn


def _drop_stale_run_databases(conn: psycopg2.extensions.connection) -> list[str]:
    """Drop the databases of runs that ended without their teardown (their lock is free)."""
    dropped = []
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname ~ '_run_[0-9a-f]{8}$'")
        for (name,) in cur.fetchall():
            cur.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (RUN_DB_LOCK_CLASS, name))
            if not cur.fetchone()[0]:
                continue  # a live run's database
            try:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                dropped.append(name)
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (RUN_DB_LOCK_CLASS, name))
    return dropped


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> Iterator[None]:
    """A test database name of this run's own, locked for the run (see above)."""
    db = settings.DATABASES["default"]
    test = db.setdefault("TEST", {})
    base = test.get("NAME") or f"test_{db['NAME']}"
    name = f"{base[:50]}_run_{secrets.token_hex(4)}"  # PostgreSQL names stop at 63 bytes
    assert RUN_DB_SUFFIX.search(name)
    conn = _maintenance_connection(db)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (RUN_DB_LOCK_CLASS, name))
    _drop_stale_run_databases(conn)
    test["NAME"] = name
    yield
    # After django_db_setup's teardown (it depends on this fixture) dropped the database; closing
    # the session releases the lock. A PostgreSQL restart in a test may have closed it already.
    with contextlib.suppress(psycopg2.Error):
        conn.close()


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


@pytest.fixture
def fast_sim(simulator_fast, settings, redis_client):
    """The fast simulator with this process's settings pointed at it, for shard runs in the test."""
    from campaigns.testing import simulator_env

    for name, value in simulator_env(simulator_fast).items():
        setattr(settings, name, value == "true" if value in ("true", "false") else value)
    return simulator_fast


@pytest.fixture(autouse=True)
def _forget_log_context() -> Iterator[None]:
    """A shard run binds its shard to the log context (pushsvc/logging.py), which a worker clears
    when its next task starts; a test that ran one must not pass it to the next test's logs."""
    yield
    from pushsvc import logging as log_context

    log_context.unbind()
