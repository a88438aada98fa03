"""Canary cohorts end to end: through the API, a real Celery worker (its recovery thread makes the
decision once the wait is over) and the simulator's strict front. Slow lane (starts a worker)."""

from __future__ import annotations

from datetime import datetime

import pytest

from campaigns.models import Campaign, Shard
from campaigns.pytest_fixtures import *  # noqa: F403  (the fixtures: sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.testing import build_population, load_devices, sim_counts, simulator_app, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

WORKER_ENV = {
    "CAMPAIGN_SHARD_SIZE": "50",
    "CAMPAIGN_RECOVERY_INTERVAL_S": "1",  # the sweep that decides due canaries, every second
    "CAMPAIGN_PRUNE_GUARD_MIN": "100000",  # the mass-prune guard is another feature
}


def _status(campaign_id: int, status: str) -> Campaign | None:
    return Campaign.objects.filter(pk=campaign_id, status=status).first()


def test_a_healthy_canary_waits_then_the_rest_follows_once(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    population = load_devices(app, build_population({"android": 300}, {"android": {"02": 5}}))
    start_worker(concurrency=2, env=WORKER_ENV)
    client = api_client(app)
    response = client.post(
        "/api/v1/campaigns/",
        {"message": {"title": "canary"}, "canary": {"size": 100, "wait_s": 2, "max_error_rate": 0.1}},
        format="json",
    )
    assert response.status_code == 201, response.content
    campaign_id = response.json()["id"]

    campaign = wait_for(lambda: _status(campaign_id, "completed"), 120, what="completion")
    result = campaign.canary_result
    assert result["decision"] == "continue" and result["answered"] == 100 and result["errors"] <= 5
    decided_at = datetime.fromisoformat(result["decided_at"])
    assert decided_at >= campaign.canary_decide_at, "decided once the wait was over"
    assert (campaign.sent, campaign.delivered, campaign.invalidated) == (300, 295, 5)
    assert set(sim_counts(fresh_sim, population.of("android", "")).values()) == {1}
    shown = client.get(f"/api/v1/campaigns/{campaign_id}/").json()["canary"]
    assert shown["phase"] == "passed" and shown["sample"] == 100 and shown["figures"]["answered"] == 100


def test_a_failing_canary_pauses_and_resume_sends_the_rest(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    # 150 of 200 bad, a sample of 100: at least 50 % errors whichever devices are drawn.
    population = load_devices(app, build_population({"android": 200}, {"android": {"02": 150}}))
    start_worker(concurrency=2, env=WORKER_ENV)
    client = api_client(app)
    response = client.post(
        "/api/v1/campaigns/", {"message": {"title": "canary"}, "canary": {"size": 100}}, format="json"
    )
    campaign_id = response.json()["id"]

    campaign = wait_for(lambda: _status(campaign_id, "paused"), 120, what="the canary's pause")
    assert campaign.status_reason.startswith("canary: ") and "> 5.0 %" in campaign.status_reason
    assert campaign.sent == 100 and not Shard.objects.filter(campaign=campaign, lo__isnull=False).exists()
    detail = client.get(f"/api/v1/campaigns/{campaign_id}/").json()
    assert detail["canary"]["decision"] == "pause" and detail["canary"]["figures"]["errors"] >= 50

    assert client.post(f"/api/v1/campaigns/{campaign_id}/resume/").status_code == 200
    campaign = wait_for(lambda: _status(campaign_id, "completed"), 120, what="completion after resume")
    assert campaign.canary_phase == "overridden"
    assert (campaign.sent, campaign.delivered, campaign.invalidated) == (200, 50, 150)
    assert set(sim_counts(fresh_sim, population.of("android", "")).values()) == {1}
