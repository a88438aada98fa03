"""campaigns/recovery.py on real PostgreSQL and Redis (the broker is the test Redis database): a
pending shard the broker lost is published again; one that is running (leased), not yet due, or
behind other messages on its queue is left alone."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from campaigns import recovery
from campaigns.models import Campaign, Shard
from delivery import idempotency
from tokens.testing import make_app

pytestmark = pytest.mark.django_db(transaction=True)


def _shard(campaign: Campaign, queue: str, age_s: float, **fields) -> Shard:
    return Shard.objects.create(
        campaign=campaign,
        platform="ios",
        queue=queue,
        lo=0,
        hi=10,
        planned=10,
        created_at=timezone.now() - timedelta(seconds=age_s),
        **fields,
    )


def _published(redis_client, queue: str) -> list[int]:
    """Shard ids of the send_shard messages on a queue (kombu: JSON envelope, base64 body)."""
    ids = []
    for raw in redis_client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        ids.append(args[0])
    return ids


def test_only_lost_shards_are_published_again(redis_client) -> None:
    assert settings.CELERY_BROKER_URL == settings.REDIS_URL  # the lists below are the broker's
    campaign = Campaign.objects.create(
        app=make_app(), message={"title": "x"}, status=Campaign.Status.RUNNING, planned=True
    )
    grace = recovery.grace_s()
    lost = _shard(campaign, "apns", grace + 60)
    leased = _shard(campaign, "apns", grace + 60)
    fresh = _shard(campaign, "apns", 0)
    waiting_retry = _shard(campaign, "apns", grace + 60, not_before=timezone.now() + timedelta(seconds=30))
    done = _shard(campaign, "apns", grace + 60, status=Shard.Status.DONE)
    behind = _shard(campaign, "fcm", grace + 60)
    redis_client.set(idempotency.lease_key(leased.pk), "someone")
    redis_client.rpush("fcm", b"a message still queued")

    assert recovery.republish_lost(redis_client) == 1

    assert _published(redis_client, "apns") == [lost.pk]
    assert redis_client.lrange("fcm", 0, -1) == [b"a message still queued"]
    # leased, fresh, waiting_retry, done and behind were left alone
    assert {leased.pk, fresh.pk, waiting_retry.pk, done.pk, behind.pk}.isdisjoint(
        _published(redis_client, "apns")
    )


def test_a_sweep_runs_once_per_interval(redis_client) -> None:
    campaign = Campaign.objects.create(
        app=make_app(), message={"title": "x"}, status=Campaign.Status.RUNNING, planned=True
    )
    lost = _shard(campaign, "apns", recovery.grace_s() + 60)
    assert recovery.sweep(redis_client) == 1
    redis_client.delete("apns")  # consumed, and lost again
    assert recovery.sweep(redis_client) == 0  # the lock holds for the interval
    assert _published(redis_client, "apns") == []
    redis_client.delete(recovery.LOCK_KEY)  # the interval is over
    assert recovery.sweep(redis_client) == 1
    assert _published(redis_client, "apns") == [lost.pk]
