"""How a device looks in the API, and the documented shape of a registration.

The registration body is validated by `tokens.validation` (shared with `import_tokens` and
kept off DRF's serializer machinery for speed); `DeviceRegistrationSerializer` exists so the
OpenAPI schema describes it. Web Push subscription keys are never returned: `token` of a web
device is its endpoint only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rest_framework import serializers

from .models import DeviceToken, Platform

DEVICE_FIELDS = (
    "device_id",
    "platform",
    "token",
    "user_id",
    "app_version",
    "locale",
    "is_active",
    "deactivated_at",
    "deactivation_reason",
    "last_seen",
    "last_success_at",
    "created_at",
    "updated_at",
)


class DeviceSerializer(serializers.ModelSerializer):
    class Meta:
        model = DeviceToken
        fields = DEVICE_FIELDS
        read_only_fields = DEVICE_FIELDS


class WebPushKeysSerializer(serializers.Serializer):
    p256dh = serializers.CharField(help_text="base64url of the 65-byte uncompressed P-256 point")
    auth = serializers.CharField(help_text="base64url of the 16-byte auth secret")


class WebPushSubscriptionSerializer(serializers.Serializer):
    endpoint = serializers.URLField(help_text="https URL of an allowed push service")
    keys = WebPushKeysSerializer()


class DeviceRegistrationSerializer(serializers.Serializer):
    """Documentation of POST /api/v1/devices/. Unknown fields are ignored."""

    device_id = serializers.UUIDField(help_text="Client-generated UUID, stable per app install")
    platform = serializers.ChoiceField(choices=Platform.choices)
    token = serializers.JSONField(
        help_text=(
            "ios: APNs device token, 64-200 hex digits. android/huawei: FCM/HMS registration token, "
            "visible ASCII, at most 4096 bytes. web: the browser's PushSubscription object "
            '{"endpoint": "https://...", "keys": {"p256dh": "...", "auth": "..."}}.'
        )
    )
    user_id = serializers.CharField(required=False, allow_blank=True, max_length=255)
    app_version = serializers.CharField(required=False, allow_blank=True, max_length=32)
    locale = serializers.CharField(required=False, allow_blank=True, max_length=35, help_text="BCP 47 tag")


def iso(value: datetime | None) -> str | None:
    """The same text DRF's DateTimeField renders, so POST and GET answers match byte for byte."""
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def device_payload(**fields: Any) -> dict[str, Any]:
    """A device's API representation from plain values (the POST path has no model instance)."""
    return {
        "device_id": str(fields["device_id"]),
        "platform": fields["platform"],
        "token": fields["token"],
        "user_id": fields["user_id"],
        "app_version": fields["app_version"],
        "locale": fields["locale"],
        "is_active": fields["is_active"],
        "deactivated_at": iso(fields["deactivated_at"]),
        "deactivation_reason": fields["deactivation_reason"],
        "last_seen": iso(fields["last_seen"]),
        "last_success_at": iso(fields["last_success_at"]),
        "created_at": iso(fields["created_at"]),
        "updated_at": iso(fields["updated_at"]),
    }
