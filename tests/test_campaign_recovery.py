"""campaigns/recovery.py on real PostgreSQL and Redis (the broker is the test Redis database): a
pending shard the broker lost is published again; one that is running (leased), not yet due, or
behind other messages on its queue is left alone."""

from __future__ import annotations

import base64
import json
import uuid
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


def _planning(redis_client) -> list[int]:
    """Campaign ids of the plan_campaign messages on the default queue."""
    ids = []
    for raw in redis_client.lrange("default", 0, -1):
        envelope = json.loads(raw)
        assert envelope["headers"]["task"] == "delivery.tasks.plan_campaign"
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        ids.append(args[0])
    return ids


def test_a_lost_planner_is_started_again_and_a_live_one_left_alone(redis_client) -> None:
    app = make_app()
    long_ago = timezone.now() - timedelta(seconds=recovery.grace_s() + 60)

    def campaign(**fields) -> Campaign:
        values = {"status": Campaign.Status.RUNNING, "started_at": long_ago, "planned": False, **fields}
        return Campaign.objects.create(app=app, message={"title": "x"}, **values)

    lost = campaign()
    lost_while_paused = campaign(status=Campaign.Status.PAUSED)
    planning = campaign()
    just_started = campaign(started_at=timezone.now())
    planned = campaign(planned=True)
    finished = campaign(status=Campaign.Status.COMPLETED)
    redis_client.set(idempotency.plan_lease_key(planning.pk), "a live planner")

    assert recovery.replan_lost(redis_client) == 2
    assert sorted(_planning(redis_client)) == sorted([lost.pk, lost_while_paused.pk])
    assert {planning.pk, just_started.pk, planned.pk, finished.pk}.isdisjoint(_planning(redis_client))


def test_one_planner_at_a_time_and_the_lease_is_released_when_done(redis_client) -> None:
    from campaigns import planning
    from tokens.models import DeviceToken
    from tokens.testing import apns_token

    app = make_app()
    tokens = [apns_token() for _ in range(5)]
    DeviceToken.objects.bulk_create(
        DeviceToken(
            app=app, device_id=uuid.uuid4(), platform="ios", token=t, token_hash=DeviceToken.hash_token(t)
        )
        for t in tokens
    )
    campaign = Campaign.objects.create(
        app=app,
        message={"title": "x"},
        status=Campaign.Status.RUNNING,
        started_at=timezone.now(),
        outstanding=1,
    )
    key = idempotency.plan_lease_key(campaign.pk)
    redis_client.set(key, "a live planner", ex=60)
    planning.plan(campaign.pk)
    assert not Shard.objects.filter(campaign=campaign).exists()  # left to the live planner

    redis_client.delete(key)  # it died; its lease ran out
    planning.plan(campaign.pk)
    campaign.refresh_from_db()
    assert campaign.planned and Shard.objects.filter(campaign=campaign).count() == 1
    assert not redis_client.exists(key)


def test_a_broker_that_lost_its_data_gets_every_pending_shard_back_without_the_grace(
    redis_client, settings
) -> None:
    campaign = Campaign.objects.create(
        app=make_app(), message={"title": "x"}, status=Campaign.Status.RUNNING, planned=True
    )
    young = _shard(campaign, "apns", 0)  # due, but within the grace
    redis_client.set(recovery.BROKER_MARK_KEY, "ok")  # the broker still has its data
    assert recovery.sweep_orphans(redis_client) == 0
    assert _published(redis_client, "apns") == []

    redis_client.delete(recovery.BROKER_MARK_KEY, recovery.ORPHAN_LOCK_KEY)  # the broker was flushed
    assert recovery.sweep_orphans(redis_client) == 0, "seen; the runs in progress stop first"
    assert redis_client.get(recovery.BROKER_MARK_KEY).startswith(b"emptied:")
    settings.CAMPAIGN_SHARD_LEASE_S = 0  # a lease period has passed since
    redis_client.delete(recovery.ORPHAN_LOCK_KEY)
    assert recovery.sweep_orphans(redis_client) == 1
    assert _published(redis_client, "apns") == [young.pk]
    assert redis_client.get(recovery.BROKER_MARK_KEY) == b"ok", "the next tick publishes nothing"
