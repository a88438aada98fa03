"""Provider feedback: invalid-token results travel through a Redis Stream and reach the registry in bulk.

Send workers call `publish_invalidations` (one pipelined round trip per shard) instead of
updating rows one by one; `apply_feedback` reads the stream through a consumer group and applies
a batch with ONE statement on PostgreSQL: an `UPDATE ... FROM json_to_recordset(...)` that
deactivates the tokens and, in the same statement, writes one audit row per invalidation
(provider, campaign, reason, whether it took effect). SQLite (the demo) gets the same rules in
a few statements.

Callers that already hold a transaction of their own (a shard's results) can apply the same
statement synchronously with `apply_invalidations`, without the stream.

Guarantees:
- At least once, effect exactly once. Entries are acknowledged (and deleted) only after the
  transaction committed. A consumer that dies between read and commit leaves its entries pending
  in the group; after `HYGIENE_FEEDBACK_CLAIM_IDLE_S` any consumer reclaims them (XAUTOCLAIM).
  A batch applied twice (the ack was lost) changes nothing: the UPDATE only touches active rows,
  and the audit is unique on the stream entry id.
- The token is matched on id AND token_hash: feedback about a token the device has since rotated
  away from (FCM) or that moved to another device never touches the new token.
- A registration newer than the evidence wins: a row is deactivated only if
  `updated_at <= provider timestamp` (APNs 410) or, without one, `<= observed_at` (when the
  worker saw the answer), so a device that registered again meanwhile keeps its token.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING

import orjson
import redis
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from .models import DeviceToken

if TYPE_CHECKING:
    from delivery.providers.base import Result

logger = logging.getLogger(__name__)

STREAM = "pushsvc:hygiene:feedback"
GROUP = "hygiene"
AUDIT_TABLE = "tokens_deactivation_audit"
_TOKENS = DeviceToken._meta.db_table

# Platform (tokens.models.Platform) -> provider name recorded in the audit.
PROVIDER_BY_PLATFORM = {"ios": "apns", "android": "fcm", "huawei": "hms", "web": "webpush"}
_REASON_MAX = 64  # DeviceToken.deactivation_reason


@lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    """The process-wide client (one connection pool) on settings.REDIS_URL."""
    return redis.Redis.from_url(settings.REDIS_URL)


def default_consumer() -> str:
    # Stable for the life of a worker process, so its own pending entries come back to it; one
    # per thread too (a threads pool), since two readers sharing a name would share a backlog.
    name = f"{socket.gethostname()}:{os.getpid()}"
    if threading.current_thread() is not threading.main_thread():
        name += f":{threading.get_native_id()}"
    return name


@dataclass(slots=True, frozen=True)
class Invalidation:
    """One provider answer saying a token is dead."""

    device_id: int  # DeviceToken primary key
    token_hash: str  # DeviceToken.token_hash of the token that was sent to
    app_id: int
    provider: str  # apns | fcm | hms | webpush
    reason: str  # the provider's reason, e.g. Unregistered, BadDeviceToken, UNREGISTERED
    provider_ts: datetime | None = None  # APNs 410 timestamp
    campaign_id: int | None = None
    observed_at: datetime | None = None  # when the answer arrived; publish fills it in

    @classmethod
    def from_result(
        cls, result: Result, *, app_id: int, platform: str, campaign_id: int | None = None
    ) -> Invalidation:
        """Build from an adapter's INVALID_TOKEN Result (see delivery.providers.base)."""
        return cls(
            device_id=result.target.device_id,
            token_hash=hashlib.sha256(result.target.token.encode()).hexdigest(),
            app_id=app_id,
            provider=PROVIDER_BY_PLATFORM.get(platform, platform),
            reason=result.reason or "invalid_token",
            provider_ts=result.invalid_since,
            campaign_id=campaign_id,
        )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


# Exact integer microseconds: a float round trip could move a timestamp across `updated_at`.
def _us(value: datetime | None) -> str:
    return "" if value is None else str((value - _EPOCH) // _MICROSECOND)


def _from_us(raw: bytes | None) -> datetime | None:
    return None if not raw else _EPOCH + int(raw) * _MICROSECOND


def publish_invalidations(items: Iterable[Invalidation], *, client: redis.Redis | None = None) -> list[str]:
    """Append invalidations to the feedback stream in one pipelined round trip; returns entry ids."""
    client = client or redis_client()
    now = timezone.now()
    pipe = client.pipeline(transaction=False)
    count = 0
    for item in items:
        pipe.xadd(
            STREAM,
            {
                "d": item.device_id,
                "h": item.token_hash,
                "a": item.app_id,
                "p": item.provider,
                "r": item.reason[:_REASON_MAX],
                "t": _us(item.provider_ts),
                "c": "" if item.campaign_id is None else item.campaign_id,
                "o": _us(item.observed_at or now),
            },
        )
        count += 1
    if not count:
        return []
    return [entry_id.decode() for entry_id in pipe.execute()]


@dataclass(slots=True)
class FeedbackReport:
    read: int = 0  # entries taken this call (own pending + reclaimed + new)
    reclaimed: int = 0  # of which taken over from an idle (presumed dead) consumer
    deactivated: int = 0  # tokens switched to inactive
    audited: int = 0  # audit rows written (a replayed entry writes none)
    dropped: int = 0  # malformed entries acknowledged without effect
    acked: int = 0
    batches: int = 0
    seconds: float = 0.0

    def add(self, other: FeedbackReport) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class _Entry:
    stream_id: str
    item: Invalidation
    keep: bool = field(default=True)  # the one entry per token that drives the UPDATE


def ensure_group(client: redis.Redis) -> None:
    try:
        # From id 0: entries published before the group existed are not skipped.
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def read_batch(
    client: redis.Redis,
    consumer: str,
    batch_max: int,
    block_ms: int,
    claim_idle_ms: int,
) -> tuple[list[tuple[bytes, dict | None]], int]:
    """Take up to batch_max entries: own pending first, then orphaned ones, then new ones.

    Returns (entries, how many were reclaimed). Entries stay pending until `ack` is called.
    """
    taken: list[tuple[bytes, dict | None]] = []
    # Own pending: delivered to this consumer by an earlier call that failed before its ack.
    reply = client.xreadgroup(GROUP, consumer, {STREAM: "0"}, count=batch_max)
    if reply:
        taken.extend(reply[0][1])
    reclaimed = 0
    if len(taken) < batch_max:
        reply = client.xautoclaim(
            STREAM, GROUP, consumer, min_idle_time=claim_idle_ms, start_id="0-0", count=batch_max - len(taken)
        )
        claimed = reply[1]
        deleted = reply[2] if len(reply) > 2 else []  # Redis >= 7 reports entries gone from the stream
        if deleted:  # removed from the stream while pending: nothing left to apply
            client.xack(STREAM, GROUP, *deleted)
        # XAUTOCLAIM also returns our own entries read above; they must not count twice.
        seen = {entry_id for entry_id, _ in taken}
        fresh = [(entry_id, fields) for entry_id, fields in claimed if entry_id not in seen]
        reclaimed = len(fresh)
        taken.extend(fresh)
    if len(taken) < batch_max:
        # Block only when there is nothing to do yet; redis-py treats block=0 as "forever".
        block = block_ms if not taken and block_ms > 0 else None
        reply = client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=batch_max - len(taken), block=block)
        if reply:
            taken.extend(reply[0][1])
    return taken, reclaimed


def ack(client: redis.Redis, entry_ids: Sequence[bytes | str]) -> int:
    """Acknowledge and delete applied entries: the stream only ever holds unapplied work."""
    if not entry_ids:
        return 0
    pipe = client.pipeline(transaction=False)
    pipe.xack(STREAM, GROUP, *entry_ids)
    pipe.xdel(STREAM, *entry_ids)
    acked, _ = pipe.execute()
    return int(acked)


def _bigint(raw: bytes) -> int:
    value = int(raw)
    if not 0 < value < 2**63:
        raise ValueError("out of bigint range")
    return value


def _decode(entry_id: bytes, fields: dict | None) -> _Entry | None:
    """The entry's invalidation, or None if it is malformed.

    Everything the database could refuse is checked here: one bad entry must be dropped on its
    own, never fail its whole batch again and again and stall the stream.
    """
    if not fields:
        return None
    try:
        campaign = fields.get(b"c")
        token_hash = fields[b"h"].decode("ascii")
        provider = fields[b"p"].decode()
        if len(token_hash) != 64 or token_hash.strip("0123456789abcdef"):
            return None
        if not (provider.isascii() and provider.isalnum() and len(provider) <= 16):
            return None
        return _Entry(
            stream_id=entry_id.decode(),
            item=Invalidation(
                device_id=_bigint(fields[b"d"]),
                token_hash=token_hash,
                app_id=_bigint(fields[b"a"]),
                provider=provider,
                reason=fields[b"r"].decode().replace("\x00", "")[:_REASON_MAX],
                provider_ts=_from_us(fields.get(b"t")),
                campaign_id=_bigint(campaign) if campaign else None,
                observed_at=_from_us(fields.get(b"o")),
            ),
        )
    except (KeyError, ValueError, OverflowError, UnicodeDecodeError):
        return None


def _cutoff(item: Invalidation) -> datetime:
    return item.provider_ts or item.observed_at or timezone.now()


def _mark_kept(entries: list[_Entry]) -> None:
    """One entry per (device, token) drives the UPDATE: the latest evidence (largest cutoff)."""
    best: dict[tuple[int, str], _Entry] = {}
    for entry in entries:
        key = (entry.item.device_id, entry.item.token_hash)
        current = best.get(key)
        if current is None or _cutoff(entry.item) > _cutoff(current.item):
            best[key] = entry
    kept = {id(entry) for entry in best.values()}
    for entry in entries:
        entry.keep = id(entry) in kept


# The batch travels as ONE json parameter: psycopg2 would render ten 2,500-element arrays as a
# 400 KB statement of per-element casts (~50 ms to build, more to parse); orjson builds the
# document in about a millisecond and json_to_recordset reads it back as typed columns.
_PG_APPLY = f"""
WITH v AS (
    SELECT * FROM json_to_recordset(%s::json) AS v(
        stream_id text, device_id bigint, token_hash text, app_id bigint, provider text,
        reason text, provider_ts timestamptz, observed_at timestamptz, campaign_id bigint,
        keep boolean)
),
upd AS (
    UPDATE {_TOKENS} AS d
       SET is_active = FALSE, deactivated_at = %s, deactivation_reason = v.reason
      FROM v
     WHERE v.keep
       AND d.id = v.device_id
       AND d.token_hash = v.token_hash
       AND d.is_active
       AND d.updated_at <= COALESCE(v.provider_ts, v.observed_at)
 RETURNING d.id
),
ins AS (
    INSERT INTO {AUDIT_TABLE} (stream_id, device_id, token_hash, app_id, provider, reason,
                               provider_ts, observed_at, campaign_id, applied, recorded_at)
    SELECT v.stream_id, v.device_id, v.token_hash, v.app_id, v.provider, v.reason,
           v.provider_ts, v.observed_at, v.campaign_id, v.keep AND upd.id IS NOT NULL, %s
      FROM v LEFT JOIN upd ON upd.id = v.device_id
        ON CONFLICT (stream_id) DO NOTHING
 RETURNING 1
)
SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM ins)
"""


def _apply_postgresql(entries: list[_Entry], now: datetime) -> tuple[int, int]:
    # Id order: the nested loop then walks the table and its indexes in order (far fewer page
    # reads on a big table), and concurrent consumers lock rows in the same order (no deadlocks).
    rows = [
        {
            "stream_id": entry.stream_id,
            "device_id": entry.item.device_id,
            "token_hash": entry.item.token_hash,
            "app_id": entry.item.app_id,
            "provider": entry.item.provider,
            "reason": entry.item.reason,
            "provider_ts": entry.item.provider_ts,
            "observed_at": entry.item.observed_at or now,
            "campaign_id": entry.item.campaign_id,
            "keep": entry.keep,
        }
        for entry in sorted(entries, key=lambda e: e.item.device_id)
    ]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_PG_APPLY, [orjson.dumps(rows).decode(), now, now])
        deactivated, audited = cursor.fetchone()
    return int(deactivated), int(audited)


def _apply_portable(entries: list[_Entry], now: datetime) -> tuple[int, int]:
    """SQLite (the demo): same rules, a few statements; IMMEDIATE transactions serialize writers."""
    with transaction.atomic():
        rows = {
            pk: (token_hash, is_active, updated_at)
            for pk, token_hash, is_active, updated_at in DeviceToken.objects.filter(
                id__in={e.item.device_id for e in entries}
            ).values_list("id", "token_hash", "is_active", "updated_at")
        }
        applied: set[str] = set()
        by_reason: dict[str, list[int]] = {}
        for entry in entries:
            item = entry.item
            row = rows.get(item.device_id)
            if (
                entry.keep
                and row is not None
                and row[0] == item.token_hash
                and row[1]
                and row[2] <= _cutoff(item)
            ):
                applied.add(entry.stream_id)
                by_reason.setdefault(item.reason, []).append(item.device_id)
        deactivated = 0
        for reason, ids in by_reason.items():
            deactivated += DeviceToken.objects.filter(id__in=ids, is_active=True).update(
                is_active=False, deactivated_at=now, deactivation_reason=reason
            )
        audited = 0
        with connection.cursor() as cursor:
            for entry in entries:
                item = entry.item
                cursor.execute(
                    f"INSERT INTO {AUDIT_TABLE} (stream_id, device_id, token_hash, app_id, provider, reason,"
                    " provider_ts, observed_at, campaign_id, applied, recorded_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (stream_id) DO NOTHING",
                    [
                        entry.stream_id,
                        item.device_id,
                        item.token_hash,
                        item.app_id,
                        item.provider,
                        item.reason,
                        item.provider_ts,
                        item.observed_at or now,
                        item.campaign_id,
                        entry.stream_id in applied,
                        now,
                    ],
                )
                audited += cursor.rowcount
    return deactivated, audited


def apply_invalidations(items: Sequence[Invalidation], *, now: datetime | None = None) -> tuple[int, int]:
    """Apply invalidations now, without the stream: same rules, same single statement and audit.

    For callers that already write in a transaction of their own (e.g. a shard's results) and
    want the tokens deactivated in it; returns (tokens deactivated, audit rows written). Each
    audit row gets a generated id in place of a stream entry id, so a caller that may run twice
    must make the second run a no-op itself.
    """
    now = now or timezone.now()
    entries = [
        _Entry(
            f"sync-{uuid.uuid4().hex[:27]}",
            replace(
                item,
                reason=item.reason.replace("\x00", "")[:_REASON_MAX],  # PostgreSQL text takes no NUL
                observed_at=item.observed_at or now,
            ),
        )
        for item in items
    ]
    return apply_entries(entries, now)


def apply_entries(entries: list[_Entry], now: datetime | None = None) -> tuple[int, int]:
    """Apply decoded entries in one transaction; returns (tokens deactivated, audit rows written)."""
    if not entries:
        return 0, 0
    now = now or timezone.now()
    _mark_kept(entries)
    if connection.vendor == "postgresql":
        return _apply_postgresql(entries, now)
    return _apply_portable(entries, now)


def apply_feedback(
    batch_max: int | None = None,
    block_ms: int = 5000,
    *,
    consumer: str | None = None,
    claim_idle_ms: int | None = None,
    client: redis.Redis | None = None,
) -> FeedbackReport:
    """Read one batch from the stream, apply it in one transaction, then acknowledge it.

    Waits up to block_ms for new entries when none are pending (0: do not wait). An exception
    from the database leaves the batch pending for the next call (or another consumer).
    """
    started = time.monotonic()
    client = client or redis_client()
    batch_max = batch_max or settings.HYGIENE_FEEDBACK_BATCH
    consumer = consumer or default_consumer()
    if claim_idle_ms is None:
        claim_idle_ms = int(settings.HYGIENE_FEEDBACK_CLAIM_IDLE_S * 1000)
    ensure_group(client)
    raw, reclaimed = read_batch(client, consumer, batch_max, block_ms, claim_idle_ms)
    report = FeedbackReport(read=len(raw), reclaimed=reclaimed)
    if raw:
        entries: list[_Entry] = []
        for entry_id, fields in raw:
            entry = _decode(entry_id, fields)
            if entry is None:
                logger.warning("feedback entry %s is malformed; dropping it", entry_id)
                report.dropped += 1
            else:
                entries.append(entry)
        report.deactivated, report.audited = apply_entries(entries)
        report.acked = ack(client, [entry_id for entry_id, _ in raw])
        report.batches = 1
    report.seconds = time.monotonic() - started
    return report


def drain_feedback(
    time_budget_s: float | None = None,
    *,
    batch_max: int | None = None,
    consumers: int | None = None,
    consumer: str | None = None,
    client: redis.Redis | None = None,
) -> FeedbackReport:
    """Apply full batches until the stream is empty or the time budget is spent (never blocks).

    The beat runs this every HYGIENE_FEEDBACK_FLUSH_S; the budget keeps one run from overlapping
    the next, which then continues where this one stopped. When the first batch comes back full
    (a backlog), up to HYGIENE_FEEDBACK_CONSUMERS consumers work it in parallel, each a thread
    with its own connection and consumer name: a batch spends most of its time waiting on
    PostgreSQL's writes, so two roughly halve the time to drain a burst.
    """
    budget = settings.HYGIENE_FEEDBACK_FLUSH_S if time_budget_s is None else time_budget_s
    batch_max = batch_max or settings.HYGIENE_FEEDBACK_BATCH
    consumers = max(1, consumers or settings.HYGIENE_FEEDBACK_CONSUMERS)
    client = client or redis_client()
    deadline = time.monotonic() + budget
    total = FeedbackReport()
    guard = threading.Lock()

    def work(name: str | None) -> None:
        while True:
            report = apply_feedback(batch_max, block_ms=0, consumer=name or default_consumer(), client=client)
            with guard:
                total.add(report)
            if report.read < batch_max or time.monotonic() >= deadline:
                return

    def helper(name: str | None) -> None:
        try:
            work(name)
        except Exception:
            # Its batch stays pending under its name; any consumer reclaims it once idle.
            logger.exception("feedback helper consumer failed")
        finally:
            connection.close()  # this thread's own connection

    first = apply_feedback(batch_max, block_ms=0, consumer=consumer, client=client)
    total.add(first)
    if first.read == batch_max and time.monotonic() < deadline:
        helpers = [
            threading.Thread(target=helper, args=(f"{consumer}:{i}" if consumer else None,), daemon=True)
            for i in range(1, consumers)
        ]
        for thread in helpers:
            thread.start()
        try:
            work(consumer)
        finally:
            for thread in helpers:
                thread.join()
    forget_idle_consumers(client)
    return total


def forget_idle_consumers(client: redis.Redis, idle_ms: int = 24 * 3600 * 1000) -> int:
    """Remove consumers with nothing pending that have been silent for a day (dead worker pids)."""
    removed = 0
    try:
        consumers = client.xinfo_consumers(STREAM, GROUP)
    except redis.ResponseError:
        return 0
    for info in consumers:
        if info["pending"] == 0 and info["idle"] >= idle_ms:
            client.xgroup_delconsumer(STREAM, GROUP, info["name"])
            removed += 1
    return removed


def backlog(client: redis.Redis | None = None) -> dict[str, int]:
    """Entries waiting (not yet read) and read but unacknowledged: for health checks and metrics."""
    client = client or redis_client()
    waiting = int(client.xlen(STREAM))
    try:
        pending = int(client.xpending(STREAM, GROUP)["pending"])
    except redis.ResponseError:
        pending = 0
    return {"stream_length": waiting, "pending": pending}
