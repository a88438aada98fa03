"""Fan-out mechanics: planning ranges, a worker killed mid-shard, scheduled sends (beat)."""

from __future__ import annotations

import itertools
import os
import signal
from datetime import timedelta

import pytest
from django.utils import timezone

from campaigns import planning, targeting
from campaigns.models import Campaign, Shard
from campaigns.pytest_fixtures import *  # noqa: F403  (the fixtures: sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.tasks import send_shard
from campaigns.testing import build_population, load_devices, sim_counts, simulator_app, wait_for
from delivery import idempotency
from tokens.models import DeviceToken
from tokens.testing import make_app

pytestmark = pytest.mark.django_db(transaction=True)


def test_planning_covers_the_segment_exactly_with_keyset_ranges(settings) -> None:
    settings.CAMPAIGN_SHARD_SIZE = 100
    app = make_app()
    other = make_app()
    load_devices(app, build_population({"ios": 1234, "android": 250}, {}))
    load_devices(other, build_population({"ios": 300}, {}), user_prefix="o")
    middle = (
        DeviceToken.objects.filter(app=app, platform="ios").order_by("id").values_list("id", flat=True)[500]
    )
    DeviceToken.objects.filter(id=middle).update(is_active=False)

    qs = DeviceToken.objects.filter(app=app, is_active=True, platform="ios")
    ranges = list(planning.iter_ranges(qs, 100))
    assert [n for _, _, n in ranges] == [100] * 12 + [33]
    for (lo, hi, n), (next_lo, _, _) in itertools.pairwise(ranges):
        assert hi == next_lo, "ranges are contiguous"
        assert qs.filter(id__gt=lo, id__lte=hi).count() == n
    assert ranges[0][0] == 0
    assert sum(qs.filter(id__gt=lo, id__lte=hi).count() for lo, hi, _ in ranges) == 1233


def test_target_filters_platforms_users_versions_and_activity() -> None:
    app = make_app()
    load_devices(app, build_population({"ios": 200, "android": 120}, {}))
    android = DeviceToken.objects.filter(app=app, platform="android").order_by("id")
    ids = list(android.values_list("id", flat=True)[:4])
    DeviceToken.objects.filter(id__in=ids[:3]).update(app_version="2.10.1")
    DeviceToken.objects.filter(id=ids[3]).update(app_version="2.9")
    DeviceToken.objects.filter(app=app, platform="ios").update(app_version="3.0")
    campaign = Campaign.objects.create(
        app=app, message={"title": "x"}, target={"platforms": ["android"], "min_app_version": "2.10"}
    )
    # Numeric, not lexicographic: 2.10.1 >= 2.10 > 2.9; iOS is excluded by platform.
    assert set(targeting.target_queryset(campaign).values_list("id", flat=True)) == set(ids[:3])
    assert targeting.target_platforms(campaign) == ["android"]

    campaign.target = {"max_app_version": "2.9.5"}
    assert list(targeting.target_queryset(campaign).values_list("id", flat=True)) == [ids[3]]

    users = list(DeviceToken.objects.filter(app=app).values_list("user_id", flat=True)[:2])
    campaign.target = {"user_ids": users}
    assert targeting.target_queryset(campaign).count() == 2

    campaign.started_at = timezone.now()
    DeviceToken.objects.filter(id__in=ids).update(last_seen=timezone.now() - timedelta(days=40))
    campaign.target = {"active_within_days": 30}
    assert targeting.target_queryset(campaign).count() == 320 - 4

    # Planning refuses a campaign that is not running.
    planning.plan(campaign.pk)
    assert not Shard.objects.filter(campaign=campaign).exists()


def test_idempotency_bitmap_round_trip(redis_client) -> None:
    ids = [1, 2, 5, 1 << 24, (1 << 24) + 3, (1 << 40) + 7]
    assert idempotency.finished(redis_client, 9, ids) == set()
    idempotency.mark_finished(redis_client, 9, ids[::2])
    assert idempotency.finished(redis_client, 9, ids) == set(ids[::2])
    assert idempotency.finished(redis_client, 10, ids) == set()


def test_idempotency_dense_and_sparse_encodings_set_and_read_the_same_bits(redis_client) -> None:
    base = (3 << 24) + 1001  # not byte-aligned, in a block of its own
    dense = list(range(base, base + 400))
    sparse = [base + 7, base + 5_000, base + 90_000]  # BITFIELD, bit by bit
    # A bitmap written bit by bit (by the code before the byte ranges: campaigns in flight during
    # an upgrade) reads the same through GETRANGE.
    idempotency.mark_finished(redis_client, 1, sparse)
    assert idempotency.finished(redis_client, 1, dense) == {base + 7}
    # The OR script keeps the bits already set in the bytes it writes (a neighbour's, a retry's).
    idempotency.mark_finished(redis_client, 1, dense[10::3])
    assert idempotency.finished(redis_client, 1, dense) == {base + 7, *dense[10::3]}
    assert idempotency.finished(redis_client, 1, sparse) == set(sparse)
    # The same bits as BITFIELD sets, bit for bit (SETBIT's order: bit 0 is byte 0's highest).
    for device_id in dense[10::3]:
        redis_client.setbit("check", device_id & idempotency.BLOCK_MASK, 1)
    for device_id in sparse:
        redis_client.setbit("check", device_id & idempotency.BLOCK_MASK, 1)
    assert redis_client.get("check") == redis_client.get(idempotency._key(1, 3))


def test_a_worker_killed_mid_shard_repeats_at_most_the_requests_in_flight(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    population = load_devices(app, build_population({"ios": 1000}, {}))
    fresh_sim.configure(latency_ms=150)
    chunk = 50
    worker = start_worker(concurrency=1, env={"CAMPAIGN_CHUNK_SIZE": str(chunk)})
    response = api_client(app).post("/api/v1/campaigns/", {"message": {"title": "k"}}, format="json")
    campaign_id = response.json()["id"]

    wait_for(lambda: fresh_sim.stats()["delivered_total"] >= 300, 120, what="the shard to be half way")
    # From here a chunk takes 3 s (the rest of the shard ~40 s): the kill lands mid-shard however
    # slowly this process gets to it on a loaded machine. Normal pace again for the re-run.
    fresh_sim.configure(latency_ms=3000)
    children = worker.child_pids()
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)  # the pool process dies mid-shard, unacknowledged
    fresh_sim.configure(latency_ms=150)

    campaign = wait_for(
        lambda: Campaign.objects.filter(pk=campaign_id, status="completed").first(), 120, what="completion"
    )
    assert "WorkerLostError" in worker.log_tail(400) or "SIGKILL" in worker.log_tail(400)
    stats = fresh_sim.stats()
    assert stats["delivered_unique"] == 1000, "nothing lost"
    assert stats["duplicates"] <= chunk, "only the chunk in flight may repeat"
    assert campaign.skipped_duplicate >= 300 - chunk, "the re-run skipped what the first run delivered"
    assert campaign.delivered == 1000, "and counted it delivered, which the dead run could not"
    assert campaign.targeted == 1000
    assert set(fresh_sim.counts(population.of()).values()) <= {1, 2}


def test_a_shard_published_twice_runs_once(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    population = load_devices(app, build_population({"android": 1000}, {}))
    fresh_sim.configure(latency_ms=100)
    start_worker(concurrency=2, env={"CAMPAIGN_CHUNK_SIZE": "50"})
    response = api_client(app).post("/api/v1/campaigns/", {"message": {"title": "twice"}}, format="json")
    campaign_id = response.json()["id"]
    shard = wait_for(lambda: Shard.objects.filter(campaign_id=campaign_id).first(), 30, what="the shard")
    wait_for(lambda: fresh_sim.stats()["delivered_total"] > 0, 30, what="the first run to send")

    send_shard.apply_async(args=[shard.pk], queue=shard.queue)  # the same shard, while it runs

    campaign = wait_for(
        lambda: Campaign.objects.filter(pk=campaign_id, status="completed").first(), 60, what="completion"
    )
    assert (campaign.delivered, campaign.skipped_duplicate, campaign.sent) == (1000, 0, 1000)
    assert fresh_sim.stats()["duplicates"] == 0
    assert set(sim_counts(fresh_sim, population.of()).values()) == {1}


def test_scheduled_campaign_fires_at_send_at(fresh_sim, start_worker) -> None:
    app = simulator_app(fresh_sim)
    load_devices(app, build_population({"android": 200}, {}))
    start_worker(concurrency=1, beat=True)
    send_at = timezone.now() + timedelta(seconds=4)
    response = api_client(app).post(
        "/api/v1/campaigns/",
        {"message": {"title": "later"}, "send_at": send_at.isoformat()},
        format="json",
    )
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "scheduled"
    delivered_early = fresh_sim.stats()["delivered_total"]
    if timezone.now() < send_at:  # read before send_at (a loaded machine may take longer to get here)
        assert delivered_early == 0

    campaign = wait_for(
        lambda: Campaign.objects.filter(pk=body["id"], status="completed").first(), 60, what="the send"
    )
    assert campaign.started_at >= send_at
    assert campaign.delivered == 200
