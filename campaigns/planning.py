"""Planning: a campaign becomes shards, each a row before it is a broker message.

`launch` (API, admin, beat's `launch_due`) starts a campaign and publishes its planning task;
`plan` walks the fan-out index (app, platform, is_active, id) per platform with a keyset
(`id > lo ... OFFSET size-1 LIMIT 1`: ~size index entries read per shard's upper bound) and writes
shards `(platform, lo, hi]` in batches while threads publish them. A direct send is planned in
the request instead (`plan_direct`: list shards on the priority queue).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import F, Max, QuerySet, Sum
from django.utils import timezone

from campaigns import canary, control, publish
from campaigns.models import Campaign, Shard
from campaigns.targeting import list_shards, queue_for, target_platforms, target_queryset
from delivery import idempotency, runtime
from tokens import hygiene
from tokens.models import DeviceToken

logger = logging.getLogger(__name__)

PLAN_BATCH = 100  # shards written and enqueued per transaction while planning
PLAN_PUBLISHERS = 4  # threads publishing shard tasks while the planner scans on
PLAN_LEASE_S = 60  # refreshed per batch of PLAN_BATCH shards (a second or two of scanning)


def launch(campaign: Campaign) -> None:
    """Start a draft campaign now, or leave it scheduled for beat (see launch_due)."""
    if campaign.send_at and campaign.send_at > timezone.now():
        Campaign.objects.filter(pk=campaign.pk, status=Campaign.Status.DRAFT).update(
            status=Campaign.Status.SCHEDULED
        )
        return
    if control.start(campaign.pk):
        control.arm(runtime.redis_client(), campaign.pk)
        publish.plan(campaign.pk)


def launch_due() -> list[int]:
    """Start every scheduled campaign whose send_at has passed (run by beat every few seconds).

    Beat rather than a broker ETA: an ETA message waits unacknowledged in a worker and comes back
    after the visibility timeout, so a campaign scheduled hours ahead would be planned twice.
    """
    launched = []
    due = Campaign.objects.filter(status=Campaign.Status.SCHEDULED, send_at__lte=timezone.now())
    for campaign_id in due.values_list("id", flat=True)[:100]:
        if control.start(campaign_id):  # conditional: two beats cannot both start it
            control.arm(runtime.redis_client(), campaign_id)
            publish.plan(campaign_id)
            launched.append(campaign_id)
    return launched


def iter_ranges(qs: QuerySet[DeviceToken], size: int, after: int = 0) -> Iterator[tuple[int, int, int]]:
    """(lo, hi, n): consecutive keyset ranges of `qs` holding `size` rows each (the last: fewer)."""
    lo = after
    while True:
        page = qs.filter(id__gt=lo).order_by("id")
        hi = page.values_list("id", flat=True)[size - 1 : size].first()
        if hi is None:
            tail = page.aggregate(hi=Max("id"))["hi"]
            if tail is not None:
                yield lo, tail, page.count()
            return
        yield lo, hi, size
        lo = hi


def plan(campaign_id: int) -> None:
    """Write and enqueue a running campaign's shards. Safe to run again after a crash: it
    continues after the highest range already planned per platform. One planner at a time holds
    the campaign's plan lease; a planner whose process died is started again by the recovery
    sweep (campaigns/recovery.py) once its lease has run out."""
    campaign = Campaign.objects.filter(pk=campaign_id).first()
    if campaign is None or campaign.planned or campaign.status in Campaign.FINAL_STATUSES:
        return
    if campaign.status in (Campaign.Status.DRAFT, Campaign.Status.SCHEDULED):
        return
    client = runtime.redis_client()
    lease = uuid.uuid4().hex
    key = idempotency.plan_lease_key(campaign_id)
    if idempotency.acquire_lease(client, key, lease, PLAN_LEASE_S):
        return  # another planner is at work (or died: its lease runs out, then the sweep re-plans)
    try:
        _plan_leased(client, campaign, lease)
    finally:
        with contextlib.suppress(redis.RedisError):
            idempotency.release_lease(client, key, lease)


def _plan_leased(client: redis.Redis, campaign: Campaign, lease: str) -> None:
    campaign_id = campaign.pk
    size = settings.CAMPAIGN_SHARD_SIZE
    if campaign.stale_at_launch is None:
        _record_stale_share(campaign, target_queryset(campaign))
    if not canary.before_planning(campaign):
        return  # the canary sample goes first; its decision publishes planning again (campaigns/canary.py)
    base = canary.rest_of(campaign, target_queryset(campaign))
    # Publishing a task is a few broker round trips: threads publish batch n while this thread
    # scans and writes batch n+1, so planning runs at the speed of the keyset scan.
    with ThreadPoolExecutor(max_workers=PLAN_PUBLISHERS, thread_name_prefix="plan-publish") as pool:
        published: list[Future[None]] = []
        cancelled = False
        # A re-run after a crash: shards written but maybe never published go out again (a shard
        # already queued runs once anyway: leases and its status make the second message a no-op).
        unsent = Shard.objects.filter(campaign_id=campaign_id, is_child=False, status=Shard.Status.PENDING)
        published.append(pool.submit(_publish, list(unsent.values_list("pk", "queue", "lane"))))
        for platform in target_platforms(campaign):
            queue = queue_for(campaign, platform)
            done = Shard.objects.filter(campaign_id=campaign_id, platform=platform, is_child=False).aggregate(
                hi=Max("hi"), planned=Sum("planned")
            )
            # The platform's first CAMPAIGN_HEAD_DEVICES go in the head lane (settings, "Fairness").
            head_left = settings.CAMPAIGN_HEAD_DEVICES - (done["planned"] or 0)
            batch: list[Shard] = []
            for lo, hi, n in iter_ranges(base.filter(platform=platform), size, done["hi"] or 0):
                lane = Shard.Lane.HEAD if head_left > 0 else Shard.Lane.BULK
                head_left -= n
                batch.append(
                    Shard(
                        campaign_id=campaign_id,
                        platform=platform,
                        queue=queue,
                        lane=lane,
                        lo=lo,
                        hi=hi,
                        planned=n,
                    )
                )
                if len(batch) >= PLAN_BATCH:
                    cancelled = not _flush(client, pool, published, campaign_id, batch, lease)
                    batch = []
                    if cancelled:
                        break
            if cancelled or (batch and not _flush(client, pool, published, campaign_id, batch, lease)):
                cancelled = True
                break
        for future in published:
            future.result()  # a failed publish fails the task (retried by Celery; see campaigns/tasks.py)
    if cancelled:
        return
    with transaction.atomic():
        Campaign.objects.filter(pk=campaign_id, planned=False).update(
            planned=True, outstanding=F("outstanding") - 1
        )
    control.complete_if_done(client, campaign_id)


def _record_stale_share(campaign: Campaign, target: QuerySet[DeviceToken]) -> None:
    """Taken here, in the planning task, not in the launch request: one aggregate over the whole
    segment, which can take seconds on millions of devices; still before the first shard is sent."""
    stale = hygiene.stale_share_of(target)
    campaign.stale_at_launch = {
        "target": stale.target,
        "unseen": stale.unseen,
        "days": stale.days,
        "share": round(stale.share, 4),
    }
    Campaign.objects.filter(pk=campaign.pk).update(stale_at_launch=campaign.stale_at_launch)


def _flush(
    client: redis.Redis,
    pool: ThreadPoolExecutor,
    published: list[Future[None]],
    campaign_id: int,
    batch: list[Shard],
    lease: str,
) -> bool:
    """Write a batch of shards, count them outstanding, hand them to the publishers.
    False once the campaign is cancelled, or when another planner owns the plan lease now."""
    if control.current_state(client, campaign_id) == control.CANCELLED:
        return False
    if not idempotency.refresh_lease(client, idempotency.plan_lease_key(campaign_id), lease, PLAN_LEASE_S):
        logger.warning("campaign %s: plan lease lost; this planner stops", campaign_id)
        return False
    with transaction.atomic():
        Shard.objects.bulk_create(batch)
        Campaign.objects.filter(pk=campaign_id).update(
            outstanding=F("outstanding") + len(batch),
            targeted=F("targeted") + sum(s.planned for s in batch),
        )
    published.append(pool.submit(_publish, [(shard.pk, shard.queue, shard.lane) for shard in batch]))
    return True


def _publish(shards: list[tuple[int, str, int]]) -> None:
    for shard_id, queue, lane in shards:
        publish.shard(shard_id, queue, lane)


def plan_direct(campaign: Campaign) -> int:
    """Plan a direct send in the request: its devices (at most 10,000) as list shards on the
    priority queue. Returns the number of devices targeted."""
    rows = list(target_queryset(campaign).order_by("platform", "id").values_list("platform", "id"))
    shards = list_shards(campaign, rows)  # direct: on the priority queue (targeting.queue_for)
    now = timezone.now()
    with transaction.atomic():
        Shard.objects.bulk_create(shards)
        Campaign.objects.filter(pk=campaign.pk).update(
            status=Campaign.Status.RUNNING if shards else Campaign.Status.COMPLETED,
            started_at=now,
            finished_at=None if shards else now,
            planned=True,
            outstanding=len(shards),
            targeted=len(rows),
        )
    control.arm(runtime.redis_client(), campaign.pk, control.RUNNING if shards else Campaign.Status.COMPLETED)
    for shard in shards:
        publish.shard(shard.pk, shard.queue, shard.lane)
    return len(rows)
