"""The provider circuit breaker (delivery/breaker.py) on a real Redis, and the refund that keeps a
deferred chunk from leaving debt in the rate bucket (delivery/ratelimit.py)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from campaigns.testing import wait_for
from delivery import breaker
from delivery.breaker import FAIL, OK, PROBE, RELEASE, WAIT, Breaker
from delivery.providers.base import Outcome, Result, Target
from delivery.ratelimit import TokenBucket

APP, PLATFORM = 7, "ios"


@pytest.fixture
def circuit(redis_client, settings) -> Breaker:
    settings.BREAKER_OPEN_S = 0.3
    settings.BREAKER_OPEN_MAX_S = 1.0
    settings.BREAKER_PROBE_TTL_S = 30.0
    return Breaker(redis_client)


def _state(redis_client) -> dict[str, str]:
    return {
        k.decode(): v.decode() for k, v in redis_client.hgetall(breaker.breaker_key(APP, PLATFORM)).items()
    }


def _half_open(circuit: Breaker, caller: str) -> breaker.Verdict:
    """Poll (as `caller`, who may take the probe) until the open period has passed."""
    return wait_for(
        lambda: (v := circuit.check(APP, PLATFORM, caller)).action != WAIT and v, 30, 0.05, "half-open"
    )


def test_closed_until_a_failed_chunk_then_open_for_everyone(circuit, redis_client) -> None:
    assert circuit.check(APP, PLATFORM, "a") == breaker.CLOSED
    assert circuit.check(APP, PLATFORM, "a", OK) == breaker.CLOSED

    opened = circuit.check(APP, PLATFORM, "a", FAIL)
    assert opened.action == WAIT and 0.2 < opened.wait_s <= 0.3
    other = circuit.check(APP, PLATFORM, "b")  # another shard, another process: same breaker
    assert other.action == WAIT and other.wait_s <= opened.wait_s
    assert redis_client.hget(breaker.TRIPS, f"{APP}|{PLATFORM}") == b"1"
    assert [(a, p) for a, p, _ in breaker.open_breakers(redis_client)] == [(APP, PLATFORM)]
    # Another app's breaker is its own.
    assert circuit.check(APP + 1, PLATFORM, "c") == breaker.CLOSED


def test_reports_of_chunks_already_in_flight_neither_extend_nor_close(circuit, redis_client) -> None:
    circuit.check(APP, PLATFORM, "a", FAIL)
    first = _state(redis_client)
    circuit.check(APP, PLATFORM, "b", FAIL)  # sent before the breaker opened
    circuit.check(APP, PLATFORM, "c", OK)  # a straggler's success from before the outage
    assert _state(redis_client)["open_until"] == first["open_until"]
    assert redis_client.hget(breaker.TRIPS, f"{APP}|{PLATFORM}") == b"1"


def test_one_probe_at_a_time_a_failed_probe_doubles_the_open_period(circuit, redis_client) -> None:
    circuit.check(APP, PLATFORM, "a", FAIL)
    probe = _half_open(circuit, "p")
    assert probe.action == PROBE and probe.down_for_s >= 0.3
    waiting = circuit.check(APP, PLATFORM, "q")
    assert waiting.action == WAIT and 0 < waiting.wait_s <= 1.0  # until the probe reports

    reopened = circuit.check(APP, PLATFORM, "p", FAIL)
    assert reopened.action == WAIT and 0.5 < reopened.wait_s <= 0.6
    assert float(_state(redis_client)["open_for"]) == pytest.approx(0.6)
    _half_open(circuit, "p2")
    circuit.check(APP, PLATFORM, "p2", FAIL)
    assert float(_state(redis_client)["open_for"]) == pytest.approx(1.0)  # capped
    assert redis_client.hget(breaker.TRIPS, f"{APP}|{PLATFORM}") == b"1"  # one outage, one trip


def test_a_healthy_probe_closes_it(circuit, redis_client) -> None:
    circuit.check(APP, PLATFORM, "a", FAIL)
    assert _half_open(circuit, "p").action == PROBE
    assert circuit.check(APP, PLATFORM, "p", OK) == breaker.CLOSED
    assert circuit.check(APP, PLATFORM, "q") == breaker.CLOSED
    assert breaker.open_breakers(redis_client) == []
    assert not redis_client.exists(breaker.breaker_key(APP, PLATFORM))


def test_a_leaving_caller_never_takes_the_probe_and_a_released_probe_goes_to_the_next(
    circuit, redis_client
) -> None:
    circuit.check(APP, PLATFORM, "a", FAIL)
    wait_for(lambda: circuit.check(APP, PLATFORM, "watcher").action == PROBE, 30, 0.05, "half-open")
    circuit.report(APP, PLATFORM, "watcher", RELEASE)  # took the probe, then found the campaign paused
    circuit.report(APP, PLATFORM, "leaver", OK)  # a run's last report: no next chunk to probe with
    assert "probe" not in _state(redis_client)
    assert circuit.check(APP, PLATFORM, "next").action == PROBE


def test_a_probe_whose_sender_died_is_handed_on_after_its_ttl(circuit, redis_client, settings) -> None:
    settings.BREAKER_PROBE_TTL_S = 1.0
    circuit.check(APP, PLATFORM, "a", FAIL)
    deadline = time.monotonic() + 30
    while True:  # as _half_open, remembering when the call that got the probe started
        asked = time.monotonic()
        if circuit.check(APP, PLATFORM, "dead").action == PROBE:
            break
        assert asked < deadline, "never half-open"
        time.sleep(0.05)  # polling interval
    other = circuit.check(APP, PLATFORM, "b")
    if time.monotonic() - asked < settings.BREAKER_PROBE_TTL_S:  # the probe's TTL certainly still ran
        assert other.action == WAIT
    assert wait_for(lambda: circuit.check(APP, PLATFORM, "b").action == PROBE, 30, 0.05, "probe handed on")


def test_retry_after_holds_the_breaker_open_at_least_that_long(circuit) -> None:
    opened = circuit.check(APP, PLATFORM, "a", FAIL, retry_after=0.8)
    assert 0.7 < opened.wait_s <= 0.8


def _answers(*statuses: int | None, outcome: Outcome = Outcome.RETRY) -> list[Result]:
    return [Result(Target(i, f"t{i}"), outcome, status=s) for i, s in enumerate(statuses)]


def test_outage_is_most_of_a_chunk_failing_on_the_provider_side(settings) -> None:
    settings.BREAKER_FAILURE_RATIO = 0.5
    settings.BREAKER_MIN_FAILURES = 10
    assert breaker.is_outage(_answers(*[503] * 10, *[None] * 10, *[200] * 20))
    assert not breaker.is_outage(_answers(*[503] * 9, *[200] * 11))  # under half
    assert not breaker.is_outage(_answers(*[429] * 40))  # throttling: the rate limiter's job
    assert not breaker.is_outage(_answers(*[200] * 40, outcome=Outcome.DELIVERED))
    assert not breaker.is_outage(_answers(503, 503, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200))
    # A few devices cannot open the breaker for a whole app, but a probe is judged on its share.
    assert not breaker.is_outage(_answers(500, None, 502))
    assert breaker.is_outage(_answers(500, None, 502), probe=True)
    assert not breaker.is_outage(_answers(500, 200, 200, outcome=Outcome.RETRY), probe=True)
    assert not breaker.is_outage([])


def test_refund_gives_back_what_a_deferred_chunk_reserved(redis_client) -> None:
    bucket = TokenBucket(redis_client)
    key = "pushsvc:rate:app:7:android"
    assert bucket.reserve(key, 100, 100, adaptive=True) == 0.0
    bucket.refund(key, 100, 100, adaptive=True)
    emptied = time.monotonic()
    assert bucket.reserve(key, 100, 100, adaptive=True) == pytest.approx(0.0, abs=0.02)
    # Without the refund the same reservation waits a second's worth, less what refilled meanwhile
    # (the time between the two calls, however long a loaded machine took).
    wait = bucket.reserve(key, 100, 100, adaptive=True)
    refilled_s = time.monotonic() - emptied
    assert 1.0 - refilled_s - 0.01 <= wait <= 1.0 + 0.03
    # A refund never drives the measured rate below zero (it would cut the next limit to nothing).
    bucket.refund(key, 100, 10_000, adaptive=True)
    assert float(redis_client.hget(key, "m_n")) >= 0


def test_rearm_after_a_resume_probes_at_once_and_restarts_the_outage_clock(circuit, redis_client) -> None:
    circuit.check(APP, PLATFORM, "a", FAIL, retry_after=1.0)
    assert circuit.check(APP, PLATFORM, "b").action == WAIT
    rearmed = time.monotonic()
    circuit.rearm(APP, PLATFORM)
    probe = circuit.check(APP, PLATFORM, "b")
    # Down since the rearm: no longer than the two calls took (however long a loaded machine took).
    assert probe.action == PROBE and probe.down_for_s <= time.monotonic() - rearmed + 0.01
    circuit.rearm(APP + 1, PLATFORM)  # a closed breaker stays closed
    assert not redis_client.exists(breaker.breaker_key(APP + 1, PLATFORM))


@pytest.mark.django_db
def test_an_outage_chunk_spends_no_attempt_and_a_deferred_shard_waits_for_its_time(redis_client) -> None:
    from campaigns.models import Campaign, Shard
    from campaigns.sending.ledger import Device, ShardResults, apply_shard_run
    from delivery.models import DeadLetter
    from tokens.testing import apns_token, make_app

    app = make_app()
    campaign = Campaign.objects.create(
        app=app, message={"title": "t"}, status=Campaign.Status.RUNNING, planned=True, outstanding=2
    )
    last_try = Shard.objects.create(
        campaign=campaign,
        platform="ios",
        queue="apns",
        device_ids=[1, 2, 3, 4],
        planned=4,
        attempt=4,
        is_child=True,
    )
    devices = [Device(pk, apns_token(), "", "", None) for pk in (1, 2, 3, 4)]
    results = ShardResults(attempt=4, max_attempts=5)
    down = [
        Result(Target(d.pk, d.token), Outcome.RETRY, status=503, reason="ServiceUnavailable") for d in devices
    ]
    results.add(devices[:2], down[:2], hold_invalid=False, outage=True)
    results.add(devices[2:], down[2:], hold_invalid=False)  # the same answer outside an outage
    applied = apply_shard_run(last_try, results, loaded=None, park=None, rest_lo=None, rest_ids=None)

    children = {
        tuple(s.device_ids): s.attempt for s in Shard.objects.filter(is_child=True).exclude(pk=last_try.pk)
    }
    assert children == {(1, 2): 4}  # retried at the same attempt
    assert sorted(DeadLetter.objects.values_list("device_pk", flat=True)) == [3, 4]  # the last attempt spent
    assert len(applied.follow_ups) == 1
    campaign.refresh_from_db()
    assert (campaign.retried, campaign.failed) == (2, 2)

    # A shard deferred while the breaker is open stays pending with its time, so the recovery
    # sweep does not publish it again before its countdown message is due.
    deferred = Shard.objects.create(campaign=campaign, platform="ios", queue="apns", lo=0, hi=100, planned=5)
    from django.utils import timezone

    before = timezone.now()
    apply_shard_run(
        deferred, ShardResults(attempt=0, max_attempts=5), loaded=5, park="pending", rest_lo=0, rest_ids=None,
        defer_s=12.0,
    )  # fmt: skip
    after = timezone.now()
    deferred.refresh_from_db()
    assert deferred.status == Shard.Status.PENDING
    # 12 s from the moment it was parked, whenever in the call that was.
    assert before + timedelta(seconds=12) <= deferred.not_before <= after + timedelta(seconds=12)
