"""Provider connections reset under a campaign, as a load balancer or a restarting server does it:
every `reset_every` requests the simulator's strict front stops processing on the connection,
answers what it processed and aborts it with a TCP RST while the client's later requests are still
in flight. Those were never processed, so a client that resends every unanswered request and
nothing answered delivers each device exactly once. Real workers, PostgreSQL and Redis.

Churn is not an outage: the engine re-submits a request whose connection died before its answer
began, at once and on a fresh connection (delivery/engine/curl.py), so the cut streams never
become campaign-level retries (which wait out the retry backoff) nor a chunk of "no answer" that
opens the circuit breaker. The test runs the same campaign clean and under resets with production
retry pacing and prints both wall times; the times are reported, not asserted (they move with the
machine's load); what is asserted is the mechanism: no retry scheduled, no breaker opened.

Fault 09 (tests/reliability/test_provider_faults.py) is the other kind of dying connection: there
the provider had processed requests it never answered, and repeats can only be bounded.
"""

from __future__ import annotations

import pytest

from campaigns.models import Campaign
from delivery import breaker
from delivery.models import DeadLetter
from tests.reliability.harness import Run, inactive_count, launch, tally

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(400)]

COUNTS = {"ios": 4800, "android": 3200}
# Production retry pacing (settings defaults), not the campaign suites' fast test retries: a cut
# stream turned into a campaign-level retry would wait these out, which is the cliff measured here.
PRODUCTION_RETRIES = {"CAMPAIGN_RETRY_BASE_S": "2", "CAMPAIGN_RETRY_MAX_S": "300"}


def _wall(campaign: Campaign) -> float:
    assert campaign.finished_at is not None, (campaign.status, campaign.status_reason)
    return (campaign.finished_at - campaign.started_at).total_seconds()


def _finished(run: Run) -> Campaign:
    campaign = run.wait_done(timeout=300)
    assert campaign.status == "completed", campaign.status_reason
    return campaign


def test_connection_resets_lose_and_repeat_nothing_and_cost_no_retries(
    fresh_sim, start_worker, redis_client
) -> None:
    start_worker(concurrency=2, env=PRODUCTION_RETRIES)
    # The clean run first, on the same worker (its connections and credentials warm).
    clean_run = launch(fresh_sim, COUNTS)
    clean = _finished(clean_run)
    clean_result = tally(fresh_sim, clean_run.population.of())
    assert clean_result.lost == [] and clean_result.extra_deliveries == 0

    # No latency knob: the sender keeps hundreds of requests in flight per connection anyway
    # (requests_cut_by_reset shows how many each reset cut), and added latency makes every new
    # connection's cold start (one stream until the first answer) churn connections, which is not
    # what this test is about.
    fresh_sim.reset()
    fresh_sim.configure(reset_every=500)
    run = launch(fresh_sim, COUNTS)
    campaign = _finished(run)
    result = tally(fresh_sim, run.population.of())
    stats = fresh_sim.stats()
    trips = redis_client.hgetall(breaker.TRIPS)
    clean_s, churn_s = _wall(clean), _wall(campaign)
    print(
        f"\nresets: {stats['connections_reset']} connections reset every 500 requests, "
        f"{stats['requests_cut_by_reset']} requests cut unanswered, {stats['connections_opened']} opened; "
        f"lost={len(result.lost)} repeated={result.extra_deliveries} retried={campaign.retried} "
        f"breaker trips={sum(int(n) for n in trips.values())}; "
        f"wall clean {clean_s:.1f}s, churn {churn_s:.1f}s, ratio {churn_s / clean_s:.1f}x"
    )
    # A connection is reset at its 500th request; how many connections get that far, and how many
    # requests were in flight when each reset landed, is the sender's timing: reported, not fixed
    # (tests/test_simulator_strict.py pins the cut semantics frame by frame). At least one reset (the
    # fault happened), never more than the requests allow.
    assert 1 <= stats["connections_reset"] <= stats["requests"] // 500
    assert stats["connections_dropped"] == 0 and stats["goaways_sent"] == 0  # only resets happened
    assert result.lost == []
    # Repeats are bounded by the streams in flight at the resets; these were never processed, so 0.
    assert result.extra_deliveries <= stats["requests_cut_by_reset"]
    assert result.extra_deliveries == 0 and stats["duplicates"] == 0
    # The mechanism: every cut stream was re-sent by the engine, none became a campaign-level retry
    # (with its backoff), and no chunk looked like an outage to the circuit breaker.
    assert campaign.retried == 0
    assert trips == {}
    assert campaign.delivered == 8000 and campaign.failed == 0 and DeadLetter.objects.count() == 0
    assert inactive_count(run.app) == 0 and campaign.invalidated == 0
