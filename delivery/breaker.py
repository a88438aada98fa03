"""Circuit breaker per (app, provider), in Redis, shared by every worker process.

Why: a provider that is down (every answer a 5xx, or no answer at all) makes per-device retries
worse than useless. Each device's retry spends one of its attempts against a service that cannot
answer, so a one-minute outage dead-letters everything in flight, the dead letters trip the
campaign's error-rate halt, and every worker keeps hammering the provider while it recovers.

So a chunk whose answers are mostly server or transport failures (`is_outage`) opens the breaker:

- open: no shard of the app sends to that provider until `open_until`; callers wait (briefly)
  or defer their shard (campaigns/sending/run.py). The first open lasts BREAKER_OPEN_S (at least the
  provider's Retry-After);
- half-open: once `open_until` has passed, exactly one caller gets the probe (a small chunk);
  the others keep waiting until it reports, or until BREAKER_PROBE_TTL_S if it died;
- the probe's report decides: a healthy chunk closes the breaker, a failed one opens it again
  for twice as long, up to BREAKER_OPEN_MAX_S.

Reports from chunks that were already in flight when the breaker opened change nothing: they say
what the first failure said. Only the probe closes an open breaker, so stragglers' successes from
before the outage cannot flap it shut.

The devices of an outage chunk are retried without spending an attempt (campaigns/sending/ledger.py):
their failure says nothing about them. How long the provider has been down (`down_for`) is
returned with every verdict, so the caller can pause the campaign with a reason after
BREAKER_PAUSE_AFTER_S instead of retrying for ever.

One Lua script does report and verdict together, in the fan-out's per-chunk pipeline: no extra
round trip while the provider is healthy. Redis' own clock (TIME) is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import redis
from django.conf import settings

from delivery.providers.base import Outcome, Result

GO = "go"
PROBE = "probe"
WAIT = "wait"

OK = "ok"
FAIL = "fail"
RELEASE = "release"  # a probe taken but not sent (the campaign was paused meanwhile): give it back
REARM = "rearm"  # an operator resumed a campaign: probe now, and count the outage from now

OPEN_SET = "pushsvc:breaker:open"  # zset: breaker key -> unix time it opened (for metrics)
TRIPS = "pushsvc:metrics:breaker_trips"  # hash: "app|platform" -> times opened from closed

# KEYS[1] breaker, KEYS[2] OPEN_SET, KEYS[3] TRIPS. ARGV: report ('', ok, fail, release, rearm), caller,
# first open (s), open cap (s), probe ttl (s), Retry-After hint (s), trips field, ask ('1': the
# caller is about to send and may take the probe; '0': a last report, the caller is leaving).
_CHECK = """
local key, open_set, trips = KEYS[1], KEYS[2], KEYS[3]
local report, caller = ARGV[1], ARGV[2]
local base, cap, probe_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local hint = tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', key, 'open_until', 'open_for', 'opened_at', 'probe', 'probe_until')
local open_until, open_for, opened_at = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
local probe, probe_until = s[4], tonumber(s[5])
local prober = probe ~= false and probe == caller

local function open(duration)
  open_until = now + math.max(duration, hint)
  redis.call('HSET', key, 'open_until', tostring(open_until), 'open_for', tostring(duration),
             'opened_at', tostring(opened_at))
  redis.call('HDEL', key, 'probe', 'probe_until')
  redis.call('ZADD', open_set, opened_at, key)
  probe = false
end

if report == 'fail' then
  if open_until == nil then
    opened_at = now
    open(base)
    redis.call('HINCRBY', trips, ARGV[7], 1)
  elseif prober then
    open(math.min(open_for * 2, cap))
  end
elseif report == 'ok' and prober then
  redis.call('DEL', key)
  redis.call('ZREM', open_set, key)
  return {'go', '0', '0'}
elseif report == 'release' and prober then
  redis.call('HDEL', key, 'probe', 'probe_until')
  probe = false
elseif report == 'rearm' and open_until ~= nil then
  opened_at, open_until, probe = now, now, false
  redis.call('HSET', key, 'open_until', tostring(now), 'opened_at', tostring(now))
  redis.call('HDEL', key, 'probe', 'probe_until')
  redis.call('ZADD', open_set, now, key)
end

if open_until == nil then
  return {'go', '0', '0'}
end
redis.call('EXPIRE', key, 86400)
local down = tostring(now - opened_at)
if now < open_until or ARGV[8] ~= '1' then
  return {'wait', tostring(math.max(open_until - now, 0)), down}
end
if probe == false or probe_until == nil or probe_until <= now or prober then
  redis.call('HSET', key, 'probe', caller, 'probe_until', tostring(now + probe_ttl))
  return {'probe', '0', down}
end
return {'wait', tostring(math.min(probe_until - now, 1.0)), down}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # GO, PROBE (send a small chunk and report it) or WAIT
    wait_s: float = 0.0
    down_for_s: float = 0.0  # since the breaker opened (0 when closed)


CLOSED = Verdict(GO)


def breaker_key(app_id: int, platform: str) -> str:
    return f"pushsvc:breaker:app:{app_id}:{platform}"


def is_outage(answers: Iterable[Result], *, probe: bool = False) -> bool:
    """Whether a chunk's answers say the provider is down rather than anything about its devices:
    at least BREAKER_FAILURE_RATIO of them server errors (5xx) or no answer at all (transport),
    and at least BREAKER_MIN_FAILURES of them, so that a handful of devices cannot open the
    breaker for the whole app (a probe is judged on the ratio alone: it is the breaker's own
    sample). Throttling (429) has its own remedy (delivery/ratelimit.py) and does not count."""
    total = failed = 0
    for answer in answers:
        total += 1
        if answer.outcome == Outcome.RETRY and (answer.status is None or answer.status >= 500):
            failed += 1
    least = 1 if probe else settings.BREAKER_MIN_FAILURES
    return total > 0 and failed >= least and failed >= settings.BREAKER_FAILURE_RATIO * total


class Breaker:
    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_CHECK)

    def check(
        self, app_id: int, platform: str, caller: str, report: str = "", retry_after: float = 0.0
    ) -> Verdict:
        """Report the caller's previous chunk (OK, FAIL or "" for none) and get the verdict for its
        next one. `caller` identifies one sending run (the shard run's lease token)."""
        return parse(self._script(**self._call(app_id, platform, caller, report, retry_after, ask=True)))

    def report(self, app_id: int, platform: str, caller: str, report: str, retry_after: float = 0.0) -> None:
        """A run's last report, with no next chunk: never hands this caller the probe."""
        self._script(**self._call(app_id, platform, caller, report, retry_after, ask=False))

    def queue_check(
        self,
        pipe: redis.client.Pipeline,
        app_id: int,
        platform: str,
        caller: str,
        report: str = "",
        retry_after: float = 0.0,
    ) -> None:
        """`check` as one command of the caller's pipeline; its reply goes through `parse`."""
        self._script(**self._call(app_id, platform, caller, report, retry_after, ask=True), client=pipe)

    def rearm(self, app_id: int, platform: str) -> None:
        """An operator resumed a campaign that an outage paused: an open breaker goes half-open at
        once (the next sender probes) and its outage clock restarts, so the campaign is not paused
        again before the provider had BREAKER_PAUSE_AFTER_S more to recover. A closed one stays so."""
        self._script(**self._call(app_id, platform, "", REARM, 0.0, ask=False))

    @staticmethod
    def _call(app_id: int, platform: str, caller: str, report: str, retry_after: float, *, ask: bool) -> dict:
        return {
            "keys": [breaker_key(app_id, platform), OPEN_SET, TRIPS],
            "args": [
                report,
                caller,
                settings.BREAKER_OPEN_S,
                settings.BREAKER_OPEN_MAX_S,
                settings.BREAKER_PROBE_TTL_S,
                min(max(retry_after, 0.0), settings.BREAKER_OPEN_MAX_S),
                f"{app_id}|{platform}",
                "1" if ask else "0",
            ],
        }


def parse(reply: list) -> Verdict:
    action, wait, down = (part.decode() if isinstance(part, bytes) else str(part) for part in reply)
    if action == GO:
        return CLOSED
    return Verdict(action, float(wait), float(down))


def open_breakers(client: redis.Redis) -> list[tuple[int, str, float]]:
    """(app id, platform, unix time it opened) of every breaker open now (for /metrics). A
    breaker left open by a provider nobody sent to again expires after a day: dropped here."""
    entries = client.zrange(OPEN_SET, 0, -1, withscores=True)
    if not entries:
        return []
    pipe = client.pipeline(transaction=False)
    for raw, _ in entries:
        pipe.exists(raw)
    found = []
    for (raw, opened_at), alive in zip(entries, pipe.execute(), strict=True):
        if not alive:
            client.zrem(OPEN_SET, raw)
            continue
        *_, app_id, platform = raw.decode().split(":")
        found.append((int(app_id), platform, opened_at))
    return found
