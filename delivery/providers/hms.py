"""HMS Push Kit v1 adapter: true multicast, up to 1,000 tokens per request, over the httpx engine.

`send_many` splits the targets into requests of at most `BATCH_SIZE` tokens and maps each answer back to
every token in it: 80000000 delivers all; 80100000 (partial success) lists the illegal tokens in its
`msg`, and only those are INVALID_TOKEN, the rest delivered (never re-sent); any other code applies to the
whole request.

Size: Huawei documents 80300008 as "the message body size exceeds the default value" (4 KB) without
saying whether the token list counts. We read it strictly, as the simulator contract does: the whole
request body stays within `MAX_REQUEST_BYTES`. The message is fitted so that it goes out with one token
of up to `TOKEN_RESERVE` bytes, and batches are packed with as many tokens as the budget allows. If
Huawei confirms the limit excludes tokens, raising `MAX_REQUEST_BYTES` restores 1,000-token batches.

Badges are not sent: HMS needs the app's launcher class name for them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from django.conf import settings

from delivery.credentials import CredentialError, HmsTokens, IssuedToken, shared_cache
from delivery.engine.base import Engine, HttpRequest, TransportError
from delivery.payload import PushMessage, fit_message
from delivery.providers import mapping as m
from delivery.providers.auth import AuthToken
from delivery.providers.base import (
    TOPIC_KINDS,
    Outcome,
    Provider,
    Result,
    Target,
    provider_engine,
    remember_render,
)

if TYPE_CHECKING:
    from tokens.models import App

BATCH_SIZE = 1000  # tokens per request (HMS maximum)
MAX_REQUEST_BYTES = 4096
TOKEN_RESERVE = 256  # HMS tokens are ~130 characters today; leave room for growth
SUCCESS = "80000000"
PARTIAL = "80100000"

# result code -> Row; HMS answers most codes with HTTP 200 or a 4xx that varies, so rows match any status
# (`m.ANY`) and only the HTTP status decides when the body carries no code (e.g. 503 traffic control).
HMS_TABLE: m.Table = {
    (m.ANY, SUCCESS): m.DELIVERED,
    (m.ANY, PARTIAL): m.DELIVERED,  # for the tokens not listed as illegal
    (m.ANY, "80100001"): m.REJECTED,  # some parameters are wrong
    (m.ANY, "80100003"): m.REJECTED,  # incorrect message structure
    (m.ANY, "80100004"): m.REJECTED,  # TTL earlier than now
    (m.ANY, "80100013"): m.REJECTED,  # collapse_key illegal
    (m.ANY, "80200001"): m.AUTH_FAILURE,  # OAuth authentication error
    (m.ANY, "80200003"): m.REFRESH_THEN_AUTH_FAILURE,  # OAuth token expired
    (m.ANY, "80300002"): m.AUTH_FAILURE,  # no permission to send to these devices (app id)
    (m.ANY, "80300007"): m.INVALID_TOKEN,  # all tokens invalid
    (m.ANY, "80300008"): m.REJECTED,  # message body too large
    (m.ANY, "80300010"): m.REJECTED,  # too many tokens
    (m.ANY, "80300011"): m.REJECTED,  # no permission for high-priority notifications
    (m.ANY, "80000001"): m.SERVER_ERROR,  # traffic control / system busy (with HTTP 503)
    (m.ANY, "81000001"): m.SERVER_ERROR,  # internal error
}


@dataclass(frozen=True, slots=True)
class _Rendered:
    message: PushMessage
    suffix: bytes  # after the token list


_PREFIX = b'{"validate_only":false,"message":{"token":'


def render_message(message: PushMessage) -> dict[str, Any]:
    """The HMS `message` object without its token list."""
    data = message.rendered_data()
    if message.url:
        data["url"] = message.url
    android: dict[str, Any] = {"urgency": "HIGH" if message.priority == "high" else "NORMAL"}
    if message.ttl is not None:
        android["ttl"] = f"{message.ttl}s"
    if not message.silent:
        notification: dict[str, Any] = {}
        if message.title:
            notification["title"] = message.title
        if message.body:
            notification["body"] = message.body
        if message.image:
            notification["image"] = message.image
        if message.sound:
            notification["sound"] = message.sound
        if message.collapse_key:
            notification["tag"] = message.collapse_key
        # HMS requires an action: 2 opens the URL, 3 opens the app.
        notification["click_action"] = {"type": 2, "url": message.url} if message.url else {"type": 3}
        android["notification"] = notification
    # HMS carries data as one string.
    return {"android": android, "data": orjson.dumps(data).decode()}


class HmsProvider(Provider):
    platform = "huawei"
    queue = "hms"
    payload_limit = MAX_REQUEST_BYTES
    topics = True

    def __init__(self, engine: Engine, app_id: str, auth: AuthToken) -> None:
        self._engine = engine
        self._path = f"/v1/{app_id}/messages:send"
        self._auth = auth
        self._renders: dict[str, _Rendered] = {}

    @classmethod
    def from_app(cls, app: App) -> HmsProvider:
        base_url = settings.HMS_ENDPOINT
        engine = provider_engine(base_url, kind="httpx")
        if not (app.hms_app_id and app.hms_client_secret):
            auth = AuthToken(None, config_error=f"app {app.slug} lacks hms_app_id or hms_client_secret")
        else:
            source = HmsTokens(shared_cache(), app.hms_app_id, app.hms_client_secret, settings.HMS_TOKEN_URL)
            auth = AuthToken(source)
        return cls(engine, app.hms_app_id or "-", auth)

    @classmethod
    def payload_size(cls, message: PushMessage) -> int:
        # The whole request with a single token of TOKEN_RESERVE bytes (quoted, in a list).
        rest = len(orjson.dumps(render_message(message)))
        return len(_PREFIX) + TOKEN_RESERVE + 4 + rest + 1  # ["…"], then "," + rest[1:] + "}"

    def _render(self, message: PushMessage) -> _Rendered:
        rendered = self._renders.get(message.render_key)
        if rendered is not None and (rendered.message is message or rendered.message == message):
            return rendered
        fitted = fit_message(message, self.payload_size, self.payload_limit, self.platform)
        rest = orjson.dumps(render_message(fitted))
        rendered = _Rendered(message, b"," + rest[1:] + b"}")
        remember_render(self._renders, message.render_key, rendered)
        return rendered

    async def send(self, target: Target, message: PushMessage) -> Result:
        if target.kind in TOPIC_KINDS:
            # `{"message": {"topic" | "condition": ..., ...}}` in place of the token list.
            rendered = self._render(message)
            head = b'{"validate_only":false,"message":{' + orjson.dumps(target.kind) + b":"
            return (await self._send_batch([target], rendered, head + orjson.dumps(target.token)))[0]
        return (await self.send_many([target], message))[0]

    async def send_many(self, targets: list[Target], message: PushMessage) -> list[Result]:
        if not targets:
            return []
        # One request carries one text: devices are grouped by the language variant they get
        # (one group without localizations), each group packed into its own batches.
        groups: dict[str, tuple[_Rendered, list[int]]] = {}
        for i, target in enumerate(targets):
            variant = message.localized(target.locale)
            group = groups.get(variant.render_key)
            if group is None:
                group = groups[variant.render_key] = (self._render(variant), [])
            group[1].append(i)
        jobs = []
        for rendered, indexes in groups.values():
            members = [targets[i] for i in indexes]
            for batch in _pack(members, len(_PREFIX) + len(rendered.suffix) + 2):
                jobs.append(self._send_batch(batch, rendered))
        answers = [r for batch in await asyncio.gather(*jobs) for r in batch]
        if len(groups) == 1:
            return answers  # in the order of targets already
        by_target = {id(r.target): r for r in answers}
        return [by_target[id(t)] for t in targets]

    async def _send_batch(
        self, targets: list[Target], rendered: _Rendered, recipient: bytes | None = None
    ) -> list[Result]:
        if recipient is None:
            recipient = _PREFIX + orjson.dumps([t.token for t in targets])
        body = recipient + rendered.suffix
        try:
            token = await self._auth.current()
        except CredentialError as exc:
            return [m.credential_result(t, str(exc), transient=exc.transient) for t in targets]
        results, code = await self._attempt(targets, body, token)
        if code is not None and HMS_TABLE.get((m.ANY, code), m.DELIVERED).refresh_credential:
            try:
                newer = await self._auth.refresh(token)
            except CredentialError as exc:
                return [m.credential_result(t, str(exc), transient=exc.transient) for t in targets]
            if newer is not None:
                results, _ = await self._attempt(targets, body, newer)
        return results

    async def _attempt(
        self, targets: list[Target], body: bytes, token: IssuedToken
    ) -> tuple[list[Result], str | None]:
        headers = {
            "authorization": "Bearer " + token.value,
            "content-type": "application/json; charset=UTF-8",
        }
        try:
            resp = await self._engine.request(HttpRequest("POST", self._path, headers, body))
        except TransportError as exc:
            return [m.transport_result(t, exc) for t in targets], None
        code, msg, request_id = _answer(resp.body)
        dup = resp.maybe_duplicate
        if code == PARTIAL:
            illegal = _illegal_tokens(msg)
            return [
                Result(t, Outcome.INVALID_TOKEN, resp.status, "80100000: illegal token", request_id)
                if t.token in illegal
                else Result(t, Outcome.DELIVERED, resp.status, "", request_id, maybe_duplicate=dup)
                for t in targets
            ], code
        row = HMS_TABLE.get((m.ANY, code))
        if row is None or (code == SUCCESS and resp.status != 200):
            # No known code: a non-2xx status speaks for itself; a 2xx we cannot read is not a delivery
            # we can vouch for, and re-sending it could duplicate: fail the message visibly.
            row = m.by_status(resp.status) if resp.status >= 300 else m.REJECTED
        reason = f"{code}: {msg}" if code and code != SUCCESS else ""
        return [
            m.make_result(t, row, resp.status, reason, resp.headers, request_id, dup) for t in targets
        ], code


def _pack(targets: list[Target], fixed: int) -> list[list[Target]]:
    """Consecutive batches of at most BATCH_SIZE targets whose request stays within MAX_REQUEST_BYTES
    (a token too long to share a request goes alone, and HMS will say what it thinks of it)."""
    batches: list[list[Target]] = []
    batch: list[Target] = []
    size = fixed
    for target in targets:
        cost = len(orjson.dumps(target.token)) + 1  # as serialized, plus the comma
        if batch and (len(batch) == BATCH_SIZE or size + cost > MAX_REQUEST_BYTES):
            batches.append(batch)
            batch, size = [], fixed
        batch.append(target)
        size += cost
    if batch:
        batches.append(batch)
    return batches


def _answer(body: bytes) -> tuple[str, str, str]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", "", ""
    if not isinstance(doc, dict):
        return "", "", ""
    return str(doc.get("code") or ""), str(doc.get("msg") or ""), str(doc.get("requestId") or "")


def _illegal_tokens(msg: str) -> frozenset[str]:
    """The illegal tokens of an 80100000 answer; its `msg` is a JSON document inside a string."""
    try:
        detail = orjson.loads(msg)
    except orjson.JSONDecodeError:
        return frozenset()
    tokens = detail.get("illegal_tokens") if isinstance(detail, dict) else None
    return frozenset(t for t in tokens if isinstance(t, str)) if isinstance(tokens, list) else frozenset()
