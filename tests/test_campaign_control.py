"""Operator controls and safety stops, mid-flight, with real workers and the simulator:
pause/resume, cancel, the error-rate halt, a credential failure, the mass-prune guard and
dead letters."""

from __future__ import annotations

import pytest

from campaigns.models import Campaign, Shard
from campaigns.pytest_fixtures import *  # noqa: F403  (the fixtures: sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.testing import build_population, load_devices, simulator_app, wait_for
from delivery.models import DeadLetter
from tokens.models import DeviceToken

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGE = {"title": "Hi", "body": "control"}
# Small chunks and provider latency make a campaign last long enough to act on it mid-flight.
SLOW = {"CAMPAIGN_CHUNK_SIZE": "50"}


def _get(campaign_id: int) -> Campaign:
    return Campaign.objects.get(pk=campaign_id)


def _status(campaign_id: int, *statuses: str) -> Campaign | None:
    campaign = _get(campaign_id)
    return campaign if campaign.status in statuses else None


def _launch(client, **body) -> int:
    response = client.post("/api/v1/campaigns/", {"message": MESSAGE, **body}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def _delivered_total(sim) -> int:
    return sim.stats()["delivered_total"]


def test_pause_stops_sending_within_a_chunk_and_resume_finishes_exactly_once(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    population = load_devices(app, build_population({"ios": 3000, "android": 1000}, {"ios": {"01": 30}}))
    fresh_sim.configure(latency_ms=60)
    start_worker(concurrency=2, env=SLOW)
    client = api_client(app)
    campaign_id = _launch(client)

    wait_for(lambda: _delivered_total(fresh_sim) >= 300, 120, what="sending to start")
    # From here each request takes a second: the pause lands mid-campaign however slowly this
    # process gets to send it on a loaded machine (at 60 ms the rest took ~4 s).
    fresh_sim.configure(latency_ms=1000)
    response = client.post(f"/api/v1/campaigns/{campaign_id}/pause/")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "paused"

    # Every shard stops within one chunk and parks (those still queued park when they start).
    wait_for(
        lambda: not Shard.objects.filter(campaign_id=campaign_id, status=Shard.Status.PENDING).exists(),
        60,
        what="every shard to park",
    )
    paused = _get(campaign_id)
    sent_while_running = _delivered_total(fresh_sim)
    assert sent_while_running < 4000
    assert paused.delivered == sent_while_running
    assert Shard.objects.filter(campaign_id=campaign_id, status=Shard.Status.PAUSED).exists()

    fresh_sim.configure(latency_ms=60)
    assert client.post(f"/api/v1/campaigns/{campaign_id}/resume/").status_code == 200
    campaign = wait_for(lambda: _status(campaign_id, "completed"), 180, what="completion after resume")
    assert campaign.targeted == 4000
    assert campaign.delivered == 4000 - 30
    assert campaign.invalidated == 30
    assert campaign.skipped_duplicate == 0
    counts = fresh_sim.counts(population.of(fault=""))
    assert set(counts.values()) == {1}
    assert fresh_sim.stats()["duplicates"] == 0


def test_cancel_stops_the_campaign_for_good(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    load_devices(app, build_population({"ios": 4000}, {}))
    fresh_sim.configure(latency_ms=60)
    start_worker(concurrency=2, env=SLOW)
    client = api_client(app)
    campaign_id = _launch(client)
    wait_for(lambda: _delivered_total(fresh_sim) >= 200, 120, what="sending to start")
    fresh_sim.configure(latency_ms=1000)  # the cancel lands mid-campaign however slowly it is sent

    response = client.post(f"/api/v1/campaigns/{campaign_id}/cancel/")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    wait_for(
        lambda: not Shard.objects.filter(campaign_id=campaign_id, status=Shard.Status.PENDING).exists(),
        60,
        what="in-flight shards to stop",
    )
    # The runs that were sending record their last chunk, then nothing moves.
    campaign = wait_for(
        lambda: (c := _get(campaign_id)).delivered == _delivered_total(fresh_sim) and c,
        60,
        what="the last chunks to be recorded",
    )
    total = _delivered_total(fresh_sim)
    assert total < 4000
    assert campaign.status == Campaign.Status.CANCELLED
    assert campaign.delivered == total
    assert campaign.not_sent == 4000 - total
    assert client.post(f"/api/v1/campaigns/{campaign_id}/resume/").status_code == 409
    assert client.post(f"/api/v1/campaigns/{campaign_id}/cancel/").status_code == 409


def test_error_rate_halts_the_campaign_and_says_why(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    # One device in five answers 503 forever; with one attempt allowed each is a final failure.
    load_devices(app, build_population({"ios": 4000}, {"ios": {"05": 800}}))
    # The halt is decided as each shard is recorded: several shards, so that it stops the rest.
    start_worker(concurrency=1, env={"CAMPAIGN_MAX_ATTEMPTS": "1", "CAMPAIGN_SHARD_SIZE": "1000"})
    client = api_client(app)
    campaign_id = _launch(client, halt_error_rate=0.05)

    campaign = wait_for(lambda: _status(campaign_id, "halted"), 60, what="the halt")
    assert "ServiceUnavailable" in campaign.status_reason
    assert "limit 5.0%" in campaign.status_reason
    wait_for(
        lambda: not Shard.objects.filter(campaign_id=campaign_id, status=Shard.Status.PENDING).exists(),
        30,
        what="shards to park",
    )
    campaign = _get(campaign_id)
    assert campaign.sent >= 1000
    assert campaign.sent < 4000, "it stopped before sending everything"
    assert campaign.failed == DeadLetter.objects.filter(campaign_id=campaign_id).count() > 0
    assert DeviceToken.objects.filter(app=app, is_active=False).count() == 0

    # The operator accepts a higher failure rate for this one: resume with a new limit.
    response = client.post(
        f"/api/v1/campaigns/{campaign_id}/resume/", {"halt_error_rate": 0.5}, format="json"
    )
    assert response.status_code == 200, response.content
    campaign = wait_for(lambda: _status(campaign_id, "completed"), 60, what="completion")
    assert (campaign.delivered, campaign.failed, campaign.targeted) == (3200, 800, 4000)
    assert DeadLetter.objects.filter(campaign_id=campaign_id).count() == 800


def test_credential_failure_pauses_without_touching_tokens(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    population = load_devices(app, build_population({"ios": 1500}, {"ios": {"01": 20}}))
    fresh_sim.configure(revoked_apns_keys=[fresh_sim.credentials.apns_key_id])
    start_worker(concurrency=1)
    client = api_client(app)
    campaign_id = _launch(client)

    campaign = wait_for(lambda: _status(campaign_id, "paused"), 60, what="the pause")
    assert "credentials" in campaign.status_reason.lower()
    assert "InvalidProviderToken" in campaign.status_reason
    assert campaign.delivered == 0
    assert DeviceToken.objects.filter(app=app, is_active=False).count() == 0
    assert fresh_sim.stats()["delivered_total"] == 0

    fresh_sim.configure(revoked_apns_keys=[])
    fresh_sim.configure(latency_ms=60)
    assert client.post(f"/api/v1/campaigns/{campaign_id}/resume/").status_code == 200
    campaign = wait_for(lambda: _status(campaign_id, "completed"), 180, what="completion after resume")
    assert campaign.delivered == 1480
    assert campaign.invalidated == 20
    assert set(fresh_sim.counts(population.of(fault="")).values()) == {1}


def test_mass_prune_guard_pauses_instead_of_deactivating(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    # Most APNs tokens answer BadDeviceToken: what a sandbox/production mix-up looks like.
    load_devices(app, build_population({"ios": 2000}, {"ios": {"02": 1700}}))
    start_worker(concurrency=1)
    client = api_client(app)
    campaign_id = _launch(client)

    campaign = wait_for(lambda: _status(campaign_id, "paused"), 60, what="the guard")
    assert "Mass-prune guard" in campaign.status_reason
    assert "BadDeviceToken" in campaign.status_reason
    wait_for(
        lambda: not Shard.objects.filter(campaign_id=campaign_id, status=Shard.Status.PENDING).exists(),
        30,
        what="shards to park",
    )
    assert DeviceToken.objects.filter(app=app, is_active=False).count() == 0

    # The operator checked: these tokens really are dead. Resume and apply.
    response = client.post(f"/api/v1/campaigns/{campaign_id}/resume/", {"confirm_prune": True}, format="json")
    assert response.status_code == 200
    campaign = wait_for(lambda: _status(campaign_id, "completed"), 120, what="completion")
    assert campaign.invalidated == 1700
    assert campaign.delivered == 300
    assert DeviceToken.objects.filter(app=app, is_active=False).count() == 1700


def test_exhausted_retries_are_dead_lettered(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    load_devices(app, build_population({"android": 300}, {"android": {"05": 7}}))
    start_worker(concurrency=1, env={"CAMPAIGN_MAX_ATTEMPTS": "2"})
    campaign_id = _launch(api_client(app))

    campaign = wait_for(lambda: _status(campaign_id, "completed"), 120, what="completion")
    assert campaign.failed == 7
    assert campaign.retried == 7
    assert campaign.delivered == 293
    letters = DeadLetter.objects.filter(campaign_id=campaign_id)
    assert letters.count() == 7
    assert {(dl.attempts, dl.status, dl.platform) for dl in letters} == {(2, 503, "android")}
    assert DeviceToken.objects.filter(app=app, is_active=False).count() == 0
