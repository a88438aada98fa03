"""tests/xdist_workers.py: each xdist worker of `make test-fast` on a Redis database of its own."""

from __future__ import annotations

import os

import pytest
from django.conf import settings

from tests.xdist_workers import ENV_MARK, redis_url_for_worker, worker_index


def test_worker_n_uses_the_database_n_after_redis_urls():
    assert redis_url_for_worker("redis://127.0.0.1:6379/12", 0) == "redis://127.0.0.1:6379/12"
    assert redis_url_for_worker("redis://127.0.0.1:6379/12", 1) == "redis://127.0.0.1:6379/13"
    assert redis_url_for_worker("redis://:pw@cache:6380/3?x=1", 2) == "redis://:pw@cache:6380/5?x=1"
    assert redis_url_for_worker("redis://127.0.0.1:6379", 1) == "redis://127.0.0.1:6379/1"


def test_a_worker_past_the_last_database_is_refused():
    with pytest.raises(pytest.UsageError, match="past the last one"):
        redis_url_for_worker("redis://127.0.0.1:6379/15", 1)


def test_this_process_runs_on_its_own_database():
    if worker_index() is None:
        assert ENV_MARK not in os.environ
    else:
        assert settings.REDIS_URL.endswith(f"/{os.environ[ENV_MARK]}")
        assert settings.CELERY_BROKER_URL.endswith(f"/{os.environ[ENV_MARK]}")
