"""Campaign results reach token hygiene: invalidations matched on the token sent, audited per
campaign and provider; the stale share and the invalid-answer spike on the campaign API.

Real PostgreSQL and Redis; the end-to-end test runs a real Celery worker against the simulator.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from campaigns.models import Campaign, Shard
from campaigns.pytest_fixtures import *  # noqa: F403  (the fixtures: sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.sending.ledger import Device, ShardResults, apply_shard_run
from campaigns.testing import build_population, load_devices, simulator_app, wait_for
from delivery.providers.base import Outcome, Result, Target
from tokens.invalidation import AUDIT_TABLE
from tokens.models import DeviceToken
from tokens.testing import fcm_token, make_app

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGE = {"title": "Hello", "body": "A campaign"}


def _audit(campaign_id: int) -> list[tuple[int, str, str, str, bool]]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT device_id, token_hash, provider, reason, applied FROM {AUDIT_TABLE}"
            " WHERE campaign_id = %s ORDER BY device_id",
            [campaign_id],
        )
        return cursor.fetchall()


def _one_shard_campaign(devices: int = 3) -> tuple[list[DeviceToken], Campaign, Shard, list[Device]]:
    """A running campaign of one list shard over `devices` new Android devices, and the devices
    as the shard loaded them."""
    app = make_app()
    rows = [
        DeviceToken.objects.create(app=app, device_id=uuid.uuid4(), platform="android", token=fcm_token())
        for _ in range(devices)
    ]
    campaign = Campaign.objects.create(
        app=app, message=MESSAGE, status=Campaign.Status.RUNNING, planned=True, outstanding=1
    )
    shard = Shard.objects.create(
        campaign=campaign, platform="android", queue="fcm", device_ids=[r.pk for r in rows], planned=devices
    )
    return rows, campaign, shard, [Device(r.pk, r.token, "", "", r.device_id) for r in rows]


def test_a_token_rotated_after_the_shard_loaded_it_stays_active(redis_client) -> None:
    # `loaded`: what the shard loaded and sent to, the tokens as they were then.
    rows, campaign, shard, loaded = _one_shard_campaign()
    app = campaign.app

    # The app on device 0 gets a new FCM token while the request to the old one is in flight.
    rotated = rows[0]
    rotated.token = fcm_token()
    rotated.updated_at = timezone.now()
    rotated.save()

    results = ShardResults(attempt=0, max_attempts=3)
    answers = [
        Result(Target(device_id=d.pk, token=d.token), Outcome.INVALID_TOKEN, 404, "UNREGISTERED")
        for d in loaded
    ]
    results.add(loaded, answers, hold_invalid=False)
    applied = apply_shard_run(shard, results, loaded=3, park=None, rest_lo=None, rest_ids=None)

    assert applied.recorded and applied.completed
    states = dict(DeviceToken.objects.filter(app=app).values_list("pk", "is_active"))
    assert states == {rows[0].pk: True, rows[1].pk: False, rows[2].pk: False}
    assert DeviceToken.objects.get(pk=rotated.pk).token == rotated.token
    audit = _audit(campaign.pk)
    assert [(d, h, p, r, a) for d, h, p, r, a in audit] == [
        (rows[0].pk, DeviceToken.hash_token(loaded[0].token), "fcm", "UNREGISTERED", False),
        (rows[1].pk, rows[1].token_hash, "fcm", "UNREGISTERED", True),
        (rows[2].pk, rows[2].token_hash, "fcm", "UNREGISTERED", True),
    ]

    # A redelivered run of the same shard records nothing: no second audit row.
    again = apply_shard_run(shard, results, loaded=3, park=None, rest_lo=None, rest_ids=None)
    assert not again.recorded
    assert len(_audit(campaign.pk)) == 3


def test_campaign_invalidations_are_audited_and_shown_on_the_api(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    rows = build_population({"ios": 300, "android": 200}, {"ios": {"01": 12}, "android": {"01": 8}})
    population = load_devices(app, rows)
    # 50 devices last seen 40 days ago: the stale share the campaign reports at launch.
    stale_ids = list(DeviceToken.objects.filter(app=app).order_by("id").values_list("id", flat=True)[:50])
    DeviceToken.objects.filter(id__in=stale_ids).update(last_seen=timezone.now() - timedelta(days=40))
    start_worker(concurrency=2)
    client = api_client(app)
    response = client.post("/api/v1/campaigns/", {"message": MESSAGE}, format="json")
    assert response.status_code == 201, response.content
    campaign_id = response.json()["id"]

    campaign = wait_for(
        lambda: (c := Campaign.objects.get(pk=campaign_id)).status in Campaign.FINAL_STATUSES and c,
        120,
        what="campaign to finish",
    )
    assert campaign.status == Campaign.Status.COMPLETED, campaign.status_reason
    assert campaign.invalidated == 20

    audit = _audit(campaign_id)
    assert len(audit) == 20 and all(applied for *_, applied in audit)
    assert sorted(p for _, _, p, _, _ in audit) == ["apns"] * 12 + ["fcm"] * 8
    inactive = set(DeviceToken.objects.filter(app=app, is_active=False).values_list("id", flat=True))
    assert inactive == {device_id for device_id, *_ in audit}
    assert set(population.of(fault="01")) == set(
        DeviceToken.objects.filter(id__in=inactive).values_list("token", flat=True)
    )

    body = client.get(f"/api/v1/campaigns/{campaign_id}/").json()
    stale = body["hygiene"]["stale_at_launch"]
    assert stale["target"] == 500 and stale["unseen"] == 50 and stale["share"] == pytest.approx(0.1)
    spikes = body["hygiene"]["invalid_spike"]
    assert spikes["apns"]["window_sent"] == 300 and spikes["apns"]["window_invalid"] == 12
    assert spikes["fcm"]["window_sent"] == 200 and spikes["fcm"]["window_invalid"] == 8
    # 4% invalid is the normal weather, not a spike.
    assert not spikes["apns"]["flagged"] and not spikes["fcm"]["flagged"]


def test_only_deliveries_are_never_sent_again_and_a_re_run_counts_them_delivered(redis_client) -> None:
    """After a crash the re-run skips (and counts) what the dead run delivered, but sends to the
    devices it found invalid again: their deactivation was never written (delivery/idempotency.py)."""
    rows, campaign, shard, devices = _one_shard_campaign()
    answers = [
        Result(Target(devices[0].pk, devices[0].token), Outcome.DELIVERED, 200),
        Result(Target(devices[1].pk, devices[1].token), Outcome.INVALID_TOKEN, 404, "UNREGISTERED"),
        Result(Target(devices[2].pk, devices[2].token), Outcome.REJECTED, 400, "INVALID_ARGUMENT"),
    ]
    # The dead run: what it would have marked in the bitmap.
    assert ShardResults(attempt=0, max_attempts=3).add(devices, answers, hold_invalid=False) == [rows[0].pk]

    # The re-run: device 0 is in the bitmap; 1 and 2 are sent again and answer the same.
    results = ShardResults(attempt=0, max_attempts=3)
    results.add(devices[1:], answers[1:], hold_invalid=False)
    results.recover([rows[0].pk])
    versions = _row_versions([r.pk for r in rows])
    apply_shard_run(shard, results, loaded=3, park=None, rest_lo=None, rest_ids=None)

    campaign.refresh_from_db()
    counters = (campaign.delivered, campaign.skipped_duplicate, campaign.invalidated, campaign.failed)
    assert counters == (1, 1, 1, 1)
    assert campaign.processed == 3  # every device once
    assert campaign.sent == 3
    assert not DeviceToken.objects.get(pk=rows[1].pk).is_active
    # Writes in proportion to exceptions: the deactivated row is rewritten, the delivered and the
    # rejected device's rows are not touched (PostgreSQL's xmin changes on every row version).
    after = _row_versions([r.pk for r in rows])
    assert after[rows[0].pk] == versions[rows[0].pk] and after[rows[2].pk] == versions[rows[2].pk]
    assert after[rows[1].pk] != versions[rows[1].pk]


def _row_versions(pks: list[int]) -> dict[int, str]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id, xmin::text FROM {DeviceToken._meta.db_table} WHERE id = ANY(%s)", [pks])
        return dict(cursor.fetchall())
