"""`Authorization: Bearer <api key>` authentication and scope permissions for the v1 API."""

from __future__ import annotations

from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request

from .models import ApiKey


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """Authenticates a request as its App. `request.auth` is the ApiKey (with `.app` loaded)."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[None, ApiKey] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        raw = raw.strip()
        if scheme.lower() != "bearer" or not raw:
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api key>'.")
        prefix = ApiKey.parse_prefix(raw)
        key = None
        if prefix:
            key = ApiKey.objects.select_related("app").filter(prefix=prefix).first()
        # One message for unknown, wrong and revoked keys: never tell an attacker which it was.
        if key is None or not key.matches(raw) or key.is_revoked or not key.app.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        return (None, key)

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


class HasApiKey(permissions.BasePermission):
    """The default permission: the request authenticated with a valid key."""

    def has_permission(self, request: Request, view: object) -> bool:
        return isinstance(request.auth, ApiKey)


class HasScope(permissions.BasePermission):
    """Subclass with `scope = ...`; the key must carry it."""

    scope: str = ""
    message = "This API key lacks the required scope."

    def has_permission(self, request: Request, view: object) -> bool:
        key = request.auth
        if not isinstance(key, ApiKey):
            return False
        if self.scope not in key.scopes:
            self.message = f"This API key lacks the '{self.scope}' scope."
            return False
        return True


class DevicesScope(HasScope):
    scope = ApiKey.SCOPE_DEVICES


class SendScope(HasScope):
    scope = ApiKey.SCOPE_SEND
