"""The adaptive provider bucket (delivery/ratelimit.py) on a real Redis: a throttled report cuts
the rate to half of what was being sent and pauses for the Retry-After; one event cuts once."""

from __future__ import annotations

import pytest

from delivery import ratelimit
from delivery.ratelimit import TokenBucket

KEY = "pushsvc:rate:app:1:ios"


def _state(redis_client) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in redis_client.hgetall(KEY).items()}


def test_unlimited_bucket_is_free_until_throttled_then_paused_and_limited(redis_client) -> None:
    bucket = TokenBucket(redis_client)
    waits = [bucket.reserve(KEY, 0, 200, adaptive=True) for _ in range(20)]
    assert waits == [0.0] * 20
    assert "limit" not in _state(redis_client)

    # Report-only call (n=0) for a chunk with 429s and Retry-After 3 s.
    bucket.reserve(KEY, 0, 0, adaptive=True, throttled=150, retry_after=3)
    state = _state(redis_client)
    # Half of the rate it was reserving at (4,000 in well under a second: at least 4,000/s).
    assert state["limit"] >= 2000
    assert state["ceiling"] == pytest.approx(4 * state["limit"])  # twice the throttled rate
    # The pause: the next chunk waits the Retry-After, plus its own share at the new rate.
    wait = bucket.reserve(KEY, 0, 200, adaptive=True)
    assert wait >= 2.9
    assert wait == pytest.approx(3 + 200 / state["limit"], rel=0.05)


def test_chunks_in_flight_for_one_event_cut_once_and_the_pause_is_capped(redis_client) -> None:
    bucket = TokenBucket(redis_client)
    rate = 1000.0  # configured
    bucket.reserve(KEY, rate, 200, adaptive=True)
    bucket.reserve(KEY, rate, 0, adaptive=True, throttled=50, retry_after=60)
    first = _state(redis_client)
    assert first["limit"] == pytest.approx(rate / 2)
    assert first["ceiling"] == rate
    # Two more reports of the same event (the other chunks in flight) within ADAPT_HOLD_S.
    bucket.reserve(KEY, rate, 0, adaptive=True, throttled=50, retry_after=60)
    bucket.reserve(KEY, rate, 0, adaptive=True, throttled=50, retry_after=60)
    again = _state(redis_client)
    assert again["cut_at"] == first["cut_at"]
    assert again["limit"] >= first["limit"]  # grown a little since, never cut again
    # A missing Retry-After defaults to a minute in the adapters: the bucket pauses at most PAUSE_MAX_S.
    wait = bucket.reserve(KEY, rate, 100, adaptive=True)
    assert wait <= ratelimit.PAUSE_MAX_S + 100 / first["limit"] + 0.5


def test_a_rollout_bucket_is_not_adaptive(redis_client) -> None:
    bucket = TokenBucket(redis_client)
    assert bucket.reserve("pushsvc:rate:campaign:9", 0, 100) == 0.0
    assert redis_client.exists("pushsvc:rate:campaign:9") == 0
    assert bucket.reserve("pushsvc:rate:campaign:9", 100, 100) == 0.0
    assert bucket.reserve("pushsvc:rate:campaign:9", 100, 100) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(
    ("throttled", "answered", "keep"),
    [
        (150, 500, 0.7 * ratelimit.ADAPT_MARGIN),  # the provider accepted 70 %: settle just under that
        (20, 500, ratelimit.ADAPT_MAX_KEEP),  # it refused a little: still a noticeable cut
        (490, 500, ratelimit.ADAPT_MIN_KEEP),  # it refused nearly all: at most a quarter kept
        (150, 0, 0.5),  # share unknown: halve
    ],
)
def test_a_cut_lands_just_under_what_the_provider_accepted(redis_client, throttled, answered, keep) -> None:
    bucket = TokenBucket(redis_client)
    rate = 1000.0
    bucket.reserve(KEY, rate, 200, adaptive=True)
    bucket.reserve(KEY, rate, 0, adaptive=True, throttled=throttled, retry_after=1, answered=answered)
    assert _state(redis_client)["limit"] == pytest.approx(rate * keep)
