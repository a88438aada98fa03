"""RabbitMQ's own faults mid-campaign (`make test-rabbitmq`), at production defaults unless said.

- Every connection of the test vhost closed by the broker (`rabbitmqctl close_all_connections`,
  as a broker restart or a load balancer does to its clients): the workers reconnect; the messages
  they held unacknowledged are queued again by RabbitMQ and meet a shard that is leased or done.
- The send queues purged (every ready message gone, the RabbitMQ counterpart of the Redis
  broker's flush): the shards are rows in PostgreSQL; the recovery sweep finds their queues empty
  and publishes the pending ones again after CAMPAIGN_RECOVERY_GRACE_S (5 s here instead of 30 s,
  to keep the test short; nothing else depends on it).
- The whole node restarted (a private node: the machine's is everybody's): quorum queues and
  persistent messages are on disk and survive; run in a pytest process of its own
  (tests/reliability/scenario_restart.py) whose broker is that node.

Printed, not asserted (load): walls and the seconds from the fault to completion. Asserted:
completed, nothing lost, repeats within what was in flight.
"""

from __future__ import annotations

import json
import time

import pytest
from django.conf import settings

from campaigns.testing import rabbitmq_vhost, rabbitmqctl
from tests.reliability.harness import IN_FLIGHT_PER_RUN, PRODUCTION, launch, tally, wait_delivered
from tests.reliability.services import PrivateRabbitMQ
from tests.reliability.test_restarts import _scenario

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

DEVICES = {"ios": 4800, "android": 3200}


def _mid_campaign(fresh_sim, start_worker, env: dict[str, str] | None = None, concurrency: int = 2):
    assert settings.BROKER_IS_RABBITMQ
    fresh_sim.configure(latency_ms=30)
    worker = start_worker(concurrency=concurrency, env={**PRODUCTION, **(env or {})}, name="rabbit-fault")
    launched = time.monotonic()
    run = launch(fresh_sim, DEVICES)
    at = wait_delivered(fresh_sim, 1500)
    assert at < len(run.population.of()), "the fault must land mid-campaign"
    return worker, run, launched, at


def test_every_connection_closed_mid_campaign_loses_nothing(fresh_sim, start_worker) -> None:
    worker, run, launched, at = _mid_campaign(fresh_sim, start_worker)
    tokens = run.population.of()
    fresh_sim.configure(latency_ms=1000)  # mid-shard however slow this process is to get here
    listed = rabbitmqctl("list_connections", "-p", rabbitmq_vhost(), "pid", "--quiet", "--no-table-headers")
    rabbitmqctl("close_all_connections", "-p", rabbitmq_vhost(), "pushsvc test: connections cut")
    cut = time.monotonic()
    fresh_sim.configure(latency_ms=30)

    campaign = run.wait_done(timeout=240)
    done = time.monotonic()
    assert campaign.status == "completed", (campaign.status, campaign.status_reason, worker.log_tail())
    result = tally(fresh_sim, tokens)
    reconnects = worker.log_file.read_text(errors="replace").count("Connection to broker lost")
    bound = 2 * IN_FLIGHT_PER_RUN
    print(
        f"\nRabbitMQ closed {len(listed.split())} connection(s) at {at}/{len(tokens)} delivered: worker "
        f"reconnected ({reconnects} 'Connection to broker lost'); completed {done - cut:.1f} s after; wall "
        f"{done - launched:.1f} s; lost={len(result.lost)} duplicates={result.extra_deliveries} (bound 2 x "
        f"{IN_FLIGHT_PER_RUN}); skipped_duplicate={campaign.skipped_duplicate}"
    )
    assert reconnects >= 1, "the worker's consumer connection was among those closed"
    assert result.lost == []
    assert result.extra_deliveries <= bound, "only chunks in flight may repeat"
    assert campaign.delivered == len(tokens)


def test_send_queues_purged_mid_campaign_loses_nothing(fresh_sim, start_worker) -> None:
    # 1,000-device shards: the 8,000 devices must leave shard messages queued behind the two running.
    grace = {"CAMPAIGN_RECOVERY_GRACE_S": "5", "CAMPAIGN_SHARD_SIZE": "1000"}
    worker, run, launched, at = _mid_campaign(fresh_sim, start_worker, env=grace)
    tokens = run.population.of()
    dropped = sum(_purge(queue) for queue in ("apns", "fcm"))
    purged = time.monotonic()

    campaign = run.wait_done(timeout=240)
    done = time.monotonic()
    assert campaign.status == "completed", (campaign.status, campaign.status_reason, worker.log_tail())
    result = tally(fresh_sim, tokens)
    print(
        f"\napns and fcm purged at {at}/{len(tokens)} delivered ({dropped} shard messages dropped): "
        f"completed {done - purged:.1f} s after the purge (grace {grace['CAMPAIGN_RECOVERY_GRACE_S']} s); "
        f"wall {done - launched:.1f} s; lost={len(result.lost)} duplicates={result.extra_deliveries}"
    )
    assert dropped > 0, "the purge must drop queued shard messages"
    assert result.lost == []
    assert result.extra_deliveries == 0, "the dropped shards had not run: nothing of theirs was sent"
    assert campaign.delivered == len(tokens)


def _purge(queue: str) -> int:
    from kombu import Connection

    with Connection(settings.CELERY_BROKER_URL) as conn:
        return conn.channel().queue_purge(queue) or 0


def test_node_restarted_mid_campaign_loses_nothing() -> None:
    node = PrivateRabbitMQ().start()
    try:
        info = {"name": node.name, "port": node.port, "dist_port": node.dist_port, "dir": str(node.dir)}
        result = _scenario(
            {
                "CELERY_BROKER_URL": node.url,
                "RELIABILITY_RESTART": "rabbitmq",
                "RELIABILITY_SERVICE": json.dumps(info),
            }
        )
    finally:
        node.stop()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
