"""Direct sends (POST /api/v1/notifications/) and the campaign API's input checks."""

from __future__ import annotations

import uuid

import pytest

from campaigns.models import Campaign
from campaigns.pytest_fixtures import *  # noqa: F403  (the fixtures: sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.testing import build_population, load_devices, simulator_app, wait_for
from tokens.models import ApiKey, DeviceToken
from tokens.testing import make_app

pytestmark = pytest.mark.django_db(transaction=True)


def test_direct_send_overtakes_a_running_broadcast(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    load_devices(app, build_population({"ios": 6000}, {}))
    vip = load_devices(app, build_population({"android": 3}, {}, seed=3), user_prefix="vip")
    fresh_sim.configure(latency_ms=40)
    # One process serving everything: the broadcast's shards queue up ahead of the direct send.
    start_worker(concurrency=1, env={"CAMPAIGN_CHUNK_SIZE": "50"})
    client = api_client(app)
    broadcast = client.post(
        "/api/v1/campaigns/", {"message": {"title": "news"}, "target": {"platforms": ["ios"]}}, format="json"
    ).json()["id"]
    wait_for(lambda: fresh_sim.stats()["delivered_total"] > 0, 120, what="the broadcast to start")
    # From here the broadcast's chunks take 200 ms each (~24 s for the rest), so it is still going
    # when the direct send (one chunk, queued behind at most the shard running) is done, however
    # loaded the machine: the ordering is the subject, not the speed.
    fresh_sim.configure(latency_ms=200)

    response = client.post(
        "/api/v1/notifications/",
        {"message": {"title": "2FA"}, "user_ids": ["vip0", "vip1", "vip2"]},
        format="json",
    )
    assert response.status_code == 202, response.content
    direct = response.json()
    assert direct["kind"] == "direct"
    assert direct["counters"]["targeted"] == 3

    done = wait_for(
        lambda: Campaign.objects.filter(pk=direct["id"], status="completed").first(),
        60,
        what="the direct send",
    )
    running = Campaign.objects.get(pk=broadcast)
    assert done.delivered == 3
    assert running.status == Campaign.Status.RUNNING, "the broadcast is still going"
    assert running.delivered < 6000
    assert set(fresh_sim.counts(vip.of()).values()) == {1}


def test_direct_send_validation(db) -> None:
    app = make_app()
    client = api_client(app)
    ok_message = {"title": "t", "body": "b"}

    r = client.post("/api/v1/notifications/", {"message": ok_message}, format="json")
    assert r.status_code == 400 and "exactly one of user_ids or device_ids" in str(r.json())
    r = client.post(
        "/api/v1/notifications/",
        {"message": ok_message, "user_ids": ["a"], "device_ids": [str(uuid.uuid4())]},
        format="json",
    )
    assert r.status_code == 400
    r = client.post(
        "/api/v1/notifications/",
        {"message": ok_message, "user_ids": [f"u{i}" for i in range(10_001)]},
        format="json",
    )
    assert r.status_code == 400 and "at most 10000 recipients" in str(r.json())
    r = client.post("/api/v1/notifications/", {"message": {"titel": "x"}, "user_ids": ["a"]}, format="json")
    assert r.status_code == 400 and "titel" in str(r.json())
    r = client.post(
        "/api/v1/notifications/", {"message": {"title": "x" * 5000}, "user_ids": ["a"]}, format="json"
    )
    assert r.status_code == 400
    r = client.post("/api/v1/notifications/", {"message": ok_message, "device_ids": ["nope"]}, format="json")
    assert r.status_code == 400 and "device_ids" in str(r.json())


def test_campaign_api_validation_scope_and_isolation(db) -> None:
    app, other = make_app(), make_app()
    client = api_client(app)
    r = client.post("/api/v1/campaigns/", {"message": {"title": "x", "priority": "urgent"}}, format="json")
    assert r.status_code == 400 and "priority" in str(r.json())
    r = client.post(
        "/api/v1/campaigns/", {"message": {"title": "x"}, "target": {"platforms": ["symbian"]}}, format="json"
    )
    assert r.status_code == 400 and "platforms" in str(r.json())
    r = client.post(
        "/api/v1/campaigns/",
        {"message": {"title": "x"}, "rollout": {"start_rate": 100, "max_rate": 10}},
        format="json",
    )
    assert r.status_code == 400 and "start_rate" in str(r.json())
    r = client.post("/api/v1/campaigns/", {"message": {"title": "x"}, "halt_error_rate": 2}, format="json")
    assert r.status_code == 400 and "halt_error_rate" in str(r.json())
    r = client.post(
        "/api/v1/campaigns/", {"message": {"title": "x"}, "target": {"min_app_version": "v2"}}, format="json"
    )
    assert r.status_code == 400 and "min_app_version" in str(r.json())

    r = client.post("/api/v1/campaigns/", {"message": {"title": "draft"}, "draft": True}, format="json")
    assert r.status_code == 201 and r.json()["status"] == "draft"
    draft_id = r.json()["id"]
    assert client.post(f"/api/v1/campaigns/{draft_id}/pause/").status_code == 409

    foreign = Campaign.objects.create(app=other, message={"title": "theirs"})
    assert client.get(f"/api/v1/campaigns/{foreign.pk}/").status_code == 404
    assert client.post(f"/api/v1/campaigns/{foreign.pk}/cancel/").status_code == 404

    _, devices_only = ApiKey.issue(app, ["devices"])
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {devices_only}")
    r = client.post("/api/v1/campaigns/", {"message": {"title": "x"}}, format="json")
    assert r.status_code == 403 and "send" in str(r.json())
    assert "apns_key_p8" not in str(client.get(f"/api/v1/campaigns/{draft_id}/").content)
    assert DeviceToken.objects.count() == 0
