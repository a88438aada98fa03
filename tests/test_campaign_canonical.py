"""The canonical scenario of issue 4, once: 50,000 devices (30,000 iOS, 20,000 Android), 1,200 of
them uninstalled (APNs 410 / FCM 404 UNREGISTERED), 3,000 throttled once (429) and then fine.

Exact counters, exactly the dead tokens deactivated, every live device delivered exactly once
(the simulator's own per-token counts), and a second campaign that does not target the pruned
tokens at all.
"""

from __future__ import annotations

import pytest

from campaigns.models import Campaign, OutcomeTally, Shard
from campaigns.pytest_fixtures import *  # noqa: F403  (the fixtures: sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.testing import build_population, load_devices, sim_counts, simulator_app, wait_for
from delivery.models import DeadLetter
from tokens.models import DeviceToken

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

IOS, ANDROID = 30_000, 20_000
FAULTS = {"ios": {"01": 720, "03": 1_800}, "android": {"01": 480, "03": 1_200}}
INVALID = 720 + 480
THROTTLED = 1_800 + 1_200


def _completed(campaign_id: int) -> Campaign | None:
    campaign = Campaign.objects.get(pk=campaign_id)
    assert campaign.status not in ("paused", "halted", "failed", "cancelled"), campaign.status_reason
    return campaign if campaign.status == Campaign.Status.COMPLETED else None


def test_fifty_thousand_devices(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    population = load_devices(app, build_population({"ios": IOS, "android": ANDROID}, FAULTS))
    start_worker(queues=("default", "apns"), concurrency=1, name="apns")
    start_worker(queues=("default", "fcm"), concurrency=1, name="fcm")
    client = api_client(app)

    response = client.post(
        "/api/v1/campaigns/",
        {"name": "canonical", "message": {"title": "Hello", "body": "50k", "data": {"campaign": "c1"}}},
        format="json",
    )
    assert response.status_code == 201, response.content
    first = response.json()["id"]
    campaign = wait_for(lambda: _completed(first), 300, interval=0.5, what="the 50k campaign")

    assert campaign.targeted == 50_000
    assert campaign.invalidated == INVALID
    assert campaign.delivered == 50_000 - INVALID
    assert campaign.delivered_after_retry == THROTTLED
    assert campaign.retried == THROTTLED
    assert campaign.failed == 0
    assert campaign.skipped_duplicate == 0
    assert campaign.sent == 50_000 + THROTTLED
    assert campaign.outstanding == 0
    assert campaign.targeted == campaign.delivered + campaign.invalidated + campaign.failed
    assert not Shard.objects.filter(campaign_id=first).exclude(status=Shard.Status.DONE).exists()
    assert not DeadLetter.objects.filter(campaign_id=first).exists()
    tallies = {
        (t.platform, t.outcome, t.reason): t.count for t in OutcomeTally.objects.filter(campaign_id=first)
    }
    assert tallies[("ios", "invalid_token", "Unregistered")] == 720
    assert tallies[("android", "invalid_token", "UNREGISTERED")] == 480
    assert tallies[("ios", "retry", "TooManyRequests")] == 1_800
    assert tallies[("android", "retry", "QUOTA_EXCEEDED")] == 1_200

    # Exactly the dead tokens were deactivated, with the provider's reason.
    dead = set(population.of(fault="01"))
    inactive = dict(
        DeviceToken.objects.filter(app=app, is_active=False).values_list("token", "deactivation_reason")
    )
    assert set(inactive) == dead
    assert set(inactive.values()) == {"Unregistered", "UNREGISTERED"}

    # Zero losses and zero duplicates, by the simulator's own count of accepted deliveries.
    live = population.of(fault="") + population.of(fault="03")
    counts = sim_counts(fresh_sim, live)
    assert len(counts) == 50_000 - INVALID
    assert set(counts.values()) == {1}
    stats = fresh_sim.stats()
    assert stats["duplicates"] == 0
    assert stats["delivered_unique"] == stats["delivered_total"] == 50_000 - INVALID

    # A second campaign targets only the live devices: the pruned tokens get no request at all.
    requests_before = stats["by_outcome"]
    second = client.post("/api/v1/campaigns/", {"message": {"title": "Again"}}, format="json").json()["id"]
    campaign2 = wait_for(lambda: _completed(second), 300, interval=0.5, what="the second campaign")
    assert campaign2.targeted == 50_000 - INVALID
    assert campaign2.invalidated == 0
    assert campaign2.delivered == 50_000 - INVALID
    after = fresh_sim.stats()["by_outcome"]
    for outcome in ("apns 410 Unregistered", "fcm 404 UNREGISTERED"):
        assert after.get(outcome, 0) == requests_before.get(outcome, 0), outcome
    assert set(sim_counts(fresh_sim, live).values()) == {2}
