"""validate_push_endpoint (the Web Push SSRF guard, also called by the sender) and the
registration validators, called directly."""

from __future__ import annotations

import pytest

from tokens.validation import (
    RegistrationError,
    clean_provider_token,
    validate_push_endpoint,
    validate_registration,
)


@pytest.fixture
def strict(settings):
    settings.WEBPUSH_ALLOW_INSECURE = False
    settings.WEBPUSH_ALLOWED_HOSTS = ["fcm.googleapis.com", "push.services.mozilla.com", "localhost"]
    return settings


@pytest.mark.parametrize(
    "url",
    [
        "https://fcm.googleapis.com/fcm/send/abc",
        "https://FCM.googleapis.com/fcm/send/abc",
        "https://fcm.googleapis.com./fcm/send/abc",
        "https://updates.push.services.mozilla.com:443/wpush/v2/x",
    ],
)
def test_allowed_endpoints(strict, url):
    validate_push_endpoint(url, resolve=False)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://fcm.googleapis.com/x", "https"),
        ("https://googleapis.com/x", "not an allowed push service"),
        ("https://evilfcm.googleapis.com.attacker.net/x", "not an allowed push service"),
        ("https://127.0.0.1/x", "IP address"),
        ("https://[::1]/x", "IP address"),
        ("https://[fe80::1%25eth0]/x", "IP address"),
        ("https://10.1.2.3:8443/x", "IP address"),
        ("https:///x", "absolute https"),
        ("fcm.googleapis.com/x", "absolute https"),
        ("https://a@fcm.googleapis.com/x", "credentials"),
        ("https://fcm.googleapis.com/a b", "spaces"),
        ("https://[::1/x", "not a valid URL"),
    ],
)
def test_refused_endpoints(strict, url, message):
    with pytest.raises(ValueError, match=message):
        validate_push_endpoint(url, resolve=False)


def test_resolution_to_a_private_address_is_refused_at_send_time(strict):
    # "localhost" passes the host allow-list here; what it resolves to does not.
    validate_push_endpoint("https://localhost/wp/1", resolve=False)
    with pytest.raises(ValueError, match="non-public address"):
        validate_push_endpoint("https://localhost/wp/1", resolve=True)


def test_unresolvable_host_is_refused_when_resolving(strict):
    strict.WEBPUSH_ALLOWED_HOSTS = ["invalid"]
    with pytest.raises(ValueError, match="does not resolve"):
        validate_push_endpoint("https://push.example.invalid/x", resolve=True)


def test_insecure_mode_allows_the_local_simulator_but_still_needs_a_url(settings):
    settings.WEBPUSH_ALLOW_INSECURE = True
    validate_push_endpoint("http://127.0.0.1:8443/wp/sub-1", resolve=True)
    with pytest.raises(ValueError, match="absolute"):
        validate_push_endpoint("ftp://127.0.0.1/x", resolve=False)


@pytest.mark.parametrize(
    ("platform", "token", "ok"),
    [
        ("ios", "ab" * 32, True),
        ("ios", "AB" * 100, True),
        ("ios", "ab" * 31, False),
        ("ios", "ab" * 101, False),
        ("android", "x", True),
        ("android", "x" * 4096, True),
        ("android", "x" * 4097, False),
        ("huawei", "a\tb", False),
        ("huawei", "", False),
    ],
)
def test_provider_token_bounds(platform, token, ok):
    if ok:
        assert clean_provider_token(platform, token)
    else:
        with pytest.raises(ValueError):
            clean_provider_token(platform, token)


def test_registration_error_carries_every_field():
    with pytest.raises(RegistrationError) as info:
        validate_registration({"platform": "x", "locale": 5})
    assert set(info.value.errors) == {"device_id", "platform", "token", "locale"}
    assert "device_id: This field is required." in str(info.value)
