"""The simulator's FCM v1 endpoint and its OAuth token endpoint, over HTTP/2 + TLS on both fronts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from simulator.testing import SimulatorProcess, fcm_assertion

GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@pytest.fixture(params=["fast", "strict"])
def sim(request: pytest.FixtureRequest) -> SimulatorProcess:
    return request.getfixturevalue(f"simulator_{request.param}")


@pytest.fixture
def client(sim: SimulatorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(http2=True, verify=sim.ssl_context(), timeout=10) as c:
        yield c


def token_uri(sim: SimulatorProcess) -> str:
    return json.loads(sim.credentials.fcm_service_account)["token_uri"]


def access_token(client: httpx.Client, sim: SimulatorProcess) -> str:
    resp = client.post(
        token_uri(sim), data={"grant_type": GRANT, "assertion": fcm_assertion(sim.credentials)}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["access_token"]


def send(
    client: httpx.Client,
    sim: SimulatorProcess,
    message: dict | None = None,
    *,
    token: str | None = None,
    bearer: str | None = None,
    project: str | None = None,
    doc: dict | None = None,
) -> httpx.Response:
    project = project or sim.credentials.fcm_project_id
    if doc is None:
        doc = {"message": message if message is not None else {"token": token or "tok-1", "data": {"k": "v"}}}
    return client.post(
        sim.url(f"/v1/projects/{project}/messages:send"),
        headers={"authorization": f"Bearer {bearer or access_token(client, sim)}"},
        json=doc,
    )


def fcm_error(resp: httpx.Response) -> tuple[int, str, str | None]:
    err = resp.json()["error"]
    codes = [d["errorCode"] for d in err.get("details", []) if d["@type"].endswith("FcmError")]
    assert err["code"] == resp.status_code
    return resp.status_code, err["status"], codes[0] if codes else None


def test_token_points_at_the_simulator(sim):
    assert token_uri(sim) == sim.base_url + "/token"


def test_oauth_exchange_and_send(client, sim):
    resp = client.post(
        token_uri(sim), data={"grant_type": GRANT, "assertion": fcm_assertion(sim.credentials)}
    )
    assert resp.status_code == 200
    body = resp.json()
    assert body["expires_in"] == 3599
    assert body["token_type"] == "Bearer"
    sent = send(
        client,
        sim,
        {"token": "tok-1", "notification": {"title": "t", "body": "b"}, "data": {"a": "1"}},
        bearer=body["access_token"],
    )
    assert sent.status_code == 200
    assert sent.json()["name"].startswith(f"projects/{sim.credentials.fcm_project_id}/messages/")
    assert sent.http_version == "HTTP/2"
    assert sim.counts(["tok-1"]) == {"tok-1": 1}
    assert sim.last(["tok-1"])["tok-1"]["message"]["data"] == {"a": "1"}
    assert sim.stats()["by_outcome"] == {"fcm-oauth 200": 1, "fcm 200": 1}


def _other_rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize(
    "case", ["bad_signature", "wrong_aud", "wrong_scope", "wrong_iss", "expired", "too_long"]
)
def test_oauth_rejects_bad_assertions(client, sim, case):
    creds = sim.credentials
    now = int(time.time())
    if case == "bad_signature":
        import jwt

        claims = {
            "iss": creds.fcm_client_email,
            "aud": token_uri(sim),
            "scope": "https://www.googleapis.com/auth/firebase.messaging",
            "iat": now,
            "exp": now + 3600,
        }
        assertion = jwt.encode(claims, _other_rsa_pem(), algorithm="RS256")
    else:
        overrides = {
            "wrong_aud": {"aud": "https://oauth2.googleapis.com/token"},
            "wrong_scope": {"scope": "https://www.googleapis.com/auth/userinfo.email"},
            "wrong_iss": {"iss": "someone@else.iam.gserviceaccount.com"},
            "expired": {"iat": now - 7200, "exp": now - 3600},
            "too_long": {"exp": now + 7200},
        }[case]
        assertion = fcm_assertion(creds, **overrides)
    resp = client.post(token_uri(sim), data={"grant_type": GRANT, "assertion": assertion})
    assert resp.status_code == 400
    assert resp.json()["error"] in ("invalid_grant", "invalid_scope")
    assert "access_token" not in resp.text


def test_oauth_rejects_other_grant_types(client, sim):
    resp = client.post(token_uri(sim), data={"grant_type": "client_credentials"})
    assert (resp.status_code, resp.json()["error"]) == (400, "unsupported_grant_type")


@pytest.mark.parametrize("bearer", ["", "ya29.made-up"])
def test_send_needs_an_issued_bearer(client, sim, bearer):
    resp = client.post(
        sim.url(f"/v1/projects/{sim.credentials.fcm_project_id}/messages:send"),
        headers={"authorization": f"Bearer {bearer}"} if bearer else {},
        json={"message": {"token": "t"}},
    )
    assert fcm_error(resp) == (401, "UNAUTHENTICATED", None)


def test_revoked_service_account(client, sim):
    bearer = access_token(client, sim)
    sim.configure(fcm_revoked=True)
    assert fcm_error(send(client, sim, bearer=bearer)) == (401, "UNAUTHENTICATED", None)
    resp = client.post(
        token_uri(sim), data={"grant_type": GRANT, "assertion": fcm_assertion(sim.credentials)}
    )
    assert (resp.status_code, resp.json()["error"]) == (400, "invalid_grant")


def test_wrong_project(client, sim):
    assert fcm_error(send(client, sim, project="someone-else")) == (403, "PERMISSION_DENIED", None)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"message": {"token": "t", "data": {"n": 1}}}, "message.data[0].value"),
        ({"message": {"token": "t", "data": {"from": "x"}}}, "message.data"),
        ({"message": {"token": "t", "data": {"k": "v" * 4097}}}, "message.data"),
        ({"message": {"token": "t", "notification": {"title": 5}}}, "message.notification.title"),
        ({"message": {"token": "t", "android": {"priority": "urgent"}}}, "message.android.priority"),
        ({"message": {"token": "t", "android": {"ttl": "3600"}}}, "message.android.ttl"),
        ({"message": {"token": "t", "android": {"ttl": "2419201s"}}}, "message.android.ttl"),
        ({"message": {"token": "t", "bogus": 1}}, "message"),
        ({"message": {"data": {"k": "v"}}}, "message.token"),
        ({"message": {"token": "t"}, "extra": 1}, ""),
    ],
)
def test_bad_requests_carry_field_violations(client, sim, doc, field):
    resp = send(client, sim, doc=doc)
    assert fcm_error(resp)[:2] == (400, "INVALID_ARGUMENT")
    violations = [
        v
        for d in resp.json()["error"]["details"]
        if d["@type"].endswith("BadRequest")
        for v in d["fieldViolations"]
    ]
    assert violations and violations[0]["field"] == field
    assert sim.stats()["delivered_total"] == 0


def test_valid_android_options(client, sim):
    msg = {
        "token": "t",
        "android": {"priority": "high", "ttl": "3600s", "collapse_key": "c"},
        "data": {"k": "v"},
    }
    assert send(client, sim, msg).status_code == 200


def test_validate_only_is_not_delivered(client, sim):
    resp = send(client, sim, doc={"message": {"token": "t"}, "validate_only": True})
    assert resp.status_code == 200
    assert sim.counts(["t"]) == {"t": 0}


def test_fault_01_and_02_and_08(client, sim):
    bearer = access_token(client, sim)
    assert fcm_error(send(client, sim, token="fa017501aa", bearer=bearer)) == (
        404,
        "NOT_FOUND",
        "UNREGISTERED",
    )
    resp = send(client, sim, token="fa017502aa", bearer=bearer)
    assert fcm_error(resp) == (400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert "not a valid FCM registration token" in resp.json()["error"]["message"]
    assert fcm_error(send(client, sim, token="fa017508aa", bearer=bearer)) == (
        403,
        "PERMISSION_DENIED",
        "SENDER_ID_MISMATCH",
    )
    stats = sim.stats()["by_outcome"]
    assert stats["fcm 404 UNREGISTERED"] == 1
    assert stats["fcm 403 SENDER_ID_MISMATCH"] == 1


@pytest.mark.parametrize(
    ("code", "answers"),
    [
        ("03", [(429, "QUOTA_EXCEEDED"), (200, None)]),
        ("04", [(429, "QUOTA_EXCEEDED"), (429, "QUOTA_EXCEEDED"), (200, None)]),
        ("05", [(503, "UNAVAILABLE"), (503, "UNAVAILABLE")]),
        ("06", [(500, "INTERNAL"), (200, None)]),
    ],
)
def test_transient_faults(client, sim, code, answers):
    bearer = access_token(client, sim)
    token = f"fa0175{code}-fcm"
    got = []
    for _ in answers:
        resp = send(client, sim, token=token, bearer=bearer)
        got.append((resp.status_code, None if resp.status_code == 200 else fcm_error(resp)[2]))
        if resp.status_code == 429:
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert got == answers


def test_access_token_lifetime_knob(client, sim):
    bearer = access_token(client, sim)
    assert send(client, sim, bearer=bearer).status_code == 200
    sim.configure(oauth_token_lifetime_s=0.001)  # every token issued so far is now past its lifetime
    assert fcm_error(send(client, sim, bearer=bearer)) == (401, "UNAUTHENTICATED", None)
    sim.configure(oauth_token_lifetime_s=0)
    assert send(client, sim, bearer=bearer).status_code == 200
