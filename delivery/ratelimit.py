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

Adaptive provider buckets (AIMD). Each reservation also reports how the caller's previous chunk
went, so the feedback costs no extra round trip: how many answers the provider accepted (any
chunk), and, from chunks that can speak for the provider (first attempts of a broadcast: not retry
shards, not direct sends of a few devices), how many answered 429 out of how many. Per-device
throttling is not provider throttling: APNs answers 429 TooManyRequests for one device pushed to
too often, and that device's own retry backs off. So the bucket cuts only when, within
ADAPT_WINDOW_S, at least THROTTLE_MIN_DEVICES distinct devices (first attempts are distinct
devices) and THROTTLE_MIN_SHARE of the sampled answers were throttled.

A cut lands just under what the provider accepted: the rate that was being sent (the lower of the
current limit and the reservation rate measured over contiguous one-second windows) times the
window's accepted share, times ADAPT_MARGIN; it keeps at most ADAPT_MAX_KEEP and at least
ADAPT_MIN_KEEP of the rate (half when the share is unknown), and never goes below a floor: a
quarter of the rate the provider accepted over the last ADAPT_FLOOR_TAU_S (an exponentially
decayed count), and at least ADAPT_FLOOR_MIN/s, so an idle second can never pin the rate at 1/s.
One cut per throttling event: each reservation is told the bucket's epoch (the time of its last
cut) and its chunk's report carries it back; throttled answers of chunks reserved before the last
cut were sent at the rate just cut and count toward no further cut. (A one-second hold did this
by the clock; on a slow machine an event's reports came later than that and cut again and again,
toward the floor.) A cut forgives the bucket's debt: those tokens were taken at the rate just
found too high, and re-priced at the cut rate they stalled every sender (2,000 tokens at 10/s:
200 s). The bucket is paused for the Retry-After instead (capped at PAUSE_MAX_S: the
adapters default a missing header to a minute, which the throttled devices' own retry honours).
The limit then grows back linearly, by ADAPT_INCREASE of the throttled rate (at least the floor)
per second, and is dropped once it reaches the configured rate (or, for an unlimited bucket,
twice the throttled rate).
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import redis

ADAPT_INCREASE = 0.05  # of the throttled rate, per second: from half back to full in 10 s
ADAPT_MARGIN = 0.9  # of the accepted rate: where a cut lands
ADAPT_MIN_KEEP = 0.25  # a cut keeps at least this share of the rate (a provider refusing nearly all)
ADAPT_MAX_KEEP = 0.8  # and at most this: a throttling event always slows the sender noticeably
ADAPT_WINDOW_S = 5.0  # throttled answers are summed over this long before they can show a cut
ADAPT_FLOOR_TAU_S = 30.0  # accepted answers are averaged over about this long for the floor
ADAPT_FLOOR_MIN = 10.0  # messages/s: no cut goes below this
THROTTLE_MIN_DEVICES = 50  # distinct devices throttled within the window before the app is slowed
THROTTLE_MIN_SHARE = 0.1  # and this share of the sampled answers
PAUSE_MAX_S = 10.0

# KEYS[1] bucket. ARGV: configured rate (0 = unlimited), burst (0 = one second, at least n), n,
# throttled and answered (the caller's previous chunk, when it can speak for the provider),
# retry_after (s), accepted (the previous chunk's accepted answers), the epoch that chunk's
# reservation was told, then the constants. Returns {seconds to wait, the bucket's epoch}.
_RESERVE = """
local key = KEYS[1]
local configured = tonumber(ARGV[1])
local burst_arg = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local throttled = tonumber(ARGV[4])
local answered = tonumber(ARGV[5])
local retry_after = tonumber(ARGV[6])
local accepted = tonumber(ARGV[7])
local seen_epoch = tonumber(ARGV[8])
local increase, pause_max = tonumber(ARGV[9]), tonumber(ARGV[10])
local margin, min_keep, max_keep = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local window, tau, floor_min = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16])
local min_devices, min_share = tonumber(ARGV[17]), tonumber(ARGV[18])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', key, 'tokens', 'ts', 'limit', 'lim_ts', 'slope', 'ceiling', 'cut_at',
                     'm_ts', 'm_n', 'm_rate', 'w_ts', 'w_hit', 'w_ans', 'acc', 'acc_ts')
local tokens, ts = tonumber(s[1]), tonumber(s[2])
local limit, lim_ts, slope, ceiling = tonumber(s[3]), tonumber(s[4]), tonumber(s[5]), tonumber(s[6])
local cut_at = tonumber(s[7])
local m_ts, m_n, m_rate = tonumber(s[8]), tonumber(s[9]) or 0, tonumber(s[10])
local w_ts, w_hit, w_ans = tonumber(s[11]), tonumber(s[12]) or 0, tonumber(s[13]) or 0
local acc, acc_ts = tonumber(s[14]) or 0, tonumber(s[15]) or now

-- the reservation rate actually seen, over one-second windows; after a gap it is unknown, not ~0
if m_ts == nil then m_ts = now end
local elapsed = now - m_ts
if elapsed >= 1 then
  if elapsed < 2 then m_rate = m_n / elapsed else m_rate = nil end
  m_ts, m_n, elapsed = now, 0, 0
end
local measured = m_rate
if m_n > 0 then
  local current = m_n / math.max(elapsed, 0.1)
  if measured == nil or current > measured then measured = current end
end

-- what the provider accepted lately (decayed count over ~tau seconds): the floor of any cut
acc = acc * math.exp(-math.max(now - acc_ts, 0) / tau) + math.max(accepted, 0)
acc_ts = now
local floor = math.max(floor_min, acc / tau * min_keep)

-- throttled answers of distinct devices, summed over a window; not those of chunks reserved
-- before the last cut (the epoch their reservation was told): that event was answered already
if w_ts == nil or now - w_ts > window then w_ts, w_hit, w_ans = now, 0, 0 end
if cut_at == nil or seen_epoch >= cut_at then
  w_hit = w_hit + math.max(throttled, 0)
  w_ans = w_ans + math.max(answered, 0)
end
local provider_throttling = w_hit >= min_devices and w_hit >= min_share * w_ans

-- additive increase
if limit ~= nil then
  limit = limit + slope * (now - lim_ts)
  lim_ts = now
  if limit >= ceiling then limit = nil end
end

-- multiplicative decrease
if provider_throttling then
  local base = limit
  if measured ~= nil and (base == nil or measured < base) then base = measured end
  if configured > 0 and (base == nil or configured < base) then base = configured end
  if base == nil then base = math.max(n, w_ans, w_hit, acc / tau) end
  base = math.max(base, floor)
  local keep = 0.5
  if w_ans > 0 then
    keep = math.min(math.max((w_ans - w_hit) / w_ans * margin, min_keep), max_keep)
  end
  limit = math.max(base * keep, floor)
  lim_ts, cut_at = now, now
  slope = base * increase
  if configured > 0 then ceiling = configured else ceiling = base * 2 end
  tokens = 0
  ts = now + math.min(math.max(retry_after, 0), pause_max)
  w_ts, w_hit, w_ans = now, 0, 0
end

local epoch = '0'
if cut_at ~= nil then epoch = tostring(cut_at) end
if limit ~= nil then
  redis.call('HSET', key, 'limit', tostring(limit), 'lim_ts', tostring(lim_ts), 'slope', tostring(slope),
             'ceiling', tostring(ceiling), 'cut_at', epoch)
else
  redis.call('HDEL', key, 'limit', 'lim_ts', 'slope', 'ceiling')
  if cut_at ~= nil then redis.call('HSET', key, 'cut_at', epoch) end
end

local rate = limit
if configured > 0 and (rate == nil or configured < rate) then rate = configured end
m_n = math.max(m_n + n, 0)  -- a refund (negative n) never makes the rate negative
local fields = {'m_ts', tostring(m_ts), 'm_n', tostring(m_n), 'w_ts', tostring(w_ts), 'w_hit',
                tostring(w_hit), 'w_ans', tostring(w_ans), 'acc', tostring(acc), 'acc_ts', tostring(acc_ts)}
if m_rate ~= nil then table.insert(fields, 'm_rate'); table.insert(fields, tostring(m_rate))
else redis.call('HDEL', key, 'm_rate') end
redis.call('HSET', key, unpack(fields))
redis.call('EXPIRE', key, 3600)
if rate == nil then
  -- unlimited: no bucket to keep, but a pause still holds
  redis.call('HDEL', key, 'tokens', 'ts')
  if ts ~= nil and ts > now then
    redis.call('HSET', key, 'tokens', '0', 'ts', tostring(ts))
    return {tostring(ts - now), epoch}
  end
  return {'0', epoch}
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
  return {'0', epoch}
end
return {tostring(-tokens / rate), epoch}
"""


class Report(NamedTuple):
    """How a chunk went, for the provider's adaptive bucket; rides on the next reservation."""

    throttled: int = 0  # sampled answers the provider throttled (0 when the chunk is no sample)
    answered: int = 0  # sampled answers in all (first attempts of a broadcast)
    retry_after: float = 0.0  # the throttled answers' largest Retry-After
    accepted: int = 0  # answers the provider accepted, sampled or not
    epoch: str = "0"  # the bucket's epoch when the chunk was reserved (`Grant.epoch`)


NO_REPORT = Report()


class Grant(NamedTuple):
    """A reservation's answer: when its tokens may be used, and the bucket's epoch (the time of
    its last cut, "0" before any) for the report of the chunk they send."""

    wait: float
    epoch: str


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
        report: Report = NO_REPORT,
    ) -> float:
        """Take `n` tokens from bucket `key` refilled at `rate`/s; seconds to wait before using them.

        An adaptive bucket (a provider's) also takes the caller's last chunk's `report`; `n` may be
        0 for a report alone. A non-adaptive bucket with `rate` <= 0 is unlimited: no call.
        """
        args = self._args(rate, n, burst, adaptive, report)
        if args is None:
            return 0.0
        return self.parse(self._script(keys=[key], args=args)).wait

    def refund(self, key: str, rate: float, n: int, *, adaptive: bool = False) -> None:
        """Give back `n` tokens reserved for sends that did not happen (the provider's breaker
        was open, or the wait was too long to sleep), so no debt slows the sends after it."""
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
        report: Report = NO_REPORT,
    ) -> bool:
        """`reserve` as one command of the caller's pipeline (its reply: `parse` makes it a Grant).
        False (nothing queued) when the bucket is unlimited and not adaptive."""
        args = self._args(rate, n, burst, adaptive, report)
        if args is None:
            return False
        self._script(keys=[key], args=args, client=pipe)
        return True

    @staticmethod
    def parse(reply: list[bytes]) -> Grant:
        wait, epoch = reply
        return Grant(float(wait), epoch.decode())

    @staticmethod
    def _args(
        rate: float, n: int, burst: float | None, adaptive: bool, report: Report
    ) -> list[float | str] | None:
        if not adaptive and (rate <= 0 or n == 0):
            return None
        # Burst: a second's worth at the bucket's rate of the moment, at least one chunk (0 = that).
        return [
            max(rate, 0.0),
            burst or 0.0,
            n,
            max(report.throttled, 0),
            max(report.answered, 0),
            max(report.retry_after, 0.0),
            max(report.accepted, 0),
            report.epoch,
            ADAPT_INCREASE,
            PAUSE_MAX_S,
            ADAPT_MARGIN,
            ADAPT_MIN_KEEP,
            ADAPT_MAX_KEEP,
            ADAPT_WINDOW_S,
            ADAPT_FLOOR_TAU_S,
            ADAPT_FLOOR_MIN,
            THROTTLE_MIN_DEVICES,
            THROTTLE_MIN_SHARE,
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
