"""pytest fixtures for the campaign suites (imported by tests/test_campaign*.py and friends).

Each test that sends gets real parts: the simulator (one per module, reset per test), a Redis
database emptied before the worker starts, and `celery worker` subprocesses connected to the
test database (tests use `django_db(transaction=True)` so the workers see committed rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from campaigns.testing import CeleryWorker, database_url, purge_rabbitmq, simulator_env
from simulator.testing import SimulatorProcess
from tokens.models import ApiKey, App

# Set by tests/conftest.py when a test's call failed: its workers' logs are printed at teardown,
# which pytest shows with the failure (a CI run's clone, and var/workers with it, is gone after).
CALL_FAILED = pytest.StashKey[bool]()

# Fast retries so a test sees a device through all its attempts in seconds.
TEST_WORKER_SETTINGS = {
    "CAMPAIGN_RETRY_BASE_S": "0.2",
    "CAMPAIGN_RETRY_MAX_S": "2",
    "CAMPAIGN_SCHEDULER_INTERVAL_S": "0.5",
    "CAMPAIGN_SHARD_LEASE_S": "5",  # a killed worker's shard is re-run within seconds
    "PUSH_REQUEST_TIMEOUT": "10",
    "LOG_LEVEL": "WARNING",
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(front="strict", tls=True) as simulator:
        yield simulator


@pytest.fixture
def fresh_sim(sim: SimulatorProcess) -> SimulatorProcess:
    sim.reset(config=True)
    return sim


@pytest.fixture
def worker_env(fresh_sim: SimulatorProcess, redis_client: Any) -> dict[str, str]:
    """Environment for worker subprocesses; requesting it also empties the test Redis database,
    and with RabbitMQ as the broker the test vhost's queues."""
    if settings.BROKER_IS_RABBITMQ:
        purge_rabbitmq()
    env = {
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        **simulator_env(fresh_sim),
        **TEST_WORKER_SETTINGS,
    }
    return env


@pytest.fixture
def start_worker(
    worker_env: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[Callable[..., CeleryWorker]]:
    """start_worker(queues=..., concurrency=..., env=...) -> a started worker, stopped at teardown
    (its log's tail printed when the test failed)."""
    started: list[CeleryWorker] = []

    def start(**kwargs: Any) -> CeleryWorker:
        env = {**worker_env, **kwargs.pop("env", {})}
        worker = CeleryWorker(env=env, **kwargs)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()
        if request.node.stash.get(CALL_FAILED, False):
            print(f"\n--- worker {worker.name} ({worker.log_file}), last lines ---\n{worker.log_tail(60)}")


def api_client(app: App) -> APIClient:
    client = APIClient()
    _, raw = ApiKey.issue(app, ["send", "devices"])
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


__all__ = ["api_client", "fresh_sim", "sim", "start_worker", "worker_env"]
