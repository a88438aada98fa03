"""Web Push (RFC 8030, 8291, 8292) as the simulator plays a push service: POST /wp/<subscription id>.

What an application server must get right: a VAPID JWT for this service's origin, signed by the key it
names, with a sub and an exp within 24 hours; the TTL / Urgency / Topic headers; an aes128gcm record
that decrypts with the subscription's keys. The simulator plays the browser too (webpush_keys.py), so
it decrypts and records what it receives. Verified VAPID headers are cached by their exact string.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import http_ece
import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from simulator import webpush_keys
from simulator.core import TEXT, Core, Headers, SimResponse
from simulator.credentials import SimCredentials

WEBPUSH_MAX_RECORD = 4096
_B64URL = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(slots=True)
class _Vapid:
    exp: int
    aud: str


class WebPush(Core):
    """The Web Push endpoint of the simulator (mixed into `simulator.world.Simulator`)."""

    def __init__(self, creds: SimCredentials, front: str = "") -> None:
        self._vapid: dict[str, _Vapid] = {}
        super().__init__(creds, front)

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
