"""One declaration per provider: its platform, name (metric label, audit rows), Celery queue
and adapter. Lists of platforms, queues and adapters elsewhere
(settings, the registry, the ledger) are derived from `SPECS`; adding a provider is an adapter
module and one line here. Plain data, importable by settings before Django is set up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    platform: str  # tokens.models.Platform value
    name: str  # metric label and the `provider` of audit rows
    queue: str  # Celery queue of its send tasks (the adapter's `queue`)
    adapter: str  # "module:Class", imported on first use (delivery/providers/registry.py)


_PROVIDERS = "delivery.providers"
SPECS: tuple[ProviderSpec, ...] = (
    ProviderSpec("ios", "apns", "apns", f"{_PROVIDERS}.apns:ApnsProvider"),
    ProviderSpec("android", "fcm", "fcm", f"{_PROVIDERS}.fcm:FcmProvider"),
    ProviderSpec("huawei", "hms", "hms", f"{_PROVIDERS}.hms:HmsProvider"),
    ProviderSpec("web", "webpush", "webpush", f"{_PROVIDERS}.webpush:WebPushProvider"),
)
BY_PLATFORM: dict[str, ProviderSpec] = {spec.platform: spec for spec in SPECS}


def provider_name(platform: str) -> str:
    """The provider's name for a platform (metrics, audit rows); the platform itself if unknown."""
    spec = BY_PLATFORM.get(platform)
    return spec.name if spec else platform
