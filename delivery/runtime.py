"""Per-process runtime of a send worker: one event loop, warm providers, one Redis client.

Celery tasks are synchronous, the provider adapters are asyncio. Running `asyncio.run()` per
task would build and tear down the loop and, with it, every HTTP/2 connection: a TLS handshake
and (for APNs) a one-stream warm-up per task. Instead each worker process starts one daemon
thread running one loop the first time it needs it (after the prefork, so no loop or socket is
shared between processes) and tasks hand it coroutines. Providers are cached per
(app, platform, credential fingerprint), so a shard reuses the connections the previous shard
of the same app opened; a credential change gives a new fingerprint and a fresh provider.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from django.conf import settings

if TYPE_CHECKING:
    from delivery.providers.base import Provider
    from tokens.models import App

T = TypeVar("T")

_lock = threading.Lock()
_pid: int | None = None
_loop: asyncio.AbstractEventLoop | None = None
_providers: dict[tuple[int, str, str], Provider] = {}
_redis: redis.Redis | None = None


def _reset_after_fork() -> None:
    # Called with _lock held. State inherited from the parent belongs to the parent's thread.
    global _pid, _loop, _redis
    _pid = os.getpid()
    _loop = None
    _redis = None
    _providers.clear()


def _ensure_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _pid != os.getpid():
            _reset_after_fork()
        if _loop is None:
            loop = _new_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=serve, name="pushsvc-send-loop", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def _new_loop() -> asyncio.AbstractEventLoop:
    if settings.PUSH_EVENT_LOOP == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on this process's send loop and wait for its result (from a sync task)."""
    return submit(coro).result(timeout)


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Start `coro` on this process's send loop; the caller collects its result when it needs it."""
    return asyncio.run_coroutine_threadsafe(coro, _ensure_loop())


def credential_fingerprint(app: App, platform: str) -> str:
    """Changes whenever anything the provider was built from changes (never reveals a secret)."""
    fields = (
        "apns_topic",
        "apns_environment",
        "apns_key_p8",
        "apns_key_id",
        "apns_team_id",
        "apns_auth",
        "apns_cert_pem",
        "apns_cert_key_pem",
        "apns_cert_expires_at",
        "fcm_service_account",
        "hms_app_id",
        "hms_client_secret",
        "vapid_private_key",
        "vapid_public_key",
        "vapid_subject",
    )
    digest = hashlib.sha256(platform.encode())
    for name in fields:
        digest.update(b"\0" + str(getattr(app, name, "")).encode())
    return digest.hexdigest()[:16]


def provider_for(app: App, platform: str) -> Provider:
    """The warm provider of this process for (app, platform); built on first use."""
    from delivery.providers.registry import provider_class

    _ensure_loop()
    key = (app.pk, platform, credential_fingerprint(app, platform))
    with _lock:
        provider = _providers.get(key)
    if provider is not None:
        return provider
    stale = [k for k in list(_providers) if k[:2] == key[:2] and k != key]
    # Built on the loop: adapters may create loop-bound objects (locks, pools) in from_app.
    provider = run(_build(provider_class(platform), app))
    with _lock:
        _providers[key] = provider
        retired = [_providers.pop(k) for k in stale if k in _providers]
    for old in retired:
        run(old.aclose())
    return provider


async def _build(cls: type[Provider], app: App) -> Provider:
    return cls.from_app(app)


def redis_client() -> redis.Redis:
    """This process's Redis client (idempotency, rate limits, campaign control flags)."""
    global _redis
    with _lock:
        if _pid != os.getpid():
            _reset_after_fork()
        if _redis is None:
            _redis = redis.Redis.from_url(settings.REDIS_URL, health_check_interval=30)
        return _redis
