"""Django admin: credentials are write-only, API keys show once, the device list stays cheap."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.contrib.auth import get_user_model
from django.test import Client

from tokens.models import ApiKey, App, DeviceToken
from tokens.testing import apns_token, make_app, make_key, registration

pytestmark = pytest.mark.django_db


def pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def p256_pem() -> str:
    return pem(ec.generate_private_key(ec.SECP256R1()))


def service_account() -> str:
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "demo-project",
            "private_key_id": "abc",
            "private_key": pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            "client_email": "push@demo-project.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    )


def secret_fragments(app: App) -> list[str]:
    """Distinctive pieces of every stored secret (a PEM's base64 lines, the JSON key, the secret)."""
    fragments = [app.hms_client_secret]
    for text in (app.apns_key_p8, app.vapid_private_key, json.loads(app.fcm_service_account)["private_key"]):
        fragments += [line for line in text.splitlines() if line and "-----" not in line]
    return fragments


@pytest.fixture
def admin_client() -> Client:
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def app_with_secrets() -> App:
    from tokens.credentials import generate_vapid_key

    vapid_private, vapid_public = generate_vapid_key()
    return make_app(
        apns_key_p8=p256_pem(),
        apns_key_id="ABC123DEFG",
        apns_team_id="TEAM123456",
        apns_topic="com.example.app",
        fcm_service_account=service_account(),
        hms_app_id="1234567",
        hms_client_secret="hms-secret-" + uuid.uuid4().hex,
        vapid_private_key=vapid_private,
        vapid_public_key=vapid_public,
        vapid_subject="mailto:ops@example.com",
    )


def change_url(app: App) -> str:
    return f"/admin/tokens/app/{app.pk}/change/"


def form_data(app: App, **changes) -> dict:
    data = {
        "name": app.name,
        "slug": app.slug,
        "is_active": "on",
        "apns_auth": app.apns_auth,
        "apns_topic": app.apns_topic,
        "apns_environment": app.apns_environment,
        "apns_key_id": app.apns_key_id,
        "apns_team_id": app.apns_team_id,
        "hms_app_id": app.hms_app_id,
        "vapid_subject": app.vapid_subject,
        "new_apns_key_p8": "",
        "new_fcm_service_account": "",
        "new_hms_client_secret": "",
        "new_vapid_private_key": "",
    }
    data.update(changes)
    return data


def test_app_pages_never_render_stored_secrets(admin_client, app_with_secrets):
    pages = [
        admin_client.get(change_url(app_with_secrets)),
        admin_client.get("/admin/tokens/app/"),
        admin_client.get(f"/admin/tokens/app/{app_with_secrets.pk}/history/"),
    ]
    for page in pages:
        assert page.status_code == 200
        html = page.content.decode()
        for fragment in secret_fragments(app_with_secrets):
            assert fragment not in html
    change = pages[0].content.decode()
    for field in App.SECRET_FIELDS:
        assert f"set · {app_with_secrets.secret_fingerprint(field)}" in change
    assert app_with_secrets.vapid_public_key in change  # public, shown


def test_empty_inputs_keep_the_stored_secrets(admin_client, app_with_secrets):
    before = {f: getattr(app_with_secrets, f) for f in App.SECRET_FIELDS}
    response = admin_client.post(change_url(app_with_secrets), form_data(app_with_secrets, name="Renamed"))
    assert response.status_code == 302, response.content.decode()[:2000]
    app_with_secrets.refresh_from_db()
    assert app_with_secrets.name == "Renamed"
    assert {f: getattr(app_with_secrets, f) for f in App.SECRET_FIELDS} == before


def test_new_secrets_replace_and_are_validated(admin_client, app_with_secrets):
    old_key = app_with_secrets.apns_key_p8
    rsa_pem = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    bad = {
        "new_apns_key_p8": ("not a key", "not a readable"),
        "new_vapid_private_key": (rsa_pem, "P-256"),
        "new_fcm_service_account": ('{"type": "service_account"}', "lacks: project_id, private_key"),
    }
    for field, (value, message) in bad.items():
        response = admin_client.post(
            change_url(app_with_secrets), form_data(app_with_secrets, **{field: value})
        )
        assert response.status_code == 200
        assert message in response.content.decode()
        assert value not in response.content.decode()
    app_with_secrets.refresh_from_db()
    assert app_with_secrets.apns_key_p8 == old_key
    new_key = p256_pem()
    response = admin_client.post(
        change_url(app_with_secrets), form_data(app_with_secrets, new_apns_key_p8=new_key)
    )
    assert response.status_code == 302
    app_with_secrets.refresh_from_db()
    assert app_with_secrets.apns_key_p8 == new_key.strip()


def test_rejected_secret_is_not_echoed_back(admin_client, app_with_secrets):
    # A real P-256 key of the wrong kind for the field must not come back in the error page.
    rsa_pem = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    response = admin_client.post(
        change_url(app_with_secrets), form_data(app_with_secrets, new_apns_key_p8=rsa_pem)
    )
    assert response.status_code == 200
    body_line = rsa_pem.splitlines()[1]
    assert body_line not in response.content.decode()


def test_generate_vapid_and_clear_secret(admin_client, app_with_secrets):
    old_public = app_with_secrets.vapid_public_key
    response = admin_client.post(
        change_url(app_with_secrets),
        form_data(app_with_secrets, generate_vapid="on", clear_secrets=["hms_client_secret"]),
    )
    assert response.status_code == 302
    app_with_secrets.refresh_from_db()
    assert app_with_secrets.vapid_public_key != old_public and app_with_secrets.vapid_private_key
    assert app_with_secrets.hms_client_secret == ""


def test_api_key_created_in_admin_is_shown_once_and_works(admin_client):
    app = make_app()
    response = admin_client.post(
        "/admin/tokens/apikey/add/", {"app": app.pk, "name": "ios", "scopes": ["devices"]}, follow=True
    )
    assert response.status_code == 200
    raw = re.search(r"psk_[0-9a-f]{12}_[A-Za-z0-9_\-]+", response.content.decode()).group(0)
    key = ApiKey.objects.get(app=app)
    assert key.matches(raw) and key.scopes == ["devices"]
    change = admin_client.get(f"/admin/tokens/apikey/{key.pk}/change/").content.decode()
    assert raw not in change and key.prefix in change
    api = Client(headers={"Authorization": f"Bearer {raw}"})
    body = json.dumps(registration())
    assert api.post("/api/v1/devices/", body, content_type="application/json").status_code == 201
    response = admin_client.post(
        "/admin/tokens/apikey/", {"action": "revoke", "_selected_action": [key.pk]}, follow=True
    )
    assert "Revoked 1 key(s)." in response.content.decode()
    assert api.post("/api/v1/devices/", body, content_type="application/json").status_code == 401


def test_device_list_search_and_filters(admin_client):
    app = make_app()
    raw = make_key(app)
    api = Client(headers={"Authorization": f"Bearer {raw}"})
    token = apns_token()
    body = registration("ios", token=token, user_id="alice-42")
    api.post("/api/v1/devices/", json.dumps(body), content_type="application/json")
    api.post(
        "/api/v1/devices/",
        json.dumps(registration("android", user_id="bob")),
        content_type="application/json",
    )
    url = "/admin/tokens/devicetoken/"
    for query, expected in [
        ({"q": "alice-42"}, 1),
        ({"q": token[:10]}, 1),
        ({"q": body["device_id"]}, 1),
        ({"q": "alice"}, 0),  # user ids match exactly
        ({"platform__exact": "android"}, 1),
        ({"is_active__exact": "1"}, 2),
        ({"app__id__exact": str(app.pk)}, 2),
    ]:
        page = admin_client.get(url, query)
        assert page.status_code == 200
        assert len(page.context["cl"].result_list) == expected, query
    assert admin_client.get(url, {"q": "\x00"}).status_code == 200  # Django refuses it, no 500
    page = admin_client.get(f"/admin/tokens/devicetoken/{DeviceToken.objects.first().pk}/change/")
    assert page.status_code == 200
    assert admin_client.get("/admin/tokens/devicetoken/add/").status_code == 403
