"""Validation of campaign and direct-send requests, and the campaign's public representation.

The message of both requests is validated by `PushMessage.from_dict` alone; `PushMessageSerializer`
only describes it in the OpenAPI schema (its limits are payload.py's constants), and
`CampaignSerializer` describes what `represent` returns.
"""

from __future__ import annotations

import re
import typing
from datetime import timedelta
from typing import Any

import redis
from django.conf import settings
from django.core.validators import MaxLengthValidator, RegexValidator
from django.utils import timezone
from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from campaigns import canary
from campaigns.models import Campaign
from campaigns.topics import DEFAULT_PLATFORMS as TOPIC_DEFAULT_PLATFORMS
from campaigns.topics import PLATFORMS as TOPIC_PLATFORMS
from campaigns.topics import check_fits as topic_check_fits
from delivery import payload, topics
from delivery.payload import PayloadError, PushMessage
from tokens import hygiene
from tokens.models import Platform

VERSION_RE = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9}){0,3}$")
MAX_TARGET_USER_IDS = 100_000
# Rollout rates are PositiveIntegerField: a larger one failed in PostgreSQL's integer column, a 500.
MAX_RATE = 2**31 - 1
SINGLE_LINE = r"^[^\r\n]*$"
# The schema's approximation of payload.py's rules (the server's check is the authority): header
# fields printable ASCII, identifiers without control characters, urls http(s).
HEADER_TEXT = r"^[\x20-\x7e]*$"
NO_CONTROLS = r"^[^\x00-\x1f\x7f-\x9f]*$"


class LocalizationSerializer(serializers.Serializer):
    """One language's text (schema only): what it sets replaces the default title or body."""

    # Absent, null and "" all mean none. The patterns admit "": allow_blank would add a oneOf branch
    # that "" matches too, which makes "" invalid against the schema.
    title = serializers.RegexField(SINGLE_LINE, max_length=payload.TITLE_MAX, required=False, allow_null=True)
    body = serializers.CharField(
        max_length=payload.BODY_MAX_BYTES,
        required=False,
        allow_blank=True,
        allow_null=True,
        help_text=f"at most {payload.BODY_MAX_BYTES} bytes of UTF-8; may hold newlines",
    )


class PushMessageSerializer(LocalizationSerializer):
    """The message, as PushMessage.from_dict accepts it (schema only: validate_message validates). Rules
    a schema cannot state: a visible message needs a title, body, badge or sound; a silent one has
    none of them; the message must fit each targeted provider's 4 KB with an empty body (a longer
    body is cut, ending in "…", and data.pushsvc_truncated is set)."""

    data = serializers.DictField(
        child=serializers.CharField(allow_blank=True),
        required=False,
        validators=[MaxLengthValidator(payload.DATA_MAX_KEYS)],
        help_text=(
            f"string values under keys of at most {payload.SHORT_TEXT_MAX} characters; reserved: "
            f"{', '.join(sorted(payload.RESERVED_DATA_KEYS))} and keys starting with google or gcm, "
            "and url/image when the message sets that field"
        ),
    )
    badge = serializers.IntegerField(min_value=0, max_value=2**31 - 1, required=False, allow_null=True)
    sound = serializers.RegexField(
        NO_CONTROLS, max_length=payload.SHORT_TEXT_MAX, required=False, allow_null=True
    )
    category = serializers.RegexField(
        NO_CONTROLS, max_length=payload.SHORT_TEXT_MAX, required=False, allow_null=True
    )
    thread_id = serializers.RegexField(
        NO_CONTROLS, max_length=payload.SHORT_TEXT_MAX, required=False, allow_null=True
    )
    image = serializers.RegexField(
        r"^(https?://\S*)?$",
        max_length=payload.URL_MAX,
        required=False,
        allow_null=True,
        help_text="an http(s) URL the device fetches",
    )
    url = serializers.RegexField(
        r"^(https?://[^\s\x00-\x1f\x7f-\x9f]+)?$",
        max_length=payload.URL_MAX,
        required=False,
        allow_null=True,
        help_text="opened on tap: an http(s) URL without spaces or control characters (app links go in data)",
    )
    collapse_key = serializers.RegexField(
        HEADER_TEXT,
        max_length=payload.COLLAPSE_KEY_MAX_BYTES,
        required=False,
        allow_null=True,
        help_text=f"printable ASCII (sent as an HTTP header), at most {payload.COLLAPSE_KEY_MAX_BYTES} bytes",
    )
    priority = serializers.ChoiceField(choices=typing.get_args(payload.Priority), default="high")
    ttl = serializers.IntegerField(
        min_value=0,
        max_value=payload.TTL_MAX,
        required=False,
        allow_null=True,
        help_text="seconds the provider may keep trying; null: the provider's default",
    )
    silent = serializers.BooleanField(default=False, help_text="background (data-only) push")
    mutable_content = serializers.BooleanField(default=False)
    message_id = serializers.RegexField(
        rf"^{payload.MESSAGE_ID_RE.pattern}$",
        required=False,
        allow_null=True,
        help_text="sent to the app in data.pushsvc_message_id; generated when absent",
    )
    localizations = serializers.DictField(
        child=LocalizationSerializer(),
        required=False,
        validators=[MaxLengthValidator(payload.LOCALIZATIONS_MAX)],
        help_text=(
            'language tag ("fr", "pt-BR") -> its title and/or body, chosen per device by its locale '
            "with language fallback (pt-BR, then pt, then the default text); each language is checked "
            "like the default text, sizes included. Not for topic sends."
        ),
    )


@extend_schema_field(PushMessageSerializer)
class MessageField(serializers.JSONField):
    """Any JSON here; the serializer's validate() hands it to PushMessage.from_dict."""


def validate_message(raw: Any, platforms: list[str]) -> dict[str, Any]:
    """PushMessage.from_dict + check_fits, as a 400 that names the field."""
    try:
        message = PushMessage.from_dict(raw)
        message.check_fits(platforms)
    except PayloadError as exc:
        raise serializers.ValidationError({exc.field: [exc.message]}) from None
    return message.to_dict()


class RolloutSerializer(serializers.Serializer):
    start_rate = serializers.IntegerField(
        min_value=1,
        max_value=MAX_RATE,
        required=False,
        allow_null=True,
        help_text="deliveries/s at launch; null: as fast as the provider limit allows",
    )
    max_rate = serializers.IntegerField(
        min_value=1,
        max_value=MAX_RATE,
        required=False,
        allow_null=True,
        help_text="deliveries/s reached after ramp_minutes; not below start_rate",
    )
    ramp_minutes = serializers.IntegerField(min_value=0, max_value=7 * 24 * 60, default=0)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        start, top = attrs.get("start_rate"), attrs.get("max_rate")
        if start and top and start > top:
            raise serializers.ValidationError({"start_rate": ["must not exceed max_rate"]})
        return attrs


def user_id_field() -> serializers.CharField:
    # min_length and the pattern only state in the schema what the blank check (which comes first,
    # after trimming whitespace) refuses.
    return serializers.CharField(max_length=255, min_length=1, validators=[RegexValidator(r"\S")])


class TargetSerializer(serializers.Serializer):
    # min_length only puts minItems in the schema: allow_empty=False refuses [] first, in its words.
    platforms = serializers.ListField(
        child=serializers.ChoiceField(choices=Platform.values),
        required=False,
        allow_empty=False,
        min_length=1,
    )
    user_ids = serializers.ListField(
        child=user_id_field(),
        required=False,
        allow_empty=False,
        min_length=1,
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


class CanarySerializer(serializers.Serializer):
    """A canary cohort (campaigns/canary.py): a random sample of the target is sent first; the
    rest goes only if the sample's error rate is within `max_error_rate`, else the campaign pauses."""

    size = serializers.IntegerField(
        min_value=1,
        max_value=canary.MAX_SIZE,
        default=canary.DEFAULT_SIZE,
        help_text="devices in the random sample sent first (the whole target if it is smaller)",
    )
    wait_s = serializers.IntegerField(
        min_value=0,
        max_value=canary.MAX_WAIT_S,
        default=0,
        help_text="seconds to wait after the sample's last answer before deciding",
    )
    max_error_rate = serializers.FloatField(
        min_value=0.0,
        max_value=1.0,
        default=canary.DEFAULT_MAX_ERROR_RATE,
        help_text="pause when (failed + invalidated + invalid_kept + expired) / answered devices of the "
        "sample exceeds this",
    )


class CampaignCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    message = MessageField()
    target = TargetSerializer(required=False)
    send_at = serializers.DateTimeField(
        required=False, allow_null=True, help_text="launch at this time (status scheduled until then)"
    )
    rollout = RolloutSerializer(required=False)
    halt_error_rate = serializers.FloatField(min_value=0.0, max_value=1.0, default=0.05)
    draft = serializers.BooleanField(default=False, help_text="create without launching")
    canary = CanarySerializer(required=False, help_text="send to a random sample first; broadcasts only")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        platforms = (attrs.get("target") or {}).get("platforms") or list(Platform.values)
        attrs["message"] = validate_message(attrs["message"], platforms)
        return attrs

    def create(self, validated: dict[str, Any]) -> Campaign:
        rollout = validated.get("rollout") or {}
        cohort = validated.get("canary")
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
            canary=dict(cohort) if cohort else None,
            canary_phase=Campaign.CanaryPhase.PENDING if cohort else Campaign.CanaryPhase.NONE,
            status=status,
        )


def _max_recipients() -> int:
    # Read per request (and per schema), not at import, so that a changed setting applies to both.
    return settings.DIRECT_SEND_MAX_RECIPIENTS


def _recipients_limit() -> MaxLengthValidator:
    # A MaxLengthValidator, so that the schema states the limit as maxItems.
    return MaxLengthValidator(
        _max_recipients,
        message="at most %(limit_value)s recipients per direct send (got %(show_value)s); use a campaign",
    )


class DirectSendSerializer(serializers.Serializer):
    message = MessageField()
    user_ids = serializers.ListField(
        child=user_id_field(),
        required=False,
        validators=[_recipients_limit()],
        help_text="every active device of these users; give this or device_ids",
    )
    device_ids = serializers.ListField(
        child=serializers.UUIDField(),
        required=False,
        validators=[_recipients_limit()],
        help_text="these devices (the device_id they registered with); give this or user_ids",
    )

    topic = serializers.CharField(
        required=False,
        max_length=len(topics.TOPIC_PREFIX) + topics.TOPIC_MAX,
        help_text=(
            "send to a topic's subscribers through the provider (FCM, HMS) instead of listed devices: "
            "letters, digits and - _ . ~ %, the /topics/ prefix optional"
        ),
    )
    condition = serializers.CharField(
        required=False,
        max_length=topics.CONDITION_MAX,
        help_text=(
            f"send to a condition over topics, e.g. \"'dogs' in topics && !('cats' in topics)\": "
            f"&&, ||, ! and parentheses, at most {topics.CONDITION_MAX_TOPICS} topics"
        ),
    )
    platforms = serializers.ListField(
        child=serializers.ChoiceField(choices=list(TOPIC_PLATFORMS)),
        required=False,
        allow_empty=False,
        min_length=1,
        help_text="topic and condition sends only: android (FCM, the default) and/or huawei (HMS)",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.initial_data, dict) and "canary" in self.initial_data:
            # Not a field (absent from the schema), but said rather than silently ignored.
            raise serializers.ValidationError(
                {"canary": ["only broadcast campaigns (POST /api/v1/campaigns/) take a canary"]}
            )
        given = [name for name in ("user_ids", "device_ids", "topic", "condition") if attrs.get(name)]
        if len(given) != 1:
            raise serializers.ValidationError(
                "Give exactly one of user_ids or device_ids (non-empty), or a topic or a condition."
            )
        if given[0] in ("topic", "condition"):
            return self._validate_topic_send(attrs, given[0])
        if attrs.get("platforms"):
            raise serializers.ValidationError(
                {"platforms": ["applies to topic and condition sends (devices have their own platform)"]}
            )
        attrs["message"] = validate_message(attrs["message"], list(Platform.values))
        return attrs

    def _validate_topic_send(self, attrs: dict[str, Any], kind: str) -> dict[str, Any]:
        try:
            if kind == "topic":
                attrs["topic"] = topics.normalize_topic(attrs["topic"])
            else:
                topics.condition_topics(attrs["condition"])
        except topics.TopicError as exc:
            raise serializers.ValidationError({kind: [str(exc)]}) from None
        if isinstance(attrs["message"], dict) and attrs["message"].get("localizations"):
            raise serializers.ValidationError(
                {
                    "localizations": [
                        "a topic send has no device to choose a language for: send one topic per language"
                    ]
                }
            )
        platforms = list(dict.fromkeys(attrs.get("platforms") or TOPIC_DEFAULT_PLATFORMS))
        attrs["platforms"] = platforms
        attrs["message"] = validate_message(attrs["message"], platforms)
        try:
            topic_check_fits(attrs["message"], platforms)
        except PayloadError as exc:
            raise serializers.ValidationError({exc.field: [exc.message]}) from None
        return attrs


class DirectSendSchema(OpenApiSerializerExtension):
    """Adds to DirectSendSerializer's schema the rule its validate() applies: exactly one of
    user_ids, device_ids, topic and condition is given non-empty (drf-spectacular registers this
    on import)."""

    target_class = DirectSendSerializer

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        schema = super().map_serializer(auto_schema, direction)
        schema["oneOf"] = [
            *(
                {"required": [name], "properties": {name: {"minItems": 1}}}
                for name in ("user_ids", "device_ids")
            ),
            *(
                {"required": [name], "properties": {name: {"minLength": 1}}}
                for name in ("topic", "condition")
            ),
        ]
        return schema


class ResumeSerializer(serializers.Serializer):
    confirm_prune = serializers.BooleanField(
        default=False, help_text="the mass-prune guard's invalid answers are real: apply them"
    )
    halt_error_rate = serializers.FloatField(
        min_value=0.0, max_value=1.0, required=False, help_text="a new limit, to resume a halted campaign"
    )


class StoredTargetSerializer(TargetSerializer):
    device_ids = serializers.ListField(child=serializers.UUIDField(), required=False)
    topic = serializers.CharField(required=False, help_text="a topic send's topic")
    condition = serializers.CharField(required=False, help_text="a condition send's condition")


class CountersSerializer(serializers.Serializer):
    """When the campaign is finished: targeted = delivered + invalidated + invalid_kept + failed
    + expired + not_sent (campaigns/models.py)."""

    targeted = serializers.IntegerField(help_text="devices planned")
    sent = serializers.IntegerField(help_text="provider requests (a retried device counts per attempt)")
    delivered = serializers.IntegerField()
    delivered_after_retry = serializers.IntegerField(help_text="part of delivered")
    retried = serializers.IntegerField(help_text="retry attempts scheduled")
    failed = serializers.IntegerField()
    invalidated = serializers.IntegerField(help_text="tokens the provider called dead, now deactivated")
    invalid_kept = serializers.IntegerField(
        help_text="invalid-token answers that deactivated nothing: an APNs 410 older than the token's "
        "last registration, or a token rotated meanwhile"
    )
    expired = serializers.IntegerField(help_text="not retried: the message's TTL ran out first")
    skipped_duplicate = serializers.IntegerField(
        help_text="part of delivered: delivered by a worker that died before recording it, not sent again"
    )
    not_sent = serializers.IntegerField(help_text="left unsent by a cancel or a halt; 0 until finished")


class ProgressSerializer(serializers.Serializer):
    elapsed_s = serializers.FloatField()
    rate_per_s = serializers.FloatField(help_text="devices done per second since the start")
    remaining = serializers.IntegerField()
    eta = serializers.DateTimeField(allow_null=True, help_text="while running, once the rate is known")


class StaleShareSerializer(serializers.Serializer):
    target = serializers.IntegerField(help_text="active devices in the target")
    unseen = serializers.IntegerField(help_text="of which not seen for `days` days")
    days = serializers.IntegerField()
    share = serializers.FloatField()


class SpikeSerializer(serializers.Serializer):
    window_sent = serializers.IntegerField()
    window_invalid = serializers.IntegerField()
    flagged = serializers.BooleanField()


class CampaignHygieneSerializer(serializers.Serializer):
    stale_at_launch = StaleShareSerializer(allow_null=True, help_text="taken when planning starts")
    invalid_spike = serializers.DictField(
        child=SpikeSerializer(),
        allow_null=True,
        help_text="per provider (apns, fcm, hms, webpush) with sends; null while Redis is unreachable",
    )


class FailureSerializer(serializers.Serializer):
    platform = serializers.ChoiceField(choices=Platform.choices)
    outcome = serializers.CharField()
    reason = serializers.CharField()
    count = serializers.IntegerField()


class CanaryFiguresSerializer(serializers.Serializer):
    """The sample's devices by outcome at the decision; error_rate = errors / answered."""

    delivered = serializers.IntegerField()
    failed = serializers.IntegerField(help_text="rejected or dead-lettered")
    invalidated = serializers.IntegerField()
    invalid_kept = serializers.IntegerField()
    expired = serializers.IntegerField()
    errors = serializers.IntegerField(help_text="failed + invalidated + invalid_kept + expired")
    answered = serializers.IntegerField(help_text="delivered + errors")
    error_rate = serializers.FloatField()


class CanaryStatusSerializer(CanarySerializer):
    phase = serializers.ChoiceField(
        choices=[p for p in Campaign.CanaryPhase.values if p],
        help_text="pending, sending (sample out), waiting (until decide_at), passed (the rest planned), "
        "failed (paused), overridden (failed, then resumed)",
    )
    sample = serializers.IntegerField(allow_null=True, help_text="devices drawn; null until planning")
    decide_at = serializers.DateTimeField(allow_null=True, help_text="the sample's last answer + wait_s")
    figures = CanaryFiguresSerializer(allow_null=True, help_text="once decided")
    decision = serializers.ChoiceField(choices=["continue", "pause"], allow_null=True)
    decided_at = serializers.DateTimeField(allow_null=True)
    resumed_at = serializers.DateTimeField(allow_null=True, help_text="an operator resumed a failed canary")


class CampaignSerializer(serializers.Serializer):
    """What `represent` returns (schema only; tests/test_openapi_schema.py checks real answers)."""

    id = serializers.IntegerField()
    name = serializers.CharField(allow_blank=True)
    kind = serializers.ChoiceField(choices=Campaign.Kind.values)
    status = serializers.ChoiceField(choices=Campaign.Status.values)
    status_reason = serializers.CharField(allow_blank=True, help_text="why it paused, halted or failed")
    message = PushMessageSerializer()
    target = StoredTargetSerializer()
    send_at = serializers.DateTimeField(allow_null=True)
    rollout = RolloutSerializer()
    halt_error_rate = serializers.FloatField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    counters = CountersSerializer()
    progress = ProgressSerializer()
    hygiene = CampaignHygieneSerializer()
    failures = FailureSerializer(many=True, help_text="the 50 most frequent outcomes by reason")
    canary = CanaryStatusSerializer(allow_null=True, help_text="null: no canary cohort")


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
            "invalid_kept",
            "expired",
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
        "canary": canary.status_of(campaign),
    }


def progress(campaign: Campaign) -> dict[str, object]:
    """Rate (deliveries/s since start) and ETA for the API and the admin."""
    now = timezone.now()
    end = campaign.finished_at or now
    elapsed = (end - campaign.started_at).total_seconds() if campaign.started_at else 0.0
    done = campaign.processed
    rate = done / elapsed if elapsed > 0 else 0.0
    remaining = max(campaign.targeted - done, 0)
    eta = None
    if campaign.status == Campaign.Status.RUNNING and rate > 0:
        eta = (now + timedelta(seconds=remaining / rate)).isoformat()
    return {"elapsed_s": round(elapsed, 3), "rate_per_s": round(rate, 1), "remaining": remaining, "eta": eta}
