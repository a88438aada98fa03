"""Real HTTP servers for the security tests: the app as production serves it (no test static-file
handler, DEBUG off) and a tiny forwarding reverse proxy that appends X-Forwarded-For like nginx's
$proxy_add_x_forwarded_for."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from django.conf import settings
from django.core.servers.basehttp import ThreadedWSGIServer
from django.test.testcases import LiveServerThread

# Both servers stop with shutdown(), which waits for serve_forever's next poll: every 0.05 s here
# rather than the default 0.5 s, which each test using a server otherwise waited at its end.
POLL_INTERVAL_S = 0.05


class _QuickStopWSGIServer(ThreadedWSGIServer):
    def serve_forever(self, poll_interval: float = POLL_INTERVAL_S) -> None:
        super().serve_forever(poll_interval)


class _LiveServerThread(LiveServerThread):
    server_class = _QuickStopWSGIServer


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}


class _NoStaticHandler:
    """LiveServerThread wraps the app in a static-files handler that Django's test server uses to
    serve /static/ itself; production has no such thing, so this one passes everything through and
    only the app's own middleware (WhiteNoise) can answer /static/."""

    def __init__(self, application: Callable[..., Any]) -> None:
        self.application = application

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Any:
        return self.application(environ, start_response)


@contextmanager
def production_server() -> Iterator[str]:
    """The WSGI app on a real socket (127.0.0.1), with DEBUG off; yields its base URL."""
    assert not settings.DEBUG, "the production server test runs with DEBUG off"
    thread = _LiveServerThread("127.0.0.1", static_handler=_NoStaticHandler, port=0)
    thread.daemon = True
    thread.start()
    thread.is_ready.wait()
    if thread.error:
        raise thread.error
    try:
        yield f"http://127.0.0.1:{thread.port}"
    finally:
        thread.terminate()


@contextmanager
def forwarding_proxy(upstream_port: int) -> Iterator[int]:
    """A reverse proxy on 127.0.0.1 that forwards to 127.0.0.1:upstream_port, appending the address
    its client connected from to X-Forwarded-For. Yields its port."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            seen = self.headers.get("X-Forwarded-For")
            headers.pop("X-Forwarded-For", None)
            peer = self.client_address[0]
            headers["X-Forwarded-For"] = f"{seen}, {peer}" if seen else peer
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                payload = answer.read()
            finally:
                upstream.close()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = _forward

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(POLL_INTERVAL_S,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def request(
    base: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request from the loopback address `source` (Linux routes all of 127.0.0.0/8 to lo,
    so each test client can have an address of its own)."""
    host, _, port = base.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()
