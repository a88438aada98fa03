"""Token buckets in Redis, shared by every worker process.

`reserve` takes n tokens at once and returns how long the caller must wait before sending them.
The bucket may go into debt: a reservation is never refused, it is scheduled. This keeps a
reservation at one round trip (no retry loop) and is fair between workers: each one waits for
its own share in the order it asked. Redis' own clock (TIME) is used, so workers on hosts with
skewed clocks agree.

Buckets:
- per (app, platform): the provider quota (settings.PUSH_RATE_LIMITS, e.g. FCM 600k/min/project);
- per campaign: the rollout ramp, whose rate the caller computes for "now" (`rollout_rate`).
"""

from __future__ import annotations

from datetime import datetime

import redis

_RESERVE = """
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', key, 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + (now - ts) * rate) - n
redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', key, 3600)
if tokens >= 0 then
  return '0'
end
return tostring(-tokens / rate)
"""


class TokenBucket:
    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_RESERVE)

    def reserve(self, key: str, rate: float, n: int, burst: float | None = None) -> float:
        """Take `n` tokens from bucket `key` refilled at `rate`/s; seconds to wait before using them."""
        if rate <= 0 or n <= 0:
            return 0.0
        return float(self._script(keys=[key], args=[rate, self._burst(rate, n, burst), n]))

    def queue_reserve(
        self, pipe: redis.client.Pipeline, key: str, rate: float, n: int, burst: float | None = None
    ) -> bool:
        """`reserve` as one command of the caller's pipeline (its reply: the wait, as a string).
        False (nothing queued) when the bucket is unlimited."""
        if rate <= 0 or n <= 0:
            return False
        self._script(keys=[key], args=[rate, self._burst(rate, n, burst), n], client=pipe)
        return True

    @staticmethod
    def _burst(rate: float, n: int, burst: float | None) -> float:
        # A second's worth of burst, at least one chunk, so a full chunk can go at once.
        return max(burst if burst is not None else rate, float(n))


def provider_key(app_id: int, platform: str) -> str:
    return f"pushsvc:rate:app:{app_id}:{platform}"


def campaign_key(campaign_id: int) -> str:
    return f"pushsvc:rate:campaign:{campaign_id}"


def rollout_rate(
    start_rate: float | None, max_rate: float | None, ramp_minutes: float, started_at: datetime, now: datetime
) -> float:
    """The campaign's allowed rate at `now`: linear from start_rate to max_rate over the ramp; 0 = none."""
    if not start_rate and not max_rate:
        return 0.0
    start = float(start_rate or max_rate or 0)
    top = float(max_rate or start)
    if ramp_minutes <= 0:
        return top
    progress = min(max((now - started_at).total_seconds() / (ramp_minutes * 60.0), 0.0), 1.0)
    return start + (top - start) * progress
