"""Celery tasks of the fan-out. Thin: each calls one plain function of campaigns/fanout.py.

Task-level failures (the broker or the database blinked, a provider pool failed to build) are
retried by Celery with the policy below, in one place. Per-device failures are not task
failures: they are results, retried as retry shards (campaigns/fanout.py). acks_late and
reject_on_worker_lost are set globally (settings), so a worker killed mid-shard gives the shard
back to the broker and the idempotency bitmap keeps the re-run from sending anything twice.
"""

from __future__ import annotations

import redis
from celery import shared_task
from django.db import DatabaseError, InterfaceError

from campaigns import fanout
from delivery.engine.base import TransportError

TASK_RETRY_POLICY = {
    "autoretry_for": (DatabaseError, InterfaceError, redis.RedisError, TransportError, ConnectionError),
    "retry_backoff": 2,  # seconds, doubled per retry: 2, 4, 8, 16, ...
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": 8,
}


@shared_task(name="delivery.tasks.plan_campaign", **TASK_RETRY_POLICY)
def plan_campaign(campaign_id: int) -> None:
    fanout.plan(campaign_id)


@shared_task(name="delivery.tasks.send_shard", **TASK_RETRY_POLICY)
def send_shard(shard_id: int) -> None:
    fanout.run_shard(shard_id)


@shared_task(name="delivery.tasks.launch_due_campaigns", ignore_result=True)
def launch_due_campaigns() -> int:
    return len(fanout.launch_due())
