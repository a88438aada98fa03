"""Issue 13 findings about what clients may write: message fields that become HTTP headers or
payload fields (400 naming the field), the `url` deny-list bypass, the admin campaign form's 500s,
and the `register` scope for keys shipped inside apps. Through the real Django stack and PostgreSQL."""

from __future__ import annotations

import json
import uuid

import pytest
from django.contrib.auth.models import User
from django.test import Client

from campaigns.models import Campaign
from delivery.payload import PayloadError, PushMessage
from tokens.models import DeviceToken
from tokens.testing import make_app, make_key, registration

pytestmark = pytest.mark.django_db

CAMPAIGNS = "/api/v1/campaigns/"
DEVICES = "/api/v1/devices/"


@pytest.fixture(autouse=True)
def _clean_redis(redis_client):
    """The API-key throttle counts in the tests' Redis database."""


def _api(key: str) -> Client:
    return Client(headers={"Authorization": f"Bearer {key}"})


# --- 5. header and identifier fields ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("collapse_key", "café"),  # crashed the shard with UnicodeEncodeError at send time
        ("collapse_key", "x\u0001y"),  # made the provider answer GOAWAY
        ("collapse_key", "tab\there"),
        ("collapse_key", "del\x7f"),
        ("category", "x\u0001y"),
        ("category", "bidi\u202eevil"),
        ("thread_id", "x\u0085y"),
        ("sound", "x\u0007.caf"),
        ("message_id", "café"),
        ("title", "lone \ud800 surrogate"),
        ("body", "lone \udfff surrogate"),
    ],
)
def test_header_and_identifier_fields_refuse_what_providers_do_not_accept(field, value) -> None:
    with pytest.raises(PayloadError) as caught:
        PushMessage.from_dict({"title": "t", field: value} if field != "title" else {field: value})
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("field", "value"),
    [("collapse_key", "café"), ("collapse_key", "x\u0001y"), ("category", "x\u0001y"), ("sound", "a\u0007")],
)
def test_bad_fields_are_a_400_naming_the_field_and_store_nothing(field, value) -> None:
    key = make_key(make_app(), ("send",))
    response = _api(key).post(
        CAMPAIGNS, {"message": {"title": "t", field: value}, "draft": True}, content_type="application/json"
    )
    assert response.status_code == 400, response.content
    body = response.json()
    assert field in body["errors"], body
    assert Campaign.objects.count() == 0


def test_ascii_header_fields_and_unicode_text_are_still_accepted() -> None:
    message = PushMessage.from_dict(
        {"title": "Café ☕", "body": "naïve", "collapse_key": "order-42 v2", "category": "ORDER_É",
         "thread_id": "fil-d'actualité", "sound": "chime.caf", "data": {"k": "ünïcode"}}
    )  # fmt: skip
    assert message.collapse_key == "order-42 v2" and message.category == "ORDER_É"


# --- 6. url: http(s) only, judged as a browser parses it --------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "\u0001javascript:alert(1)",  # the bypass: WHATWG parsers strip leading C0 controls
        " javascript:alert(1)",
        "java\tscript:alert(1)",  # and tabs/newlines anywhere
        "java\nscript:alert(1)",
        "javascript:alert(1)\u0000",
        "JAVASCRIPT:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "vbscript:msgbox(1)",
        "blob:https://e.com/x",
        "myapp://orders/42",
        "https:",
        "https://",
        "//e.com/x",
        "https://e.com/\u0085",
    ],
)
def test_url_must_be_http_or_https_after_what_browsers_strip(url) -> None:
    with pytest.raises(PayloadError) as caught:
        PushMessage.from_dict({"title": "t", "url": url})
    assert caught.value.field == "url"
    key = make_key(make_app(), ("send",))
    response = _api(key).post(
        CAMPAIGNS, {"message": {"title": "t", "url": url}, "draft": True}, content_type="application/json"
    )
    body = response.json()
    assert response.status_code == 400
    # NUL is refused by the JSON parser for every field (pushsvc/api.py), before the message rules.
    assert "url" in body.get("errors", {}) or "NUL" in body["detail"], body


def test_web_urls_are_accepted() -> None:
    for url in ("https://e.com/x?y=1#z", "http://e.com", "HTTPS://E.COM/"):
        assert PushMessage.from_dict({"title": "t", "url": url}).url == url


# --- 8. admin campaign form: 400-style form errors, not 500 -------------------------------------------
@pytest.fixture
def admin_client() -> Client:
    user = User.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize(
    ("message", "target"),
    [
        ('{"title": "lone \\ud800 surrogate"}', ""),
        ('{"title": "t", "data": {"k": "nul\\u0000here"}}', ""),
        ('{"title": "t", "data": {"nul\\u0000key": "v"}}', ""),
        ("[" * 3000 + "]" * 3000, ""),
        ('{"title": "t"}', "[" * 3000 + "]" * 3000),
        ('{"title": "t"}', '{"user_ids": ["nul\\u0000"]}'),
        ('{"title": "t"}', '{"user_ids": ["\\udc00"]}'),
    ],
)
def test_admin_campaign_form_answers_form_errors_not_500(admin_client, message, target) -> None:
    app = make_app()
    response = admin_client.post(
        "/admin/campaigns/campaign/add/",
        {"app": app.pk, "name": "x", "message": message, "target": target, "halt_error_rate": "0.5",
         "rollout_ramp_minutes": "0"},
    )  # fmt: skip
    assert response.status_code == 200, response.status_code  # the form again, with its errors
    assert b"errornote" in response.content or b"errorlist" in response.content
    assert Campaign.objects.count() == 0


# --- 4. the register scope ----------------------------------------------------------------------------
def test_register_key_creates_updates_and_deletes_but_cannot_read_or_list() -> None:
    app = make_app()
    server = make_key(app, ("devices", "send"))
    shipped = make_key(app, ("register",))
    mine = str(uuid.uuid4())
    theirs = str(uuid.uuid4())
    assert _api(server).post(DEVICES, registration("ios", device_id=theirs), content_type="application/json"
                             ).status_code == 201  # fmt: skip
    # Create and update its own device.
    own = registration("ios", device_id=mine)
    created = _api(shipped).post(DEVICES, own, content_type="application/json")
    assert created.status_code == 201
    rotated = registration("ios", device_id=mine)
    assert _api(shipped).post(DEVICES, rotated, content_type="application/json").status_code == 200
    assert DeviceToken.objects.get(device_id=mine).token == rotated["token"]
    # No listing, no reading (of its own device either: the app has it already).
    for path in (DEVICES, f"{DEVICES}?user_id=user-1", f"{DEVICES}{theirs}/", f"{DEVICES}{mine}/"):
        response = _api(shipped).get(path)
        assert response.status_code == 403, path
        assert "devices" in response.json()["detail"]
        assert theirs not in response.content.decode()
    # No sends.
    assert _api(shipped).post(CAMPAIGNS, {"message": {"title": "t"}, "draft": True},
                              content_type="application/json").status_code == 403  # fmt: skip
    # Unregister: 204 whether or not the id exists, so it learns nothing about other devices.
    assert _api(shipped).delete(f"{DEVICES}{uuid.uuid4()}/").status_code == 204
    assert _api(shipped).delete(f"{DEVICES}{mine}/").status_code == 204
    assert not DeviceToken.objects.get(device_id=mine).is_active
    # Server keys keep their scopes.
    assert _api(server).get(f"{DEVICES}{theirs}/").status_code == 200
    assert _api(server).delete(f"{DEVICES}{uuid.uuid4()}/").status_code == 404
    assert json.loads(_api(server).get(DEVICES).content)["results"]
