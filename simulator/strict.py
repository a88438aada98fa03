"""The strict front: asyncio + h2 with full control of each HTTP/2 connection.

What APNs does to a connection and a pure-throughput server cannot reproduce:
- SETTINGS_MAX_CONCURRENT_STREAMS starts at `apns_initial_streams` (1) and is raised to
  `max_concurrent_streams` only after a request with valid credentials succeeded on that connection;
  changing `max_concurrent_streams` later re-advertises it on every raised connection, lowering it
  mid-connection included. Streams over the advertised limit are refused with REFUSED_STREAM (safe to
  retry: the server never saw them), enforced from the first SETTINGS frame on, so a client that bursts
  before it has read the server's SETTINGS is refused just as APNs does.
- GOAWAY every `goaway_every` requests with last-stream-id = the highest stream received so far: every
  stream up to it is answered, nothing above it is processed or counted, then the connection closes.
- Reset every `reset_every` requests: the connection stops processing, answers every request it
  processed, makes sure the client has read those answers (a PING round trip), then is aborted with a
  TCP RST while the requests that arrived after the Nth are still open. Those were never processed or
  counted: a load balancer or server restart cutting the connection, where resending is always safe.
- Fault 09 closes the connection with requests unanswered, including some it processed.
- Idle timeout (`idle_timeout_s`): a connection with no open stream and no request for that long is
  closed with GOAWAY(NO_ERROR) + FIN, or with `idle_silent` goes dark (nothing read or answered).
HTTP/1.1 is served too (cleartext or ALPN "http/1.1"), for admin calls from simple clients.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from simulator.apns import ClientCert
from simulator.core import Knobs, SimResponse
from simulator.world import Simulator

log = logging.getLogger("simulator.strict")

_PREFACE = b"PRI * HTTP/2.0"
_MAX_H1_HEADER = 64 * 1024
_MAX_BODY = 1024 * 1024
# After the last response of a GOAWAY'd connection: keep reading (and discarding) this long before
# closing, so the kernel does not answer the peer's in-flight bytes with a RST that could destroy
# our final frames in its receive buffer.
_LINGER_S = 1.0
# Opaque data of the PING that precedes a `reset_every` reset; its ACK proves the client has read
# every frame written before it.
_RESET_PING = b"rst-sync"
# SO_LINGER on with a zero timeout: close() discards what is unsent and sends RST instead of FIN.
_LINGER_RST = struct.pack("ii", 1, 0)


class _SelfEnforcedSettings(h2.settings.Settings):
    """h2 turns an excess stream into a connection error; we refuse the stream instead (RFC 9113 5.1.2)."""

    @property
    def max_concurrent_streams(self) -> int:
        return 2**31 - 1

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = value


class _Stream:
    __slots__ = ("body", "headers", "in_flight", "processing")

    def __init__(self, headers: list[tuple[str, str]]) -> None:
        self.headers = headers
        self.body = bytearray()
        self.processing = False
        self.in_flight = False  # counted in the simulator's in-flight gauge (admin requests are not)


class StrictFront:
    """Owns the live connections, so knob changes reach them."""

    def __init__(self, sim: Simulator, scheme: str) -> None:
        self.sim = sim
        self.scheme = scheme
        self.connections: set[_Connection] = set()
        sim.listeners.append(self._on_knobs)
        for name in (
            "refused_streams",
            "goaways_sent",
            "connections_dropped",
            "drops_on_closed_connections",
            "connections_reset",
            "requests_cut_by_reset",
            "settings_raised",
            "connections_closed_idle",
        ):
            sim.front_counters.setdefault(name, 0)

    def count(self, name: str, n: int = 1) -> None:
        counters = self.sim.front_counters
        counters[name] = counters.get(name, 0) + n

    def _on_knobs(self, knobs: Knobs) -> None:
        for conn in list(self.connections):
            conn.apply_limit(knobs.max_concurrent_streams)
            conn.arm_idle()

    def protocol(self) -> _Connection:
        return _Connection(self)


class _Connection(asyncio.Protocol):
    def __init__(self, front: StrictFront) -> None:
        self.front = front
        self.sim = front.sim
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.mode = ""  # "h2" | "h1" once known
        self.pending = b""
        self.closed = False
        self.counted = False  # counted in connections_opened at its first provider request (not admin)
        # HTTP/2 state
        self.h2: h2.connection.H2Connection | None = None
        self.streams: dict[int, _Stream] = {}
        self.unsent: dict[int, tuple[bytes, bool]] = {}  # body waiting for flow-control window
        self.limit = 0
        self.raised = False
        self.handled = 0
        self.goaway_last: int | None = None
        self.max_accepted = 0
        self.resetting = False  # reset_every reached: nothing new is processed on this connection
        self.reset_ping_sent = False
        self.cut = 0  # requests received after the reset point, left unprocessed
        self.last_request = self.loop.time()  # idle timeout: since the last request arrived
        self.idle_timer: asyncio.TimerHandle | None = None
        self.dark = False  # idle_silent fired: nothing more is read or answered
        # HTTP/1.1 state
        self.h1_busy = False
        self.h1_in_flight = False
        self.client_cert: ClientCert | None = None  # verified in the TLS handshake (APNs cert auth)

    # ---- transport events --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        self.front.connections.add(self)
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        self.client_cert = ClientCert.from_der(der) if der else None
        if sslobj is not None:
            alpn = sslobj.selected_alpn_protocol()
            if alpn:  # without ALPN (e.g. http.client) the first bytes tell, as in cleartext
                self._start("h1" if alpn == "http/1.1" else "h2")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.front.connections.discard(self)
        # Requests processed but never answered leave the in-flight gauge here.
        self.sim.in_flight -= sum(1 for s in self.streams.values() if s.in_flight)
        self.streams.clear()
        if self.h1_in_flight:
            self.sim.in_flight -= 1
            self.h1_in_flight = False

    def data_received(self, data: bytes) -> None:
        if self.closed or self.dark:
            return
        if not self.mode:
            self.pending += data
            if len(self.pending) < len(_PREFACE) and _PREFACE.startswith(self.pending):
                return
            data, self.pending = self.pending, b""
            self._start("h2" if data.startswith(_PREFACE) else "h1")
        if self.mode == "h2":
            self._h2_received(data)
        else:
            self.pending += data
            self._h1_next()

    def _start(self, mode: str) -> None:
        self.mode = mode
        if mode != "h2":
            return
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding="utf-8",
                validate_inbound_headers=True,  # a malformed request is the client's bug: surface it
                # Our own responses are well-formed lower-case headers; checking them costs ~10% CPU.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.limit = self.sim.knobs.apns_initial_streams
        conn.local_settings = _SelfEnforcedSettings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.limit,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            },
        )
        self.h2 = conn
        conn.initiate_connection()
        self._flush()
        self.arm_idle()

    # ---- idle timeout ------------------------------------------------------------------------
    def arm_idle(self) -> None:
        timeout = self.sim.knobs.idle_timeout_s
        if self.idle_timer is not None or timeout <= 0 or self.h2 is None or self.closed or self.dark:
            return
        due = self.last_request + timeout - self.loop.time()
        self.idle_timer = self.loop.call_later(max(due, 0.0), self._idle_check)

    def _idle_check(self) -> None:
        self.idle_timer = None
        timeout = self.sim.knobs.idle_timeout_s
        if timeout <= 0 or self.closed or self.dark or self.transport is None or self.h2 is None:
            return
        if self.streams or self.unsent or self.goaway_last is not None or self.resetting:
            # Busy, or already closing for another reason: idle is counted from the last request.
            self.last_request = self.loop.time()
            self.arm_idle()
            return
        if self.loop.time() - self.last_request < timeout:
            self.arm_idle()
            return
        self.front.count("connections_closed_idle")
        if self.sim.knobs.idle_silent:
            self.dark = True  # the socket stays open; the client finds out only by not being answered
            return
        self.goaway_last = -1  # nothing more will be processed
        self._flush()
        frame = GoAwayFrame(stream_id=0, last_stream_id=self.max_accepted, error_code=0)
        self.transport.write(frame.serialize())
        self.transport.close()

    def _flush(self) -> None:
        if self.h2 is not None and self.transport is not None and not self.closed:
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def _count_connection(self, path: str) -> bool:
        """Count this connection at its first provider request; False for admin requests."""
        if path.startswith("/_sim/"):
            return False
        if not self.counted:
            self.counted = True
            self.sim.connections_opened += 1
        return True

    def _drop(self) -> None:
        """Fault 09: the connection dies with requests unanswered. Every 09 drop injected (the core's
        "<provider> drop" outcomes) is counted once here: a dropped connection, or a drop that met its
        connection already closed (another 09 on it dropped it first, or the client closed it)."""
        if self.closed or self.transport is None:
            self.front.count("drops_on_closed_connections")
            return
        self.front.count("connections_dropped")
        self.closed = True  # a second drop due before connection_lost runs finds it closed
        self.transport.abort()

    # ---- HTTP/2 ------------------------------------------------------------------------------
    def apply_limit(self, limit: int) -> None:
        if not self.raised or self.h2 is None or self.closed or limit == self.limit:
            return
        self.limit = limit
        self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit})
        self._flush()

    def _h2_received(self, data: bytes) -> None:
        assert self.h2 is not None
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("h2 protocol error, closing: %s", exc)
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._on_headers(event)
            elif isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                stream = self.streams.get(event.stream_id)
                if stream is not None and not stream.processing and len(stream.body) <= _MAX_BODY:
                    # Beyond the cap the rest is drained, not kept: the core's size checks answer 413.
                    stream.body += event.data[: _MAX_BODY + 1 - len(stream.body)]
                if event.stream_ended is not None:
                    self._process(event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._process(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._forget(event.stream_id)
                self.unsent.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                self._send_unsent()
            elif isinstance(event, h2.events.PingAckReceived):
                if self.reset_ping_sent and event.ping_data == _RESET_PING:
                    self._reset()
                    return
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._flush()
                if self.transport is not None:
                    self.transport.close()
                return
            if self.closed:
                return
        self._flush()
        self._maybe_finish_goaway()
        self._maybe_reset()

    def _on_headers(self, event: h2.events.RequestReceived) -> None:
        assert self.h2 is not None
        sid = event.stream_id
        self.last_request = self.loop.time()
        if self.goaway_last is not None and sid > self.goaway_last:
            return  # above last-stream-id: never processed, the client re-sends it elsewhere
        if self.resetting:
            self.cut += 1  # left open and unanswered until the reset: never processed
            return
        if len(self.streams) >= self.limit:
            self.front.count("refused_streams")
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self.streams[sid] = _Stream(event.headers or [])
        self.max_accepted = sid
        if len(self.streams) > self.sim.peak_streams_per_connection:
            self.sim.peak_streams_per_connection = len(self.streams)
        if event.stream_ended is not None:
            self._process(sid)

    def _forget(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None and stream.in_flight:
            self.sim.in_flight -= 1

    def _process(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.processing or self.resetting:
            return  # while resetting, a stream whose request completes now stays unprocessed
        stream.processing = True
        method = path = scheme = authority = ""
        headers: dict[str, str] = {}
        for name, value in stream.headers:
            if name[0] == ":":
                if name == ":method":
                    method = value
                elif name == ":path":
                    path = value
                elif name == ":scheme":
                    scheme = value
                elif name == ":authority":
                    authority = value
            elif name in headers:
                headers[name] += ", " + value
            else:
                headers[name] = value
        path, _, query = path.partition("?")
        if self._count_connection(path):
            stream.in_flight = True
            self.sim.in_flight += 1
        resp = self.sim.handle(
            method,
            path,
            query,
            headers,
            bytes(stream.body),
            scheme or self.front.scheme,
            authority or headers.get("host", ""),
            self.client_cert,
        )
        self.handled += 1
        every = self.sim.knobs.goaway_every
        if every and self.goaway_last is None and self.handled >= every:
            self._send_goaway()
        every = self.sim.knobs.reset_every
        if every and self.handled >= every:
            self.resetting = True
        if resp.delay > 0:
            # Scheduled callbacks check `closed`, so a connection that dies meanwhile needs no cleanup.
            self.loop.call_later(resp.delay, self._deferred, sid, resp)
        elif resp.drop:
            self._drop()
        else:
            self._respond(sid, resp)

    def _deferred(self, sid: int, resp: SimResponse) -> None:
        if resp.drop:
            self._drop()
            return
        self._respond(sid, resp)
        self._flush()
        self._maybe_finish_goaway()
        self._maybe_reset()

    def _send_goaway(self) -> None:
        """GOAWAY(NO_ERROR) written by hand: h2 would refuse to send the responses still owed after it."""
        assert self.h2 is not None and self.transport is not None
        # Not h2's highest_inbound_stream_id: that already covers HEADERS later in the same read, which
        # we have not looked at yet and will now leave unprocessed.
        self.goaway_last = self.max_accepted
        self.front.count("goaways_sent")
        self._flush()
        frame = GoAwayFrame(stream_id=0, last_stream_id=self.goaway_last, error_code=0)
        self.transport.write(frame.serialize())

    def _maybe_finish_goaway(self) -> None:
        if self.goaway_last is None or self.closed or self.transport is None:
            return
        if any(sid <= self.goaway_last for sid in self.streams) or self.unsent:
            return
        self._flush()
        transport = self.transport
        self.goaway_last = -1  # finished: nothing more will be processed
        self.loop.call_later(_LINGER_S, transport.close)

    def _maybe_reset(self) -> None:
        """Once every processed request is answered, ask the client to acknowledge a PING."""
        if not self.resetting or self.reset_ping_sent or self.closed or self.h2 is None:
            return
        if self.unsent or any(s.processing for s in self.streams.values()):
            return
        # Aborting now could destroy answers still in our buffers or the client's receive queue, and
        # a processed request left unanswered would come back as a duplicate: the reset waits until
        # the client has read everything up to the PING (frames are processed in order).
        self.reset_ping_sent = True
        self.h2.ping(_RESET_PING)
        self._flush()

    def _reset(self) -> None:
        """reset_every: abort with RST; every stream still open was never processed."""
        if self.closed or self.transport is None:
            return
        self.front.count("connections_reset")
        # Streams accepted before the reset point whose request was still incomplete are cut too.
        self.front.count("requests_cut_by_reset", self.cut + len(self.streams))
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Without it close() sends FIN when our receive queue happens to be empty: a clean EOF,
            # not the reset a load balancer or a restarting server produces.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        self.transport.abort()

    def _respond(self, sid: int, resp: SimResponse) -> None:
        if self.closed or self.h2 is None:
            return
        stream = self.streams.pop(sid, None)
        if stream is None:
            return  # reset by the client meanwhile
        if stream.in_flight:
            self.sim.in_flight -= 1
        headers = [(":status", str(resp.status)), *resp.headers, ("content-length", str(len(resp.body)))]
        try:
            self.h2.send_headers(sid, headers, end_stream=not resp.body)
        except h2.exceptions.StreamClosedError:
            return
        if resp.body:
            self.unsent[sid] = (resp.body, True)
            self._send_unsent()
        if resp.authenticated and not self.raised:
            # Raised once an authenticated request has been answered on this connection, as APNs does.
            self.raised = True
            self.front.count("settings_raised")
            self.apply_limit(self.sim.knobs.max_concurrent_streams)

    def _send_unsent(self) -> None:
        assert self.h2 is not None
        for sid in list(self.unsent):
            body, _ = self.unsent[sid]
            try:
                while body:
                    window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                    if window <= 0:
                        break
                    chunk, body = body[:window], body[window:]
                    self.h2.send_data(sid, chunk, end_stream=not body)
            except (h2.exceptions.StreamClosedError, h2.exceptions.FlowControlError, KeyError):
                body = b""
            if body:
                self.unsent[sid] = (body, True)
            else:
                del self.unsent[sid]
        self._flush()

    # ---- HTTP/1.1 (admin and simple clients) -------------------------------------------------
    def _h1_next(self) -> None:
        if self.h1_busy or self.closed or self.transport is None:
            return
        head_end = self.pending.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self.pending) > _MAX_H1_HEADER:
                self._h1_fail(431, "request header too large")
            return
        lines = self.pending[:head_end].decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            self._h1_fail(400, "malformed request line")
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._h1_fail(400, "malformed header line")
                return
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._h1_fail(411, "send a content-length")
            return
        length_raw = headers.get("content-length", "0")
        if not length_raw.isdigit():
            self._h1_fail(400, "bad content-length")
            return
        if int(length_raw) > _MAX_BODY:
            self._h1_fail(413, "request body too large")
            return
        length = int(length_raw)
        if len(self.pending) < head_end + 4 + length:
            return
        body = self.pending[head_end + 4 : head_end + 4 + length]
        self.pending = self.pending[head_end + 4 + length :]
        path, _, query = target.partition("?")
        self.h1_busy = True
        if self._count_connection(path):
            self.h1_in_flight = True
            self.sim.in_flight += 1
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        resp = self.sim.handle(method, path, query, headers, body, self.front.scheme, headers.get("host", ""))
        if resp.delay > 0:
            self.loop.call_later(resp.delay, self._h1_respond, resp, keep)
        else:
            self._h1_respond(resp, keep)

    def _h1_respond(self, resp: SimResponse, keep: bool) -> None:
        if self.closed or self.transport is None:
            if resp.drop:
                self.front.count("drops_on_closed_connections")
            return
        self.h1_busy = False
        if self.h1_in_flight:
            self.h1_in_flight = False
            self.sim.in_flight -= 1
        if resp.drop:
            self._drop()
            return
        head = [f"HTTP/1.1 {resp.status} {_reason(resp.status)}"]
        head += [f"{k}: {v}" for k, v in resp.headers]
        head.append(f"content-length: {len(resp.body)}")
        if not keep:
            head.append("connection: close")
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + resp.body)
        if not keep:
            self.transport.close()
            return
        if self.pending:
            self._h1_next()

    def _h1_fail(self, status: int, text: str) -> None:
        assert self.transport is not None
        body = f"{status} {text}\n".encode()
        head = (
            f"HTTP/1.1 {status} {_reason(status)}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def ssl_context(cert_file: str, key_file: str, client_ca: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca:
        # As APNs: a client certificate is optional (token authentication sends none), but one that
        # does not chain to the CA (or has expired) fails the TLS handshake.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(client_ca)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


async def serve(sim: Simulator, sock: Any, tls: ssl.SSLContext | None) -> asyncio.Server:
    front = StrictFront(sim, "https" if tls else "http")
    loop = asyncio.get_running_loop()
    return await loop.create_server(front.protocol, sock=sock, ssl=tls, backlog=1024)
