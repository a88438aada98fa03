"""Idempotency-Key on POST /api/v1/notifications/ and /campaigns/ (campaigns/idempotent.py).

Real PostgreSQL (the unique (app, key) index is what is under test), Redis, and the simulator's
fast front over TLS for the sends, run in this process with `run.run_shard` (no worker).
Concurrent duplicates are real threads, each on its own database connection.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.db import connection, transaction
from django.utils import timezone

from campaigns import idempotent
from campaigns.models import Campaign, IdempotencyKey, Shard
from campaigns.pytest_fixtures import api_client
from campaigns.sending import run
from campaigns.testing import build_population, load_devices, simulator_app
from tokens.testing import make_app

pytestmark = pytest.mark.django_db(transaction=True)

NOTIFY = "/api/v1/notifications/"
CAMPAIGNS = "/api/v1/campaigns/"


def _post(client, path: str, body: dict, key: str | None):
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post(path, body, format="json", **headers)


def _run_pending_shards(campaign_ids: list[int]) -> None:
    for shard_id in Shard.objects.filter(campaign_id__in=campaign_ids).values_list("pk", flat=True):
        run.run_shard(shard_id)


def test_a_retried_direct_send_gets_the_first_answer_and_sends_once(fast_sim) -> None:
    app = simulator_app(fast_sim)
    population = load_devices(app, build_population({"ios": 3, "android": 3}, {}))
    client = api_client(app)
    body = {"message": {"title": "2FA", "body": "123456"}, "user_ids": [f"u{i}" for i in range(6)]}

    first = _post(client, NOTIFY, body, "order-42")
    assert first.status_code == 202, first.content
    _run_pending_shards([first.json()["id"]])
    # Keys in another order, as a client re-serialising the same object: the same request.
    again = _post(client, NOTIFY, {"user_ids": body["user_ids"], "message": body["message"]}, "order-42")

    assert again.status_code == 202
    assert again.json() == first.json(), "the first answer, not the campaign as it is now"
    assert again["Idempotent-Replayed"] == "true"
    assert Campaign.objects.filter(app=app).count() == 1
    _run_pending_shards([first.json()["id"]])
    assert set(fast_sim.counts(population.of()).values()) == {1}, "each device sent to once"


def test_the_same_key_with_another_body_or_endpoint_is_a_422_and_sends_nothing(db) -> None:
    app = make_app()
    client = api_client(app)
    first = _post(client, NOTIFY, {"message": {"title": "a"}, "user_ids": ["u1"]}, "k1")
    assert first.status_code == 202

    other_body = _post(client, NOTIFY, {"message": {"title": "b"}, "user_ids": ["u1"]}, "k1")
    assert other_body.status_code == 422
    assert "another body" in other_body.json()["detail"]
    other_endpoint = _post(client, CAMPAIGNS, {"message": {"title": "a"}, "draft": True}, "k1")
    assert other_endpoint.status_code == 422
    assert Campaign.objects.filter(app=app).count() == 1

    # Keys are per app: another app's identical key is its own.
    other_app = api_client(make_app())
    assert _post(other_app, NOTIFY, {"message": {"title": "b"}, "user_ids": ["u1"]}, "k1").status_code == 202


def test_a_campaign_retry_returns_the_same_campaign_id_and_status(db, redis_client) -> None:
    client = api_client(make_app())
    body = {"name": "spring", "message": {"title": "Sale"}, "draft": True}
    first = _post(client, CAMPAIGNS, body, "campaign-7")
    again = _post(client, CAMPAIGNS, body, "campaign-7")
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert Campaign.objects.count() == 1
    # Without the header nothing changes: two requests, two campaigns.
    _post(client, CAMPAIGNS, body, None)
    _post(client, CAMPAIGNS, body, None)
    assert Campaign.objects.count() == 3


def test_a_refused_request_gives_its_key_back(db) -> None:
    client = api_client(make_app())
    bad = _post(client, NOTIFY, {"message": {"titel": "typo"}, "user_ids": ["u1"]}, "fix-me")
    assert bad.status_code == 400
    assert not IdempotencyKey.objects.exists()
    fixed = _post(client, NOTIFY, {"message": {"title": "typo"}, "user_ids": ["u1"]}, "fix-me")
    assert fixed.status_code == 202


@pytest.mark.parametrize("key", ["", " lead", "x" * 256, "caf\u00e9"])
def test_a_malformed_key_is_a_400_that_says_so(db, key) -> None:
    client = api_client(make_app())
    r = _post(client, NOTIFY, {"message": {"title": "a"}, "user_ids": ["u1"]}, key)
    assert r.status_code == 400, (key, r.content)
    assert "Idempotency-Key" in str(r.json()["errors"])
    assert not Campaign.objects.exists()


def test_concurrent_duplicates_make_one_campaign_and_one_send(fast_sim) -> None:
    """Eight threads post the same request with the same key at once (a barrier releases them
    together), each on its own PostgreSQL connection: one campaign, each device sent to once;
    every answer is the campaign (202) or "in progress" (409), never a second campaign."""
    app = simulator_app(fast_sim)
    population = load_devices(app, build_population({"android": 20, "ios": 20}, {}))
    body = {"message": {"title": "once"}, "user_ids": [f"u{i}" for i in range(40)]}
    callers = 8
    barrier = threading.Barrier(callers)
    clients = [api_client(app) for _ in range(callers)]

    def call(client):
        try:
            barrier.wait()
            response = _post(client, NOTIFY, body, "burst")
            return response.status_code, response.json()
        finally:
            connection.close()

    with ThreadPoolExecutor(callers) as pool:
        answers = list(pool.map(call, clients))

    campaigns = list(Campaign.objects.filter(app=app).values_list("pk", flat=True))
    assert len(campaigns) == 1, answers
    codes = [code for code, _ in answers]
    print(f"\n{callers} concurrent duplicates answered {sorted(codes)}")
    assert set(codes) <= {202, 409} and codes.count(202) >= 1, codes
    assert {body["id"] for code, body in answers if code == 202} == set(campaigns)
    assert all("still being processed" in body["detail"] for code, body in answers if code == 409)
    _run_pending_shards(campaigns)
    assert set(fast_sim.counts(population.of()).values()) == {1}
    assert Campaign.objects.get().delivered == 40


def test_a_duplicate_while_the_first_runs_is_a_409_with_retry_after(db) -> None:
    app = make_app()
    client = api_client(app)
    body = {"message": {"title": "a"}, "user_ids": ["u1"]}
    # The first request's claim, as `respond` takes it before running the request.
    digest = idempotent.fingerprint("notifications", body)
    claim = idempotent._claim(app.pk, "slow", digest)
    assert claim is not None

    r = _post(client, NOTIFY, body, "slow")
    assert r.status_code == 409 and r["Retry-After"] == "1"
    assert not Campaign.objects.exists()


def test_a_claim_whose_request_died_is_taken_over_or_answered_from_its_campaign(db, redis_client) -> None:
    app = make_app()
    client = api_client(app)
    body = {"message": {"title": "a"}, "user_ids": ["u1"]}
    digest = idempotent.fingerprint("notifications", body)
    past = timezone.now() - timedelta(seconds=1)

    # Died before creating anything: after IDEMPOTENCY_LOCK_S the retry runs the request.
    assert idempotent._claim(app.pk, "died-early", digest) is not None
    IdempotencyKey.objects.filter(key="died-early").update(locked_until=past)
    r = _post(client, NOTIFY, body, "died-early")
    assert r.status_code == 202 and Campaign.objects.count() == 1

    # Died after creating its campaign: the retry answers with that campaign, creates none.
    claim = idempotent._claim(app.pk, "died-late", digest)
    campaign = Campaign.objects.create(app=app, kind=Campaign.Kind.DIRECT, message={"title": "a"})
    claim.attach(campaign)
    IdempotencyKey.objects.filter(key="died-late").update(locked_until=past)
    r = _post(client, NOTIFY, body, "died-late")
    assert r.status_code == 202 and r.json()["id"] == campaign.pk
    assert Campaign.objects.count() == 2


def test_keys_expire_after_the_ttl(db, settings, redis_client) -> None:
    app = make_app()
    client = api_client(app)
    body = {"message": {"title": "a"}, "user_ids": ["u1"]}
    assert _post(client, NOTIFY, body, "old").status_code == 202
    assert _post(client, NOTIFY, body, "fresh").status_code == 202
    IdempotencyKey.objects.filter(key="old").update(expires_at=timezone.now() - timedelta(seconds=1))

    # Past its TTL a key is free at once, before the beat job has deleted it.
    again = _post(client, NOTIFY, {"message": {"title": "new"}, "user_ids": ["u1"]}, "old")
    assert again.status_code == 202 and "Idempotent-Replayed" not in again
    assert Campaign.objects.count() == 3

    IdempotencyKey.objects.filter(key="old").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert idempotent.expire_keys() == 1
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["fresh"]
    row = IdempotencyKey.objects.get()
    ttl = (row.expires_at - row.created_at).total_seconds()
    assert ttl == settings.IDEMPOTENCY_TTL_S == 24 * 3600


def test_the_expiry_job_is_on_the_beat_schedule_and_registered() -> None:
    from pushsvc.celery import app

    entry = django_settings.CELERY_BEAT_SCHEDULE["campaigns-expire-idempotency-keys"]
    app.loader.import_default_modules()
    assert entry["task"] in app.tasks
    assert entry["schedule"] == django_settings.IDEMPOTENCY_EXPIRE_INTERVAL_S


def test_a_request_overtaken_by_a_retry_creates_nothing(db) -> None:
    """A request that ran past IDEMPOTENCY_LOCK_S before creating its campaign finds its claim taken
    over by a retry (a new owner): its campaign is rolled back, the retry is the one that sends."""
    app = make_app()
    claim = idempotent._claim(app.pk, "slowpoke", "digest")
    IdempotencyKey.objects.filter(pk=claim.row_id).update(owner=uuid.uuid4())
    with pytest.raises(idempotent.KeyInProgress), transaction.atomic():
        claim.attach(Campaign.objects.create(app=app, message={"title": "x"}))
    assert not Campaign.objects.exists()
