"""The campaign ledger: a shard run's per-device results, applied in bulk (one statement per kind,
never per token), and the campaign's counters, completion and halts decided on them.

`ShardResults` sorts a run's results as they come in (chunk by chunk); `apply_shard_run` records
them in one transaction:

1. invalid tokens deactivated with an audit row each (one statement: tokens.invalidation
   `apply_invalidations`), matched on id AND the hash of the token this shard sent, so a device
   that rotated its token since the shard loaded it keeps the new one; an APNs 410 only if the
   token was not registered again after Apple's timestamp (`updated_at <= invalid_since`),
2. nothing for delivered tokens: a healthy delivery writes no row of the device table (an UPDATE
   per delivered device rewrote the whole registry and its indexes on every broadcast),
3. dead letters, with the provider's message id (one INSERT), and for a direct send each
   device's final answer (one INSERT: campaigns.models.DirectResult),
4. per-reason tallies (one upsert),
5. the follow-up shards: retries (one per Retry-After floor, with their backoff and the
   message's deadline) and held devices (one INSERT),
6. the shard itself, 7. the campaign's counters and outstanding shards (one UPDATE, RETURNING the row),
8. completion or an error-rate halt, decided on the row this transaction just updated.

A second run of an already recorded shard (the broker redelivered it) finds it no longer pending
and records nothing; the idempotency bitmap made it send nothing either.

Invalidations are applied in this transaction, so a deactivation commits atomically with the
shard's counters and follow-up shards (a retry shard created here can never resend to a token this
run found dead) and needs nothing from Redis. A second run of a recorded shard records nothing
(see above), so no audit row is written twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson
import redis
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from campaigns import canary, series
from campaigns.counts import add_counts
from campaigns.models import Campaign, DirectResult, OutcomeTally, Shard
from campaigns.sending.policy import before_deadline, min_retry_delay, retry_delay
from campaigns.webhook_events import campaign_changed
from delivery.models import DeadLetter
from delivery.providers.base import Outcome, Result
from delivery.providers.specs import provider_name
from pushsvc import metrics
from tokens.invalidation import Invalidation, apply_invalidations

logger = logging.getLogger(__name__)

DEAD_LETTER = "dead_letter"
EXPIRED = "expired"  # the message's TTL ran out before the device's retry could go
TTL_EXPIRED = "ttl_expired"
_DELIVERED = Outcome.DELIVERED
_DELIVERED_ANSWER = str(Outcome.DELIVERED)


@dataclass(slots=True)
class Device:
    """A loaded DeviceToken row, as much as sending and recording need."""

    pk: int
    token: str
    p256dh: str
    auth: str
    device_id: object  # UUID, or its text (campaigns/sending/run.py _load reads it as text)
    app_version: str = ""  # per-version figures (pushsvc/metrics.py, campaigns/series.py)
    locale: str = ""  # picks the message's localization (delivery/payload.py localized)


@dataclass
class ShardResults:
    attempt: int
    max_attempts: int
    # The devices' deadline (UNIX seconds: first send + TTL), or None without TTL. Retries that
    # cannot go before it expire instead (a TTL is absolute, not restarted per attempt).
    deadline: int | None = None
    sent: int = 0
    delivered: list[int] = field(default_factory=list)
    # (device pk, hash of the token sent to, reason, APNs 410 timestamp, when the answer came,
    # the device's device_id: its partition key)
    invalid: list[tuple[int, str, str, datetime | None, datetime, object]] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    dead: list[tuple[Device, str, int | None, str]] = field(default_factory=list)  # + provider message id
    retry: list[int] = field(default_factory=list)
    # Each retried device's own floor (its Retry-After): one device's 429 (a minute) must not hold
    # back the 5xx retries of the same shard (seconds).
    retry_floor: dict[int, float] = field(default_factory=dict)
    # RETRY answers of a chunk the provider failed as a whole (delivery/breaker.py: an outage):
    # retried without spending an attempt, since the failure says nothing about these devices.
    retry_outage: list[int] = field(default_factory=list)
    retry_after: float = 0.0  # the outage retries' largest Retry-After
    held: list[int] = field(default_factory=list)  # auth failure or mass-prune guard: send again on resume
    held_invalid: int = 0  # invalid answers held by the mass-prune guard (in `held`, not `invalid`)
    expired: list[int] = field(default_factory=list)
    recovered: int = 0  # of `delivered`: delivered by an earlier run that died before recording them
    tallies: Counter = field(default_factory=Counter)  # (outcome, reason) -> devices
    versions: Counter = field(default_factory=Counter)  # (app version, provider's answer) -> devices
    auth_reason: str = ""
    # Final answers per device, kept only for a direct send (campaigns.models.DirectResult):
    # (device, outcome, reason, status, provider message id)
    answers: list[tuple[Device, str, str, int | None, str]] | None = None

    def add(
        self, devices: list[Device], results: list[Result], *, hold_invalid: bool, outage: bool = False
    ) -> list[int]:
        """Sort one chunk's results; returns the device pks it delivered (never to be sent again:
        delivery/idempotency.py). `outage`: the chunk was failed by a provider outage, so its
        retries spend no attempt."""
        delivered: list[int] = []
        last_attempt = self.attempt + 1 >= self.max_attempts and not outage
        self.sent += len(results)
        observed_at = timezone.now()
        # Deliveries, nearly every answer, take the short path: no reason text, no enum lookups
        # (an enum member's attribute costs a descriptor call), versions counted by Counter in C
        # and named once per chunk.
        versions = Counter(zip((d.app_version for d in devices), (r.outcome for r in results), strict=True))
        for device, result in zip(devices, results, strict=True):
            outcome = result.outcome
            if outcome == _DELIVERED:
                delivered.append(device.pk)
                self._answer(device, _DELIVERED_ANSWER, "", result)
                continue
            detail = (result.reason or str(result.status or ""))[:128]
            # Tallies and deactivations group by the provider's code ("UNREGISTERED: Requested
            # entity was not found." -> "UNREGISTERED"); dead letters keep the full text.
            reason = detail.split(": ", 1)[0]
            final = str(outcome)
            if outcome == Outcome.INVALID_TOKEN:
                if hold_invalid:
                    self.held.append(device.pk)
                    self.held_invalid += 1
                    continue
                token_hash = hashlib.sha256(device.token.encode()).hexdigest()
                self.invalid.append(
                    (device.pk, token_hash, reason, result.invalid_since, observed_at, device.device_id)
                )
            elif outcome == Outcome.REJECTED:
                self.rejected.append((device.pk, detail))
            elif outcome == Outcome.RETRY:
                if last_attempt:
                    self.dead.append((device, detail, result.status, result.provider_message_id))
                    self.tallies[(DEAD_LETTER, reason)] += 1
                    self._answer(device, DEAD_LETTER, detail, result)
                    continue
                floor = result.retry_after or 0.0
                if self._past_deadline(min_retry_delay(1 if outage else self.attempt + 1, floor)):
                    self.tallies[(str(outcome), reason)] += 1
                    self.expire([device])
                    continue
                if outage:
                    self.retry_outage.append(device.pk)
                    self.retry_after = max(self.retry_after, floor)
                else:
                    self.retry.append(device.pk)
                    self.retry_floor[device.pk] = floor
                final = ""
            elif outcome == Outcome.AUTH_FAILURE:
                self.held.append(device.pk)
                self.auth_reason = self.auth_reason or reason
                final = ""
            self.tallies[(str(outcome), reason)] += 1
            if final:
                self._answer(device, final, detail, result)
        self.delivered += delivered
        for (version, outcome), n in versions.items():
            self.versions[(version, str(outcome))] += n
        return delivered

    def _past_deadline(self, delay: float) -> bool:
        return self.deadline is not None and time.time() + delay >= self.deadline

    def _answer(self, device: Device, outcome: str, reason: str, result: Result) -> None:
        if self.answers is not None:
            self.answers.append((device, outcome, reason, result.status, result.provider_message_id))

    def recover(self, device_pks: Iterable[int]) -> None:
        """Devices the idempotency bitmap says were delivered by an earlier run of this shard that
        died before recording them: not sent again, counted delivered now."""
        pks = list(device_pks)
        self.delivered.extend(pks)
        self.recovered += len(pks)
        self.sent += len(pks)

    def expire(self, devices: Iterable[Device]) -> None:
        """Devices not sent (again) because the message's TTL ran out."""
        for device in devices:
            self.expired.append(device.pk)
            self.tallies[(EXPIRED, TTL_EXPIRED)] += 1
            if self.answers is not None:
                self.answers.append((device, EXPIRED, TTL_EXPIRED, None, ""))

    @property
    def failed(self) -> int:
        return len(self.rejected) + len(self.dead)

    @property
    def retried(self) -> int:
        return len(self.retry) + len(self.retry_outage)

    def retry_groups(self) -> dict[float, list[int]]:
        """The retried devices by their own floor (whole seconds): one follow-up shard each."""
        groups: dict[float, list[int]] = {}
        for pk in self.retry:
            groups.setdefault(float(math.ceil(self.retry_floor.get(pk, 0.0))), []).append(pk)
        return groups


@dataclass(slots=True)
class Applied:
    """What the transaction decided, for the caller to act on after commit."""

    recorded: bool
    # (shard, queue, lane, delay)
    follow_ups: list[tuple[int, str, int, float | None]] = field(default_factory=list)
    completed: bool = False
    halted_reason: str = ""
    # This run recorded the canary sample's last shard: when the canary is decided (campaigns/canary.py).
    canary_decide_at: datetime | None = None


def apply_shard_run(
    shard: Shard,
    results: ShardResults,
    *,
    loaded: int | None,
    park: str | None,
    rest_lo: int | None,
    rest_ids: list[int] | None,
    defer_s: float | None = None,
) -> Applied:
    """Record one run of `shard`. `park` is None (shard done), "paused", "cancelled" or
    "pending" (Redis failed mid-run, or the provider's breaker is open: the shard stays pending
    after what it sent, not due before `defer_s` from now); a parked range shard continues after
    `rest_lo`, a parked list shard with `rest_ids`."""
    now = timezone.now()
    campaign_id = shard.campaign_id
    applied = Applied(recorded=True)
    with transaction.atomic():
        locked = _lock_shard(shard.pk)
        if locked is None or (locked.lo, locked.device_ids) != (shard.lo, shard.device_ids):
            # Done, or another run recorded part of it since this one loaded it (this run's lease ran
            # out while it was alive): what this run delivered is in the bitmap for the next run.
            return Applied(recorded=False)
        app_id = locked.app_id
        if locked.status == Shard.Status.CANCELLED:
            # The campaign was cancelled while this run was sending: record what it sent, start nothing.
            park = Shard.Status.CANCELLED
            results.retry.clear()
            results.retry_outage.clear()
            results.held.clear()

        deactivated = _deactivate(app_id, shard.platform, campaign_id, results.invalid, now)
        if results.dead:
            DeadLetter.objects.bulk_create(
                DeadLetter(
                    campaign_id=campaign_id,
                    device_pk=device.pk,
                    device_id=device.device_id,
                    platform=shard.platform,
                    reason=reason,
                    status=status,
                    attempts=shard.attempt + 1,
                    provider_message_id=message_id[:200],
                    created_at=now,
                )
                for device, reason, status, message_id in results.dead
            )
        if results.answers:
            DirectResult.objects.bulk_create(
                DirectResult(
                    campaign_id=campaign_id,
                    device_pk=device.pk,
                    device_id=device.device_id,
                    platform=shard.platform,
                    outcome=outcome,
                    reason=reason,
                    status=status,
                    provider_message_id=message_id[:200],
                    attempt=shard.attempt,
                    created_at=now,
                )
                for device, outcome, reason, status, message_id in results.answers
            )
        _add_tallies(campaign_id, shard.platform, results.tallies)

        expires_at = datetime.fromtimestamp(results.deadline, tz=UTC) if results.deadline else None
        follow_ups: list[tuple[Shard, float | None]] = []
        for floor, ids in results.retry_groups().items():
            delay = before_deadline(retry_delay(shard.attempt + 1, floor), floor, results.deadline)
            follow_ups.append((_child(shard, ids, shard.attempt + 1, now, delay, expires_at), delay))
        if results.retry_outage:
            # The breaker paces these; no growing backoff.
            floor = results.retry_after
            delay = before_deadline(retry_delay(1, floor), floor, results.deadline)
            follow_ups.append(
                (_child(shard, results.retry_outage, shard.attempt, now, delay, expires_at), delay)
            )
        if results.held:
            follow_ups.append((_child(shard, results.held, shard.attempt, now, None, expires_at), None))
        if follow_ups:
            Shard.objects.bulk_create([s for s, _ in follow_ups])

        shard_update: dict[str, object] = {}
        if loaded is not None:
            shard_update["loaded"] = loaded
        if park is None:
            shard_update["status"] = Shard.Status.DONE
        else:
            shard_update["status"] = park
            if shard.is_range and rest_lo is not None:
                shard_update["lo"] = rest_lo
            elif not shard.is_range:
                shard_update["device_ids"] = rest_ids or []
            if defer_s:
                shard_update["not_before"] = now + timedelta(seconds=defer_s)
        _update_shard(shard.pk, shard_update)

        outstanding_delta = len(follow_ups) - (1 if park is None else 0)
        state = _add_counters(
            campaign_id,
            sent=results.sent,
            delivered=len(results.delivered),
            failed=results.failed,
            invalidated=deactivated,
            invalid_kept=len(results.invalid) - deactivated,
            expired=len(results.expired),
            retried=results.retried,
            skipped_duplicate=results.recovered,
            outstanding=outstanding_delta,
            delivered_after_retry=len(results.delivered) if results.attempt > 0 else 0,
            # First run of a planned shard: devices deactivated or registered since planning.
            targeted=loaded - shard.planned if loaded is not None else 0,
        )
        # The campaign page's chart and per-version answers, in this transaction: a page that
        # reads "completed" must also read every run's figures (it stops polling then).
        series.record_run(campaign_id, shard.platform, results)
        if state["status"] == Campaign.Status.RUNNING:
            if state["outstanding"] == 0:
                applied.completed = bool(
                    Campaign.objects.filter(pk=campaign_id, status=Campaign.Status.RUNNING).update(
                        status=Campaign.Status.COMPLETED, finished_at=now
                    )
                )
                if applied.completed:
                    campaign_changed(campaign_id, Campaign.Status.COMPLETED)  # webhook outbox
            elif not canary.in_trial(state["canary_phase"]):
                # While the canary sample is out, its own limit decides (campaigns/canary.py).
                applied.halted_reason = _error_rate_breach(state, results)
                if applied.halted_reason and Campaign.objects.filter(
                    pk=campaign_id, status=Campaign.Status.RUNNING
                ).update(status=Campaign.Status.HALTED, status_reason=applied.halted_reason):
                    campaign_changed(campaign_id, Campaign.Status.HALTED)  # webhook outbox
        if state["canary_phase"] == Campaign.CanaryPhase.SENDING and state["outstanding"] == 1:
            # Only the planner's hold is left: every shard of the sample, retries included, is done.
            applied.canary_decide_at = canary.sample_finished(campaign_id, state["canary"], now)
        applied.follow_ups = [
            (s.pk, s.queue, s.lane, delay) for s, delay in follow_ups if s.status == Shard.Status.PENDING
        ]
    try:
        metrics.record_shard(app_id, shard.platform, results)
    except redis.RedisError:
        logger.warning("shard %s: metrics not recorded (Redis unreachable)", shard.pk)
    return applied


# Statements of every run in raw SQL: compiling their ORM querysets (and building a Shard model for
# the lock) cost more CPU than the statements themselves. Same rows, same locks, same order: the
# shard row first (FOR UPDATE OF s: the campaign row is locked only by the counters' UPDATE, after).
_SHARDS = Shard._meta.db_table
_CAMPAIGNS = Campaign._meta.db_table
_LOCK_SHARD = f"""
SELECT s.status, s.lo, s.device_ids, c.app_id
  FROM {_SHARDS} s JOIN {_CAMPAIGNS} c ON c.id = s.campaign_id
 WHERE s.id = %s AND s.status IN (%s, %s)
"""
# The campaign row as the counters left it, which completion and halts are decided on.
_STATE = (
    "status",
    "outstanding",
    "sent",
    "delivered",
    "failed",
    "invalidated",
    "invalid_kept",
    "halt_error_rate",
    "canary",
    "canary_phase",
)


class _Locked(NamedTuple):
    status: str
    lo: int | None
    device_ids: list[int] | None
    app_id: int  # the campaign's


def _lock_shard(shard_id: int) -> _Locked | None:
    """The shard's row if pending or cancelled, locked until the transaction ends."""
    # SQLite (the demo's database) has no row locks: its write transaction is the whole file's.
    lock = " FOR UPDATE OF s" if connection.features.has_select_for_update_of else ""
    with connection.cursor() as cursor:
        cursor.execute(_LOCK_SHARD + lock, [shard_id, Shard.Status.PENDING, Shard.Status.CANCELLED])
        row = cursor.fetchone()
    if row is None:
        return None
    status, lo, device_ids, app_id = row
    # The backend hands jsonb over as text (JSONField decodes it); NULL marks a range shard.
    return _Locked(status, lo, device_ids if device_ids is None else orjson.loads(device_ids), app_id)


def _update_shard(shard_id: int, values: dict[str, object]) -> None:
    # Each value as its field saves it on this backend (device_ids as JSON, not an array; datetimes
    # as SQLite stores them): a handful of fields once per run, not a compiled queryset.
    field = Shard._meta.get_field
    params = [field(name).get_db_prep_save(value, connection) for name, value in values.items()]
    sets = ", ".join(f"{name} = %s" for name in values)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {_SHARDS} SET {sets} WHERE id = %s", [*params, shard_id])


def _add_counters(campaign_id: int, **deltas: int) -> dict[str, Any]:
    """Add `deltas` to the campaign's counters; the row as updated (one statement, not an UPDATE
    then a SELECT)."""
    sets = ", ".join(f"{name} = {name} + %s" for name in deltas)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_CAMPAIGNS} SET {sets} WHERE id = %s RETURNING {', '.join(_STATE)}",
            [*deltas.values(), campaign_id],
        )
        state = dict(zip(_STATE, cursor.fetchone(), strict=True))
    if isinstance(state["canary"], str):
        state["canary"] = orjson.loads(state["canary"])
    return state


def _child(
    parent: Shard,
    device_ids: list[int],
    attempt: int,
    now: datetime,
    delay: float | None,
    expires_at: datetime | None,
) -> Shard:
    return Shard(
        expires_at=expires_at,
        campaign_id=parent.campaign_id,
        platform=parent.platform,
        queue=parent.queue,
        lane=parent.lane,
        device_ids=sorted(device_ids),
        attempt=attempt,
        planned=len(device_ids),
        status=Shard.Status.PENDING if delay is not None else Shard.Status.PAUSED,
        created_at=now,
        not_before=now + timedelta(seconds=delay) if delay else None,
        is_child=True,
    )


def _deactivate(
    app_id: int,
    platform: str,
    campaign_id: int,
    invalid: list[tuple[int, str, str, datetime | None, datetime, object]],
    now: datetime,
) -> int:
    """The shard's invalid tokens, deactivated and audited in one statement (tokens/invalidation.py)."""
    if not invalid:
        return 0
    provider = provider_name(platform)
    items = [
        Invalidation(
            device_id=pk,
            token_hash=token_hash,
            app_id=app_id,
            provider=provider,
            reason=reason or "invalid",
            provider_ts=since,
            campaign_id=campaign_id,
            observed_at=observed_at,
            device_key=device_key,
        )
        for pk, token_hash, reason, since, observed_at, device_key in invalid
    ]
    deactivated, _audited = apply_invalidations(items, now=now)
    return deactivated


def _add_tallies(campaign_id: int, platform: str, tallies: Counter) -> None:
    add_counts(
        OutcomeTally._meta.db_table,
        ("campaign_id", "platform", "outcome", "reason"),
        ((campaign_id, platform, outcome, reason, n) for (outcome, reason), n in tallies.items()),
    )


def _error_rate_breach(state: dict, results: ShardResults) -> str:
    """Failed (rejected or dead-lettered) share of final results, once enough were sent.

    Invalid tokens and throttling are the normal weather of a broadcast, not errors.
    """
    if state["sent"] < settings.CAMPAIGN_HALT_MIN_SENDS:
        return ""
    final = state["delivered"] + state["failed"] + state["invalidated"] + state["invalid_kept"]
    if final == 0 or state["failed"] <= state["halt_error_rate"] * final:
        return ""
    reasons = Counter(reason for reason, _ in ((r, 0) for _, r in results.rejected))
    reasons.update(reason for _, reason, _, _ in results.dead)
    top = ", ".join(f"{r} x{n}" for r, n in reasons.most_common(3)) or "see the failure breakdown"
    return (
        f"Halted: {state['failed']} of {final} results failed "
        f"({100.0 * state['failed'] / final:.1f}%, limit {100.0 * state['halt_error_rate']:.1f}%): {top}."
    )
