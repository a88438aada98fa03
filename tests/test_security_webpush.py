"""Issue 13, Web Push endpoints: port 443 and valid host names only, and the send-time connection
goes to the address the SSRF check approved (no second DNS answer). Pinning is shown over real
TLS + HTTP/2 against the simulator: the name `localhost` is pinned to an address where nothing
listens (the connection fails although DNS would have worked) and to 127.0.0.1 (it succeeds and
TLS still verifies the name)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from delivery.engine import create_engine
from delivery.engine.base import HttpRequest, TransportError
from delivery.providers.webpush import WebPushProvider
from tokens.validation import validate_push_endpoint


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://fcm.googleapis.com:22/fcm/send/x", "port, 443"),
        ("https://fcm.googleapis.com:8443/fcm/send/x", "port, 443"),
        ("https://fcm_x.googleapis.com/fcm/send/x", "DNS name"),
        ("https://-bad.fcm.googleapis.com/x", "DNS name"),
        ("https://a..fcm.googleapis.com/x", "DNS name"),
        ("https://fcm.googleapis.com%2e/x", "DNS name"),
        ("https://fcm.googleapis.com\\@evil.com/x", "credentials"),
        ("https://fcm.googleapis.com\\.evil.com/x", "DNS name"),
        ("https://" + "a" * 64 + ".fcm.googleapis.com/x", "DNS name"),
    ],
)
def test_endpoints_need_port_443_and_a_valid_host_name(settings, url, message) -> None:
    settings.WEBPUSH_ALLOW_INSECURE = False
    with pytest.raises(ValueError, match=message):
        validate_push_endpoint(url, resolve=False)


def test_a_default_or_explicit_443_is_accepted(settings) -> None:
    settings.WEBPUSH_ALLOW_INSECURE = False
    for url in ("https://fcm.googleapis.com/fcm/send/x", "https://fcm.googleapis.com:443/fcm/send/x"):
        assert validate_push_endpoint(url, resolve=False) == ()


def test_the_check_returns_the_addresses_it_approved(settings) -> None:
    """`localhost` resolves to loopback, which is refused; allow it and the check still refuses, so
    the approved addresses are the ones judged (no private address ever comes back)."""
    settings.WEBPUSH_ALLOW_INSECURE = False
    settings.WEBPUSH_ALLOWED_HOSTS = ["localhost"]
    with pytest.raises(ValueError, match="non-public"):
        validate_push_endpoint("https://localhost/wp/1", resolve=True)


def _get(engine, path: str = "/") -> int:
    async def go() -> int:
        try:
            response = await engine.request(HttpRequest("GET", path, {}, b""))
            return response.status
        finally:
            await engine.aclose()

    return asyncio.run(go())


def _unused_loopback_address() -> str:
    # 127.0.0.0/8 is all loopback on Linux; the simulator listens on 127.0.0.1 only.
    probe = socket.socket()
    try:
        assert probe.connect_ex(("127.0.0.9", 1)) != 0
    finally:
        probe.close()
    return "127.0.0.9"


def test_the_connection_goes_to_the_pinned_address_not_a_fresh_lookup(simulator_fast) -> None:
    base = simulator_fast.base_url.replace("127.0.0.1", "localhost")  # the certificate names localhost
    port = int(base.rsplit(":", 1)[1])
    ca = simulator_fast.ca_file
    # Unpinned, `localhost` resolves and the simulator answers (any HTTP status: it was reached).
    assert _get(create_engine(base, kind="httpx", ca_file=ca)) > 0
    # Pinned to 127.0.0.1: reached, with TLS verifying the name `localhost` (not the address).
    pins: list[tuple[str, int]] = []

    def pinned(host: str, p: int) -> tuple[str, ...]:
        pins.append((host, p))
        return ("127.0.0.1",)

    assert _get(create_engine(base, kind="httpx", ca_file=ca, resolve=pinned)) > 0
    assert pins == [("localhost", port)]
    # Pinned to an address where nothing listens: no connection, although DNS would have worked.
    nowhere = _unused_loopback_address()
    with pytest.raises(TransportError) as caught:
        _get(create_engine(base, kind="httpx", ca_file=ca, resolve=lambda h, p: (nowhere,)))
    assert not caught.value.may_have_reached
    # Nothing approved: refused before connecting.
    with pytest.raises(TransportError, match="no checked address"):
        _get(create_engine(base, kind="httpx", ca_file=ca, resolve=lambda h, p: ()))


def test_the_provider_resolver_gives_only_what_the_check_approved(settings) -> None:
    settings.WEBPUSH_ALLOW_INSECURE = False
    provider = WebPushProvider(private_key_pem="", public_key="", subject="mailto:x@example.com")
    # Nothing checked yet for this host: nothing to connect to.
    assert provider._pinned("fcm.googleapis.com", 443) == ()
    provider._pins[("fcm.googleapis.com", 443)] = (("142.250.1.1",), float("inf"))
    assert provider._pinned("FCM.googleapis.com.", 443) == ("142.250.1.1",)
    assert provider._pinned("fcm.googleapis.com", 8443) == ()
    settings.WEBPUSH_ALLOW_INSECURE = True  # the local simulator: resolved as usual
    assert provider._pinned("localhost", 8443) is None
