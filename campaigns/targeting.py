"""Who a campaign reaches: its segment as a queryset, its platforms, and the queue per platform.

Planning (campaigns/planning.py) cuts the segment into shards and the shard run
(campaigns/sending/run.py) loads a shard's range through the same queryset, so both apply
exactly the same filters.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from campaigns.models import Campaign, Shard
from delivery.providers.registry import provider_class
from tokens.models import DeviceToken, Platform

PRIORITY_QUEUE = "priority"  # direct sends; every send worker also serves it
_VERSION_RE = r"^[0-9]{1,9}(\.[0-9]{1,9}){0,3}$"


def target_queryset(campaign: Campaign) -> QuerySet[DeviceToken]:
    """The campaign's active devices (all platforms); see Campaign.target for the keys."""
    qs = DeviceToken.objects.filter(app_id=campaign.app_id, is_active=True)
    target = campaign.target or {}
    if target.get("platforms"):
        qs = qs.filter(platform__in=target["platforms"])
    if target.get("user_ids"):
        qs = qs.filter(user_id__in=target["user_ids"])
    if target.get("device_ids"):
        qs = qs.filter(device_id__in=target["device_ids"])
    if target.get("active_within_days"):
        # Fixed at the campaign's start so every shard applies the same cut.
        since = (campaign.started_at or timezone.now()) - timedelta(days=int(target["active_within_days"]))
        qs = qs.filter(last_seen__gte=since)
    for key, op in (("min_app_version", ">="), ("max_app_version", "<=")):
        if target.get(key):
            # Numeric, component-wise (2.10 > 2.9). Versions that are not dotted numbers never match.
            qs = qs.extra(
                where=[
                    f"(CASE WHEN app_version ~ %s THEN string_to_array(app_version, '.')::int[] END) "
                    f"{op} %s::int[]"
                ],
                params=[_VERSION_RE, [int(p) for p in str(target[key]).split(".")]],
            )
    return qs


def target_platforms(campaign: Campaign) -> list[str]:
    """The platforms the campaign targets, in the registry's order (planning walks them in turn)."""
    wanted = (campaign.target or {}).get("platforms") or [p.value for p in Platform]
    return [p for p in Platform.values if p in wanted]


def queue_for(campaign: Campaign, platform: str) -> str:
    """The Celery queue of the campaign's shards on `platform`: the provider's, or `priority`."""
    if campaign.kind == Campaign.Kind.DIRECT:
        return PRIORITY_QUEUE
    return provider_class(platform).queue


def list_shards(campaign: Campaign, devices: Iterable[tuple[str, int]]) -> list[Shard]:
    """Unsaved list shards for explicit (platform, device id) pairs (a direct send, a canary
    sample): per platform, in slices of CAMPAIGN_SHARD_SIZE, on the platform's queue."""
    size = settings.CAMPAIGN_SHARD_SIZE
    by_platform: dict[str, list[int]] = {}
    for platform, pk in devices:
        by_platform.setdefault(platform, []).append(pk)
    return [
        Shard(
            campaign_id=campaign.pk,
            platform=platform,
            queue=queue_for(campaign, platform),
            device_ids=ids[i : i + size],
            planned=len(ids[i : i + size]),
        )
        for platform, ids in sorted(by_platform.items())
        for i in range(0, len(ids), size)
    ]
