"""FCM HTTP v1 adapter: one request per registration token (v1 has no multicast), over the libcurl engine.

The message is rendered once into two byte strings around the token, `{"message":{"token":` and the
rest, so a send is one `orjson.dumps(token)` and a join. The Authorization header dict is rebuilt only
when the access token changes and is shared, unmodified, by every request.

Auth: the OAuth2 access token comes from the service account through the JWT-bearer grant, signed with
pyjwt (RS256) and exchanged with one POST to the account's `token_uri` (delivery.credentials), not with
google-auth, which would add `requests` and its own transport and retry layer: a second retry policy and
a second HTTP stack to configure. On 401 UNAUTHENTICATED the token is refreshed once and the send
retried once; a second 401 is AUTH_FAILURE.

Errors are read from the `google.firebase.fcm.v1.FcmError` detail, falling back to the top-level
`status`. Only UNREGISTERED, SENDER_ID_MISMATCH and an INVALID_ARGUMENT whose message says the
registration token itself is invalid prune the token; any other INVALID_ARGUMENT means our request is
wrong and rejects the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from django.conf import settings

from delivery.credentials import CredentialError, FcmTokens, IssuedToken, ServiceAccount, shared_cache
from delivery.engine.base import Engine, HttpRequest, HttpResponse, TransportError
from delivery.payload import PushMessage, fit_message
from delivery.providers import mapping as m
from delivery.providers.auth import AuthToken, Pending, send_authorized
from delivery.providers.base import (
    TOPIC_KINDS,
    Outcome,
    Provider,
    Result,
    Target,
    provider_engine,
    remember_render,
)
from delivery.topics import FCM_TOPIC_PAYLOAD_LIMIT

if TYPE_CHECKING:
    from tokens.models import App

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# Our name for the one token-specific flavour of INVALID_ARGUMENT (FCM has no separate code for it).
INVALID_REGISTRATION = "INVALID_ARGUMENT:registration-token"
# FCM says "The registration token is not a valid FCM registration token"; require both parts so that
# a payload complaint that merely mentions the token field does not prune it.
_TOKEN_INVALID_RE = re.compile(r"registration token.*(not a valid|invalid)|invalid.*registration token", re.I)

# (status, error code) -> Row: FCM's ErrorCode enum ("FCM error codes" reference) and the top-level
# google.rpc statuses an FCM send can carry without an FcmError detail.
FCM_TABLE: m.Table = {
    (200, ""): m.DELIVERED,
    (400, "INVALID_ARGUMENT"): m.REJECTED,
    (400, INVALID_REGISTRATION): m.INVALID_TOKEN,
    (404, "UNREGISTERED"): m.INVALID_TOKEN,
    (403, "SENDER_ID_MISMATCH"): m.INVALID_TOKEN,
    (429, "QUOTA_EXCEEDED"): m.THROTTLED,
    (503, "UNAVAILABLE"): m.SERVER_ERROR,
    (500, "INTERNAL"): m.SERVER_ERROR,
    # The APNs certificate or web credentials uploaded to Firebase are wrong: an operator problem.
    (401, "THIRD_PARTY_AUTH_ERROR"): m.AUTH_FAILURE,
    (400, "UNSPECIFIED_ERROR"): m.REJECTED,
    (500, "UNSPECIFIED_ERROR"): m.SERVER_ERROR,
    # Our OAuth access token was not accepted: refresh it once, then it is the credentials.
    (401, "UNAUTHENTICATED"): m.REFRESH_THEN_AUTH_FAILURE,
    (403, "PERMISSION_DENIED"): m.AUTH_FAILURE,
    # No FcmError detail: the project (URL) does not exist; configuration, not the token.
    (404, "NOT_FOUND"): m.AUTH_FAILURE,
    (429, "RESOURCE_EXHAUSTED"): m.THROTTLED,
    (504, "DEADLINE_EXCEEDED"): m.SERVER_ERROR,
}


@dataclass(frozen=True, slots=True)
class _Rendered:
    message: PushMessage
    suffix: bytes  # everything after the token value


_PREFIX = b'{"message":{"token":'


def render_message(message: PushMessage) -> dict[str, Any]:
    """The v1 `message` object without its token."""
    out: dict[str, Any] = {}
    android: dict[str, Any] = {"priority": "HIGH" if message.priority == "high" else "NORMAL"}
    aps: dict[str, Any] = {}
    apns_headers = {
        "apns-push-type": "background" if message.silent else "alert",
        "apns-priority": "10" if message.priority == "high" and not message.silent else "5",
    }
    if message.silent:
        aps["content-available"] = 1
    else:
        notification = {}
        if message.title:
            notification["title"] = message.title
        if message.body:
            notification["body"] = message.body
        if message.image:
            notification["image"] = message.image
        if notification:
            out["notification"] = notification
        android_notification: dict[str, Any] = {}
        if message.sound:
            android_notification["sound"] = message.sound
            aps["sound"] = message.sound
        if message.category:
            android_notification["click_action"] = message.category
        if message.collapse_key:
            android_notification["tag"] = message.collapse_key
        if message.badge is not None:
            android_notification["notification_count"] = message.badge
            aps["badge"] = message.badge
        if android_notification:
            android["notification"] = android_notification
        if message.mutable_content:
            aps["mutable-content"] = 1
    if message.category:
        aps["category"] = message.category
    if message.thread_id:
        aps["thread-id"] = message.thread_id
    data = message.rendered_data()
    if message.url:
        data["url"] = message.url
    out["data"] = data
    if message.ttl is not None:
        android["ttl"] = f"{message.ttl}s"
    if message.collapse_key:
        android["collapse_key"] = message.collapse_key
        apns_headers["apns-collapse-id"] = message.collapse_key
    out["android"] = android
    out["apns"] = {"headers": apns_headers, "payload": {"aps": aps}}
    return out


class FcmProvider(Provider):
    platform = "android"
    queue = "fcm"
    payload_limit = 4096
    topics = True

    def __init__(self, engine: Engine, project_id: str, auth: AuthToken) -> None:
        self._engine = engine
        self._path = f"/v1/projects/{project_id}/messages:send"
        self._auth = auth
        self._renders: dict[str, _Rendered] = {}
        self._headers_for: IssuedToken | None = None
        self._headers: dict[str, str] = {}

    @classmethod
    def from_app(cls, app: App) -> FcmProvider:
        base_url = settings.FCM_ENDPOINT
        engine = provider_engine(base_url, kind="curl")
        try:
            account = ServiceAccount.parse(app.fcm_service_account)
        except CredentialError as exc:
            return cls(engine, "-", AuthToken(None, config_error=f"app {app.slug}: {exc}"))
        return cls(engine, account.project_id, AuthToken(FcmTokens(shared_cache(), account)))

    @classmethod
    def payload_size(cls, message: PushMessage) -> int:
        # FCM's 4096-byte limit is on the message content; the token is not part of it.
        return len(orjson.dumps(render_message(message)))

    def _render(self, message: PushMessage) -> _Rendered:
        fitted = fit_message(message, self.payload_size, self.payload_limit, self.platform)
        rest = orjson.dumps(render_message(fitted))  # b'{...}', never empty: data is always present
        rendered = _Rendered(message, b"," + rest[1:] + b"}")
        remember_render(self._renders, message.render_key, rendered)
        return rendered

    async def send(self, target: Target, message: PushMessage) -> Result:
        return (await self.send_many([target], message))[0]

    async def send_many(self, targets: list[Target], message: PushMessage) -> list[Result]:
        pending: Pending[bytes] = []
        renders = self._renders
        for index, target in enumerate(targets):
            if target.kind in TOPIC_KINDS:
                body = self._topic_body(target, message)
            else:
                localized = message.localized(target.locale)  # the device's language; cached on the message
                rendered = renders.get(localized.render_key)
                if rendered is None or (rendered.message is not localized and rendered.message != localized):
                    rendered = self._render(localized)
                body = b"".join((_PREFIX, orjson.dumps(target.token), rendered.suffix))
            pending.append((index, target, body))
        results: list[Result | None] = [None] * len(targets)
        return await send_authorized(self._auth, results, pending, self._attempt)

    def _topic_body(self, target: Target, message: PushMessage) -> bytes:
        """`{"message": {"topic" | "condition": ..., ...}}`: one request per topic send, so it is
        rendered per send, fitted to FCM's smaller limit for topic messages."""
        fitted = fit_message(message, self.payload_size, FCM_TOPIC_PAYLOAD_LIMIT, self.platform)
        rest = orjson.dumps(render_message(fitted))
        head = b'{"message":{' + orjson.dumps(target.kind) + b":" + orjson.dumps(target.token) + b","
        return head + rest[1:] + b"}"

    async def _attempt(self, pending: Pending[bytes], token: IssuedToken) -> list[tuple[Result, bool]]:
        if self._headers_for is not token:
            # One dict per token, shared by every send with it: never modified after this.
            self._headers = {"authorization": "Bearer " + token.value, "content-type": "application/json"}
            self._headers_for = token
        headers, path = self._headers, self._path
        requests = [HttpRequest("POST", path, headers, body) for _, _, body in pending]
        answers = await self._engine.request_many(requests)
        return [_answer(target, answer) for (_, target, _), answer in zip(pending, answers, strict=True)]


def _answer(target: Target, resp: HttpResponse | TransportError) -> tuple[Result, bool]:
    """The send's result, and whether FCM rejected the access token (refresh and resend)."""
    if isinstance(resp, TransportError):
        return m.transport_result(target, resp), False
    if resp.status == 200:
        try:
            name = orjson.loads(resp.body).get("name", "")
        except (orjson.JSONDecodeError, AttributeError):
            name = ""
        return Result(target, Outcome.DELIVERED, 200, "", name, maybe_duplicate=resp.maybe_duplicate), False
    code, text = _error(resp.body)
    row = m.lookup(FCM_TABLE, resp.status, code)
    reason = f"{code}: {text}" if text else code
    result = m.make_result(target, row, resp.status, reason, resp.headers, "", resp.maybe_duplicate)
    return result, row.refresh_credential


def _error(body: bytes) -> tuple[str, str]:
    """(error code as the table knows it, the error message) from a google.rpc error body."""
    try:
        error = orjson.loads(body).get("error", {})
    except (orjson.JSONDecodeError, AttributeError):
        return "", ""
    if not isinstance(error, dict):
        return "", ""
    code = error.get("status") or ""
    text = str(error.get("message") or "")[:200]
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_TYPE and detail.get("errorCode"):
            code = detail["errorCode"]
            break
    if code == "INVALID_ARGUMENT" and _TOKEN_INVALID_RE.search(text):
        code = INVALID_REGISTRATION
    return str(code), text
