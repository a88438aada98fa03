"""The adaptive provider bucket (delivery/ratelimit.py) on a real Redis: throttling of many
distinct devices cuts the rate to just under what was accepted and pauses for the Retry-After; one
event cuts once, however late its reports come; a cut forgives the debt; one device's 429 cuts
nothing; a cut never lands below the floor, and grows back."""

from __future__ import annotations

import pytest

from delivery import ratelimit
from delivery.ratelimit import Report, TokenBucket

KEY = "pushsvc:rate:app:1:ios"


def _state(redis_client) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in redis_client.hgetall(KEY).items()}


def test_unlimited_bucket_is_free_until_throttled_then_paused_and_limited(redis_client) -> None:
    bucket = TokenBucket(redis_client)
    waits = [bucket.reserve(KEY, 0, 200, adaptive=True) for _ in range(20)]
    assert waits == [0.0] * 20
    assert "limit" not in _state(redis_client)

    # Report-only call (n=0) for a chunk with 429s and Retry-After 3 s.
    bucket.reserve(KEY, 0, 0, adaptive=True, report=Report(throttled=150, retry_after=3))
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
    bucket.reserve(KEY, rate, 0, adaptive=True, report=Report(throttled=50, retry_after=60))
    first = _state(redis_client)
    assert first["limit"] == pytest.approx(rate / 2)
    assert first["ceiling"] == rate
    # Two more reports of the same event: the other chunks in flight, reserved before the cut.
    bucket.reserve(KEY, rate, 0, adaptive=True, report=Report(throttled=50, retry_after=60))
    bucket.reserve(KEY, rate, 0, adaptive=True, report=Report(throttled=50, retry_after=60))
    again = _state(redis_client)
    assert again["cut_at"] == first["cut_at"]
    assert again["limit"] >= first["limit"]  # grown a little since, never cut again
    # A missing Retry-After defaults to a minute in the adapters: the bucket pauses at most PAUSE_MAX_S.
    wait = bucket.reserve(KEY, rate, 100, adaptive=True)
    assert wait <= ratelimit.PAUSE_MAX_S + 100 / first["limit"] + 0.5


def _epoch(redis_client) -> str:
    """What the bucket tells a reservation made now (TokenBucket.parse: Grant.epoch)."""
    pipe = redis_client.pipeline()
    TokenBucket(redis_client).queue_reserve(pipe, KEY, 1000.0, 0, adaptive=True)
    return TokenBucket.parse(pipe.execute()[0]).epoch


def test_only_chunks_reserved_after_a_cut_can_cut_again(redis_client) -> None:
    """The reports of one event arrive as late as the chunks in flight are sorted (seconds on a
    loaded machine). They carry the epoch their reservation was told: those from before the last
    cut were sent at the rate already cut and cut nothing more, so the rate does not cascade to the
    floor; throttling of chunks sent at the cut rate is a new event and cuts at once."""
    bucket = TokenBucket(redis_client)
    rate = 1000.0
    before = _epoch(redis_client)
    assert before == "0"
    bucket.reserve(KEY, rate, 200, adaptive=True)
    throttled = Report(throttled=200, answered=200, retry_after=1, epoch=before)
    bucket.reserve(KEY, rate, 0, adaptive=True, report=throttled)
    first = _state(redis_client)
    cut = _epoch(redis_client)
    assert cut != before and float(cut) == first["cut_at"]
    for _ in range(5):  # the rest of that event's chunks, whenever they are sorted
        bucket.reserve(KEY, rate, 0, adaptive=True, report=throttled)
    assert _state(redis_client)["cut_at"] == first["cut_at"]
    assert _state(redis_client)["limit"] >= first["limit"]

    bucket.reserve(KEY, rate, 0, adaptive=True, report=throttled._replace(epoch=cut))
    second = _state(redis_client)
    assert second["cut_at"] > first["cut_at"]
    assert second["limit"] == pytest.approx(first["limit"] * ratelimit.ADAPT_MIN_KEEP, rel=0.05)


def test_a_cut_forgives_the_debt_and_pauses_instead(redis_client) -> None:
    """Tokens taken at the rate just found too high are not re-priced at the cut rate: the next
    chunk waits the Retry-After and its own share, not the debt at a quarter of the rate."""
    bucket = TokenBucket(redis_client)
    rate = 1000.0
    for _ in range(10):  # 2,000 tokens reserved: ~1 s of debt at 1,000/s
        bucket.reserve(KEY, rate, 200, adaptive=True)
    assert _state(redis_client)["tokens"] < -900
    report = Report(throttled=200, answered=200, retry_after=1)
    bucket.reserve(KEY, rate, 0, adaptive=True, report=report)
    limit = _state(redis_client)["limit"]
    assert limit == pytest.approx(rate * ratelimit.ADAPT_MIN_KEEP)
    wait = bucket.reserve(KEY, rate, 100, adaptive=True)
    assert wait == pytest.approx(1 + 100 / limit, rel=0.05)  # not ~(1,000 + 100) / 250 s


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
        (60, 550, ratelimit.ADAPT_MAX_KEEP),  # it refused a little: still a noticeable cut
        (490, 500, ratelimit.ADAPT_MIN_KEEP),  # it refused nearly all: at most a quarter kept
        (150, 0, 0.5),  # share unknown: halve
    ],
)
def test_a_cut_lands_just_under_what_the_provider_accepted(redis_client, throttled, answered, keep) -> None:
    bucket = TokenBucket(redis_client)
    rate = 1000.0
    bucket.reserve(KEY, rate, 200, adaptive=True)
    report = Report(throttled=throttled, answered=answered, retry_after=1)
    bucket.reserve(KEY, rate, 0, adaptive=True, report=report)
    assert _state(redis_client)["limit"] == pytest.approx(rate * keep)


def test_one_devices_429_does_not_slow_the_app(redis_client) -> None:
    """APNs 429 TooManyRequests for one device (or a few): no cut, no pause, the next chunk goes."""
    bucket = TokenBucket(redis_client)
    bucket.reserve(KEY, 0, 1, adaptive=True, report=Report(throttled=1, answered=1, retry_after=60))
    assert "limit" not in _state(redis_client)
    assert bucket.reserve(KEY, 0, 500, adaptive=True) == 0.0
    # Still below THROTTLE_MIN_DEVICES distinct devices within the window (1 + 48), even at 100 %.
    few = ratelimit.THROTTLE_MIN_DEVICES - 2
    bucket.reserve(KEY, 0, 0, adaptive=True, report=Report(throttled=few, answered=few, retry_after=60))
    assert "limit" not in _state(redis_client)
    assert bucket.reserve(KEY, 0, 500, adaptive=True) == 0.0


def test_throttled_devices_add_up_within_the_window(redis_client) -> None:
    bucket = TokenBucket(redis_client)
    rate = 1000.0
    half = ratelimit.THROTTLE_MIN_DEVICES // 2 + 1
    bucket.reserve(KEY, rate, 200, adaptive=True, report=Report(throttled=half, answered=200))
    assert "limit" not in _state(redis_client)
    bucket.reserve(KEY, rate, 0, adaptive=True, report=Report(throttled=half, answered=200))
    assert "limit" in _state(redis_client)


def test_a_cut_after_an_idle_second_lands_on_the_floor_not_at_one_per_second(redis_client) -> None:
    """The reservation rate measured over an empty window used to be 0, which pinned the rate at
    1/s with no growth. Now the cut keeps a quarter of what the provider accepted lately."""
    bucket = TokenBucket(redis_client)
    # The provider accepted 3,000 answers a moment ago (about 100/s over the floor's 30 s)...
    bucket.reserve(KEY, 0, 0, adaptive=True, report=Report(accepted=3000))
    # ...then nothing was reserved for over two seconds (an idle window), then throttling.
    redis_client.hset(KEY, mapping={"m_ts": float(redis_client.time()[0]) - 5, "m_n": 0})
    bucket.reserve(KEY, 0, 0, adaptive=True, report=Report(throttled=60, answered=60, retry_after=1))
    state = _state(redis_client)
    floor = 3000 / ratelimit.ADAPT_FLOOR_TAU_S * ratelimit.ADAPT_MIN_KEEP
    assert state["limit"] >= floor * 0.95
    assert state["limit"] >= ratelimit.ADAPT_FLOOR_MIN
    assert state["slope"] >= floor * ratelimit.ADAPT_INCREASE * 0.95, "it grows back"


def test_with_nothing_accepted_the_floor_is_the_minimum(redis_client) -> None:
    bucket = TokenBucket(redis_client)
    bucket.reserve(KEY, 0, 0, adaptive=True, report=Report(throttled=60, answered=60, retry_after=1))
    state = _state(redis_client)
    assert state["limit"] >= ratelimit.ADAPT_FLOOR_MIN
    assert state["slope"] > 0
