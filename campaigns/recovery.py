"""Shards the broker lost, found again in PostgreSQL and published again.

Every shard is a row before it is a message, so the database knows what should be queued: a
PENDING shard of a RUNNING campaign. The broker (Redis) can lose messages: a restart without
persistence empties the queues and the unacked set; a follow-up shard whose publish failed while
Redis was down exists only as a row. `republish_lost` publishes again every pending shard that

- is due for longer than CAMPAIGN_RECOVERY_GRACE_S (`not_before`, else `created_at`): a message
  with a countdown waits in a worker until then, so it cannot be judged lost before;
- holds no lease (no run of it is going on), and
- sits on a queue that holds no message ready for a consumer (delivery/broker.py: the Redis
  lists, or RabbitMQ's count from a passive queue.declare): a queue with messages still has work
  in order, and a big campaign's backlog must not be published twice every sweep.

A run that died is found sooner (`republish_orphans`): a shard lease is registered while held
(delivery/leases.py), so a registered lease that ran out is a run whose process died without
releasing it (a worker killed outright: its message waits in the broker's unacked set for the
visibility timeout, an hour). Such a shard is published again on the next check, one per
CAMPAIGN_RECOVERY_ORPHAN_INTERVAL_S across all workers, with no grace and behind whatever its
queue holds: the lease is the proof that no run is going on, so the empty-queue test is not needed.

A Redis broker that lost its data (a flush, a restart without persistence) lost every message:
the worker's thread keeps a mark in the broker's database, and when it is gone everything pending,
due and unleased is published without the grace, one lease period later (`_after_broker_loss`),
and so is every unanswered provider of a topic send (campaigns/topics.py), whose only state
between attempts is its message.
RabbitMQ has no such mark: its quorum queues and persistent messages survive a restart, and the
unacknowledged messages of a connection that closed are queued again by the broker itself; queues
that lost messages all the same (purged, deleted, a node rebuilt empty) are empty queues, found by
`republish_lost` after the grace. PostgreSQL's rows, not the broker, say what is left to send.

A message published twice is harmless: the shard's lease keeps two runs from overlapping and the
run that finds it no longer PENDING does nothing (campaigns/sending/run.py).

A planner can be lost too (its process killed, its message dropped by a Redis restart, or
redelivered while the dead planner's lease still held, which acknowledges it with nothing
done). `replan_lost` publishes the planning task again for a started, unplanned campaign whose
plan lease is free after the grace; planning continues after the ranges already written, and the
lease keeps a second planner from racing one that is alive.

Duplicates after Redis lost its data: the idempotency bitmap is gone with it, so a re-run cannot
ask Redis which devices are finished. It does not need to: a shard whose Redis calls fail
mid-run records what it sent in PostgreSQL and stays pending with its range (or id list) moved
past it (campaigns/sending/run.py, StopReason.REDIS_LOST); finished shards are DONE rows. Only the
answers of a chunk in flight in a process that died outright can be sent again, as with a killed worker.

The same sweep decides canary cohorts whose wait is over (campaigns/canary.py `decide_due`): the
wait is a deadline stored on the campaign, so no worker sleeps through it and a crash loses nothing.

It runs from the beat's campaign scheduler tick and from a thread in every worker's main process
(so a deployment without a beat recovers too); a Redis lock makes one sweep per interval.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from datetime import timedelta

import redis
from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from campaigns import canary, publish, topics
from campaigns.models import Campaign, Shard
from delivery import broker as broker_queues
from delivery import idempotency, leases

logger = logging.getLogger(__name__)

LOCK_KEY = "pushsvc:lock:shard-recovery"
ORPHAN_LOCK_KEY = "pushsvc:lock:shard-orphans"
BROKER_MARK_KEY = "pushsvc:broker-mark"  # in the broker's database: its absence means it lost its data
_BATCH = 1000


def grace_s() -> float:
    return settings.CAMPAIGN_RECOVERY_GRACE_S


def interval_s() -> float:
    return settings.CAMPAIGN_RECOVERY_INTERVAL_S


def republish_lost(client: redis.Redis, broker: redis.Redis | None = None, grace: float | None = None) -> int:
    """Publish again the pending shards the broker lost (see the module docstring); how many."""
    broker = broker or client  # a Redis broker's database (ignored with RabbitMQ: delivery/broker.py)
    cutoff = timezone.now() - timedelta(seconds=grace_s() if grace is None else grace)
    stalled = (
        Shard.objects.filter(
            status=Shard.Status.PENDING,
            campaign__status=Campaign.Status.RUNNING,
        )
        .filter(Q(not_before__lte=cutoff) | Q(not_before__isnull=True, created_at__lte=cutoff))
        .order_by("id")
        .values_list("id", "queue", "lane")
    )
    published = 0
    empty: dict[str, bool] = {}
    after = 0
    while True:
        rows = list(stalled.filter(id__gt=after)[:_BATCH])
        if not rows:
            if published:
                logger.warning("recovery: published %s pending shard(s) the broker had lost", published)
            return published
        after = rows[-1][0]
        pipe = client.pipeline(transaction=False)
        for shard_id, _, _ in rows:
            pipe.exists(idempotency.lease_key(shard_id))
        unleased = [row for row, leased in zip(rows, pipe.execute(), strict=True) if not leased]
        unknown = {queue for _, queue, _ in unleased} - empty.keys()
        if unknown:
            empty.update((q, n == 0) for q, n in broker_queues.ready_counts(unknown, broker).items())
        for shard_id, queue, lane in unleased:
            if empty[queue]:
                publish.shard(shard_id, queue, lane)
                published += 1


def orphan_interval_s() -> float:
    return settings.CAMPAIGN_RECOVERY_ORPHAN_INTERVAL_S


def republish_orphans(client: redis.Redis) -> int:
    """Publish again the pending shards whose run died holding the lease (see the module
    docstring); how many. Entries of shards no longer pending are forgotten; those of a campaign
    that is not running are kept until it runs again."""
    found = leases.orphans(client)
    if not found:
        return 0
    pending = dict(
        Shard.objects.filter(
            pk__in=[shard_id for shard_id, _ in found], status=Shard.Status.PENDING
        ).values_list("id", "campaign__status")
    )
    routes = {
        pk: (queue, lane)
        for pk, queue, lane in Shard.objects.filter(pk__in=list(pending)).values_list("id", "queue", "lane")
    }
    published = 0
    for shard_id, token in found:
        status = pending.get(shard_id)
        if status is not None and status != Campaign.Status.RUNNING:
            continue  # paused or halted: published again when it runs (this sweep, then)
        # Forget first: a run that took the shard meanwhile re-registered it under its own token.
        if leases.forget(client, shard_id, token) and status is not None:
            publish.shard(shard_id, *routes[shard_id])
            published += 1
    if published:
        logger.warning("recovery: published %s shard(s) whose run died (lease ran out)", published)
    return published


def sweep_orphans(client: redis.Redis) -> int:
    """`republish_orphans`, and everything pending if the broker lost its data; at most once per
    orphan interval across all callers."""
    if not client.set(ORPHAN_LOCK_KEY, "1", nx=True, px=max(int(orphan_interval_s() * 1000), 100)):
        return 0
    published = republish_orphans(client)
    if settings.BROKER_IS_RABBITMQ:
        # The mark lives in a Redis broker's database. RabbitMQ keeps its quorum queues on disk
        # through a restart; queues that lost messages anyway (purged, deleted, a node rebuilt) are
        # found empty by `republish_lost` after the grace.
        return published
    return published + _after_broker_loss(client, _broker_client() or client)


def _after_broker_loss(client: redis.Redis, broker: redis.Redis) -> int:
    """The mark lives in the broker's database: gone means a restart without persistence or a flush
    emptied it, and every message with it (a fresh broker looks the same). The grace exists for
    messages that may still be queued; there are none, so what is pending, due and unleased is
    published without it, one lease period after the loss was seen: the runs in progress lost
    their leases too and, at their next checkpoint, record what they sent (REDIS_LOST) before a
    re-run could take their shard and resend it blind (the idempotency bitmap went as well)."""
    mark = broker.get(BROKER_MARK_KEY)
    if mark is None:
        broker.set(BROKER_MARK_KEY, f"emptied:{time.time()}", nx=True)
        logger.warning("recovery: the broker's database is new or was emptied; pending work follows shortly")
        return 0
    if not mark.startswith(b"emptied:") or time.time() - float(mark[8:]) < settings.CAMPAIGN_SHARD_LEASE_S:
        return 0
    broker.set(BROKER_MARK_KEY, "ok")
    published = (
        replan_lost(client, grace=0)
        + republish_lost(client, broker, grace=0)
        + topics.republish_unanswered(client)
    )
    logger.warning("recovery: published %s task(s) again after the broker lost its data", published)
    return published


def replan_lost(client: redis.Redis, grace: float | None = None) -> int:
    """Publish the planning task again for started campaigns whose planner is gone; how many."""
    cutoff = timezone.now() - timedelta(seconds=grace_s() if grace is None else grace)
    unplanned = list(
        Campaign.objects.filter(
            planned=False,
            started_at__lte=cutoff,
            status__in=(Campaign.Status.RUNNING, Campaign.Status.PAUSED, Campaign.Status.HALTED),
        )
        # A canary sample out or being judged needs no planner (its decision publishes one), nor
        # does a failed canary until an operator resumes the campaign (campaigns/canary.py).
        .exclude(canary_phase__in=canary.NO_PLANNER)
        .exclude(Q(canary_phase=Campaign.CanaryPhase.FAILED) & ~Q(status=Campaign.Status.RUNNING))
        .values_list("id", flat=True)[:_BATCH]
    )
    pipe = client.pipeline(transaction=False)
    for campaign_id in unplanned:
        pipe.exists(idempotency.plan_lease_key(campaign_id))
    lost = [campaign_id for campaign_id, leased in zip(unplanned, pipe.execute(), strict=True) if not leased]
    for campaign_id in lost:
        publish.plan(campaign_id)
    if lost:
        logger.warning("recovery: planning again %s campaign(s) whose planner was lost", len(lost))
    return len(lost)


def sweep(client: redis.Redis) -> int:
    """`replan_lost` and `republish_lost`, at most once per interval across all callers; how many
    tasks were published again."""
    orphaned = sweep_orphans(client)
    if not client.set(LOCK_KEY, "1", nx=True, ex=max(int(interval_s()), 1)):
        return orphaned
    # Canary decisions whose wait is over: the wait is a stored deadline, not a sleeping worker.
    decided = len(canary.decide_due(client))
    return orphaned + decided + replan_lost(client) + republish_lost(client, _broker_client())


@functools.cache
def _broker_client() -> redis.Redis | None:
    url = settings.CELERY_BROKER_URL
    if url == settings.REDIS_URL or settings.BROKER_IS_RABBITMQ:
        return None
    return redis.Redis.from_url(url)


def start_sweeper() -> threading.Thread:
    """A daemon thread that sweeps for the life of the process (a worker's main process: its pool
    children run tasks, this one only supervises). It ticks at the orphan interval; the full sweep's
    lock keeps that one to its own interval."""
    from delivery import runtime

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(min(orphan_interval_s(), interval_s())):
            try:
                sweep(runtime.redis_client())
            except Exception as exc:  # Redis or the database away: the next round tries again
                logger.info("recovery sweep skipped: %s", type(exc).__name__)
            finally:
                # This thread's own connection, closed between sweeps: a pool child forked from
                # this process meanwhile must not inherit an open one.
                connection.close()

    thread = threading.Thread(target=loop, name="shard-recovery", daemon=True)
    thread.start()
    return thread
