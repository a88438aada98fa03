"""pytest-xdist workers for `make test-fast` (loaded with `-p tests.xdist_workers`, see the Makefile).

Each worker process (PYTEST_XDIST_WORKER=gw0, gw1, ...) gets a Redis database of its own: the
tests flush it, and Celery's queues, the rate limiter and the caches keep fixed keys in it. Worker
gwN uses REDIS_URL's database number plus N (TEST_REDIS_URL=redis://.../12 with two workers: 12 and
13), and so does a Redis CELERY_BROKER_URL; a RabbitMQ broker is refused (its vhost would be shared).
This has to happen before pushsvc.settings is read (pytest-django reads it before any conftest), hence
a plugin of its own, run ahead of pytest-django's hook; the processes a test starts inherit it. The
worker's PostgreSQL test database is its own already (pytest-django's `_gwN` suffix, then the run
suffix tests/conftest.py adds).

tests/conftest.py refuses to run in an xdist worker that did not go through this plugin.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV_MARK = "PUSHSVC_XDIST_REDIS_DB"  # the database this worker was given (set below)
REDIS_DATABASES = 16  # Redis's default `databases`: 0-15


def worker_index() -> int | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker.removeprefix("gw")) if worker.startswith("gw") else None


def redis_url_for_worker(url: str, index: int) -> str:
    parts = urlsplit(url)
    base = int(parts.path.strip("/") or 0)
    db = base + index
    if db >= REDIS_DATABASES:
        raise pytest.UsageError(
            f"xdist worker gw{index} would use Redis database {db} ({url} + {index}), past the last one "
            f"({REDIS_DATABASES - 1}): point TEST_REDIS_URL at a lower database or run fewer workers."
        )
    return urlunsplit(parts._replace(path=f"/{db}"))


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config, parser, args):
    # A wrapper runs before every plain implementation, pytest-django's (tryfirst) included.
    index = worker_index()
    if index is not None and ENV_MARK not in os.environ:
        redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        broker = os.environ.get("CELERY_BROKER_URL")
        if broker and not broker.startswith(("redis://", "rediss://")):
            # `make test-rabbitmq` runs in one process.
            scheme = broker.split(":", 1)[0]
            raise pytest.UsageError(f"xdist workers need a Redis broker of their own, not {scheme}")
        os.environ["REDIS_URL"] = redis_url_for_worker(redis_url, index)
        if broker:
            os.environ["CELERY_BROKER_URL"] = redis_url_for_worker(broker, index)
        os.environ[ENV_MARK] = urlsplit(os.environ["REDIS_URL"]).path.strip("/")
    return (yield)
