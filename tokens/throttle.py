"""Failed-API-key throttling that can never refuse a valid key, and the client address behind
trusted proxies.

A request is always authenticated first: a valid key is served whatever the counters say, so no
client sharing an address with an attacker (every client, behind a load balancer) is ever locked
out. Only a request whose key did NOT verify (a 401) is counted, and once its client is over a
limit such requests are answered 429 + Retry-After instead of 401, which tells a misconfigured or
abusive client to back off. Two fixed-window Redis counters, shared by every web process:

- per (client, key prefix): `API_AUTH_KEY_FAILURES_MAX` wrong secrets for one key id
  (default 10 per window): someone guessing the secret of one key;
- per client: `API_AUTH_FAILURES_MAX` failures of any key (default 20 per window): spraying.

Both windows are `API_AUTH_FAILURE_WINDOW_S` (default 60 s), starting at the first failure. Why
not refuse before checking, as before: the block was keyed on the address, so 20 junk keys a
minute from behind the same proxy stopped every tenant. A secret is 256 random bits, so the
limit is not what makes guessing hopeless; verification (an index hit and a SHA-256) costs the same
as the 401 that refusing would have saved. If Redis is unreachable the throttle fails open.

The client address is REMOTE_ADDR, unless the peer is in `TRUSTED_PROXIES` (CIDRs): then it is the
right-most X-Forwarded-For entry that is not itself a trusted proxy (each proxy appends the address
it received the connection from; what a client wrote there itself is further left and ignored).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from functools import lru_cache

import orjson
import redis
from django.conf import settings
from django.http import HttpRequest, HttpResponse

from .models import ApiKey

logger = logging.getLogger(__name__)

_CLIENT_KEY = "pushsvc:authfail:{}"
_PREFIX_KEY = "pushsvc:authfail:{}:{}"
_client: redis.Redis | None = None

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)
    return _client


@lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(request: HttpRequest) -> str:
    """The address of the client that sent `request`, through `TRUSTED_PROXIES` only ("" if none)."""
    peer = request.META.get("REMOTE_ADDR", "")
    networks = _networks(tuple(settings.TRUSTED_PROXIES))
    if not networks or not _trusted(peer, networks):
        return peer
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    client = peer
    for hop in reversed([part.strip() for part in forwarded.split(",")]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            # Not an address: nothing a trusted proxy appends. The last trusted hop stands for it,
            # so garbage cannot be used to spread failures over made-up clients.
            return client
        client = hop
        if not _trusted(hop, networks):
            return hop
    return client


def login_client_ip(request: HttpRequest | None) -> str | None:
    """django-axes' AXES_CLIENT_IP_CALLABLE: the same client address as the API throttle's (None when
    unknown, e.g. a test client's force_login, which axes stores as NULL)."""
    if request is None:
        return None
    return client_address(request) or None


def _limits() -> tuple[int, int, int]:
    return (
        int(settings.API_AUTH_FAILURES_MAX),
        int(settings.API_AUTH_KEY_FAILURES_MAX),
        int(settings.API_AUTH_FAILURE_WINDOW_S),
    )


def record_failure(client: str, prefix: str) -> int:
    """Count one key that did not verify; the seconds the client must wait, 0 when under the limits."""
    per_client, per_key, window = _limits()
    keys = (_CLIENT_KEY.format(client), _PREFIX_KEY.format(client, prefix))
    try:
        pipe = _redis().pipeline(transaction=False)
        for key in keys:
            pipe.incr(key)
            pipe.expire(key, window, nx=True)
        for key in keys:
            pipe.ttl(key)
        client_count, _, key_count, _, client_ttl, key_ttl = pipe.execute()
    except redis.RedisError as exc:
        logger.warning("auth throttle unavailable (%s); failure not counted", type(exc).__name__)
        return 0
    waits = [
        ttl if ttl and ttl > 0 else window
        for count, limit, ttl in ((client_count, per_client, client_ttl), (key_count, per_key, key_ttl))
        if int(count) > limit
    ]
    return max(waits, default=0)


def _prefix(header: str) -> str:
    raw = header.partition(" ")[2].strip()
    # A malformed key has no prefix; they all share one counter per client.
    return ApiKey.parse_prefix(raw) or "-"


class ApiKeyThrottleMiddleware:
    """Counts 401 answers to /api/ requests that carried an Authorization header, per client and per
    (client, key prefix); over a limit, such a 401 becomes 429 + Retry-After. A request whose key
    verifies is never counted and never refused."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.status_code != 401 or not request.path.startswith("/api/"):
            return response
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return response
        wait = record_failure(client_address(request) or "unknown", _prefix(header))
        return _too_many(wait) if wait else response


def _too_many(wait: int) -> HttpResponse:
    body = {"detail": f"Too many failed API key attempts from this address; retry in {wait} s."}
    response = HttpResponse(orjson.dumps(body), status=429, content_type="application/json")
    response["Retry-After"] = str(wait)
    return response
