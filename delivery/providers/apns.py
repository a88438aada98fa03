"""APNs adapter: token-based auth over HTTP/2 (the libcurl engine), one request per device token.

A message is rendered once (payload bytes and the constant headers) and cached by message id. The header
dict with the JWT and `apns-expiration` is built once per (message, JWT, second) and shared by the sends
of that second, so a send is a dict lookup, a path concatenation and the engine call.

`apns-id` is left to Apple, which generates one and returns it (kept as the provider message id). A
derived, retry-stable id was measured at ~4 µs of client CPU per send (sha1, formatting, and a header
HPACK can never index), about 6% of the send path, and APNs does not deduplicate on it; the message id
in the payload already ties every attempt of one logical send together.

`apns-expiration` is absolute: the message's `expires_at` (its first send + ttl, kept by retries)
or else `now + ttl` at the moment of sending, 0 for ttl 0 ("deliver now or never"), absent when the
message has no ttl.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from django.conf import settings

from delivery.credentials import ApnsTokens, Clock, CredentialError, IssuedToken, shared_cache
from delivery.engine.base import Engine, HttpRequest, HttpResponse, TransportError
from delivery.payload import PushMessage, fit_message
from delivery.providers import mapping as m
from delivery.providers.auth import AuthToken, Pending, send_authorized
from delivery.providers.base import (
    Outcome,
    Provider,
    Result,
    Target,
    provider_engine,
    remember_render,
)

if TYPE_CHECKING:
    from tokens.models import App

# (status, reason) -> Row, for every reason Apple documents ("Handling notification responses from
# APNs", table 2) plus the key-scoping reasons newer clients see.
APNS_TABLE: m.Table = {
    (200, ""): m.DELIVERED,
    (400, "BadCollapseId"): m.REJECTED,
    (400, "BadDeviceToken"): m.INVALID_TOKEN,
    (400, "BadExpirationDate"): m.REJECTED,
    (400, "BadMessageId"): m.REJECTED,
    (400, "BadPriority"): m.REJECTED,
    # Topic problems fail every send of the app until an operator fixes the configuration: pause the
    # adapter like a credential failure rather than failing messages one by one.
    (400, "BadTopic"): m.AUTH_FAILURE,
    (400, "DeviceTokenNotForTopic"): m.INVALID_TOKEN,
    (400, "DuplicateHeaders"): m.REJECTED,
    # The connection sat idle too long; the request was not processed and a fresh connection will do.
    (400, "IdleTimeout"): m.SERVER_ERROR,
    (400, "InvalidPushType"): m.REJECTED,
    (400, "MissingDeviceToken"): m.REJECTED,
    (400, "MissingTopic"): m.AUTH_FAILURE,
    (400, "PayloadEmpty"): m.REJECTED,
    (400, "TopicDisallowed"): m.AUTH_FAILURE,
    (403, "BadCertificate"): m.AUTH_FAILURE,
    (403, "BadCertificateEnvironment"): m.AUTH_FAILURE,
    (403, "ExpiredProviderToken"): m.REFRESH_THEN_AUTH_FAILURE,
    (403, "Forbidden"): m.AUTH_FAILURE,
    (403, "InvalidProviderToken"): m.AUTH_FAILURE,
    (403, "MissingProviderToken"): m.AUTH_FAILURE,
    (403, "UnrelatedKeyIdInToken"): m.AUTH_FAILURE,
    (403, "BadEnvironmentKeyIdInToken"): m.AUTH_FAILURE,
    (404, "BadPath"): m.REJECTED,
    (405, "MethodNotAllowed"): m.REJECTED,
    (410, "Unregistered"): m.INVALID_TOKEN,
    (410, "ExpiredToken"): m.INVALID_TOKEN,
    (413, "PayloadTooLarge"): m.REJECTED,
    # Minting faster than Apple allows makes the connection unusable for a while: back off; the
    # credential cache's 20-minute rule keeps us from minting again meanwhile.
    (429, "TooManyProviderTokenUpdates"): m.THROTTLED,
    (429, "TooManyRequests"): m.THROTTLED,
    (500, "InternalServerError"): m.SERVER_ERROR,
    (503, "ServiceUnavailable"): m.SERVER_ERROR,
    (503, "Shutdown"): m.SERVER_ERROR,
}


@dataclass(frozen=True, slots=True)
class _Rendered:
    message: PushMessage
    body: bytes
    headers: dict[str, str]
    ttl: int | None


def render_payload(message: PushMessage) -> bytes:
    """The APNs JSON payload: `aps` plus the data as top-level custom keys."""
    aps: dict[str, Any] = {}
    if message.silent:
        aps["content-available"] = 1
    else:
        alert = {}
        if message.title:
            alert["title"] = message.title
        if message.body:
            alert["body"] = message.body
        if alert:
            aps["alert"] = alert
        if message.badge is not None:
            aps["badge"] = message.badge
        if message.sound:
            aps["sound"] = message.sound
        if message.mutable_content:
            aps["mutable-content"] = 1
    if message.category:
        aps["category"] = message.category
    if message.thread_id:
        aps["thread-id"] = message.thread_id
    payload: dict[str, Any] = {"aps": aps, **message.rendered_data()}
    if message.url:
        payload["url"] = message.url
    if message.image:
        payload["image"] = message.image
    return orjson.dumps(payload)


class ApnsProvider(Provider):
    platform = "ios"
    queue = "apns"
    payload_limit = 4096

    def __init__(
        self,
        engine: Engine,
        topic: str,
        auth: AuthToken,
        *,
        clock: Clock = time.time,
        certificate: bool = False,
    ) -> None:
        self._engine = engine
        self._path = "/3/device/"  # the engine is bound to the endpoint; requests carry paths
        self._topic = topic
        self._auth = auth
        self._clock = clock
        self._renders: dict[str, _Rendered] = {}
        self._headers_cache: tuple[_Rendered, str, int, dict[str, str]] | None = None
        self._certificate = certificate  # TLS client authentication instead of a provider token

    @classmethod
    def from_app(cls, app: App) -> ApnsProvider:
        from tokens.models import ApnsAuth, ApnsEnvironment

        sandbox = app.apns_environment == ApnsEnvironment.SANDBOX
        base_url = settings.APNS_ENDPOINT_SANDBOX if sandbox else settings.APNS_ENDPOINT_PRODUCTION
        if app.apns_auth == ApnsAuth.CERTIFICATE:
            return cls._with_certificate(app, base_url)
        engine = provider_engine(base_url, kind="curl")
        missing = [
            f for f in ("apns_key_p8", "apns_key_id", "apns_team_id", "apns_topic") if not getattr(app, f)
        ]
        if missing:
            auth = AuthToken(None, config_error=f"app {app.slug} lacks {', '.join(missing)}")
        else:
            auth = AuthToken(ApnsTokens(shared_cache(), app.apns_team_id, app.apns_key_id, app.apns_key_p8))
        return cls(engine, app.apns_topic, auth)

    @classmethod
    def _with_certificate(cls, app: App, base_url: str) -> ApnsProvider:
        """Certificate authentication: the certificate authenticates each connection at the TLS
        handshake, so the adapter gets an engine of its own presenting it, and requests carry no
        provider token."""
        missing = [f for f in ("apns_cert_pem", "apns_cert_key_pem", "apns_topic") if not getattr(app, f)]
        client_cert = None if missing else (app.apns_cert_pem.encode(), app.apns_cert_key_pem.encode())
        engine = provider_engine(base_url, kind="curl", client_cert=client_cert)
        if missing:
            auth = AuthToken(None, config_error=f"app {app.slug} lacks {', '.join(missing)}")
        else:
            expires = app.apns_cert_expires_at.timestamp() if app.apns_cert_expires_at else float("inf")
            auth = AuthToken(_CertificateValidity(app.slug, expires))
        return cls(engine, app.apns_topic, auth, certificate=True)

    @classmethod
    def payload_size(cls, message: PushMessage) -> int:
        return len(render_payload(message))

    def _render(self, message: PushMessage) -> _Rendered:
        fitted = fit_message(message, self.payload_size, self.payload_limit, self.platform)
        # Only what APNs reads: every header costs libcurl and HPACK work on each of millions of sends.
        # apns-priority is omitted when it would be 10, Apple's default; 5 is required for background
        # pushes and asks for power-aware delivery of "normal" ones. APNs ignores content-type.
        headers = {
            "apns-topic": self._topic,
            "apns-push-type": "background" if message.silent else "alert",
        }
        if message.silent or message.priority == "normal":
            headers["apns-priority"] = "5"
        if message.collapse_key:
            headers["apns-collapse-id"] = message.collapse_key
        rendered = _Rendered(message, render_payload(fitted), headers, message.ttl)
        remember_render(self._renders, message.render_key, rendered)
        return rendered

    async def send(self, target: Target, message: PushMessage) -> Result:
        return (await self.send_many([target], message))[0]

    async def send_many(self, targets: list[Target], message: PushMessage) -> list[Result]:
        results: list[Result | None] = [None] * len(targets)
        pending: Pending[_Rendered] = []
        renders = self._renders
        for index, target in enumerate(targets):
            if not target.token.isalnum():
                # The registry only stores hex tokens; anything else must never be spliced into the path.
                results[index] = Result(target, Outcome.REJECTED, reason="not a hex APNs device token")
                continue
            localized = message.localized(target.locale)  # the device's language; cached on the message
            rendered = renders.get(localized.render_key)
            if rendered is None or (rendered.message is not localized and rendered.message != localized):
                rendered = self._render(localized)
            pending.append((index, target, rendered))
        return await send_authorized(self._auth, results, pending, self._attempt)

    def _headers(self, rendered: _Rendered, jwt: str) -> dict[str, str]:
        deadline = rendered.message.expires_at
        second = int(self._clock()) if rendered.ttl and deadline is None else 0
        cached = self._headers_cache
        if cached is not None and cached[0] is rendered and cached[1] is jwt and cached[2] == second:
            return cached[3]
        headers = rendered.headers.copy()
        if jwt:  # certificate authentication sends none
            headers["authorization"] = "bearer " + jwt
        if rendered.ttl == 0:
            headers["apns-expiration"] = "0"
        elif deadline is not None:
            headers["apns-expiration"] = str(deadline)  # a retry keeps its first send's deadline
        elif rendered.ttl is not None:
            headers["apns-expiration"] = str(second + rendered.ttl)
        self._headers_cache = (rendered, jwt, second, headers)
        return headers

    async def _attempt(self, pending: Pending[_Rendered], token: IssuedToken) -> list[tuple[Result, bool]]:
        jwt = token.value
        path = self._path
        requests = [
            # The header dict is shared by the chunk's sends: never modified after this.
            HttpRequest("POST", path + target.token, self._headers(rendered, jwt), rendered.body)
            for _, target, rendered in pending
        ]
        answers = await self._engine.request_many(requests)
        return [self._answer(target, answer) for (_, target, _), answer in zip(pending, answers, strict=True)]

    def _answer(self, target: Target, resp: HttpResponse | TransportError) -> tuple[Result, bool]:
        """The send's result, and whether APNs rejected the provider token (refresh and resend)."""
        if isinstance(resp, TransportError):
            if self._certificate and _certificate_refused(str(resp)):
                # APNs refuses a certificate it does not accept (revoked, expired, not Apple's) in
                # the TLS handshake: nothing was processed, and retrying cannot help.
                return Result(target, Outcome.AUTH_FAILURE, reason=f"BadCertificate: {resp}"), False
            return m.transport_result(target, resp), False
        if resp.status == 200:
            apns_id = resp.header("apns-id")
            return Result(
                target, Outcome.DELIVERED, 200, "", apns_id, maybe_duplicate=resp.maybe_duplicate
            ), False
        reason, timestamp = _error_body(resp.body)
        row = m.lookup(APNS_TABLE, resp.status, reason)
        result = m.make_result(
            target, row, resp.status, reason, resp.headers, resp.header("apns-id"), resp.maybe_duplicate
        )
        if resp.status == 410 and timestamp is not None:
            result.invalid_since = datetime.fromtimestamp(timestamp / 1000, tz=UTC)
        return result, row.refresh_credential

    async def aclose(self) -> None:
        await self._engine.aclose()


class _CertificateValidity:
    """The token source of certificate authentication: no token to mint, but the certificate's
    expiry. From then on every send fails at once as a credential failure (the campaign pauses
    with the reason) instead of each connection attempt failing its handshake."""

    def __init__(self, slug: str, expires_at: float, clock: Clock = time.time) -> None:
        self._slug = slug
        self._expires_at = expires_at
        self._clock = clock

    def get(self) -> IssuedToken:
        if self._clock() >= self._expires_at:
            when = datetime.fromtimestamp(self._expires_at, tz=UTC)
            raise CredentialError(
                f"the APNs certificate of app {self._slug} expired on {when:%Y-%m-%d %H:%M} UTC",
                transient=False,
            )
        return IssuedToken("", 0.0, self._expires_at, self._expires_at)

    def refresh(self, rejected: IssuedToken) -> IssuedToken | None:
        return None


# The certificate engine speaks TLS 1.2 (delivery/engine/curl.py), where the server reads the
# client certificate inside the handshake. A handshake the server ends there is a refusal of the
# certificate: APNs sends an alert ("bad certificate", "unknown ca", "certificate expired /
# revoked"), other stacks (the simulator's asyncio front) just close. libcurl reports both as
# CURLE_SSL_CONNECT_ERROR (35); a connection that could not be made at all is another code
# (7 refused, 28 timeout, 6 resolve) and stays a transient retry.
_HANDSHAKE_FAILED = "curl error 35:"
_CERTIFICATE_ALERTS = ("alert bad certificate", "alert unknown ca", "alert certificate")


def _certificate_refused(message: str) -> bool:
    lowered = message.lower()
    return lowered.startswith(_HANDSHAKE_FAILED) or any(alert in lowered for alert in _CERTIFICATE_ALERTS)


def _error_body(body: bytes) -> tuple[str, int | None]:
    try:
        parsed = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return "", None
    if not isinstance(parsed, dict):
        return "", None
    reason = parsed.get("reason")
    timestamp = parsed.get("timestamp")
    return (
        reason if isinstance(reason, str) else "",
        timestamp if isinstance(timestamp, int) and not isinstance(timestamp, bool) else None,
    )
