"""FCM HTTP v1 as the simulator plays it: the service account's OAuth token endpoint and messages:send.

What a client must get right against Google: an RS256 JWT-bearer assertion from the service account
(right issuer, audience, scope and lifetime), then the issued access token on each send to the right
project, and a message FCM would accept (field types, data keys, sizes, one target). Answers are
Google's error documents, with the FcmError code the adapters map from.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any
from urllib.parse import parse_qs

import jwt
import orjson
from cryptography.hazmat.primitives import serialization

from simulator.core import JSON, Core, Headers, SimResponse, fault_of, json_response, topic_key, topic_problem
from simulator.credentials import SimCredentials

FCM_MAX_DATA = 4096
FCM_TOKEN_TTL = 3599  # what Google's token endpoint announces
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


class Fcm(Core):
    """The FCM endpoints of the simulator (mixed into `simulator.world.Simulator`)."""

    def __init__(self, creds: SimCredentials, front: str = "") -> None:
        sa = orjson.loads(creds.fcm_service_account)
        self._fcm_project = sa["project_id"]
        self._fcm_email = sa["client_email"]
        self._fcm_public = serialization.load_pem_private_key(sa["private_key"].encode(), None).public_key()
        self._fcm_tokens: dict[str, float] = {}  # issued access token -> issue time (epoch s)
        super().__init__(creds, front)

    def _fcm_oauth(self, method: str, body: bytes, scheme: str, authority: str) -> SimResponse:
        def fail(desc: str, error: str = "invalid_grant") -> SimResponse:
            self._outcome(f"fcm-oauth 400 {error}")
            return json_response(400, {"error": error, "error_description": desc})

        if method != "POST":
            return json_response(405, {"error": "invalid_request", "error_description": "POST required"})
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
        resp = json_response(
            200, {"access_token": token, "expires_in": FCM_TOKEN_TTL, "token_type": "Bearer"}
        )
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
            return json_response(200, {"name": f"projects/{project}/messages/fake_message_id"})

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
            return json_response(200, {"name": f"projects/{project}/messages/fake_message_id"})
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
