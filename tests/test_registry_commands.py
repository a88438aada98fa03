"""create_app, create_api_key, revoke_api_key: what they store and print (never secrets)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.core.management import CommandError, call_command
from django.test import Client

from tokens.models import ApiKey, App
from tokens.testing import registration

pytestmark = pytest.mark.django_db


def run(*args, **kwargs) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, **kwargs)
    return out.getvalue()


def pem_file(tmp_path, key, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(path)


def test_create_app_with_every_credential_then_update(tmp_path):
    p8 = pem_file(tmp_path, ec.generate_private_key(ec.SECP256R1()), "AuthKey.p8")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem = pem_file(tmp_path, rsa_key, "rsa.pem")
    sa = tmp_path / "sa.json"
    sa.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "p",
                "private_key": Path(rsa_pem).read_text(),
                "client_email": "a@p.iam.gserviceaccount.com",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    hms = tmp_path / "hms.txt"
    hms.write_text("very-secret-hms\n")
    out = run(
        "create_app",
        slug="shop",
        name="Shop",
        apns_key_file=p8,
        apns_key_id="KEY1234567",
        apns_team_id="TEAM123456",
        apns_topic="com.example.shop",
        apns_environment="sandbox",
        fcm_service_account_file=str(sa),
        hms_app_id="10086",
        hms_client_secret_file=str(hms),
        vapid_generate=True,
        vapid_subject="mailto:ops@example.com",
    )
    app = App.objects.get(slug="shop")
    assert app.apns_environment == "sandbox" and app.hms_client_secret == "very-secret-hms"
    assert app.vapid_public_key and app.vapid_private_key.startswith("-----BEGIN PRIVATE KEY-----")
    assert "Created app 'shop'" in out and app.vapid_public_key in out
    for field in App.SECRET_FIELDS:
        assert app.secret_fingerprint(field) in out
    for secret in (
        "very-secret-hms",
        Path(p8).read_text().splitlines()[1],
        app.vapid_private_key.splitlines()[1],
    ):
        assert secret not in out
    out = run("create_app", slug="shop", name="Shop 2", apns_environment="production")
    app.refresh_from_db()
    assert "Updated app 'shop'" in out
    assert (app.name, app.apns_environment, app.hms_client_secret) == (
        "Shop 2",
        "production",
        "very-secret-hms",
    )
    assert App.objects.filter(slug="shop").count() == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "--name is required"),
        ({"name": "X", "apns_key_file": "/nonexistent.p8"}, "no such file"),
        ({"name": "X", "vapid_subject": "ops@example.com"}, "mailto: or https:"),
        ({"name": "X", "slug": "not a slug!"}, "slug"),
    ],
)
def test_create_app_errors(options, message):
    options = {"slug": "new-app", **options}
    with pytest.raises(CommandError, match=message):
        run("create_app", **options)
    assert not App.objects.filter(slug="new-app").exists()


def test_create_app_rejects_wrong_key_types(tmp_path):
    rsa_file = pem_file(tmp_path, rsa.generate_private_key(public_exponent=65537, key_size=2048), "k.pem")
    with pytest.raises(CommandError, match="P-256"):
        run("create_app", slug="a", name="A", apns_key_file=rsa_file)
    with pytest.raises(CommandError, match="P-256"):
        run("create_app", slug="a", name="A", vapid_private_key_file=rsa_file)
    bad_sa = tmp_path / "sa.json"
    bad_sa.write_text('{"type": "service_account", "project_id": "p"}')
    with pytest.raises(CommandError, match="lacks: private_key, client_email, token_uri"):
        run("create_app", slug="a", name="A", fcm_service_account_file=str(bad_sa))


def test_create_api_key_prints_a_working_key_once_and_revoke_stops_it():
    run("create_app", slug="shop", name="Shop")
    out = run("create_api_key", "shop", scopes="devices,send", name="backend")
    raw = re.search(r"psk_[0-9a-f]{12}_\S+", out).group(0)
    key = ApiKey.objects.get(app__slug="shop")
    assert key.matches(raw) and key.scopes == ["devices", "send"] and key.name == "backend"
    assert f"revoke_api_key {key.prefix}" in out
    client = Client(headers={"Authorization": f"Bearer {raw}"})
    body = json.dumps(registration())
    assert client.post("/api/v1/devices/", body, content_type="application/json").status_code == 201
    assert f"Revoked key {key.prefix}" in run("revoke_api_key", key.prefix)
    assert client.post("/api/v1/devices/", body, content_type="application/json").status_code == 401
    assert "already revoked" in run("revoke_api_key", raw)  # the whole key works as well
    assert run("create_api_key", "shop", quiet_key=True).strip().startswith("psk_")


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        (("nope",), {}, "No app"),
        (("shop",), {"scopes": "devices,admin"}, "Scopes must be"),
        (("shop",), {"scopes": ","}, "Scopes must be"),
    ],
)
def test_create_api_key_errors(args, options, message):
    run("create_app", slug="shop", name="Shop")
    with pytest.raises(CommandError, match=message):
        run("create_api_key", *args, **options)


@pytest.mark.parametrize("prefix", ["000000000000", "psk_zz", "\x00" * 12, "x"])
def test_revoke_unknown_prefix(prefix):
    with pytest.raises(CommandError, match="No API key"):
        run("revoke_api_key", prefix)
