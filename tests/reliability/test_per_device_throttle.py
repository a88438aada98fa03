"""One device's 429 before a campaign, through a real worker (the scenario an independent strict
APNs stand-in found): the campaign launched right after starts at once and delivers every device
exactly once. Before the fix, the one-device 429 cut the app's whole rate, the next chunk's
reservation slept for minutes past the shard's lease, and a second run delivered it again."""

from __future__ import annotations

import time

import pytest

from campaigns.models import Campaign, Shard
from campaigns.pytest_fixtures import api_client
from campaigns.testing import build_population, load_devices, make_token, simulator_app, wait_for
from delivery.ratelimit import provider_key
from delivery.runtime import redis_client
from tokens.models import DeviceToken

from .harness import MESSAGE, tally

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_one_devices_429_does_not_stall_or_duplicate_the_next_campaign(fresh_sim, start_worker) -> None:
    start_worker(concurrency=1)
    app = simulator_app(fresh_sim)
    load_devices(app, [("ios", make_token("ios", "03"), "03")], user_prefix="hot")
    hot = DeviceToken.objects.get(app=app)
    client = api_client(app)
    response = client.post(
        "/api/v1/notifications/", {"message": MESSAGE, "device_ids": [str(hot.device_id)]}, format="json"
    )
    assert response.status_code == 202, response.content
    wait_for(
        lambda: fresh_sim.stats()["by_outcome"].get("apns 429 TooManyRequests"), 60, 0.02, "the device's 429"
    )

    population = load_devices(app, build_population({"ios": 600}, {}))
    before = fresh_sim.stats()["requests"]
    launched = time.monotonic()
    response = client.post(
        "/api/v1/campaigns/", {"message": MESSAGE, "target": {"platforms": ["ios"]}}, format="json"
    )
    assert response.status_code == 201, response.content
    campaign_id = response.json()["id"]
    wait_for(lambda: fresh_sim.stats()["requests"] > before + 1, 60, 0.01, "the campaign's first request")
    first_request_s = time.monotonic() - launched
    campaign = wait_for(
        lambda: Campaign.objects.filter(pk=campaign_id, status__in=Campaign.FINAL_STATUSES).first(),
        120,
        0.1,
        "the campaign to finish",
    )
    result = tally(fresh_sim, population.of())
    print(
        f"\none device's 429, then 600 devices: first request {first_request_s:.2f}s after launch, "
        f"status {campaign.status}, delivered {campaign.delivered}, lost {len(result.lost)}, "
        f"repeated {result.extra_deliveries}, requests {fresh_sim.stats()['requests'] - before}"
    )
    assert campaign.status == "completed", campaign.status_reason
    assert result.lost == [] and result.extra_deliveries == 0
    assert campaign.delivered == 601 and campaign.skipped_duplicate == 0
    # Nothing waited on the app's rate: no cut limit, no shard deferred.
    limit = redis_client().hget(provider_key(app.pk, "ios"), "limit")
    assert limit is None, f"the app's APNs rate was cut to {limit}"
    assert not Shard.objects.filter(campaign_id=campaign_id, not_before__isnull=False).exists()
    # A generous bound (the defect took minutes); the figure above is the measurement.
    assert first_request_s < 30
