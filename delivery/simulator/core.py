"""The provider logic of the simulator, independent of any HTTP server.

`Simulator.handle` maps one request (method, path, headers, body) to one `SimResponse`; the fronts
(fast.py, strict.py) only move bytes and honour `delay` and `drop`. All state lives here: knobs,
per-token attempt and delivery counts, totals by outcome, and issued OAuth tokens. The fronts are
single-threaded event loops, so no locking is needed.

The send paths are hot (the fast front must sustain >20k req/s on two cores shared with the
client): verified JWTs and VAPID headers are cached by their exact string, so each distinct
credential costs one signature check, and a request is otherwise a handful of dict operations.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol
from urllib.parse import parse_qs

import http_ece
import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from delivery import topics
from delivery.simulator import webpush_keys
from delivery.simulator.credentials import SimCredentials

FAULT_PREFIX = "fa0175"
JSON = [("content-type", "application/json")]
TEXT = [("content-type", "text/plain; charset=utf-8")]
APNS_MAX_PAYLOAD = 4096
APNS_MAX_PAYLOAD_VOIP = 5120
FCM_MAX_DATA = 4096
HMS_MAX_BODY = 4096
WEBPUSH_MAX_RECORD = 4096
APNS_JWT_MAX_AGE_S = 3600
FCM_TOKEN_TTL = 3599  # what Google's token endpoint announces
HMS_TOKEN_TTL = 3600
APNS_PUSH_TYPES = frozenset(
    {
        "alert",
        "background",
        "location",
        "voip",
        "complication",
        "fileprovider",
        "mdm",
        "liveactivity",
        "pushtotalk",
        "widgets",
        "controls",
    }
)
APNS_TOPIC_SUFFIXES = (".voip", ".complication", ".push-type.liveactivity", ".pushkit.fileprovider")
FCM_SCOPES = frozenset(
    {"https://www.googleapis.com/auth/firebase.messaging", "https://www.googleapis.com/auth/cloud-platform"}
)
FCM_MESSAGE_KEYS = frozenset(
    {
        "name",
        "data",
        "notification",
        "android",
        "webpush",
        "apns",
        "fcm_options",
        "token",
        "topic",
        "condition",
    }
)
_FCM_TTL = re.compile(r"^\d{1,9}(\.\d{1,9})?s$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HEX = frozenset("0123456789abcdefABCDEF")
_B64URL = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class Headers(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...


@dataclass(slots=True)
class SimResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    delay: float = 0.0  # seconds the front waits before answering (latency knob, slow tokens)
    drop: bool = False  # close the connection and never answer (fault 09)
    authenticated: bool = False  # the request's credentials were valid (strict front raises its limit)


@dataclass
class Knobs:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    outage_until: float = 0.0
    rate_limit_per_s: int = 0
    max_concurrent_streams: int = 1000
    apns_initial_streams: int = 1
    goaway_every: int = 0
    # Strict front: after this many requests a connection stops processing, answers what it processed
    # and is reset (TCP RST) with the rest unanswered and uncounted. 0: off.
    reset_every: int = 0
    # Strict front: a connection without a request for this many seconds is closed, as providers
    # close idle HTTP/2 connections: GOAWAY(NO_ERROR) then FIN, or with `idle_silent` the connection
    # goes dark instead (a NAT or load balancer that forgot it: the socket stays open, nothing sent
    # on it is read or answered), the case a client cannot see coming. 0: off.
    idle_timeout_s: float = 0.0
    idle_silent: bool = False
    apns_min_token_refresh_s: float = 0.0
    revoked_apns_keys: list[str] = field(default_factory=list)
    fcm_revoked: bool = False
    unregistered_timestamp_ms: int = 0  # 0: the simulator's start time
    retry_after_s: int = 1
    slow_ms: float = 2000.0
    apns_topics: list[str] = field(default_factory=list)  # empty: the generated topic
    record_payloads: bool = True
    # Issued FCM/HMS access tokens stop working this many seconds after issue (0: as announced, ~1 h),
    # without changing the announced expires_in: how a client meets 401 / 80200003 and must refresh.
    oauth_token_lifetime_s: float = 0.0
    seed: int = 0
    # The APNs front plays api.sandbox.push.apple.com instead of api.push.apple.com: a client
    # certificate without Apple's development extension answers 403 BadCertificateEnvironment.
    apns_sandbox: bool = False


KNOB_TYPES: dict[str, tuple[type, ...]] = {
    f.name: (float, int)
    if f.type == "float"
    else (int,)
    if f.type == "int"
    else (bool,)
    if f.type == "bool"
    else (list,)
    for f in fields(Knobs)
}


class ConfigError(ValueError):
    pass


def topic_key(provider: str, where: str, value: str) -> str:
    """Where the simulator counts a topic or condition send (`counts`, `last`): "fcm topic news"."""
    return f"{provider} {where} {value}"


def topic_problem(where: str, value: Any) -> str:
    """What FCM / HMS would say about a topic name or a condition, or "" (delivery/topics.py holds
    the rules both share). The v1 APIs take a bare topic name: no "/topics/" prefix."""
    if not isinstance(value, str) or not value:
        return f"Invalid {where}: expected a non-empty string."
    if where == "topic" and value.startswith(topics.TOPIC_PREFIX):
        return f"Invalid topic name {value!r}: give the name without the /topics/ prefix."
    try:
        if where == "topic":
            topics.normalize_topic(value)
        else:
            topics.condition_topics(value)
    except topics.TopicError as exc:
        return f"Invalid {where} {value[:100]!r}: {exc}."
    return ""


def fault_of(token: str) -> str:
    """The two-character fault code a token selects, or ""."""
    if len(token) >= 8 and token[:6].lower() == FAULT_PREFIX:
        return token[6:8]
    return ""


@dataclass(frozen=True, slots=True)
class ClientCert:
    """What the APNs front reads from a TLS client certificate the handshake verified."""

    topic: str  # the subject's UID: the app's bundle id
    environments: frozenset[str]  # "sandbox" (development extension), "production"

    @classmethod
    def from_der(cls, der: bytes) -> ClientCert:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        from delivery.simulator.credentials import APNS_DEVELOPMENT_OID, APNS_PRODUCTION_OID

        cert = x509.load_der_x509_certificate(der)
        uids = cert.subject.get_attributes_for_oid(NameOID.USER_ID)
        oids = {ext.oid for ext in cert.extensions}
        environments = {"sandbox"} if APNS_DEVELOPMENT_OID in oids else set()
        if APNS_PRODUCTION_OID in oids:
            environments.add("production")
        return cls(str(uids[0].value) if uids else "", frozenset(environments))


@dataclass(slots=True)
class _ApnsJwt:
    kid: str
    iat: int


@dataclass(slots=True)
class _Vapid:
    exp: int
    aud: str


class Simulator:
    """One provider world: APNs, FCM (+OAuth), HMS (+OAuth) and a Web Push service."""

    def __init__(self, creds: SimCredentials, front: str = "") -> None:
        self.creds = creds
        self.front = front
        self.started_ms = int(time.time() * 1000)
        self.knobs = Knobs()
        self.listeners: list[Callable[[Knobs], None]] = []  # told about every knob change
        self.reset_hooks: list[Callable[[], None]] = []  # fronts' own state to clear on reset
        self._apns_keys = {
            creds.apns_key_id: (
                creds.apns_team_id,
                serialization.load_pem_private_key(creds.apns_key_p8.encode(), None).public_key(),
            )
        }
        sa = orjson.loads(creds.fcm_service_account)
        self._fcm_project = sa["project_id"]
        self._fcm_email = sa["client_email"]
        self._fcm_public = serialization.load_pem_private_key(sa["private_key"].encode(), None).public_key()
        self._apns_jwts: dict[str, _ApnsJwt] = {}
        self._vapid: dict[str, _Vapid] = {}
        self._fcm_tokens: dict[str, float] = {}  # issued access token -> issue time (epoch s)
        self._hms_tokens: dict[str, float] = {}
        self._serial = 0
        self._id_prefix = secrets.token_hex(4)
        rand = secrets.token_hex(10)
        self._uuid_prefix = f"{rand[:8]}-{rand[8:12]}-4{rand[13:16]}-a{rand[17:20]}-"
        # Filled by the front: what only the transport can see.
        self.connections_opened = 0
        self.peak_streams_per_connection = 0
        self.in_flight = 0
        self.front_counters: dict[str, int] = {}
        self.reset()

    # ---- state -------------------------------------------------------------------------------
    def reset(self, config: bool = False) -> None:
        self.requests = 0
        self.by_outcome: dict[str, int] = {}
        self.delivered: dict[str, int] = {}
        self.delivered_total = 0
        self.attempts: dict[str, int] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self._apns_last_new_jwt: dict[str, float] = {}
        self._rate_window = 0
        self._rate_count = 0
        self.connections_opened = 0
        self.peak_streams_per_connection = 0
        self.front_counters = dict.fromkeys(self.front_counters, 0)
        for hook in self.reset_hooks:
            hook()
        if config:
            self.configure(asdict(Knobs()))

    def configure(self, changes: dict[str, Any]) -> Knobs:
        unknown = sorted(set(changes) - set(KNOB_TYPES))
        if unknown:
            raise ConfigError(
                f"unknown knob(s): {', '.join(unknown)}; known: {', '.join(sorted(KNOB_TYPES))}"
            )
        for name, value in changes.items():
            types = KNOB_TYPES[name]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                raise ConfigError(
                    f"knob {name}: expected {'/'.join(t.__name__ for t in types)}, got {value!r}"
                )
            if types == (list,) and not all(isinstance(item, str) for item in value):
                raise ConfigError(f"knob {name}: expected a list of strings")
            if name in ("max_concurrent_streams", "apns_initial_streams") and value < 1:
                raise ConfigError(f"knob {name}: must be >= 1")
            if name == "reset_every" and value < 0:
                raise ConfigError("knob reset_every: must be >= 0 (0: off)")
            if name == "error_rate" and not 0 <= value <= 1:
                raise ConfigError("knob error_rate: must be within [0, 1]")
        for name, value in changes.items():
            setattr(self.knobs, name, value)
        for listener in self.listeners:
            listener(self.knobs)
        return self.knobs

    def stats(self) -> dict[str, Any]:
        unique = len(self.delivered)
        return {
            "front": self.front,
            "requests": self.requests,
            "by_outcome": dict(self.by_outcome),
            "delivered_total": self.delivered_total,
            "delivered_unique": unique,
            "duplicates": self.delivered_total - unique,
            "connections_opened": self.connections_opened,
            "peak_streams_per_connection": self.peak_streams_per_connection,
            "in_flight": self.in_flight,
            **self.front_counters,
        }

    def _outcome(self, key: str) -> None:
        self.by_outcome[key] = self.by_outcome.get(key, 0) + 1

    def _attempt(self, token: str) -> int:
        n = self.attempts.get(token, 0) + 1
        self.attempts[token] = n
        return n

    def _deliver(self, token: str, record: dict[str, Any] | None) -> None:
        self.delivered[token] = self.delivered.get(token, 0) + 1
        self.delivered_total += 1
        if record is not None and self.knobs.record_payloads:
            self.last[token] = record

    def _next_id(self) -> int:
        self._serial += 1
        return self._serial

    def _uuid(self) -> str:
        # Unique per process start (random prefix) and cheap: this runs twice per APNs success.
        self._serial += 1
        return f"{self._uuid_prefix}{self._serial:012x}"

    def _unit(self, token: str, attempt: int, salt: int) -> float:
        """A deterministic number in [0, 1) for (seed, token, attempt): repeatable runs without a RNG."""
        digest = hashlib.blake2b(
            f"{self.knobs.seed}:{salt}:{attempt}:{token}".encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") / 18446744073709551616.0

    def _begin(self, token: str) -> tuple[int, str, float]:
        """Count the attempt and return (attempt, fault code, delay in s) for one token's send.
        The delay is only computed when a knob or a fault asks for one: this is the hot path."""
        attempt = self._attempt(token)
        fault = fault_of(token)
        k = self.knobs
        delay = self._delay(token, attempt, fault) if k.latency_ms or k.jitter_ms or fault else 0.0
        return attempt, fault, delay

    def _delay(self, token: str, attempt: int, fault: str) -> float:
        k = self.knobs
        ms = k.latency_ms
        if k.jitter_ms:
            ms += k.jitter_ms * self._unit(token, attempt, 1)
        if fault == "07":
            ms += k.slow_ms
        return ms / 1000.0

    def _global_fault(self, token: str, attempt: int) -> str:
        """'' or 'outage' / 'rate' / 'error': knobs that affect every token."""
        k = self.knobs
        if k.outage_until and time.time() < k.outage_until:
            return "outage"
        if k.rate_limit_per_s:
            window = int(time.monotonic())
            if window != self._rate_window:
                self._rate_window, self._rate_count = window, 0
            self._rate_count += 1
            if self._rate_count > k.rate_limit_per_s:
                return "rate"
        if k.error_rate and self._unit(token, attempt, 2) < k.error_rate:
            return "error"
        return ""

    # ---- dispatch ----------------------------------------------------------------------------
    def handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        body: bytes,
        scheme: str,
        authority: str,
        client_cert: ClientCert | None = None,
    ) -> SimResponse:
        if path.startswith("/3/device/"):
            self.requests += 1
            if client_cert is not None and not headers.get("authorization"):
                return self._apns_certificate(method, path[10:], headers, body, client_cert)
            return self._apns(method, path[10:], headers, body)
        if path.startswith("/v1/"):
            self.requests += 1
            if path.startswith("/v1/projects/"):
                return self._fcm(method, path, headers, body)
            return self._hms(method, path, headers, body)
        if path.startswith("/wp/"):
            self.requests += 1
            return self._webpush(method, path[4:], headers, body, scheme, authority)
        if path == "/token":
            self.requests += 1
            return self._fcm_oauth(method, body, scheme, authority)
        if path == "/oauth2/v3/token":
            self.requests += 1
            return self._hms_oauth(method, body)
        if path.startswith("/_sim/"):
            return self._admin(method, path[6:], query, body)
        return SimResponse(404, TEXT, b"not found\n")

    # ---- admin -------------------------------------------------------------------------------
    def _admin(self, method: str, name: str, query: str, body: bytes) -> SimResponse:
        try:
            payload = orjson.loads(body) if body else {}
            if not isinstance(payload, dict):
                raise ConfigError("the body must be a JSON object")
            if name == "stats" and method == "GET":
                return _json(200, self.stats())
            if name == "config":
                if method == "POST":
                    self.configure(payload)
                elif method != "GET":
                    return _json(405, {"error": "use GET or POST"})
                return _json(200, asdict(self.knobs))
            if name == "reset" and method == "POST":
                self.reset(config=bool(payload.get("config")))
                return _json(200, {"reset": True})
            if name == "counts" and method == "POST":
                tokens = payload.get("tokens")
                if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                    raise ConfigError('expected {"tokens": [str, ...]}')
                get = self.delivered.get
                return _json(200, {"counts": {t: get(t, 0) for t in tokens}})
            if name == "last" and method == "POST":
                tokens = payload.get("tokens")
                if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                    raise ConfigError('expected {"tokens": [str, ...]}')
                return _json(200, {"last": {t: self.last.get(t) for t in tokens}})
            if name == "duplicates" and method == "GET":
                raw = parse_qs(query).get("limit", ["100"])[0]
                if not raw.isdigit():
                    raise ConfigError("limit must be a non-negative integer")
                dups = sorted(((t, c) for t, c in self.delivered.items() if c > 1), key=lambda tc: -tc[1])
                return _json(200, {"duplicates": dict(dups[: int(raw)]), "total": len(dups)})
        except (ConfigError, orjson.JSONDecodeError) as exc:
            return _json(400, {"error": str(exc)})
        return _json(404, {"error": f"no admin endpoint {method} /_sim/{name}"})

    # ---- APNs --------------------------------------------------------------------------------
    def _apns_error(
        self, status: int, reason: str, *, delay: float = 0.0, timestamp: int | None = None
    ) -> SimResponse:
        self._outcome(f"apns {status} {reason}")
        headers = [*JSON, ("apns-id", self._uuid())]
        if status == 429 or status == 503:
            headers.append(("retry-after", str(self.knobs.retry_after_s)))
        doc: dict[str, Any] = {"reason": reason}
        if timestamp is not None:
            doc["timestamp"] = timestamp
        return SimResponse(status, headers, orjson.dumps(doc), delay)

    def _verify_apns_jwt(self, token: str) -> _ApnsJwt | str:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        kid = header.get("kid")
        key = self._apns_keys.get(kid) if isinstance(kid, str) else None
        if key is None or header.get("alg") != "ES256":
            return "InvalidProviderToken"
        team, public = key
        try:
            claims = jwt.decode(
                token, public, algorithms=["ES256"], options={"verify_exp": False, "verify_iat": False}
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        iat = claims.get("iat")
        if claims.get("iss") != team or not isinstance(iat, int) or iat > time.time() + 60:
            return "InvalidProviderToken"
        if len(self._apns_jwts) > 10_000:
            self._apns_jwts.clear()
        return _ApnsJwt(kid, iat)

    def _apns(self, method: str, token: str, headers: Headers, body: bytes) -> SimResponse:
        if method != "POST":
            return self._apns_error(405, "MethodNotAllowed")
        auth = headers.get("authorization")
        if not auth:
            return self._apns_error(403, "MissingProviderToken")
        if auth[:7].lower() != "bearer ":
            return self._apns_error(403, "InvalidProviderToken")
        jwt_str = auth[7:]
        info = self._apns_jwts.get(jwt_str)
        if info is None:
            checked = self._verify_apns_jwt(jwt_str)
            if isinstance(checked, str):
                return self._apns_error(403, checked)
            min_refresh = self.knobs.apns_min_token_refresh_s
            now = time.monotonic()
            if min_refresh:
                last = self._apns_last_new_jwt.get(checked.kid)
                if last is not None and now - last < min_refresh:
                    return self._apns_error(429, "TooManyProviderTokenUpdates")
            self._apns_last_new_jwt[checked.kid] = now
            self._apns_jwts[jwt_str] = info = checked
        if info.kid in self.knobs.revoked_apns_keys:
            return self._apns_error(403, "InvalidProviderToken")
        if time.time() - info.iat > APNS_JWT_MAX_AGE_S:
            return self._apns_error(403, "ExpiredProviderToken")
        # From here on the credential is valid: APNs lifts its one-stream limit after such a request.
        resp = self._apns_checked(token, headers, body)
        resp.authenticated = True
        return resp

    def _apns_certificate(
        self, method: str, token: str, headers: Headers, body: bytes, cert: ClientCert
    ) -> SimResponse:
        """Certificate authentication: the TLS handshake verified the certificate against the client
        CA (a foreign one never gets this far: the handshake fails, as with Apple). The request needs
        no authorization header and may omit apns-topic (the certificate's topic is then used)."""
        if method != "POST":
            return self._apns_error(405, "MethodNotAllowed")
        environment = "sandbox" if self.knobs.apns_sandbox else "production"
        if environment not in cert.environments:
            return self._apns_error(403, "BadCertificateEnvironment")
        if not headers.get("apns-topic"):
            headers = {**dict(headers.items()), "apns-topic": cert.topic}  # type: ignore[attr-defined]
        resp = self._apns_checked(token, headers, body, allowed=(cert.topic,))
        resp.authenticated = True
        return resp

    def _apns_checked(
        self, token: str, headers: Headers, body: bytes, allowed: tuple[str, ...] = ()
    ) -> SimResponse:
        if not token:
            return self._apns_error(400, "MissingDeviceToken")
        if len(token) % 2 or not 16 <= len(token) <= 400 or not _HEX.issuperset(token):
            return self._apns_error(400, "BadDeviceToken")
        topic = headers.get("apns-topic")
        if not topic:
            return self._apns_error(400, "MissingTopic")
        base = topic
        for suffix in APNS_TOPIC_SUFFIXES:
            if topic.endswith(suffix):
                base = topic[: -len(suffix)]
                break
        allowed = allowed or self.knobs.apns_topics or (self.creds.apns_topic,)
        if base not in allowed:
            return self._apns_error(400, "TopicDisallowed")
        push_type = headers.get("apns-push-type")
        if push_type is not None and push_type not in APNS_PUSH_TYPES:
            return self._apns_error(400, "InvalidPushType")
        priority = headers.get("apns-priority")
        if priority is not None and priority not in ("10", "5", "1"):
            return self._apns_error(400, "BadPriority")
        if push_type == "background" and priority != "5":
            return self._apns_error(400, "BadPriority")
        expiration = headers.get("apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return self._apns_error(400, "BadExpirationDate")
        collapse = headers.get("apns-collapse-id")
        if collapse is not None and len(collapse.encode()) > 64:
            return self._apns_error(400, "BadCollapseId")
        apns_id = headers.get("apns-id")
        if apns_id is not None and not _UUID.match(apns_id):
            return self._apns_error(400, "BadMessageId")
        if not body:
            return self._apns_error(400, "PayloadEmpty")
        if len(body) > (APNS_MAX_PAYLOAD_VOIP if push_type == "voip" else APNS_MAX_PAYLOAD):
            return self._apns_error(413, "PayloadTooLarge")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            return self._apns_error(400, "PayloadEmpty")

        attempt, fault, delay = self._begin(token)
        if fault:
            if fault == "01":
                ts = self.knobs.unregistered_timestamp_ms or self.started_ms
                return self._apns_error(410, "Unregistered", timestamp=ts, delay=delay)
            if fault == "02":
                return self._apns_error(400, "BadDeviceToken", delay=delay)
            if fault == "08":
                return self._apns_error(400, "DeviceTokenNotForTopic", delay=delay)
            if (fault == "03" and attempt == 1) or (fault == "04" and attempt <= 2):
                return self._apns_error(429, "TooManyRequests", delay=delay)
            if fault == "05":
                return self._apns_error(503, "ServiceUnavailable", delay=delay)
            if fault == "06" and attempt == 1:
                return self._apns_error(500, "InternalServerError", delay=delay)
            if fault == "09" and attempt == 1:
                return self._drop("apns", delay)
        glob = self._global_fault(token, attempt) if self._any_global() else ""
        if glob:
            if glob == "rate":
                return self._apns_error(429, "TooManyRequests", delay=delay)
            return self._apns_error(503, "ServiceUnavailable", delay=delay)

        record = None
        if self.knobs.record_payloads:
            record = {
                "payload": payload,
                "headers": {
                    "apns-topic": topic,
                    "apns-push-type": push_type,
                    "apns-priority": priority,
                    "apns-expiration": expiration,
                    "apns-collapse-id": collapse,
                    "apns-id": apns_id,
                },
            }
        self._deliver(token, record)
        self._outcome("apns 200")
        return SimResponse(
            200, [("apns-id", apns_id or self._uuid()), ("apns-unique-id", self._uuid())], b"", delay
        )

    def _expired(self, issued: float, announced: float) -> bool:
        """An issued OAuth token lives as announced, or less when `oauth_token_lifetime_s` caps it."""
        cap = self.knobs.oauth_token_lifetime_s
        lifetime = min(announced, cap) if cap > 0 else announced
        return time.time() >= issued + lifetime

    def _any_global(self) -> bool:
        k = self.knobs
        return bool(k.outage_until or k.rate_limit_per_s or k.error_rate)

    def _drop(self, provider: str, delay: float) -> SimResponse:
        # The fast front cannot drop a connection from RSGI: it answers 500 instead (contract).
        self._outcome(f"{provider} drop")
        return SimResponse(500, TEXT, b"dropped\n", delay=delay, drop=True)

    # ---- FCM ---------------------------------------------------------------------------------
    def _fcm_oauth(self, method: str, body: bytes, scheme: str, authority: str) -> SimResponse:
        def fail(desc: str, error: str = "invalid_grant") -> SimResponse:
            self._outcome(f"fcm-oauth 400 {error}")
            return _json(400, {"error": error, "error_description": desc})

        if method != "POST":
            return _json(405, {"error": "invalid_request", "error_description": "POST required"})
        form = parse_qs(body.decode("utf-8", "replace"))
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return fail("Invalid grant_type", "unsupported_grant_type")
        assertion = (form.get("assertion") or [""])[0]
        if self.knobs.fcm_revoked:
            return fail("Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                self._fcm_public,
                algorithms=["RS256"],
                audience=f"{scheme}://{authority}/token",
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            return fail(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
            )
        except jwt.InvalidAudienceError:
            return fail("Invalid JWT audience.")
        except jwt.PyJWTError:
            return fail("Invalid JWT Signature.")
        if claims.get("iss") != self._fcm_email:
            return fail("Invalid email or User ID")
        if claims["exp"] - claims["iat"] > 3600:
            return fail(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."
            )
        if not FCM_SCOPES.intersection(str(claims.get("scope", "")).split()):
            return fail("Invalid OAuth scope or ID token audience provided.", "invalid_scope")
        token = "ya29.sim." + secrets.token_urlsafe(32)
        if len(self._fcm_tokens) > 10_000:
            now = time.time()
            self._fcm_tokens = {t: i for t, i in self._fcm_tokens.items() if i + FCM_TOKEN_TTL > now}
        self._fcm_tokens[token] = time.time()
        self._outcome("fcm-oauth 200")
        resp = _json(200, {"access_token": token, "expires_in": FCM_TOKEN_TTL, "token_type": "Bearer"})
        resp.authenticated = True
        return resp

    def _fcm_error(
        self,
        status: int,
        code: str,
        message: str,
        error_code: str | None = None,
        *,
        delay: float = 0.0,
        violations: list[dict[str, str]] | None = None,
    ) -> SimResponse:
        details: list[dict[str, Any]] = []
        if error_code:
            details.append(
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}
            )
        if violations:
            details.append(
                {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}
            )
        err: dict[str, Any] = {"code": status, "message": message, "status": code}
        if details:
            err["details"] = details
        self._outcome(f"fcm {status} {error_code or code}")
        headers = list(JSON)
        if status in (429, 503):
            headers.append(("retry-after", str(self.knobs.retry_after_s)))
        return SimResponse(status, headers, orjson.dumps({"error": err}), delay)

    def _fcm_bad(self, field_path: str, description: str) -> SimResponse:
        return self._fcm_error(
            400,
            "INVALID_ARGUMENT",
            description,
            "INVALID_ARGUMENT",
            violations=[{"field": field_path, "description": description}],
        )

    def _fcm(self, method: str, path: str, headers: Headers, body: bytes) -> SimResponse:
        project, sep, action = path[13:].partition("/")
        if method != "POST" or not sep or action != "messages:send":
            return self._fcm_error(404, "NOT_FOUND", "Requested entity was not found.")
        auth = headers.get("authorization") or ""
        issued = self._fcm_tokens.get(auth[7:]) if auth[:7].lower() == "bearer " else None
        if issued is None or self._expired(issued, FCM_TOKEN_TTL) or self.knobs.fcm_revoked:
            return self._fcm_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
                "or other valid authentication credential.",
            )
        if project != self._fcm_project:
            return self._fcm_error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist).",
            )
        resp = self._fcm_checked(project, body)
        resp.authenticated = True
        return resp

    def _fcm_checked(self, project: str, body: bytes) -> SimResponse:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            return self._fcm_bad("", "Invalid JSON payload received. Expected a JSON object.")
        for key in doc:
            if key not in ("message", "validate_only"):
                return self._fcm_bad(
                    "", f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
                )
        message = doc.get("message")
        if not isinstance(message, dict):
            return self._fcm_bad("message", "Invalid JSON payload received. 'message' must be an object.")
        invalid = _fcm_message_problem(message)
        if invalid:
            return self._fcm_bad(*invalid)
        if "topic" in message or "condition" in message:
            return self._fcm_topic(project, message, doc.get("validate_only") is True)
        token = message.get("token")
        if not isinstance(token, str) or not token:
            return self._fcm_bad("message.token", "Recipient of the message is not set.")
        if doc.get("validate_only") is True:
            self._outcome("fcm 200 validate_only")
            return _json(200, {"name": f"projects/{project}/messages/fake_message_id"})

        attempt, fault, delay = self._begin(token)
        if fault:
            if fault == "01":
                return self._fcm_error(
                    404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED", delay=delay
                )
            if fault == "02":
                return self._fcm_error(
                    400,
                    "INVALID_ARGUMENT",
                    "The registration token is not a valid FCM registration token",
                    "INVALID_ARGUMENT",
                    delay=delay,
                )
            if fault == "08":
                return self._fcm_error(
                    403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH", delay=delay
                )
            if (fault == "03" and attempt == 1) or (fault == "04" and attempt <= 2):
                return self._fcm_quota(delay)
            if fault == "05":
                return self._fcm_error(
                    503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE", delay=delay
                )
            if fault == "06" and attempt == 1:
                return self._fcm_error(
                    500, "INTERNAL", "Internal error encountered.", "INTERNAL", delay=delay
                )
            if fault == "09" and attempt == 1:
                return self._drop("fcm", delay)
        glob = self._global_fault(token, attempt) if self._any_global() else ""
        if glob:
            if glob == "rate":
                return self._fcm_quota(delay)
            return self._fcm_error(
                503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE", delay=delay
            )
        self._deliver(token, {"message": message} if self.knobs.record_payloads else None)
        self._outcome("fcm 200")
        name = f"projects/{project}/messages/0:{self._next_id()}%{self._id_prefix}"
        return SimResponse(200, JSON, orjson.dumps({"name": name}), delay)

    def _fcm_topic(self, project: str, message: dict[str, Any], validate_only: bool) -> SimResponse:
        """A topic or condition message: FCM fans it out itself and answers with one message name.
        Counted under topic_key(); a topic named fa0175NN... gets fault NN's 5xx/429 answers."""
        where = "topic" if "topic" in message else "condition"
        problem = topic_problem(where, message[where])
        if problem:
            return self._fcm_bad(f"message.{where}", problem)
        key = topic_key("fcm", where, message[where])
        if validate_only:
            self._outcome("fcm 200 validate_only")
            return _json(200, {"name": f"projects/{project}/messages/fake_message_id"})
        attempt, _, delay = self._begin(key)
        fault = fault_of(message[where]) if where == "topic" else ""
        if (fault in ("03", "04") and attempt <= (1 if fault == "03" else 2)) or (
            self._any_global() and self._global_fault(key, attempt) == "rate"
        ):
            return self._fcm_quota(delay)
        if (
            fault == "05"
            or (fault == "06" and attempt == 1)
            or (self._any_global() and self._global_fault(key, attempt))
        ):
            return self._fcm_error(
                503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE", delay=delay
            )
        self._deliver(key, {"message": message} if self.knobs.record_payloads else None)
        self._outcome(f"fcm 200 {where}")
        return SimResponse(
            200, JSON, orjson.dumps({"name": f"projects/{project}/messages/{self._next_id()}"}), delay
        )

    def _fcm_quota(self, delay: float) -> SimResponse:
        return self._fcm_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute'.",
            "QUOTA_EXCEEDED",
            delay=delay,
        )

    # ---- HMS ---------------------------------------------------------------------------------
    def _hms_oauth(self, method: str, body: bytes) -> SimResponse:
        if method != "POST":
            return _json(405, {"error": 1102, "sub_error": 0, "error_description": "POST required"})
        form = parse_qs(body.decode("utf-8", "replace"))
        if form.get("grant_type") != ["client_credentials"]:
            self._outcome("hms-oauth 400 1102")
            return _json(400, {"error": 1102, "sub_error": 20152, "error_description": "invalid grant_type"})
        if form.get("client_id") != [self.creds.hms_app_id] or form.get("client_secret") != [
            self.creds.hms_client_secret
        ]:
            self._outcome("hms-oauth 400 1101")
            return _json(400, {"error": 1101, "sub_error": 20152, "error_description": "invalid client"})
        token = "CF" + secrets.token_urlsafe(40)
        if len(self._hms_tokens) > 10_000:
            now = time.time()
            self._hms_tokens = {t: i for t, i in self._hms_tokens.items() if i + HMS_TOKEN_TTL > now}
        self._hms_tokens[token] = time.time()
        self._outcome("hms-oauth 200")
        resp = _json(200, {"access_token": token, "expires_in": HMS_TOKEN_TTL, "token_type": "Bearer"})
        resp.authenticated = True
        return resp

    def _hms_result(self, http: int, code: str, msg: str, delay: float = 0.0) -> SimResponse:
        self._outcome(f"hms {http} {code}")
        headers = list(JSON)
        if http == 503:
            headers.append(("retry-after", str(self.knobs.retry_after_s)))
        body = {"code": code, "msg": msg, "requestId": f"{self._id_prefix}{self._next_id():012d}"}
        return SimResponse(http, headers, orjson.dumps(body), delay)

    def _hms(self, method: str, path: str, headers: Headers, body: bytes) -> SimResponse:
        app_id, sep, action = path[4:].partition("/")
        if method != "POST" or not sep or action != "messages:send":
            return SimResponse(404, TEXT, b"not found\n")
        auth = headers.get("authorization") or ""
        issued = self._hms_tokens.get(auth[7:]) if auth[:7].lower() == "bearer " else None
        if issued is None:
            return self._hms_result(401, "80200001", "Oauth authentication error")
        if self._expired(issued, HMS_TOKEN_TTL):
            return self._hms_result(401, "80200003", "Oauth token expired")
        if app_id != self.creds.hms_app_id:
            return self._hms_result(
                403, "80300002", "There is no permission to send a message to a specified device"
            )
        resp = self._hms_checked(body)
        resp.authenticated = True
        return resp

    def _hms_checked(self, body: bytes) -> SimResponse:
        if len(body) > HMS_MAX_BODY:
            return self._hms_result(413, "80300008", "The message body size exceeds the default value")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        message = doc.get("message") if isinstance(doc, dict) else None
        if not isinstance(message, dict):
            return self._hms_result(400, "80100003", "Incorrect message structure")
        targets = [k for k in ("token", "topic", "condition") if k in message]
        if len(targets) != 1:
            return self._hms_result(400, "80100003", "Incorrect message structure")
        if targets[0] != "token":
            return self._hms_topic(message, targets[0], doc.get("validate_only") is True)
        tokens = message.get("token")
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            return self._hms_result(400, "80100003", "Incorrect message structure")
        if not 1 <= len(tokens) <= 1000:
            return self._hms_result(
                400, "80300010", "The number of tokens in the message body exceeds the default value"
            )
        if "data" in message and not isinstance(message["data"], str):
            return self._hms_result(400, "80100003", "Incorrect message structure")
        if "android" in message and not isinstance(message["android"], dict):
            return self._hms_result(400, "80100003", "Incorrect message structure")
        if doc.get("validate_only") is True:
            return self._hms_result(200, "80000000", "Success")

        # One request, many tokens: per-token faults either fail the whole request (the service's
        # own answer is per request) or put the token on the illegal list.
        delay = 0.0
        illegal: list[str] = []
        whole = ""
        drop = False
        attempts = []
        for token in tokens:
            attempt, fault, token_delay = self._begin(token)
            attempts.append(attempt)
            delay = max(delay, token_delay)
            if not fault:
                continue
            if fault in ("01", "02", "08"):
                illegal.append(token)
            elif (fault == "03" and attempt == 1) or (fault == "04" and attempt <= 2) or fault == "05":
                whole = whole or "503"
            elif fault == "06" and attempt == 1:
                whole = whole or "500"
            elif fault == "09" and attempt == 1:
                drop = True
        if drop:
            return self._drop("hms", delay)
        if not whole and self._any_global():
            whole = "503" if self._global_fault(tokens[0], attempts[0]) else ""
        if whole == "503":
            return self._hms_result(503, "80000001", "Traffic control: the system is busy", delay)
        if whole == "500":
            return self._hms_result(500, "81000001", "System internal error", delay)
        record = {"message": message} if self.knobs.record_payloads else None
        bad = set(illegal)
        for token in tokens:
            if token not in bad:
                self._deliver(token, record)
        if not illegal:
            return self._hms_result(200, "80000000", "Success", delay)
        if len(bad) == len(set(tokens)):
            return self._hms_result(400, "80300007", "All the tokens are invalid", delay)
        detail = {"success": len(tokens) - len(illegal), "failure": len(illegal), "illegal_tokens": illegal}
        return self._hms_result(200, "80100000", orjson.dumps(detail).decode(), delay)

    def _hms_topic(self, message: dict[str, Any], where: str, validate_only: bool) -> SimResponse:
        """A topic or condition message, fanned out by HMS: one answer, counted under topic_key()."""
        problem = topic_problem(where, message[where])
        if problem:
            return self._hms_result(400, "80100001", f"Some parameters are wrong: {where} {problem}")
        if validate_only:
            return self._hms_result(200, "80000000", "Success")
        key = topic_key("hms", where, message[where])
        attempt, _, delay = self._begin(key)
        fault = fault_of(message[where]) if where == "topic" else ""
        if (
            fault == "05"
            or (fault == "06" and attempt == 1)
            or (self._any_global() and self._global_fault(key, attempt))
        ):
            return self._hms_result(503, "80000001", "Traffic control: the system is busy", delay)
        self._deliver(key, {"message": message} if self.knobs.record_payloads else None)
        return self._hms_result(200, "80000000", "Success", delay)

    # ---- Web Push ----------------------------------------------------------------------------
    def _wp_error(self, status: int, text: str, delay: float = 0.0) -> SimResponse:
        self._outcome(f"webpush {status}")
        headers = list(TEXT)
        if status in (429, 503):
            headers.append(("retry-after", str(self.knobs.retry_after_s)))
        return SimResponse(status, headers, f"{status} {text}\n".encode(), delay)

    def _vapid_check(self, auth: str, origin: str) -> str:
        """'' when the VAPID header is valid for this origin, else why not."""
        cached = self._vapid.get(auth)
        if cached is None:
            if auth[:6].lower() != "vapid ":
                return "expected 'Authorization: vapid t=<JWT>, k=<key>'"
            params = {}
            for part in auth[6:].split(","):
                name, _, value = part.strip().partition("=")
                params[name.strip()] = value.strip()
            t, k = params.get("t"), params.get("k")
            if not t or not k:
                return "vapid header needs t= and k="
            try:
                point = webpush_keys.b64decode(k)
                public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
                claims = jwt.decode(
                    t, public, algorithms=["ES256"], options={"verify_exp": False, "verify_aud": False}
                )
            except (ValueError, jwt.PyJWTError) as exc:
                return f"invalid VAPID token: {exc.__class__.__name__}"
            exp, aud, sub = claims.get("exp"), claims.get("aud"), claims.get("sub")
            if not isinstance(exp, int):
                return "VAPID JWT has no exp"
            if not isinstance(sub, str) or not sub.startswith(("mailto:", "https:")):
                return "VAPID sub must be a mailto: or https: URI"
            if not isinstance(aud, str):
                return "VAPID JWT has no aud"
            if len(self._vapid) > 10_000:
                self._vapid.clear()
            self._vapid[auth] = cached = _Vapid(exp, aud)
        if cached.aud != origin:
            return f"VAPID aud {cached.aud!r} is not the push service origin {origin!r}"
        now = time.time()
        if cached.exp <= now:
            return "VAPID JWT expired"
        if cached.exp > now + 86400 + 60:
            return "VAPID exp is more than 24 hours in the future"
        return ""

    def _webpush(
        self, method: str, sub_id: str, headers: Headers, body: bytes, scheme: str, authority: str
    ) -> SimResponse:
        if method != "POST":
            return self._wp_error(405, "Method Not Allowed")
        if not sub_id or "/" in sub_id:
            return self._wp_error(404, "Not Found")
        problem = self._vapid_check(headers.get("authorization") or "", f"{scheme}://{authority}")
        if problem:
            return self._wp_error(401, f"Unauthorized: {problem}")
        resp = self._webpush_checked(sub_id, headers, body, scheme, authority)
        resp.authenticated = True
        return resp

    def _webpush_checked(
        self, sub_id: str, headers: Headers, body: bytes, scheme: str, authority: str
    ) -> SimResponse:
        ttl = headers.get("ttl")
        if ttl is None or not ttl.isdigit():
            return self._wp_error(400, "Bad Request: TTL header missing or not a number")
        urgency = headers.get("urgency")
        if urgency is not None and urgency not in ("very-low", "low", "normal", "high"):
            return self._wp_error(400, "Bad Request: invalid Urgency")
        topic = headers.get("topic")
        if topic is not None and not _B64URL.match(topic):
            return self._wp_error(400, "Bad Request: Topic must be at most 32 base64url characters")
        if len(body) > WEBPUSH_MAX_RECORD:
            return self._wp_error(413, "Payload Too Large")
        plaintext = b""
        if body:
            if (headers.get("content-encoding") or "").lower() != "aes128gcm":
                return self._wp_error(400, "Bad Request: Content-Encoding must be aes128gcm")
            try:
                plaintext = http_ece.decrypt(
                    body,
                    private_key=webpush_keys.private_key(sub_id),
                    auth_secret=webpush_keys.auth_secret(sub_id),
                    version="aes128gcm",
                )
            except Exception:  # http_ece raises bare ECEError/ValueError/InvalidTag variants
                return self._wp_error(
                    400, "Bad Request: the payload does not decrypt with the subscription keys"
                )

        attempt, fault, delay = self._begin(sub_id)
        if fault:
            if fault in ("01", "08"):
                return self._wp_error(410, "Gone", delay)
            if fault == "02":
                return self._wp_error(404, "Not Found", delay)
            if (fault == "03" and attempt == 1) or (fault == "04" and attempt <= 2):
                return self._wp_error(429, "Too Many Requests", delay)
            if fault == "05":
                return self._wp_error(503, "Service Unavailable", delay)
            if fault == "06" and attempt == 1:
                return self._wp_error(500, "Internal Server Error", delay)
            if fault == "09" and attempt == 1:
                return self._drop("webpush", delay)
        glob = self._global_fault(sub_id, attempt) if self._any_global() else ""
        if glob:
            return self._wp_error(
                429 if glob == "rate" else 503,
                "Too Many Requests" if glob == "rate" else "Service Unavailable",
                delay,
            )
        record = None
        if self.knobs.record_payloads:
            record = {
                "payload": plaintext.decode("utf-8", "replace"),
                "headers": {"ttl": ttl, "urgency": urgency, "topic": topic},
            }
        self._deliver(sub_id, record)
        self._outcome("webpush 201")
        location = f"{scheme}://{authority}/wp-msg/{self._next_id()}"
        return SimResponse(201, [("location", location), ("ttl", ttl)], b"", delay)


def _fcm_message_problem(message: dict[str, Any]) -> tuple[str, str] | None:
    """(field, description) of the first thing FCM would reject in `message`, or None."""
    for key in message:
        if key not in FCM_MESSAGE_KEYS:
            return (
                "message",
                f"Invalid JSON payload received. Unknown name \"{key}\" at 'message': Cannot find field.",
            )
    targets = [k for k in ("token", "topic", "condition") if k in message]
    if len(targets) > 1:
        return "message", "Exactly one of token, topic or condition must be set."
    data = message.get("data")
    if data is not None:
        if not isinstance(data, dict):
            return "message.data", "Invalid value at 'message.data' (map), expected an object."
        size = 0
        for i, (k, v) in enumerate(data.items()):
            if not isinstance(v, str):
                return (
                    f"message.data[{i}].value",
                    f"Invalid value at 'message.data[{i}].value' (TYPE_STRING), {v!r}",
                )
            if k in ("from", "message_type") or k.startswith(("google.", "gcm.")):
                return "message.data", f"Invalid data payload key: {k}"
            size += len(k.encode()) + len(v.encode())
        if size > FCM_MAX_DATA:
            return "message.data", "Android message is too big"
    notification = message.get("notification")
    if notification is not None:
        if not isinstance(notification, dict):
            return "message.notification", "Invalid value at 'message.notification', expected an object."
        for k, v in notification.items():
            if k not in ("title", "body", "image"):
                return (
                    "message.notification",
                    f"Invalid JSON payload received. Unknown name \"{k}\" at 'message.notification'",
                )
            if not isinstance(v, str):
                return (
                    f"message.notification.{k}",
                    f"Invalid value at 'message.notification.{k}' (TYPE_STRING), {v!r}",
                )
    android = message.get("android")
    if android is not None:
        if not isinstance(android, dict):
            return "message.android", "Invalid value at 'message.android', expected an object."
        priority = android.get("priority")
        if priority is not None and priority not in ("normal", "high", "NORMAL", "HIGH"):
            return "message.android.priority", f"Invalid value at 'message.android.priority', {priority!r}"
        ttl = android.get("ttl")
        if ttl is not None and (
            not isinstance(ttl, str) or not _FCM_TTL.match(ttl) or float(ttl[:-1]) > 2_419_200
        ):
            return (
                "message.android.ttl",
                f"Invalid value at 'message.android.ttl' (google.protobuf.Duration), {ttl!r}",
            )
        collapse = android.get("collapse_key")
        if collapse is not None and not isinstance(collapse, str):
            return (
                "message.android.collapse_key",
                "Invalid value at 'message.android.collapse_key' (TYPE_STRING)",
            )
        adata = android.get("data")
        if adata is not None and (
            not isinstance(adata, dict) or not all(isinstance(v, str) for v in adata.values())
        ):
            return "message.android.data", "Invalid value at 'message.android.data' (TYPE_STRING)"
        if "notification" in android and not isinstance(android["notification"], dict):
            return "message.android.notification", "Invalid value at 'message.android.notification'"
    for key in ("apns", "webpush", "fcm_options"):
        if key in message and not isinstance(message[key], dict):
            return f"message.{key}", f"Invalid value at 'message.{key}', expected an object."
    return None


def _json(status: int, doc: Any) -> SimResponse:
    return SimResponse(status, JSON, orjson.dumps(doc))
