"""Token buckets in Redis, shared by every worker process.

`reserve` takes n tokens at once and returns how long the caller must wait before sending them.
The bucket may go into debt: a reservation is never refused, it is scheduled. This keeps a
reservation at one round trip (no retry loop) and is fair between workers: each one waits for
its own share in the order it asked. Redis' own clock (TIME) is used, so workers on hosts with
skewed clocks agree.

Buckets:
- per (app, platform): the provider quota (settings.PUSH_RATE_LIMITS, e.g. FCM 600k/min/project),
  adaptive: see below;
- per campaign: the rollout ramp, whose rate the caller computes for "now" (`rollout_rate`).

Adaptive provider buckets (AIMD). Each reservation also reports how many of the caller's previous
chunk were throttled (429 TooManyRequests / QUOTA_EXCEEDED) out of how many answers, and the
largest Retry-After, so the feedback costs no extra round trip. On a throttled report the bucket's
rate is cut to what the provider actually accepted: the rate that was being sent (the lower of
the current limit and the measured reservation rate, so an unlimited bucket gets a limit too)
times the chunk's accepted share, times ADAPT_MARGIN to settle just under it; the cut keeps at
most ADAPT_MAX_KEEP and at least ADAPT_MIN_KEEP of the rate (half when the share is unknown).
One cut per ADAPT_HOLD_S: the chunks in flight when the provider started refusing all report the
same event. The bucket is paused for the Retry-After (capped at PAUSE_MAX_S: the adapters
default a missing header to a minute, which the throttled devices' own retry honours). The
limit then grows back linearly, by ADAPT_INCREASE of the throttled rate per second, and is
dropped once it reaches the configured rate (or, for an unlimited bucket, twice the throttled
rate). Senders thus settle just under the provider's real rate instead of doubling their traffic
with refusals and retries, or halving it for a provider that refused a tenth.
"""

from __future__ import annotations

from datetime import datetime

import redis

ADAPT_INCREASE = 0.05  # of the throttled rate, per second: from half back to full in 10 s
ADAPT_MARGIN = 0.9  # of the accepted rate: where a cut lands
ADAPT_MIN_KEEP = 0.25  # a cut keeps at least this share of the rate (a provider refusing nearly all)
ADAPT_MAX_KEEP = 0.8  # and at most this: a throttling event always slows the sender noticeably
ADAPT_HOLD_S = 1.0  # one cut per throttling event, not one per chunk that was in flight
PAUSE_MAX_S = 10.0
_MIN_RATE = 1.0

# KEYS[1] bucket. ARGV: configured rate (0 = unlimited), burst (0 = one second, at least n), n,
# throttled (in the caller's previous chunk), retry_after (s), increase, hold, pause cap,
# answered (the previous chunk's answers; 0 = unknown), margin, min keep, max keep.
_RESERVE = """
local key = KEYS[1]
local configured = tonumber(ARGV[1])
local burst_arg = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local throttled = tonumber(ARGV[4])
local retry_after = tonumber(ARGV[5])
local increase = tonumber(ARGV[6])
local hold = tonumber(ARGV[7])
local pause_max = tonumber(ARGV[8])
local answered = tonumber(ARGV[9])
local margin, min_keep, max_keep = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', key, 'tokens', 'ts', 'limit', 'lim_ts', 'slope', 'ceiling', 'cut_at',
                     'm_ts', 'm_n', 'm_rate')
local tokens, ts = tonumber(s[1]), tonumber(s[2])
local limit, lim_ts, slope, ceiling = tonumber(s[3]), tonumber(s[4]), tonumber(s[5]), tonumber(s[6])
local cut_at = tonumber(s[7])
local m_ts, m_n, m_rate = tonumber(s[8]), tonumber(s[9]) or 0, tonumber(s[10])

-- the reservation rate actually seen, over one-second windows
if m_ts == nil then m_ts = now end
local elapsed = now - m_ts
if elapsed >= 1 then
  m_rate = m_n / elapsed
  m_ts, m_n, elapsed = now, 0, 0
end
local measured = m_rate
if m_n > 0 then
  local current = m_n / math.max(elapsed, 0.1)
  if measured == nil or current > measured then measured = current end
end

-- additive increase
if limit ~= nil then
  limit = limit + slope * (now - lim_ts)
  lim_ts = now
  if limit >= ceiling then limit = nil end
end

-- multiplicative decrease, once per event
if throttled > 0 and (cut_at == nil or now - cut_at >= hold) then
  local base = limit
  if measured ~= nil and (base == nil or measured < base) then base = measured end
  if configured > 0 and (base == nil or configured < base) then base = configured end
  if base == nil then base = math.max(n, throttled, 1) end
  local keep = 0.5
  if answered > 0 then
    keep = math.min(math.max((answered - throttled) / answered * margin, min_keep), max_keep)
  end
  limit = math.max(base * keep, 1)
  lim_ts, cut_at = now, now
  slope = base * increase
  if configured > 0 then ceiling = configured else ceiling = base * 2 end
  if tokens == nil or tokens > 0 then tokens = 0 end
  ts = now + math.min(math.max(retry_after, 0), pause_max)
end

if limit ~= nil then
  redis.call('HSET', key, 'limit', tostring(limit), 'lim_ts', tostring(lim_ts), 'slope', tostring(slope),
             'ceiling', tostring(ceiling), 'cut_at', tostring(cut_at))
else
  redis.call('HDEL', key, 'limit', 'lim_ts', 'slope', 'ceiling')
  if cut_at ~= nil then redis.call('HSET', key, 'cut_at', tostring(cut_at)) end
end

local rate = limit
if configured > 0 and (rate == nil or configured < rate) then rate = configured end
m_n = math.max(m_n + n, 0)  -- a refund (negative n) never makes the rate negative
local fields = {'m_ts', tostring(m_ts), 'm_n', tostring(m_n)}
if m_rate ~= nil then table.insert(fields, 'm_rate'); table.insert(fields, tostring(m_rate)) end
redis.call('HSET', key, unpack(fields))
redis.call('EXPIRE', key, 3600)
if rate == nil then
  -- unlimited: no bucket to keep, but a pause still holds
  redis.call('HDEL', key, 'tokens', 'ts')
  if ts ~= nil and ts > now then
    redis.call('HSET', key, 'tokens', '0', 'ts', tostring(ts))
    return tostring(ts - now)
  end
  return '0'
end
local burst = burst_arg
if burst <= 0 then burst = rate end
if burst < n then burst = n end
if tokens == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + (now - ts) * rate) - n
redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
if tokens >= 0 then
  return '0'
end
return tostring(-tokens / rate)
"""


class TokenBucket:
    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_RESERVE)

    def reserve(
        self,
        key: str,
        rate: float,
        n: int,
        burst: float | None = None,
        *,
        adaptive: bool = False,
        throttled: int = 0,
        retry_after: float = 0.0,
        answered: int = 0,
    ) -> float:
        """Take `n` tokens from bucket `key` refilled at `rate`/s; seconds to wait before using them.

        An adaptive bucket (a provider's) also takes the caller's last throttling report
        (`throttled` of `answered`); `n` may be 0 for a report alone. A non-adaptive bucket with
        `rate` <= 0 is unlimited: no call.
        """
        args = self._args(rate, n, burst, adaptive, throttled, retry_after, answered)
        if args is None:
            return 0.0
        return float(self._script(keys=[key], args=args))

    def refund(self, key: str, rate: float, n: int, *, adaptive: bool = False) -> None:
        """Give back `n` tokens reserved for sends that did not happen (the provider's breaker
        was open), so a deferred chunk leaves no debt that would slow the sends after it."""
        if n > 0:
            self.reserve(key, rate, -n, adaptive=adaptive)

    def queue_reserve(
        self,
        pipe: redis.client.Pipeline,
        key: str,
        rate: float,
        n: int,
        burst: float | None = None,
        *,
        adaptive: bool = False,
        throttled: int = 0,
        retry_after: float = 0.0,
        answered: int = 0,
    ) -> bool:
        """`reserve` as one command of the caller's pipeline (its reply: the wait, as a string).
        False (nothing queued) when the bucket is unlimited and not adaptive."""
        args = self._args(rate, n, burst, adaptive, throttled, retry_after, answered)
        if args is None:
            return False
        self._script(keys=[key], args=args, client=pipe)
        return True

    @staticmethod
    def _args(
        rate: float,
        n: int,
        burst: float | None,
        adaptive: bool,
        throttled: int,
        retry_after: float,
        answered: int = 0,
    ) -> list[float] | None:
        if not adaptive and (rate <= 0 or n == 0):
            return None
        # Burst: a second's worth at the bucket's rate of the moment, at least one chunk (0 = that).
        return [
            max(rate, 0.0),
            burst or 0.0,
            n,
            max(throttled, 0),
            max(retry_after, 0.0),
            ADAPT_INCREASE,
            ADAPT_HOLD_S,
            PAUSE_MAX_S,
            max(answered, 0),
            ADAPT_MARGIN,
            ADAPT_MIN_KEEP,
            ADAPT_MAX_KEEP,
        ]


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
