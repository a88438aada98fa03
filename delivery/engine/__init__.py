"""HTTP engines under the provider adapters; the adapters only call `create_engine`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    resolve: Callable[[str, int], Sequence[str] | None] | None = None,
    client_cert: tuple[bytes, bytes] | None = None,
    idle_max_s: int | None = None,
) -> Engine:
    """An engine for one provider endpoint (scheme://host[:port]); requests may use paths.

    `kind`: "curl" (libcurl + nghttp2, the hot path for APNs and FCM) or "httpx" (portable, for
    low-volume calls). `ca_file`: PEM bundle to trust instead of the system store. `h2c`: speak
    cleartext HTTP/2 with prior knowledge (local simulator only). `timeout` applies per request
    unless the request carries its own. `resolve` (httpx only): (host, port) -> the addresses to
    connect to instead of resolving the host (None: resolve as usual; empty: refuse to connect).
    `client_cert` (curl only): (certificate PEM, key PEM) presented for TLS client authentication.
    `idle_max_s` (curl only): a pooled connection idle longer than this many whole seconds is closed
    instead of reused; set it below the provider's idle timeout (None: the engine's default).
    """
    if kind == "curl":
        if resolve is not None:
            raise ValueError("address pinning (resolve) is implemented by the httpx engine only")
        from delivery.engine.curl import DEFAULT_IDLE_MAX_S, CurlEngine

        return CurlEngine(
            base_url,
            ca_file=ca_file,
            max_connections=max_connections,
            timeout=timeout,
            h2c=h2c,
            client_cert=client_cert,
            idle_max_s=DEFAULT_IDLE_MAX_S if idle_max_s is None else idle_max_s,
        )
    if client_cert is not None:
        raise ValueError("TLS client certificates are implemented by the curl engine only")
    if kind == "httpx":
        from delivery.engine.httpx_engine import HttpxEngine

        return HttpxEngine(
            base_url,
            ca_file=ca_file,
            max_connections=max_connections,
            timeout=timeout,
            h2c=h2c,
            resolve=resolve,
        )
    raise ValueError(f"unknown engine kind {kind!r}; expected one of {', '.join(ENGINE_KINDS)}")
