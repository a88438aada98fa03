"""Campaign flows end to end: API -> plan -> shards on provider queues -> simulator -> results.

Real Celery workers (subprocesses), real PostgreSQL and Redis, the provider simulator over TLS.
"""

from __future__ import annotations

import pytest

from campaigns.models import Campaign, Shard
from campaigns.pytest_fixtures import *  # noqa: F403  (the fixtures: sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.testing import build_population, load_devices, simulator_app, wait_for
from delivery.models import DeadLetter
from tokens.models import DeviceToken

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGE = {"title": "Hello", "body": "A campaign", "data": {"k": "v"}}


def _campaign(campaign_id: int) -> Campaign:
    return Campaign.objects.get(pk=campaign_id)


def _finished(campaign_id: int) -> Campaign | None:
    campaign = _campaign(campaign_id)
    return campaign if campaign.status in Campaign.FINAL_STATUSES else None


def test_small_campaign_counts_add_up(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    rows = build_population(
        {"ios": 1500, "android": 900},
        {"ios": {"01": 40, "03": 30, "02": 5}, "android": {"01": 20, "03": 25, "08": 5}},
    )
    population = load_devices(app, rows)
    start_worker(concurrency=2)
    client = api_client(app)

    response = client.post("/api/v1/campaigns/", {"name": "smoke", "message": MESSAGE}, format="json")
    assert response.status_code == 201, response.content
    campaign_id = response.json()["id"]

    campaign = wait_for(lambda: _finished(campaign_id), 120, what="campaign to finish")
    assert campaign.status == Campaign.Status.COMPLETED, campaign.status_reason
    invalid = population.of(fault="01") + population.of(fault="02") + population.of(fault="08")
    assert campaign.targeted == 2400
    assert campaign.invalidated == len(invalid) == 70
    assert campaign.delivered == 2400 - 70
    assert campaign.delivered_after_retry == 55
    assert campaign.failed == 0
    assert campaign.skipped_duplicate == 0
    assert campaign.targeted == campaign.delivered + campaign.invalidated + campaign.failed
    assert Shard.objects.filter(campaign_id=campaign_id).exclude(status=Shard.Status.DONE).count() == 0
    assert not DeadLetter.objects.filter(campaign_id=campaign_id).exists()

    inactive = set(DeviceToken.objects.filter(app=app, is_active=False).values_list("token", flat=True))
    assert inactive == set(invalid)

    healthy = population.of(fault="") + population.of(fault="03")
    counts = fresh_sim.counts(healthy)
    assert set(counts.values()) == {1}, "every healthy device exactly once"
    assert fresh_sim.stats()["duplicates"] == 0

    body = client.get(f"/api/v1/campaigns/{campaign_id}/").json()
    assert body["status"] == "completed"
    assert body["counters"]["delivered"] == 2330
    assert {(f["platform"], f["reason"]) for f in body["failures"] if f["outcome"] == "invalid_token"}
