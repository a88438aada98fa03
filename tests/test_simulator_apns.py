"""The simulator's APNs endpoint over real HTTP/2 + TLS, on both fronts: auth, validation, faults, counts."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from simulator.testing import SimulatorProcess, apns_jwt

GOOD = "ab" * 32
PAYLOAD = b'{"aps":{"alert":"hello"}}'


def fault(code: str, n: int = 0) -> str:
    return f"fa0175{code}" + f"{n:056x}"


@pytest.fixture(params=["fast", "strict"])
def sim(request: pytest.FixtureRequest) -> SimulatorProcess:
    return request.getfixturevalue(f"simulator_{request.param}")


@pytest.fixture
def client(sim: SimulatorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(http2=True, verify=sim.ssl_context(), base_url=sim.base_url, timeout=10) as c:
        yield c


def push(
    client: httpx.Client,
    sim: SimulatorProcess,
    token: str = GOOD,
    *,
    jwt: str | None = None,
    body: bytes = PAYLOAD,
    **headers: str,
) -> httpx.Response:
    h = {
        "authorization": f"bearer {jwt or apns_jwt(sim.credentials)}",
        "apns-topic": sim.credentials.apns_topic,
        "apns-push-type": "alert",
    }
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    h = {k: v for k, v in h.items() if v != ""}
    return client.post(f"/3/device/{token}", headers=h, content=body)


def test_success_echoes_apns_id_and_counts_once(client, sim):
    apns_id = "123e4567-e89b-12d3-a456-426614174000"
    resp = push(client, sim, apns_id=apns_id)
    assert resp.http_version == "HTTP/2"
    assert resp.status_code == 200
    assert resp.headers["apns-id"] == apns_id
    assert resp.headers["apns-unique-id"]
    assert resp.content == b""
    assert sim.counts([GOOD, "cd" * 32]) == {GOOD: 1, "cd" * 32: 0}
    last = sim.last([GOOD])[GOOD]
    assert last["payload"] == {"aps": {"alert": "hello"}}
    assert last["headers"]["apns-topic"] == sim.credentials.apns_topic
    assert sim.stats()["by_outcome"] == {"apns 200": 1}


def test_generated_apns_id_when_absent(client, sim):
    ids = {push(client, sim).headers["apns-id"] for _ in range(3)}
    assert len(ids) == 3


def test_duplicates_are_counted(client, sim):
    for _ in range(3):
        assert push(client, sim).status_code == 200
    assert push(client, sim, "cd" * 32).status_code == 200
    stats = sim.stats()
    assert stats["delivered_total"] == 4
    assert stats["delivered_unique"] == 2
    assert stats["duplicates"] == 2
    assert sim.duplicates() == {GOOD: 3}
    sim.reset()
    assert sim.counts([GOOD]) == {GOOD: 0}
    assert sim.stats()["duplicates"] == 0


@pytest.mark.parametrize(
    ("jwt_kind", "reason"),
    [
        ("missing", "MissingProviderToken"),
        ("bad_signature", "InvalidProviderToken"),
        ("unknown_kid", "InvalidProviderToken"),
        ("wrong_team", "InvalidProviderToken"),
        ("expired", "ExpiredProviderToken"),
        ("garbage", "InvalidProviderToken"),
    ],
)
def test_provider_token_checks(client, sim, jwt_kind, reason):
    creds = sim.credentials
    other_key = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    headers = {"apns-topic": creds.apns_topic}
    if jwt_kind != "missing":
        token = {
            "bad_signature": lambda: apns_jwt(creds, key_p8=other_key),
            "unknown_kid": lambda: apns_jwt(creds, kid="ZZZZZZZZZZ"),
            "wrong_team": lambda: __import__("jwt").encode(
                {"iss": "NOTMYTEAM0", "iat": int(time.time())},
                creds.apns_key_p8,
                algorithm="ES256",
                headers={"kid": creds.apns_key_id},
            ),
            "expired": lambda: apns_jwt(creds, iat=int(time.time()) - 3601),
            "garbage": lambda: "not.a.jwt",
        }[jwt_kind]()
        headers["authorization"] = f"bearer {token}"
    resp = client.post(f"/3/device/{GOOD}", headers=headers, content=PAYLOAD)
    assert resp.status_code == 403
    assert resp.json() == {"reason": reason}
    assert sim.counts([GOOD]) == {GOOD: 0}


def test_revoked_key(client, sim):
    sim.configure(revoked_apns_keys=[sim.credentials.apns_key_id])
    resp = push(client, sim)
    assert (resp.status_code, resp.json()["reason"]) == (403, "InvalidProviderToken")
    sim.configure(revoked_apns_keys=[])
    assert push(client, sim).status_code == 200


def test_too_many_provider_token_updates(client, sim):
    sim.configure(apns_min_token_refresh_s=1200)
    now = int(time.time())
    current = apns_jwt(sim.credentials, iat=now - 10)
    assert push(client, sim, jwt=current).status_code == 200
    resp = push(client, sim, jwt=apns_jwt(sim.credentials, iat=now - 5))
    assert (resp.status_code, resp.json()["reason"]) == (429, "TooManyProviderTokenUpdates")
    # The token already in use keeps working.
    assert push(client, sim, jwt=current).status_code == 200


@pytest.mark.parametrize(
    ("token", "headers", "body", "status", "reason"),
    [
        ("zz" * 32, {}, PAYLOAD, 400, "BadDeviceToken"),
        (GOOD, {"apns_topic": ""}, PAYLOAD, 400, "MissingTopic"),
        (GOOD, {"apns_topic": "com.other.app"}, PAYLOAD, 400, "TopicDisallowed"),
        (GOOD, {"apns_push_type": "shout"}, PAYLOAD, 400, "InvalidPushType"),
        (GOOD, {"apns_push_type": "background", "apns_priority": "10"}, PAYLOAD, 400, "BadPriority"),
        (GOOD, {"apns_priority": "7"}, PAYLOAD, 400, "BadPriority"),
        (GOOD, {"apns_expiration": "in an hour"}, PAYLOAD, 400, "BadExpirationDate"),
        (GOOD, {"apns_collapse_id": "c" * 65}, PAYLOAD, 400, "BadCollapseId"),
        (GOOD, {"apns_id": "not-a-uuid"}, PAYLOAD, 400, "BadMessageId"),
        (GOOD, {}, b"", 400, "PayloadEmpty"),
        (GOOD, {}, b"[1, 2]", 400, "PayloadEmpty"),
        (GOOD, {}, b'{"aps":{"alert":"' + b"x" * 4100 + b'"}}', 413, "PayloadTooLarge"),
    ],
)
def test_request_validation(client, sim, token, headers, body, status, reason):
    resp = push(client, sim, token, body=body, **headers)
    assert resp.status_code == status
    assert resp.json() == {"reason": reason}
    assert sim.stats()["delivered_total"] == 0


def test_valid_variants_accepted(client, sim):
    topic = sim.credentials.apns_topic
    assert push(client, sim, apns_push_type="background", apns_priority="5").status_code == 200
    assert push(client, sim, apns_topic=topic + ".voip", apns_push_type="voip").status_code == 200
    voip_body = b'{"aps":{},"x":"' + b"v" * 4500 + b'"}'
    assert (
        push(client, sim, apns_push_type="voip", apns_topic=topic + ".voip", body=voip_body).status_code
        == 200
    )
    assert push(client, sim, apns_expiration="0", apns_collapse_id="c" * 64).status_code == 200


def test_get_is_405(client, sim):
    resp = client.get(f"/3/device/{GOOD}", headers={"authorization": f"bearer {apns_jwt(sim.credentials)}"})
    assert (resp.status_code, resp.json()) == (405, {"reason": "MethodNotAllowed"})


def test_fault_01_unregistered_with_timestamp(client, sim):
    sim.configure(unregistered_timestamp_ms=1_700_000_000_123)
    for _ in range(2):  # forever
        resp = push(client, sim, fault("01"))
        assert resp.status_code == 410
        assert resp.json() == {"reason": "Unregistered", "timestamp": 1_700_000_000_123}
    assert sim.counts([fault("01")]) == {fault("01"): 0}


def test_fault_01_default_timestamp_is_simulator_start(client, sim):
    body = push(client, sim, fault("01")).json()
    assert 0 < body["timestamp"] <= time.time() * 1000


@pytest.mark.parametrize(
    ("code", "answers"),
    [
        ("02", [(400, "BadDeviceToken")] * 3),
        ("03", [(429, "TooManyRequests"), (200, None), (200, None)]),
        ("04", [(429, "TooManyRequests"), (429, "TooManyRequests"), (200, None)]),
        ("05", [(503, "ServiceUnavailable")] * 3),
        ("06", [(500, "InternalServerError"), (200, None), (200, None)]),
        ("08", [(400, "DeviceTokenNotForTopic")] * 3),
    ],
)
def test_faults_by_attempt(client, sim, code, answers):
    token = fault(code)
    got = []
    for _ in answers:
        resp = push(client, sim, token)
        got.append((resp.status_code, resp.json()["reason"] if resp.content else None))
        if resp.status_code in (429, 503):
            assert resp.headers["retry-after"] == "1"
    assert got == answers
    assert sim.counts([token]) == {token: sum(1 for s, _ in answers if s == 200)}
    sim.reset()  # attempts restart after a reset
    assert push(client, sim, token).status_code == answers[0][0]


def test_fault_tokens_are_independent(client, sim):
    assert push(client, sim, fault("03", 1)).status_code == 429
    assert push(client, sim, fault("03", 2)).status_code == 429
    assert push(client, sim, fault("03", 1)).status_code == 200


def test_retry_after_knob(client, sim):
    sim.configure(retry_after_s=7)
    assert push(client, sim, fault("03")).headers["retry-after"] == "7"


def test_apns_topics_knob(client, sim):
    sim.configure(apns_topics=["com.other.app"])
    assert push(client, sim, apns_topic="com.other.app").status_code == 200
    assert push(client, sim).json()["reason"] == "TopicDisallowed"
