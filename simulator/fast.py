"""The fast front: granian (Rust HTTP/1.1 + HTTP/2, TLS with ALPN, h2c prior knowledge) in front of the core.

Granian runs embedded, in this process and this event loop, with a single worker, so the counters
the core keeps are exact without any cross-process merging. The handler does nothing but read the
body, call `Simulator.handle` and answer; everything that costs (JWT checks) is cached in the core.

What the transport hides from RSGI, and how it is approximated:
- connections: RSGI has no connection object; `scope.client` (peer ip:port) identifies one, so
  `connections_opened` counts distinct peers seen since the last reset.
- streams: `peak_streams_per_connection` is the peak of requests inside the handler at once per
  peer; granian may hold further streams it has not dispatched yet, so this is a lower bound.
- fault 09 cannot close the connection from RSGI: it answers 500 (as the contract says).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from granian.constants import HTTPModes, Interfaces, SSLProtocols, TaskImpl
from granian.http import HTTP1Settings, HTTP2Settings
from granian.server.embed import Server

from simulator.world import Simulator

try:
    from granian._granian import SocketHolder
except ImportError:  # pragma: no cover - granian moved it
    from granian.net import SocketHolder


class FastApp:
    """The RSGI application."""

    def __init__(self, sim: Simulator, scheme: str) -> None:
        self.sim = sim
        self.scheme = scheme
        self.peers: dict[str, int] = {}  # peer -> requests inside the handler now
        self._sleep = asyncio.sleep

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        sim = self.sim
        path = scope.path
        if path.startswith("/_sim/"):  # admin: not a provider connection, not counted
            body = await proto()
            resp = sim.handle(scope.method, path, scope.query_string, scope.headers, body, self.scheme, "")
            proto.response_bytes(resp.status, resp.headers, resp.body)
            return
        peer = scope.client
        peers = self.peers
        active = peers.get(peer)
        if active is None:
            sim.connections_opened += 1
            active = 0
        active += 1
        peers[peer] = active
        if active > sim.peak_streams_per_connection:
            sim.peak_streams_per_connection = active
        sim.in_flight += 1
        try:
            body = await proto()
            headers = scope.headers
            resp = sim.handle(
                scope.method,
                path,
                scope.query_string,
                headers,
                body,
                self.scheme,
                scope.authority or headers.get("host") or "",
            )
            if resp.delay > 0:
                await self._sleep(resp.delay)
            proto.response_bytes(resp.status, resp.headers, resp.body)
        finally:
            sim.in_flight -= 1
            peers[peer] -= 1

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The same handler as ASGI, kept to compare the two interfaces (bench/simulator_ceiling.py)."""
        if scope["type"] != "http":
            return
        sim = self.sim
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        admin = path.startswith("/_sim/")
        if not admin:
            client = scope["client"] or ("", 0)
            peer = f"{client[0]}:{client[1]}"
            active = self.peers.get(peer)
            if active is None:
                sim.connections_opened += 1
                active = 0
            self.peers[peer] = active + 1
            sim.peak_streams_per_connection = max(sim.peak_streams_per_connection, active + 1)
            sim.in_flight += 1
        try:
            resp = sim.handle(
                scope["method"],
                path,
                scope["query_string"].decode("latin-1"),
                headers,
                b"".join(chunks),
                self.scheme,
                headers.get("host", ""),
            )
            if resp.delay > 0:
                await self._sleep(resp.delay)
            await send(
                {
                    "type": "http.response.start",
                    "status": resp.status,
                    "headers": [(k.encode(), v.encode()) for k, v in resp.headers],
                }
            )
            await send({"type": "http.response.body", "body": resp.body})
        finally:
            if not admin:
                sim.in_flight -= 1
                self.peers[peer] -= 1

    def reset_peers(self) -> None:
        # Peers with requests in the handler stay known, so their decrement finds them.
        self.peers = {p: n for p, n in self.peers.items() if n > 0}


class _Prebound(Server):
    """granian's embedded server, serving a socket we bound (port 0 works, the port is known)."""

    def __init__(self, sock: socket.socket, **kwargs: Any) -> None:
        self._sock = sock
        super().__init__(**kwargs)

    def _init_shared_socket(self) -> None:
        self._ssp = None
        self._shd = SocketHolder(self._sock.fileno(), False, 1024)
        self._sfd = self._sock.fileno()


def build_server(
    sim: Simulator,
    sock: socket.socket,
    tls: tuple[str, str] | None,
    max_streams: int = 1000,
    runtime_threads: int = 1,
    task_impl: str = "asyncio",
    interface: str = "rsgi",
) -> tuple[Server, FastApp]:
    app = FastApp(sim, "https" if tls else "http")
    sim.reset_hooks.append(app.reset_peers)
    host, port = sock.getsockname()[:2]
    kwargs: dict[str, Any] = {
        "target": app if interface == "rsgi" else app.asgi,
        "address": host,
        "port": port,
        "interface": Interfaces.RSGI if interface == "rsgi" else Interfaces.ASGINL,
        "http": HTTPModes.auto,
        "websockets": False,
        "backlog": 1024,
        "runtime_threads": runtime_threads,
        "task_impl": TaskImpl(task_impl),
        "http1_settings": HTTP1Settings(keep_alive=True),
        "http2_settings": HTTP2Settings(
            max_concurrent_streams=max_streams,
            initial_connection_window_size=4 * 1024 * 1024,
            initial_stream_window_size=1024 * 1024,
        ),
        "log_access": False,
    }
    if tls:
        kwargs["ssl_cert"] = Path(tls[0])
        kwargs["ssl_key"] = Path(tls[1])
        kwargs["ssl_protocol_min"] = SSLProtocols.tls12  # as APNs and FCM accept
    return _Prebound(sock, **kwargs), app
