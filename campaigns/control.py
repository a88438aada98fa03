"""Campaign state transitions and the control flag shards watch.

The database row is the truth; a Redis key per campaign mirrors its state so that every shard
can check it between two chunks (a GET in a pipeline it sends anyway) and a pause, halt or
cancel takes effect within one chunk instead of after the queue drains.

Resuming and a shard parking itself can race; both hand the shard back with a conditional
`UPDATE ... WHERE status = 'paused'`, so exactly one of them re-enqueues it.
"""

from __future__ import annotations

import logging

import redis
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from campaigns import publish
from campaigns.models import Campaign, Shard
from campaigns.sending.guard import guard_keys
from campaigns.webhook_events import campaign_changed
from delivery import breaker, idempotency
from tokens.models import Platform

logger = logging.getLogger(__name__)

RUNNING = Campaign.Status.RUNNING.value
PAUSED = Campaign.Status.PAUSED.value
HALTED = Campaign.Status.HALTED.value
CANCELLED = Campaign.Status.CANCELLED.value


class TransitionError(Exception):
    """The campaign is not in a state that allows this action (the API answers 409)."""


def flag_key(campaign_id: int) -> str:
    return f"pushsvc:campaign:{campaign_id}:state"


def set_flag(client: redis.Redis, campaign_id: int, state: str) -> None:
    client.set(flag_key(campaign_id), state, ex=30 * 24 * 3600)


def current_state(client: redis.Redis, campaign_id: int) -> str:
    """The campaign's state as shards see it; the database answers when the flag is missing."""
    raw = client.get(flag_key(campaign_id))
    if raw is not None:
        return raw.decode()
    status = Campaign.objects.filter(pk=campaign_id).values_list("status", flat=True).first() or CANCELLED
    set_flag(client, campaign_id, status)
    return status


def pause(
    client: redis.Redis,
    campaign_id: int,
    reason: str = "",
    *,
    to: str = PAUSED,
    resumes: int | None = None,
) -> bool:
    """Pause (or halt, with `to=HALTED`) a running campaign; False when it was not running, or
    when given `resumes` (the count its caller saw) and the campaign was resumed since."""
    running = Campaign.objects.filter(pk=campaign_id, status=RUNNING)
    if resumes is not None:
        running = running.filter(resumes=resumes)
    with transaction.atomic():
        changed = running.update(status=to, status_reason=reason)
        if changed:
            campaign_changed(campaign_id, to)  # the webhook event, in the same transaction
    if changed:
        set_flag(client, campaign_id, to)
        logger.warning("campaign %s %s: %s", campaign_id, to, reason or "by request")
    return bool(changed)


def resume(
    client: redis.Redis,
    campaign_id: int,
    *,
    confirm_prune: bool = False,
    halt_error_rate: float | None = None,
) -> None:
    """Resume a paused or halted campaign and re-enqueue its parked shards. A halted campaign
    halts again at its next shard unless `halt_error_rate` raises the limit."""
    updates: dict[str, object] = {"status": RUNNING, "status_reason": "", "resumes": F("resumes") + 1}
    if confirm_prune:
        updates["prune_confirmed"] = True
    if halt_error_rate is not None:
        updates["halt_error_rate"] = halt_error_rate
    changed = Campaign.objects.filter(pk=campaign_id, status__in=(PAUSED, HALTED)).update(**updates)
    if not changed:
        raise TransitionError("Only a paused or halted campaign can be resumed.")
    set_flag(client, campaign_id, RUNNING)
    app_id = Campaign.objects.filter(pk=campaign_id).values_list("app_id", flat=True).get()
    circuit = breaker.Breaker(client)
    for platform in Platform.values:
        circuit.rearm(app_id, platform)

    # A planner still at work keeps planning through a pause (its shards park themselves), and a
    # planner that died is redelivered by the broker: resuming never starts a second one.
    for shard_id, queue, lane in unpark_shards(campaign_id):
        publish.shard(shard_id, queue, lane)
    complete_if_done(client, campaign_id)


def unpark_shards(campaign_id: int, shard_id: int | None = None) -> list[tuple[int, str, int]]:
    """paused -> pending for the campaign's parked shards (or one); the ones this call moved, as
    (id, queue, lane)."""
    table = Shard._meta.db_table
    sql = f"UPDATE {table} SET status = %s WHERE campaign_id = %s AND status = %s"
    params: list[object] = [Shard.Status.PENDING, campaign_id, Shard.Status.PAUSED]
    if shard_id is not None:
        sql += " AND id = %s"
        params.append(shard_id)
    with connection.cursor() as cursor:
        cursor.execute(sql + " RETURNING id, queue, lane", params)
        return [(row[0], row[1], row[2]) for row in cursor.fetchall()]


def cancel(client: redis.Redis, campaign_id: int) -> None:
    now = timezone.now()
    with transaction.atomic():
        changed = (
            Campaign.objects.filter(pk=campaign_id)
            .exclude(status__in=Campaign.FINAL_STATUSES)
            .update(status=CANCELLED, finished_at=now)
        )
        if not changed:
            raise TransitionError("The campaign is already finished.")
        Shard.objects.filter(
            campaign_id=campaign_id, status__in=(Shard.Status.PENDING, Shard.Status.PAUSED)
        ).update(status=Shard.Status.CANCELLED)
    set_flag(client, campaign_id, CANCELLED)
    idempotency.expire(client, campaign_id)


def reset_keys(client: redis.Redis, campaign_id: int) -> None:
    """Forget Redis state left under this campaign id by an earlier database (a restored backup,
    the demo's fresh SQLite file): ids restart, Redis remembers. Called once, at launch."""
    stale = list(client.scan_iter(match=f"pushsvc:idem:{campaign_id}:*", count=1000))
    stale += guard_keys(campaign_id)
    client.delete(*stale)


def arm(client: redis.Redis, campaign_id: int, state: str = RUNNING) -> None:
    """At launch: forget what Redis kept under this id, then raise the flag shards will read."""
    reset_keys(client, campaign_id)
    set_flag(client, campaign_id, state)


def start(campaign_id: int) -> bool:
    """draft/scheduled -> running, holding one `outstanding` for the planner. False if not due."""
    now = timezone.now()
    return bool(
        Campaign.objects.filter(
            Q(send_at__isnull=True) | Q(send_at__lte=now),
            pk=campaign_id,
            status__in=(Campaign.Status.DRAFT, Campaign.Status.SCHEDULED),
        ).update(status=RUNNING, started_at=now, outstanding=1)
    )


def complete_if_done(client: redis.Redis, campaign_id: int) -> bool:
    """running with nothing outstanding -> completed; True only for the one caller that did it."""
    with transaction.atomic():
        done = Campaign.objects.filter(pk=campaign_id, status=RUNNING, outstanding=0).update(
            status=Campaign.Status.COMPLETED, finished_at=timezone.now()
        )
        if done:
            campaign_changed(campaign_id, Campaign.Status.COMPLETED)
    if done:
        set_flag(client, campaign_id, Campaign.Status.COMPLETED)
        idempotency.expire(client, campaign_id)
        logger.info("campaign %s completed", campaign_id)
    return bool(done)
