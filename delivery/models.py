"""Delivery-side records an operator queries: the dead letters."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from tokens.models import Platform


class DeadLetter(models.Model):
    """A device that still answered a transient error after the last allowed attempt.

    The device is referenced by plain ids, not a foreign key: the registry deletes moved tokens
    with plain SQL (tokens/registry.py) and a dead letter must outlive its token for the audit.
    """

    campaign = models.ForeignKey("campaigns.Campaign", on_delete=models.CASCADE, related_name="dead_letters")
    device_pk = models.BigIntegerField()
    device_id = models.UUIDField(null=True, blank=True)
    platform = models.CharField(max_length=16, choices=Platform.choices)
    reason = models.CharField(max_length=128)
    status = models.PositiveSmallIntegerField(null=True, blank=True)  # last HTTP status, if any
    attempts = models.PositiveSmallIntegerField()
    provider_message_id = models.CharField(max_length=200, blank=True, default="")  # apns-id, FCM name
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("-id",)
        indexes = [models.Index(fields=["campaign", "platform"], name="deadletter_campaign_idx")]

    def __str__(self) -> str:
        return f"dead letter {self.platform} device {self.device_pk}: {self.reason}"
