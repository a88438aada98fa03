"""Signed webhooks: events for the app's backend, through an outbox, delivered at least once.

Events: `token.invalidated` (a batch of devices a provider said are dead, per recorded shard),
`campaign.completed`, `campaign.halted`, `campaign.paused`. `emit` writes a `WebhookEvent` row in
the caller's transaction (the transaction that deactivates the tokens or moves the campaign), so
the event exists exactly when the change committed; after the commit it publishes
`tokens.deliver_webhook`. The beat job `tokens.flush_webhooks` re-publishes due events, covering
a process that died between the commit and the publish and a broker that lost the message.

Delivery (`deliver`): the task leases the event with one conditional UPDATE (a second copy of the
task finds it leased, delivered or not yet due and does nothing), POSTs it, records the attempt,
and either marks it delivered (any 2xx) or schedules the next attempt with exponential backoff
and jitter; after WEBHOOK_MAX_ATTEMPTS it is marked failed. A backend may see an event more than
once (its answer lost, a lease that ran out): `Pushsvc-Event-Id` (= the body's `id`) is the key to
deduplicate on. Events are not ordered.

Signature, as Stripe's scheme: `Pushsvc-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` where
the HMAC key is the app's webhook secret and the message is `<t>.<raw body bytes>`. A receiver
recomputes it over the raw body, compares in constant time, and refuses a `t` older than a few
minutes (replays); `verify_signature` below does exactly that.

SSRF: the URL is checked like a Web Push endpoint (tokens.validation.validate_webhook_url) when it
is saved and again, resolving the host, right before every attempt; the request goes to the very
addresses that check approved (TLS still verifies the URL's host name), and redirects are not
followed. The secret and the signature are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from celery import current_app
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from .models import App, WebhookAttempt, WebhookEvent
from .validation import validate_webhook_url

log = logging.getLogger(__name__)

TOKEN_INVALIDATED = "token.invalidated"
CAMPAIGN_COMPLETED = "campaign.completed"
CAMPAIGN_HALTED = "campaign.halted"
CAMPAIGN_PAUSED = "campaign.paused"
EVENT_TYPES = (TOKEN_INVALIDATED, CAMPAIGN_COMPLETED, CAMPAIGN_HALTED, CAMPAIGN_PAUSED)

DELIVER_TASK = "tokens.deliver_webhook"
SIGNATURE_HEADER = "Pushsvc-Signature"
EVENT_ID_HEADER = "Pushsvc-Event-Id"
EVENT_TYPE_HEADER = "Pushsvc-Event-Type"
SIGNATURE_TOLERANCE_S = 300
SECRET_PREFIX = "whsec_"
_ERROR_MAX = 300  # WebhookAttempt.error / WebhookEvent.last_error


def generate_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


# --- emitting ------------------------------------------------------------------------------------


def emit(app_id: int, event_type: str, data: dict[str, Any]) -> WebhookEvent | None:
    """Record an event for the app's backend in the current transaction; None when the app has
    no webhook URL (nothing is kept for it)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    url = App.objects.filter(pk=app_id).values_list("webhook_url", flat=True).first()
    if not url:
        return None
    event = WebhookEvent.objects.create(app_id=app_id, type=event_type, payload=data)
    event_id = str(event.id)
    transaction.on_commit(lambda: _publish_quietly(event_id))
    return event


def emit_token_invalidated(app_id: int, devices: Sequence[dict[str, Any]]) -> list[WebhookEvent]:
    """`token.invalidated` for deactivated devices, WEBHOOK_BATCH_MAX devices per event."""
    size = max(1, settings.WEBHOOK_BATCH_MAX)
    events = []
    for start in range(0, len(devices), size):
        event = emit(app_id, TOKEN_INVALIDATED, {"devices": list(devices[start : start + size])})
        if event is None:
            return []
        events.append(event)
    return events


def apps_with_webhooks(app_ids: Iterable[int]) -> set[int]:
    return set(App.objects.filter(pk__in=set(app_ids)).exclude(webhook_url="").values_list("pk", flat=True))


def publish(event_id: str, countdown: float | None = None) -> None:
    current_app.send_task(DELIVER_TASK, args=[event_id], queue=settings.WEBHOOK_QUEUE, countdown=countdown)


def _publish_quietly(event_id: str) -> None:
    # The event is committed: a broker that is down now only delays it until the beat sweep.
    try:
        publish(event_id)
    except Exception as exc:
        log.warning("webhook event %s not published (%s); the sweep will", event_id, type(exc).__name__)


# --- signing ---------------------------------------------------------------------------------------


def signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance: float = SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """What a receiver does: True when one v1 signature matches and `t` is recent."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields.get("t", [""])[0])
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in fields.get("v1", []))


# --- delivering ------------------------------------------------------------------------------------


def retry_delay(attempt: int) -> float:
    """Seconds before the attempt after `attempt` failed ones: exponential, capped, and the upper
    half of it at random so that events failed together do not come back together."""
    ceiling = min(settings.WEBHOOK_RETRY_MAX_S, settings.WEBHOOK_RETRY_BASE_S * 2 ** max(attempt - 1, 0))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


_LEASE = f"""
UPDATE {WebhookEvent._meta.db_table}
   SET leased_until = %s, attempts = attempts + 1
 WHERE id = %s AND status = %s AND next_attempt_at <= %s
   AND (leased_until IS NULL OR leased_until < %s)
RETURNING attempts
"""


def deliver(event_id: str) -> str:
    """One delivery attempt of a due event (the body of tokens.deliver_webhook); returns what
    happened, for the worker log."""
    now = timezone.now()
    lease = now + timedelta(seconds=settings.WEBHOOK_TIMEOUT_S * 2 + 30)
    with connection.cursor() as cursor:
        cursor.execute(_LEASE, [lease, event_id, WebhookEvent.Status.PENDING, now, now])
        row = cursor.fetchone()
    if row is None:
        return "not due, leased or done"
    attempt = row[0]
    event = WebhookEvent.objects.select_related("app").get(pk=event_id)
    app = event.app
    if not app.webhook_url or not app.webhook_secret:
        _finish(event, WebhookEvent.Status.FAILED, "the app has no webhook URL or secret any more")
        return "failed: no URL"
    body = orjson.dumps(
        {
            "id": str(event.id),
            "type": event.type,
            "created_at": event.created_at.isoformat(),
            "app": app.slug,
            "data": event.payload,
        }
    )
    status, error, took_ms = _post(app.webhook_url, app.webhook_secret, event, body)
    WebhookAttempt.objects.create(
        event=event,
        attempt=attempt,
        attempted_at=now,
        url=app.webhook_url,
        status_code=status,
        error=error[:_ERROR_MAX],
        duration_ms=took_ms,
    )
    if status is not None and 200 <= status < 300:
        _finish(event, WebhookEvent.Status.DELIVERED, "")
        return f"delivered ({status})"
    problem = error or f"HTTP {status}"
    if attempt >= settings.WEBHOOK_MAX_ATTEMPTS:
        _finish(event, WebhookEvent.Status.FAILED, problem)
        log.warning(
            "webhook event %s (%s) failed after %s attempts: %s", event.id, event.type, attempt, problem
        )
        return f"failed: {problem}"
    delay = retry_delay(attempt)
    WebhookEvent.objects.filter(pk=event.pk).update(
        next_attempt_at=timezone.now() + timedelta(seconds=delay),
        leased_until=None,
        last_error=problem[:_ERROR_MAX],
    )
    publish(str(event.id), countdown=delay)
    return f"retry in {delay:.0f} s: {problem}"


def _finish(event: WebhookEvent, status: str, error: str) -> None:
    WebhookEvent.objects.filter(pk=event.pk).update(
        status=status,
        leased_until=None,
        last_error=error[:_ERROR_MAX],
        delivered_at=timezone.now() if status == WebhookEvent.Status.DELIVERED else None,
    )


def _post(url: str, secret: str, event: WebhookEvent, body: bytes) -> tuple[int | None, str, int]:
    """POST `body` to the approved addresses of `url` -> (status, error, milliseconds)."""
    started = time.perf_counter()
    try:
        addresses = validate_webhook_url(url, resolve=True)
    except ValueError as exc:
        return None, f"refused: {exc}", 0
    parts = urlsplit(url)
    host = parts.hostname or ""
    headers = {
        "content-type": "application/json",
        "user-agent": "pushsvc-webhooks/1",
        EVENT_ID_HEADER: str(event.id),
        EVENT_TYPE_HEADER: event.type,
        SIGNATURE_HEADER: signature_header(secret, int(time.time()), body),
        "host": parts.netloc.rpartition("@")[2],
    }
    error = ""
    for address in addresses:
        # Connect to the checked address, not to a second DNS answer; TLS still checks `host`.
        literal = f"[{address}]" if ":" in address else address
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        try:
            with httpx.Client(timeout=settings.WEBHOOK_TIMEOUT_S, follow_redirects=False) as client:
                response = client.post(
                    target, content=body, headers=headers, extensions={"sni_hostname": host}
                )
            return response.status_code, "", _ms(started)
        except httpx.ConnectError as exc:
            error = f"connect: {exc}"
            continue  # the next address, if any
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}", _ms(started)
    return None, error or "no address", _ms(started)


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def flush_due(limit: int = 1000) -> int:
    """Publish pending events that are due and not leased (the beat sweep); returns how many."""
    now = timezone.now()
    due = list(
        WebhookEvent.objects.filter(status=WebhookEvent.Status.PENDING, next_attempt_at__lte=now)
        .exclude(leased_until__gte=now)
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:limit]
    )
    for event_id in due:
        publish(str(event_id))
    return len(due)


def prune(older_than_days: int) -> int:
    """Delete delivered and failed events (with their attempts) older than this; pending ones stay."""
    cutoff = timezone.now() - timedelta(days=older_than_days)
    deleted, _ = WebhookEvent.objects.filter(
        created_at__lt=cutoff, status__in=(WebhookEvent.Status.DELIVERED, WebhookEvent.Status.FAILED)
    ).delete()
    return deleted
