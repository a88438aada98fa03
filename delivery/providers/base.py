"""The provider adapter interface and the normalized result every adapter returns.

Callers (the fan-out, direct sends, tests) only ever see `Target`, `PushMessage` and `Result`;
provider formats stay inside the adapter modules.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar, TypeVar

if TYPE_CHECKING:
    from delivery.engine import Engine
    from delivery.payload import PushMessage
    from tokens.models import App


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"  # transient: try again later (see Result.retry_after)
    INVALID_TOKEN = "invalid_token"  # unambiguous: the token is dead, prune it
    REJECTED = "rejected"  # our request is wrong: keep the token, do not retry
    AUTH_FAILURE = "auth_failure"  # credentials: pause the adapter, never touch tokens


# Target kinds that are not a device: the provider fans the message out to a topic's subscribers,
# or to a condition over topics (delivery/topics.py). FCM and HMS only (`Provider.topics`).
TOPIC = "topic"
CONDITION = "condition"
TOPIC_KINDS = frozenset({TOPIC, CONDITION})


@dataclass(slots=True)
class Target:
    """Where one push goes: a DeviceToken row, reduced to what a provider call needs.

    `kind` leaves room for targets that are not registration tokens (e.g. FCM's Firebase
    Installation ID) without changing the interface. Not frozen: a frozen dataclass's __init__
    costs four times as much, and a shard run builds one per device.
    """

    device_id: int
    token: str
    kind: str = "token"
    p256dh: str = ""  # Web Push subscription keys (base64url)
    auth: str = ""
    locale: str = ""  # the device's locale ("pt-BR"): which of a message's localizations it gets


@dataclass(slots=True)
class Result:
    target: Target
    outcome: Outcome
    status: int | None = None  # provider HTTP status (None: no response)
    reason: str = ""  # provider reason / error code, or a transport description
    provider_message_id: str = ""  # apns-id, FCM message name, HMS requestId
    retry_after: float | None = None  # seconds; set on RETRY
    invalid_since: datetime | None = None  # APNs 410 timestamp
    maybe_duplicate: bool = False  # no response, but the request may have been delivered


class Provider(abc.ABC):
    """One adapter instance per (App, credential) in a worker process, long-lived.

    `send_many` keeps as many requests in flight as the engine allows and returns results in
    the order of `targets`.
    """

    platform: ClassVar[str]  # tokens.models.Platform value
    queue: ClassVar[str]  # Celery queue for this provider's send tasks
    payload_limit: ClassVar[int] = 4096  # bytes of what `payload_size` measures
    topics: ClassVar[bool] = False  # sends to a Target of kind topic / condition (FCM, HMS)

    @classmethod
    def payload_size(cls, message: PushMessage) -> int:
        """Bytes of the part of this provider's rendering that its size limit applies to."""
        import orjson

        return len(orjson.dumps(message.to_dict()))

    @classmethod
    @abc.abstractmethod
    def from_app(cls, app: App) -> Provider:
        """Build the adapter from the App's stored credentials and settings."""

    @abc.abstractmethod
    async def send(self, target: Target, message: PushMessage) -> Result: ...

    async def send_many(self, targets: list[Target], message: PushMessage) -> list[Result]:
        return list(await asyncio.gather(*(self.send(t, message) for t in targets)))

    async def aclose(self) -> None:
        return None


def provider_engine(
    base_url: str,
    *,
    kind: str,
    max_connections: int | None = None,
    client_cert: tuple[bytes, bytes] | None = None,
) -> Engine:
    """An engine for one provider endpoint, configured from settings (trust store, pool size,
    timeout). A cleartext URL can only be a local stand-in, which speaks h2c by prior knowledge.
    `client_cert`: (certificate PEM, key PEM) for TLS client authentication; the engine is then
    that credential's own pool (connections authenticate once, at the handshake)."""
    from django.conf import settings

    from delivery.engine import create_engine

    return create_engine(
        base_url,
        kind=kind,
        ca_file=settings.PUSH_CA_BUNDLE or None,
        max_connections=max_connections or settings.PUSH_CONNECTIONS_PER_POOL,
        timeout=settings.PUSH_REQUEST_TIMEOUT,
        h2c=base_url.startswith("http://"),
        client_cert=client_cert,
        idle_max_s=settings.PUSH_CONNECTION_IDLE_MAX_S if kind == "curl" else None,
    )


_R = TypeVar("_R")
# Renderings kept per adapter: messages, and each message's language variants (at most
# payload.LOCALIZATIONS_MAX), so a chunk mixing many languages renders each once.
RENDERED_MESSAGES_KEPT = 256


def remember_render(cache: dict[str, _R], message_id: str, rendered: _R) -> _R:
    """Keep a message's rendering for its next sends, oldest out first: an adapter renders a
    campaign's message once per process, not once per token."""
    if len(cache) >= RENDERED_MESSAGES_KEPT:
        cache.pop(next(iter(cache)))
    cache[message_id] = rendered
    return rendered
