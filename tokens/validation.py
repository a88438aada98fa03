"""Validation of device registrations, shared by the API, `import_tokens` and the Web Push adapter.

Plain functions rather than a DRF serializer: the registration endpoint is the hottest request in
the service (an app calls it on every launch) and a serializer costs more than the upsert itself.

Every check runs before anything reaches the database, so no input can turn into a database
error (PostgreSQL refuses NUL bytes and lone surrogates in text; both fail the printable checks).

Unknown fields in a registration are ignored: SDK releases in the wild cannot be updated when
the API grows, and a stale client must keep registering.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings

from .models import DeviceToken, Platform

APNS_TOKEN_MIN = 64
APNS_TOKEN_MAX = 200
PROVIDER_TOKEN_MAX_BYTES = 4096
WEB_ENDPOINT_MAX = 2048
USER_ID_MAX = DeviceToken._meta.get_field("user_id").max_length
APP_VERSION_MAX = DeviceToken._meta.get_field("app_version").max_length
LOCALE_MAX = DeviceToken._meta.get_field("locale").max_length

PLATFORMS = frozenset(Platform.values)
_HEX = re.compile(r"[0-9a-fA-F]+")
# FCM and HMS tokens are opaque but always visible ASCII; anything else is a client bug.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_LOCALE = re.compile(r"[A-Za-z]{1,8}(?:[-_][A-Za-z0-9]{1,8})*")
_B64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


class RegistrationError(ValueError):
    """Field errors of one registration: `errors` maps a field name to its messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in errors.items()))
        self.errors = errors


@dataclass(slots=True, frozen=True)
class Registration:
    """A validated registration, normalized (lowercase APNs hex, unpadded base64url web keys)."""

    device_id: uuid.UUID
    platform: str
    token: str
    user_id: str = ""
    app_version: str = ""
    locale: str = ""
    web_p256dh: str = ""
    web_auth: str = ""

    @property
    def token_hash(self) -> str:
        return DeviceToken.hash_token(self.token)


def validate_registration(data: Any, *, resolve: bool = False) -> Registration:
    """Check a decoded registration body; raise RegistrationError with every field's problem."""
    if not isinstance(data, dict):
        raise RegistrationError({"non_field_errors": ["Expected a JSON object."]})
    errors: dict[str, list[str]] = {}

    device_id = None
    raw_device = data.get("device_id")
    if raw_device is None:
        errors["device_id"] = ["This field is required."]
    else:
        try:
            device_id = parse_device_id(raw_device)
        except ValueError as exc:
            errors["device_id"] = [str(exc)]

    platform = data.get("platform")
    if platform is None:
        errors["platform"] = ["This field is required."]
    elif not isinstance(platform, str) or platform not in PLATFORMS:
        errors["platform"] = [f"Must be one of: {', '.join(sorted(PLATFORMS))}."]
        platform = None

    token = p256dh = auth = ""
    raw_token = data.get("token")
    if raw_token is None:
        errors["token"] = ["This field is required."]
    elif platform is not None:
        try:
            if platform == Platform.WEB:
                token, p256dh, auth = clean_web_subscription(raw_token, resolve=resolve)
            else:
                token = clean_provider_token(platform, raw_token)
        except ValueError as exc:
            errors["token"] = [str(exc)]

    user_id = _optional_text(data, "user_id", USER_ID_MAX, errors)
    app_version = _optional_text(data, "app_version", APP_VERSION_MAX, errors)
    locale = _optional_text(data, "locale", LOCALE_MAX, errors)
    if locale and "locale" not in errors and not _LOCALE.fullmatch(locale):
        errors["locale"] = ["Must be a BCP 47 language tag such as 'en' or 'pt-BR'."]

    if errors:
        raise RegistrationError(errors)
    return Registration(
        device_id=device_id,
        platform=platform,
        token=token,
        user_id=user_id,
        app_version=app_version,
        locale=locale,
        web_p256dh=p256dh,
        web_auth=auth,
    )


def parse_device_id(value: Any) -> uuid.UUID:
    if not isinstance(value, str) or len(value) > 45:
        raise ValueError("Must be a UUID string.")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValueError("Must be a UUID string.") from None


def clean_provider_token(platform: str, value: Any) -> str:
    """APNs: hex, 64-200 chars, lowercased (APNs tokens are case-insensitive, storage is not).
    FCM/HMS: visible ASCII, 1 byte to 4 KiB."""
    if not isinstance(value, str):
        raise ValueError("Must be a string.")
    if platform == Platform.IOS:
        if not (APNS_TOKEN_MIN <= len(value) <= APNS_TOKEN_MAX) or len(value) % 2:
            raise ValueError(
                f"An APNs token is an even number of hex digits, {APNS_TOKEN_MIN} to {APNS_TOKEN_MAX}."
            )
        if not _HEX.fullmatch(value):
            raise ValueError("An APNs token contains only hex digits (0-9, a-f).")
        return value.lower()
    if not value:
        raise ValueError("Must not be empty.")
    if len(value) > PROVIDER_TOKEN_MAX_BYTES:
        raise ValueError(f"Must be at most {PROVIDER_TOKEN_MAX_BYTES} bytes.")
    if not _VISIBLE_ASCII.fullmatch(value):
        raise ValueError("Must contain only visible ASCII characters (no spaces or control characters).")
    return value


def clean_web_subscription(value: Any, *, resolve: bool = False) -> tuple[str, str, str]:
    """A browser PushSubscription (`{"endpoint", "keys": {"p256dh", "auth"}}`) as
    (endpoint, p256dh, auth), keys re-encoded as unpadded base64url."""
    if not isinstance(value, dict):
        raise ValueError(
            'A web token is the push subscription object: {"endpoint", "keys": {"p256dh", "auth"}}.'
        )
    endpoint = value.get("endpoint")
    keys = value.get("keys")
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError("The subscription needs an 'endpoint' URL.")
    if len(endpoint) > WEB_ENDPOINT_MAX:
        raise ValueError(f"The endpoint must be at most {WEB_ENDPOINT_MAX} characters.")
    validate_push_endpoint(endpoint, resolve=resolve)
    if not isinstance(keys, dict):
        raise ValueError("The subscription needs 'keys' with 'p256dh' and 'auth'.")
    p256dh = _b64url_bytes(keys.get("p256dh"), "keys.p256dh")
    if len(p256dh) != 65 or p256dh[0] != 4:
        raise ValueError("keys.p256dh must be a 65-byte uncompressed P-256 point (base64url).")
    if not _on_p256(p256dh):
        raise ValueError("keys.p256dh is not a point on the P-256 curve.")
    auth = _b64url_bytes(keys.get("auth"), "keys.auth")
    if len(auth) != 16:
        raise ValueError("keys.auth must be 16 bytes (base64url).")
    return endpoint, _b64url(p256dh), _b64url(auth)


def validate_push_endpoint(url: str, *, resolve: bool) -> tuple[str, ...]:
    """Refuse a Web Push endpoint the gateway must not POST to (server-side request forgery).

    The URL comes from a browser, i.e. from anyone: it must be https on port 443, its host a valid
    DNS name (letters, digits and hyphens in labels of 1-63) of a known push service
    (`WEBPUSH_ALLOWED_HOSTS`, suffix match on a dot boundary), and neither an IP literal nor (with
    `resolve=True`, which the sender uses right before connecting) any address the name resolves to
    may be private, loopback, link-local or reserved. With `resolve=True` the checked addresses are
    returned: the sender connects to those and only those (no second lookup that DNS rebinding
    could answer differently). `WEBPUSH_ALLOW_INSECURE` (tests and the demo against the local
    simulator) lifts the https, port, allow-list and address rules and returns no addresses.
    """
    if not isinstance(url, str) or any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("The endpoint must be a URL without spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"The endpoint is not a valid URL: {exc}.") from None
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError("The endpoint must be an absolute https:// URL.")
    if parts.username is not None or parts.password is not None:
        raise ValueError("The endpoint must not carry credentials.")
    if _ip(host) is None and not _valid_hostname(host):
        raise ValueError("The endpoint host must be a DNS name of letters, digits, hyphens and dots.")
    if settings.WEBPUSH_ALLOW_INSECURE:
        return ()
    if parts.scheme != "https":
        raise ValueError("The endpoint must use https.")
    if _ip(host) is not None:
        raise ValueError("The endpoint must name a push service host, not an IP address.")
    if not _host_allowed(host):
        raise ValueError(f"The endpoint host {host!r} is not an allowed push service.")
    if port not in (None, 443):
        raise ValueError("The endpoint must use the https port, 443.")
    if not resolve:
        return ()
    return public_addresses(host, 443, "endpoint")


def public_addresses(host: str, port: int, what: str, *, allow_private: bool = False) -> tuple[str, ...]:
    """The addresses `host` resolves to, all of them public (not private, loopback, link-local,
    multicast or reserved) unless `allow_private`; ValueError otherwise. The caller connects to
    these and only these: a second lookup is what DNS rebinding would answer differently."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"The {what} host {host!r} does not resolve: {exc}.") from None
    addresses: list[str] = []
    for info in infos:
        address = _ip(info[4][0])
        if address is None or (not allow_private and (not address.is_global or address.is_multicast)):
            raise ValueError(f"The {what} host {host!r} resolves to a non-public address.")
        if str(address) not in addresses:
            addresses.append(str(address))
    return tuple(addresses)


def validate_webhook_url(url: str, *, resolve: bool) -> tuple[str, ...]:
    """Refuse a webhook URL the gateway must not POST to: the Web Push SSRF rules above without
    the push-service allow-list (a backend lives anywhere) and without the fixed port. https,
    no credentials, a DNS name or a public IP literal; with `resolve=True` every address the name
    resolves to must be public, and those addresses are returned for the sender to connect to.
    `WEBHOOK_ALLOW_PRIVATE` lifts the address rule (a backend on the same private network) and
    `WEBHOOK_ALLOW_HTTP` accepts plain http; both off by default."""
    if not isinstance(url, str) or not url or any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("The webhook URL must be a URL without spaces or control characters.")
    if len(url) > WEB_ENDPOINT_MAX:
        raise ValueError(f"The webhook URL is longer than {WEB_ENDPOINT_MAX} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"The webhook URL is not valid: {exc}.") from None
    host = (parts.hostname or "").rstrip(".")
    allowed_schemes = ("https", "http") if settings.WEBHOOK_ALLOW_HTTP else ("https",)
    if parts.scheme not in allowed_schemes or not host:
        raise ValueError("The webhook URL must be an absolute https:// URL.")
    if parts.username is not None or parts.password is not None:
        raise ValueError("The webhook URL must not carry credentials.")
    literal = _ip(host)
    if literal is None and not _valid_hostname(host):
        raise ValueError("The webhook host must be a DNS name of letters, digits, hyphens and dots.")
    allow_private = settings.WEBHOOK_ALLOW_PRIVATE
    if literal is not None and not allow_private and (not literal.is_global or literal.is_multicast):
        raise ValueError("The webhook URL names a non-public address (WEBHOOK_ALLOW_PRIVATE is off).")
    if not resolve:
        return ()
    port = port or (443 if parts.scheme == "https" else 80)
    return public_addresses(host, port, "webhook", allow_private=allow_private)


_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _valid_hostname(host: str) -> bool:
    """RFC 1123 host name (urlsplit already lower-cased it); what push services are named."""
    return len(host) <= 253 and all(_LABEL_RE.fullmatch(label) for label in host.split("."))


def _host_allowed(host: str) -> bool:
    host = host.lower()
    for allowed in settings.WEBPUSH_ALLOWED_HOSTS:
        allowed = allowed.lower().strip(".")
        if host == allowed or host.endswith("." + allowed):
            return True
    return False


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    # ::ffff:10.0.0.1 is 10.0.0.1 for the kernel: judge the IPv4 address it wraps.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _b64url_bytes(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or not value or len(value) > 256 or not _B64URL.fullmatch(value):
        raise ValueError(f"{name} must be a base64url string.")
    raw = value.rstrip("=")
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid base64url.") from None


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _on_p256(point: bytes) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        return False
    return True


def _optional_text(data: dict, field: str, max_length: int, errors: dict[str, list[str]]) -> str:
    value = data.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        errors[field] = ["Must be a string."]
        return ""
    if len(value) > max_length:
        errors[field] = [f"Must be at most {max_length} characters."]
        return ""
    if not value.isprintable():
        errors[field] = ["Must not contain control characters or NUL bytes."]
        return ""
    return value
