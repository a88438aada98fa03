"""The mass-prune guard.

When most of the first answers of a campaign for one provider say "this token is invalid", the
likely cause is not a million uninstalls but our side: an APNs credential for the wrong
environment (sandbox tokens sent to production answer BadDeviceToken), a wrong topic, a bad token
import. Deactivating on those answers would wipe the user base. The guard watches the first
results per (campaign, platform); once enough are in and the invalid share is above the limit, it
trips: the campaign pauses with the reason and the invalid answers are held (not applied) until
an operator resumes with `confirm_prune`.

Counting happens in Redis (one Lua call per chunk), shared by every worker sending the campaign.
"""

from __future__ import annotations

import redis
from django.conf import settings

from tokens.models import Platform

_OBSERVE = """
local key = KEYS[1]
local n = tonumber(ARGV[1])
local bad = tonumber(ARGV[2])
local min_results = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local ratio = tonumber(ARGV[5])
if redis.call('HGET', key, 'tripped') == '1' then return 1 end
local seen = tonumber(redis.call('HGET', key, 'total') or '0')
if seen >= window then return 2 end
local total = redis.call('HINCRBY', key, 'total', n)
local invalid = redis.call('HINCRBY', key, 'invalid', bad)
redis.call('EXPIRE', key, 7 * 24 * 3600)
if total >= min_results and invalid > ratio * total then
  redis.call('HSET', key, 'tripped', '1')
  return 1
end
return 0
"""


HOLD = 1
PASSED = 2


class PruneGuard:
    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_OBSERVE)

    def observe(self, campaign_id: int, platform: str, results: int, invalid: int) -> int:
        """Count one chunk's results: HOLD when invalid answers must be held (the guard tripped),
        PASSED once the first results are all in without tripping (stop asking), else 0."""
        return int(
            self._script(
                keys=[guard_key(campaign_id, platform)],
                args=[
                    results,
                    invalid,
                    settings.CAMPAIGN_PRUNE_GUARD_MIN,
                    settings.CAMPAIGN_PRUNE_GUARD_WINDOW,
                    settings.CAMPAIGN_PRUNE_GUARD_RATIO,
                ],
            )
        )


def guard_key(campaign_id: int, platform: str) -> str:
    return f"pushsvc:pruneguard:{campaign_id}:{platform}"


def guard_keys(campaign_id: int) -> list[str]:
    """The campaign's counters on every platform (forgotten at launch: campaigns/control.py)."""
    return [guard_key(campaign_id, platform) for platform in Platform.values]


def describe(platform: str, invalid: int, total: int, reason: str) -> str:
    share = 100.0 * invalid / max(total, 1)
    return (
        f"Mass-prune guard: {share:.0f}% of the first {platform} results said the token is invalid "
        f"({reason}). Tokens were NOT deactivated. Check the credential's environment "
        f"(sandbox/production), the topic and the last token import; then resume with "
        f'{{"confirm_prune": true}} to apply the invalidations, or cancel.'
    )
