"""Celery tasks of campaigns. Thin: each calls one plain function (campaigns/planning.py,
campaigns/sending/run.py). Their names (campaigns/publish.py, kept from when they lived in
delivery/) and retry policy are here.

Task-level failures (the broker or the database blinked, a provider pool failed to build) are
retried by Celery with the policy below, in one place. Per-device failures are not task
failures: they are results, retried as retry shards (campaigns/sending/). acks_late and
reject_on_worker_lost are set globally (settings), so a worker killed mid-shard gives the shard
back to the broker and the idempotency bitmap keeps the re-run from sending anything twice.

A Redis failure is special: Redis is also the broker, and Celery publishes a retry as a new
message; a publish that fails turns into Reject(requeue=False) and the shard message is gone. So a
shard task that failed on Redis first waits (bounded) for Redis to answer again and only then
lets the autoretry publish. Whatever is lost anyway (a restart without persistence empties the
queues) is found again from PostgreSQL by campaigns/recovery.py, whose sweeper thread every
worker starts.
"""

from __future__ import annotations

import logging
import time

import redis
from celery import shared_task
from celery.signals import worker_ready
from django.db import DatabaseError, InterfaceError

from campaigns import idempotent, planning, publish, recovery, topics
from campaigns.sending import run
from delivery import runtime
from delivery.engine.base import TransportError

logger = logging.getLogger(__name__)

TASK_RETRY_POLICY = {
    "autoretry_for": (DatabaseError, InterfaceError, redis.RedisError, TransportError, ConnectionError),
    "retry_backoff": 2,  # seconds, doubled per retry: 2, 4, 8, 16, ...
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": 8,
}
REDIS_WAIT_S = 120.0  # how long a failed shard task waits for Redis before its retry is published


def wait_for_redis(deadline_s: float = REDIS_WAIT_S) -> bool:
    """Poll Redis with backoff until it answers or `deadline_s` passes; whether it answered."""
    client = runtime.redis_client()
    deadline = time.monotonic() + deadline_s
    pause = 0.2
    while True:
        try:
            return bool(client.ping())
        except (redis.RedisError, ConnectionError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)  # backoff between probes of a server that is down
            pause = min(pause * 2, 5.0)


@shared_task(name=publish.PLAN_TASK, **TASK_RETRY_POLICY)
def plan_campaign(campaign_id: int) -> None:
    try:
        planning.plan(campaign_id)
    except (redis.RedisError, ConnectionError):
        wait_for_redis()
        raise


@shared_task(name=publish.SEND_TASK, **TASK_RETRY_POLICY)
def send_shard(shard_id: int) -> None:
    try:
        run.run_shard(shard_id)
    except (redis.RedisError, ConnectionError):
        wait_for_redis()
        raise
    except TASK_RETRY_POLICY["autoretry_for"]:
        raise
    except Exception as exc:
        # Not a blink of the database or the network: a bounded number of these halts the
        # campaign (campaigns/sending/run.py shard_failed) instead of a crash loop through recovery.
        run.shard_failed(shard_id, exc)
        raise


@shared_task(name=publish.LAUNCH_DUE_TASK, ignore_result=True)
def launch_due_campaigns() -> int:
    launched = len(planning.launch_due())
    recovery.sweep(runtime.redis_client())
    return launched


@shared_task(name=publish.TOPIC_TASK, **TASK_RETRY_POLICY)
def send_topic(campaign_id: int, platform: str, attempt: int = 0, deadline: int | None = None) -> None:
    try:
        topics.run(campaign_id, platform, attempt, deadline)
    except (redis.RedisError, ConnectionError):
        wait_for_redis()
        raise


@shared_task(name="campaigns.expire_idempotency_keys", ignore_result=True)
def expire_idempotency_keys() -> int:
    """Beat (settings.CELERY_BEAT_SCHEDULE): delete Idempotency-Keys past IDEMPOTENCY_TTL_S.
    Declared here, not with the token hygiene jobs: tokens/ knows nothing of campaigns' tables."""
    return idempotent.expire_keys()


@worker_ready.connect
def _start_recovery(**_: object) -> None:
    recovery.start_sweeper()
