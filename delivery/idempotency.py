"""At-most-once delivery per (campaign, device): a Redis bitmap of the devices a campaign delivered.

A device's bit is set as soon as the provider accepted its message, one chunk at a time, before
the shard records its counters. A shard that is run again (the broker redelivered it after a
worker died, or a crash hit between sending and recording) checks the bitmap first: it skips
every delivered device and counts it delivered (the dead run could not), so only the requests
that were in flight when the process died can be repeated. Other answers leave no bit: a re-run
sends to an invalid, rejected or dead-lettered device again, which repeats nothing on the phone
and records its answer (a deactivation, a dead letter) that the dead run never wrote. Devices
waiting for a retry have no bit either: their retry shard sends them.

Device ids are bigints; the bitmap is split into blocks of 2^24 ids (2 MiB each at most) so that
ids beyond BITFIELD's 2^32 offsets work and a sparse id space costs only the blocks it touches.
One pipeline (one round trip) checks or marks a whole shard: dense ids as a byte range of the
block (GETRANGE, or an OR script), sparse ones bit by bit (BITFIELD). Both address the same bits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import redis

BLOCK_BITS = 24
BLOCK_MASK = (1 << BLOCK_BITS) - 1
# A finished campaign's bitmap is only needed for late redeliveries.
TTL_AFTER_FINISH_S = 7 * 24 * 3600


def _key(campaign_id: int, block: int) -> str:
    return f"pushsvc:idem:{campaign_id}:{block}"


def _by_block(device_ids: Iterable[int]) -> dict[int, list[int]]:
    blocks: dict[int, list[int]] = defaultdict(list)
    for device_id in device_ids:
        blocks[device_id >> BLOCK_BITS].append(device_id)
    return blocks


def _span(ids: list[int]) -> tuple[int, int] | None:
    """The first and last byte of the block holding `ids`, when they are dense enough (at least one
    id per byte on average, as a range shard's are) to be read and written as that byte range:
    one short string instead of 3-4 BITFIELD arguments per id (docs/scaling.md: Redis's CPU is the
    first central ceiling). None for sparse ids (a retry shard's), which keep BITFIELD."""
    first = min(ids) & BLOCK_MASK
    last = max(ids) & BLOCK_MASK
    if (last >> 3) - (first >> 3) + 1 > len(ids):
        return None
    return first >> 3, last >> 3


# ORs a run of bytes into the bitmap, atomically (a script runs alone), so a concurrent run's bits
# in the same bytes (a neighbouring shard's, a retry's) are kept: a plain SETRANGE would drop them.
# For a dense chunk of 500 devices it costs Redis less than half of BITFIELD's 500 SETs (measured).
_OR_SPAN = """
local first = tonumber(ARGV[1])
local bits = ARGV[2]
local old = redis.call('GETRANGE', KEYS[1], first, first + #bits - 1)
local out = {}
for i = 1, #bits do
  out[i] = string.char(bit.bor(string.byte(bits, i), string.byte(old, i) or 0))
end
redis.call('SETRANGE', KEYS[1], first, table.concat(out))
return 1
"""


def finished(client: redis.Redis, campaign_id: int, device_ids: list[int]) -> set[int]:
    """The subset of `device_ids` this campaign already finished."""
    if not device_ids:
        return set()
    pipe = client.pipeline(transaction=False)
    order: list[tuple[list[int], int | None]] = []
    for block, ids in _by_block(device_ids).items():
        span = _span(ids)
        if span is None:
            args: list[object] = []
            for device_id in ids:
                args += ["GET", "u1", device_id & BLOCK_MASK]
            pipe.execute_command("BITFIELD_RO", _key(campaign_id, block), *args)
        else:
            pipe.getrange(_key(campaign_id, block), *span)
        order.append((ids, span and span[0]))
    done: set[int] = set()
    for (ids, first), bits in zip(order, pipe.execute(), strict=True):
        if first is None:
            done.update(device_id for device_id, bit in zip(ids, bits, strict=True) if bit)
            continue
        # Bit 0 is the most significant bit of byte 0 (SETBIT's order); GETRANGE stops at the
        # string's end, and the bytes past it hold no bits.
        for device_id in ids:
            offset = device_id & BLOCK_MASK
            at = (offset >> 3) - first
            if at < len(bits) and bits[at] & (0x80 >> (offset & 7)):
                done.add(device_id)
    return done


def mark_finished(client: redis.Redis, campaign_id: int, device_ids: Iterable[int]) -> None:
    blocks = _by_block(device_ids)
    if not blocks:
        return
    pipe = client.pipeline(transaction=False)
    for block, ids in blocks.items():
        span = _span(ids)
        if span is None:
            args: list[object] = []
            for device_id in ids:
                args += ["SET", "u1", device_id & BLOCK_MASK, 1]
            pipe.execute_command("BITFIELD", _key(campaign_id, block), *args)
            continue
        first, last = span
        bits = bytearray(last - first + 1)
        for device_id in ids:
            offset = device_id & BLOCK_MASK
            bits[(offset >> 3) - first] |= 0x80 >> (offset & 7)
        pipe.eval(_OR_SPAN, 1, _key(campaign_id, block), first, bytes(bits))
    pipe.execute()


def expire(client: redis.Redis, campaign_id: int, seconds: int = TTL_AFTER_FINISH_S) -> None:
    """Let a finished campaign's bitmap go after `seconds`."""
    for key in client.scan_iter(match=f"pushsvc:idem:{campaign_id}:*", count=1000):
        client.expire(key, seconds)


def memory_bytes(client: redis.Redis, campaign_id: int) -> int:
    return sum(
        client.memory_usage(key) or 0 for key in client.scan_iter(match=f"pushsvc:idem:{campaign_id}:*")
    )


# --- shard leases ------------------------------------------------------------------------------
# The bitmap keeps a device from being sent twice by runs that follow each other; a lease keeps two
# runs of one shard from overlapping (a broker redelivery after the visibility timeout while the
# first run still sends, or the recovery sweep re-publishing a shard whose lease ran out). Only the
# owner can refresh or release it (compare-and-set on its token): a run that finds its lease gone or
# taken sends nothing more, since another run may already own the devices it was about to send.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def lease_key(shard_id: int) -> str:
    return f"pushsvc:shard-lease:{shard_id}"


def plan_lease_key(campaign_id: int) -> str:
    """The planner's lease: one planning run per campaign; a dead planner's lease runs out and
    the recovery sweep (campaigns/recovery.py) starts planning again where it stopped."""
    return f"pushsvc:plan-lease:{campaign_id}"


def acquire_lease(client: redis.Redis, key: str, token: str, ttl_s: int) -> int:
    """0 when `token` now holds lease `key`, else the seconds the current holder has left."""
    if client.set(key, token, nx=True, ex=ttl_s):
        return 0
    return max(int(client.ttl(key)), 1)


def refresh_lease(pipe: redis.Redis | redis.client.Pipeline, key: str, token: str, ttl_s: int) -> object:
    """Extend the lease if `token` still holds it. On a client: whether it does; on a pipeline the
    answer (1 or 0) comes with the pipeline's results."""
    return pipe.eval(_REFRESH, 1, key, token, int(ttl_s))


def release_lease(client: redis.Redis, key: str, token: str) -> None:
    client.eval(_RELEASE, 1, key, token)
