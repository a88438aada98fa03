"""Brute-force protection for API keys: a client (IP address) that presents too many wrong keys
is answered 429 with Retry-After until its window ends.

A Redis counter per client address with a fixed window (`API_AUTH_FAILURES_MAX` failures per
`API_AUTH_FAILURE_WINDOW_S`, settings, defaults 20 per 60 s) is shared by every web process, so
spreading guesses over processes gains nothing. While a client is blocked its unverified keys are
refused before the database is asked, so a correct guess during the block is refused too.

Requests whose key is already in this process's verified-key cache (tokens.auth) skip the counter
entirely: the registration hot path pays no Redis round trip, and a legitimate client behind the
same address as an attacker keeps working with a key it used recently. If Redis is unreachable the
throttle fails open: authentication still checks every key, so availability wins over the limit.

The client is REMOTE_ADDR. Behind a reverse proxy, have the proxy set it (e.g. uWSGI/nginx
real-ip); X-Forwarded-For is not trusted here because any client can send it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
import redis
from django.conf import settings
from django.http import HttpRequest, HttpResponse

from .auth import key_cache
from .models import ApiKey

logger = logging.getLogger(__name__)

_KEY = "pushsvc:authfail:{}"
_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)
    return _client


def _limits() -> tuple[int, int]:
    return (
        int(settings.API_AUTH_FAILURES_MAX),
        int(settings.API_AUTH_FAILURE_WINDOW_S),
    )


def blocked_for(client: str) -> int:
    """Seconds until `client` may try keys again; 0 when it is not blocked."""
    limit, window = _limits()
    try:
        pipe = _redis().pipeline(transaction=False)
        pipe.get(_KEY.format(client))
        pipe.ttl(_KEY.format(client))
        count, ttl = pipe.execute()
    except redis.RedisError as exc:
        logger.warning("auth throttle unavailable (%s); not limiting", type(exc).__name__)
        return 0
    if count is None or int(count) < limit:
        return 0
    return ttl if ttl and ttl > 0 else window


def record_failure(client: str) -> None:
    """Count one wrong key from `client`; the window starts at its first failure."""
    _, window = _limits()
    key = _KEY.format(client)
    try:
        pipe = _redis().pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, window, nx=True)
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("auth throttle unavailable (%s); failure not counted", type(exc).__name__)


def _cached(header: str) -> bool:
    raw = header.partition(" ")[2].strip()
    return bool(raw) and key_cache.get(ApiKey.hash_key(raw)) is not None


class ApiKeyThrottleMiddleware:
    """Counts 401 answers to requests that carried an Authorization header, per client address,
    and answers 429 + Retry-After to a client over the limit. Only /api/ paths are concerned."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header or not request.path.startswith("/api/") or _cached(header):
            return self.get_response(request)
        client = request.META.get("REMOTE_ADDR", "") or "unknown"
        wait = blocked_for(client)
        if wait:
            return _too_many(wait)
        response = self.get_response(request)
        if response.status_code == 401:
            record_failure(client)
        return response


def _too_many(wait: int) -> HttpResponse:
    body = {"detail": f"Too many failed API key attempts from this address; retry in {wait} s."}
    response = HttpResponse(orjson.dumps(body), status=429, content_type="application/json")
    response["Retry-After"] = str(wait)
    return response
