"""Fan-out: a campaign becomes shards, a shard becomes provider requests.

launch (API or beat) -> `plan` (a task on `default`) -> one `send_shard` task per shard on the
provider's queue -> each shard records its results (campaigns/ledger.py); the shard whose
transaction brings the campaign's `outstanding` to 0 completes it. Retried and held devices
become follow-up shards of the same campaign, so completion waits for them too.

Planning never holds the segment: per platform it walks the fan-out index
(app, platform, is_active, id) with a keyset (`id > lo ... OFFSET size-1 LIMIT 1`), which reads
~size index entries to find each shard's upper bound, and writes shards in batches. A shard is
`(platform, lo, hi]` in the database and its id in the broker message.

A shard loads its devices with one query, drops those the campaign already finished
(delivery/idempotency.py), and sends them chunk by chunk over the worker's warm provider.
Between chunks it checks the campaign's control flag and takes its share of the rate limits,
in one pipelined round trip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import NamedTuple

import redis
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Max, QuerySet
from django.utils import timezone

from campaigns import control, publish
from campaigns.guard import HOLD, PASSED, PruneGuard, describe
from campaigns.ledger import Device, ShardResults, apply_shard_run
from campaigns.models import Campaign, Shard
from delivery import breaker, idempotency, runtime
from delivery.payload import PushMessage
from delivery.providers.base import Outcome, Result, Target
from delivery.providers.registry import provider_class
from delivery.ratelimit import NO_REPORT, Report, TokenBucket, campaign_key, provider_key, rollout_rate
from pushsvc import logging as log_context
from pushsvc import metrics
from tokens import hygiene
from tokens.invalidation import PROVIDER_BY_PLATFORM
from tokens.models import DeviceToken, Platform

logger = logging.getLogger(__name__)

PRIORITY_QUEUE = "priority"
PLAN_BATCH = 100  # shards written and enqueued per transaction while planning
PLAN_PUBLISHERS = 4  # threads publishing shard tasks while the planner scans on
PLAN_LEASE_S = 60  # refreshed per batch of PLAN_BATCH shards (a second or two of scanning)
REDIS_LOST = "redis_lost"  # _send stopped because Redis failed: record what was sent, then retry
DEFERRED = "deferred"  # _send stopped: the provider's breaker is open or its bucket in debt: re-queue later
LEASE_LOST = "lease_lost"  # _send stopped: another run owns the shard now; record nothing more
LEASE_RECHECK_S = 5  # a shard found leased by another run is looked at again after this long
THROTTLE_REASONS = frozenset({"TooManyRequests", "QUOTA_EXCEEDED"})  # APNs, FCM (also on 429)
_VERSION_RE = r"^[0-9]{1,9}(\.[0-9]{1,9}){0,3}$"


# --- targeting ---------------------------------------------------------------------------------
def target_queryset(campaign: Campaign) -> QuerySet[DeviceToken]:
    """The campaign's active devices (all platforms); see Campaign.target for the keys."""
    qs = DeviceToken.objects.filter(app_id=campaign.app_id, is_active=True)
    target = campaign.target or {}
    if target.get("platforms"):
        qs = qs.filter(platform__in=target["platforms"])
    if target.get("user_ids"):
        qs = qs.filter(user_id__in=target["user_ids"])
    if target.get("device_ids"):
        qs = qs.filter(device_id__in=target["device_ids"])
    if target.get("active_within_days"):
        # Fixed at the campaign's start so every shard applies the same cut.
        since = (campaign.started_at or timezone.now()) - timedelta(days=int(target["active_within_days"]))
        qs = qs.filter(last_seen__gte=since)
    for key, op in (("min_app_version", ">="), ("max_app_version", "<=")):
        if target.get(key):
            # Numeric, component-wise (2.10 > 2.9). Versions that are not dotted numbers never match.
            qs = qs.extra(
                where=[
                    f"(CASE WHEN app_version ~ %s THEN string_to_array(app_version, '.')::int[] END) "
                    f"{op} %s::int[]"
                ],
                params=[_VERSION_RE, [int(p) for p in str(target[key]).split(".")]],
            )
    return qs


def target_platforms(campaign: Campaign) -> list[str]:
    wanted = (campaign.target or {}).get("platforms") or [p.value for p in Platform]
    return [p for p in Platform.values if p in wanted]


def queue_for(campaign: Campaign, platform: str) -> str:
    if campaign.kind == Campaign.Kind.DIRECT:
        return PRIORITY_QUEUE
    return provider_class(platform).queue


# --- enqueueing --------------------------------------------------------------------------------
def launch(campaign: Campaign) -> None:
    """Start a draft campaign now, or leave it scheduled for beat (see launch_due)."""
    if campaign.send_at and campaign.send_at > timezone.now():
        Campaign.objects.filter(pk=campaign.pk, status=Campaign.Status.DRAFT).update(
            status=Campaign.Status.SCHEDULED
        )
        return
    if control.start(campaign.pk):
        _arm(campaign.pk)
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
            _arm(campaign_id)
            publish.plan(campaign_id)
            launched.append(campaign_id)
    return launched


def _arm(campaign_id: int, state: str = control.RUNNING) -> None:
    client = runtime.redis_client()
    control.reset_keys(client, campaign_id)
    control.set_flag(client, campaign_id, state)


# --- planning ----------------------------------------------------------------------------------
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


def _plan_leased(client, campaign: Campaign, lease: str) -> None:
    campaign_id = campaign.pk
    size = settings.CAMPAIGN_SHARD_SIZE
    base = target_queryset(campaign)
    if campaign.stale_at_launch is None:
        _record_stale_share(campaign, base)
    # Publishing a task is a few broker round trips: threads publish batch n while this thread
    # scans and writes batch n+1, so planning runs at the speed of the keyset scan.
    with ThreadPoolExecutor(max_workers=PLAN_PUBLISHERS, thread_name_prefix="plan-publish") as pool:
        published: list[Future[None]] = []
        cancelled = False
        # A re-run after a crash: shards written but maybe never published go out again (a shard
        # already queued runs once anyway: leases and its status make the second message a no-op).
        unsent = Shard.objects.filter(campaign_id=campaign_id, is_child=False, status=Shard.Status.PENDING)
        published.append(pool.submit(_publish, list(unsent.values_list("pk", "queue"))))
        for platform in target_platforms(campaign):
            queue = queue_for(campaign, platform)
            done_upto = (
                Shard.objects.filter(campaign_id=campaign_id, platform=platform, is_child=False).aggregate(
                    hi=Max("hi")
                )["hi"]
                or 0
            )
            batch: list[Shard] = []
            for lo, hi, n in iter_ranges(base.filter(platform=platform), size, done_upto):
                batch.append(
                    Shard(campaign_id=campaign_id, platform=platform, queue=queue, lo=lo, hi=hi, planned=n)
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
    client,
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
    published.append(pool.submit(_publish, [(shard.pk, shard.queue) for shard in batch]))
    return True


def _publish(shards: list[tuple[int, str]]) -> None:
    for shard_id, queue in shards:
        publish.shard(shard_id, queue)


def plan_direct(campaign: Campaign) -> int:
    """Plan a direct send in the request: its devices (at most 10,000) as list shards on the
    priority queue. Returns the number of devices targeted."""
    size = settings.CAMPAIGN_SHARD_SIZE
    rows = list(target_queryset(campaign).order_by("platform", "id").values_list("platform", "id"))
    by_platform: dict[str, list[int]] = {}
    for platform, pk in rows:
        by_platform.setdefault(platform, []).append(pk)
    shards = [
        Shard(
            campaign_id=campaign.pk,
            platform=platform,
            queue=PRIORITY_QUEUE,
            device_ids=ids[i : i + size],
            planned=len(ids[i : i + size]),
        )
        for platform, ids in by_platform.items()
        for i in range(0, len(ids), size)
    ]
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
    _arm(campaign.pk, control.RUNNING if shards else Campaign.Status.COMPLETED)
    for shard in shards:
        publish.shard(shard.pk, shard.queue)
    return len(rows)


# --- sending -----------------------------------------------------------------------------------
def _load(shard: Shard, campaign: Campaign) -> list[Device]:
    if shard.is_range:
        qs = target_queryset(campaign).filter(platform=shard.platform, id__gt=shard.lo, id__lte=shard.hi)
    else:
        qs = DeviceToken.objects.filter(
            app_id=campaign.app_id, platform=shard.platform, is_active=True, id__in=shard.device_ids
        )
    rows = qs.order_by("id").values_list(
        "id", "token", "web_p256dh", "web_auth", "device_id", "app_version", "locale"
    )
    return [Device(*row) for row in rows]


def run_shard(shard_id: int) -> None:
    shard = Shard.objects.select_related("campaign__app").filter(pk=shard_id).first()
    if shard is None or shard.status != Shard.Status.PENDING:
        return  # already recorded (a redelivery), parked or cancelled
    campaign = shard.campaign
    log_context.bind(campaign=campaign.pk, shard=shard.pk, provider=shard.platform)  # pushsvc/logging.py
    client = runtime.redis_client()
    state = control.current_state(client, campaign.pk)
    if state != control.RUNNING:
        _park(client, shard, state)
        return

    token = uuid.uuid4().hex
    busy_for = idempotency.acquire_lease(
        client, idempotency.lease_key(shard.pk), token, settings.CAMPAIGN_SHARD_LEASE_S
    )
    if busy_for:
        # Another run holds the shard (or died holding it): look again shortly; a live holder
        # finishes or parks it, a dead one's lease runs out.
        publish.shard(shard.pk, shard.queue, countdown=min(busy_for, LEASE_RECHECK_S))
        return
    try:
        _run_leased(client, shard, campaign, token)
    finally:
        # Redis away: the lease expires on its own (or went with the restart).
        with contextlib.suppress(redis.RedisError):
            idempotency.release_lease(client, idempotency.lease_key(shard.pk), token)


def _run_leased(client, shard: Shard, campaign: Campaign, token: str) -> None:
    shard.refresh_from_db(fields=["status", "lo", "device_ids", "loaded", "expires_at"])
    if shard.status != Shard.Status.PENDING:
        return  # the run that held the lease before us finished or parked it
    devices = _load(shard, campaign)
    first_run = not shard.is_child and shard.loaded is None
    # Delivered by an earlier run that died before recording them (delivery/idempotency.py).
    already = idempotency.finished(client, campaign.pk, [d.pk for d in devices])
    todo = [d for d in devices if d.pk not in already]
    results = ShardResults(
        attempt=shard.attempt,
        max_attempts=settings.CAMPAIGN_MAX_ATTEMPTS,
        deadline=int(shard.expires_at.timestamp()) if shard.expires_at else None,
        answers=[] if campaign.kind == Campaign.Kind.DIRECT else None,
    )
    park: str | None = None
    done_upto = 0
    defer_s = 0.0
    if results.deadline is not None and time.time() >= results.deadline:
        results.expire(todo)  # a retry whose message's TTL ran out while it waited: never sent
        todo = []
    if todo:
        park, done_upto, defer_s = _send(client, shard, campaign, todo, results, token)
    if park == LEASE_LOST:
        # Another run owns the shard now (this one stalled past its lease). What this run delivered
        # is in the bitmap, so that run counts it; its other answers that run sends again.
        logger.warning(
            "shard %s: lease lost after %d of %d devices; this run sends and records nothing more",
            shard.pk,
            done_upto,
            len(todo),
        )
        return

    rest_lo: int | None = None
    rest_ids: list[int] | None = None
    if park is not None:
        rest_lo = todo[done_upto - 1].pk if done_upto else shard.lo
        rest_ids = [d.pk for d in todo[done_upto:]]
        if shard.is_range:
            # Those beyond the new lower bound are met (and counted) again on resume.
            already = {pk for pk in already if pk <= rest_lo}
    results.recover(already)
    applied = apply_shard_run(
        shard,
        results,
        loaded=len(devices) if first_run else None,
        park=Shard.Status.PENDING if park in (REDIS_LOST, DEFERRED) else park,
        rest_lo=rest_lo,
        rest_ids=rest_ids,
        defer_s=defer_s,
    )
    if park == REDIS_LOST:
        # What was sent is recorded and the shard stays pending after it, so the re-run does not
        # depend on the idempotency bitmap (a Redis restart without persistence loses it). Its
        # follow-ups are rows; the recovery sweep publishes them if this worker cannot.
        raise redis.ConnectionError(f"Redis failed during shard {shard.pk}; sent part recorded")
    if not applied.recorded:
        return
    # Answered sends and invalid answers per provider: flags a campaign whose first sends are
    # mostly invalid (a bad import, the wrong APNs environment). Shown on the campaign API.
    hygiene.record_sends(
        campaign.pk,
        PROVIDER_BY_PLATFORM.get(shard.platform, shard.platform),
        results.sent,
        len(results.invalid) + results.held_invalid,
        client=client,
    )
    for follow_up, queue, delay in applied.follow_ups:
        publish.shard(follow_up, queue, countdown=delay)
    if park == DEFERRED:
        publish.shard(shard.pk, shard.queue, countdown=defer_s)
    if applied.completed:
        control.set_flag(client, campaign.pk, Campaign.Status.COMPLETED)
        idempotency.expire(client, campaign.pk)
        logger.info("campaign %s completed", campaign.pk)
    elif applied.halted_reason:
        control.set_flag(client, campaign.pk, control.HALTED)
        logger.warning("campaign %s %s", campaign.pk, applied.halted_reason)
    if park == control.PAUSED or results.held:
        _requeue_if_resumed(client, campaign.pk, shard.pk if park else None)


def _send(
    client, shard: Shard, campaign: Campaign, todo: list[Device], results: ShardResults, lease: str
) -> tuple[str | None, int, float]:
    """Send `todo` chunk by chunk; (why it stopped early or None, how many devices it finished,
    seconds to defer the rest by when the provider's breaker is open or its bucket is in debt).

    Every chunk goes only after a checkpoint found the campaign running and the lease still this
    run's; a wait longer than BREAKER_SLEEP_MAX_S is never slept (a sleeping run could outlive its
    lease): the shard is deferred instead and its reserved tokens go back to the bucket."""
    message = PushMessage.from_dict(campaign.message)
    provider = runtime.provider_for(campaign.app, shard.platform)
    bucket = TokenBucket(client)
    guard = PruneGuard(client)
    circuit = breaker.Breaker(client)
    provider_rate = float(settings.PUSH_RATE_LIMITS.get(shard.platform, 0) or 0)
    chunk_size = max(settings.CAMPAIGN_CHUNK_SIZE, 1)
    web = shard.platform == Platform.WEB
    guard_armed = not campaign.prune_confirmed
    # Only first sends of a broadcast can show provider-wide throttling (delivery/ratelimit.py).
    sample = shard.attempt == 0 and not shard.is_child and campaign.kind == Campaign.Kind.BROADCAST
    # The previous chunk's rate report and its breaker report ride on the next checkpoint
    # (delivery/ratelimit.py, delivery/breaker.py); the last chunk's go out on their own.
    rate_report = NO_REPORT
    report: tuple[str, float] = ("", 0.0)
    start = 0
    try:
        while start < len(todo):
            reserved = len(todo[start : start + chunk_size])
            try:
                point = _checkpoint(
                    client,
                    bucket,
                    circuit,
                    campaign,
                    shard,
                    provider_rate,
                    reserved,
                    lease,
                    rate_report,
                    report,
                )
                rate_report, report = NO_REPORT, ("", 0.0)
                verdict = point.verdict
                if not point.leased or point.state != control.RUNNING:
                    if verdict.action == breaker.PROBE:
                        report = (breaker.RELEASE, 0.0)
                    _refund(bucket, campaign, shard, provider_rate, reserved)
                    if not point.leased:
                        return LEASE_LOST, start, 0.0
                    return (
                        (control.CANCELLED if point.state == control.CANCELLED else control.PAUSED),
                        start,
                        0.0,
                    )
                size = settings.BREAKER_PROBE_SIZE if verdict.action == breaker.PROBE else chunk_size
                chunk = todo[start : start + size] if verdict.action != breaker.WAIT else []
                if verdict.action == breaker.WAIT or point.wait > settings.BREAKER_SLEEP_MAX_S:
                    _refund(bucket, campaign, shard, provider_rate, reserved)
                else:
                    _refund(bucket, campaign, shard, provider_rate, reserved - len(chunk))
                if verdict.action == breaker.WAIT:
                    stop = _wait_for_breaker(client, campaign, shard, verdict)
                    if stop == DEFERRED:
                        return stop, start, _spread(verdict.wait_s)
                    if stop is not None:
                        return stop, start, 0.0
                    continue
                if point.wait > settings.BREAKER_SLEEP_MAX_S:
                    if verdict.action == breaker.PROBE:
                        report = (breaker.RELEASE, 0.0)
                    return DEFERRED, start, _spread(point.wait)
                if point.wait > 0:
                    time.sleep(point.wait)
                    stop = _still_ours(client, campaign, shard, lease)
                    if stop is not None:
                        if verdict.action == breaker.PROBE:
                            report = (breaker.RELEASE, 0.0)
                        return stop, start, 0.0
            except redis.RedisError:
                return REDIS_LOST, start, 0.0
            if results.deadline is None and message.ttl is not None:
                results.deadline = int(time.time()) + message.ttl  # fixed at the shard's first send
            targets = [
                Target(
                    device_id=d.pk,
                    token=d.token,
                    p256dh=d.p256dh if web else "",
                    auth=d.auth if web else "",
                    locale=d.locale,
                )
                for d in chunk
            ]
            sent_at = time.monotonic()
            answers = runtime.run(provider.send_many(targets, _remaining(message, results.deadline)))
            metrics.observe_chunk(shard.platform, time.monotonic() - sent_at)  # pushsvc/metrics.py
            if logger.isEnabledFor(logging.DEBUG):
                for answer in answers:
                    logger.debug(
                        "device %s: %s %s %s id=%s",
                        answer.target.device_id,
                        answer.outcome,
                        answer.status,
                        answer.reason,
                        answer.provider_message_id,
                    )
            invalid = sum(1 for a in answers if a.outcome == Outcome.INVALID_TOKEN)
            rate_report = _rate_report(answers, sample)
            # A retry shard's devices failed before: a biased sample that must not open the breaker
            # for the whole app (a few devices a provider keeps failing are dead-lettered instead).
            # Its probe, and first sends, speak for the provider.
            probe = verdict.action == breaker.PROBE
            outage = (probe or shard.attempt == 0) and breaker.is_outage(answers, probe=probe)
            report = (breaker.OK, 0.0)
            if outage:
                report = (breaker.FAIL, max((a.retry_after or 0.0 for a in answers), default=0.0))
            hold_invalid = False
            redis_lost = False
            if guard_armed:
                try:
                    guard_verdict = guard.observe(campaign.pk, shard.platform, len(answers), invalid)
                except redis.RedisError:
                    guard_verdict, redis_lost = (
                        PASSED,
                        True,
                    )  # the answers are in hand: record them, then stop
                hold_invalid = guard_verdict == HOLD
                guard_armed = guard_verdict != PASSED
            delivered = results.add(chunk, answers, hold_invalid=hold_invalid and invalid > 0, outage=outage)
            start += len(chunk)
            try:
                if redis_lost:
                    raise redis.ConnectionError("prune guard unreachable")
                idempotency.mark_finished(client, campaign.pk, delivered)
            except redis.RedisError:
                return REDIS_LOST, start, 0.0
            if hold_invalid and invalid:
                reason = next(a.reason for a in answers if a.outcome == Outcome.INVALID_TOKEN)
                control.pause(client, campaign.pk, describe(shard.platform, invalid, len(answers), reason))
            if results.auth_reason:
                control.pause(
                    client,
                    campaign.pk,
                    f"Provider credentials rejected ({shard.platform}: {results.auth_reason}). "
                    "No token was changed; fix the app's credentials and resume.",
                )
                return control.PAUSED, start, 0.0
        return None, len(todo), 0.0
    finally:
        _last_reports(bucket, circuit, campaign, shard, provider_rate, lease, rate_report, report)


def _remaining(message: PushMessage, deadline: int | None) -> PushMessage:
    """The message as this chunk sends it: with a TTL, the seconds left until the deadline fixed at
    the first send (and the deadline itself, which APNs takes as apns-expiration). TTL 0 stays 0."""
    if deadline is None or not message.ttl:
        return message
    return dataclasses.replace(message, ttl=max(deadline - int(time.time()), 1), expires_at=deadline)


def _spread(wait_s: float) -> float:
    """Deferred shards must not all wake together: spread them over a few seconds."""
    return wait_s + random.uniform(0, min(wait_s / 2, 5.0))


def _still_ours(client, campaign: Campaign, shard: Shard, lease: str) -> str | None:
    """After a short sleep, before sending: None if the campaign runs and the lease is this run's."""
    pipe = client.pipeline(transaction=False)
    pipe.get(control.flag_key(campaign.pk))
    idempotency.refresh_lease(pipe, idempotency.lease_key(shard.pk), lease, settings.CAMPAIGN_SHARD_LEASE_S)
    flag, leased = pipe.execute()
    if not leased:
        return LEASE_LOST
    state = flag.decode() if flag is not None else control.current_state(client, campaign.pk)
    if state != control.RUNNING:
        return control.CANCELLED if state == control.CANCELLED else control.PAUSED
    return None


def _last_reports(
    bucket: TokenBucket,
    circuit: breaker.Breaker,
    campaign: Campaign,
    shard: Shard,
    provider_rate: float,
    lease: str,
    rate_report: Report,
    report: tuple[str, float],
) -> None:
    """The last chunk's rate and breaker reports, which had no next checkpoint to ride on.
    Best effort: with Redis away they are lost, and the bucket and breaker heal on their own."""
    with contextlib.suppress(redis.RedisError):
        if rate_report != NO_REPORT:
            bucket.reserve(
                provider_key(campaign.app_id, shard.platform),
                provider_rate,
                0,
                adaptive=True,
                report=rate_report,
            )
        if report[0]:
            circuit.report(campaign.app_id, shard.platform, lease, *report)


def _wait_for_breaker(client, campaign: Campaign, shard: Shard, verdict: breaker.Verdict) -> str | None:
    """The provider's breaker is open: None after waiting a short while in place (the caller asks
    again), DEFERRED when the wait is long (the shard is re-queued for then, freeing the worker
    for other apps' shards), PAUSED when the provider has been down for BREAKER_PAUSE_AFTER_S."""
    pause_after = settings.BREAKER_PAUSE_AFTER_S
    if pause_after and verdict.down_for_s >= pause_after:
        control.pause(
            client,
            campaign.pk,
            f"Provider {shard.platform} has failed every request (server errors or no answer) for "
            f"{verdict.down_for_s:.0f} s. No token was changed; resume when it answers again.",
        )
        return control.PAUSED
    if verdict.wait_s > settings.BREAKER_SLEEP_MAX_S:
        return DEFERRED
    time.sleep(verdict.wait_s)  # the probe's answer or the breaker's reopening, due within this
    return None


def _refund(bucket: TokenBucket, campaign: Campaign, shard: Shard, provider_rate: float, n: int) -> None:
    """Tokens reserved at the checkpoint for sends the breaker held back."""
    if n <= 0:
        return
    bucket.refund(provider_key(campaign.app_id, shard.platform), provider_rate, n, adaptive=True)
    if campaign.rollout_start_rate or campaign.rollout_max_rate:
        bucket.refund(campaign_key(campaign.pk), _rollout_now(campaign), n)


def _rate_report(answers: list[Result], sample: bool) -> Report:
    """The chunk's report for the provider's adaptive bucket: what it accepted, and, when the
    chunk can speak for the provider (`sample`: first sends of a broadcast), its 429s. The bucket
    decides from many chunks whether the provider throttles the app or a few devices were pushed
    too often (delivery/ratelimit.py)."""
    accepted = sum(1 for a in answers if a.outcome not in (Outcome.RETRY, Outcome.AUTH_FAILURE))
    if not sample:
        return Report(accepted=accepted)
    hits = [
        a
        for a in answers
        if a.outcome == Outcome.RETRY and (a.status == 429 or a.reason.split(":", 1)[0] in THROTTLE_REASONS)
    ]
    return Report(
        throttled=len(hits),
        answered=len(answers),
        retry_after=max((a.retry_after or 0.0 for a in hits), default=0.0),
        accepted=accepted,
    )


class Checkpoint(NamedTuple):
    state: str  # the campaign's state as the shards see it
    leased: bool  # the lease is still this run's
    wait: float  # seconds before the reserved tokens may be used
    verdict: breaker.Verdict


def _checkpoint(
    client,
    bucket: TokenBucket,
    circuit: breaker.Breaker,
    campaign: Campaign,
    shard: Shard,
    provider_rate: float,
    n: int,
    lease: str,
    rate_report: Report = NO_REPORT,
    report: tuple[str, float] = ("", 0.0),
) -> Checkpoint:
    """Between two chunks, in one round trip: the campaign's control flag, the shard's lease
    (refreshed only if still ours), the provider's breaker (told how the previous chunk went), and
    `n` tokens from the provider's and the rollout's buckets; the provider's bucket also hears the
    previous chunk's rate report."""
    pipe = client.pipeline(transaction=False)
    pipe.get(control.flag_key(campaign.pk))
    idempotency.refresh_lease(pipe, idempotency.lease_key(shard.pk), lease, settings.CAMPAIGN_SHARD_LEASE_S)
    circuit.queue_check(pipe, campaign.app_id, shard.platform, lease, *report)
    bucket.queue_reserve(
        pipe,
        provider_key(campaign.app_id, shard.platform),
        provider_rate,
        n,
        adaptive=True,
        report=rate_report,
    )
    if campaign.rollout_start_rate or campaign.rollout_max_rate:
        bucket.queue_reserve(pipe, campaign_key(campaign.pk), _rollout_now(campaign), n)
    flag, leased, verdict, *waits = pipe.execute()
    state = flag.decode() if flag is not None else control.current_state(client, campaign.pk)
    return Checkpoint(
        state, bool(leased), max((float(w) for w in waits), default=0.0), breaker.parse(verdict)
    )


def _rollout_now(campaign: Campaign) -> float:
    now = timezone.now()
    return rollout_rate(
        campaign.rollout_start_rate,
        campaign.rollout_max_rate,
        campaign.rollout_ramp_minutes,
        campaign.started_at or now,
        now,
    )


SHARD_MAX_FAILURES = 3  # runs of one shard that may raise before its campaign halts


def shard_failed(shard_id: int, exc: BaseException) -> bool:
    """A run of the shard raised something no retry policy expects (a bug, data the code cannot
    handle). Counted on the shard; the third time the shard is parked and its campaign halted with
    the error, instead of the recovery sweep re-publishing it forever. Other campaigns, of this app
    or another, go on. True when the campaign was halted."""
    error = f"{type(exc).__name__}: {exc}"[:500]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Shard._meta.db_table} SET failures = failures + 1, last_error = %s "
            "WHERE id = %s AND status = %s RETURNING failures, campaign_id",
            [error, shard_id, Shard.Status.PENDING],
        )
        row = cursor.fetchone()
    if row is None or row[0] < SHARD_MAX_FAILURES:
        return False
    failures, campaign_id = row
    Shard.objects.filter(pk=shard_id, status=Shard.Status.PENDING).update(status=Shard.Status.PAUSED)
    reason = (
        f"Halted: shard {shard_id} failed {failures} times with {error}. "
        "Its devices are held; resume to try it again."
    )
    halted = control.pause(runtime.redis_client(), campaign_id, reason, to=control.HALTED)
    logger.error("shard %s failed %s times: %s", shard_id, failures, error)
    return halted


def _park(client, shard: Shard, state: str) -> None:
    status = Shard.Status.CANCELLED if state == control.CANCELLED else Shard.Status.PAUSED
    if state == Campaign.Status.COMPLETED:
        status = Shard.Status.CANCELLED  # cannot happen with outstanding bookkeeping; be safe
    Shard.objects.filter(pk=shard.pk, status=Shard.Status.PENDING).update(status=status)
    if status == Shard.Status.PAUSED:
        _requeue_if_resumed(client, shard.campaign_id, shard.pk)


def _requeue_if_resumed(client, campaign_id: int, shard_id: int | None) -> None:
    """A resume may have run between our flag check and parking: hand parked work back."""
    if control.current_state(client, campaign_id) != control.RUNNING:
        return
    for follow_up, queue in control.unpark_shards(campaign_id, shard_id):
        publish.shard(follow_up, queue)


def progress(campaign: Campaign) -> dict[str, object]:
    """Rate (deliveries/s since start) and ETA for the API and the admin."""
    now = timezone.now()
    end = campaign.finished_at or now
    elapsed = (end - campaign.started_at).total_seconds() if campaign.started_at else 0.0
    done = campaign.processed
    rate = done / elapsed if elapsed > 0 else 0.0
    remaining = max(campaign.targeted - done, 0)
    eta = None
    if campaign.status == Campaign.Status.RUNNING and rate > 0:
        eta = (now + timedelta(seconds=remaining / rate)).isoformat()
    return {"elapsed_s": round(elapsed, 3), "rate_per_s": round(rate, 1), "remaining": remaining, "eta": eta}
