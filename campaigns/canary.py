"""Canary cohorts: a broadcast sends to a random sample of its target first, waits, and goes on to
the rest only if the sample's error rate is within the campaign's limit.

The life of a canary (`Campaign.canary_phase`; every step is a row in PostgreSQL, so a worker that
dies anywhere loses nothing a sweep cannot find again):

1. pending -> sending (`start_sample`, from the planning task): the sample is drawn, written as
   `CanaryMember` rows and as list shards on the provider queues, in one transaction. The
   planner's hold on `outstanding` stays, so the campaign cannot complete meanwhile, and the
   planner stops there: the rest is not planned yet.
2. sending -> waiting (`sample_finished`, in the ledger's transaction of the sample's last shard,
   retries included: `outstanding` is back to the planner's 1): `canary_decide_at` = now + wait_s.
3. waiting -> passed or failed (`decide`, once `canary_decide_at` has passed, while the campaign
   runs): the figures are taken from the campaign's counters (nothing but the sample has been
   sent), then either the planning task is published for the rest (passed), or the campaign is
   paused with the figures as its reason (failed). The wait holds no worker: `decide_due` runs
   from beat's scheduler tick and every worker's recovery thread (campaigns/recovery.py sweep);
   with wait_s = 0 the run that recorded the last shard decides at once.
4. failed -> overridden (`before_planning`, in the planning task an operator's resume publishes):
   the rest is planned as if the canary had passed. Cancel works as for any campaign.

The rest's ranges leave the sample out (`rest_of`): a canary device is sent once, whatever its
answer. The idempotency bitmap (delivery/idempotency.py) would only skip delivered ones, and
only while Redis keeps it.

Error rate: errors / answered, over the sample's devices with a final outcome, where
errors = failed (rejected, or dead-lettered after CAMPAIGN_MAX_ATTEMPTS) + invalidated +
invalid_kept (invalid-token answers) + expired (the TTL ran out before a retry), and
answered = delivered + errors. Unlike the campaign-wide halt (campaigns/sending/ledger.py),
invalid tokens count: a canary is there to catch a stale import or the wrong APNs environment
before the whole segment. A rate strictly above `max_error_rate` pauses. The campaign-wide halt
is not checked while the sample is out (the canary's own limit decides); it is afterwards.

Sampling: a uniform random sample without replacement. The target is counted (an index-only scan
of the fan-out index), `size` distinct ranks are drawn in Python, and one pass numbers the
target's rows in index order (`row_number() OVER (ORDER BY platform, id)`, which the index
already gives: no sort) and keeps those ranks. That reads each index entry of the target once,
like the planner's own keyset walk, and never sorts the segment (no ORDER BY random()).
TABLESAMPLE SYSTEM was not used: it picks whole pages, so devices registered together come
together, and an app that is a small share of the table gets too few rows unless the
percentage is guessed high; random-id probes (`id >= random LIMIT 1`) favour devices that follow a
gap in the id space, and ids interleave between apps.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from django.db import transaction
from django.db.models import Exists, F, OuterRef, QuerySet, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from campaigns import control, publish
from campaigns.models import Campaign, CanaryMember, Shard
from campaigns.targeting import list_shards, target_queryset
from campaigns.webhook_events import campaign_changed
from tokens.models import DeviceToken

logger = logging.getLogger(__name__)

Phase = Campaign.CanaryPhase

MAX_SIZE = 100_000  # sample devices: held as ranks in memory and as one IN list while drawing
MAX_WAIT_S = 86_400  # one day; the decision is a stored deadline, so any wait costs nothing
DEFAULT_SIZE = 1_000
DEFAULT_MAX_ERROR_RATE = 0.05
# The sample is out or being judged: no planner should run (campaigns/recovery.py replan_lost).
NO_PLANNER = (Phase.SENDING, Phase.WAITING)
_DECIDE_BATCH = 100


@dataclass(frozen=True, slots=True)
class CanaryConfig:
    size: int
    wait_s: int
    max_error_rate: float

    @classmethod
    def of(cls, campaign: Campaign) -> CanaryConfig | None:
        raw = campaign.canary
        if not raw:
            return None
        return cls(int(raw["size"]), int(raw.get("wait_s", 0)), float(raw["max_error_rate"]))


@dataclass(frozen=True, slots=True)
class Figures:
    """The sample's outcome, per device (not per request: a retried device counts once)."""

    delivered: int
    failed: int
    invalidated: int
    invalid_kept: int
    expired: int

    @property
    def errors(self) -> int:
        return self.failed + self.invalidated + self.invalid_kept + self.expired

    @property
    def answered(self) -> int:
        return self.delivered + self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.answered if self.answered else 0.0

    @classmethod
    def of(cls, campaign: Campaign) -> Figures:
        return cls(
            campaign.delivered, campaign.failed, campaign.invalidated, campaign.invalid_kept, campaign.expired
        )


def rest_of(campaign: Campaign, qs: QuerySet[DeviceToken]) -> QuerySet[DeviceToken]:
    """`qs` without the campaign's canary sample (an anti-join on CanaryMember's unique index).
    Planning's ranges and the range shards' loads both go through it, so counts and sends agree."""
    if not campaign.canary:
        return qs
    sampled = CanaryMember.objects.filter(campaign_id=campaign.pk, device_pk=OuterRef("pk"))
    return qs.filter(~Exists(sampled))


def draw_sample(
    qs: QuerySet[DeviceToken], size: int, rng: random.Random | None = None
) -> tuple[int, list[tuple[int, str]]]:
    """(devices in `qs`, [(id, platform)] of `size` of them drawn uniformly without replacement:
    all when it has fewer). See the module docstring for why ranks and not TABLESAMPLE."""
    total = qs.count()
    if total == 0:
        return 0, []
    ranks = sorted((rng or random.Random()).sample(range(1, total + 1), min(size, total)))
    numbered = qs.annotate(rank=Window(RowNumber(), order_by=(F("platform").asc(), F("id").asc())))
    # Django wraps a filter on a window function in a subquery: the numbering sees the whole target.
    return total, list(numbered.filter(rank__in=ranks).values_list("id", "platform"))


def before_planning(campaign: Campaign, rng: random.Random | None = None) -> bool:
    """Called by the planner (campaigns/planning.py) before it plans ranges: whether it may plan
    the rest now. Draws and sends the sample the first time."""
    phase = campaign.canary_phase
    if not campaign.canary or phase in (Phase.PASSED, Phase.OVERRIDDEN):
        return True
    if phase == Phase.PENDING:
        return start_sample(campaign, rng)
    if phase == Phase.FAILED:
        return _override(campaign)
    return False  # sending or waiting: the decision publishes planning again


def start_sample(campaign: Campaign, rng: random.Random | None = None) -> bool:
    """pending -> sending: draw the sample, write it and its list shards, publish them. True when
    there is nothing to sample (an empty target): the campaign then plans as without a canary."""
    cfg = CanaryConfig.of(campaign)
    assert cfg is not None
    base = target_queryset(campaign)
    total, sample = draw_sample(base, cfg.size, rng)
    shards = list_shards(campaign, ((platform, pk) for pk, platform in sample))
    with transaction.atomic():
        # The row lock makes two planners (one with a stale lease) draw one sample, not two.
        locked = (
            Campaign.objects.select_for_update().filter(pk=campaign.pk, canary_phase=Phase.PENDING).first()
        )
        if locked is None:
            return False
        result = {"sample": len(sample), "target": total}
        if not sample:
            Campaign.objects.filter(pk=campaign.pk).update(
                canary_phase=Phase.PASSED,
                canary_result={**result, "decision": "continue", "note": "empty target"},
            )
            return True
        CanaryMember.objects.bulk_create(
            (CanaryMember(campaign_id=campaign.pk, device_pk=pk) for pk, _ in sample), batch_size=5000
        )
        Shard.objects.bulk_create(shards)
        Campaign.objects.filter(pk=campaign.pk).update(
            canary_phase=Phase.SENDING,
            canary_result=result,
            outstanding=F("outstanding") + len(shards),
            targeted=F("targeted") + len(sample),
        )
    for shard in shards:
        publish.shard(shard.pk, shard.queue, shard.lane)
    logger.info(
        "campaign %s: canary of %s devices sent in %s shard(s)", campaign.pk, len(sample), len(shards)
    )
    return False


def sample_finished(campaign_id: int, canary: dict[str, Any], now: datetime) -> datetime | None:
    """sending -> waiting, in the ledger's transaction that recorded the sample's last shard (the
    caller checked that only the planner's hold is outstanding). The decision time, or None if
    another transaction moved it first."""
    decide_at = now + timedelta(seconds=int(canary.get("wait_s", 0)))
    moved = Campaign.objects.filter(pk=campaign_id, canary_phase=Phase.SENDING).update(
        canary_phase=Phase.WAITING, canary_decide_at=decide_at
    )
    return decide_at if moved else None


def in_trial(phase: str) -> bool:
    """The sample is out or being judged: the campaign-wide error-rate halt waits for the verdict."""
    return phase in (Phase.PENDING, Phase.SENDING, Phase.WAITING)


def describe(figures: Figures, cfg: CanaryConfig) -> str:
    """The pause reason, with the figures: "canary: 7 of 100 failed (7.0 % > 5.0 %) ..."."""
    return (
        f"canary: {figures.errors} of {figures.answered} failed "
        f"({100.0 * figures.error_rate:.1f} % > {100.0 * cfg.max_error_rate:.1f} %): "
        f"{figures.failed} rejected or dead-lettered, "
        f"{figures.invalidated + figures.invalid_kept} invalid tokens, "
        f"{figures.expired} expired. The rest of the target was not sent: resume to send it, or cancel."
    )


def decide(client: redis.Redis, campaign_id: int, now: datetime | None = None) -> str | None:
    """waiting -> passed (the rest is planned) or failed (the campaign pauses), once the decision
    time has passed and the campaign runs; "continue", "pause", or None when not due (or decided
    by another caller: the row lock and the phase make it once)."""
    now = now or timezone.now()
    with transaction.atomic():
        campaign = (
            Campaign.objects.select_for_update()
            .filter(
                pk=campaign_id,
                canary_phase=Phase.WAITING,
                canary_decide_at__lte=now,
                status=Campaign.Status.RUNNING,
            )
            .first()
        )
        if campaign is None:
            return None
        cfg = CanaryConfig.of(campaign)
        assert cfg is not None
        figures = Figures.of(campaign)  # only the sample has been sent: the counters are its figures
        over = figures.error_rate > cfg.max_error_rate
        result = {
            **(campaign.canary_result or {}),
            "delivered": figures.delivered,
            "failed": figures.failed,
            "invalidated": figures.invalidated,
            "invalid_kept": figures.invalid_kept,
            "expired": figures.expired,
            "errors": figures.errors,
            "answered": figures.answered,
            "error_rate": round(figures.error_rate, 6),
            "max_error_rate": cfg.max_error_rate,
            "decision": "pause" if over else "continue",
            "decided_at": now.isoformat(),
        }
        if over:
            Campaign.objects.filter(pk=campaign_id).update(
                canary_phase=Phase.FAILED,
                canary_result=result,
                status=Campaign.Status.PAUSED,
                status_reason=describe(figures, cfg),
            )
            campaign_changed(campaign_id, Campaign.Status.PAUSED)  # the webhook event, in this transaction
        else:
            Campaign.objects.filter(pk=campaign_id).update(canary_phase=Phase.PASSED, canary_result=result)
    if over:
        control.set_flag(client, campaign_id, control.PAUSED)
        logger.warning("campaign %s paused: %s", campaign_id, describe(figures, cfg))
        return "pause"
    # Lost after the commit (a crash): recovery's replan_lost publishes it again (phase passed).
    publish.plan(campaign_id)
    logger.info("campaign %s: canary passed (%d of %d failed); planning the rest", campaign_id,
                figures.errors, figures.answered)  # fmt: skip
    return "continue"


def decide_due(client: redis.Redis, now: datetime | None = None) -> list[int]:
    """Decide every canary whose wait is over (beat's tick and the workers' recovery sweep)."""
    now = now or timezone.now()
    due = Campaign.objects.filter(
        canary_phase=Phase.WAITING, canary_decide_at__lte=now, status=Campaign.Status.RUNNING
    ).values_list("id", flat=True)[:_DECIDE_BATCH]
    return [campaign_id for campaign_id in due if decide(client, campaign_id, now)]


def after_resume(campaign_id: int) -> None:
    """An operator resumed a campaign: if its canary had failed, planning goes on with the rest
    (`before_planning` moves failed -> overridden in the planning task, so a lost message is
    re-published by recovery's replan_lost like any lost planner)."""
    if Campaign.objects.filter(pk=campaign_id, canary_phase=Phase.FAILED, planned=False).exists():
        publish.plan(campaign_id)


def _override(campaign: Campaign) -> bool:
    """failed -> overridden once the campaign runs again (resumed); False while it is paused."""
    with transaction.atomic():
        locked = (
            Campaign.objects.select_for_update()
            .filter(pk=campaign.pk, canary_phase=Phase.FAILED, status=Campaign.Status.RUNNING)
            .first()
        )
        if locked is None:
            return False
        result = {**(locked.canary_result or {}), "resumed_at": timezone.now().isoformat()}
        Campaign.objects.filter(pk=campaign.pk).update(canary_phase=Phase.OVERRIDDEN, canary_result=result)
    return True


def status_of(campaign: Campaign) -> dict[str, Any] | None:
    """The canary as the API and the admin show it; None without one."""
    cfg = CanaryConfig.of(campaign)
    if cfg is None:
        return None
    result = campaign.canary_result or {}
    figures = None
    if "decision" in result and "answered" in result:
        figures = {
            name: result[name]
            for name in (
                "delivered",
                "failed",
                "invalidated",
                "invalid_kept",
                "expired",
                "errors",
                "answered",
            )
        }
        figures["error_rate"] = result["error_rate"]
    return {
        "size": cfg.size,
        "wait_s": cfg.wait_s,
        "max_error_rate": cfg.max_error_rate,
        "phase": campaign.canary_phase,
        "sample": result.get("sample"),
        "decide_at": campaign.canary_decide_at,
        "figures": figures,
        "decision": result.get("decision"),
        "decided_at": result.get("decided_at"),
        "resumed_at": result.get("resumed_at"),
    }
