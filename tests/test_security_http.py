"""Security findings of issue 13 that are about HTTP, over real sockets: the API-key throttle behind
a real proxy hop (TRUSTED_PROXIES), the admin login limit (django-axes), static files and swagger-ui
with DEBUG off, /metrics closed by default, a new API key shown once on a page, the SECRET_KEY
refusal and `check --deploy` under the documented production settings."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from http.cookies import SimpleCookie

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from tests.security_servers import forwarding_proxy, production_server, request
from tokens.models import ApiKey, DeviceToken
from tokens.testing import make_app, make_key, registration

pytestmark = pytest.mark.django_db(transaction=True)

DEVICES = "/api/v1/devices/"
ATTACKER, VICTIM, OTHER = "127.0.0.5", "127.0.0.6", "127.0.0.7"
# The documented production settings (docs/operations.md, "Production settings").
PRODUCTION_ENV = {
    "DEBUG": "false",
    "SECRET_KEY": secrets.token_urlsafe(64),
    "ALLOWED_HOSTS": "push.example.com",
    "SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto:https",
    "SECURE_SSL_REDIRECT": "true",
    "SESSION_COOKIE_SECURE": "true",
    "CSRF_COOKIE_SECURE": "true",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "CSRF_TRUSTED_ORIGINS": "https://push.example.com",
    "TRUSTED_PROXIES": "10.0.0.0/8",
    "METRICS_TOKEN": "a-long-random-scrape-token",
}


@pytest.fixture(autouse=True)
def _clean_redis(redis_client):
    """Throttle counters live in the tests' Redis database; each test starts from an empty one."""


@pytest.fixture
def server():
    with production_server() as url:
        yield url


def _register(base: str, key: str, *, source: str, forwarded: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    status, _, _ = request(
        base, "POST", DEVICES, body=json.dumps(registration("ios")).encode(), headers=headers, source=source
    )
    return status


# --- 1. failed-key throttling: never a valid key, per client behind a trusted proxy -----------------
def test_junk_keys_behind_a_proxy_lock_out_neither_valid_keys_nor_other_clients(settings, server) -> None:
    settings.TRUSTED_PROXIES = ["127.0.0.1/32"]
    settings.API_AUTH_FAILURES_MAX = 3
    key = make_key(make_app(), ("devices",))
    with forwarding_proxy(int(server.rsplit(":", 1)[1])) as port:
        proxy = f"http://127.0.0.1:{port}"
        # The attacker writes a new X-Forwarded-For each time to look like many clients: the proxy
        # appends the real address, which is what counts.
        statuses = [
            _register(proxy, f"junk-{i}", source=ATTACKER, forwarded=f"198.51.100.{i}") for i in range(5)
        ]
        assert statuses == [401, 401, 401, 429, 429]
        # Everyone reaches the app from the proxy's address; only the attacker's bad keys are refused.
        assert _register(proxy, "junk-victim", source=VICTIM) == 401
        assert _register(proxy, key, source=VICTIM) == 201
        # A valid key is served even from the blocked client (never refuse a valid key).
        assert _register(proxy, key, source=ATTACKER) == 201
    assert DeviceToken.objects.count() == 2


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(settings, server) -> None:
    settings.TRUSTED_PROXIES = ["127.0.0.1/32"]
    settings.API_AUTH_FAILURES_MAX = 2
    # Direct connections from untrusted addresses: their X-Forwarded-For is the client's own words.
    assert [_register(server, "junk", source=ATTACKER, forwarded="203.0.113.50") for _ in range(3)] == [
        401,
        401,
        429,
    ]
    # Another client claiming the same forwarded address is not the blocked one ...
    assert _register(server, "junk", source=OTHER, forwarded="203.0.113.50") == 401
    # ... and with no trusted proxy at all, the peer is the client even for 127.0.0.1.
    settings.TRUSTED_PROXIES = []
    assert _register(server, "junk", source=OTHER, forwarded=ATTACKER) == 401


def test_wrong_secrets_for_one_key_are_limited_per_key_prefix(settings, app_key) -> None:
    settings.API_AUTH_FAILURES_MAX = 100
    settings.API_AUTH_KEY_FAILURES_MAX = 2
    app, key = app_key
    guess = key[:-6] + "zzzzzz"
    client = Client(REMOTE_ADDR="198.51.100.9")
    answers = [
        client.post(DEVICES, registration("ios"), content_type="application/json",
                    headers={"Authorization": f"Bearer {guess}"}).status_code
        for _ in range(3)
    ]  # fmt: skip
    assert answers == [401, 401, 429]
    other = make_key(app, ("devices",))
    wrong_other = other[:-6] + "zzzzzz"
    # Another key's prefix has its own count; the real key is still served.
    assert client.post(DEVICES, registration("ios"), content_type="application/json",
                       headers={"Authorization": f"Bearer {wrong_other}"}).status_code == 401  # fmt: skip
    assert client.post(DEVICES, registration("ios"), content_type="application/json",
                       headers={"Authorization": f"Bearer {key}"}).status_code == 201  # fmt: skip


@pytest.fixture
def app_key():
    app = make_app()
    return app, make_key(app, ("devices",))


# --- 3. admin login throttling ----------------------------------------------------------------------
def _login(base: str, username: str, password: str, *, source: str) -> int:
    status, headers, body = request(base, "GET", "/admin/login/", source=source)
    assert status == 200
    cookie = SimpleCookie(headers["set-cookie"])["csrftoken"].value
    token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body).group(1).decode()
    form = f"csrfmiddlewaretoken={token}&username={username}&password={password}&next=/admin/"
    status, _, _ = request(
        base, "POST", "/admin/login/", body=form.encode(), source=source,
        headers={"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"csrftoken={cookie}",
                 "Referer": f"{base}/admin/login/"},
    )  # fmt: skip
    return status


def test_admin_login_is_locked_after_repeated_wrong_passwords(settings, server) -> None:
    settings.AXES_FAILURE_LIMIT = 3
    User.objects.create_superuser("root", "root@example.com", "right-password-123")
    # A wrong password re-shows the form (200); the limit-th failure locks the pair out (429).
    assert [_login(server, "root", f"wrong{i}", source=ATTACKER) for i in range(3)] == [200, 200, 429]
    # Locked: even the right password is refused for this (username, client) ...
    assert _login(server, "root", "right-password-123", source=ATTACKER) == 429
    # ... while the admin logs in from elsewhere (302 to /admin/).
    assert _login(server, "root", "right-password-123", source=VICTIM) == 302


# --- 6. static files and swagger-ui with DEBUG off ----------------------------------------------------
def test_static_files_and_swagger_ui_are_served_with_debug_off(server) -> None:
    assert settings.DEBUG is False
    for path in ("/static/admin/css/base.css", "/static/campaigns/progress.js"):
        status, _, body = request(server, "GET", path)
        assert status == 200, path
        assert body
    status, _, page = request(server, "GET", "/api/docs/")
    assert status == 200
    assert b"cdn.jsdelivr" not in page and b"@latest" not in page
    scripts = re.findall(rb'src="([^"]+\.js)"', page)
    assert scripts and all(src.startswith(b"/static/drf_spectacular_sidecar/") for src in scripts), scripts
    for src in scripts:
        assert request(server, "GET", src.decode())[0] == 200, src


# --- 7. /metrics closed unless a token or METRICS_PUBLIC ----------------------------------------------
def test_metrics_need_a_token_unless_explicitly_public(settings, server) -> None:
    settings.METRICS_TOKEN = ""
    settings.METRICS_PUBLIC = False
    status, _, body = request(server, "GET", "/metrics")
    assert status == 403 and b"pushsvc_" not in body
    settings.METRICS_TOKEN = "scrape-token-123"
    assert request(server, "GET", "/metrics")[0] == 401
    good = request(server, "GET", "/metrics", headers={"Authorization": "Bearer scrape-token-123"})
    assert good[0] == 200 and b"pushsvc_" in good[2]
    settings.METRICS_TOKEN = ""
    settings.METRICS_PUBLIC = True
    assert request(server, "GET", "/metrics")[0] == 200


# --- 7. a new API key is shown once, on the page, never in the messages cookie ----------------------
def test_new_api_key_is_shown_once_on_a_page_not_in_a_cookie() -> None:
    User.objects.create_superuser("keys", "keys@example.com", "keys-password-123")
    app = make_app()
    client = Client()
    client.force_login(User.objects.get(username="keys"))
    response = client.post(
        "/admin/tokens/apikey/add/", {"app": app.pk, "name": "ios app", "scopes": ["register"]}
    )
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    raw = re.search(r'value="(psk_[0-9a-f]{12}_[^"]+)"', response.content.decode()).group(1)
    assert ApiKey.objects.get(prefix=ApiKey.parse_prefix(raw)).matches(raw)
    assert all(raw not in morsel.value for morsel in response.cookies.values())
    assert "messages" not in response.cookies
    # Not shown again anywhere.
    listing = client.get("/admin/tokens/apikey/")
    assert raw not in listing.content.decode()


# --- 2. SECRET_KEY refused with DEBUG off; check --deploy clean in production settings --------------
def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    unset = {"SECRET_KEY", "DEBUG", *PRODUCTION_ENV}
    base = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env={**base, "DATABASE_URL": os.environ.get("DATABASE_URL", ""), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # starts manage.py processes of its own (~2 s each): the slow lane
@pytest.mark.parametrize(
    "secret",
    [None, "pushsvc-insecure-development-key-change-me", "short-but-set-" + uuid.uuid4().hex[:8]],
)
def test_debug_off_refuses_the_default_or_a_short_secret_key(secret) -> None:
    env = {"DEBUG": "false"} if secret is None else {"DEBUG": "false", "SECRET_KEY": secret}
    done = _manage("check", env=env)
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr and "SECRET_KEY" in done.stderr
    assert secret is None or secret not in done.stderr  # the refusal never prints the key
    # DEBUG on (a developer's machine) keeps the development key.
    assert _manage("check", env={"DEBUG": "true"}).returncode == 0


@pytest.mark.slow  # starts manage.py processes of its own (~2 s each): the slow lane
def test_check_deploy_is_clean_under_the_documented_production_settings() -> None:
    done = _manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION_ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


@pytest.mark.slow  # starts manage.py processes of its own (~2 s each): the slow lane
@pytest.mark.parametrize(
    ("name", "value"),
    [("TRUSTED_PROXIES", "10.0.0.0/8,not-a-network"), ("SECURE_PROXY_SSL_HEADER", "X-Proto")],
)
def test_malformed_proxy_settings_stop_the_start_naming_the_variable(name, value) -> None:
    done = _manage("check", env={**PRODUCTION_ENV, name: value})
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr and name in done.stderr
