"""HTTP engines under the provider adapters; the adapters only call `create_engine`."""

from __future__ import annotations

from delivery.engine.base import Engine, EngineStats, HttpRequest, HttpResponse, TransportError

__all__ = ["Engine", "EngineStats", "HttpRequest", "HttpResponse", "TransportError", "create_engine"]

ENGINE_KINDS = ("curl", "httpx")


def create_engine(
    base_url: str,
    *,
    kind: str = "curl",
    ca_file: str | None = None,
    max_connections: int = 2,
    timeout: float = 15.0,
    h2c: bool = False,
) -> Engine:
    """An engine for one provider endpoint (scheme://host[:port]); requests may use paths.

    `kind`: "curl" (libcurl + nghttp2, the hot path for APNs and FCM) or "httpx" (portable, for
    low-volume calls). `ca_file`: PEM bundle to trust instead of the system store. `h2c`: speak
    cleartext HTTP/2 with prior knowledge (local simulator only). `timeout` applies per request
    unless the request carries its own.
    """
    if kind == "curl":
        from delivery.engine.curl import CurlEngine

        return CurlEngine(
            base_url, ca_file=ca_file, max_connections=max_connections, timeout=timeout, h2c=h2c
        )
    if kind == "httpx":
        from delivery.engine.httpx_engine import HttpxEngine

        return HttpxEngine(
            base_url, ca_file=ca_file, max_connections=max_connections, timeout=timeout, h2c=h2c
        )
    raise ValueError(f"unknown engine kind {kind!r}; expected one of {', '.join(ENGINE_KINDS)}")
