"""Canary cohorts (campaigns/canary.py), in-process: the API's validation, the sample (its size,
its randomness), the decision (continue, pause with the figures), resume and cancel after a
pause, and the wait as a stored deadline.

Campaigns are created through the API; the planning task and the shard runs that a worker would
pick up are run here, one after the other (`planning.plan`, `run.run_shard`), against the
simulator's fast front over TLS, real PostgreSQL and Redis. Errors come from the simulator's
deterministic token faults: `01` (APNs 410 Unregistered; kept active when Apple's timestamp is
older than the registration, so a re-send would be possible) and `02` (bad token, deactivated).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.utils import timezone

from campaigns import canary, planning, recovery, targeting
from campaigns.models import Campaign, CanaryMember, Shard
from campaigns.pytest_fixtures import api_client
from campaigns.sending import run
from campaigns.testing import build_population, load_devices, simulator_app
from tokens.models import DeviceToken
from tokens.testing import make_app

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sim(fast_sim, settings):
    settings.CAMPAIGN_RETRY_BASE_S = 0.2
    settings.CAMPAIGN_RETRY_MAX_S = 2
    settings.CAMPAIGN_SHARD_SIZE = 40  # the sample and the rest each take several shards
    # The mass-prune guard is another feature: kept out of the error-heavy populations here.
    settings.CAMPAIGN_PRUNE_GUARD_MIN = 100_000
    return fast_sim


def _create(client, **body):
    return client.post("/api/v1/campaigns/", {"message": {"title": "canary"}, **body}, format="json")


def _launch(app, canary_cfg: dict) -> int:
    response = _create(api_client(app), canary=canary_cfg)
    assert response.status_code == 201, response.json()
    assert response.json()["canary"]["phase"] == "pending"
    return response.json()["id"]


def _drain(campaign_id: int) -> int:
    """Run every pending shard of the campaign (retries included, without their countdown) until
    none is left, as the send workers would; how many runs."""
    runs = 0
    for _ in range(20):
        pending = list(
            Shard.objects.filter(campaign_id=campaign_id, status=Shard.Status.PENDING)
            .order_by("id")
            .values_list("pk", flat=True)
        )
        if not pending:
            return runs
        for shard_id in pending:
            run.run_shard(shard_id)
            runs += 1
    raise AssertionError("shards still pending after 20 rounds")


def _campaign(campaign_id: int) -> Campaign:
    return Campaign.objects.get(pk=campaign_id)


def _members(campaign_id: int) -> set[int]:
    return set(CanaryMember.objects.filter(campaign_id=campaign_id).values_list("device_pk", flat=True))


def _kept_410s(sim) -> None:
    """Apple's 410 timestamps two days old: devices registered a day ago keep their tokens
    (invalid_kept), so only the canary's own exclusion keeps them from a second send."""
    sim.configure(unregistered_timestamp_ms=int((time.time() - 2 * 86400) * 1000))


# --- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"size": 0}, "size"),
        ({"size": canary.MAX_SIZE + 1}, "size"),
        ({"size": "many"}, "size"),
        ({"size": 10, "wait_s": -1}, "wait_s"),
        ({"size": 10, "wait_s": canary.MAX_WAIT_S + 1}, "wait_s"),
        ({"size": 10, "max_error_rate": 1.5}, "max_error_rate"),
        ({"size": 10, "max_error_rate": -0.01}, "max_error_rate"),
        ({"size": 10, "max_error_rate": None}, "max_error_rate"),
    ],
)
def test_bad_canary_options_are_a_400_naming_the_field(cfg, field) -> None:
    app = make_app()
    response = _create(api_client(app), canary=cfg)
    assert response.status_code == 400
    body = response.json()
    assert field in body["errors"]["canary"], body
    assert not Campaign.objects.filter(app=app).exists()


def test_canary_null_or_not_an_object_is_a_400() -> None:
    app = make_app()
    for value in (None, 5, "yes", [1]):
        response = _create(api_client(app), canary=value)
        assert response.status_code == 400 and "canary" in response.json()["errors"], value


def test_a_direct_send_with_a_canary_is_a_400() -> None:
    app = make_app()
    response = api_client(app).post(
        "/api/v1/notifications/",
        {"message": {"title": "x"}, "user_ids": ["u1"], "canary": {"size": 1}},
        format="json",
    )
    assert response.status_code == 400
    assert "broadcast" in response.json()["errors"]["canary"][0]
    assert not Campaign.objects.filter(app=app).exists()


def test_defaults_and_the_detail_shows_the_canary() -> None:
    app = make_app()
    response = _create(api_client(app), canary={}, draft=True)
    assert response.status_code == 201
    shown = response.json()["canary"]
    assert (shown["size"], shown["wait_s"], shown["max_error_rate"]) == (1000, 0, 0.05)
    assert shown["phase"] == "pending" and shown["figures"] is None and shown["decision"] is None
    plain = _create(api_client(app), draft=True).json()
    assert plain["canary"] is None


# --- the sample -----------------------------------------------------------------------------------
def test_the_sample_has_its_size_is_random_and_is_sent_first(sim) -> None:
    app = simulator_app(sim)
    load_devices(app, build_population({"ios": 250, "android": 250}, {}))
    first = _launch(app, {"size": 60})
    second = _launch(app, {"size": 60})
    planning.plan(first)
    planning.plan(second)

    target = list(
        targeting.target_queryset(_campaign(first)).order_by("platform", "id").values_list("id", flat=True)
    )
    one, two = _members(first), _members(second)
    assert len(one) == len(two) == 60
    assert one <= set(target) and two <= set(target)
    assert one != set(target[:60]) and one != set(target[-60:]), "not the first (or last) ids"
    assert one != two, "drawn afresh for each campaign"
    platforms = set(DeviceToken.objects.filter(pk__in=one).values_list("platform", flat=True))
    assert platforms == {"ios", "android"}, "drawn over the whole target"

    campaign = _campaign(first)
    assert campaign.canary_phase == "sending" and not campaign.planned
    assert campaign.targeted == 60 and campaign.canary_result == {"sample": 60, "target": 500}
    shards = list(Shard.objects.filter(campaign=campaign))
    assert all(not s.is_range for s in shards), "only the sample's list shards: the rest waits"
    assert sorted(pk for s in shards for pk in s.device_ids) == sorted(one)
    assert {s.queue for s in shards} == {"apns", "fcm"}, "on the provider queues"
    assert campaign.outstanding == len(shards) + 1, "the planner's hold stays until the rest is planned"

    # Planning again (a redelivered task, recovery) draws nothing new.
    planning.plan(first)
    assert _members(first) == one and Shard.objects.filter(campaign_id=first).count() == len(shards)


def test_draw_sample_is_uniform() -> None:
    app = make_app()
    load_devices(app, build_population({"android": 20}, {}))
    qs = DeviceToken.objects.filter(app=app, is_active=True)
    rng = random.Random(1234)
    seen: Counter[int] = Counter()
    for _ in range(400):
        total, rows = canary.draw_sample(qs, 5, rng)
        assert total == 20 and len({pk for pk, _ in rows}) == 5
        seen.update(pk for pk, _ in rows)
    # 400 draws of 5 in 20: each device expected 100 times (sd ~8.7).
    assert len(seen) == 20 and min(seen.values()) > 60 and max(seen.values()) < 140, seen
    assert len(canary.draw_sample(qs, 50, rng)[1]) == 20, "a sample larger than the target is all of it"


# --- the decision ---------------------------------------------------------------------------------
def test_under_the_limit_the_rest_follows_and_every_device_gets_one_send(sim) -> None:
    _kept_410s(sim)
    app = simulator_app(sim)
    population = load_devices(app, build_population({"ios": 300}, {"ios": {"01": 6}}))
    campaign_id = _launch(app, {"size": 100, "max_error_rate": 0.1})  # at worst 6 of 100: 6 %
    planning.plan(campaign_id)
    sample = _members(campaign_id)
    _drain(campaign_id)

    campaign = _campaign(campaign_id)
    # wait_s 0: the run that recorded the sample's last shard decided at once.
    assert campaign.canary_phase == "passed" and campaign.status == "running"
    result = campaign.canary_result
    assert result["decision"] == "continue" and result["answered"] == 100
    assert result["errors"] == result["invalid_kept"] <= 6
    assert not Shard.objects.filter(campaign=campaign, lo__isnull=False).exists(), "rest not yet planned"

    planning.plan(campaign_id)  # the task the decision published
    rest = list(Shard.objects.filter(campaign=campaign, lo__isnull=False))
    assert rest and sum(s.planned for s in rest) == 200, "the rest leaves the sample out"
    _drain(campaign_id)

    campaign = _campaign(campaign_id)
    assert campaign.status == "completed"
    assert (campaign.targeted, campaign.sent) == (300, 300), "one request per device, none twice"
    assert (campaign.delivered, campaign.invalid_kept, campaign.skipped_duplicate) == (294, 6, 0)
    counts = sim.counts(population.of("ios", ""))
    assert set(counts.values()) == {1}, "every healthy device delivered exactly once"
    kept = DeviceToken.objects.filter(app=app, token__in=population.of("ios", "01"))
    assert kept.filter(is_active=True).count() == 6, "their 410s were older: still active, still sent once"
    assert len(sample) == 100

    shown = api_client(app).get(f"/api/v1/campaigns/{campaign_id}/").json()["canary"]
    assert shown["phase"] == "passed" and shown["decision"] == "continue" and shown["sample"] == 100
    assert shown["figures"]["answered"] == 100 and shown["figures"]["error_rate"] <= 0.06


def _paused_canary(sim, faulty: int, total: int, size: int) -> tuple[int, list[str]]:
    app = simulator_app(sim)
    population = load_devices(app, build_population({"android": total}, {"android": {"02": faulty}}))
    campaign_id = _launch(app, {"size": size, "max_error_rate": 0.05})
    planning.plan(campaign_id)
    _drain(campaign_id)
    return campaign_id, population.of("android", "")


def test_over_the_limit_the_campaign_pauses_with_the_figures(sim) -> None:
    campaign_id, _ = _paused_canary(sim, faulty=7, total=100, size=100)
    campaign = _campaign(campaign_id)
    assert campaign.status == "paused" and campaign.canary_phase == "failed"
    assert campaign.status_reason.startswith("canary: 7 of 100 failed (7.0 % > 5.0 %)"), (
        campaign.status_reason
    )
    assert "resume" in campaign.status_reason
    assert campaign.canary_result["decision"] == "pause"
    assert (campaign.canary_result["invalidated"], campaign.canary_result["delivered"]) == (7, 93)
    assert not campaign.planned and campaign.outstanding == 1

    # Nothing plans the rest while it is paused: not a redelivered task, not recovery.
    planning.plan(campaign_id)
    assert not Shard.objects.filter(campaign_id=campaign_id, lo__isnull=False).exists()
    assert _campaign(campaign_id).canary_phase == "failed"

    detail = api_client(campaign.app).get(f"/api/v1/campaigns/{campaign_id}/").json()
    assert detail["status"] == "paused" and detail["canary"]["decision"] == "pause"
    assert detail["canary"]["figures"]["errors"] == 7 and detail["canary"]["figures"]["error_rate"] == 0.07


def test_resume_after_a_canary_pause_sends_the_rest_once(sim) -> None:
    # 150 of 200 devices bad, a sample of 100: at least 50 errors, whichever 100 are drawn.
    campaign_id, healthy = _paused_canary(sim, faulty=150, total=200, size=100)
    campaign = _campaign(campaign_id)
    assert campaign.status == "paused" and campaign.canary_result["errors"] >= 50
    sample = _members(campaign_id)

    response = api_client(campaign.app).post(f"/api/v1/campaigns/{campaign_id}/resume/", {}, format="json")
    assert response.status_code == 200, response.json()
    planning.plan(campaign_id)  # the task the resume published
    campaign = _campaign(campaign_id)
    assert campaign.canary_phase == "overridden" and "resumed_at" in campaign.canary_result
    _drain(campaign_id)

    campaign = _campaign(campaign_id)
    assert campaign.status == "completed"
    assert (campaign.sent, campaign.delivered, campaign.invalidated) == (200, 50, 150)
    assert set(sim.counts(healthy).values()) == {1}, "the healthy devices, sample or rest, once each"
    rest = Shard.objects.filter(campaign=campaign, lo__isnull=False)
    assert sum(s.planned for s in rest) == 100, "the 100 devices outside the sample"
    loaded = canary.rest_of(campaign, targeting.target_queryset(campaign))
    assert not set(loaded.values_list("id", flat=True)) & sample


def test_cancel_after_a_canary_pause_sends_nothing_more(sim, redis_client) -> None:
    campaign_id, _ = _paused_canary(sim, faulty=7, total=100, size=100)
    campaign = _campaign(campaign_id)
    response = api_client(campaign.app).post(f"/api/v1/campaigns/{campaign_id}/cancel/", {}, format="json")
    assert response.status_code == 200
    planning.plan(campaign_id)
    campaign = _campaign(campaign_id)
    assert campaign.status == "cancelled" and campaign.sent == 100
    assert not Shard.objects.filter(campaign=campaign, lo__isnull=False).exists()
    assert recovery.replan_lost(redis_client, grace=0) == 0


# --- the wait -------------------------------------------------------------------------------------
def test_the_wait_is_a_stored_deadline_kept_by_the_sweep(sim, redis_client) -> None:
    app = simulator_app(sim)
    population = load_devices(app, build_population({"android": 120}, {}))
    campaign_id = _launch(app, {"size": 30, "wait_s": 600})
    planning.plan(campaign_id)
    before = timezone.now()
    _drain(campaign_id)

    campaign = _campaign(campaign_id)
    assert campaign.canary_phase == "waiting" and campaign.status == "running"
    decide_at = campaign.canary_decide_at
    assert before + timedelta(seconds=600) <= decide_at <= timezone.now() + timedelta(seconds=600)
    assert api_client(app).get(f"/api/v1/campaigns/{campaign_id}/").json()["canary"]["decide_at"]

    # Before the deadline nothing decides, and nothing plans: not the sweep, not a lost-planner check
    # (a worker that died meanwhile loses nothing: the deadline is the row's).
    assert canary.decide_due(redis_client, now=decide_at - timedelta(seconds=1)) == []
    recovery.sweep(redis_client)
    assert recovery.replan_lost(redis_client, grace=0) == 0
    assert _campaign(campaign_id).canary_phase == "waiting"
    assert not Shard.objects.filter(campaign_id=campaign_id, lo__isnull=False).exists()

    # Paused meanwhile: due, but not decided until it runs again.
    client = api_client(app)
    assert client.post(f"/api/v1/campaigns/{campaign_id}/pause/", {}, format="json").status_code == 200
    assert canary.decide_due(redis_client, now=decide_at) == []
    assert client.post(f"/api/v1/campaigns/{campaign_id}/resume/", {}, format="json").status_code == 200

    assert canary.decide_due(redis_client, now=decide_at) == [campaign_id]
    assert canary.decide_due(redis_client, now=decide_at) == [], "decided once"
    assert _campaign(campaign_id).canary_phase == "passed"
    planning.plan(campaign_id)
    _drain(campaign_id)
    campaign = _campaign(campaign_id)
    assert campaign.status == "completed" and (campaign.sent, campaign.delivered) == (120, 120)
    assert set(sim.counts(population.of()).values()) == {1}


def test_a_lost_planning_task_after_the_decision_is_published_again(sim, redis_client) -> None:
    """The decision commits, then its planning message is lost: recovery's replan_lost finds the
    passed canary with nothing planned and publishes planning again."""
    app = simulator_app(sim)
    load_devices(app, build_population({"android": 50}, {}))
    campaign_id = _launch(app, {"size": 10, "wait_s": 600})
    planning.plan(campaign_id)
    _drain(campaign_id)
    decide_at = _campaign(campaign_id).canary_decide_at
    assert canary.decide(redis_client, campaign_id, now=decide_at) == "continue"
    Campaign.objects.filter(pk=campaign_id).update(started_at=timezone.now() - timedelta(hours=1))
    redis_client.delete(f"pushsvc:plan-lease:{campaign_id}")
    assert recovery.replan_lost(redis_client, grace=0) == 1


# --- the admin ------------------------------------------------------------------------------------
@pytest.fixture
def staff(redis_client):
    from django.contrib.auth.models import User
    from django.test import Client

    client = Client()
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw-ops-123"))
    return client


def _admin_add(staff, app, cohort: str):
    return staff.post(
        "/admin/campaigns/campaign/add/",
        {
            "app": app.pk,
            "name": "canary",
            "message": '{"title": "Hi"}',
            "target": "",
            "send_at_0": "",
            "send_at_1": "",
            "rollout_start_rate": "",
            "rollout_max_rate": "",
            "rollout_ramp_minutes": "0",
            "halt_error_rate": "0.05",
            "canary": cohort,
        },
    )


def test_the_admin_creates_a_canary_campaign_and_shows_its_decision(sim, staff) -> None:
    app = simulator_app(sim)
    refused = _admin_add(staff, app, '{"size": 0}')
    assert refused.status_code == 200 and "size: Ensure this value is greater than or equal to 1" in (
        refused.content.decode()
    )
    assert _admin_add(staff, app, '{"size": 10, "wait_s": 5}').status_code == 302
    draft = Campaign.objects.get(app=app)
    assert draft.canary == {"size": 10, "wait_s": 5, "max_error_rate": 0.05}
    assert draft.canary_phase == "pending"

    campaign_id, _ = _paused_canary(sim, faulty=7, total=100, size=100)
    page = staff.get(f"/admin/campaigns/campaign/{campaign_id}/change/").content.decode()
    assert "100 devices, wait 0 s, limit 5.0 %" in page
    assert "phase failed" in page and "7 of 100 failed (7.0 %) → pause" in page
    assert "canary: 7 of 100 failed (7.0 % &gt; 5.0 %)" in page, "the pause reason"


# --- edges ----------------------------------------------------------------------------------------
def test_an_empty_target_completes_without_a_sample(sim) -> None:
    app = simulator_app(sim)
    campaign_id = _launch(app, {"size": 10})
    planning.plan(campaign_id)
    campaign = _campaign(campaign_id)
    assert campaign.status == "completed" and campaign.canary_phase == "passed"
    assert campaign.canary_result["sample"] == 0 and not _members(campaign_id)


def test_a_planner_lost_before_the_sample_is_started_again(sim, redis_client) -> None:
    app = simulator_app(sim)
    load_devices(app, build_population({"android": 30}, {}))
    campaign_id = _launch(app, {"size": 10})
    Campaign.objects.filter(pk=campaign_id).update(started_at=timezone.now() - timedelta(hours=1))
    assert recovery.replan_lost(redis_client, grace=0) == 1, "pending: its planner is needed"
    planning.plan(campaign_id)
    assert _campaign(campaign_id).canary_phase == "sending"
    assert recovery.replan_lost(redis_client, grace=0) == 0, "the sample is out: no planner needed"


def test_duplicate_keeps_the_canary_settings(redis_client) -> None:
    from campaigns import actions

    app = make_app()
    response = _create(api_client(app), canary={"size": 7, "wait_s": 9, "max_error_rate": 0.2}, draft=True)
    original = _campaign(response.json()["id"])
    Campaign.objects.filter(pk=original.pk).update(canary_phase="failed", canary_result={"sample": 7})
    original.refresh_from_db()
    copy = actions.duplicate(original)
    assert copy.canary == {"size": 7, "wait_s": 9, "max_error_rate": 0.2}
    assert copy.canary_phase == "pending" and copy.canary_result is None
