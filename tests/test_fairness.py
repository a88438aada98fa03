"""Fair sharing of a provider queue (settings CAMPAIGN_HEAD_DEVICES): planning puts each campaign's
first devices per platform in the head lane and the rest in the bulk lane; the broker (the test
Redis database, through kombu's priority lists) hands out every head-lane shard before any bulk one,
whatever order they were published in. bench/fairness.py measures what this buys."""

from __future__ import annotations

import base64
import json

import pytest
from django.utils import timezone

from campaigns import planning, publish
from campaigns.models import Campaign, Shard
from campaigns.testing import build_population, load_devices
from pushsvc.celery import app as celery_app
from tokens.testing import make_app

pytestmark = pytest.mark.django_db(transaction=True)


def _next_shard_id(queue: str) -> int:
    """What a worker consuming `queue` is handed next: kombu's own consumer over the broker."""
    with celery_app.connection_for_read() as conn, conn.SimpleQueue(queue, no_ack=True) as q:
        message = q.get(timeout=2)
        args, _kwargs, _embed = message.payload  # Celery's message body: [args, kwargs, embed]
        return args[0]


def _planned(population: dict[str, int]) -> Campaign:
    """A running broadcast to a new app's devices, planned in this process (its tasks published)."""
    app = make_app()
    load_devices(app, build_population(population, {}))
    campaign = Campaign.objects.create(
        app=app,
        message={"title": "x"},
        status=Campaign.Status.RUNNING,
        started_at=timezone.now(),
        outstanding=1,
    )
    planning.plan(campaign.pk)
    return campaign


def _queued_ids(redis_client, key: str) -> list[int]:
    ids = []
    for raw in redis_client.lrange(key, 0, -1):
        args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids.append(args[0])
    return sorted(ids)


def test_planning_puts_the_first_devices_of_each_platform_in_the_head_lane(redis_client, settings) -> None:
    assert settings.CELERY_BROKER_URL == settings.REDIS_URL  # the lists below are the broker's
    settings.CAMPAIGN_SHARD_SIZE = 10
    settings.CAMPAIGN_HEAD_DEVICES = 25
    campaign = _planned({"ios": 60, "android": 15})

    lanes = {
        platform: [
            lane
            for (lane,) in Shard.objects.filter(campaign=campaign, platform=platform)
            .order_by("lo")
            .values_list("lane")
        ]
        for platform in ("ios", "android")
    }
    # The shards holding the first 25 devices of each platform (10 + 10 + 10), then the bulk.
    assert lanes["ios"] == [Shard.Lane.HEAD] * 3 + [Shard.Lane.BULK] * 3
    assert lanes["android"] == [Shard.Lane.HEAD] * 2, "a campaign smaller than the head is all head"

    ios = Shard.objects.filter(campaign=campaign, platform="ios")
    head = sorted(ios.filter(lane=Shard.Lane.HEAD).values_list("pk", flat=True))
    bulk = sorted(ios.filter(lane=Shard.Lane.BULK).values_list("pk", flat=True))
    # kombu keeps a list per priority step: the plain name is served first.
    assert _queued_ids(redis_client, "apns") == head
    assert _queued_ids(redis_client, "apns\x06\x169") == bulk


def test_a_head_shard_published_after_a_broadcast_s_bulk_is_served_first(redis_client) -> None:
    big = [1001, 1002, 1003]
    for shard_id in big:
        publish.shard(shard_id, "apns", Shard.Lane.BULK)
    publish.shard(2001, "apns", Shard.Lane.HEAD)  # a small campaign, planned later
    publish.shard(1004, "apns", Shard.Lane.BULK)
    publish.shard(2002, "apns", Shard.Lane.HEAD)

    served = [_next_shard_id("apns") for _ in range(6)]
    assert served == [2001, 2002, 1001, 1002, 1003, 1004], "head lane first, each lane in order"


def test_one_lane_when_the_head_is_zero(redis_client, settings) -> None:
    settings.CAMPAIGN_SHARD_SIZE = 10
    settings.CAMPAIGN_HEAD_DEVICES = 0
    campaign = _planned({"ios": 30})
    assert set(Shard.objects.filter(campaign=campaign).values_list("lane", flat=True)) == {Shard.Lane.BULK}
    assert settings.SHARD_LANE_PRIORITIES == (0, 9)
