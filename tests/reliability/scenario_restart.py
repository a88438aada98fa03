"""Inner scenario of test_restarts.py, run in its own pytest process whose DATABASE_URL and
REDIS_URL point at a private server (not collected by the suite: the name is not test_*).

RELIABILITY_RESTART names what to restart ("redis", "postgres" or "rabbitmq": the broker then is
a private RabbitMQ node, tests/rabbitmq/test_rabbitmq_faults.py); RELIABILITY_SERVICE carries how
to reach its control (port for Redis, data dir and binaries for PostgreSQL, node name, ports and
data dir for RabbitMQ).
"""

from __future__ import annotations

import json
import os
import time

import pytest
from django.db import close_old_connections, connections

from campaigns.testing import wait_for
from tests.reliability import services
from tests.reliability.harness import launch, tally, wait_delivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(400)]


def _restart() -> float:
    kind = os.environ["RELIABILITY_RESTART"]
    info = json.loads(os.environ["RELIABILITY_SERVICE"])
    started = time.monotonic()
    if kind == "redis":
        server = services.PrivateRedis(info["port"], appendonly=info["appendonly"])
        server.dir = services.Path(info["dir"])
        server.restart()
    elif kind == "rabbitmq":
        node = services.PrivateRabbitMQ.__new__(services.PrivateRabbitMQ)
        node.name, node.port, node.dist_port = info["name"], info["port"], info["dist_port"]
        node.dir = services.Path(info["dir"])
        node.restart()
    else:
        server = services.PrivatePostgres.__new__(services.PrivatePostgres)
        server.bin, server.port = services.Path(info["bin"]), info["port"]
        server.dir, server.data = services.Path(info["dir"]), services.Path(info["dir"]) / "data"
        server.restart()
        for conn in connections.all():
            conn.close()  # this test process reconnects like any client after a restart
    return time.monotonic() - started


def _status(run) -> str | None:
    try:
        campaign = run.campaign()
    except Exception:  # the database is coming back
        close_old_connections()
        return None
    return (
        campaign.status
        if campaign.status in ("completed", "failed", "cancelled", "halted", "paused")
        else None
    )


def test_campaign_survives_the_restart(fresh_sim, start_worker) -> None:
    fresh_sim.configure(latency_ms=20)
    start_worker(concurrency=2, env={"CAMPAIGN_CHUNK_SIZE": "100"})
    run = launch(fresh_sim, {"ios": 4800, "android": 3200})
    tokens = run.population.of()
    at = wait_delivered(fresh_sim, 1500)
    assert at < len(tokens)
    # Every request takes a second until the server is back: the restart lands mid-campaign however
    # long this process takes to get to it on a loaded machine. Normal pace again after it.
    fresh_sim.configure(latency_ms=1000)
    down = _restart()
    fresh_sim.configure(latency_ms=20)
    # A healthy run finishes within ~30-60 s of the restart (lost broker messages wait for the
    # recovery grace); the deadline is generous for a loaded machine, it only matters on failure.
    try:
        status = wait_for(lambda: _status(run), 240, 0.5, "campaign to finish after the restart")
    except TimeoutError:
        status = f"still {run.campaign().status} 240 s after the restart"
    campaign = run.campaign()
    result = tally(fresh_sim, tokens)
    print(
        f"\nRESULT {os.environ['RELIABILITY_RESTART']} restart at {at}/{len(tokens)} delivered "
        f"(down {down:.1f}s): status={status} lost={len(result.lost)} repeated={result.extra_deliveries} "
        f"delivered={campaign.delivered} skipped_duplicate={campaign.skipped_duplicate}"
    )
    assert status == "completed", (status, campaign.status_reason)
    assert result.lost == []
    # Repeats are limited to what was in flight: at most one chunk per pool process.
    assert result.extra_deliveries <= 2 * 100
