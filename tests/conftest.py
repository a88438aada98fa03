"""Shared fixtures. The suite runs against real PostgreSQL and Redis, never stand-ins."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator

import psycopg2
import pytest
import redis
from django.conf import settings
from django.db import connection

from campaigns.pytest_fixtures import CALL_FAILED


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[CALL_FAILED] = True
    return report


def pytest_configure(config: pytest.Config) -> None:
    engine = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in engine:
        raise pytest.UsageError(
            f"The tests need PostgreSQL (DATABASE_URL=postgres://...), got {engine}. Use `make test`."
        )
    # Admin users are made with a password and log in with it: the production hasher (PBKDF2, about a
    # million rounds) costs 0.3-0.5 s a hash here, in setup of every admin test and in every login
    # attempt. The tests exercise Django's auth, not the hasher's strength: a fast one, in tests only
    # (processes a test starts, e.g. the web server in the slow lane, keep the production hasher).
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    _check_xdist_worker()
    _flush_by_delete()
    if settings.BROKER_IS_RABBITMQ:
        _check_rabbitmq(settings.CELERY_BROKER_URL)


def _check_xdist_worker() -> None:
    """An xdist worker (`make test-fast`) must have a Redis database of its own: tests/xdist_workers.py
    gives it one, when loaded (`-p tests.xdist_workers`); without it the workers would flush each
    other's database and take each other's queued tasks."""
    from tests import xdist_workers

    index = xdist_workers.worker_index()
    if index is None:
        return
    db = os.environ.get(xdist_workers.ENV_MARK)
    if db is None or settings.REDIS_URL.rstrip("/").rsplit("/", 1)[-1] != db:
        raise pytest.UsageError(
            "pytest-xdist workers need `-p tests.xdist_workers` (a Redis database each): use "
            "`make test-fast`, or add that option to the pytest command line."
        )


# --- transactional tests: emptied with DELETE, not TRUNCATE ----------------------------------------
# A `django_db(transaction=True)` test ends with Django's flush of every table, on PostgreSQL one
# TRUNCATE of all of them: ~0.3 s here for 26 tables (new files for every table and index, then the
# commit), after each of the ~170 transactional tests of the fast lane. DELETE FROM each table, in one
# transaction with every foreign key deferred (Django makes them DEFERRABLE INITIALLY DEFERRED; a
# constraint that is not would fail the flush loudly, not leave rows), leaves the same empty tables in
# ~0.01 s: a test's tables hold a few rows. The only triggers are the device table's (tokens 0007):
# they keep the token claims, a table Django does not know, equal to the devices under DELETE and
# TRUNCATE alike (tests/test_flush.py checks there is no other). Sequences are not reset either way
# (pytest-django's reset_sequences=False); a flush asked to reset them (or to cascade) keeps Django's
# own TRUNCATE.
#
# A table left big (a test's 50,000 devices: tests/test_campaign_canonical.py, 18 MB) is emptied with
# one TRUNCATE instead: DELETE itself is quick there (0.03 s, TRUNCATE 0.06-0.1 s, measured), but it
# leaves the file at its size, full of dead rows until autovacuum gets to it, and every later flush
# and scan of the table reads them (each later flush took 0.012 s instead of 0.004 s). Big: a heap over
# FLUSH_TRUNCATE_BYTES (pg_relation_size, summed over a partitioned table's partitions: the files' size,
# exact at once, unlike the planner's row estimates, which wait for ANALYZE; 8 MiB is ~25,000
# devices). The TRUNCATE names every table but the
# two kept below, in the same transaction: nothing kept references a truncated table, and every table
# that references one is truncated with it, as TRUNCATE requires (tests/test_flush.py runs it).
#
# The flush is followed by post_migrate, which rebuilds the content types and permissions from the
# models: after an emptied table it inserted them all again (~0.06 s a test); kept, it finds them all
# and inserts nothing. No test adds or removes one (they are kept as the migrations left them).
REBUILT_AFTER_FLUSH = frozenset({"django_content_type", "auth_permission"})
FLUSH_TRUNCATE_BYTES = 8 * 1024 * 1024


def _big_tables(connection, tables: list[str]) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name FROM unnest(%s::text[]) AS t(name), to_regclass(quote_ident(name)) AS r"
            " WHERE COALESCE((SELECT sum(pg_relation_size(relid)) FROM pg_partition_tree(r)),"
            " pg_relation_size(r)) > %s",
            [tables, FLUSH_TRUNCATE_BYTES],
        )
        return [name for (name,) in cursor.fetchall()]


def _flush_by_delete() -> None:
    from django.db.backends.postgresql.operations import DatabaseOperations

    truncate = DatabaseOperations.sql_flush
    if getattr(truncate, "by_delete", False):
        return

    def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        if reset_sequences or allow_cascade or not tables:
            return truncate(self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
        emptied = [table for table in tables if table not in REBUILT_AFTER_FLUSH]
        if _big_tables(self.connection, emptied):
            return truncate(self, style, emptied)
        # Django runs these in one transaction (BaseDatabaseOperations.execute_sql_flush).
        delete = style.SQL_KEYWORD("DELETE FROM")
        return ["SET CONSTRAINTS ALL DEFERRED;"] + [
            f"{delete} {style.SQL_FIELD(self.quote_name(table))};" for table in emptied
        ]

    sql_flush.by_delete = True
    DatabaseOperations.sql_flush = sql_flush


# --- the broker: Redis (`make test`) or RabbitMQ (`make test-rabbitmq`, CELERY_BROKER_URL=amqp://) ---
# Under RabbitMQ the run fails at once, never skips, when the broker does not answer. Its vhost is
# the run's own (like the Redis database: emptied before each worker test); a missing one is created
# with rabbitmqctl when this machine has it.
RABBITMQ_ONLY = "tests/rabbitmq/"


def _check_rabbitmq(url: str) -> None:
    from kombu import Connection
    from kombu.utils.url import maybe_sanitize_url

    from campaigns.testing import rabbitmq_vhost, rabbitmqctl

    def connect() -> None:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)

    try:
        connect()
        return
    except Exception as exc:  # refused, unreachable, or the vhost missing (access refused)
        first = exc
    vhost = rabbitmq_vhost(url)
    try:
        # Only a broker that answered and refused the vhost (530 NOT_ALLOWED) gets one, and only
        # through this machine's node: an unreachable one is reported as it is.
        if getattr(first, "code", None) != 530 and getattr(first.__cause__, "code", None) != 530:
            raise first
        names = rabbitmqctl("list_vhosts", "--quiet", "--no-table-headers").split()
        if vhost not in names:
            user = Connection(url).userid
            rabbitmqctl("add_vhost", vhost)
            rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        connect()
    except Exception as exc:
        raise pytest.UsageError(
            f"RabbitMQ at {maybe_sanitize_url(url)} is unreachable or refuses the connection: "
            f"{type(first).__name__}: {first} (then: {type(exc).__name__}: {exc}). Start it (rabbitmq-server "
            f"-detached) and make sure vhost {vhost!r} exists and allows the user; the tests never skip it."
        ) from exc


# --- two lanes: `make test-fast` runs what is not slow (in-process, a couple of minutes) ------------
# Slow: whatever starts Celery workers (the start_worker / worker_env fixtures), the fault tests,
# the browser and schemathesis. Marked here, from what a test uses, so a new worker test cannot
# land in the fast lane by forgetting a marker. A test that starts a process of its own (manage.py,
# a simulator besides the session's two) is marked slow in its file.
SLOW_FIXTURES = frozenset({"start_worker", "worker_env"})
SLOW_PATHS = (
    "tests/reliability/",
    "tests/rabbitmq/",
    "tests/browser/",
    "tests/multihost/",  # network namespaces, workers on two hosts
    "tests/test_schemathesis.py",
    "tests/test_health_flower.py",  # starts a worker and Flower
    "tests/test_hygiene_celery.py",  # starts workers and beat
)


def _fast_lane_only(config: pytest.Config) -> bool:
    return " ".join((config.option.markexpr or "").split()) == "not slow"


def pytest_ignore_collect(collection_path, config: pytest.Config) -> bool | None:
    """`-m "not slow"` (make test-fast) does not import the files that hold only slow tests: all of
    their tests would be deselected anyway, and collecting them cost seconds (schemathesis builds its
    test cases from the OpenAPI schema at collection)."""
    if not _fast_lane_only(config):
        return None
    try:
        rel = collection_path.relative_to(config.rootpath).as_posix()
    except ValueError:
        return None
    if rel.startswith(SLOW_PATHS) or f"{rel}/".startswith(SLOW_PATHS):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW_PATHS) or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if not settings.BROKER_IS_RABBITMQ:
        # tests/rabbitmq/ is about RabbitMQ as the broker: `make test-rabbitmq` runs it. Under Redis it
        # is deselected, which pytest reports in its closing line ("N deselected"), never a skip.
        rabbit = [item for item in items if item.nodeid.startswith(RABBITMQ_ONLY)]
        if rabbit:
            config.hook.pytest_deselected(items=rabbit)
            items[:] = [item for item in items if not item.nodeid.startswith(RABBITMQ_ONLY)]


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
    # The test process's connections commit without waiting for the WAL flush: a commit cost ~3 ms
    # here (~0.5 ms without), and the transactional tests commit thousands of times. Nothing in a test
    # run outlives a server crash; a clean stop or restart (the reliability tests' `pg_ctl -m fast`)
    # still writes every commit. The processes tests start (workers, servers) keep the server default,
    # and a transaction that sets it itself (tokens/registry.py) still gets what it sets.
    options = db.setdefault("OPTIONS", {})
    options["options"] = f"{options.get('options', '')} -c synchronous_commit=off".strip()
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


# --- provider simulator (simulator/, docs/simulator.md) ------------------------------------------
# One simulator process per front for the whole session; each test gets it reset (counters, per-token
# attempts and knobs), so tests stay independent without paying a start per test.
# At the end of the session the fast front would wait out its whole 10 s grace period for the warm
# connections the test process still holds; nothing is checked after that point, so it gets 1 s.
SESSION_SIMULATOR_GRACE_S = 1.0


@pytest.fixture(scope="session")
def _simulator_fast_process():
    from simulator.testing import SimulatorProcess

    sim = SimulatorProcess(front="fast", tls=True).start()
    try:
        yield sim
    finally:
        sim.stop(grace_s=SESSION_SIMULATOR_GRACE_S)


@pytest.fixture(scope="session")
def _simulator_strict_process():
    from simulator.testing import SimulatorProcess

    sim = SimulatorProcess(front="strict", tls=True).start()
    try:
        yield sim
    finally:
        sim.stop(grace_s=SESSION_SIMULATOR_GRACE_S)


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
