"""Provider-side faults during a campaign, from the simulator (strict front: real HTTP/2
connection behaviour): an outage, GOAWAY every 1,000 requests, dropped connections, 429
throttling and credentials revoked mid-campaign. Real workers, PostgreSQL and Redis.

The outage lasts RELIABILITY_OUTAGE_S seconds (default 60, as the issue asks; alone:
`make test PYTEST_ARGS="tests/reliability/test_provider_faults.py -k outage -s"`).
"""

from __future__ import annotations

import os
import time

import pytest

from campaigns.testing import wait_for
from delivery import breaker
from delivery.models import DeadLetter
from tests.reliability.harness import inactive_count, launch, tally, wait_delivered

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(400)]

OUTAGE_S = float(os.environ.get("RELIABILITY_OUTAGE_S", "60"))
# Production retry pacing (settings defaults), not the campaign suites' fast test retries: how the
# sender behaves against a down provider is the subject here.
PRODUCTION_RETRIES = {"CAMPAIGN_RETRY_BASE_S": "2", "CAMPAIGN_RETRY_MAX_S": "300"}


def tries_within(seconds: float, retry_after: float = 2.0) -> int:
    """The most sends one device can get in `seconds` under the production backoff
    (campaigns.sending.policy.retry_delay: the n-th retry waits at least
    max(Retry-After, base * 2^(n-1) / 2))."""
    base = float(PRODUCTION_RETRIES["CAMPAIGN_RETRY_BASE_S"])
    tries, elapsed = 1, 0.0
    while True:
        elapsed += max(retry_after, base * 2 ** (tries - 1) / 2)
        if elapsed >= seconds:
            return tries
        tries += 1


def test_provider_outage_no_retry_storm_and_nothing_invalidated(
    fresh_sim, start_worker, redis_client
) -> None:
    fresh_sim.configure(latency_ms=20, retry_after_s=2)
    start_worker(concurrency=2, env={**PRODUCTION_RETRIES, "CAMPAIGN_CHUNK_SIZE": "200"})
    run = launch(fresh_sim, {"ios": 3600, "android": 2400})
    tokens = run.population.of()

    delivered_before = wait_delivered(fresh_sim, 1000)
    requests_before = fresh_sim.stats()["requests"]
    fresh_sim.configure(outage_until=time.time() + OUTAGE_S)
    wait_for(lambda: time.time() >= fresh_sim.config()["outage_until"], OUTAGE_S + 5, 0.2, "outage end")
    ended = time.monotonic()
    stats = fresh_sim.stats()
    during = stats["requests"] - requests_before
    in_flight = len(tokens) - delivered_before  # every token not yet delivered is waiting on the provider

    campaign = run.wait_done(timeout=OUTAGE_S * 8 + 120)
    recovered_in = time.monotonic() - ended
    result = tally(fresh_sim, tokens)
    trips = redis_client.hgetall(breaker.TRIPS)
    print(
        f"\noutage {OUTAGE_S:.0f}s: {during} requests during it for {in_flight} tokens in flight "
        f"({during / in_flight:.2f} per token; per-device backoff alone would allow up to "
        f"{tries_within(OUTAGE_S)}); breaker trips {sum(int(n) for n in trips.values())}; "
        f"finished {campaign.status} {recovered_in:.1f}s after the outage, delivered={campaign.delivered} "
        f"failed={campaign.failed} retried={campaign.retried} lost={len(result.lost)} "
        f"repeated={result.extra_deliveries}"
    )
    assert campaign.status == "completed", campaign.status_reason
    # No retry storm: the breaker stops the sends (the chunks in flight at the start of the outage
    # and one small probe per open period reach the provider), far under one request per token.
    assert during < in_flight / 2
    assert len(trips) == 2, "one breaker per (app, provider), both opened"
    assert inactive_count(run.app) == 0 and campaign.invalidated == 0
    # The outage spends no device's attempts: nothing dead-lettered, nothing failed.
    assert result.lost == [] and campaign.failed == 0 and DeadLetter.objects.count() == 0
    assert result.extra_deliveries == 0


def test_a_long_outage_pauses_the_campaign_with_the_reason_and_resume_finishes_it(
    fresh_sim, start_worker
) -> None:
    fresh_sim.configure(latency_ms=5, retry_after_s=1, outage_until=time.time() + 3600)
    start_worker(concurrency=2, env={"BREAKER_PAUSE_AFTER_S": "3", "CAMPAIGN_CHUNK_SIZE": "200"})
    run = launch(fresh_sim, {"ios": 1200, "android": 800})

    paused = run.wait_status("paused", "completed", "failed", "halted", timeout=90)
    requests = fresh_sim.stats()["requests"]
    print(f"\nlong outage: {paused.status} after {requests} requests: {paused.status_reason}")
    assert paused.status == "paused", (paused.status, paused.status_reason)
    assert "has failed every request" in paused.status_reason
    assert requests < 2000 / 2  # the breaker held the rest back
    assert inactive_count(run.app) == 0 and paused.failed == 0 and DeadLetter.objects.count() == 0

    fresh_sim.configure(outage_until=0)
    response = run.client.post(f"/api/v1/campaigns/{run.campaign_id}/resume/")
    assert response.status_code == 200, response.content
    campaign = run.wait_status("completed", "paused", "failed", "halted", timeout=120)
    assert campaign.status == "completed", campaign.status_reason
    result = tally(fresh_sim, run.population.of())
    assert result.lost == [] and result.extra_deliveries == 0
    assert campaign.delivered == 2000 and inactive_count(run.app) == 0


def test_goaway_every_thousand_requests_loses_and_repeats_nothing(fresh_sim, start_worker) -> None:
    fresh_sim.configure(goaway_every=1000)
    start_worker(concurrency=2)
    run = launch(fresh_sim, {"ios": 4800, "android": 3200})
    campaign = run.wait_done(timeout=180)
    result = tally(fresh_sim, run.population.of())
    stats = fresh_sim.stats()
    print(
        f"\nGOAWAY: {stats['goaways_sent']} sent over {stats['connections_opened']} connections, "
        f"{stats['requests']} requests, lost={len(result.lost)} repeated={result.extra_deliveries}"
    )
    # A connection sends its GOAWAY at its 1,000th request; how many connections get that far is the
    # sender's timing (how requests spread over connections), so the count is reported, not fixed:
    # at least one (the fault happened) and never more than the requests allow.
    assert 1 <= stats["goaways_sent"] <= stats["requests"] // 1000
    assert campaign.status == "completed", campaign.status_reason
    assert result.lost == [] and result.extra_deliveries == 0
    assert campaign.delivered == 8000 and stats["duplicates"] == 0


def test_dropped_connections_lose_nothing_and_repeat_only_requests_in_flight(fresh_sim, start_worker) -> None:
    # Fault 09: the simulator closes the connection with the request unanswered (first attempt
    # only). Requests on the same connection that were already processed are answered never: a
    # client cannot know, so re-sending them is the only way to lose nothing (APNs and FCM have
    # no idempotency key), and each drop may repeat at most the streams open on that connection.
    fresh_sim.configure(max_concurrent_streams=50, latency_ms=5)
    start_worker(concurrency=2)
    run = launch(fresh_sim, {"ios": 3000, "android": 2000}, {"ios": {"09": 12}, "android": {"09": 8}})
    campaign = run.wait_done(timeout=180)
    result = tally(fresh_sim, run.population.of())
    stats = fresh_sim.stats()
    injected = sum(n for outcome, n in stats["by_outcome"].items() if outcome.endswith(" drop"))
    dropped = stats["connections_dropped"]
    print(
        f"\ndrops: {injected} injected, {dropped} connections dropped "
        f"({stats['drops_on_closed_connections']} met a connection already closed), lost={len(result.lost)} "
        f"repeated={result.extra_deliveries} (bound {dropped} x 50 streams)"
    )
    assert campaign.status == "completed", campaign.status_reason
    assert result.lost == []
    # Injected: each of the 20 fault-09 tokens' first attempt, exactly (every token was delivered, so
    # every one was attempted). How many connections they dropped is timing: two drops due on one
    # connection drop it once (the second finds it closed), so the bound uses the reported count.
    assert injected == 20
    assert dropped + stats["drops_on_closed_connections"] == injected
    assert dropped >= 1
    assert result.extra_deliveries <= dropped * 50
    assert campaign.failed == 0 and inactive_count(run.app) == 0


def test_throttled_sender_settles_under_the_rate(fresh_sim, start_worker) -> None:
    rate = 600
    fresh_sim.configure(rate_limit_per_s=rate, retry_after_s=1)
    start_worker(concurrency=2, env={"CAMPAIGN_CHUNK_SIZE": "200"})
    run = launch(fresh_sim, {"ios": 3600, "android": 2400})
    campaign = run.wait_done(timeout=240)
    result = tally(fresh_sim, run.population.of())
    outcomes = fresh_sim.stats()["by_outcome"]
    throttled = sum(n for k, n in outcomes.items() if " 429" in k)
    requests = fresh_sim.stats()["requests"]
    seconds = (campaign.finished_at - campaign.started_at).total_seconds()
    print(
        f"\nthrottled at {rate}/s: {requests} requests for 6000 tokens, {throttled} answered 429 "
        f"({throttled / requests:.1%}); {6000 / seconds:.0f} deliveries/s over {seconds:.1f}s; "
        f"lost={len(result.lost)} repeated={result.extra_deliveries}"
    )
    assert campaign.status == "completed", campaign.status_reason
    assert result.lost == [] and result.extra_deliveries == 0
    assert throttled <= 6000, "backs off instead of hammering: fewer 429s than tokens"
    assert 6000 / seconds <= rate * 1.2


@pytest.mark.parametrize("provider", ["apns", "fcm"])
def test_credentials_revoked_mid_campaign_pause_and_resume(fresh_sim, start_worker, provider) -> None:
    fresh_sim.configure(latency_ms=20)
    start_worker(concurrency=2, env={"CAMPAIGN_CHUNK_SIZE": "100"})
    platform = "ios" if provider == "apns" else "android"
    run = launch(fresh_sim, {platform: 6000}, {platform: {"01": 60}})
    wait_delivered(fresh_sim, 1000)
    if provider == "apns":
        fresh_sim.configure(revoked_apns_keys=[fresh_sim.credentials.apns_key_id])
    else:
        fresh_sim.configure(fcm_revoked=True, oauth_token_lifetime_s=0.001)

    paused = run.wait_status("paused", "completed", "failed", "halted", timeout=60)
    assert paused.status == "paused", (paused.status, paused.status_reason)
    reason = paused.status_reason
    print(f"\n{provider} revoked: paused at delivered={paused.delivered}: {reason}")
    assert "credential" in reason.lower()
    invalid_before = inactive_count(run.app)
    # No token touched by the credential failure: only the 01 (unregistered) tokens met so far.
    assert invalid_before <= 60
    held = fresh_sim.stats()["delivered_total"]
    assert held < 6000 - 60

    # New credentials: the simulator accepts the key again (an operator uploading a new key has the
    # same effect on the adapter: the next token minted is valid).
    fresh_sim.configure(revoked_apns_keys=[], fcm_revoked=False, oauth_token_lifetime_s=0)
    response = run.client.post(f"/api/v1/campaigns/{run.campaign_id}/resume/")
    assert response.status_code == 200, response.content
    campaign = run.wait_status("completed", "paused", "failed", "halted", timeout=180)
    assert campaign.status == "completed", campaign.status_reason
    healthy = run.population.of(fault="")
    result = tally(fresh_sim, healthy)
    assert result.lost == [] and result.extra_deliveries == 0
    assert inactive_count(run.app) == 60 == campaign.invalidated


def test_latency_jitter_delivers_each_device_once(fresh_sim, start_worker) -> None:
    """Latency 5 ms + jitter 15 ms and no fault: new APNs-style connections start at one stream, so
    answers arrive out of order during the cold-start connection churn. Before the curl engine's
    periodic scan, an answer libcurl was not woken for surfaced only at the request's timeout and
    was sent again (docs/reliability.md, "The jitter duplicate"); now such an answer waits at most
    a second, far inside the timeout. Measured: 20 consecutive runs, 0 repeated, 0 retried."""
    fresh_sim.configure(latency_ms=5, jitter_ms=15)
    start_worker(concurrency=2)
    run = launch(fresh_sim, {"ios": 2400, "android": 1600})
    campaign = run.wait_done(timeout=240)
    result = tally(fresh_sim, run.population.of())
    stats = fresh_sim.stats()
    seconds = (campaign.finished_at - campaign.started_at).total_seconds() if campaign.finished_at else -1.0
    print(
        f"\njitter: {stats['requests']} requests over {stats['connections_opened']} connections, "
        f"{stats['refused_streams']} streams refused; lost={len(result.lost)} "
        f"repeated={result.extra_deliveries} retried={campaign.retried} in {seconds:.1f}s"
    )
    assert campaign.status == "completed", campaign.status_reason
    assert result.lost == []
    assert result.extra_deliveries == 0 and stats["duplicates"] == 0
