"""Topic and condition sends: POST /api/v1/notifications/ with `topic` or `condition`.

The provider (FCM, HMS) fans the message out to the topic's subscribers, so the gateway sends one
request per provider, not one per device. Such a send is a direct campaign like any other (kind
direct, 202, followed with GET /api/v1/campaigns/{id}/): targeted counts one per provider, and
its result per provider, with the provider's message id (FCM message name, HMS requestId), is a
row of GET /api/v1/campaigns/{id}/results/ with a null device_id.

One task per provider on the priority queue (`campaigns.send_topic`), retried on transient
answers with the campaigns' backoff (CAMPAIGN_RETRY_BASE_S .. _MAX_S, at least the provider's
Retry-After) up to CAMPAIGN_MAX_ATTEMPTS, never past the message's TTL. A provider already
answered for the campaign is never sent again (its result row is the record); a lease keeps two
deliveries of one task from sending at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from typing import Any

import redis
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from campaigns import control, publish
from campaigns.models import Campaign, DirectResult
from campaigns.sending.ledger import DEAD_LETTER, EXPIRED, TTL_EXPIRED
from campaigns.sending.policy import retry_delay
from delivery import idempotency, runtime
from delivery.payload import PushMessage, fit_message
from delivery.providers.base import CONDITION, TOPIC, Outcome, Result, Target
from delivery.providers.registry import provider_class
from delivery.topics import FCM_TOPIC_PAYLOAD_LIMIT

logger = logging.getLogger(__name__)

PLATFORMS = ("android", "huawei")  # FCM and HMS: the providers with topics
DEFAULT_PLATFORMS = ["android"]
LEASE_S = 60  # > PUSH_REQUEST_TIMEOUT: one provider request and its recording
PAUSED_RECHECK_S = 5.0


def is_topic_send(data: dict[str, Any]) -> bool:
    return bool(data.get(TOPIC) or data.get(CONDITION))


def check_fits(message: dict[str, Any], platforms: list[str]) -> None:
    """FCM takes at most FCM_TOPIC_PAYLOAD_LIMIT bytes for a topic message: refuse one that would
    not fit even with an empty body (a longer body is cut to fit, as for devices)."""
    if "android" in platforms:
        fcm = provider_class("android")
        fit_message(
            PushMessage.from_dict(message), fcm.payload_size, FCM_TOPIC_PAYLOAD_LIMIT, "android (topic)"
        )


def start(app: Any, data: dict[str, Any], claim: Any) -> Campaign:
    """Create the direct campaign of a validated topic send and publish one task per provider.
    `claim` is the request's Idempotency-Key claim (campaigns/idempotent.py)."""
    kind = TOPIC if data.get(TOPIC) else CONDITION
    platforms = list(data.get("platforms") or DEFAULT_PLATFORMS)
    now = timezone.now()
    with transaction.atomic():
        campaign = Campaign.objects.create(
            app=app,
            kind=Campaign.Kind.DIRECT,
            message=data["message"],
            target={kind: data[kind], "platforms": platforms},
            status=Campaign.Status.RUNNING,
            started_at=now,
            planned=True,
            outstanding=len(platforms),
            targeted=len(platforms),
        )
        claim.attach(campaign)
    control.reset_keys(runtime.redis_client(), campaign.pk)
    control.set_flag(runtime.redis_client(), campaign.pk, control.RUNNING)
    for platform in platforms:
        publish.topic(campaign.pk, platform, 0, None)
    return campaign


def run(campaign_id: int, platform: str, attempt: int = 0, deadline: int | None = None) -> None:
    """Send the campaign's topic message to one provider and record its answer (the task body)."""
    campaign = Campaign.objects.select_related("app").filter(pk=campaign_id).first()
    if campaign is None or campaign.status in Campaign.FINAL_STATUSES:
        return
    client = runtime.redis_client()
    if control.current_state(client, campaign_id) != control.RUNNING:
        if campaign.status != Campaign.Status.CANCELLED:
            # Paused or halted: a resume publishes no task for a send without shards, so this one
            # looks again later instead of being dropped.
            publish.topic(campaign_id, platform, attempt, deadline, countdown=PAUSED_RECHECK_S)
        return
    key = lease_key(campaign_id, platform)
    owner = uuid.uuid4().hex
    busy_for = idempotency.acquire_lease(client, key, owner, LEASE_S)
    if busy_for:
        publish.topic(campaign_id, platform, attempt, deadline, countdown=busy_for)
        return
    try:
        _run_leased(campaign, platform, attempt, deadline)
    finally:
        with contextlib.suppress(redis.RedisError):
            idempotency.release_lease(client, key, owner)


def lease_key(campaign_id: int, platform: str) -> str:
    return f"pushsvc:topic-lease:{campaign_id}:{platform}"


def republish_unanswered(client: redis.Redis) -> int:
    """After the broker lost its data (campaigns/recovery.py): a topic send lives only in its task
    messages, so every provider of an unfinished topic send with no recorded answer and no lease
    held gets its task again; how many. The attempt resumes at the campaign's retries so far (at
    least that provider's own), the TTL's deadline from the campaign's start."""
    unfinished = Campaign.objects.filter(
        kind=Campaign.Kind.DIRECT,
        status__in=(Campaign.Status.RUNNING, Campaign.Status.PAUSED, Campaign.Status.HALTED),
    ).filter(Q(target__has_key=TOPIC) | Q(target__has_key=CONDITION))
    published = 0
    for campaign in unfinished.only("id", "target", "message", "retried", "started_at").iterator():
        answered = set(DirectResult.objects.filter(campaign=campaign).values_list("platform", flat=True))
        ttl = PushMessage.from_dict(campaign.message).ttl
        started = campaign.started_at or timezone.now()
        deadline = int(started.timestamp()) + ttl if ttl else None
        attempt = min(campaign.retried, settings.CAMPAIGN_MAX_ATTEMPTS - 1)
        for platform in campaign.target.get("platforms", []):
            if platform in answered or client.exists(lease_key(campaign.pk, platform)):
                continue
            publish.topic(campaign.pk, platform, attempt, deadline)
            published += 1
    return published


def _run_leased(campaign: Campaign, platform: str, attempt: int, deadline: int | None) -> None:
    if DirectResult.objects.filter(campaign=campaign, platform=platform).exists():
        return  # answered and recorded by an earlier delivery of this task
    kind = TOPIC if campaign.target.get(TOPIC) else CONDITION
    target = Target(device_id=0, token=campaign.target[kind], kind=kind)
    message = PushMessage.from_dict(campaign.message)
    now = int(time.time())
    if message.ttl:  # a TTL is a deadline fixed at the first send; retries carry what remains
        deadline = deadline if deadline is not None else now + message.ttl
        if now >= deadline:
            _record(campaign, platform, Result(target, Outcome.RETRY, reason=TTL_EXPIRED), attempt, EXPIRED)
            return
        message = dataclasses.replace(message, ttl=max(deadline - now, 1), expires_at=deadline)
    provider = runtime.provider_for(campaign.app, platform)
    result = runtime.run(provider.send(target, message))
    Campaign.objects.filter(pk=campaign.pk).update(sent=F("sent") + 1)
    if result.outcome == Outcome.RETRY and attempt + 1 < settings.CAMPAIGN_MAX_ATTEMPTS and message.ttl != 0:
        delay = retry_delay(attempt + 1, result.retry_after or 0.0)
        if deadline is None or time.time() + delay < deadline:
            Campaign.objects.filter(pk=campaign.pk).update(retried=F("retried") + 1)
            publish.topic(campaign.pk, platform, attempt + 1, deadline, countdown=delay)
            logger.info("topic send %s %s: %s, retry in %.1f s", campaign.pk, platform, result.reason, delay)
            return
    outcome = DEAD_LETTER if result.outcome == Outcome.RETRY else str(result.outcome)
    _record(campaign, platform, result, attempt, outcome)


def _record(campaign: Campaign, platform: str, result: Result, attempt: int, outcome: str) -> None:
    """The provider's final answer: its result row, the counters, and completion with the last."""
    delivered = outcome == Outcome.DELIVERED
    with transaction.atomic():
        DirectResult.objects.create(
            campaign=campaign,
            device_pk=0,
            device_id=None,
            platform=platform,
            outcome=outcome,
            reason=result.reason[:128],
            status=result.status,
            provider_message_id=result.provider_message_id[:200],
            attempt=attempt,
        )
        counters: dict[str, Any] = {"outstanding": F("outstanding") - 1}
        if delivered:
            counters["delivered"] = F("delivered") + 1
        elif outcome == EXPIRED:
            counters["expired"] = F("expired") + 1
        else:
            counters["failed"] = F("failed") + 1
            counters["status_reason"] = f"{platform} {result.outcome}: {result.reason}"[:500]
        Campaign.objects.filter(pk=campaign.pk).update(**counters)
        done = Campaign.objects.filter(
            pk=campaign.pk, status=Campaign.Status.RUNNING, outstanding__lte=0
        ).update(status=Campaign.Status.COMPLETED, finished_at=timezone.now())
    if done:
        control.set_flag(runtime.redis_client(), campaign.pk, Campaign.Status.COMPLETED)
