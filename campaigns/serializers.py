"""Validation of campaign and direct-send requests, and the campaign's public representation."""

from __future__ import annotations

import re
from typing import Any

import redis
from django.conf import settings
from rest_framework import serializers

from campaigns.fanout import progress
from campaigns.models import Campaign
from delivery.payload import PayloadError, PushMessage
from tokens import hygiene
from tokens.models import Platform

VERSION_RE = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9}){0,3}$")
MAX_TARGET_USER_IDS = 100_000


def validate_message(raw: Any, platforms: list[str]) -> dict[str, Any]:
    """PushMessage.from_dict + check_fits, as a 400 that names the field."""
    try:
        message = PushMessage.from_dict(raw)
        message.check_fits(platforms)
    except PayloadError as exc:
        raise serializers.ValidationError({exc.field: [exc.message]}) from None
    return message.to_dict()


class RolloutSerializer(serializers.Serializer):
    start_rate = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    max_rate = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    ramp_minutes = serializers.IntegerField(min_value=0, max_value=7 * 24 * 60, default=0)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        start, top = attrs.get("start_rate"), attrs.get("max_rate")
        if start and top and start > top:
            raise serializers.ValidationError({"start_rate": ["must not exceed max_rate"]})
        return attrs


class TargetSerializer(serializers.Serializer):
    platforms = serializers.ListField(
        child=serializers.ChoiceField(choices=Platform.values), required=False, allow_empty=False
    )
    user_ids = serializers.ListField(
        child=serializers.CharField(max_length=255),
        required=False,
        allow_empty=False,
        max_length=MAX_TARGET_USER_IDS,
    )
    min_app_version = serializers.RegexField(VERSION_RE, required=False)
    max_app_version = serializers.RegexField(VERSION_RE, required=False)
    active_within_days = serializers.IntegerField(min_value=1, max_value=3650, required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("min_app_version") or attrs.get("max_app_version"):
            from django.db import connection

            if connection.vendor != "postgresql":
                raise serializers.ValidationError(
                    {"min_app_version": ["app version ranges need PostgreSQL (DATABASE_URL)"]}
                )
        return attrs


class CampaignCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    message = serializers.JSONField()
    target = TargetSerializer(required=False)
    send_at = serializers.DateTimeField(required=False, allow_null=True)
    rollout = RolloutSerializer(required=False)
    halt_error_rate = serializers.FloatField(min_value=0.0, max_value=1.0, default=0.05)
    draft = serializers.BooleanField(default=False, help_text="create without launching")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        platforms = (attrs.get("target") or {}).get("platforms") or list(Platform.values)
        attrs["message"] = validate_message(attrs["message"], platforms)
        return attrs

    def create(self, validated: dict[str, Any]) -> Campaign:
        rollout = validated.get("rollout") or {}
        status = Campaign.Status.DRAFT
        return Campaign.objects.create(
            app=self.context["app"],
            name=validated.get("name", ""),
            message=validated["message"],
            target=dict(validated.get("target") or {}),
            send_at=validated.get("send_at"),
            rollout_start_rate=rollout.get("start_rate"),
            rollout_max_rate=rollout.get("max_rate"),
            rollout_ramp_minutes=rollout.get("ramp_minutes", 0),
            halt_error_rate=validated["halt_error_rate"],
            status=status,
        )


class DirectSendSerializer(serializers.Serializer):
    message = serializers.JSONField()
    user_ids = serializers.ListField(child=serializers.CharField(max_length=255), required=False)
    device_ids = serializers.ListField(child=serializers.UUIDField(), required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        users, devices = attrs.get("user_ids"), attrs.get("device_ids")
        if bool(users) == bool(devices):
            raise serializers.ValidationError("Give exactly one of user_ids or device_ids (non-empty).")
        limit = settings.DIRECT_SEND_MAX_RECIPIENTS
        recipients = users or devices
        if len(recipients) > limit:
            field = "user_ids" if users else "device_ids"
            raise serializers.ValidationError(
                {
                    field: [
                        f"at most {limit} recipients per direct send (got {len(recipients)}); use a campaign"
                    ]
                }
            )
        attrs["message"] = validate_message(attrs["message"], list(Platform.values))
        return attrs


class ResumeSerializer(serializers.Serializer):
    confirm_prune = serializers.BooleanField(
        default=False, help_text="the mass-prune guard's invalid answers are real: apply them"
    )
    halt_error_rate = serializers.FloatField(
        min_value=0.0, max_value=1.0, required=False, help_text="a new limit, to resume a halted campaign"
    )


def _spikes(campaign_id: int) -> dict[str, dict[str, Any]] | None:
    """None while Redis is unreachable: the campaign's own counters still answer."""
    try:
        spikes = hygiene.spike_status(campaign_id)
    except redis.RedisError:
        return None
    return {
        provider: {"window_sent": s.window_sent, "window_invalid": s.window_invalid, "flagged": s.flagged}
        for provider, s in spikes.items()
    }


def represent(campaign: Campaign) -> dict[str, Any]:
    counters = {
        name: getattr(campaign, name)
        for name in (
            "targeted",
            "sent",
            "delivered",
            "delivered_after_retry",
            "retried",
            "failed",
            "invalidated",
            "skipped_duplicate",
        )
    }
    counters["not_sent"] = campaign.not_sent if campaign.status in Campaign.FINAL_STATUSES else 0
    return {
        "id": campaign.pk,
        "name": campaign.name,
        "kind": campaign.kind,
        "status": campaign.status,
        "status_reason": campaign.status_reason,
        "message": campaign.message,
        "target": campaign.target,
        "send_at": campaign.send_at,
        "rollout": {
            "start_rate": campaign.rollout_start_rate,
            "max_rate": campaign.rollout_max_rate,
            "ramp_minutes": campaign.rollout_ramp_minutes,
        },
        "halt_error_rate": campaign.halt_error_rate,
        "created_at": campaign.created_at,
        "started_at": campaign.started_at,
        "finished_at": campaign.finished_at,
        "counters": counters,
        "progress": progress(campaign),
        "hygiene": {
            "stale_at_launch": campaign.stale_at_launch,
            # Per provider: invalid answers among the first HYGIENE_SPIKE_WINDOW sends; flagged
            # when over HYGIENE_SPIKE_SHARE (tokens/hygiene.py record_sends).
            "invalid_spike": _spikes(campaign.pk),
        },
        "failures": [
            {"platform": t.platform, "outcome": t.outcome, "reason": t.reason, "count": t.count}
            for t in campaign.tallies.order_by("-count")[:50]
        ],
    }
