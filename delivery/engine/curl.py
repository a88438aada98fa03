"""The default engine: libcurl (pycurl) + nghttp2, driven by the asyncio event loop.

One `CurlMulti` per engine multiplexes every request over at most `max_connections` HTTP/2
connections. libcurl tells us which sockets it cares about (M_SOCKETFUNCTION) and when it wants
to be woken (M_TIMERFUNCTION); the loop watches those sockets and calls `socket_action`, so there
is no polling and no thread. Finished transfers are collected with `info_read` right after each
`socket_action`.

Resends. libcurl re-sends a request on its own (up to 5 times) in two cases: the stream was
refused (REFUSED_STREAM, which is also how nghttp2 closes streams above a GOAWAY's
last-stream-id), and the request's reused connection failed before a single response byte
arrived. The first is safe; the second is not (the server may have processed the request and
died before answering). PREREQFUNCTION runs once per attempt, which counts the resends and names
the connection (local port) of each attempt. A resend is judged unsafe on evidence that its
earlier connection failed: libcurl recorded an error for the transfer (it records none for a
refusal), or another request on that connection failed with a connection error. A response that
follows an unsafe resend is marked `maybe_duplicate`. A transfer that exhausted libcurl's
resends with nothing but refusals is re-submitted here until its deadline, so a GOAWAY storm
loses nothing. Two residual cases, both rare and both on the safe side of "counted": a
connection that dies under exactly one request, over TLS, leaves no evidence (that resend counts
as unprocessed); and libcurl fails, without saying why, a request that nghttp2 still held back
when a GOAWAY arrived, so it raises as "may have reached" although it was above the
last-stream-id (the caller's re-send is counted as a possible duplicate that is not one).

may_have_reached: PREREQFUNCTION runs after the connection is up and before the request is
written. A transfer that failed before it ever ran (resolve, connect, TLS, or a timeout while
queued for a connection or a stream slot) provably never reached the server.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import io
import os
import random
import ssl
from collections.abc import Sequence
from typing import Any, Protocol

import pycurl

from delivery.engine.base import Engine, EngineStats, HttpRequest, HttpResponse, TransportError

_CSELECT_IN = pycurl.CSELECT_IN
_CSELECT_OUT = pycurl.CSELECT_OUT
_POLL_IN = pycurl.POLL_IN
_POLL_OUT = pycurl.POLL_OUT
_POLL_REMOVE = pycurl.POLL_REMOVE
_SOCKET_TIMEOUT = pycurl.SOCKET_TIMEOUT
_RESPONSE_CODE = pycurl.RESPONSE_CODE
_NUM_CONNECTS = pycurl.NUM_CONNECTS
_PRETRANSFER_TIME = pycurl.PRETRANSFER_TIME  # the request is handed to its (ready) connection
_TOTAL_TIME = pycurl.TOTAL_TIME
_PREREQ_OK = pycurl.PREREQFUNC_OK

# How often libcurl is asked to look at every transfer in flight (CurlEngine._on_scan): the
# longest a response can wait after a wake-up libcurl failed to ask for. One socket_all per second
# per engine costs nothing next to thousands of requests (tornado's curl client does the same).
_SCAN_S = 1.0
# libcurl caps streams per connection at 100 unless told otherwise; the server's
# SETTINGS_MAX_CONCURRENT_STREAMS is the real limit (APNs: ~1,000-1,500 once authenticated).
_MAX_STREAMS_PER_CONNECTION = 4096
# Requests beyond this many per connection wait in Python rather than as parked libcurl
# handles: libcurl rescans its pending list on every state change.
_HANDLES_PER_CONNECTION = 2048
# A pooled connection idle longer than this is closed instead of reused (CURLOPT_MAXAGE_CONN, whole
# seconds, checked when libcurl picks a connection for a request). Providers and the middleboxes in
# front of them drop idle HTTP/2 connections, not always with a GOAWAY the client has read by then:
# a request written to such a connection meets a reset or no answer at all, a failed attempt that
# may count as a possible duplicate. Retiring the connection first costs a new handshake instead.
# Configured below the provider's idle timeout (settings.PUSH_CONNECTION_IDLE_MAX_S).
DEFAULT_IDLE_MAX_S = 60
# A request whose connection died under it before any byte of its answer arrived is re-submitted
# here at once (libcurl then opens a fresh connection), at most this many times: a connection cut
# by a load balancer or a restarting server must not turn its open streams into campaign-level
# retries with their backoff (and a chunk of "no answer" results into an open breaker). The server
# may have processed the first copy, so the answer is marked maybe_duplicate. The first re-submission
# goes at once; later ones wait a jittered, doubling pause (RECONNECT_BACKOFF_*), so a server that
# keeps cutting connections is not met by a reconnect storm of every request it cut.
_CONNECTION_LOSS_RESUBMITS = 5
_RECONNECT_BACKOFF_BASE_S = 0.05
_RECONNECT_BACKOFF_MAX_S = 1.0
_CONNECT_TIMEOUT_CAP_S = 10.0
_MAX_RESPONSE_BYTES = 1 << 20
# Requests with a body, or GET; HEAD would need libcurl told not to wait for a body.
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# libcurl keeps the first error message of a transfer. A transfer that ends with libcurl's
# "gave up re-sending" message had no attempt fail with an error of its own: every one was
# refused. Otherwise the message is that earlier error's. If a libcurl release rewords it, such
# transfers fail as "may have reached" instead of being re-submitted: conservative, never a
# hidden duplicate. (Stopping a transfer from PREREQFUNCTION instead would close its connection
# and fail every other request on it: measured.)
_ONLY_REFUSED_MESSAGE = "Connection died, tried"
_ONLY_REFUSED_CODES = frozenset({pycurl.E_SEND_ERROR, pycurl.E_RECV_ERROR})
# Errors that mean the connection failed under the request (not a timeout, not a stream reset).
# Not E_HTTP2: libcurl also returns it, without a message, for a stream above a GOAWAY's
# last-stream-id that nghttp2 had not yet opened, which would brand a cleanly drained
# connection as failed and every refused resend from it as a possible duplicate (measured).
_CONNECTION_FAILURES = frozenset(
    {pycurl.E_PARTIAL_FILE, pycurl.E_GOT_NOTHING, pycurl.E_SEND_ERROR, pycurl.E_RECV_ERROR}
)
# Connections that failed, remembered long enough to judge the resends they caused.
_FAILED_PORTS_KEPT = 1024
_FAILED_PORT_MEMORY_S = 300.0
_NO_PORTS: list[int] = []  # shared, never mutated: most transfers are never re-sent


class _Transfer:
    """A pooled easy handle with its response buffers; reused for many requests."""

    __slots__ = (
        "attempts",
        "body",
        "curl",
        "deadline",
        "engine",
        "future",
        "header_dict",
        "headers",
        "method",
        "parked",
        "port",
        "prev_ports",
        "resubmits",
        "timeout_ms",
        "url",
    )

    def __init__(self, engine: CurlEngine) -> None:
        self.engine = engine
        self.curl = curl = pycurl.Curl()
        self.body = io.BytesIO()
        self.headers = io.BytesIO()
        self.future: _Outcome | None = None
        self.url = ""  # URL and header dict currently set on the handle
        self.header_dict: dict[str, str] | None = None
        self.attempts = 0  # since the last (re-)submission
        self.deadline = 0.0  # loop time
        self.port = 0  # local port of the connection the current attempt runs on
        self.prev_ports: list[int] = _NO_PORTS  # connections of earlier attempts (resends)
        # Re-submissions after the connection died under an attempt (the first copy may have been
        # processed): the answer that follows is a possible duplicate.
        self.resubmits = 0
        self.parked = False  # waiting out a reconnect backoff: not in the multi handle
        self.method = "POST"
        self.timeout_ms = 0  # TIMEOUT_MS currently set on the handle
        curl.transfer = self  # lets info_read's handle lead back here without a dict lookup
        engine._configure(curl)
        # Bound C methods: libcurl writes straight into the buffers, no Python frame per chunk.
        curl.setopt(pycurl.WRITEFUNCTION, self.body.write)
        curl.setopt(pycurl.HEADERFUNCTION, self.headers.write)
        curl.setopt(pycurl.PREREQFUNCTION, self._prereq)

    def _prereq(self, remote_ip: str, local_ip: str, remote_port: int, local_port: int) -> int:
        self.engine._on_attempt(self, local_port)
        return _PREREQ_OK


class _Outcome(Protocol):
    """Where a transfer's answer goes: an asyncio Future, or a request_many batch's slot."""

    def done(self) -> bool: ...
    def set_result(self, result: HttpResponse, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...
    def get_loop(self) -> asyncio.AbstractEventLoop: ...


class _Batch:
    """A request_many call's answers; its future resolves with the last one."""

    __slots__ = ("future", "left", "outcomes")

    def __init__(self, future: asyncio.Future[None], size: int) -> None:
        self.future = future
        self.left = size
        self.outcomes: list[Any] = [None] * size

    def put(self, index: int, outcome: HttpResponse | TransportError) -> None:
        self.outcomes[index] = outcome
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(None)


class _BatchSlot:
    """One request's place in a _Batch, resolved like a Future (the engine's code paths do not
    tell them apart)."""

    __slots__ = ("batch", "index", "resolved")

    def __init__(self, batch: _Batch, index: int) -> None:
        self.batch = batch
        self.index = index
        self.resolved = False

    def done(self) -> bool:
        return self.resolved

    def set_result(self, result: HttpResponse, /) -> None:
        self.resolved = True
        self.batch.put(self.index, result)

    def set_exception(self, exception: BaseException, /) -> None:
        assert isinstance(exception, TransportError)  # the engine fails transfers with nothing else
        self.resolved = True
        self.batch.put(self.index, exception)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.batch.future.get_loop()


class CurlEngine(Engine):
    """libcurl HTTP/2 engine for one endpoint. Not thread-safe: one event loop uses it at a time
    (a worker's loop for its lifetime); on a new loop it starts over with new connections."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: str | None = None,
        max_connections: int = 2,
        timeout: float = 15.0,
        h2c: bool = False,
        client_cert: tuple[bytes, bytes] | None = None,
        idle_max_s: int = DEFAULT_IDLE_MAX_S,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._base_url = base_url.rstrip("/")
        self._ca_file = ca_file or system_ca_file()
        self._max_connections = max_connections
        self._idle_max_s = max(1, int(idle_max_s))
        self._timeout_ms = max(1, int(timeout * 1000))
        self._http_version = (
            pycurl.CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE if h2c else pycurl.CURL_HTTP_VERSION_2TLS
        )
        self._max_active = _HANDLES_PER_CONNECTION * max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._multi: pycurl.CurlMulti | None = None
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._timer_soon = False  # the pending timer is a call_soon
        self._scan: asyncio.TimerHandle | None = None  # the periodic scan while requests are in flight
        self._watched: dict[int, int] = {}  # fd -> POLL_* mask currently registered with the loop
        self._pool: list[_Transfer] = []
        self._active: set[_Transfer] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._streams_by_port: dict[int, int] = {}
        # Connections (by local port, as PREREQFUNCTION names them) that failed under their
        # requests, with the loop time: judged when the resends they caused complete.
        self._failed_ports: dict[int, float] = {}
        self._closed = False
        self._stats = EngineStats()
        # (certificate PEM, key PEM) for TLS client authentication (APNs certificate auth); held in
        # memory and handed to libcurl as blobs, never written to a file.
        self._client_cert = client_cert

    # --- public interface ------------------------------------------------------------------
    async def request(self, req: HttpRequest) -> HttpResponse:
        loop = self._running_loop()
        if len(self._active) >= self._max_active:
            await self._stream_slot(loop)
        future: asyncio.Future[HttpResponse] = loop.create_future()
        transfer = self._submit(req, loop, future)
        try:
            return await future
        except asyncio.CancelledError:
            if transfer.future is future:  # still ours: not finished and handed to another request
                self._abandon(transfer)
            raise

    async def request_many(self, reqs: Sequence[HttpRequest]) -> list[HttpResponse | TransportError]:
        """All of `reqs` handed to libcurl at once, and one wake-up when the last is answered: none of
        request()'s task, coroutine frames, future and wake-ups per request."""
        try:
            loop = self._running_loop()
        except TransportError as exc:  # closed: as request() would answer each
            return [TransportError(str(exc), may_have_reached=False) for _ in reqs]
        batch = _Batch(loop.create_future(), len(reqs))
        submitted: list[tuple[_Transfer, _BatchSlot]] = []
        try:
            for index, req in enumerate(reqs):
                if len(self._active) >= self._max_active:
                    try:
                        await self._stream_slot(loop)
                    except TransportError as exc:  # closed meanwhile: the rest never left
                        for rest in range(index, len(reqs)):
                            batch.put(rest, TransportError(str(exc), may_have_reached=False))
                        break
                slot = _BatchSlot(batch, index)
                submitted.append((self._submit(req, loop, slot), slot))
            if batch.left:
                await batch.future
        except BaseException:  # cancelled, or a request the engine cannot send (ValueError)
            for transfer, slot in submitted:
                if transfer.future is slot:
                    self._abandon(transfer)
            raise
        return batch.outcomes

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise TransportError("engine is closed", may_have_reached=False)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        return loop

    async def _stream_slot(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until fewer than _max_active requests are in libcurl's hands."""
        while len(self._active) >= self._max_active:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                self._wake_next_if_free()
                raise
            if self._closed:
                raise TransportError("engine is closed", may_have_reached=False)

    def _submit(self, req: HttpRequest, loop: asyncio.AbstractEventLoop, future: _Outcome) -> _Transfer:
        """Hand `req` to libcurl on a pooled handle; its answer or failure goes to `future`."""
        transfer = self._pool.pop() if self._pool else _Transfer(self)
        curl = transfer.curl
        url = req.url if "://" in req.url else self._base_url + req.url
        if url != transfer.url:
            curl.setopt(pycurl.URL, url)
            transfer.url = url
        if req.headers is not transfer.header_dict:
            # An adapter sends one header dict for a whole chunk (Engine.request_many): converted
            # to libcurl's list once per handle, not once per request.
            curl.setopt(pycurl.HTTPHEADER, _header_lines(req.headers))
            transfer.header_dict = req.headers
        method = req.method.upper()
        if method != transfer.method:
            if method not in _METHODS:
                self._pool.append(transfer)
                raise ValueError(f"unsupported method {req.method!r}; expected one of {', '.join(_METHODS)}")
            _set_method(curl, method)
            transfer.method = method
        if method != "GET":
            curl.setopt(pycurl.POSTFIELDS, req.body)
        timeout_ms = self._timeout_ms if req.timeout is None else max(1, int(req.timeout * 1000))
        if timeout_ms != transfer.timeout_ms:
            curl.setopt(pycurl.TIMEOUT_MS, timeout_ms)
            transfer.timeout_ms = timeout_ms
        transfer.deadline = loop.time() + timeout_ms / 1000
        transfer.attempts = 0
        transfer.port = 0
        transfer.prev_ports = _NO_PORTS
        transfer.resubmits = 0
        transfer.future = future
        self._multi.add_handle(curl)
        self._active.add(transfer)
        if self._scan is None:
            self._scan = loop.call_later(_SCAN_S, self._on_scan)
        stats = self._stats
        stats.requests_sent += 1
        n = len(self._active)
        stats.in_flight = n
        if n > stats.peak_in_flight:
            stats.peak_in_flight = n
        return transfer

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._teardown(TransportError("engine closed with the request in flight", may_have_reached=True))
        for transfer in self._pool:
            transfer.curl.close()
        self._pool.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def stats(self) -> EngineStats:
        self._stats.in_flight = len(self._active)
        return self._stats.snapshot()

    # --- binding to a loop -------------------------------------------------------------------
    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the running loop; a new loop (the old one closed) gets a fresh multi."""
        if self._multi is not None:
            self._teardown(
                TransportError("event loop changed with the request in flight", may_have_reached=True)
            )
        self._loop = loop
        multi = self._multi = pycurl.CurlMulti()
        multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, self._max_connections)
        multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, self._max_connections)
        multi.setopt(pycurl.M_MAXCONNECTS, self._max_connections)
        multi.setopt(pycurl.M_MAX_CONCURRENT_STREAMS, _MAX_STREAMS_PER_CONNECTION)
        multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)

    def _teardown(self, error: TransportError) -> None:
        """Fail everything in flight and drop the multi handle (its connections close with it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_soon = False
        if self._scan is not None:
            self._scan.cancel()
            self._scan = None
        # Detach from the loop first: removing handles and closing the multi make libcurl call
        # the socket and timer callbacks, which must not touch a loop that may be closed.
        loop, self._loop = self._loop, None
        multi, self._multi = self._multi, None
        if loop is not None and not loop.is_closed():
            for fd in self._watched:
                loop.remove_reader(fd)
                loop.remove_writer(fd)
        self._watched.clear()
        for transfer in list(self._active):
            self._active.discard(transfer)
            if multi is not None and not transfer.parked:
                multi.remove_handle(transfer.curl)
            transfer.parked = False
            future = transfer.future
            transfer.future = None
            # A closed loop has nobody left awaiting; its futures cannot schedule callbacks.
            if future is not None and not future.done() and not future.get_loop().is_closed():
                reached = transfer.attempts > 0 or transfer.resubmits > 0
                future.set_exception(TransportError(str(error), may_have_reached=reached))
            _reset_buffers(transfer)
            self._pool.append(transfer)
        self._stats.in_flight = 0
        self._streams_by_port.clear()
        if multi is not None:
            multi.close()

    def _configure(self, curl: pycurl.Curl) -> None:
        """Options set once per pooled handle; only URL, headers, body and timeout vary."""
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.HTTP_VERSION, self._http_version)
        # Wait for an existing connection to confirm multiplexing instead of opening another:
        # a cold start then sends one request and lets the server's SETTINGS decide the rest.
        curl.setopt(pycurl.PIPEWAIT, 1)
        curl.setopt(pycurl.TCP_KEEPALIVE, 1)
        curl.setopt(pycurl.TCP_KEEPIDLE, 30)
        curl.setopt(pycurl.TCP_KEEPINTVL, 15)
        curl.setopt(pycurl.MAXAGE_CONN, self._idle_max_s)
        curl.setopt(
            pycurl.CONNECTTIMEOUT_MS, int(min(self._timeout_ms / 1000, _CONNECT_TIMEOUT_CAP_S) * 1000)
        )
        if self._ca_file:
            curl.setopt(pycurl.CAINFO, self._ca_file)
        if self._client_cert is not None:
            curl.setopt(pycurl.SSLCERT_BLOB, self._client_cert[0])
            curl.setopt(pycurl.SSLCERTTYPE, "PEM")
            curl.setopt(pycurl.SSLKEY_BLOB, self._client_cert[1])
            curl.setopt(pycurl.SSLKEYTYPE, "PEM")
            # TLS 1.2 only, for certificate authentication: in TLS 1.3 the client's handshake ends
            # before the server has judged the certificate, so a refusal arrives as a broken pipe
            # under the first request (looks like a dropped connection, "may have reached"). In
            # 1.2 the refusal ends the handshake itself (CURLE_SSL_CONNECT_ERROR): nothing was sent.
            curl.setopt(pycurl.SSLVERSION, pycurl.SSLVERSION_TLSv1_2 | pycurl.SSLVERSION_MAX_TLSv1_2)
        # A provider's answer is a few hundred bytes; a runaway body must not grow a worker.
        curl.setopt(pycurl.MAXFILESIZE_LARGE, _MAX_RESPONSE_BYTES)
        curl.setopt(pycurl.POST, 1)

    # --- libcurl callbacks (run inside socket_action / add_handle: never re-enter libcurl) ---
    def _on_socket(self, what: int, fd: int, multi: Any, socketp: Any) -> None:
        loop = self._loop
        # An engine dropped without aclose() is cleaned up by libcurl after its loop closed.
        if loop is None or loop.is_closed():
            return
        old = self._watched.get(fd, 0)
        new = 0 if what == _POLL_REMOVE else what & (_POLL_IN | _POLL_OUT)
        if (old ^ new) & _POLL_IN:
            if new & _POLL_IN:
                loop.add_reader(fd, self._drive, fd, _CSELECT_IN)
            else:
                loop.remove_reader(fd)
        if (old ^ new) & _POLL_OUT:
            if new & _POLL_OUT:
                loop.add_writer(fd, self._drive, fd, _CSELECT_OUT)
            else:
                loop.remove_writer(fd)
        if new:
            self._watched[fd] = new
        else:
            self._watched.pop(fd, None)

    def _on_timer(self, timeout_ms: int) -> None:
        # Every add_handle asks for "now": one wake-up on the next loop turn serves them all.
        if timeout_ms == 0 and self._timer_soon:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_soon = False
        loop = self._loop
        if timeout_ms < 0 or loop is None or loop.is_closed():
            return
        if timeout_ms == 0:
            self._timer = loop.call_soon(self._on_timeout)
            self._timer_soon = True
        else:
            self._timer = loop.call_later(timeout_ms / 1000, self._on_timeout)

    def _on_attempt(self, transfer: _Transfer, local_port: int) -> None:
        # Runs inside libcurl: it must not raise and must not call back into pycurl.
        stats = self._stats
        if transfer.attempts:
            if transfer.prev_ports is _NO_PORTS:
                transfer.prev_ports = []
            transfer.prev_ports.append(transfer.port)
            self._release_stream(transfer)
        transfer.attempts += 1
        transfer.port = local_port
        streams = self._streams_by_port.get(local_port, 0) + 1
        self._streams_by_port[local_port] = streams
        if streams > stats.peak_streams_per_connection:
            stats.peak_streams_per_connection = streams

    # --- driving libcurl -------------------------------------------------------------------------
    def _on_timeout(self) -> None:
        self._timer = None
        self._timer_soon = False
        self._drive(_SOCKET_TIMEOUT, 0)

    def _on_scan(self) -> None:
        """Every _SCAN_S while requests are in flight: let libcurl look at every transfer, not only
        those its socket and timer callbacks named. A response that arrived while libcurl reported
        no socket event or timer for it (seen under latency jitter and connection churn:
        docs/reliability.md, "The jitter duplicate") is then read within _SCAN_S instead of at the
        request's timeout, where it would be failed as "may have reached" and sent again."""
        self._scan = None
        multi = self._multi
        if multi is None or not self._active:
            return
        try:
            while multi.socket_all()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
        except pycurl.error as exc:
            self._teardown(TransportError(f"libcurl multi failed: {exc}", may_have_reached=True))
            return
        answered = self._collect()
        if answered:  # what the callbacks had not reported: the evidence of a missed wake-up
            extra = self._stats.extra
            extra["answered_by_scan"] = extra.get("answered_by_scan", 0) + answered
        if self._active and self._loop is not None and self._scan is None:
            self._scan = self._loop.call_later(_SCAN_S, self._on_scan)

    def _drive(self, fd: int, mask: int) -> None:
        multi = self._multi
        if multi is None:
            return
        try:
            multi.socket_action(fd, mask)
        except pycurl.error as exc:
            self._teardown(TransportError(f"libcurl multi failed: {exc}", may_have_reached=True))
            return
        self._collect()

    def _collect(self) -> int:
        """Hand out the transfers libcurl finished; how many it answered."""
        multi = self._multi
        answered = 0
        while multi is not None:
            queued, ok, failed = multi.info_read()
            if failed:
                # Connection failures first: they are the evidence for judging resends that
                # complete in this same batch.
                now = self._loop.time()
                for curl, code, message in failed:
                    if code in _CONNECTION_FAILURES and not message.startswith(_ONLY_REFUSED_MESSAGE):
                        self._note_failed_connection(curl.transfer.port, now)
            for curl in ok:
                self._finish(curl.transfer, 0, "")
            for curl, code, message in failed:
                self._finish(curl.transfer, code, message)
            answered += len(ok)
            if not queued:
                break
        return answered

    def _finish(self, transfer: _Transfer, code: int, message: str) -> None:
        curl = transfer.curl
        self._multi.remove_handle(curl)
        self._release_stream(transfer)
        stats = self._stats
        stats.connections_opened += curl.getinfo(_NUM_CONNECTS)
        resends = transfer.attempts - 1 if transfer.attempts > 1 else 0
        future = transfer.future
        if future is None or future.done():
            self._retire(transfer)
            return
        if code == 0:
            # Not STARTTRANSFER_TIME: for multiplexed transfers libcurl can report it before
            # PRETRANSFER_TIME. The body is a few bytes, so the end is the answer's arrival.
            stats.observe(curl.getinfo(_TOTAL_TIME) - curl.getinfo(_PRETRANSFER_TIME))
            maybe_duplicate = bool(resends) and self._resent_after_error(transfer, curl)
            if maybe_duplicate:
                stats.resent_maybe_processed += resends
            else:
                stats.resent_unprocessed += resends
            maybe_duplicate = maybe_duplicate or transfer.resubmits > 0
            future.set_result(
                HttpResponse(
                    curl.getinfo(_RESPONSE_CODE),
                    body=transfer.body.getvalue(),
                    maybe_duplicate=maybe_duplicate,
                    raw_headers=transfer.headers.getvalue(),
                )
            )
        elif (
            code in _ONLY_REFUSED_CODES
            and resends
            and message.startswith(_ONLY_REFUSED_MESSAGE)
            and not self._resent_after_error(transfer, curl, include_current=True)
        ):
            # Every attempt was refused: nothing reached the application. Go again, on a fresh
            # connection, within what is left of the request's deadline.
            stats.resent_unprocessed += transfer.attempts
            stats.extra["resubmitted_after_refusals"] = stats.extra.get("resubmitted_after_refusals", 0) + 1
            remaining_ms = int((transfer.deadline - self._loop.time()) * 1000)
            if remaining_ms <= 0:
                future.set_exception(
                    TransportError(
                        f"refused until the deadline: {message}", may_have_reached=transfer.resubmits > 0
                    )
                )
                self._retire(transfer)
                return
            transfer.attempts = 0
            transfer.prev_ports = _NO_PORTS
            _reset_buffers(transfer)
            curl.setopt(pycurl.TIMEOUT_MS, remaining_ms)
            transfer.timeout_ms = remaining_ms
            self._multi.add_handle(curl)
            return
        elif (
            code in _CONNECTION_FAILURES
            and transfer.attempts
            and transfer.resubmits < _CONNECTION_LOSS_RESUBMITS
            and not transfer.headers.tell()
            and self._resubmit(transfer, curl)
        ):
            # The connection died under the request before its answer began (a reset, a server
            # that went away): go again at once on a fresh connection. Not a campaign-level retry,
            # which would wait out a backoff for a request that never met the provider's verdict.
            stats.resent_maybe_processed += transfer.attempts
            stats.extra["resubmitted_after_connection_loss"] = (
                stats.extra.get("resubmitted_after_connection_loss", 0) + 1
            )
            return
        else:
            if resends:
                # libcurl's message is now this failure's own: the earlier attempts cannot be
                # told apart any more, so they count as possibly processed.
                stats.resent_maybe_processed += resends
            future.set_exception(
                TransportError(
                    f"curl error {code}: {message}"
                    + (
                        f" (re-submitted {transfer.resubmits}x after connection loss)"
                        if transfer.resubmits
                        else ""
                    ),
                    may_have_reached=transfer.attempts > 0 or transfer.resubmits > 0,
                )
            )
        self._retire(transfer)

    def _resubmit(self, transfer: _Transfer, curl: pycurl.Curl) -> bool:
        """Hand a transfer whose connection died back to libcurl with what is left of its deadline
        (False: nothing is left; the caller fails it)."""
        remaining_ms = int((transfer.deadline - self._loop.time()) * 1000)
        if remaining_ms <= 0:
            return False
        transfer.resubmits += 1
        transfer.attempts = 0
        transfer.prev_ports = _NO_PORTS
        _reset_buffers(transfer)
        if transfer.resubmits == 1:
            curl.setopt(pycurl.TIMEOUT_MS, remaining_ms)
            transfer.timeout_ms = remaining_ms
            self._multi.add_handle(curl)
            return True
        cap = min(_RECONNECT_BACKOFF_BASE_S * 2 ** (transfer.resubmits - 2), _RECONNECT_BACKOFF_MAX_S)
        delay = random.uniform(cap / 2, cap)
        if delay * 1000 >= remaining_ms:
            transfer.resubmits -= 1
            return False
        transfer.parked = True
        self._loop.call_later(delay, self._unpark, transfer, transfer.future, self._multi)
        return True

    def _unpark(self, transfer: _Transfer, future: _Outcome | None, multi: pycurl.CurlMulti | None) -> None:
        if not transfer.parked or transfer.future is not future or self._multi is not multi or multi is None:
            return  # cancelled, torn down or handed to another request meanwhile
        transfer.parked = False
        if future is None or future.done():
            self._retire(transfer)
            return
        remaining_ms = int((transfer.deadline - self._loop.time()) * 1000)
        if remaining_ms <= 0:
            future.set_exception(
                TransportError("connection lost; no time left to re-send", may_have_reached=True)
            )
            self._retire(transfer)
            return
        transfer.curl.setopt(pycurl.TIMEOUT_MS, remaining_ms)
        transfer.timeout_ms = remaining_ms
        multi.add_handle(transfer.curl)

    def _resent_after_error(
        self, transfer: _Transfer, curl: pycurl.Curl, include_current: bool = False
    ) -> bool:
        """Whether an earlier attempt may have been processed: its connection failed under it.

        Evidence, either enough: libcurl recorded an error message for a transfer that then
        succeeded (it records none for a refused stream, but over TLS the error may be recorded
        on another transfer of the connection), or another request on the connection of an
        earlier attempt failed with a connection error.
        """
        if not include_current and curl.errstr():
            return True
        failed = self._failed_ports
        if not failed:
            return False
        if include_current and transfer.port in failed:
            return True
        return any(port in failed for port in transfer.prev_ports)

    def _note_failed_connection(self, port: int, now: float) -> None:
        if not port:
            return
        failed = self._failed_ports
        failed[port] = now
        if len(failed) > _FAILED_PORTS_KEPT:
            horizon = now - _FAILED_PORT_MEMORY_S
            for stale in [p for p, t in failed.items() if t < horizon]:
                del failed[stale]

    def _retire(self, transfer: _Transfer) -> None:
        transfer.future = None
        self._active.discard(transfer)
        _reset_buffers(transfer)
        self._pool.append(transfer)
        if self._waiters:
            self._wake_next_if_free()

    def _abandon(self, transfer: _Transfer) -> None:
        """The caller gave up (cancelled): detach the handle; the stream is reset by libcurl."""
        if transfer.parked:
            transfer.parked = False
        else:
            self._multi.remove_handle(transfer.curl)
        self._release_stream(transfer)
        self._retire(transfer)

    def _release_stream(self, transfer: _Transfer) -> None:
        port = transfer.port
        if port:
            transfer.port = 0
            left = self._streams_by_port.get(port, 1) - 1
            if left > 0:
                self._streams_by_port[port] = left
            else:
                self._streams_by_port.pop(port, None)

    def _wake_next_if_free(self) -> None:
        waiters = self._waiters
        while waiters and len(self._active) < self._max_active:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


@functools.cache
def system_ca_file() -> str | None:
    """The system trust store as OpenSSL knows it (honours SSL_CERT_FILE), else certifi's.

    The libcurl bundled with the pycurl wheel looks for a Red Hat path
    (/etc/pki/tls/certs/ca-bundle.crt) by default; name the file explicitly instead.
    """
    cafile = ssl.get_default_verify_paths().cafile
    if cafile and os.path.isfile(cafile):
        return cafile
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def _reset_buffers(transfer: _Transfer) -> None:
    body = transfer.body
    if body.tell():
        body.seek(0)
        body.truncate()
    headers = transfer.headers
    if headers.tell():
        headers.seek(0)
        headers.truncate()


def _header_lines(headers: dict[str, str]) -> list[str]:
    """`name: value` lines (HTTP/2 sends names lower-case whatever their case here)."""
    lines = [f"{name}: {value}" for name, value in headers.items()]
    # libcurl adds these by default: a wrong form content type, and an Accept nobody needs.
    if "accept" not in headers and "Accept" not in headers:
        lines.append("Accept:")
    if "content-type" not in headers and "Content-Type" not in headers:
        lines.append("Content-Type:")
    return lines


def _set_method(curl: pycurl.Curl, method: str) -> None:
    if method == "GET":
        curl.unsetopt(pycurl.CUSTOMREQUEST)
        curl.setopt(pycurl.HTTPGET, 1)
    elif method == "POST":
        curl.unsetopt(pycurl.CUSTOMREQUEST)
        curl.setopt(pycurl.POST, 1)
    else:
        curl.setopt(pycurl.POST, 1)
        curl.setopt(pycurl.CUSTOMREQUEST, method)
