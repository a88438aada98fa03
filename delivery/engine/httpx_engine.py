"""The portable engine: httpx (h2 state machine in Python) for low-volume calls.

OAuth token exchanges, HMS and Web Push go through this engine; it is about 20x slower than the
libcurl engine per request, so the APNs/FCM hot path does not use it.

Known trap, handled conservatively: when a GOAWAY arrives httpx fails every request in flight on
that connection, including those at or below the last-stream-id that the server processed. They
surface as TransportError(may_have_reached=True), so the caller's re-send is counted as a
possible duplicate instead of passing for a clean retry.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import Callable, Iterable, Sequence

import httpcore
import httpx

from delivery.engine.base import Engine, EngineStats, HttpRequest, HttpResponse, TransportError

# Failures that happen before a request is written: the server cannot have seen it.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.ProxyError,
)
_IDLE_CONNECTION_MAX_AGE_S = 600.0

# (host, port) -> the addresses to connect to; None: resolve the name as usual.
Resolver = Callable[[str, int], Sequence[str] | None]


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the addresses `resolve` gives for the URL's host, not to a fresh DNS answer; TLS
    still verifies (and SNI still names) the URL's host, as httpcore passes it to start_tls. This is
    how the Web Push sender connects to the very address its SSRF check approved."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend, resolve: Resolver) -> None:
        self._inner = inner
        self._resolve = resolve

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[tuple] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = self._resolve(host, port)
        if addresses is None:
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        if not addresses:
            raise httpcore.ConnectError(f"no checked address for {host}:{port}; not connecting")
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[tuple] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class HttpxEngine(Engine):
    def __init__(
        self,
        base_url: str,
        *,
        ca_file: str | None = None,
        max_connections: int = 2,
        timeout: float = 15.0,
        h2c: bool = False,
        resolve: Resolver | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._base_url = base_url.rstrip("/")
        self._ca_file = ca_file
        self._max_connections = max_connections
        self._timeout = timeout
        self._h2c = h2c
        self._resolve = resolve
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seen_connections: weakref.WeakSet[object] = weakref.WeakSet()
        self._closed = False
        self._stats = EngineStats()

    def _new_client(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = True
        if self._ca_file:
            verify = ssl.create_default_context(cafile=self._ca_file)
        limits = httpx.Limits(
            max_connections=self._max_connections,
            max_keepalive_connections=self._max_connections,
            keepalive_expiry=_IDLE_CONNECTION_MAX_AGE_S,
        )
        # h2c: HTTP/2 with prior knowledge is what httpx speaks when HTTP/1.1 is off.
        transport = httpx.AsyncHTTPTransport(
            verify=verify, http1=not self._h2c, http2=True, limits=limits, retries=0
        )
        if self._resolve is not None:
            # httpx takes no network backend; its pool (httpcore) does, and reads it per connection.
            pool = transport._pool
            pool._network_backend = _PinnedBackend(pool._network_backend, self._resolve)
        return httpx.AsyncClient(
            base_url=self._base_url,
            transport=transport,
            timeout=self._timeout,
            follow_redirects=False,
        )

    async def request(self, req: HttpRequest) -> HttpResponse:
        if self._closed:
            raise TransportError("engine is closed", may_have_reached=False)
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._client is None:
            # httpx connections belong to the loop that opened them; a new loop needs a new client.
            self._client = self._new_client()
            self._loop = loop
        client = self._client
        stats = self._stats
        stats.requests_sent += 1
        stats.in_flight += 1
        if stats.in_flight > stats.peak_in_flight:
            stats.peak_in_flight = stats.in_flight
        started = loop.time()
        try:
            response = await client.request(
                req.method,
                req.url,
                headers=req.headers,
                content=req.body or None,
                timeout=req.timeout if req.timeout is not None else self._timeout,
            )
        except _NOT_SENT as exc:
            raise TransportError(_describe(exc), may_have_reached=False) from exc
        except httpx.TransportError as exc:
            raise TransportError(_describe(exc), may_have_reached=True) from exc
        finally:
            stats.in_flight -= 1
            self._note_connections(client)
        stats.observe(loop.time() - started)  # pool wait included: httpx does not tell them apart
        return HttpResponse(response.status_code, dict(response.headers.items()), response.content)

    def _note_connections(self, client: httpx.AsyncClient) -> None:
        # httpx exposes no connection events; its pool's connection list is the cheapest view.
        pool = getattr(client._transport, "_pool", None)
        for connection in getattr(pool, "connections", ()):
            if connection not in self._seen_connections:
                self._seen_connections.add(connection)
                self._stats.connections_opened += 1

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()

    def stats(self) -> EngineStats:
        return self._stats.snapshot()


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
