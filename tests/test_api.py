"""Devices API v1 through the full Django stack (middleware, DRF, auth) on real PostgreSQL."""

from __future__ import annotations

import json
import uuid

import pytest
from django.test import Client
from django.utils import timezone

from tokens.models import ApiKey, DeviceToken
from tokens.testing import apns_token, fcm_token, make_app, make_key, registration, web_subscription

pytestmark = pytest.mark.django_db

URL = "/api/v1/devices/"


class Api:
    """A client that sends one app's key and JSON bodies."""

    def __init__(self, key: str | None) -> None:
        self.client = Client()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, body, **kw):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        kw.setdefault("content_type", "application/json")
        return self.client.post(URL, data=data, headers=self.headers, **kw)

    def get(self, path=URL, **params):
        return self.client.get(path, params, headers=self.headers)

    def delete(self, path):
        return self.client.delete(path, headers=self.headers)


@pytest.fixture
def app():
    return make_app()


@pytest.fixture
def api(app):
    return Api(make_key(app, ("devices",)))


def detail(device_id) -> str:
    return f"{URL}{device_id}/"


def test_register_creates_then_updates_and_reads_back(api):
    body = registration("ios", locale="en-GB", app_version="3.2.1")
    created = api.post(body)
    assert created.status_code == 201, created.content
    data = created.json()
    assert data["device_id"] == body["device_id"]
    assert data["token"] == body["token"]
    assert data["is_active"] is True and data["locale"] == "en-GB"
    again = api.post({**body, "user_id": "user-2"})
    assert again.status_code == 200
    assert again.json()["user_id"] == "user-2"
    assert again.json()["created_at"] == data["created_at"]
    read = api.get(detail(body["device_id"]))
    assert read.status_code == 200
    # The POST answer is built without a model instance: it must match the GET rendering.
    assert read.json() == again.json()


@pytest.mark.parametrize("platform", ["ios", "android", "huawei", "web"])
def test_every_platform_registers(api, platform):
    response = api.post(registration(platform))
    assert response.status_code == 201, response.content
    assert DeviceToken.objects.get(device_id=response.json()["device_id"]).platform == platform


def test_web_device_never_returns_its_keys(api):
    body = registration("web")
    response = api.post(body)
    assert response.status_code == 201
    text = response.content.decode() + api.get(detail(body["device_id"])).content.decode()
    assert body["token"]["keys"]["auth"] not in text
    assert body["token"]["keys"]["p256dh"] not in text
    assert response.json()["token"] == body["token"]["endpoint"]


def test_rotation_and_move_through_the_api(api, app):
    device_a, device_b = str(uuid.uuid4()), str(uuid.uuid4())
    old, new = apns_token(), apns_token()
    assert api.post(registration("ios", device_id=device_a, token=old)).status_code == 201
    assert api.post(registration("ios", device_id=device_a, token=new)).status_code == 200
    assert api.post(registration("ios", device_id=device_b, token=new)).status_code == 201
    rows = list(DeviceToken.objects.filter(app=app).values_list("device_id", "token"))
    assert rows == [(uuid.UUID(device_b), new)]


def test_delete_deactivates_and_registration_reactivates(api, app):
    body = registration("android")
    api.post(body)
    before = DeviceToken.objects.get(app=app)
    response = api.delete(detail(body["device_id"]))
    assert response.status_code == 204
    row = DeviceToken.objects.get(app=app)
    assert (row.is_active, row.deactivation_reason) == (False, "unregistered")
    assert row.deactivated_at is not None and row.updated_at == before.updated_at
    assert api.delete(detail(body["device_id"])).status_code == 204  # idempotent
    assert api.post(body).status_code == 200
    row.refresh_from_db()
    assert row.is_active and row.deactivated_at is None and row.deactivation_reason == ""


def test_list_by_user_with_keyset_pages(api):
    mine = {api.post(registration("ios", user_id="alice")).json()["device_id"] for _ in range(5)}
    api.post(registration("ios", user_id="bob"))
    seen, cursor = [], None
    while True:
        params = {"user_id": "alice", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = api.get(**params)
        assert page.status_code == 200, page.content
        seen += [d["device_id"] for d in page.json()["results"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 and set(seen) == mine
    assert len(api.get().json()["results"]) == 6
    assert [d["platform"] for d in api.get(platform="web").json()["results"]] == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "!!"}, "cursor"),
        ({"cursor": "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5"}, "cursor"),
        ({"platform": "symbian"}, "platform"),
        ({"user_id": "a\x00b"}, "user_id"),
        ({"user_id": "x" * 256}, "user_id"),
    ],
)
def test_list_rejects_bad_parameters(api, params, field):
    response = api.get(**params)
    assert response.status_code == 400
    assert field in response.json()["errors"]


# --- isolation ---------------------------------------------------------------------------------


def test_another_apps_device_is_invisible(api):
    other_app = make_app()
    other = Api(make_key(other_app))
    body = registration("ios")
    assert other.post(body).status_code == 201
    assert api.get(detail(body["device_id"])).status_code == 404
    assert api.delete(detail(body["device_id"])).status_code == 404
    assert api.get(user_id=body["user_id"]).json()["results"] == []
    # Same device_id and token under our key: a device of *our* app; theirs is untouched.
    assert api.post({**body, "user_id": "intruder"}).status_code == 201
    theirs = DeviceToken.objects.get(app=other_app)
    assert theirs.user_id == body["user_id"] and theirs.is_active


def test_unknown_and_malformed_device_ids_are_404(api):
    assert api.get(detail(uuid.uuid4())).status_code == 404
    assert api.get(detail("not-a-uuid")).status_code == 404
    assert api.delete(detail("%00")).status_code == 404
    assert api.get(detail(uuid.uuid4())).json() == {"detail": "No such device."}


# --- authentication and scopes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer psk_000000000000_nope",
        "Bearer psk_zzzzzzzzzzzz_x",
        "Bearer psk_\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00_x",
        "Bearer " + "a" * 5000,
    ],
)
def test_bad_credentials_are_401(header):
    client = Client()
    headers = {"Authorization": header} if header is not None else {}
    response = client.post(
        URL, data=json.dumps(registration()), content_type="application/json", headers=headers
    )
    assert response.status_code == 401
    assert response.json()["detail"]
    assert response["WWW-Authenticate"] == "Bearer"


def test_wrong_secret_and_revoked_key_get_the_same_401(app):
    key, raw = ApiKey.issue(app, ["devices"])
    wrong = raw[:-4] + ("AAAA" if not raw.endswith("AAAA") else "BBBB")
    wrong_response = Api(wrong).post(registration())
    key.revoke()
    revoked_response = Api(raw).post(registration())
    assert wrong_response.status_code == revoked_response.status_code == 401
    assert wrong_response.json() == revoked_response.json() == {"detail": "Invalid or revoked API key."}


def test_key_of_a_disabled_app_is_401(app, api):
    app.is_active = False
    app.save()
    assert api.post(registration()).status_code == 401


def test_send_only_key_is_403(app):
    api = Api(make_key(app, ("send",)))
    response = api.post(registration())
    assert response.status_code == 403
    assert "devices" in response.json()["detail"]
    assert api.get().status_code == 403
    assert not DeviceToken.objects.exists()


# --- validation --------------------------------------------------------------------------------

BAD_BODIES = [
    ({"device_id": None}, "device_id", "required"),
    ({"device_id": "123"}, "device_id", "UUID"),
    ({"device_id": 12345}, "device_id", "UUID"),
    ({"platform": None}, "platform", "required"),
    ({"platform": "blackberry"}, "platform", "one of"),
    ({"platform": ["ios"]}, "platform", "one of"),
    ({"token": None}, "token", "required"),
    ({"token": "abc"}, "token", "hex"),
    ({"token": "g" * 64}, "token", "hex digits"),
    ({"token": "a" * 65}, "token", "even"),
    ({"token": "ab" * 101}, "token", "200"),
    ({"token": 1234}, "token", "string"),
    ({"platform": "android", "token": ""}, "token", "empty"),
    ({"platform": "android", "token": "x" * 4097}, "token", "4096"),
    ({"platform": "android", "token": "abc def"}, "token", "visible ASCII"),
    ({"platform": "huawei", "token": "abc\x00def"}, "token", "visible ASCII"),
    ({"platform": "huawei", "token": "tökén"}, "token", "visible ASCII"),
    ({"platform": "web", "token": "https://fcm.googleapis.com/x"}, "token", "subscription object"),
    ({"user_id": "x" * 256}, "user_id", "255"),
    ({"user_id": 42}, "user_id", "string"),
    ({"user_id": "a\x00b"}, "user_id", "NUL"),
    ({"user_id": "a\u2028b"}, "user_id", "control"),
    ({"app_version": "1" * 33}, "app_version", "32"),
    ({"locale": "x" * 36}, "locale", "35"),
    ({"locale": "en US"}, "locale", "BCP 47"),
]


@pytest.mark.parametrize(("change", "field", "message"), BAD_BODIES)
def test_field_errors_are_400_with_the_field_message(api, change, field, message):
    body = {**registration("ios"), **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = api.post(body)
    assert response.status_code == 400, response.content
    data = response.json()
    assert data["detail"] == "Invalid request."
    assert message in " ".join(data["errors"][field])
    assert not DeviceToken.objects.exists()


def test_all_field_errors_are_reported_at_once(api):
    response = api.post({"platform": "ios", "token": "zz", "user_id": 7})
    assert set(response.json()["errors"]) == {"device_id", "token", "user_id"}


def web_body(**changes):
    body = registration("web")
    sub = body["token"]
    for key, value in changes.items():
        if key in ("p256dh", "auth"):
            sub["keys"][key] = value
        elif value is None:
            sub.pop(key)
        else:
            sub[key] = value
    return body


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"endpoint": None}, "endpoint"),
        ({"endpoint": "http://fcm.googleapis.com/fcm/send/x"}, "https"),
        ({"endpoint": "https://evil.example.com/push"}, "not an allowed push service"),
        ({"endpoint": "https://notfcm.googleapis.com.evil.io/x"}, "not an allowed push service"),
        ({"endpoint": "https://169.254.169.254/latest"}, "IP address"),
        ({"endpoint": "https://[::ffff:10.0.0.1]/x"}, "IP address"),
        ({"endpoint": "https://user:pw@fcm.googleapis.com/x"}, "credentials"),
        ({"endpoint": "https://fcm.googleapis.com/\x00"}, "control"),
        ({"endpoint": "ftp://fcm.googleapis.com/x"}, "https"),
        ({"endpoint": "https://fcm.googleapis.com:99999/x"}, "not a valid URL"),
        ({"keys": None}, "keys"),
        ({"p256dh": "not base64!"}, "p256dh"),
        ({"p256dh": "AAAA"}, "65-byte"),
        ({"p256dh": "BA" + "A" * 85}, "P-256 curve"),
        ({"auth": "AAAA"}, "16 bytes"),
        ({"auth": 16}, "auth"),
    ],
)
def test_web_subscription_errors(api, settings, changes, message):
    settings.WEBPUSH_ALLOW_INSECURE = False
    response = api.post(web_body(**changes))
    assert response.status_code == 400, response.content
    assert message in response.json()["errors"]["token"][0]


def test_allowed_host_suffix_matches_on_a_dot_boundary(api, settings):
    settings.WEBPUSH_ALLOW_INSECURE = False
    settings.WEBPUSH_ALLOWED_HOSTS = ["push.example"]
    ok = api.post(registration("web", token=web_subscription("https://eu.push.example/sub/1")))
    assert ok.status_code == 201, ok.content
    bad = api.post(registration("web", token=web_subscription("https://evilpush.example/sub/1")))
    assert bad.status_code == 400


def test_insecure_mode_accepts_the_local_simulator(api, settings):
    settings.WEBPUSH_ALLOW_INSECURE = True
    response = api.post(registration("web", token=web_subscription("http://127.0.0.1:8443/wp/sub-1")))
    assert response.status_code == 201, response.content


def test_unknown_fields_are_ignored(api):
    response = api.post({**registration("ios"), "sdk": "4.1", "extra": {"nested": [1, 2]}})
    assert response.status_code == 201


def test_apns_token_is_normalized_to_lowercase(api):
    token = apns_token()
    body = registration("ios", token=token.upper())
    assert api.post(body).json()["token"] == token


def test_fcm_token_of_4096_bytes_is_accepted(api):
    response = api.post(registration("android", token=fcm_token()[:100] + "x" * 3996))
    assert response.status_code == 201


# --- malformed requests: always a 4xx with a message, never a 500 ------------------------------

VALID = json.dumps(registration("ios")).encode()


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"", "application/json", 415),  # the test client drops the type of an empty body
        (b"{", "application/json", 400),
        (b"{'device_id': 1}", "application/json", 400),
        (b"null", "application/json", 400),
        (b"[]", "application/json", 400),
        (b'"a string"', "application/json", 400),
        (b"12", "application/json", 400),
        (b"\xff\xfe{}", "application/json", 400),
        (b'{"user_id": "\\ud800"}', "application/json", 400),
        (b'{"device_id": "\x00"}', "application/json", 400),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 413),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400),
        (b'{"a":' * 2000 + b"1" + b"}" * 2000, "application/json", 400),
        (b'{"user_id": "' + b"x" * 20_000 + b'"}', "application/json", 413),
        (VALID, "text/plain", 415),
        (VALID, "application/x-www-form-urlencoded", 415),
        (VALID, "multipart/form-data; boundary=x", 415),
        (VALID, "", 415),
    ],
)
def test_malformed_bodies_are_4xx(api, body, content_type, status):
    response = api.client.generic("POST", URL, body, content_type=content_type, headers=api.headers)
    assert response.status_code == status, response.content
    assert response.json()["detail"]
    assert not DeviceToken.objects.exists()


def test_json_with_charset_is_accepted(api):
    response = api.client.generic(
        "POST", URL, VALID, content_type="application/json; charset=utf-8", headers=api.headers
    )
    assert response.status_code == 201


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_other_methods_are_405(api, method):
    response = api.client.generic(method, URL, VALID, content_type="application/json", headers=api.headers)
    assert response.status_code == 405


def test_nul_in_path_and_query_never_reaches_the_database(api):
    assert api.get(detail("\x00")).status_code == 404
    assert api.get(user_id="\x00").status_code == 400


def test_openapi_schema_lists_the_paths_and_the_bearer_scheme():
    response = Client().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    schema = json.loads(response.content)
    assert {"/api/v1/devices/", "/api/v1/devices/{device_id}/"} <= set(schema["paths"])
    operations = schema["paths"]["/api/v1/devices/"]
    assert {"get", "post"} <= set(operations)
    assert set(schema["paths"]["/api/v1/devices/{device_id}/"]) >= {"get", "delete"}
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKeyBearer"] == {**schemes["ApiKeyBearer"], "type": "http", "scheme": "bearer"}
    assert {"ApiKeyBearer": []} in operations["post"]["security"]
    assert Client().get("/api/docs/").status_code == 200


def test_revocation_is_immediate_in_the_revoking_process(app):
    key, raw = ApiKey.issue(app, ["devices"])
    api = Api(raw)
    assert api.post(registration()).status_code == 201  # now cached
    key.revoke()
    assert api.post(registration()).status_code == 401


def test_revocation_elsewhere_takes_effect_within_the_cache_ttl(app, settings):
    """A revocation by another process (simulated by a raw UPDATE: no signal reaches this
    process's cache) stops the key once the cached entry expires."""
    import time

    settings.API_KEY_CACHE_SECONDS = 0.5
    key, raw = ApiKey.issue(app, ["devices"])
    api = Api(raw)
    assert api.post(registration()).status_code == 201
    ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())
    deadline = time.monotonic() + 30  # a deadline only: the entry expires 0.5 s after it was cached
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(api.post(registration()).status_code)
        if statuses[-1] == 401:
            break
    assert statuses[-1] == 401
    assert set(statuses) <= {201, 401}


def test_request_auth_exposes_the_app(app, api):
    from rest_framework.test import APIRequestFactory

    from tokens.auth import ApiKeyAuthentication

    request = APIRequestFactory().get(URL, HTTP_AUTHORIZATION=api.headers["Authorization"])
    _, key = ApiKeyAuthentication().authenticate(request)  # first: from the database
    _, cached = ApiKeyAuthentication().authenticate(request)  # second: from the cache
    assert key.app == app and cached.app == app and cached.app_id == app.pk
    assert cached.scopes == {"devices"}


def test_error_shape_for_non_field_validation_errors():
    from rest_framework.exceptions import NotFound, ValidationError

    from pushsvc.api import exception_handler

    assert exception_handler(ValidationError(["Too late.", "Retry."]), {}).data == {
        "detail": "Too late. Retry."
    }
    assert exception_handler(ValidationError({"a": ["bad"]}), {}).data == {
        "detail": "Invalid request.",
        "errors": {"a": ["bad"]},
    }
    assert exception_handler(NotFound(), {}).data == {"detail": "Not found."}
    assert exception_handler(ValueError("x"), {}) is None


def test_rejected_key_is_never_echoed(app):
    raw = make_key(app)
    wrong = raw[:-6] + "zzzzzz"
    response = Api(wrong).post(registration())
    assert response.status_code == 401
    assert wrong not in response.content.decode() and raw[:20] not in response.content.decode()
