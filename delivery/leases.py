"""Shard leases that die with their process: short, kept alive by a heartbeat, and registered.

A shard run holds a Redis lease (delivery/idempotency.py: owner token, compare-and-set refresh).
A lease refreshed only between chunks had to outlast the slowest chunk (throttling, breaker
waits, a 15 s request timeout), so it was long (120 s) and a worker killed outright held its
shards for two minutes. Here a lease is short (CAMPAIGN_SHARD_LEASE_S, 8 s) and every process
that holds one refreshes it from a heartbeat thread (`LeaseKeeper`, every
CAMPAIGN_SHARD_LEASE_REFRESH_S) however long its current chunk takes. A dead process stops
refreshing, so its leases run out within seconds; a hung one is let go too: the keeper stops
refreshing a run that reached no checkpoint for CAMPAIGN_SHARD_STALL_S.

A lease that ran out is not enough to re-run the shard: its broker message is in the dead
worker's unacked set until the visibility timeout (an hour). So a lease is also registered
(`REGISTER_KEY`, a hash shard id -> owner token) when taken and unregistered when released, in
the same script: an entry whose lease is gone (or held by another token) is a run that died
without releasing. The recovery sweep (campaigns/recovery.py `republish_orphans`) publishes
those shards again at once, with no grace and whatever the queue holds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis
from django.conf import settings

from delivery import idempotency

logger = logging.getLogger(__name__)

REGISTER_KEY = "pushsvc:shard-runs"

# KEYS: lease, register. ARGV: token, ttl, shard id. 0 when taken, else the holder's seconds left.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
  return 0
end
return math.max(redis.call('TTL', KEYS[1]), 1)
"""
# KEYS: lease, register. ARGV: token, shard id. Each is removed only if it is still this token's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then return redis.call('HDEL', KEYS[2], ARGV[2]) end
return 0
"""
# KEYS: register. ARGV: shard id, token.
_FORGET = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


def new_token() -> str:
    """An owner token that says where the run is (host:pid), for operators reading the register."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:16]}"


def acquire(client: redis.Redis, shard_id: int, token: str, ttl_s: int) -> int:
    """Take shard `shard_id`'s lease and register it: 0 when taken, else the holder's seconds left."""
    key = idempotency.lease_key(shard_id)
    return int(client.eval(_ACQUIRE, 2, key, REGISTER_KEY, token, int(ttl_s), shard_id))


def release(client: redis.Redis, shard_id: int, token: str) -> None:
    client.eval(_RELEASE, 2, idempotency.lease_key(shard_id), REGISTER_KEY, token, shard_id)


def orphans(client: redis.Redis) -> list[tuple[int, str]]:
    """(shard id, token) of registered runs whose lease is gone or held by another token: runs that
    died (or stalled) without releasing. Two round trips whatever the number of runs."""
    entries = client.hgetall(REGISTER_KEY)
    if not entries:
        return []
    pairs = [(int(shard), token) for shard, token in entries.items()]
    pipe = client.pipeline(transaction=False)
    for shard_id, _ in pairs:
        pipe.get(idempotency.lease_key(shard_id))
    return [
        (shard_id, token.decode())
        for (shard_id, token), held in zip(pairs, pipe.execute(), strict=True)
        if held != token
    ]


def forget(client: redis.Redis, shard_id: int, token: str) -> bool:
    """Unregister a dead run (only if its entry is still `token`'s: a new run may have taken it)."""
    return bool(client.eval(_FORGET, 1, REGISTER_KEY, shard_id, token))


@dataclass
class _Held:
    token: str
    ttl_s: int
    progress: float  # the keeper's clock at the run's last checkpoint
    stalled: bool = False


class LeaseKeeper:
    """Refreshes the shard leases this process holds, every `every_s`, from its own thread.

    A run calls `hold` after taking a lease, `progress` at each checkpoint and `drop` before
    releasing. `refresh` is one pipeline for every lease held (one round trip per process per
    period, however many runs a thread pool has); it skips a run whose last checkpoint is older
    than `stall_s`, so a hung run's lease runs out as it did when only checkpoints refreshed it.
    The refresh stays owner-checked: a lease another run took is never taken back; the run finds
    out at its next checkpoint and stops (LEASE_LOST).
    """

    def __init__(
        self,
        client: Callable[[], redis.Redis],
        *,
        every_s: float,
        stall_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.every_s = every_s
        self.stall_s = stall_s
        self._clock = clock
        self._held: dict[int, _Held] = {}
        self._lock = threading.Lock()
        self._thread_pid = 0  # the process whose thread runs: a forked child starts its own

    def hold(self, shard_id: int, token: str, ttl_s: int) -> None:
        with self._lock:
            self._held[shard_id] = _Held(token, ttl_s, self._clock())

    def progress(self, shard_id: int) -> None:
        with self._lock:
            held = self._held.get(shard_id)
            if held is not None:
                held.progress, held.stalled = self._clock(), False

    def drop(self, shard_id: int) -> None:
        with self._lock:
            self._held.pop(shard_id, None)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def refresh(self) -> list[int]:
        """Refresh every lease held by a run that is not stalled; the shards refreshed."""
        now = self._clock()
        with self._lock:
            live = []
            for shard_id, held in self._held.items():
                if now - held.progress <= self.stall_s:
                    live.append((shard_id, held.token, held.ttl_s))
                elif not held.stalled:
                    held.stalled = True
                    logger.warning(
                        "shard %s: no checkpoint for %.0f s; its lease is left to run out",
                        shard_id,
                        now - held.progress,
                    )
        if not live:
            return []
        pipe = self._client().pipeline(transaction=False)
        for shard_id, token, ttl_s in live:
            idempotency.refresh_lease(pipe, idempotency.lease_key(shard_id), token, ttl_s)
        return [shard_id for (shard_id, _, _), ok in zip(live, pipe.execute(), strict=True) if ok]

    def ensure_thread(self) -> None:
        """Start the heartbeat thread in this process unless it runs (threads do not survive a fork)."""
        with self._lock:
            if self._thread_pid == os.getpid():
                return
            self._thread_pid = os.getpid()
        threading.Thread(target=self._loop, name="shard-lease-keeper", daemon=True).start()

    def _loop(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.every_s):
            try:
                self.refresh()
            except redis.RedisError as exc:  # the runs' own checkpoints meet it too; try next period
                logger.info("lease refresh skipped: %s", type(exc).__name__)


_keeper: LeaseKeeper | None = None
_keeper_lock = threading.Lock()


def process_keeper() -> LeaseKeeper:
    """This process's keeper, its thread started (a worker's pool process, on its first shard)."""
    global _keeper
    from delivery import runtime  # the process's Redis client; runtime builds providers, imported late

    with _keeper_lock:
        if _keeper is None:
            _keeper = LeaseKeeper(
                runtime.redis_client,
                every_s=settings.CAMPAIGN_SHARD_LEASE_REFRESH_S,
                stall_s=settings.CAMPAIGN_SHARD_STALL_S,
            )
    _keeper.ensure_thread()
    return _keeper
