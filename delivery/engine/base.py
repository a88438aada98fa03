"""The HTTP engine interface under the provider adapters.

An adapter builds HttpRequests and awaits `Engine.request` (or `request_many` for a chunk); it
never sees the transport. An engine multiplexes as many requests over its connections as the
server's SETTINGS allow and re-sends on its own only what the server provably did not process
(streams refused, or above a GOAWAY's last-stream-id). Anything else that fails without a
response raises TransportError, which says whether the request may have reached the server, so
the caller can count possible duplicates instead of hiding them.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

# Upper bounds (seconds) of the per-request latency histogram: from the request handed to a ready
# connection to its answer (the provider's time, one round trip, and any wait for a free stream
# under the provider's concurrency limit; connection and TLS set-up excluded where the engine can
# tell them apart).
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class HttpRequest:
    # `headers` may be shared by many requests and kept by the engine for the next ones (the libcurl
    # engine converts a dict once per handle): never modify a dict after handing it over.
    method: str
    url: str
    headers: dict[str, str]
    body: bytes = b""
    timeout: float | None = None


class HttpResponse:
    """A provider's answer. Header names are lower-cased; an engine may hand the raw header block
    instead of a dict (`raw_headers`), parsed on first use: a delivered send reads at most one
    header, and parsing every answer's block cost 4 % of a sending worker."""

    __slots__ = ("_headers", "_raw", "body", "maybe_duplicate", "status")

    def __init__(
        self,
        status: int,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        maybe_duplicate: bool = False,
        *,
        raw_headers: bytes = b"",
    ) -> None:
        self.status = status
        self._headers = headers
        self._raw = raw_headers
        self.body = body
        # The engine re-sent the request after its connection failed with it in flight: the server
        # may have processed the first copy too (a possible duplicate, to be counted by the caller).
        self.maybe_duplicate = maybe_duplicate

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = parse_headers(self._raw)
        return self._headers

    def header(self, name: str) -> str:
        """One header's value ("" when absent); `name` lower-case. Without parsing the block when
        the answer came over HTTP/2 (names lower-case, one "name: value" per line)."""
        if self._headers is None and self._raw.startswith(b"HTTP/2"):
            raw = self._raw
            start = raw.rfind(b"\r\n\r\n", 0, len(raw) - 4)  # after interim (1xx) blocks
            found = raw.find(b"\r\n" + name.encode() + b": ", max(start, 0))
            if found < 0:
                return ""
            found += len(name) + 4
            return raw[found : raw.index(b"\r\n", found)].decode("latin-1")
        return self.headers.get(name, "")

    def __repr__(self) -> str:
        return f"HttpResponse({self.status}, {self.headers!r}, {self.body!r}, {self.maybe_duplicate})"


def parse_headers(raw: bytes) -> dict[str, str]:
    """The last header block (earlier ones are interim 1xx responses), names lower-cased."""
    text = raw.decode("latin-1")
    start = text.rfind("\r\n\r\n", 0, len(text) - 4)
    if start >= 0:
        text = text[start + 4 :]
    lines = text.split("\r\n")
    headers: dict[str, str] = {}
    if text.startswith("HTTP/2") and text.endswith("\r\n\r\n"):
        # HTTP/2 names are lower-case and values carry no surrounding whitespace; libcurl writes
        # each field as "name: value". The common case, parsed without per-field normalising.
        for line in lines[1:-2]:
            name, _, value = line.partition(": ")
            headers[name] = value
        return headers
    for line in lines[1:]:  # HTTP/1.1 (no h2 from ALPN): any case, optional whitespace
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


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

    async def request_many(self, reqs: Sequence[HttpRequest]) -> list[HttpResponse | TransportError]:
        """Send them all at once; each one's answer, or its TransportError, in the order of `reqs`."""

        async def one(req: HttpRequest) -> HttpResponse | TransportError:
            try:
                return await self.request(req)
            except TransportError as exc:
                return exc

        return list(await asyncio.gather(*(one(req) for req in reqs)))

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close connections; pending requests fail with TransportError."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...
