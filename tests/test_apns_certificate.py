"""APNs certificate authentication: the certificate is checked on save (topic from its UID,
environment from Apple's extensions, expiry), the adapter presents it on its own connections to
the simulator's strict front (which verifies client certificates against its client CA, as APNs
does with Apple's), a certificate APNs does not accept fails the handshake and pauses sends as a
credential failure, and its expiry reaches /metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import uuid
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509 import load_pem_x509_certificate
from django.core.management import CommandError, call_command
from django.test import Client

from delivery import runtime
from delivery.credentials import shared_cache
from delivery.payload import PushMessage
from delivery.providers.apns import ApnsProvider
from delivery.providers.base import Outcome, Target
from pushsvc import metrics
from simulator.credentials import apns_client_certificate, load_ca, new_ca
from simulator.testing import SimulatorProcess
from tokens import credentials
from tokens.models import App

pytestmark = pytest.mark.django_db(transaction=True)

TOPIC = "com.example.certified"


@pytest.fixture
def sim(simulator_strict: SimulatorProcess, settings, redis_client: redis.Redis) -> SimulatorProcess:
    base = simulator_strict.base_url
    settings.APNS_ENDPOINT_PRODUCTION = base
    settings.APNS_ENDPOINT_SANDBOX = base
    settings.PUSH_CA_BUNDLE = simulator_strict.ca_file
    shared_cache().forget_local()
    return simulator_strict


def client_ca(sim: SimulatorProcess):
    return load_ca(sim.credentials.apns_client_ca_file)


def p12(cert_pem: str, key_pem: str, password: str) -> bytes:
    cert = load_pem_x509_certificate(cert_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    return pkcs12.serialize_key_and_certificates(
        b"apns", key, cert, None, serialization.BestAvailableEncryption(password.encode())
    )


def cert_app(cert_pem: str, key_pem: str, **fields) -> App:
    parsed = credentials.parse_apns_certificate(cert_pem.encode(), key_pem=key_pem)
    slug = f"cert-{uuid.uuid4().hex[:8]}"
    return App.objects.create(
        slug=slug,
        name=slug,
        apns_auth="certificate",
        apns_topic=parsed.topic,
        apns_environment=parsed.environment_for("production"),
        apns_cert_pem=parsed.cert_pem,
        apns_cert_key_pem=parsed.key_pem,
        apns_cert_expires_at=parsed.not_after,
        **fields,
    )


def send(app: App, tokens: list[str]) -> list:
    async def go():
        provider = ApnsProvider.from_app(app)
        try:
            message = PushMessage(title="hi", body="certified")
            return await provider.send_many([Target(i, t) for i, t in enumerate(tokens)], message)
        finally:
            await provider.aclose()

    return asyncio.run(go())


# --- parsing and validation --------------------------------------------------------------------


def test_p12_and_pem_give_topic_environment_and_expiry(sim):
    not_after = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=200)
    cert, key = apns_client_certificate(client_ca(sim), TOPIC, environments=("sandbox",), not_after=not_after)
    from_p12 = credentials.parse_apns_certificate(p12(cert, key, "s3cret"), password="s3cret")
    from_pem = credentials.parse_apns_certificate((cert + key).encode())
    for parsed in (from_p12, from_pem):
        assert parsed.topic == TOPIC
        assert parsed.environments == {"sandbox"}
        assert parsed.not_after == not_after
        assert parsed.environment_for("production") == "sandbox"  # the only one it opens
    universal, ukey = apns_client_certificate(client_ca(sim), TOPIC)
    both = credentials.parse_apns_certificate(universal.encode(), key_pem=ukey)
    assert both.environments == {"sandbox", "production"} and both.environment_for("sandbox") == "sandbox"


@pytest.mark.parametrize(
    "problem",
    ["wrong password", "expired", "no key", "foreign key", "no environment", "no uid", "garbage"],
)
def test_bad_certificates_are_refused_with_a_reason(sim, problem):
    ca = client_ca(sim)
    now = dt.datetime.now(dt.UTC)
    cert, key = apns_client_certificate(ca, TOPIC)
    data, kwargs, expected = (cert + key).encode(), {}, ""
    if problem == "wrong password":
        data, kwargs, expected = p12(cert, key, "right"), {"password": "wrong"}, "wrong password"
    elif problem == "expired":
        old, old_key = apns_client_certificate(
            ca, TOPIC, not_before=now - dt.timedelta(days=400), not_after=now - dt.timedelta(days=1)
        )
        data, expected = (old + old_key).encode(), "expired on"
    elif problem == "no key":
        data, expected = cert.encode(), "without its private key"
    elif problem == "foreign key":
        data, expected = (cert + apns_client_certificate(ca, TOPIC)[1]).encode(), "does not belong"
    elif problem == "no environment":
        bare, bare_key = apns_client_certificate(ca, TOPIC, environments=())
        data, expected = (bare + bare_key).encode(), "neither Apple's development nor production"
    elif problem == "no uid":
        server_pem = Path(sim.credentials.server_cert_file).read_text()
        server_key = Path(sim.credentials.server_key_file).read_text()
        data, expected = (server_pem + server_key).encode(), "has no UID"
    else:
        data, expected = b"\x00\x01not a certificate", "not a PKCS#12 file"
    with pytest.raises(ValueError, match=expected) as info:
        credentials.parse_apns_certificate(data, **kwargs)
    assert "PRIVATE KEY" not in str(info.value)


def test_create_app_takes_a_p12_and_sets_topic_and_environment(sim, tmp_path):
    cert, key = apns_client_certificate(client_ca(sim), TOPIC, environments=("sandbox",))
    (tmp_path / "push.p12").write_bytes(p12(cert, key, "pw"))
    (tmp_path / "pw.txt").write_text("pw\n")
    out = io.StringIO()
    call_command(
        "create_app",
        slug="certapp",
        name="Cert App",
        apns_cert_file=str(tmp_path / "push.p12"),
        apns_cert_password_file=str(tmp_path / "pw.txt"),
        stdout=out,
    )
    app = App.objects.get(slug="certapp")
    assert app.apns_auth == "certificate" and app.apns_topic == TOPIC and app.apns_environment == "sandbox"
    assert app.apns_cert_expires_at is not None and "PRIVATE KEY" in app.apns_cert_key_pem
    assert "PRIVATE KEY" not in out.getvalue() and "expires" in out.getvalue()
    # A topic that is not the certificate's is refused, naming both.
    with pytest.raises(CommandError, match=r"is for 'com\.example\.certified'"):
        call_command(
            "create_app",
            slug="certapp",
            apns_topic="com.example.other",
            apns_cert_file=str(tmp_path / "push.p12"),
            apns_cert_password_file=str(tmp_path / "pw.txt"),
            stdout=io.StringIO(),
        )


# --- sending through the simulator -------------------------------------------------------------


def test_certificate_authenticated_sends_are_delivered(sim):
    cert, key = apns_client_certificate(client_ca(sim), TOPIC)
    app = cert_app(cert, key)
    tokens = [uuid.uuid4().hex * 2 for _ in range(20)]
    results = send(app, tokens)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 20, results[:2]
    assert sim.counts(tokens) == dict.fromkeys(tokens, 1)
    last = sim.last(tokens[:1])[tokens[0]]
    assert last["headers"]["apns-topic"] == TOPIC


def test_wrong_environment_is_bad_certificate_environment(sim):
    cert, key = apns_client_certificate(client_ca(sim), TOPIC, environments=("production",))
    app = cert_app(cert, key)
    sim.configure(apns_sandbox=True)  # the simulator now plays api.sandbox.push.apple.com
    [result] = send(app, [uuid.uuid4().hex * 2])
    assert result.outcome == Outcome.AUTH_FAILURE and result.reason == "BadCertificateEnvironment"


def test_a_certificate_apns_does_not_trust_fails_the_handshake_as_a_credential_failure(sim):
    foreign_cert, foreign_key = apns_client_certificate(new_ca("not Apple"), TOPIC)
    app = cert_app(foreign_cert, foreign_key)
    token = uuid.uuid4().hex * 2
    [result] = send(app, [token])
    assert result.outcome == Outcome.AUTH_FAILURE, result
    assert result.reason.startswith("BadCertificate"), result.reason
    assert sim.counts([token]) == {token: 0}


def test_an_expired_certificate_fails_without_connecting(sim):
    cert, key = apns_client_certificate(client_ca(sim), TOPIC)
    app = cert_app(cert, key)
    app.apns_cert_expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)  # as if time passed
    token = uuid.uuid4().hex * 2
    [result] = send(app, [token])
    assert result.outcome == Outcome.AUTH_FAILURE and "expired on" in result.reason
    assert sim.counts([token]) == {token: 0}


def test_token_and_certificate_apps_use_separate_pools(sim):
    cert, key = apns_client_certificate(client_ca(sim), TOPIC)
    app = cert_app(cert, key)
    token_app = App(
        slug="tok",
        apns_topic=sim.credentials.apns_topic,
        apns_key_p8=sim.credentials.apns_key_p8,
        apns_key_id=sim.credentials.apns_key_id,
        apns_team_id=sim.credentials.apns_team_id,
    )
    assert runtime.credential_fingerprint(app, "ios") != runtime.credential_fingerprint(token_app, "ios")
    tokens = [uuid.uuid4().hex * 2, uuid.uuid4().hex * 2]
    assert send(token_app, tokens[:1])[0].outcome == Outcome.DELIVERED
    assert send(app, tokens[1:])[0].outcome == Outcome.DELIVERED


# --- expiry on /metrics and in the admin ----------------------------------------------------------


def test_expiry_is_exported_and_shown_in_the_admin(sim, settings, admin_client):
    settings.METRICS_PUBLIC = True
    not_after = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=20)
    cert, key = apns_client_certificate(client_ca(sim), TOPIC, not_after=not_after)
    app = cert_app(cert, key)
    text = Client().get("/metrics").content.decode()
    line = next(
        row
        for row in text.splitlines()
        if row.startswith(f'pushsvc_credential_expiry_seconds{{app="{app.slug}"')
    )
    assert 'provider="apns"' in line
    remaining = float(line.rsplit(" ", 1)[1])
    assert 19 * 86400 < remaining <= 20 * 86400  # under the 30-day alert threshold (ops/alerts.yml)
    page = admin_client.get(f"/admin/tokens/app/{app.pk}/change/").content.decode()
    assert (
        not_after.strftime("%Y-%m-%d") in page or not_after.strftime("%b. %d, %Y").replace(" 0", " ") in page
    )
    listing = admin_client.get("/admin/tokens/app/").content.decode()
    assert "certificate expires" in listing.lower() or not_after.strftime("%Y-%m-%d") in listing
    for page_text in (page, listing, text):
        assert "PRIVATE KEY" not in page_text
    metrics._churn_cache = (0.0, [])


def test_admin_upload_checks_the_certificate_and_never_echoes_it(sim, admin_client):
    from django.core.files.uploadedfile import SimpleUploadedFile

    cert, key = apns_client_certificate(client_ca(sim), TOPIC, environments=("sandbox",))
    app = App.objects.create(slug="adm", name="adm")
    form = {
        "name": "adm",
        "slug": "adm",
        "is_active": "on",
        "apns_auth": "certificate",
        "apns_topic": "",
        "apns_environment": "production",
        "new_apns_certificate_password": "wrong",
    }
    url = f"/admin/tokens/app/{app.pk}/change/"
    refused = admin_client.post(
        url, {**form, "new_apns_certificate": SimpleUploadedFile("p.p12", p12(cert, key, "pw"))}
    )
    assert refused.status_code == 200 and "wrong password" in refused.content.decode()
    assert 'value="wrong"' not in refused.content.decode()  # the password is not rendered back
    app.refresh_from_db()
    assert app.apns_auth == "token" and not app.apns_cert_key_pem  # nothing stored

    # Certificate authentication without a certificate is refused too.
    missing = admin_client.post(url, {**form, "new_apns_certificate_password": ""})
    assert missing.status_code == 200 and "needs an APNs certificate" in missing.content.decode()

    saved = admin_client.post(
        url,
        {
            **form,
            "new_apns_certificate_password": "pw",
            "new_apns_certificate": SimpleUploadedFile("p.p12", p12(cert, key, "pw")),
        },
    )
    assert saved.status_code == 302, saved.content.decode()[:3000]
    app.refresh_from_db()
    assert (app.apns_auth, app.apns_topic, app.apns_environment) == ("certificate", TOPIC, "sandbox")
    assert app.apns_cert_expires_at is not None and app.apns_cert_key_pem.startswith(
        "-----BEGIN PRIVATE KEY-----"
    )
    page = admin_client.get(url).content.decode()
    body_line = app.apns_cert_key_pem.splitlines()[1]
    assert body_line not in page and f"set · {app.secret_fingerprint('apns_cert_key_pem')}" in page
