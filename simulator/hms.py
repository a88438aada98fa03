"""HMS Push Kit as the simulator plays it: the client-credentials OAuth endpoint and messages:send.

What a client must get right against Huawei: an access token from the app's id and secret, the app id
in the path, and a message with up to 1000 tokens. HMS answers per request with its own codes
(80000000 success, 80100000 partial with the illegal tokens, 80300007 all invalid, ...), so per-token
faults either fail the whole request or put the token on the illegal list.
"""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import parse_qs

import orjson

from simulator.core import (
    JSON,
    TEXT,
    Core,
    Headers,
    SimResponse,
    fault_of,
    json_response,
    topic_key,
    topic_problem,
)
from simulator.credentials import SimCredentials

HMS_MAX_BODY = 4096
HMS_TOKEN_TTL = 3600


class Hms(Core):
    """The HMS endpoints of the simulator (mixed into `simulator.world.Simulator`)."""

    def __init__(self, creds: SimCredentials, front: str = "") -> None:
        self._hms_tokens: dict[str, float] = {}
        super().__init__(creds, front)

    def _hms_oauth(self, method: str, body: bytes) -> SimResponse:
        if method != "POST":
            return json_response(405, {"error": 1102, "sub_error": 0, "error_description": "POST required"})
        form = parse_qs(body.decode("utf-8", "replace"))
        if form.get("grant_type") != ["client_credentials"]:
            self._outcome("hms-oauth 400 1102")
            return json_response(
                400, {"error": 1102, "sub_error": 20152, "error_description": "invalid grant_type"}
            )
        if form.get("client_id") != [self.creds.hms_app_id] or form.get("client_secret") != [
            self.creds.hms_client_secret
        ]:
            self._outcome("hms-oauth 400 1101")
            return json_response(
                400, {"error": 1101, "sub_error": 20152, "error_description": "invalid client"}
            )
        token = "CF" + secrets.token_urlsafe(40)
        if len(self._hms_tokens) > 10_000:
            now = time.time()
            self._hms_tokens = {t: i for t, i in self._hms_tokens.items() if i + HMS_TOKEN_TTL > now}
        self._hms_tokens[token] = time.time()
        self._outcome("hms-oauth 200")
        resp = json_response(
            200, {"access_token": token, "expires_in": HMS_TOKEN_TTL, "token_type": "Bearer"}
        )
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
