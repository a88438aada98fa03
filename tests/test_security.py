"""Hostile and broken requests against the whole API through the real Django stack (middleware,
DRF, auth, PostgreSQL): every one is refused with a 4xx that says what is wrong, and nothing is
stored. Plus the brute-force throttle on API keys (tokens/throttle.py, real Redis).

Per-field registration errors are covered in test_api.py; this module is about the attack surface:
authentication, tenancy, sizes, nesting, encodings and every endpoint that writes.
"""

from __future__ import annotations

import json
import uuid

import pytest
from django.test import Client

from campaigns.models import Campaign
from tokens.models import ApiKey, DeviceToken
from tokens.testing import make_app, make_key, registration

pytestmark = pytest.mark.django_db

DEVICES = "/api/v1/devices/"
CAMPAIGNS = "/api/v1/campaigns/"
NOTIFY = "/api/v1/notifications/"
MESSAGE = {"title": "t", "body": "b"}
WRITES = [
    (DEVICES, lambda: registration("ios")),
    (CAMPAIGNS, lambda: {"message": MESSAGE, "draft": True}),
    (NOTIFY, lambda: {"user_ids": ["u1"], "message": MESSAGE}),
]


def rows() -> tuple[int, int, int]:
    return DeviceToken.objects.count(), Campaign.objects.count(), ApiKey.objects.count()


def post(path: str, body, key: str | None, *, addr: str = "198.51.100.7", content_type="application/json"):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return Client(REMOTE_ADDR=addr).generic("POST", path, data, content_type=content_type, headers=headers)


def refused(response, *statuses: int) -> dict:
    assert response.status_code in statuses, (response.status_code, response.content[:300])
    body = response.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    return body


@pytest.fixture(autouse=True)
def _clean_throttle(redis_client):
    """The throttle counts in the tests' Redis database; each test starts from an empty one."""


@pytest.fixture
def app():
    return make_app()


@pytest.fixture
def key(app) -> str:
    return make_key(app, ("devices", "send"))


# --- authentication and tenancy -------------------------------------------------------------------
@pytest.mark.parametrize(("path", "build"), WRITES)
@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "Bearer pk_nope.secret", "Bearer \x00"],
)
def test_missing_or_malformed_auth_is_401_and_stores_nothing(app, path, build, header) -> None:
    before = rows()
    headers = {"Authorization": header} if header else {}
    response = Client().generic(
        "POST", path, json.dumps(build()), content_type="application/json", headers=headers
    )
    refused(response, 401)
    assert rows() == before


@pytest.mark.parametrize(("path", "build"), WRITES)
def test_revoked_key_and_disabled_app_are_401(app, path, build) -> None:
    revoked_key = make_key(app, ("devices", "send"))
    ApiKey.objects.get(prefix=ApiKey.parse_prefix(revoked_key)).revoke()
    other = make_app()
    disabled_key = make_key(other, ("devices", "send"))
    other.is_active = False
    other.save()
    before = rows()
    for raw in (revoked_key, disabled_key):
        assert "Invalid or revoked" in refused(post(path, build(), raw), 401)["detail"]
    assert rows() == before


@pytest.mark.parametrize(
    ("path", "build", "scope"),
    [
        (DEVICES, WRITES[0][1], "send"),
        (CAMPAIGNS, WRITES[1][1], "devices"),
        (NOTIFY, WRITES[2][1], "devices"),
    ],
)
def test_wrong_scope_is_403_naming_the_missing_scope(app, path, build, scope) -> None:
    narrow = make_key(app, (scope,))
    before = rows()
    body = refused(post(path, build(), narrow), 403)
    assert "scope" in body["detail"]
    assert rows() == before


def test_another_apps_devices_and_campaigns_are_invisible(app, key) -> None:
    shared = str(uuid.uuid4())
    assert post(DEVICES, registration("ios", device_id=shared), key).status_code == 201
    campaign = post(CAMPAIGNS, {"message": MESSAGE, "draft": True}, key).json()["id"]
    intruder = Client(headers={"Authorization": f"Bearer {make_key(make_app(), ('devices', 'send'))}"})
    assert intruder.get(f"{DEVICES}{shared}/").status_code == 404
    assert intruder.get(DEVICES, {"user_id": "user-1"}).json()["results"] == []
    assert intruder.delete(f"{DEVICES}{shared}/").status_code == 404
    assert intruder.get(f"{CAMPAIGNS}{campaign}/").status_code == 404
    for action in ("launch", "pause", "resume", "cancel"):
        assert intruder.post(f"{CAMPAIGNS}{campaign}/{action}/").status_code == 404
    assert DeviceToken.objects.get(device_id=shared).is_active
    assert Campaign.objects.get(pk=campaign).status == Campaign.Status.DRAFT


# --- sizes, nesting and encodings ------------------------------------------------------------------
DEEP = b'{"a":' * 5000 + b"1" + b"}" * 5000
DEEP_LIST = b"[" * 50_000 + b"]" * 50_000


@pytest.mark.parametrize(("path", "build"), WRITES)
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"x" * (2 * 1024 * 1024), id="2MiB-garbage"),
        pytest.param(b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}', id="2MiB-json"),
        pytest.param(DEEP, id="deep-object"),
        pytest.param(DEEP_LIST, id="deep-list"),
        pytest.param(b"\xff\xfe\x00{", id="not-utf8"),
        pytest.param(b'{"x": "\\ud800"}', id="lone-surrogate-escape"),
        pytest.param(b"[1, 2, 3]", id="array"),
        pytest.param(b"NaN", id="NaN"),
    ],
)
def test_oversized_deep_and_undecodable_bodies_are_4xx(key, path, build, body) -> None:
    before = rows()
    refused(post(path, body, key), 400, 413)
    assert rows() == before


UNICODE = {
    "nul": "a\x00b",
    "lone-surrogate": "a\ud800b",
    "rtl-override": "\u202egnp.exe",
    "4-byte": "\U0001f600" * 70,
    "zero-width": "\u200b" * 300,
}


@pytest.mark.parametrize("field", ["device_id", "user_id", "locale", "app_version"])
@pytest.mark.parametrize("value", UNICODE.values(), ids=UNICODE.keys())
def test_unicode_edges_in_registration_fields_are_refused_or_stored_verbatim(key, field, value) -> None:
    # Lone surrogates are only expressible as JSON escapes; the raw JSON keeps them as such.
    body = json.dumps(registration("android", **{field: value}))
    response = post(DEVICES, body, key)
    if response.status_code in (200, 201):
        # Accepted only when the value is a legitimate string that round-trips exactly.
        stored = DeviceToken.objects.get()
        assert getattr(stored, field) == value
        assert "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    else:
        body = refused(response, 400)
        # A lone surrogate cannot be decoded as JSON text at all, so it is refused before any field.
        named = field in body.get("errors", {}) or field in body["detail"]
        assert named or "not valid JSON" in body["detail"], body
        assert DeviceToken.objects.count() == 0


@pytest.mark.parametrize("value", UNICODE.values(), ids=UNICODE.keys())
@pytest.mark.parametrize("where", ["title", "body", "data"])
def test_unicode_edges_in_messages_never_break_the_campaign_api(key, value, where) -> None:
    message = {"title": "t", "body": "b"}
    if where == "data":
        message["data"] = {"k": value}
    else:
        message[where] = value
    before = Campaign.objects.count()
    response = post(CAMPAIGNS, {"message": message, "draft": True}, key)
    if response.status_code == 201:
        stored = Campaign.objects.get(pk=response.json()["id"]).message
        text = json.dumps(stored, ensure_ascii=False)
        assert "\x00" not in text and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    else:
        refused(response, 400)
        assert Campaign.objects.count() == before


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({f"k{i}": "v" for i in range(5000)}, id="5000-keys"),
        pytest.param({"k": "v" * 8000}, id="8000-byte-value"),
        pytest.param({"nested": {"a": {"b": "c"}}}, id="nested-value"),
        pytest.param({"n": 1}, id="non-string-value"),
        pytest.param({"from": "x"}, id="reserved-key"),
    ],
)
@pytest.mark.parametrize("path", [CAMPAIGNS, NOTIFY])
def test_huge_or_malformed_data_maps_are_400(key, data, path) -> None:
    before = rows()
    body = {"message": {"title": "t", "data": data}}
    body.update({"draft": True} if path == CAMPAIGNS else {"user_ids": ["u1"]})
    refused(post(path, body, key), 400)
    assert rows() == before


def test_too_many_recipients_and_targets_are_400(key) -> None:
    before = rows()
    refused(post(NOTIFY, {"user_ids": [f"u{i}" for i in range(10_001)], "message": MESSAGE}, key), 400)
    refused(post(NOTIFY, {"device_ids": ["not-a-uuid"], "message": MESSAGE}, key), 400)
    refused(post(CAMPAIGNS, {"message": MESSAGE, "target": {"platforms": ["symbian"]}}, key), 400)
    refused(post(CAMPAIGNS, {"message": MESSAGE, "target": {"min_app_version": "1.0; DROP"}}, key), 400)
    refused(post(CAMPAIGNS, {"message": MESSAGE, "halt_error_rate": 7}, key), 400)
    assert rows() == before


FCM_WEB = "https://fcm.googleapis.com/fcm/send/x"
INVALID_TOKENS = [
    ("ios", "", "empty"),
    ("ios", "zz" * 32, "non-hex"),
    ("ios", "ab" * 3, "too-short"),
    ("ios", "ab" * 600, "too-long"),
    ("ios", "ab" * 31 + "\x00b", "nul"),
    ("android", "", "empty"),
    ("android", "a b" * 60, "whitespace"),
    ("android", "x" * 5000, "too-long"),
    ("android", "é" * 150, "non-ascii"),
    ("huawei", "", "empty"),
    ("huawei", "\U0001f600" * 40, "emoji"),
    ("web", "https://fcm.googleapis.com/x", "string-not-subscription"),
    ("web", {"endpoint": "http://169.254.169.254/latest", "keys": {"p256dh": "x", "auth": "y"}}, "ssrf"),
    ("web", {"endpoint": "https://fcm.googleapis.com/fcm/send/x", "keys": {}}, "no-keys"),
    (
        "web",
        {"endpoint": "https://fcm.googleapis.com/fcm/send/x", "keys": {"p256dh": "AA", "auth": "AA"}},
        "bad-keys",
    ),
]


@pytest.mark.parametrize(("platform", "token", "label"), INVALID_TOKENS, ids=[t[2] for t in INVALID_TOKENS])
def test_invalid_tokens_of_every_platform_are_400(key, platform, token, label) -> None:
    body = refused(post(DEVICES, registration(platform, token=token), key), 400)
    assert "token" in body.get("errors", {}) or "token" in body["detail"], body
    assert DeviceToken.objects.count() == 0


# --- brute force ---------------------------------------------------------------------------------
def test_repeated_wrong_keys_are_throttled_with_retry_after(settings, app, key) -> None:
    settings.API_AUTH_FAILURES_MAX = 5
    settings.API_AUTH_FAILURE_WINDOW_S = 60
    attacker = "203.0.113.9"
    # A real key's prefix with wrong secrets: the database is asked each time, the secret never matches.
    guesses = [key[:-6] + f"zz{i:04d}" for i in range(5)]
    for guess in guesses:
        refused(post(DEVICES, registration("ios"), guess, addr=attacker), 401)
    blocked = post(DEVICES, registration("ios"), "pk_wrong.guess", addr=attacker)
    body = refused(blocked, 429)
    assert 0 < int(blocked["Retry-After"]) <= 60
    assert "Too many failed" in body["detail"]
    # A valid key is never refused, not even from the blocked address (behind a load balancer every
    # tenant shares it): only keys that do not verify are answered 429 (tokens/throttle.py).
    from tokens.auth import forget_cached_keys

    forget_cached_keys()
    assert post(DEVICES, registration("ios"), key, addr=attacker).status_code == 201
    assert post(DEVICES, registration("ios"), key, addr="198.51.100.20").status_code == 201
    refused(post(DEVICES, registration("ios"), "pk_wrong.again", addr=attacker), 429)
    refused(post(DEVICES, registration("ios"), "pk_wrong.guess", addr="198.51.100.20"), 401)
    assert DeviceToken.objects.count() == 2


def test_successful_keys_never_count_towards_the_limit(settings, key) -> None:
    settings.API_AUTH_FAILURES_MAX = 3
    for _ in range(10):
        assert post(DEVICES, registration("ios"), key, addr="203.0.113.10").status_code == 201
    from tokens.auth import forget_cached_keys

    forget_cached_keys()  # every request verifies against the database, none is a failure
    for _ in range(5):
        assert post(DEVICES, registration("ios"), key, addr="203.0.113.10").status_code == 201
        forget_cached_keys()


def test_window_expiry_unblocks_the_client(settings, redis_client) -> None:
    settings.API_AUTH_FAILURES_MAX = 2
    for _ in range(2):
        refused(post(DEVICES, registration("ios"), "pk_x.y", addr="203.0.113.11"), 401)
    assert post(DEVICES, registration("ios"), "pk_x.y", addr="203.0.113.11").status_code == 429
    # The window is a Redis TTL: ending it is what the clock would do after API_AUTH_FAILURE_WINDOW_S.
    redis_client.delete("pushsvc:authfail:203.0.113.11", "pushsvc:authfail:203.0.113.11:-")
    refused(post(DEVICES, registration("ios"), "pk_x.y", addr="203.0.113.11"), 401)


def test_unique_device_ids_do_not_collide_across_apps(key) -> None:
    """Tenancy at the storage level: the same device id in two apps is two rows, each app sees its own."""
    device = str(uuid.uuid4())
    other_key = make_key(make_app(), ("devices",))
    assert post(DEVICES, registration("ios", device_id=device), key).status_code == 201
    assert post(DEVICES, registration("android", device_id=device), other_key).status_code == 201
    assert DeviceToken.objects.filter(device_id=device).count() == 2
    got = Client().get(f"{DEVICES}{device}/", headers={"Authorization": f"Bearer {key}"}).json()
    assert got["platform"] == "ios"
