"""One run of one shard: load -> skip finished -> chunks (checkpoint -> send -> sort) -> record.

`ShardRun` receives what it talks to (the Redis client, a provider factory, a clock, the ledger,
the publisher, the settings it reads) and `run()` says why it stopped (`StopReason`), so every
path is driven in-process by tests/test_shard_run.py. `run_shard` is what the Celery task calls;
`shard_failed` counts a run that raised and halts the campaign on the third.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import orjson
import redis
from django.conf import settings
from django.db import connection
from django.db.models import CharField
from django.db.models.functions import Cast
from django.utils import timezone

from campaigns import canary, control, publish
from campaigns.models import Campaign, Shard
from campaigns.sending import policy
from campaigns.sending.guard import HOLD, PASSED, PruneGuard, describe
from campaigns.sending.ledger import Applied, Device, ShardResults, apply_shard_run
from campaigns.targeting import target_queryset
from delivery import breaker, idempotency, leases, runtime
from delivery.payload import PushMessage
from delivery.providers.base import Outcome, Provider, Result, Target
from delivery.providers.specs import provider_name
from delivery.ratelimit import NO_REPORT, Report, TokenBucket, campaign_key, provider_key, rollout_rate
from pushsvc import logging as log_context
from pushsvc import metrics
from tokens import hygiene
from tokens.models import App, DeviceToken, Platform

logger = logging.getLogger(__name__)

LEASE_RECHECK_S = 5  # a shard found leased by another run is looked at again after this long
SHARD_MAX_FAILURES = 3  # runs of one shard that may raise before its campaign halts


class StopReason(enum.StrEnum):
    """Why a run ended. Each maps to what happens to the shard's unsent devices (`_PARK`)."""

    DONE = "done"  # every device answered (or expired) and the run was recorded
    SKIPPED = "skipped"  # the shard was no longer pending (recorded, parked or cancelled): nothing done
    PARKED = "parked"  # the campaign was not running when the run began: shard parked, nothing sent
    REQUEUED = "requeued"  # another run holds the lease: published again for a look in a few seconds
    PAUSED = "paused"  # the campaign was paused between chunks: the rest parked
    HALTED = "halted"  # halted (error rate, by this run's record or before a chunk): the rest parked
    CANCELLED = "cancelled"  # cancelled between chunks: what was sent recorded, the rest dropped
    GUARD_HOLD = "guard_hold"  # the mass-prune guard held invalid answers and paused the campaign
    AUTH_FAILED = "auth_failed"  # the provider rejected the credentials: campaign paused
    BREAKER_PAUSED = "breaker_paused"  # the provider has been down BREAKER_PAUSE_AFTER_S: campaign paused
    DEFERRED = "deferred"  # breaker open or bucket in debt past BREAKER_SLEEP_MAX_S: re-queued for then
    LEASE_LOST = "lease_lost"  # another run owns the shard now: this one records nothing more
    REDIS_LOST = "redis_lost"  # Redis failed: what was sent is recorded, the task retries the rest


# What the ledger does with the devices a stopped run did not send: None (the shard is done),
# parked paused (resume hands them back), cancelled, or left pending after what was sent.
_PARK: dict[StopReason, str | None] = {
    StopReason.DONE: None,
    StopReason.PAUSED: control.PAUSED,
    StopReason.HALTED: control.PAUSED,
    StopReason.GUARD_HOLD: control.PAUSED,
    StopReason.AUTH_FAILED: control.PAUSED,
    StopReason.BREAKER_PAUSED: control.PAUSED,
    StopReason.CANCELLED: control.CANCELLED,
    StopReason.DEFERRED: Shard.Status.PENDING,
    StopReason.REDIS_LOST: Shard.Status.PENDING,
}


class Clock(Protocol):
    def time(self) -> float: ...
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock (a fake one in tests advances on `sleep` instead of waiting)."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


@dataclass(frozen=True, slots=True)
class RunSettings:
    """The settings a run reads, taken once per run (tests pass their own)."""

    chunk_size: int
    probe_size: int
    lease_s: int
    sleep_max_s: float
    pause_after_s: float
    max_attempts: int
    provider_rate: float  # PUSH_RATE_LIMITS for the platform (0: adaptive only)

    @classmethod
    def from_settings(cls, platform: str) -> RunSettings:
        return cls(
            chunk_size=max(settings.CAMPAIGN_CHUNK_SIZE, 1),
            probe_size=settings.BREAKER_PROBE_SIZE,
            lease_s=settings.CAMPAIGN_SHARD_LEASE_S,
            sleep_max_s=settings.BREAKER_SLEEP_MAX_S,
            pause_after_s=settings.BREAKER_PAUSE_AFTER_S,
            max_attempts=settings.CAMPAIGN_MAX_ATTEMPTS,
            provider_rate=float(settings.PUSH_RATE_LIMITS.get(platform, 0) or 0),
        )


class Checkpoint(NamedTuple):
    state: str  # the campaign's state as the shards see it
    leased: bool  # the lease is still this run's
    wait: float  # seconds before the reserved tokens may be used
    verdict: breaker.Verdict
    epoch: str  # the provider bucket's, for the report of the chunk these tokens send


class _Stop(NamedTuple):
    reason: StopReason
    done: int  # devices of `todo` finished before the stop
    defer_s: float = 0.0  # DEFERRED: seconds to wait before the rest


class _Flight(NamedTuple):
    """A chunk handed to the provider, its answers still to come."""

    chunk: list[Device]
    answers: concurrent.futures.Future[list[Result]]
    sent_at: float  # monotonic
    probing: bool  # the breaker's probe
    epoch: str  # the provider bucket's when the chunk was reserved (delivery/ratelimit.py)


def run_shard(shard_id: int) -> StopReason:
    """The Celery task's body (campaigns/tasks.py send_shard): one run with the process's Redis
    client and warm providers. Raises after recording when Redis failed mid-run, so the task
    retries the rest (it stays pending after what was sent)."""
    reason = ShardRun(shard_id, client=runtime.redis_client()).run()
    if reason == StopReason.REDIS_LOST:
        raise redis.ConnectionError(f"Redis failed during shard {shard_id}; sent part recorded")
    return reason


class ShardRun:
    """One run of one shard. Collaborators are arguments; the defaults are the worker's."""

    def __init__(
        self,
        shard_id: int,
        *,
        client: redis.Redis,
        providers: Callable[[App, str], Provider] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        record: Callable[..., Applied] | None = None,
        publish_shard: Callable[..., None] | None = None,
        run_settings: RunSettings | None = None,
        keeper: leases.LeaseKeeper | None = None,
        submit: Callable[[Coroutine[Any, Any, list[Result]]], concurrent.futures.Future[list[Result]]]
        | None = None,
    ) -> None:
        # `providers` is a factory, not a provider: which app and platform it needs is on the shard
        # row, and a shard that parks or finds its lease taken must not build one. Defaults (looked
        # up here, so a patched module is honoured): the process's warm providers
        # (delivery/runtime.py), the ledger's transaction, publishing by task name.
        self.shard_id = shard_id
        self.client = client
        self.providers = runtime.provider_for if providers is None else providers
        # Starts a chunk's send on the process's event loop (tests: at once, in order).
        self.submit = runtime.submit if submit is None else submit
        self.clock = clock
        self.record = apply_shard_run if record is None else record
        self.publish_shard = publish.shard if publish_shard is None else publish_shard
        self._settings = run_settings
        # Keeps the lease alive between checkpoints (delivery/leases.py); the process's heartbeat
        # thread unless a test drives one by hand. Looked up when a lease is taken.
        self._keeper = keeper
        self.guard_paused = False  # this run's guard verdict paused the campaign

    # --- the run, outside the lease ----------------------------------------------------------------
    def run(self) -> StopReason:
        shard = Shard.objects.select_related("campaign").only(*_RUN_FIELDS).filter(pk=self.shard_id).first()
        if shard is None or shard.status != Shard.Status.PENDING:
            return StopReason.SKIPPED  # already recorded (a redelivery), parked or cancelled
        campaign = shard.campaign
        log_context.bind(campaign=campaign.pk, shard=shard.pk, provider=shard.platform)  # pushsvc/logging.py
        state = control.current_state(self.client, campaign.pk)
        if state != control.RUNNING:
            self._park(shard, state)
            return StopReason.PARKED

        lease = leases.new_token()
        ttl_s = self.settings_for(shard).lease_s
        busy_for = leases.acquire(self.client, shard.pk, lease, ttl_s)
        if busy_for:
            # Another run holds the shard (or died holding it): look again shortly; a live holder
            # finishes or parks it, a dead one's lease runs out.
            self.publish_shard(shard.pk, shard.queue, shard.lane, countdown=min(busy_for, LEASE_RECHECK_S))
            return StopReason.REQUEUED
        keeper = self.keeper
        keeper.hold(shard.pk, lease, ttl_s)
        try:
            return self.run_leased(shard, campaign, lease)
        finally:
            keeper.drop(shard.pk)
            # Redis away: the lease expires on its own (or went with the restart).
            with contextlib.suppress(redis.RedisError):
                leases.release(self.client, shard.pk, lease)

    @property
    def keeper(self) -> leases.LeaseKeeper:
        if self._keeper is None:
            self._keeper = leases.process_keeper()
        return self._keeper

    def settings_for(self, shard: Shard) -> RunSettings:
        if self._settings is None:
            self._settings = RunSettings.from_settings(shard.platform)
        return self._settings

    # --- the run, holding the lease ----------------------------------------------------------------
    def run_leased(self, shard: Shard, campaign: Campaign, lease: str) -> StopReason:
        """load -> skip finished -> send -> record, with `lease` taken (tests hand it a lost one)."""
        if not _reread(shard) or shard.status != Shard.Status.PENDING:
            return StopReason.SKIPPED  # the run that held the lease before us finished or parked it
        cfg = self.settings_for(shard)
        devices = _load(shard, campaign)
        first_run = not shard.is_child and shard.loaded is None
        # Delivered by an earlier run that died before recording them (delivery/idempotency.py).
        already = idempotency.finished(self.client, campaign.pk, [d.pk for d in devices])
        todo = [d for d in devices if d.pk not in already]
        results = ShardResults(
            attempt=shard.attempt,
            max_attempts=cfg.max_attempts,
            deadline=int(shard.expires_at.timestamp()) if shard.expires_at else None,
            answers=[] if campaign.kind == Campaign.Kind.DIRECT else None,
        )
        stop = _Stop(StopReason.DONE, len(todo))
        if results.deadline is not None and self.clock.time() >= results.deadline:
            results.expire(todo)  # a retry whose message's TTL ran out while it waited: never sent
            todo = []
        if todo:
            stop = _Sender(self, shard, campaign, lease, cfg).send(todo, results)
        if stop.reason == StopReason.LEASE_LOST:
            # Another run owns the shard now (this one stalled past its lease). What this run
            # delivered is in the bitmap, so that run counts it; its other answers it sends again.
            logger.warning(
                "shard %s: lease lost after %d of %d devices; this run sends and records nothing more",
                shard.pk,
                stop.done,
                len(todo),
            )
            return stop.reason

        park = _PARK[stop.reason]
        rest_lo: int | None = None
        rest_ids: list[int] | None = None
        if park is not None:
            rest_lo = todo[stop.done - 1].pk if stop.done else shard.lo
            rest_ids = [d.pk for d in todo[stop.done :]]
            if shard.is_range:
                # Those beyond the new lower bound are met (and counted) again on resume.
                already = {pk for pk in already if pk <= rest_lo}
        results.recover(already)
        applied = self.record(
            shard,
            results,
            loaded=len(devices) if first_run else None,
            park=park,
            rest_lo=rest_lo,
            rest_ids=rest_ids,
            defer_s=stop.defer_s,
        )
        if stop.reason == StopReason.REDIS_LOST:
            # What was sent is recorded and the shard stays pending after it, so the re-run does not
            # depend on the idempotency bitmap (a Redis restart without persistence loses it). Its
            # follow-ups are rows; the recovery sweep publishes them if this worker cannot.
            return stop.reason
        if not applied.recorded:
            return StopReason.SKIPPED
        self._after_record(shard, campaign, results, applied, stop)
        if applied.halted_reason and stop.reason == StopReason.DONE:
            return StopReason.HALTED
        if stop.reason == StopReason.DONE and self.guard_paused:
            return StopReason.GUARD_HOLD
        return stop.reason

    def _after_record(
        self, shard: Shard, campaign: Campaign, results: ShardResults, applied: Applied, stop: _Stop
    ) -> None:
        """After the ledger's transaction: hygiene figures, follow-ups, completion or halt flags."""
        # Answered sends and invalid answers per provider: flags a campaign whose first sends are
        # mostly invalid (a bad import, the wrong APNs environment). Shown on the campaign API.
        hygiene.record_sends(
            campaign.pk,
            provider_name(shard.platform),
            results.sent,
            len(results.invalid) + results.held_invalid,
            client=self.client,
        )
        for follow_up, queue, lane, delay in applied.follow_ups:
            self.publish_shard(follow_up, queue, lane, countdown=delay)
        if stop.reason == StopReason.DEFERRED:
            self.publish_shard(shard.pk, shard.queue, shard.lane, countdown=stop.defer_s)
        if applied.completed:
            control.set_flag(self.client, campaign.pk, Campaign.Status.COMPLETED)
            idempotency.expire(self.client, campaign.pk)
            logger.info("campaign %s completed", campaign.pk)
        elif applied.halted_reason:
            control.set_flag(self.client, campaign.pk, control.HALTED)
            logger.warning("campaign %s %s", campaign.pk, applied.halted_reason)
        if applied.canary_decide_at is not None and applied.canary_decide_at <= timezone.now():
            # No wait asked for: decide now rather than at the next sweep (campaigns/canary.py).
            canary.decide(self.client, campaign.pk)
        if _PARK[stop.reason] == control.PAUSED or results.held:
            # Every parked shard of the campaign, not only this one: the held devices' shard this
            # record just wrote is parked too, and a resume that ran before it existed missed it.
            self._requeue_if_resumed(campaign.pk, None)

    def _park(self, shard: Shard, state: str) -> None:
        status = Shard.Status.CANCELLED if state == control.CANCELLED else Shard.Status.PAUSED
        if state == Campaign.Status.COMPLETED:
            status = Shard.Status.CANCELLED  # cannot happen with outstanding bookkeeping; be safe
        Shard.objects.filter(pk=shard.pk, status=Shard.Status.PENDING).update(status=status)
        if status == Shard.Status.PAUSED:
            self._requeue_if_resumed(shard.campaign_id, shard.pk)

    def _requeue_if_resumed(self, campaign_id: int, shard_id: int | None) -> None:
        """A resume may have run between our flag check and parking: hand parked work back."""
        if control.current_state(self.client, campaign_id) != control.RUNNING:
            return
        for follow_up, queue, lane in control.unpark_shards(campaign_id, shard_id):
            self.publish_shard(follow_up, queue, lane)


class _Sender:
    """The chunk loop of one leased run, with what every chunk needs at hand (the helpers used
    to take the same ten parameters)."""

    def __init__(self, run: ShardRun, shard: Shard, campaign: Campaign, lease: str, cfg: RunSettings) -> None:
        self.run = run
        self.client = run.client
        self.clock = run.clock
        self.shard = shard
        self.campaign = campaign
        self.lease = lease
        self.cfg = cfg
        self.bucket = TokenBucket(self.client)
        self.circuit = breaker.Breaker(self.client)
        self.provider_key = provider_key(campaign.app_id, shard.platform)
        self.rollout = bool(campaign.rollout_start_rate or campaign.rollout_max_rate)
        # A sorted chunk's rate report and its breaker report ride on the next checkpoint
        # (delivery/ratelimit.py, delivery/breaker.py); the last chunk's go out on their own.
        self.rate_report: Report = NO_REPORT
        self.report: tuple[str, float] = ("", 0.0)
        self.flight: _Flight | None = None  # the chunk handed to the provider, not yet sorted
        self.message = PushMessage.from_dict(campaign.message)
        self.guard = PruneGuard(self.client)
        self.guard_armed = not campaign.prune_confirmed  # until the guard has judged the first answers
        self.provider = run.providers(campaign.app, shard.platform)
        self.web = shard.platform == Platform.WEB
        # Only first sends of a broadcast can show provider-wide throttling (delivery/ratelimit.py).
        self.sample = shard.attempt == 0 and not shard.is_child and campaign.kind == Campaign.Kind.BROADCAST

    def send(self, todo: list[Device], results: ShardResults) -> _Stop:
        """Send `todo` chunk by chunk. Every chunk goes only after a checkpoint found the campaign
        running and the lease still this run's; a wait longer than BREAKER_SLEEP_MAX_S is never
        slept (a sleeping run could outlive its lease): the shard is deferred instead and its
        reserved tokens go back to the bucket.

        Chunks overlap: the next one goes out as soon as its checkpoint allows, while the one before
        it still drains, and the one before is sorted meanwhile; so the connection does not idle
        through a chunk's slowest answers and its sorting. Not while the prune guard still judges
        the campaign's first answers, nor for a breaker probe: those answers decide whether another
        chunk may go. Every stop lands the chunk in flight first, so `done` counts devices sent and
        sorted."""
        cfg = self.cfg
        start = 0  # devices handed to the provider; all of them sorted whenever the loop stops
        try:
            while start < len(todo):
                reserved = len(todo[start : start + cfg.chunk_size])
                try:
                    point = self._checkpoint(reserved)
                    self.rate_report, self.report = NO_REPORT, ("", 0.0)
                    verdict = point.verdict
                    probing = verdict.action == breaker.PROBE
                    running = point.leased and point.state == control.RUNNING
                    if not running or verdict.action != breaker.GO or point.wait > cfg.sleep_max_s:
                        # Anything but "send now": what is in flight is sorted first (a probe's answer
                        # must be the next report the breaker hears).
                        landed = self._land(results)
                        if landed is not None:
                            self._release_probe(probing)
                            self._refund(reserved)
                            return _Stop(landed, start)
                    if not running:
                        self._release_probe(probing)
                        self._refund(reserved)
                        return _Stop(self._stopped(point.leased, point.state), start)
                    size = cfg.probe_size if probing else cfg.chunk_size
                    chunk = todo[start : start + size] if verdict.action != breaker.WAIT else []
                    if verdict.action == breaker.WAIT or point.wait > cfg.sleep_max_s:
                        self._refund(reserved)
                    else:
                        self._refund(reserved - len(chunk))
                    if verdict.action == breaker.WAIT:
                        waited = self._wait_for_breaker(verdict)
                        if waited is None:
                            continue
                        defer_s = policy.defer_delay(verdict.wait_s) if waited == StopReason.DEFERRED else 0.0
                        return _Stop(waited, start, defer_s)
                    if point.wait > cfg.sleep_max_s:
                        self._release_probe(probing)
                        return _Stop(StopReason.DEFERRED, start, policy.defer_delay(point.wait))
                    if point.wait > 0:
                        self.clock.sleep(point.wait)
                        stopped = self._still_ours()
                        if stopped is not None:
                            landed = self._land(results)
                            self._release_probe(probing)
                            return _Stop(landed or stopped, start)
                except redis.RedisError:
                    return _Stop(self._land(results) or StopReason.REDIS_LOST, start)
                launched = self._launch(chunk, results, probing, point.epoch)
                start += len(chunk)
                landed = self._land(results)  # the chunk before, while this one is on the wire
                self.flight = launched
                if landed is None and (probing or self.guard_armed):
                    landed = self._land(results)
                if landed is not None:
                    self._land(results)
                    return _Stop(landed, start)
            return _Stop(self._land(results) or StopReason.DONE, len(todo))
        finally:
            self._send_rate_report()
            self._send_breaker_report()

    def _launch(self, chunk: list[Device], results: ShardResults, probing: bool, epoch: str) -> _Flight:
        """Hand a chunk to the provider without waiting for its answers."""
        if results.deadline is None and self.message.ttl is not None:
            results.deadline = int(self.clock.time()) + self.message.ttl  # fixed at the shard's first send
        web = self.web
        targets = [
            Target(
                device_id=d.pk,
                token=d.token,
                p256dh=d.p256dh if web else "",
                auth=d.auth if web else "",
                locale=d.locale,
            )
            for d in chunk
        ]
        chunk_message = policy.remaining(self.message, results.deadline, self.clock.time())
        answers = self.run.submit(self.provider.send_many(targets, chunk_message))
        return _Flight(chunk, answers, self.clock.monotonic(), probing, epoch)

    def _land(self, results: ShardResults) -> StopReason | None:
        """Wait for the answers of the chunk in flight, if any, and sort them: the ledger's tally,
        the idempotency bitmap, the prune guard, the breaker's and the rate limiter's reports. A
        reason if the run must stop (credentials rejected, Redis lost)."""
        flight, self.flight = self.flight, None  # taken first: a chunk is never sorted twice
        if flight is None:
            return None
        shard, campaign, chunk = self.shard, self.campaign, flight.chunk
        answers = flight.answers.result()
        metrics.observe_chunk(shard.platform, self.clock.monotonic() - flight.sent_at)  # pushsvc/metrics.py
        if logger.isEnabledFor(logging.DEBUG):
            for answer in answers:
                logger.debug(
                    "device %s: %s %s %s id=%s",
                    answer.target.device_id,
                    answer.outcome,
                    answer.status,
                    answer.reason,
                    answer.provider_message_id,
                )
        invalid = sum(1 for a in answers if a.outcome == Outcome.INVALID_TOKEN)
        # The chunk before's rate report, when no checkpoint carried it (a run's last two chunks). Its
        # breaker report is replaced, as before: a probe's must be the next one the breaker hears.
        self._send_rate_report()
        self.rate_report = policy.rate_report(answers, self.sample, flight.epoch)
        # A retry shard's devices failed before: a biased sample that must not open the breaker for
        # the whole app (a few devices a provider keeps failing are dead-lettered instead). Its
        # probe, and first sends, speak for the provider.
        probing = flight.probing
        outage = (probing or shard.attempt == 0) and breaker.is_outage(answers, probe=probing)
        self.report = (breaker.OK, 0.0)
        if outage:
            self.report = (breaker.FAIL, max((a.retry_after or 0.0 for a in answers), default=0.0))
        hold_invalid = False
        redis_lost = False
        if self.guard_armed:
            try:
                guard_verdict = self.guard.observe(campaign.pk, shard.platform, len(answers), invalid)
            except redis.RedisError:
                # The answers are in hand: record them, then stop.
                guard_verdict, redis_lost = PASSED, True
            hold_invalid = guard_verdict == HOLD
            self.guard_armed = guard_verdict != PASSED
        delivered = results.add(chunk, answers, hold_invalid=hold_invalid and invalid > 0, outage=outage)
        try:
            if redis_lost:
                raise redis.ConnectionError("prune guard unreachable")
            idempotency.mark_finished(self.client, campaign.pk, delivered)
        except redis.RedisError:
            return StopReason.REDIS_LOST
        if hold_invalid and invalid:
            reason = next(a.reason for a in answers if a.outcome == Outcome.INVALID_TOKEN)
            control.pause(self.client, campaign.pk, describe(shard.platform, invalid, len(answers), reason))
            self.run.guard_paused = True
        if results.auth_reason:
            # Not if the campaign was resumed since this run loaded it: these answers may predate
            # the operator's fix. The shard parks and, the campaign running, goes again at once.
            control.pause(
                self.client,
                campaign.pk,
                f"Provider credentials rejected ({shard.platform}: {results.auth_reason}). "
                "No token was changed; fix the app's credentials and resume.",
                resumes=campaign.resumes,
            )
            return StopReason.AUTH_FAILED
        return None

    def _stopped(self, leased: bool, state: str) -> StopReason:
        """Why a checkpoint stops the run: the lease went, or the campaign is not running."""
        if not leased:
            return StopReason.REDIS_LOST if self._vanished() else StopReason.LEASE_LOST
        if state == control.CANCELLED:
            return StopReason.CANCELLED
        if self.run.guard_paused:
            return StopReason.GUARD_HOLD
        return StopReason.HALTED if state == control.HALTED else StopReason.PAUSED

    def _vanished(self) -> bool:
        """The lease is not another run's: neither it nor its registration exists (a run that takes a
        lease registers it). Redis lost its data (a flush, a restart without persistence), and the
        idempotency bitmap with it: the run records what it sent and leaves the rest pending, as
        when Redis fails (REDIS_LOST), instead of leaving it all to a re-run that cannot tell what
        was delivered. Should a run have taken and released it meanwhile, the ledger finds the row
        changed and records nothing."""
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(idempotency.lease_key(self.shard.pk))
        pipe.hexists(leases.REGISTER_KEY, self.shard.pk)
        return not any(pipe.execute())

    def _release_probe(self, probing: bool) -> None:
        """A run that got the breaker's probe and stops before using it hands it back."""
        if probing:
            self.report = (breaker.RELEASE, 0.0)

    def _checkpoint(self, n: int) -> Checkpoint:
        """Between two chunks, in one round trip: the campaign's control flag, the shard's lease
        (refreshed only if still ours), the provider's breaker (told how the previous chunk went),
        and `n` tokens from the provider's and the rollout's buckets; the provider's bucket also
        hears the previous chunk's rate report."""
        campaign = self.campaign
        self.run.keeper.progress(self.shard.pk)  # the run moves: its heartbeat may go on
        pipe = self.client.pipeline(transaction=False)
        pipe.get(control.flag_key(campaign.pk))
        idempotency.refresh_lease(pipe, idempotency.lease_key(self.shard.pk), self.lease, self.cfg.lease_s)
        self.circuit.queue_check(pipe, campaign.app_id, self.shard.platform, self.lease, *self.report)
        self.bucket.queue_reserve(
            pipe, self.provider_key, self.cfg.provider_rate, n, adaptive=True, report=self.rate_report
        )
        if self.rollout:
            self.bucket.queue_reserve(pipe, campaign_key(campaign.pk), self._rollout_now(), n)
        flag, leased, verdict, *replies = pipe.execute()
        grants = [TokenBucket.parse(reply) for reply in replies]  # the provider's first
        state = flag.decode() if flag is not None else control.current_state(self.client, campaign.pk)
        return Checkpoint(
            state, bool(leased), max(g.wait for g in grants), breaker.parse(verdict), grants[0].epoch
        )

    def _still_ours(self) -> StopReason | None:
        """After a short sleep, before sending: None if the campaign runs and the lease is this run's."""
        self.run.keeper.progress(self.shard.pk)
        pipe = self.client.pipeline(transaction=False)
        pipe.get(control.flag_key(self.campaign.pk))
        idempotency.refresh_lease(pipe, idempotency.lease_key(self.shard.pk), self.lease, self.cfg.lease_s)
        flag, leased = pipe.execute()
        if not leased:
            return self._stopped(False, "")
        state = flag.decode() if flag is not None else control.current_state(self.client, self.campaign.pk)
        if state != control.RUNNING:
            return self._stopped(True, state)
        return None

    def _wait_for_breaker(self, verdict: breaker.Verdict) -> StopReason | None:
        """The provider's breaker is open: None after waiting a short while in place (the caller
        asks again), DEFERRED when the wait is long (the shard is re-queued for then, freeing the
        worker for other apps' shards), BREAKER_PAUSED when the provider has been down for
        BREAKER_PAUSE_AFTER_S."""
        pause_after = self.cfg.pause_after_s
        if pause_after and verdict.down_for_s >= pause_after:
            control.pause(
                self.client,
                self.campaign.pk,
                f"Provider {self.shard.platform} has failed every request (server errors or no answer) "
                f"for {verdict.down_for_s:.0f} s. No token was changed; resume when it answers again.",
            )
            return StopReason.BREAKER_PAUSED
        if verdict.wait_s > self.cfg.sleep_max_s:
            return StopReason.DEFERRED
        self.clock.sleep(verdict.wait_s)  # the probe's answer or the breaker's reopening, due within this
        return None

    def _refund(self, n: int) -> None:
        """Tokens reserved at the checkpoint for sends the breaker held back."""
        if n <= 0:
            return
        self.bucket.refund(self.provider_key, self.cfg.provider_rate, n, adaptive=True)
        if self.rollout:
            self.bucket.refund(campaign_key(self.campaign.pk), self._rollout_now(), n)

    # A report no checkpoint carried goes on its own. Best effort: with Redis away it is lost, and
    # the bucket and breaker heal on their own.
    def _send_rate_report(self) -> None:
        report, self.rate_report = self.rate_report, NO_REPORT
        if report != NO_REPORT:
            with contextlib.suppress(redis.RedisError):
                self.bucket.reserve(
                    self.provider_key, self.cfg.provider_rate, 0, adaptive=True, report=report
                )

    def _send_breaker_report(self) -> None:
        if self.report[0]:
            with contextlib.suppress(redis.RedisError):
                self.circuit.report(self.campaign.app_id, self.shard.platform, self.lease, *self.report)

    def _rollout_now(self) -> float:
        campaign = self.campaign
        now = timezone.now()
        return rollout_rate(
            campaign.rollout_start_rate,
            campaign.rollout_max_rate,
            campaign.rollout_ramp_minutes,
            campaign.started_at or now,
            now,
        )


# The shard fetch outside the lease reads these columns only: the Shard's and the Campaign fields a
# run reads (a field left out would cost a query of its own when read). The App is not joined: its
# credentials (about 40 columns) are loaded by `campaign.app` when a chunk is about to go, so
# provider_for fingerprints the current ones, and a run that skips or parks never reads them.
# select_related("campaign__app") selected ~80 columns and built three models: 1.2 ms CPU a run.
_RUN_FIELDS = (
    *(f.name for f in Shard._meta.concrete_fields if f.name not in ("created_at", "last_error")),
    *(
        f"campaign__{name}"
        for name in (
            "app",
            "kind",
            "message",
            "target",
            "canary",
            "prune_confirmed",
            "rollout_start_rate",
            "rollout_max_rate",
            "rollout_ramp_minutes",
            "started_at",
            "resumes",
        )
    ),
)
_SHARD_TABLE = Shard._meta.db_table


def _reread(shard: Shard) -> bool:
    """Under the lease, the shard's columns an earlier run may have changed since the fetch (False
    when the row is gone). Raw SQL: the ORM's refresh_from_db compiled a query and built a model."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT status, lo, device_ids, loaded, expires_at FROM {_SHARD_TABLE} WHERE id = %s", [shard.pk]
        )
        row = cursor.fetchone()
    if row is None:
        return False
    shard.status, shard.lo, device_ids, shard.loaded, shard.expires_at = row
    # The backend hands jsonb over as text (JSONField decodes it); NULL marks a range shard.
    shard.device_ids = device_ids if device_ids is None else orjson.loads(device_ids)
    return True


def _load(shard: Shard, campaign: Campaign) -> list[Device]:
    """The shard's devices, only the columns a send needs, through the keyset range (or id list)."""
    if shard.is_range:
        qs = target_queryset(campaign).filter(platform=shard.platform, id__gt=shard.lo, id__lte=shard.hi)
        qs = canary.rest_of(campaign, qs)  # the sample was sent first, as list shards
    else:
        qs = DeviceToken.objects.filter(
            app_id=campaign.app_id, platform=shard.platform, is_active=True, id__in=shard.device_ids
        )
    # device_id as text: psycopg2 would build a uuid.UUID per row, and the ledger only writes it back
    # (dead letters, direct results, the invalidations' partition key). The rows are read with the
    # cursor, not through values_list's per-row iterator: same statement, same plan.
    qs = qs.order_by("id").annotate(device_key=Cast("device_id", output_field=CharField()))
    rows = qs.values_list("id", "token", "web_p256dh", "web_auth", "device_key", "app_version", "locale")
    sql, params = rows.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [Device(*row) for row in cursor.fetchall()]


def shard_failed(shard_id: int, exc: BaseException) -> bool:
    """A run of the shard raised something no retry policy expects (a bug, data the code cannot
    handle). Counted on the shard; the third time the shard is parked and its campaign halted with
    the error, instead of the recovery sweep re-publishing it forever. Other campaigns, of this app
    or another, go on. True when the campaign was halted."""
    error = f"{type(exc).__name__}: {exc}"[:500]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Shard._meta.db_table} SET failures = failures + 1, last_error = %s "
            "WHERE id = %s AND status = %s RETURNING failures, campaign_id",
            [error, shard_id, Shard.Status.PENDING],
        )
        row = cursor.fetchone()
    if row is None or row[0] < SHARD_MAX_FAILURES:
        return False
    failures, campaign_id = row
    Shard.objects.filter(pk=shard_id, status=Shard.Status.PENDING).update(status=Shard.Status.PAUSED)
    reason = (
        f"Halted: shard {shard_id} failed {failures} times with {error}. "
        "Its devices are held; resume to try it again."
    )
    halted = control.pause(runtime.redis_client(), campaign_id, reason, to=control.HALTED)
    logger.error("shard %s failed %s times: %s", shard_id, failures, error)
    return halted
