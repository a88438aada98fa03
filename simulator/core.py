"""The shared core of the simulated providers: knobs, fault codes, counters and the admin API.

`Core` holds what every provider shares and what a test reads back: the knobs, per-token attempt and
delivery counts, totals by outcome, and the deterministic fault injection (fault codes in tokens,
latency, error rate, outage, rate limit). Each provider module (apns.py, fcm.py, hms.py, webpush.py)
adds its protocol on top of it, and world.py puts the four behind one dispatch. The fronts are
single-threaded event loops, so no locking is needed.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson

from delivery import topics
from simulator.credentials import SimCredentials

FAULT_PREFIX = "fa0175"
JSON = [("content-type", "application/json")]
TEXT = [("content-type", "text/plain; charset=utf-8")]


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


def json_response(status: int, doc: Any) -> SimResponse:
    return SimResponse(status, JSON, orjson.dumps(doc))


class Core:
    """State and fault injection shared by the providers. Each provider class (apns.py, ...) extends
    it, setting up its own state before `super().__init__` and clearing it in `reset` before
    `super().reset`, so `Simulator(Apns, Fcm, Hms, WebPush)` is one object with one state."""

    def __init__(self, creds: SimCredentials, front: str = "") -> None:
        self.creds = creds
        self.front = front
        self.started_ms = int(time.time() * 1000)
        self.knobs = Knobs()
        self.listeners: list[Callable[[Knobs], None]] = []  # told about every knob change
        self.reset_hooks: list[Callable[[], None]] = []  # fronts' own state to clear on reset
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

    # ---- admin -------------------------------------------------------------------------------
    def _admin(self, method: str, name: str, query: str, body: bytes) -> SimResponse:
        try:
            payload = orjson.loads(body) if body else {}
            if not isinstance(payload, dict):
                raise ConfigError("the body must be a JSON object")
            if name == "stats" and method == "GET":
                return json_response(200, self.stats())
            if name == "config":
                if method == "POST":
                    self.configure(payload)
                elif method != "GET":
                    return json_response(405, {"error": "use GET or POST"})
                return json_response(200, asdict(self.knobs))
            if name == "reset" and method == "POST":
                self.reset(config=bool(payload.get("config")))
                return json_response(200, {"reset": True})
            if name == "counts" and method == "POST":
                tokens = payload.get("tokens")
                if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                    raise ConfigError('expected {"tokens": [str, ...]}')
                get = self.delivered.get
                return json_response(200, {"counts": {t: get(t, 0) for t in tokens}})
            if name == "last" and method == "POST":
                tokens = payload.get("tokens")
                if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                    raise ConfigError('expected {"tokens": [str, ...]}')
                return json_response(200, {"last": {t: self.last.get(t) for t in tokens}})
            if name == "duplicates" and method == "GET":
                raw = parse_qs(query).get("limit", ["100"])[0]
                if not raw.isdigit():
                    raise ConfigError("limit must be a non-negative integer")
                dups = sorted(((t, c) for t, c in self.delivered.items() if c > 1), key=lambda tc: -tc[1])
                return json_response(200, {"duplicates": dict(dups[: int(raw)]), "total": len(dups)})
        except (ConfigError, orjson.JSONDecodeError) as exc:
            return json_response(400, {"error": str(exc)})
        return json_response(404, {"error": f"no admin endpoint {method} /_sim/{name}"})

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
