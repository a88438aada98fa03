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
One pipeline (one round trip) checks or marks a whole shard.
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


def finished(client: redis.Redis, campaign_id: int, device_ids: list[int]) -> set[int]:
    """The subset of `device_ids` this campaign already finished."""
    if not device_ids:
        return set()
    blocks = _by_block(device_ids)
    pipe = client.pipeline(transaction=False)
    order: list[list[int]] = []
    for block, ids in blocks.items():
        args: list[object] = []
        for device_id in ids:
            args += ["GET", "u1", device_id & BLOCK_MASK]
        pipe.execute_command("BITFIELD_RO", _key(campaign_id, block), *args)
        order.append(ids)
    done: set[int] = set()
    for ids, bits in zip(order, pipe.execute(), strict=True):
        done.update(device_id for device_id, bit in zip(ids, bits, strict=True) if bit)
    return done


def mark_finished(client: redis.Redis, campaign_id: int, device_ids: Iterable[int]) -> None:
    blocks = _by_block(device_ids)
    if not blocks:
        return
    pipe = client.pipeline(transaction=False)
    for block, ids in blocks.items():
        args: list[object] = []
        for device_id in ids:
            args += ["SET", "u1", device_id & BLOCK_MASK, 1]
        pipe.execute_command("BITFIELD", _key(campaign_id, block), *args)
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
