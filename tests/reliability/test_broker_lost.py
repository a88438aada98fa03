"""The broker's Redis database flushed mid-campaign, at production defaults (but for 1,000-device
shards, planned by the worker: several are queued, and the repeat bound stays a fraction of the
8,000 devices): every queued shard message, the transport's unacked set and kombu's bindings gone
at once, as a Redis restart without persistence does (the broker is the test's Redis database,
shared with the campaign state as in the default deployment: the leases, the idempotency bitmap
and the control flag go too).

What carries the campaign through is PostgreSQL: every shard is a row before it is a message. The
runs in progress find their lease and its registration gone at their next checkpoint and record
what they sent, leaving the rest pending (REDIS_LOST); the control flag is rebuilt from the
campaign's row; the worker's recovery thread (campaigns/recovery.py) finds the mark it keeps in the
broker's database gone and, one lease period later, publishes every pending, due, unleased shard of
the running campaign again, without waiting for CAMPAIGN_RECOVERY_GRACE_S: no message is queued.

Printed, not asserted (load): the wall time and the seconds from the flush to completion.
Asserted: completed, nothing lost, repeats within what the runs in progress could have sent (their
deliveries were in the flushed bitmap).
"""

from __future__ import annotations

import time

import pytest
from django.conf import settings

from tests.reliability.harness import PRODUCTION, launch, tally, wait_delivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


def test_broker_database_flushed_mid_campaign_loses_nothing(fresh_sim, start_worker, redis_client) -> None:
    assert settings.CELERY_BROKER_URL == settings.REDIS_URL, "the flush below is the broker's database"
    concurrency = 2
    fresh_sim.configure(latency_ms=30)
    env = {**PRODUCTION, "CAMPAIGN_SHARD_SIZE": "1000"}
    worker = start_worker(concurrency=concurrency, env=env, name="broker-lost")
    launched = time.monotonic()
    run = launch(fresh_sim, {"ios": 4800, "android": 3200})
    tokens = run.population.of()

    at_flush = wait_delivered(fresh_sim, 1500)
    assert at_flush < len(tokens), "the flush must land mid-campaign"
    fresh_sim.configure(latency_ms=1000)  # mid-shard however slow this process is to get here
    queued = sum(redis_client.llen(q) for q in ("apns", "fcm"))
    redis_client.flushdb()
    flushed = time.monotonic()
    fresh_sim.configure(latency_ms=30)

    campaign = run.wait_done(timeout=240)
    done = time.monotonic()
    assert campaign.status == "completed", (campaign.status, campaign.status_reason, worker.log_tail())
    result = tally(fresh_sim, tokens)
    bound = concurrency * int(env["CAMPAIGN_SHARD_SIZE"])
    print(
        f"\nbroker database flushed at {at_flush}/{len(tokens)} delivered ({queued} shard messages "
        f"queued): completed {done - flushed:.1f} s after the flush; wall {done - launched:.1f} s; "
        f"lost={len(result.lost)} duplicates={result.extra_deliveries} (bound {concurrency} x "
        f"{env['CAMPAIGN_SHARD_SIZE']}); skipped_duplicate={campaign.skipped_duplicate}"
    )
    assert result.lost == []
    assert result.extra_deliveries <= bound, "only what the runs in progress had sent may repeat"
    assert campaign.delivered == len(tokens)
