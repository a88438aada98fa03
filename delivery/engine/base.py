"""The HTTP engine interface under the provider adapters.

An adapter builds an HttpRequest and awaits `Engine.request`; it never sees the transport. An
engine multiplexes as many requests over its connections as the server's SETTINGS allow and
re-sends on its own only what the server provably did not process (streams refused, or above a
GOAWAY's last-stream-id). Anything else that fails without a response raises TransportError,
which says whether the request may have reached the server, so the caller can count possible
duplicates instead of hiding them.
"""

from __future__ import annotations

import abc
import bisect
from dataclasses import dataclass, field, replace

# Upper bounds (seconds) of the per-request latency histogram: from the request handed to a ready
# connection to its answer (the provider's time, one round trip, and any wait for a free stream
# under the provider's concurrency limit; connection and TLS set-up excluded where the engine can
# tell them apart).
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes = b""
    timeout: float | None = None


@dataclass(slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes
    # The engine re-sent the request after its connection failed with it in flight: the server
    # may have processed the first copy too (a possible duplicate, to be counted by the caller).
    maybe_duplicate: bool = False


class TransportError(Exception):
    """No response. `may_have_reached` is False only when the server provably never processed it."""

    def __init__(self, message: str, *, may_have_reached: bool) -> None:
        super().__init__(message)
        self.may_have_reached = may_have_reached


@dataclass(slots=True)
class EngineStats:
    connections_opened: int = 0
    requests_sent: int = 0
    resent_unprocessed: int = 0  # re-sent after REFUSED_STREAM / above GOAWAY last-stream-id
    resent_maybe_processed: int = 0  # re-sent after the connection died with it in flight
    in_flight: int = 0
    peak_in_flight: int = 0
    # Requests assigned to one connection at once, as the client sees it (libcurl hands nghttp2
    # requests that it holds back while the server's SETTINGS_MAX_CONCURRENT_STREAMS is reached;
    # the server's own count is the figure on the wire). 0 where the engine cannot observe it.
    peak_streams_per_connection: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    # Answered requests per LATENCY_BOUNDS bucket (the last: above them all) and their sum.
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    latency_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.latency_sum += seconds

    def snapshot(self) -> EngineStats:
        """A copy the engine will not change under the caller."""
        return replace(self, extra=dict(self.extra), latency_counts=list(self.latency_counts))


class Engine(abc.ABC):
    """One per (provider endpoint, credential) in a worker process; long-lived and shared."""

    @abc.abstractmethod
    async def request(self, req: HttpRequest) -> HttpResponse:
        """Send one request; raise TransportError when no response arrives."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close connections; pending requests fail with TransportError."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...
