"""Campaigns, their shards and their per-reason tallies.

A campaign's counters are written only in bulk: each shard run adds its tallies with one
`UPDATE ... SET delivered = delivered + n, ...` (see campaigns/sending/ledger.py), never per token.
When a campaign is finished they add up:

    targeted = delivered + invalidated + invalid_kept + failed + expired + not_sent

where `not_sent` is what a cancel or a halt left unsent (see `Campaign.not_sent`). `invalidated`
counts tokens deactivated; `invalid_kept` invalid-token answers that deactivated nothing (an APNs
410 older than the token's last registration, a token rotated while the answer was on its way);
`expired` devices whose message TTL ran out before a retry could go.
`delivered_after_retry` and `skipped_duplicate` are parts of `delivered`: the second counts
devices delivered by a run that died before recording them, found in the idempotency bitmap by
the re-run and not sent again. `sent` counts provider requests (a retried device counts once per
attempt) and `retried` counts retry attempts scheduled.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from tokens.models import App, Platform


class Campaign(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft"
        SCHEDULED = "scheduled"
        RUNNING = "running"
        PAUSED = "paused"
        HALTED = "halted"
        CANCELLED = "cancelled"
        COMPLETED = "completed"
        FAILED = "failed"

    class Kind(models.TextChoices):
        BROADCAST = "broadcast"  # a segment, planned into range shards by a Celery task
        DIRECT = "direct"  # up to 10,000 listed users/devices, planned in the request, priority queue

    class CanaryPhase(models.TextChoices):
        """Where a campaign with a canary cohort stands (campaigns/canary.py); "" = no canary."""

        NONE = "", "no canary"
        PENDING = "pending"  # configured; the sample is drawn when planning starts
        SENDING = "sending"  # the sample's list shards are out; the rest is not planned
        WAITING = "waiting"  # the sample's shards are done; decided at canary_decide_at
        PASSED = "passed"  # error rate within the limit: the rest is planned
        FAILED = "failed"  # over the limit: the campaign was paused with the figures
        OVERRIDDEN = "overridden"  # failed, then resumed by an operator: the rest is planned

    FINAL_STATUSES = (Status.CANCELLED, Status.COMPLETED, Status.FAILED)

    app = models.ForeignKey(App, on_delete=models.CASCADE, related_name="campaigns")
    name = models.CharField(max_length=200, blank=True, default="")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.BROADCAST)
    # PushMessage.to_dict(): validated once at creation, rebuilt by every shard.
    message = models.JSONField()
    # {"platforms": [...], "user_ids": [...], "device_ids": [...], "min_app_version": "2.1",
    #  "max_app_version": "3", "active_within_days": 30}; {} = every active device of the app.
    target = models.JSONField(default=dict, blank=True)
    send_at = models.DateTimeField(null=True, blank=True)
    # Rollout: start at `rollout_start_rate` deliveries/s and ramp linearly to `rollout_max_rate`
    # over `rollout_ramp_minutes`. Null rates = as fast as the provider limit allows.
    rollout_start_rate = models.PositiveIntegerField(null=True, blank=True)
    rollout_max_rate = models.PositiveIntegerField(null=True, blank=True)
    rollout_ramp_minutes = models.PositiveIntegerField(default=0)
    halt_error_rate = models.FloatField(default=0.05)
    # Set by an operator who checked a mass-prune pause: invalid answers are applied from then on.
    prune_confirmed = models.BooleanField(default=False)
    # Counts resumes: a credentials pause decided from a chunk's answers applies only if no resume
    # came after the run that sent it loaded the campaign (a late answer must not undo the fix).
    resumes = models.PositiveIntegerField(default=0)
    # Canary cohort (campaigns/canary.py): {"size": n, "wait_s": s, "max_error_rate": r}; null = none.
    canary = models.JSONField(null=True, blank=True)
    canary_phase = models.CharField(max_length=16, choices=CanaryPhase.choices, blank=True, default="")
    # Set when the sample's last shard is recorded: that time + wait_s. The decision waits for it
    # (in PostgreSQL, so a worker crash or a lost message does not lose the wait).
    canary_decide_at = models.DateTimeField(null=True, blank=True)
    # {"sample": n, "target": N} at planning, plus the figures and the decision once decided.
    canary_result = models.JSONField(null=True, blank=True)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT)
    status_reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    targeted = models.BigIntegerField(default=0)
    sent = models.BigIntegerField(default=0)
    delivered = models.BigIntegerField(default=0)
    delivered_after_retry = models.BigIntegerField(default=0)
    retried = models.BigIntegerField(default=0)
    failed = models.BigIntegerField(default=0)
    invalidated = models.BigIntegerField(default=0)
    invalid_kept = models.BigIntegerField(default=0)
    expired = models.BigIntegerField(default=0)
    skipped_duplicate = models.BigIntegerField(default=0)
    # tokens.hygiene.stale_share_of(target) taken when planning starts (before the first send):
    # {"target", "unseen", "days", "share"}; a high share warns of a stale segment.
    stale_at_launch = models.JSONField(null=True, blank=True)

    # Completion bookkeeping: shards not yet done, plus one held by the planner while it plans.
    # The transaction that brings it to 0 (see campaigns/sending/ledger.py) completes the campaign.
    outstanding = models.BigIntegerField(default=0)
    planned = models.BooleanField(default=False)

    class Meta:
        ordering = ("-id",)
        indexes = [models.Index(fields=["status", "send_at"], name="campaign_due_idx")]

    def __str__(self) -> str:
        return f"campaign {self.pk} ({self.status})"

    @property
    def processed(self) -> int:
        return self.delivered + self.invalidated + self.invalid_kept + self.failed + self.expired

    @property
    def not_sent(self) -> int:
        return max(self.targeted - self.processed, 0)


class Shard(models.Model):
    """One unit of sending work: a keyset range `(lo, hi]` of one platform's device ids, or an
    explicit list of device ids (retries, held devices, direct sends). The broker message is
    only the shard's id.

    A range shard that stops early (pause) moves `lo` past what it finished, and a list shard
    drops what it finished, so a resumed shard re-sends nothing.
    """

    class Status(models.TextChoices):
        PENDING = "pending"  # enqueued, or about to be
        PAUSED = "paused"  # waiting for the campaign to resume
        DONE = "done"
        CANCELLED = "cancelled"

    class Lane(models.IntegerChoices):
        # Fair sharing of a provider queue (docs/architecture.md, "Fairness"): the first
        # CAMPAIGN_HEAD_DEVICES of each campaign and platform go out ahead of every broadcast's bulk.
        HEAD = 0
        BULK = 1

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="shards")
    platform = models.CharField(max_length=16, choices=Platform.choices)
    queue = models.CharField(max_length=32)
    lane = models.PositiveSmallIntegerField(choices=Lane.choices, default=Lane.HEAD)
    lo = models.BigIntegerField(null=True, blank=True)
    hi = models.BigIntegerField(null=True, blank=True)
    device_ids = models.JSONField(null=True, blank=True)
    attempt = models.PositiveSmallIntegerField(default=0)  # 0 = first send, n = n-th retry
    planned = models.PositiveIntegerField(default=0)  # devices counted into `targeted` at planning
    loaded = models.PositiveIntegerField(null=True, blank=True)  # devices its first run found
    is_child = models.BooleanField(default=False)  # a retry or held part of another shard
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField(default=timezone.now)
    not_before = models.DateTimeField(null=True, blank=True)
    # A retry's deadline: its parent's first send + the message's TTL (a TTL is absolute); null
    # for a shard whose devices were never sent, or a message without TTL.
    expires_at = models.DateTimeField(null=True, blank=True)
    # Runs that raised an unexpected exception; at SHARD_MAX_FAILURES the campaign halts with it.
    failures = models.PositiveSmallIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        indexes = [models.Index(fields=["campaign", "status"], name="shard_status_idx")]

    def __str__(self) -> str:
        where = f"({self.lo}, {self.hi}]" if self.device_ids is None else f"{len(self.device_ids)} ids"
        return f"shard {self.pk} {self.platform} {where} attempt {self.attempt}"

    @property
    def is_range(self) -> bool:
        return self.device_ids is None


class CanaryMember(models.Model):
    """One device of a campaign's canary sample. The rest of the campaign (its range shards,
    planned after the decision) leaves these out with an anti-join on the unique index, so a
    canary device is never sent twice, whatever its canary answer was (the idempotency bitmap
    only knows delivered devices, and lives in Redis)."""

    campaign = models.ForeignKey(
        Campaign, on_delete=models.CASCADE, related_name="canary_members", db_index=False
    )
    device_pk = models.BigIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["campaign", "device_pk"], name="uniq_canary_member")]

    def __str__(self) -> str:
        return f"campaign {self.campaign_id} canary device {self.device_pk}"


class OutcomeTally(models.Model):
    """How many devices of a campaign ended (or were retried) with each provider reason.

    Upserted with `count = count + EXCLUDED.count`, one statement per shard run.
    """

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="tallies")
    platform = models.CharField(max_length=16, choices=Platform.choices)
    outcome = models.CharField(max_length=24)  # delivery.providers.base.Outcome, or "dead_letter"
    reason = models.CharField(max_length=128)
    count = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["campaign", "platform", "outcome", "reason"], name="uniq_tally_per_reason"
            )
        ]

    def __str__(self) -> str:
        return f"{self.platform} {self.outcome} {self.reason}: {self.count}"


class DirectResult(models.Model):
    """A direct send's answer per device, with the provider's message id (apns-id, FCM message
    name, HMS requestId) to look a delivery up in the provider's own logs. Direct sends only
    (at most DIRECT_SEND_MAX_RECIPIENTS devices): a broadcast keeps counters, not rows."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="direct_results")
    device_pk = models.BigIntegerField()
    device_id = models.UUIDField(null=True, blank=True)
    platform = models.CharField(max_length=16, choices=Platform.choices)
    outcome = models.CharField(max_length=24)  # delivery.providers.base.Outcome, "dead_letter", "expired"
    reason = models.CharField(max_length=128, blank=True, default="")
    status = models.PositiveSmallIntegerField(null=True, blank=True)
    provider_message_id = models.CharField(max_length=200, blank=True, default="")
    attempt = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["campaign", "id"], name="directresult_campaign_idx")]

    def __str__(self) -> str:
        return f"{self.platform} device {self.device_pk}: {self.outcome}"


class CampaignSample(models.Model):
    """What a campaign's shard runs recorded during one interval, for the campaign page's chart
    (campaigns/series.py). One row per interval, not per shard or device: each shard run adds to
    its interval's row with one upsert. Intervals start `SAMPLE_BASE_S` wide and old ones are
    merged into wider ones, so a campaign keeps at most `SAMPLE_MAX_ROWS` rows however long it
    runs; the rows outlive the campaign (the chart of a finished campaign)."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="samples")
    start = models.BigIntegerField()  # UNIX seconds, a multiple of `width`
    width = models.PositiveIntegerField()  # seconds: SAMPLE_BASE_S * 2**k
    delivered = models.BigIntegerField(default=0)
    failed = models.BigIntegerField(default=0)  # rejected + dead-lettered
    invalid = models.BigIntegerField(default=0)  # invalid-token answers (deactivated or kept)
    retried = models.BigIntegerField(default=0)  # retry attempts scheduled
    expired = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["campaign", "start"], name="uniq_sample_interval")]

    def __str__(self) -> str:
        return f"campaign {self.campaign_id} @{self.start}+{self.width}s"


class VersionTally(models.Model):
    """A campaign's provider answers per platform and app version (DeviceToken.app_version):
    the campaign page's success by version and outcome share per provider. One upsert per shard
    run (a row per version present in the shard); the page shows the top versions, the rest
    folded into "other"."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="version_tallies")
    platform = models.CharField(max_length=16, choices=Platform.choices)
    app_version = models.CharField(max_length=32, blank=True, default="")
    outcome = models.CharField(max_length=24)  # delivery.providers.base.Outcome: the provider's answer
    count = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["campaign", "platform", "app_version", "outcome"], name="uniq_version_tally"
            )
        ]

    def __str__(self) -> str:
        return f"{self.platform} {self.app_version or '?'} {self.outcome}: {self.count}"


class IdempotencyKey(models.Model):
    """One `Idempotency-Key` of an app's POST /api/v1/notifications/ or /campaigns/ (campaigns/
    idempotent.py): the request's fingerprint and, once answered, the answer replayed to every
    retry within IDEMPOTENCY_TTL_S. The unique (app, key) is what makes two concurrent duplicates
    one send: the second INSERT finds the first's row and never runs the request."""

    app = models.ForeignKey(App, on_delete=models.CASCADE, related_name="idempotency_keys")
    key = models.CharField(max_length=255)
    # sha256 of the endpoint and the canonical JSON body: the same key with another body is a 422.
    fingerprint = models.CharField(max_length=64)
    # The request that claimed the key; only it records the answer (a stale claim can be taken over).
    owner = models.UUIDField()
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    # While in progress: after this a claim that created nothing is taken over by a retry, and one
    # that created its campaign is answered from it.
    locked_until = models.DateTimeField(null=True, blank=True)
    campaign = models.ForeignKey(Campaign, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)  # null: in progress
    response = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["app", "key"], name="uniq_idempotency_key_per_app")]
        indexes = [models.Index(fields=["expires_at"], name="idempotency_expiry_idx")]

    def __str__(self) -> str:
        return f"app {self.app_id} key {self.key!r} ({self.status_code or 'in progress'})"
