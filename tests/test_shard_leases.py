"""Short shard leases (delivery/leases.py) and the dead runs they reveal (campaigns/recovery.py
`republish_orphans`), in-process on real PostgreSQL and Redis with a fake clock: the heartbeat
refreshes only live, progressing runs and never takes a lease back; a registered lease that ran
out is published again at once, whatever its queue holds and however young the shard."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from campaigns import recovery
from campaigns.models import Campaign, Shard
from delivery import idempotency, leases
from tokens.testing import make_app


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _keeper(client: redis.Redis, clock: Clock) -> leases.LeaseKeeper:
    return leases.LeaseKeeper(lambda: client, every_s=2.0, stall_s=120.0, clock=clock)


def test_the_keeper_refreshes_the_leases_of_live_runs(redis_client) -> None:
    clock = Clock()
    keeper = _keeper(redis_client, clock)
    assert leases.acquire(redis_client, 7, "run-a", 8) == 0
    keeper.hold(7, "run-a", 8)
    redis_client.expire(idempotency.lease_key(7), 1)  # about to run out: the chunk is slow
    clock.now = 100.0  # within the stall limit of the last checkpoint
    assert keeper.refresh() == [7]
    assert redis_client.ttl(idempotency.lease_key(7)) == 8


def test_a_run_stalled_past_the_limit_is_let_go_until_it_moves_again(redis_client) -> None:
    clock = Clock()
    keeper = _keeper(redis_client, clock)
    leases.acquire(redis_client, 7, "run-a", 8)
    keeper.hold(7, "run-a", 8)
    redis_client.expire(idempotency.lease_key(7), 1)
    clock.now = 121.0
    assert keeper.refresh() == [], "no checkpoint for longer than stall_s: the lease is left to run out"
    assert redis_client.ttl(idempotency.lease_key(7)) <= 1
    keeper.progress(7)  # a checkpoint: the run is moving again
    assert keeper.refresh() == [7]


def test_the_keeper_never_takes_back_a_lease_another_run_took(redis_client) -> None:
    keeper = _keeper(redis_client, Clock())
    keeper.hold(7, "run-a", 8)
    redis_client.set(idempotency.lease_key(7), "run-b", ex=8)
    assert keeper.refresh() == []
    assert redis_client.get(idempotency.lease_key(7)) == b"run-b"
    keeper.drop(7)
    assert keeper.held() == []


def test_a_held_lease_is_refused_with_its_time_left_and_released_only_by_its_owner(redis_client) -> None:
    assert leases.acquire(redis_client, 7, "run-a", 8) == 0
    assert 1 <= leases.acquire(redis_client, 7, "run-b", 8) <= 8
    leases.release(redis_client, 7, "run-b")
    assert redis_client.get(idempotency.lease_key(7)) == b"run-a"
    assert redis_client.hget(leases.REGISTER_KEY, 7) == b"run-a"
    leases.release(redis_client, 7, "run-a")
    assert not redis_client.exists(idempotency.lease_key(7))
    assert not redis_client.hexists(leases.REGISTER_KEY, 7)
    assert leases.orphans(redis_client) == []


def _queued(client: redis.Redis, queue: str) -> list[int]:
    ids = []
    for raw in client.lrange(queue, 0, -1):
        if raw.startswith(b"{"):  # a kombu envelope (JSON, base64 body); the backlog here is a stand-in
            args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
            ids.append(args[0])
    return ids


@pytest.mark.django_db(transaction=True)
def test_a_run_that_died_holding_its_lease_is_published_again_at_once(redis_client) -> None:
    app = make_app()
    running = Campaign.objects.create(app=app, message={"title": "x"}, status=Campaign.Status.RUNNING)
    paused = Campaign.objects.create(app=app, message={"title": "x"}, status=Campaign.Status.PAUSED)

    def shard(campaign: Campaign, **fields) -> Shard:
        # Created now: no grace applies to a run that died.
        return Shard.objects.create(
            campaign=campaign, platform="ios", queue="apns", lo=0, hi=10, planned=10, **fields
        )

    dead, alive, done, dead_paused = shard(running), shard(running), shard(running), shard(paused)
    Shard.objects.filter(pk=done.pk).update(status=Shard.Status.DONE)
    for row in (dead, alive, done, dead_paused):
        assert leases.acquire(redis_client, row.pk, f"run-{row.pk}", 8) == 0
    # The dead runs' leases ran out (their process stopped refreshing); `done` finished without
    # unregistering (it cannot, but a stale entry must be harmless).
    for row in (dead, done, dead_paused):
        redis_client.delete(idempotency.lease_key(row.pk))
    redis_client.rpush("apns", b"a backlog the dead shard need not wait for")

    assert sorted(s for s, _ in leases.orphans(redis_client)) == sorted([dead.pk, done.pk, dead_paused.pk])
    assert recovery.republish_orphans(redis_client) == 1
    assert _queued(redis_client, "apns") == [dead.pk]
    registered = {int(k) for k in redis_client.hkeys(leases.REGISTER_KEY)}
    assert registered == {alive.pk, dead_paused.pk}, "the paused one waits for its campaign to run"
    assert recovery.republish_orphans(redis_client) == 0, "published once"


def test_an_orphan_taken_by_a_new_run_meanwhile_is_not_forgotten(redis_client) -> None:
    leases.acquire(redis_client, 7, "run-a", 8)
    redis_client.delete(idempotency.lease_key(7))
    [(shard_id, token)] = leases.orphans(redis_client)
    assert leases.acquire(redis_client, 7, "run-b", 8) == 0  # a redelivery took it first
    assert not leases.forget(redis_client, shard_id, token)
    assert redis_client.hget(leases.REGISTER_KEY, 7) == b"run-b"
