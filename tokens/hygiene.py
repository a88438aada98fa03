"""Registry hygiene jobs and signals: nightly prune, stale sweep, campaign guard, health figures.

The jobs walk the table in keyset batches (ids ascending, at most HYGIENE_BATCH_SIZE rows, fewer
when writes run slower than HYGIENE_BATCH_TARGET_S), each batch its own short transaction, so no
statement holds row locks for long and registrations keep flowing.
Candidate ids are read first without locks; the DELETE/UPDATE then repeats the conditions, so a
row re-registered between the read and the write (PostgreSQL re-checks the WHERE clause on the
newest row version) is left alone. Both jobs are idempotent: running them twice changes nothing
the second time.

Two beats firing at once: each job takes a Redis lock (random owner token, TTL
HYGIENE_LOCK_TTL_S, renewed after every batch, released only by its owner through redis-py's
Lua scripts) and a second run that finds it taken returns at once. Redis rather than a
PostgreSQL advisory lock because a session advisory lock does not survive a transaction-pooling
pgbouncer and does not exist on SQLite (the demo); if a stalled run loses its lock, the next
renewal notices and the run stops, and the worst case is two runs doing idempotent work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache

import redis
from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from .invalidation import AUDIT_TABLE
from .models import App, DeviceToken

logger = logging.getLogger(__name__)

LOCK_PREFIX = "pushsvc:lock:hygiene:"
STALE_REASON = "stale"
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL lock_timeout expired
_QUERY_CANCELED = "57014"  # PostgreSQL statement_timeout expired
_SHRINK_LIMIT = 50  # a batch never gets smaller than 1/50 of HYGIENE_BATCH_SIZE (100 of 5,000)


@lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    """The process-wide client (one connection pool) on settings.REDIS_URL, for the job locks
    and the spike counters. Made here rather than taken from delivery.runtime: tokens/ imports
    nothing from delivery/ or campaigns/."""
    return redis.Redis.from_url(settings.REDIS_URL)


@dataclass(slots=True)
class JobReport:
    job: str
    dry_run: bool
    cutoff: datetime
    candidates: int = 0  # dry run: rows that would change
    changed: int = 0  # rows deleted (prune) or deactivated (sweep)
    batches: int = 0
    skipped_batches: int = 0  # gave up (row lock held elsewhere, or too slow even when small)
    timeouts: int = 0  # writes cancelled at the time cap and retried smaller
    longest_batch_s: float = 0.0  # the longest write transaction, i.e. the longest lock hold
    last_batch_s: float = 0.0
    smallest_batch: int = 0  # batches shrink below HYGIENE_BATCH_SIZE when writes are slow
    seconds: float = 0.0
    locked_out: bool = False  # another run held the lock: this one did nothing
    lock_lost: bool = False  # the lock expired mid-run (a stall): stopped after the current batch
    breakdown: dict[str, int] = field(default_factory=dict)  # dry run: "app/platform" -> rows

    def describe(self, verb: str) -> list[str]:
        """Human-readable lines for the management commands."""
        cutoff = self.cutoff.isoformat(timespec="seconds")
        if self.dry_run:
            lines = [f"dry run: would {verb} {self.candidates} token(s) (cutoff {cutoff})"]
            lines += [f"  {key}: {count}" for key, count in self.breakdown.items()]
            return lines
        if self.locked_out:
            return [f"{self.job} is already running elsewhere; nothing done"]
        summary = (
            f"{verb}d {self.changed} token(s) (cutoff {cutoff}) in {self.batches} batch(es), "
            f"{self.seconds:.2f} s; longest batch {self.longest_batch_s * 1000:.0f} ms"
        )
        if self.timeouts:
            summary += f"; {self.timeouts} write(s) over the time cap retried smaller"
        if self.skipped_batches:
            summary += (
                f"; {self.skipped_batches} batch(es) skipped (row locks or too slow), left for the next run"
            )
        lost = ["lost the lock to another run and stopped early"] if self.lock_lost else []
        return [*lost, summary]


@contextmanager
def job_lock(
    name: str, *, client: redis.Redis | None = None, ttl_s: int | None = None
) -> Iterator[Lock | None]:
    """Yield a redis-py Lock held by this run, or None when another run holds it."""
    client = client or redis_client()
    lock = client.lock(LOCK_PREFIX + name, timeout=ttl_s or settings.HYGIENE_LOCK_TTL_S, blocking=False)
    if not lock.acquire():
        yield None
        return
    try:
        yield lock
    finally:
        try:
            lock.release()
        except LockError:
            logger.warning("hygiene lock %s expired before the run ended", name)


def _keyset(queryset: QuerySet, after: int, size: int) -> list[int]:
    return list(queryset.filter(id__gt=after).order_by("id").values_list("id", flat=True)[:size])


def _pgcode(exc: OperationalError) -> str | None:
    return getattr(exc.__cause__, "pgcode", None)


def _floor(largest: int) -> int:
    return max(1, largest // _SHRINK_LIMIT)


def _next_size(size: int, elapsed: float, largest: int) -> int:
    """Adapt the batch to the time a write actually takes (a non-HOT UPDATE costs several times a
    DELETE, and a busy server more): aim at HYGIENE_BATCH_TARGET_S per transaction."""
    target = settings.HYGIENE_BATCH_TARGET_S
    if elapsed > target:
        return max(_floor(largest), int(size * target / elapsed))
    if elapsed < target / 2:
        return min(largest, size * 2)
    return size


def _run_batches(
    report: JobReport,
    candidates: QuerySet,
    write: Callable[[list[int]], int],
    largest: int,
    lock: Lock,
    on_batch: Callable[[JobReport], None] | None,
) -> None:
    after = 0
    size = largest
    # Hard cap on one write statement (3 x target: 750 ms by default, leaving room for the commit
    # under 1 s), so its row locks never last long even when the server stalls (a checkpoint, a
    # saturated disk) after the batch was sized.
    timeout_ms = int(settings.HYGIENE_BATCH_TARGET_S * 3 * 1000)
    while True:
        ids = _keyset(candidates, after, size)
        if not ids:
            return
        started = time.monotonic()
        try:
            with transaction.atomic():
                if connection.vendor == "postgresql":
                    with connection.cursor() as cursor:
                        # Waiting on a row a registration is updating would stretch our own locks.
                        cursor.execute(
                            f"SET LOCAL lock_timeout = '{timeout_ms // 2}ms';"
                            f" SET LOCAL statement_timeout = '{timeout_ms}ms'"
                        )
                report.changed += write(ids)
            after = ids[-1]
        except OperationalError as exc:
            code = _pgcode(exc)
            if code == _QUERY_CANCELED and size > _floor(largest):
                # Too slow right now: retry the same range at a quarter of the size.
                report.timeouts += 1
                size = max(_floor(largest), size // 4)
                continue
            if code not in (_QUERY_CANCELED, _LOCK_NOT_AVAILABLE):
                raise
            after = ids[-1]
            report.skipped_batches += 1
            logger.info("%s: batch after id %s skipped (%s); the next run takes it", report.job, ids[0], code)
        report.last_batch_s = time.monotonic() - started
        report.longest_batch_s = max(report.longest_batch_s, report.last_batch_s)
        report.smallest_batch = min(report.smallest_batch or size, size)
        report.batches += 1
        if on_batch is not None:
            on_batch(report)
        # Renew for one more batch; LockNotOwnedError if another run took over: stop here.
        lock.extend(settings.HYGIENE_LOCK_TTL_S, replace_ttl=True)
        if len(ids) < size:
            return
        size = _next_size(size, report.last_batch_s, largest)


def _breakdown(queryset: QuerySet) -> dict[str, int]:
    rows = queryset.values("app__slug", "platform").annotate(n=Count("id")).order_by("app__slug", "platform")
    return {f"{row['app__slug']}/{row['platform']}": row["n"] for row in rows}


def _run_job(
    job: str,
    candidates: QuerySet,
    write: Callable[[list[int]], int],
    *,
    cutoff: datetime,
    dry_run: bool,
    batch_size: int | None,
    on_batch: Callable[[JobReport], None] | None,
) -> JobReport:
    started = time.monotonic()
    report = JobReport(job=job, dry_run=dry_run, cutoff=cutoff)
    if dry_run:
        report.breakdown = _breakdown(candidates)
        report.candidates = sum(report.breakdown.values())
    else:
        with job_lock(job) as lock:
            if lock is None:
                report.locked_out = True
                logger.info("%s: another run holds the lock; nothing to do", job)
            else:
                try:
                    _run_batches(
                        report, candidates, write, batch_size or settings.HYGIENE_BATCH_SIZE, lock, on_batch
                    )
                except LockNotOwnedError:
                    report.lock_lost = True
                    logger.warning("%s: lost its lock after %d batch(es); stopping", job, report.batches)
    report.seconds = time.monotonic() - started
    return report


def prune_inactive(
    *,
    now: datetime | None = None,
    older_than_days: int | None = None,
    batch_size: int | None = None,
    dry_run: bool = False,
    on_batch: Callable[[JobReport], None] | None = None,
) -> JobReport:
    """Hard-delete tokens deactivated more than HYGIENE_PRUNE_AFTER_DAYS ago.

    A row inactive without a deactivated_at is never pruned: its age is unknown.
    """
    days = settings.HYGIENE_PRUNE_AFTER_DAYS if older_than_days is None else older_than_days
    cutoff = (now or timezone.now()) - timedelta(days=days)
    condition = Q(is_active=False, deactivated_at__lt=cutoff)
    candidates = DeviceToken.objects.filter(condition)

    def write(ids: list[int]) -> int:
        # Nothing references DeviceToken through a foreign key (tokens/registry.py), so Django's
        # fast path runs one DELETE ... WHERE id IN (...) AND <condition again>.
        return DeviceToken.objects.filter(condition, id__in=ids).delete()[0]

    return _run_job(
        "prune_inactive",
        candidates,
        write,
        cutoff=cutoff,
        dry_run=dry_run,
        batch_size=batch_size,
        on_batch=on_batch,
    )


def sweep_stale(
    *,
    now: datetime | None = None,
    older_than_days: int | None = None,
    batch_size: int | None = None,
    dry_run: bool = False,
    on_batch: Callable[[JobReport], None] | None = None,
) -> JobReport:
    """Deactivate (reason "stale") active tokens whose last_seen is older than HYGIENE_STALE_AFTER_DAYS."""
    now = now or timezone.now()
    days = settings.HYGIENE_STALE_AFTER_DAYS if older_than_days is None else older_than_days
    cutoff = now - timedelta(days=days)
    condition = Q(is_active=True, last_seen__lt=cutoff)
    candidates = DeviceToken.objects.filter(condition)

    def write(ids: list[int]) -> int:
        return DeviceToken.objects.filter(condition, id__in=ids).update(
            is_active=False, deactivated_at=now, deactivation_reason=STALE_REASON
        )

    return _run_job(
        "sweep_stale",
        candidates,
        write,
        cutoff=cutoff,
        dry_run=dry_run,
        batch_size=batch_size,
        on_batch=on_batch,
    )


def prune_audit(*, now: datetime | None = None, older_than_days: int | None = None) -> int:
    """Delete audit rows older than HYGIENE_AUDIT_RETENTION_DAYS, oldest first, in short batches.

    Audit ids grow with recorded_at, so the walk starts at the lowest id and stops at the first
    row young enough to keep: one short index range per night, whatever the table's size.
    """
    days = settings.HYGIENE_AUDIT_RETENTION_DAYS if older_than_days is None else older_than_days
    cutoff = (now or timezone.now()) - timedelta(days=days)
    size = settings.HYGIENE_BATCH_SIZE
    deleted = 0
    after = 0
    with job_lock("prune_audit") as lock:
        if lock is None:
            return 0
        while True:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT id, recorded_at < %s FROM {AUDIT_TABLE} WHERE id > %s ORDER BY id LIMIT %s",
                    [cutoff, after, size],
                )
                rows = cursor.fetchall()
            old = [pk for pk, is_old in rows if is_old]
            if old:
                with transaction.atomic(), connection.cursor() as cursor:
                    placeholders = ", ".join(["%s"] * len(old))
                    cursor.execute(f"DELETE FROM {AUDIT_TABLE} WHERE id IN ({placeholders})", old)
                    deleted += cursor.rowcount
            if len(old) < len(rows) or len(rows) < size:
                return deleted
            after = rows[-1][0]
            lock.extend(settings.HYGIENE_LOCK_TTL_S, replace_ttl=True)


# --- Campaign guard ----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class StaleShare:
    target: int  # active tokens in the target
    unseen: int  # of which not seen for `days` days
    days: int

    @property
    def share(self) -> float:
        return self.unseen / self.target if self.target else 0.0


def stale_share_of(target: QuerySet, *, days: int | None = None, now: datetime | None = None) -> StaleShare:
    """The share of a campaign's target queryset (DeviceToken) not seen for `days` days. One query."""
    days = settings.HYGIENE_GUARD_UNSEEN_DAYS if days is None else days
    cutoff = (now or timezone.now()) - timedelta(days=days)
    counts = target.filter(is_active=True).aggregate(
        target=Count("id"), unseen=Count("id", filter=Q(last_seen__lt=cutoff))
    )
    return StaleShare(target=counts["target"], unseen=counts["unseen"], days=days)


def exclude_stale(target: QuerySet, *, now: datetime | None = None) -> QuerySet:
    """A campaign target without the tokens the next stale sweep will deactivate (not seen for
    HYGIENE_STALE_AFTER_DAYS), so a send between two daily sweeps skips them too."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.HYGIENE_STALE_AFTER_DAYS)
    return target.filter(is_active=True, last_seen__gte=cutoff)


def stale_share(
    app: App | int,
    platforms: Iterable[str] | None = None,
    *,
    days: int | None = None,
    now: datetime | None = None,
) -> StaleShare:
    """Share of an app's active tokens (on `platforms`, default all) not seen for 30+ days."""
    target = DeviceToken.objects.filter(app=app)
    if platforms is not None:
        target = target.filter(platform__in=list(platforms))
    return stale_share_of(target, days=days, now=now)


# --- Health signals ----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Churn:
    invalidations: int  # tokens deactivated by provider invalid-token answers in the window
    active: int  # active tokens now
    days: float

    @property
    def per_day(self) -> float:
        """Invalidations per day as a share of the active tokens."""
        if not self.active or not self.days:
            return 0.0
        return self.invalidations / self.days / self.active


def token_churn(app: App | int, *, days: float = 1.0, now: datetime | None = None) -> Churn:
    """Provider invalidations per day over the last `days`, relative to the active tokens (audit data)."""
    app_id = app if isinstance(app, int) else app.pk
    since = (now or timezone.now()) - timedelta(days=days)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM {AUDIT_TABLE} WHERE app_id = %s AND recorded_at >= %s AND applied",
            [app_id, since],
        )
        (invalidations,) = cursor.fetchone()
    active = DeviceToken.objects.filter(app_id=app_id, is_active=True).count()
    return Churn(invalidations=int(invalidations), active=active, days=days)


@dataclass(slots=True, frozen=True)
class InvalidRate:
    provider: str
    invalid: int  # invalid-token answers recorded for the campaign (applied or not)
    sent: int  # sends with an answer, as counted by the campaign

    @property
    def rate(self) -> float:
        return self.invalid / self.sent if self.sent else 0.0


def invalid_counts(campaign_id: int) -> dict[str, dict[str, int]]:
    """Per provider, per reason: invalid-token answers the audit holds for a campaign."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT provider, reason, count(*) FROM {AUDIT_TABLE} WHERE campaign_id = %s"
            " GROUP BY provider, reason",
            [campaign_id],
        )
        result: dict[str, dict[str, int]] = {}
        for provider, reason, count in cursor.fetchall():
            result.setdefault(provider, {})[reason] = int(count)
    return result


def invalid_rates(campaign_id: int, sent_by_provider: Mapping[str, int]) -> dict[str, InvalidRate]:
    """Invalid-token rate per provider of a campaign: audit rows over the campaign's sends."""
    counts = invalid_counts(campaign_id)
    providers = sorted(set(counts) | set(sent_by_provider))
    return {
        p: InvalidRate(p, sum(counts.get(p, {}).values()), int(sent_by_provider.get(p, 0))) for p in providers
    }


# Per (campaign, provider) counters of the first HYGIENE_SPIKE_WINDOW sends, updated atomically so
# concurrent shards never count the window twice. Returns {window_sent, window_invalid, flagged}.
_SPIKE_SCRIPT = """
local window = tonumber(ARGV[3])
local sent = tonumber(ARGV[1])
local invalid = tonumber(ARGV[2])
local before = tonumber(redis.call('HGET', KEYS[1], 'sent') or '0')
redis.call('HINCRBY', KEYS[1], 'sent', sent)
redis.call('HINCRBY', KEYS[1], 'invalid', invalid)
if before < window then
  redis.call('HINCRBY', KEYS[1], 'window_sent', sent)
  redis.call('HINCRBY', KEYS[1], 'window_invalid', invalid)
end
local wsent = tonumber(redis.call('HGET', KEYS[1], 'window_sent') or '0')
local winvalid = tonumber(redis.call('HGET', KEYS[1], 'window_invalid') or '0')
local flagged = tonumber(redis.call('HGET', KEYS[1], 'flagged') or '0')
if flagged == 0 and wsent > 0 then
  local share = tonumber(ARGV[4])
  -- over the share once the window is full, or already past it in absolute terms
  if (wsent >= window and winvalid > share * wsent) or winvalid > share * window then
    flagged = 1
    redis.call('HSET', KEYS[1], 'flagged', 1)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {wsent, winvalid, flagged}
"""


@dataclass(slots=True, frozen=True)
class Spike:
    provider: str
    window_sent: int
    window_invalid: int
    flagged: bool


def _spike_key(campaign_id: int, provider: str) -> str:
    return f"pushsvc:hygiene:spike:{campaign_id}:{provider}"


def record_sends(
    campaign_id: int,
    provider: str,
    sent: int,
    invalid: int,
    *,
    client: redis.Redis | None = None,
) -> Spike:
    """Count a shard's answered sends and invalid-token answers; say whether the campaign is flagged.

    Flagged (sticky) when invalid answers exceed HYGIENE_SPIKE_SHARE of the first
    HYGIENE_SPIKE_WINDOW sends for one provider: more likely a bad import or a credential for the
    wrong environment than real uninstalls. One round trip; call once per shard.
    """
    client = client or redis_client()
    wsent, winvalid, flagged = client.eval(
        _SPIKE_SCRIPT,
        1,
        _spike_key(campaign_id, provider),
        sent,
        invalid,
        settings.HYGIENE_SPIKE_WINDOW,
        settings.HYGIENE_SPIKE_SHARE,
        30 * 24 * 3600,
    )
    return Spike(provider, int(wsent), int(winvalid), bool(flagged))


def spike_status(
    campaign_id: int, providers: Iterable[str] = ("apns", "fcm", "hms", "webpush"), *, client=None
) -> dict[str, Spike]:
    """The spike state per provider for a campaign (providers with no sends are left out)."""
    client = client or redis_client()
    pipe = client.pipeline(transaction=False)
    providers = list(providers)
    for provider in providers:
        pipe.hmget(_spike_key(campaign_id, provider), "window_sent", "window_invalid", "flagged")
    result = {}
    for provider, (wsent, winvalid, flagged) in zip(providers, pipe.execute(), strict=True):
        if wsent is not None:
            result[provider] = Spike(provider, int(wsent), int(winvalid or 0), flagged == b"1")
    return result
