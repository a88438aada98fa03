"""Correctness of a shard run under throttling, retries and lost leases, in-process.

Each test runs `campaigns.sending.run.run_shard` in this process (no worker) against the simulator's
fast front over TLS, on real PostgreSQL and Redis:
- one device's 429 backs off that device, never the app's rate;
- a run sends nothing once its lease is not its own, and never sleeps past it (it defers);
- a TTL is a deadline fixed at the first send: retries carry what remains, expired devices are
  counted `expired` and not sent, TTL 0 is one attempt;
- `invalidated` counts deactivations only; 410s kept by the timestamp rule count `invalid_kept`;
- the provider's message id reaches dead letters and a direct send's per-device results.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from campaigns import control, targeting
from campaigns.models import Campaign, DirectResult, OutcomeTally, Shard
from campaigns.pytest_fixtures import api_client
from campaigns.sending import run
from campaigns.testing import make_token, simulator_app
from delivery import idempotency, runtime
from delivery.models import DeadLetter
from delivery.ratelimit import TokenBucket, provider_key
from tokens.models import DeviceToken

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sim(fast_sim, settings):
    settings.CAMPAIGN_RETRY_BASE_S = 0.2
    settings.CAMPAIGN_RETRY_MAX_S = 2
    return fast_sim


def _devices(app, platform: str, faults: list[str | None], registered_ago: timedelta = timedelta(days=1)):
    when = timezone.now() - registered_ago
    tokens = [make_token(platform, fault) for fault in faults]
    rows = [
        DeviceToken(
            app=app,
            device_id=uuid.uuid4(),
            platform=platform,
            token=token,
            token_hash=hashlib.sha256(token.encode()).hexdigest(),
            user_id=f"u{i}",
            last_seen=when,
        )
        for i, token in enumerate(tokens)
    ]
    created = DeviceToken.objects.bulk_create(rows)
    DeviceToken.objects.filter(pk__in=[r.pk for r in created]).update(created_at=when, updated_at=when)
    return created


def _campaign(app, devices, message: dict, *, kind: str = Campaign.Kind.BROADCAST) -> tuple[Campaign, Shard]:
    """A running campaign of one list shard over `devices` (as planning would leave it)."""
    campaign = Campaign.objects.create(
        app=app,
        kind=kind,
        message=message,
        status=Campaign.Status.RUNNING,
        started_at=timezone.now(),
        planned=True,
        outstanding=1,
        targeted=len(devices),
    )
    control.arm(runtime.redis_client(), campaign.pk)
    platform = devices[0].platform
    shard = Shard.objects.create(
        campaign=campaign,
        platform=platform,
        queue=targeting.queue_for(campaign, platform),
        device_ids=[d.pk for d in devices],
        planned=len(devices),
    )
    return campaign, shard


def _children(campaign: Campaign) -> list[Shard]:
    return list(Shard.objects.filter(campaign=campaign, is_child=True).order_by("not_before"))


# --- per-device throttling ------------------------------------------------------------------------
def test_one_devices_429_backs_off_that_device_not_the_app(sim, redis_client) -> None:
    """The stand-in scenario: one device answers 429 TooManyRequests in a direct send; a 600-device
    campaign launched right after goes at once (its shard is not deferred, the bucket is not cut)
    and delivers every device once."""
    app = simulator_app(sim)
    [hot] = _devices(app, "ios", ["03"])
    direct, direct_shard = _campaign(app, [hot], {"title": "hi"}, kind=Campaign.Kind.DIRECT)
    run.run_shard(direct_shard.pk)
    assert sim.counts([hot.token]) == {hot.token: 0}, "answered 429, not delivered"
    [retry] = _children(direct)
    assert retry.device_ids == [hot.pk] and retry.attempt == 1
    assert "limit" not in {k.decode() for k in redis_client.hkeys(provider_key(app.pk, "ios"))}

    devices = _devices(app, "ios", [None] * 600)
    campaign, shard = _campaign(app, devices, {"title": "campaign"})
    started = time.monotonic()
    run.run_shard(shard.pk)
    took = time.monotonic() - started
    shard.refresh_from_db()
    campaign.refresh_from_db()
    print(f"\n600-device shard after one device's 429: ran in {took:.2f}s, status {shard.status}")
    assert shard.status == Shard.Status.DONE and shard.not_before is None, "sent at once, not deferred"
    assert campaign.status == Campaign.Status.COMPLETED
    assert campaign.delivered == 600 == campaign.sent
    counts = sim.counts([d.token for d in devices])
    assert set(counts.values()) == {1}, "each device delivered exactly once"
    assert "limit" not in {k.decode() for k in redis_client.hkeys(provider_key(app.pk, "ios"))}


def test_retries_wait_for_their_own_floor(sim) -> None:
    """A 429 (Retry-After 40 s) and a 500 (no Retry-After: 10 s) in one shard: two follow-ups,
    and the 500's is not held back to the 429's minute."""
    sim.configure(retry_after_s=40)
    app = simulator_app(sim)
    throttled, failed = _devices(app, "ios", ["03", "06"])
    campaign, shard = _campaign(app, [throttled, failed], {"title": "hi"})
    before = timezone.now()
    run.run_shard(shard.pk)
    early, late = _children(campaign)
    assert early.device_ids == [failed.pk] and late.device_ids == [throttled.pk]
    after = timezone.now()  # the children were timed between the two, however slow the machine
    assert early.not_before <= after + timedelta(seconds=11)
    assert late.not_before >= before + timedelta(seconds=39)
    campaign.refresh_from_db()
    assert campaign.retried == 2


# --- leases ---------------------------------------------------------------------------------------
def test_refresh_lease_only_by_its_owner(redis_client) -> None:
    key = idempotency.lease_key(1)
    assert idempotency.acquire_lease(redis_client, key, "a", 30) == 0
    assert idempotency.refresh_lease(redis_client, key, "a", 60) == 1
    assert redis_client.ttl(key) > 30
    assert idempotency.refresh_lease(redis_client, key, "b", 60) == 0
    assert redis_client.get(key) == b"a"
    redis_client.delete(key)
    assert idempotency.refresh_lease(redis_client, key, "a", 60) == 0, "a lost lease is not taken back"
    assert not redis_client.exists(key)


def test_a_run_that_lost_its_lease_sends_and_records_nothing(sim, redis_client) -> None:
    app = simulator_app(sim)
    devices = _devices(app, "android", [None] * 20)
    campaign, shard = _campaign(app, devices, {"title": "hi"})
    key = idempotency.lease_key(shard.pk)
    redis_client.set(key, "someone-else", ex=60)  # the shard's lease went to another run
    run.ShardRun(shard.pk, client=redis_client).run_leased(shard, campaign, "this-run")
    assert sim.stats()["requests"] == 0
    shard.refresh_from_db()
    campaign.refresh_from_db()
    assert shard.status == Shard.Status.PENDING and campaign.sent == 0
    assert redis_client.get(key) == b"someone-else"


def test_a_long_wait_for_the_rate_defers_the_shard_instead_of_sleeping(sim, settings, redis_client) -> None:
    settings.PUSH_RATE_LIMITS = {**settings.PUSH_RATE_LIMITS, "android": 10}
    app = simulator_app(sim)
    first_devices = _devices(app, "android", [None] * 100)
    second_devices = _devices(app, "android", [None] * 100)
    campaign, first = _campaign(app, first_devices, {"title": "hi"})
    second = Shard.objects.create(
        campaign=campaign,
        platform="android",
        queue="fcm",
        device_ids=[d.pk for d in second_devices],
        planned=100,
    )
    Campaign.objects.filter(pk=campaign.pk).update(outstanding=2, targeted=200)
    run.run_shard(first.pk)  # a burst of one chunk is free
    started, started_at = time.monotonic(), timezone.now()
    run.run_shard(second.pk)  # then 100 at 10/s: about 10 s of debt
    assert time.monotonic() - started < settings.BREAKER_SLEEP_MAX_S + 5, "deferred, not slept"
    second.refresh_from_db()
    assert second.status == Shard.Status.PENDING
    # Due seconds after the run began (not after this line: a loaded machine may be slow to get here).
    assert second.not_before is not None and second.not_before > started_at + timedelta(seconds=5)
    assert set(sim.counts([d.token for d in second_devices]).values()) == {0}
    # Its reservation went back: the bucket holds only the first shard's debt.
    wait = TokenBucket(redis_client).reserve(provider_key(app.pk, "android"), 10, 10, adaptive=True)
    assert wait < 3.0


# --- TTL ------------------------------------------------------------------------------------------
def test_a_retry_keeps_the_apns_expiration_of_the_first_send(sim) -> None:
    app = simulator_app(sim)
    healthy, throttled = _devices(app, "ios", [None, "03"])
    campaign, shard = _campaign(app, [healthy, throttled], {"title": "hi", "ttl": 600})
    run.run_shard(shard.pk)
    [retry] = _children(campaign)
    first = sim.last([healthy.token])[healthy.token]["headers"]["apns-expiration"]
    assert int(first) == int(retry.expires_at.timestamp())
    time.sleep(1.1)  # a second later: a relative TTL would now give another expiration
    run.run_shard(retry.pk)
    again = sim.last([throttled.token])[throttled.token]["headers"]["apns-expiration"]
    assert again == first


def test_an_fcm_retry_sends_the_time_that_remains(sim) -> None:
    app = simulator_app(sim)
    [device] = _devices(app, "android", ["03"])
    campaign, shard = _campaign(app, [device], {"title": "hi", "ttl": 3600})
    run.run_shard(shard.pk)
    [retry] = _children(campaign)
    # As if the retry ran 59 minutes later.
    Shard.objects.filter(pk=retry.pk).update(expires_at=timezone.now() + timedelta(seconds=60))
    run.run_shard(retry.pk)
    ttl = sim.last([device.token])[device.token]["message"]["android"]["ttl"]
    assert ttl.endswith("s") and 55 <= int(ttl[:-1]) <= 60


def test_a_retry_past_its_deadline_is_expired_not_sent(sim) -> None:
    app = simulator_app(sim)
    devices = _devices(app, "ios", ["03", "03"])
    campaign, shard = _campaign(app, devices, {"title": "hi", "ttl": 600})
    run.run_shard(shard.pk)
    [retry] = _children(campaign)
    Shard.objects.filter(pk=retry.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    requests = sim.stats()["requests"]
    run.run_shard(retry.pk)
    assert sim.stats()["requests"] == requests, "nothing sent after the deadline"
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.COMPLETED
    assert campaign.expired == 2 and campaign.failed == 0 and campaign.delivered == 0
    assert campaign.processed == campaign.targeted
    tally = OutcomeTally.objects.get(campaign=campaign, outcome="expired")
    assert (tally.reason, tally.count) == ("ttl_expired", 2)


def test_ttl_zero_is_one_attempt(sim) -> None:
    app = simulator_app(sim)
    healthy, throttled = _devices(app, "ios", [None, "03"])
    campaign, shard = _campaign(app, [healthy, throttled], {"title": "now or never", "ttl": 0})
    run.run_shard(shard.pk)
    assert sim.last([healthy.token])[healthy.token]["headers"]["apns-expiration"] == "0"
    assert _children(campaign) == []
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.COMPLETED
    assert (campaign.delivered, campaign.expired, campaign.retried) == (1, 1, 0)


# --- counting invalid answers ---------------------------------------------------------------------
def test_invalidated_counts_deactivations_and_kept_410s_separately(sim) -> None:
    app = simulator_app(sim)
    # Apple says these died an hour ago; one was registered again since, one before.
    sim.configure(unregistered_timestamp_ms=int((time.time() - 3600) * 1000))
    [fresh] = _devices(app, "ios", ["01"], registered_ago=timedelta(minutes=5))
    [old] = _devices(app, "ios", ["01"], registered_ago=timedelta(days=2))
    campaign, shard = _campaign(app, [fresh, old], {"title": "hi"})
    run.run_shard(shard.pk)
    campaign.refresh_from_db()
    assert (campaign.invalidated, campaign.invalid_kept) == (1, 1)
    assert DeviceToken.objects.get(pk=fresh.pk).is_active
    assert not DeviceToken.objects.get(pk=old.pk).is_active
    assert campaign.status == Campaign.Status.COMPLETED and campaign.processed == 2


# --- provider message ids -------------------------------------------------------------------------
def test_provider_message_ids_reach_dead_letters_and_direct_results(sim, settings) -> None:
    settings.CAMPAIGN_MAX_ATTEMPTS = 1
    app = simulator_app(sim)
    healthy, down = _devices(app, "ios", [None, "05"])
    campaign, shard = _campaign(app, [healthy, down], {"title": "hi"}, kind=Campaign.Kind.DIRECT)
    run.run_shard(shard.pk)
    dead = DeadLetter.objects.get(campaign=campaign)
    assert dead.device_pk == down.pk and dead.provider_message_id
    results = {r.device_pk: r for r in DirectResult.objects.filter(campaign=campaign)}
    assert results[healthy.pk].outcome == "delivered" and results[healthy.pk].provider_message_id
    assert results[down.pk].outcome == "dead_letter" and results[down.pk].status == 503

    client = api_client(app)
    page = client.get(f"/api/v1/campaigns/{campaign.pk}/results/?limit=1").json()
    assert len(page["results"]) == 1 and page["next_after"] == page["results"][0]["id"]
    rest = client.get(f"/api/v1/campaigns/{campaign.pk}/results/?after={page['next_after']}").json()
    assert rest["next_after"] is None
    by_device = {r["device_id"]: r for r in page["results"] + rest["results"]}
    assert by_device[str(healthy.device_id)]["provider_message_id"] == results[healthy.pk].provider_message_id
    bad = client.get(f"/api/v1/campaigns/{campaign.pk}/results/?limit=0")
    assert bad.status_code == 400 and "limit" in str(bad.json())


# --- a shard that raises --------------------------------------------------------------------------
def test_a_shard_that_keeps_raising_halts_its_campaign_and_nothing_else(sim) -> None:
    """Data the send path cannot handle (here a stored message that no longer validates) used to
    crash the task, and the recovery sweep re-published it every few seconds, forever."""
    from campaigns.tasks import send_shard

    app = simulator_app(sim)
    broken_devices = _devices(app, "android", [None] * 3)
    broken, broken_shard = _campaign(app, broken_devices, {"title": "x", "collapse_key": "caf\u00e9"})
    healthy_devices = _devices(app, "android", [None] * 3)
    healthy, healthy_shard = _campaign(app, healthy_devices, {"title": "fine"})

    for attempt in range(1, run.SHARD_MAX_FAILURES + 1):
        outcome = send_shard.apply(args=[broken_shard.pk])
        assert outcome.failed()
        broken_shard.refresh_from_db()
        assert broken_shard.failures == attempt and "collapse_key" in broken_shard.last_error
    broken.refresh_from_db()
    assert broken.status == Campaign.Status.HALTED
    assert f"shard {broken_shard.pk} failed 3 times" in broken.status_reason
    assert broken_shard.status == Shard.Status.PAUSED, "parked: the recovery sweep leaves it alone"
    assert sim.stats()["requests"] == 0

    send_shard.apply(args=[healthy_shard.pk])
    healthy.refresh_from_db()
    assert healthy.status == Campaign.Status.COMPLETED and healthy.delivered == 3
