"""APNs as the simulator plays it: /3/device/<token> over HTTP/2, with token (JWT) or certificate auth.

What a client must get right against Apple: an ES256 provider token from a known key and team, not
older than an hour and not refreshed too often, or a client certificate for the right environment;
the apns-* headers and the payload limits. Answers carry Apple's reasons (`{"reason": ...}`).
Verified JWTs are cached by their exact string: the send path is hot.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization

from simulator.core import JSON, Core, Headers, SimResponse
from simulator.credentials import SimCredentials

APNS_MAX_PAYLOAD = 4096
APNS_MAX_PAYLOAD_VOIP = 5120
APNS_JWT_MAX_AGE_S = 3600
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
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HEX = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class ClientCert:
    """What the APNs front reads from a TLS client certificate the handshake verified."""

    topic: str  # the subject's UID: the app's bundle id
    environments: frozenset[str]  # "sandbox" (development extension), "production"

    @classmethod
    def from_der(cls, der: bytes) -> ClientCert:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        from simulator.credentials import APNS_DEVELOPMENT_OID, APNS_PRODUCTION_OID

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


class Apns(Core):
    """The APNs endpoints of the simulator (mixed into `simulator.world.Simulator`)."""

    def __init__(self, creds: SimCredentials, front: str = "") -> None:
        self._apns_keys = {
            creds.apns_key_id: (
                creds.apns_team_id,
                serialization.load_pem_private_key(creds.apns_key_p8.encode(), None).public_key(),
            )
        }
        self._apns_jwts: dict[str, _ApnsJwt] = {}
        super().__init__(creds, front)

    def reset(self, config: bool = False) -> None:
        self._apns_last_new_jwt: dict[str, float] = {}
        super().reset(config)

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
