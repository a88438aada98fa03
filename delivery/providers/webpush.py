"""Web Push adapter: RFC 8291 (aes128gcm) encryption, RFC 8292 VAPID, RFC 8030 delivery.

The endpoint of a subscription comes from a browser, so it is re-checked at send time with the
registry's own rule (`tokens.validation.validate_push_endpoint`, resolving the host, so a name that
now points at a private address is refused) and redirects are never followed (the httpx engine does
not follow them; a 3xx is a REJECTED result).

The DNS part of that check runs in a thread and its verdict is kept per host for RESOLVE_RECHECK
seconds; the other rules run on every send.

One engine per push-service origin, created on first use and kept; one VAPID JWT per origin, valid 12
hours (RFC 8292 allows at most 24) and reused until an hour before it expires. The plaintext is rendered
once per message; the encryption is per subscription by nature (a fresh key pair and salt).

Mapping choices: 404 and 410 mean the subscription is gone (prune). 401 means our VAPID token is
refused, a credential problem for every send (pause). 403 is REJECTED, not AUTH_FAILURE: push services
answer 403 when a subscription was created under another VAPID key, which is a property of that one
subscription, and pausing the whole adapter for it would stop every other send.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urlsplit

import http_ece
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

from delivery.credentials import Clock, fingerprint
from delivery.engine.base import Engine, HttpRequest, TransportError
from delivery.engine.httpx_engine import Resolver
from delivery.payload import PushMessage, fit_message
from delivery.providers import mapping as m
from delivery.providers.base import (
    Outcome,
    Provider,
    Result,
    Target,
    remember_render,
)

if TYPE_CHECKING:
    from tokens.models import App

# aes128gcm record overhead: header (16 salt + 4 rs + 1 idlen + 65 key id) + 1 delimiter + 16 tag.
RECORD_OVERHEAD = 86 + 1 + 16
VAPID_LIFETIME = 12 * 3600
VAPID_REUSE = 11 * 3600
DEFAULT_TTL = 2_419_200  # TTL is mandatory in Web Push; without one from the message, 28 days
MAX_ENGINES = 64
# How long a push-service host's DNS answer, once checked public, is trusted before resolving again. A
# resolution per send would cost a thread hop and a DNS query each; the connection the engine keeps
# open to that host is the larger trust anyway.
RESOLVE_RECHECK = 60.0
_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")

WEBPUSH_TABLE: m.Table = {
    (200, ""): m.DELIVERED,
    (201, ""): m.DELIVERED,
    (202, ""): m.DELIVERED,
    (400, ""): m.REJECTED,
    (401, ""): m.AUTH_FAILURE,
    (403, ""): m.REJECTED,
    (404, ""): m.INVALID_TOKEN,
    (410, ""): m.INVALID_TOKEN,
    (413, ""): m.REJECTED,
    (429, ""): m.THROTTLED,
    (500, ""): m.SERVER_ERROR,
    (502, ""): m.SERVER_ERROR,
    (503, ""): m.SERVER_ERROR,
    (504, ""): m.SERVER_ERROR,
}


def render_plaintext(message: PushMessage) -> bytes:
    """The JSON the service worker receives (the app's own format: there is no standard one)."""
    out: dict[str, Any] = {}
    if message.title:
        out["title"] = message.title
    if message.body:
        out["body"] = message.body
    if message.image:
        out["image"] = message.image
    if message.url:
        out["url"] = message.url
    if message.badge is not None:
        out["badge"] = message.badge
    if message.collapse_key:
        out["tag"] = message.collapse_key
    if message.silent:
        out["silent"] = True
    out["data"] = message.rendered_data()
    return orjson.dumps(out)


def topic_for(collapse_key: str) -> str:
    """The Topic header: the collapse key itself when it is valid, else a stable 32-character digest."""
    if _TOPIC_RE.fullmatch(collapse_key):
        return collapse_key
    return base64.urlsafe_b64encode(hashlib.sha256(collapse_key.encode()).digest()[:24]).decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class _Rendered:
    message: PushMessage
    plaintext: bytes
    headers: dict[str, str]  # without authorization


class WebPushProvider(Provider):
    platform = "web"
    queue = "webpush"
    payload_limit = 4096

    def __init__(
        self,
        *,
        private_key_pem: str,
        public_key: str,
        subject: str,
        config_error: str = "",
        engine_factory: Callable[[str, Resolver], Engine] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._config_error = config_error
        self._private_pem = private_key_pem
        self._public_key = public_key
        self._subject = subject
        self._clock = clock
        self._engine_factory = engine_factory or _default_engine
        self._engines: dict[str, Engine] = {}
        self._vapid: dict[str, tuple[str, float]] = {}  # origin -> (header, reuse until)
        self._renders: dict[str, _Rendered] = {}
        # (host, port) -> (the addresses the SSRF check approved, recheck time). The engines connect
        # to these addresses only (_pinned), so DNS cannot answer the connection differently.
        self._pins: dict[tuple[str, int], tuple[tuple[str, ...], float]] = {}
        self._closing: set[asyncio.Task] = set()

    @classmethod
    def from_app(cls, app: App) -> WebPushProvider:
        error = ""
        public = app.vapid_public_key
        if not app.vapid_private_key or not app.vapid_subject:
            error = f"app {app.slug} lacks vapid_private_key or vapid_subject"
        elif not app.vapid_subject.startswith(("mailto:", "https:")):
            error = f"app {app.slug}: vapid_subject must be a mailto: or https: URI"
        else:
            try:
                key = load_pem_private_key(app.vapid_private_key.encode(), password=None)
                if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
                    raise ValueError("not a P-256 key")
                point = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
                public = base64.urlsafe_b64encode(point).decode().rstrip("=")
            except (ValueError, TypeError):
                label = app.secret_fingerprint("vapid_private_key")
                error = f"app {app.slug}: the VAPID key ({label}) is not a usable P-256 PEM key"
        return cls(
            private_key_pem=app.vapid_private_key,
            public_key=public,
            subject=app.vapid_subject,
            config_error=error,
        )

    @classmethod
    def payload_size(cls, message: PushMessage) -> int:
        return len(render_plaintext(message)) + RECORD_OVERHEAD

    def _render(self, message: PushMessage) -> _Rendered:
        rendered = self._renders.get(message.render_key)
        if rendered is not None and (rendered.message is message or rendered.message == message):
            return rendered
        fitted = fit_message(message, self.payload_size, self.payload_limit, self.platform)
        headers = {
            "ttl": str(DEFAULT_TTL if message.ttl is None else message.ttl),
            "urgency": "high" if message.priority == "high" else "normal",
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
        }
        if message.collapse_key:
            headers["topic"] = topic_for(message.collapse_key)
        rendered = _Rendered(message, render_plaintext(fitted), headers)
        remember_render(self._renders, message.render_key, rendered)
        return rendered

    async def send(self, target: Target, message: PushMessage) -> Result:
        if self._config_error:
            return Result(target, Outcome.AUTH_FAILURE, reason=f"credentials: {self._config_error}")
        rendered = self._render(message.localized(target.locale))  # the device's language
        endpoint = target.token
        parts = urlsplit(endpoint)
        problem, _ = _endpoint_problem(endpoint, resolve=False)  # the rules that need no DNS, every time
        pin_key = _pin_key(parts)
        pin = self._pins.get(pin_key)
        if not problem and (pin is None or pin[1] <= self._clock()):
            problem, addresses = await asyncio.to_thread(_endpoint_problem, endpoint, resolve=True)
            if not problem:
                if len(self._pins) >= 1024:
                    self._pins.clear()
                self._pins[pin_key] = (addresses, self._clock() + RESOLVE_RECHECK)
        if problem:
            # A name that does not resolve right now may be a DNS hiccup; anything else is a refusal.
            outcome = Outcome.RETRY if "does not resolve" in problem else Outcome.REJECTED
            retry_after = m.RETRY_AFTER_SERVER_ERROR if outcome is Outcome.RETRY else None
            return Result(target, outcome, reason=f"endpoint refused: {problem}", retry_after=retry_after)
        try:
            body = http_ece.encrypt(
                rendered.plaintext,
                salt=os.urandom(16),
                private_key=ec.generate_private_key(ec.SECP256R1()),
                dh=_b64decode(target.p256dh),
                auth_secret=_b64decode(target.auth),
                version="aes128gcm",
            )
        except Exception as exc:  # http_ece and cryptography raise assorted types for bad key material
            return Result(
                target, Outcome.REJECTED, reason=f"subscription keys unusable: {type(exc).__name__}"
            )
        origin = _origin(parts)
        headers = rendered.headers.copy()
        try:
            headers["authorization"] = self._vapid_header(origin)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            reason = f"credentials: VAPID signing failed: {type(exc).__name__}"
            return Result(target, Outcome.AUTH_FAILURE, reason=reason)
        try:
            resp = await self._engine(origin).request(HttpRequest("POST", endpoint, headers, body))
        except TransportError as exc:
            return m.transport_result(target, exc)
        row = m.lookup(WEBPUSH_TABLE, resp.status, "")
        reason = (
            "" if row.outcome is Outcome.DELIVERED else resp.body[:200].decode("utf-8", "replace").strip()
        )
        location = resp.headers.get("location", "")
        return m.make_result(target, row, resp.status, reason, resp.headers, location, resp.maybe_duplicate)

    def _vapid_header(self, origin: str) -> str:
        now = self._clock()
        cached = self._vapid.get(origin)
        if cached is not None and now < cached[1]:
            return cached[0]
        claims = {"aud": origin, "exp": int(now) + VAPID_LIFETIME, "sub": self._subject}
        token = jwt.encode(claims, self._private_pem, algorithm="ES256")
        header = f"vapid t={token}, k={self._public_key}"
        self._vapid[origin] = (header, now + VAPID_REUSE)
        return header

    def _engine(self, origin: str) -> Engine:
        engine = self._engines.get(origin)
        if engine is None:
            if len(self._engines) >= MAX_ENGINES:
                _, old = self._engines.popitem()
                task = asyncio.get_running_loop().create_task(old.aclose())
                self._closing.add(task)  # keep a reference until it is done
                task.add_done_callback(self._closing.discard)
            engine = self._engines[origin] = self._engine_factory(origin, self._pinned)
        return engine

    def _pinned(self, host: str, port: int) -> tuple[str, ...] | None:
        """The engines' resolver: the addresses last approved for (host, port). Nothing approved:
        nothing to connect to (fail closed). WEBPUSH_ALLOW_INSECURE (local simulator): the name
        resolves as usual."""
        from django.conf import settings

        if settings.WEBPUSH_ALLOW_INSECURE:
            return None
        pin = self._pins.get((host.lower().rstrip("."), port))
        return pin[0] if pin is not None else ()

    async def aclose(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await engine.aclose()

    def __repr__(self) -> str:
        return f"<WebPushProvider key {fingerprint(self._private_pem) if self._private_pem else '-'}>"


def _origin(parts: SplitResult) -> str:
    """RFC 6454 serialization, as push services compare it with the VAPID `aud`: lower-case host, the
    port only when it is not the scheme's default."""
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def _default_engine(origin: str, resolve: Resolver) -> Engine:
    from django.conf import settings

    from delivery.engine import create_engine

    return create_engine(
        origin,
        kind="httpx",
        ca_file=settings.PUSH_CA_BUNDLE or None,
        max_connections=1,
        timeout=settings.PUSH_REQUEST_TIMEOUT,
        h2c=origin.startswith("http://"),
        resolve=resolve,
    )


def _pin_key(parts: SplitResult) -> tuple[str, int]:
    return ((parts.hostname or "").rstrip("."), parts.port or (443 if parts.scheme == "https" else 80))


def _endpoint_problem(endpoint: str, *, resolve: bool) -> tuple[str, tuple[str, ...]]:
    """(why the endpoint is refused or "", the addresses approved when resolve=True)."""
    from tokens.validation import validate_push_endpoint

    try:
        return "", validate_push_endpoint(endpoint, resolve=resolve)
    except ValueError as exc:
        return str(exc), ()
