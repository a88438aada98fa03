"""`Authorization: Bearer <api key>` authentication and scope permissions for the v1 API.

Every registration request authenticates, so a verified key is remembered in-process for
`API_KEY_CACHE_SECONDS` (setting, default 5 s) to save a query per request. A revocation or an
app being disabled therefore takes effect in every web process within that time (at once in the
process that made the change); an unknown or wrong key is never cached.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from django.conf import settings
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request

from .models import ApiKey, App

INVALID_KEY = "Invalid or revoked API key."
_CACHE_MAX_ENTRIES = 10_000


@dataclass(slots=True, frozen=True)
class _VerifiedKey:
    """A verified key, detached from the ORM so that it can outlive a request in the cache."""

    id: int
    app_id: int
    prefix: str
    scopes: frozenset[str]


class AuthenticatedKey:
    """`request.auth`: the key's id, prefix, scopes and App. `app` is loaded on first use (the
    registration path needs only `app_id`), fresh for each request."""

    __slots__ = ("_app", "_key")

    def __init__(self, key: _VerifiedKey, app: App | None = None) -> None:
        self._key = key
        self._app = app

    @property
    def id(self) -> int:
        return self._key.id

    @property
    def app_id(self) -> int:
        return self._key.app_id

    @property
    def prefix(self) -> str:
        return self._key.prefix

    @property
    def scopes(self) -> frozenset[str]:
        return self._key.scopes

    @property
    def app(self) -> App:
        if self._app is None:
            self._app = App.objects.get(pk=self._key.app_id)
        return self._app


class _KeyCache:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, _VerifiedKey]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> _VerifiedKey | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._entries.pop(digest, None)
            return None
        return entry[1]

    def put(self, digest: str, key: _VerifiedKey, ttl: float) -> None:
        with self._lock:
            if len(self._entries) >= _CACHE_MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = (time.monotonic() + ttl, key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


key_cache = _KeyCache()


def forget_cached_keys() -> None:
    """Drop this process's verified keys (called when a key is revoked or an app changes)."""
    key_cache.clear()


def verify_authorization(header: str) -> AuthenticatedKey | None:
    """The key of an `Authorization` header value; None without one. Raises AuthenticationFailed
    for anything but a valid, unrevoked key of an active app (one message for all cases)."""
    if not header:
        return None
    scheme, _, raw = header.partition(" ")
    raw = raw.strip()
    if scheme.lower() != "bearer" or not raw:
        raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api key>'.")
    digest = ApiKey.hash_key(raw)
    cached = key_cache.get(digest)
    if cached is not None:
        return AuthenticatedKey(cached)
    prefix = ApiKey.parse_prefix(raw)
    key = None
    if prefix:
        key = ApiKey.objects.select_related("app").filter(prefix=prefix).first()
    # One message for unknown, wrong and revoked keys: never tell an attacker which it was.
    if key is None or not key.matches(raw) or key.is_revoked or not key.app.is_active:
        raise exceptions.AuthenticationFailed(INVALID_KEY)
    verified = _VerifiedKey(id=key.pk, app_id=key.app_id, prefix=key.prefix, scopes=frozenset(key.scopes))
    ttl = settings.API_KEY_CACHE_SECONDS
    if ttl > 0:
        key_cache.put(digest, verified, ttl)
    return AuthenticatedKey(verified, key.app)


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """Authenticates a request as its App. `request.auth` is an `AuthenticatedKey`."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[None, AuthenticatedKey] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        key = verify_authorization(header)
        return None if key is None else (None, key)

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


class HasApiKey(permissions.BasePermission):
    """The default permission: the request authenticated with a valid key."""

    def has_permission(self, request: Request, view: object) -> bool:
        return isinstance(request.auth, AuthenticatedKey)


class HasScope(permissions.BasePermission):
    """Subclass with `scope = ...`; the key must carry it."""

    scope: str = ""
    message = "This API key lacks the required scope."

    def has_permission(self, request: Request, view: object) -> bool:
        key = request.auth
        if not isinstance(key, AuthenticatedKey):
            return False
        if self.scope not in key.scopes:
            self.message = f"This API key lacks the '{self.scope}' scope."
            return False
        return True


class DevicesScope(HasScope):
    scope = ApiKey.SCOPE_DEVICES


class RegisterOrDevicesScope(permissions.BasePermission):
    """Unregistering one device by its id: a server key (devices) or an app's key (register)."""

    message = "This API key lacks the 'devices' or 'register' scope."

    def has_permission(self, request: Request, view: object) -> bool:
        key = request.auth
        return isinstance(key, AuthenticatedKey) and bool(
            {ApiKey.SCOPE_DEVICES, ApiKey.SCOPE_REGISTER} & key.scopes
        )


class SendScope(HasScope):
    scope = ApiKey.SCOPE_SEND
