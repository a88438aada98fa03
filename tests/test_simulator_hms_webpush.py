"""The simulator's HMS Push Kit and Web Push endpoints over HTTP/2 + TLS, on both fronts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from simulator import webpush_keys
from simulator.testing import SimulatorProcess, vapid_authorization, webpush_encrypt


@pytest.fixture(params=["fast", "strict"])
def sim(request: pytest.FixtureRequest) -> SimulatorProcess:
    return request.getfixturevalue(f"simulator_{request.param}")


@pytest.fixture
def client(sim: SimulatorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(http2=True, verify=sim.ssl_context(), base_url=sim.base_url, timeout=10) as c:
        yield c


# ---- HMS -------------------------------------------------------------------------------------------
def hms_token(client: httpx.Client, sim: SimulatorProcess) -> str:
    creds = sim.credentials
    resp = client.post(
        "/oauth2/v3/token",
        data={
            "grant_type": "client_credentials",
            "client_id": creds.hms_app_id,
            "client_secret": creds.hms_client_secret,
        },
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["expires_in"] == 3600
    return resp.json()["access_token"]


def hms_send(
    client: httpx.Client,
    sim: SimulatorProcess,
    tokens: list[str],
    bearer: str | None = None,
    app_id: str | None = None,
    message: dict | None = None,
) -> httpx.Response:
    msg = message if message is not None else {"token": tokens, "data": '{"k":"v"}', "android": {}}
    return client.post(
        f"/v1/{app_id or sim.credentials.hms_app_id}/messages:send",
        headers={"authorization": f"Bearer {bearer or hms_token(client, sim)}"},
        json={"validate_only": False, "message": msg},
    )


def test_hms_oauth_rejects_wrong_secret(client, sim):
    resp = client.post(
        "/oauth2/v3/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sim.credentials.hms_app_id,
            "client_secret": "nope",
        },
    )
    assert resp.status_code == 400
    assert resp.json()["error"] == 1101
    assert "access_token" not in resp.text


def test_hms_success_multicast(client, sim):
    resp = hms_send(client, sim, ["h1", "h2", "h3"])
    assert resp.status_code == 200
    assert resp.json()["code"] == "80000000"
    assert resp.json()["requestId"]
    assert sim.counts(["h1", "h2", "h3"]) == {"h1": 1, "h2": 1, "h3": 1}


def test_hms_partial_success_lists_illegal_tokens(client, sim):
    tokens = ["ok-1", "fa017501a", "fa017502b", "fa017508c", "ok-2"]
    resp = hms_send(client, sim, tokens)
    body = resp.json()
    assert (resp.status_code, body["code"]) == (200, "80100000")
    detail = json.loads(body["msg"])
    assert detail == {"success": 2, "failure": 3, "illegal_tokens": ["fa017501a", "fa017502b", "fa017508c"]}
    assert sim.counts(tokens) == {"ok-1": 1, "fa017501a": 0, "fa017502b": 0, "fa017508c": 0, "ok-2": 1}


def test_hms_all_invalid(client, sim):
    resp = hms_send(client, sim, ["fa017502a", "fa017501b"])
    assert (resp.status_code, resp.json()["code"]) == (400, "80300007")


def test_hms_auth_errors(client, sim):
    assert hms_send(client, sim, ["h"], bearer="made-up").json()["code"] == "80200001"
    resp = hms_send(client, sim, ["h"], app_id="999")
    assert (resp.status_code, resp.json()["code"]) == (403, "80300002")


@pytest.mark.parametrize(
    ("message", "status", "code"),
    [
        ({"token": []}, 400, "80300010"),
        ({"token": [f"t{i}" for i in range(1001)]}, 413, "80300008"),  # over 4 KB before the count check
        ({"token": "not-a-list"}, 400, "80100003"),
        ({"token": ["t"], "data": {"not": "a string"}}, 400, "80100003"),
        ({"token": ["t"], "data": "x" * 4100}, 413, "80300008"),
    ],
)
def test_hms_request_errors(client, sim, message, status, code):
    resp = hms_send(client, sim, [], message=message)
    assert (resp.status_code, resp.json()["code"]) == (status, code)


def test_hms_token_count_limit(client, sim):
    # 1,001 short tokens fit in 4 KB only if they are tiny: use 1-char tokens.
    tokens = [chr(0x41 + i % 26) for i in range(1001)]
    resp = hms_send(client, sim, [], message={"token": tokens})
    assert (resp.status_code, resp.json()["code"]) == (400, "80300010")


@pytest.mark.parametrize(
    ("code", "answers"),
    [("03", [503, 200]), ("04", [503, 503, 200]), ("05", [503, 503]), ("06", [500, 200])],
)
def test_hms_transient_faults_fail_the_whole_request(client, sim, code, answers):
    bearer = hms_token(client, sim)
    tokens = [f"fa0175{code}-h", "plain"]
    got = [hms_send(client, sim, tokens, bearer=bearer).status_code for _ in answers]
    assert got == answers
    assert sim.counts(["plain"]) == {"plain": answers.count(200)}


# ---- Web Push ---------------------------------------------------------------------------------------
def wp_post(
    client: httpx.Client,
    sim: SimulatorProcess,
    sub_id: str,
    plaintext: bytes = b'{"title":"hi"}',
    **overrides: str,
) -> httpx.Response:
    endpoint, p256dh, auth = webpush_keys.subscription(sim.base_url, sub_id)
    headers = {
        "authorization": vapid_authorization(sim.credentials, sim.base_url),
        "ttl": "60",
        "content-encoding": "aes128gcm",
        "urgency": "normal",
    }
    headers.update({k.replace("_", "-"): v for k, v in overrides.items()})
    headers = {k: v for k, v in headers.items() if v != ""}
    return client.post(endpoint, headers=headers, content=webpush_encrypt(p256dh, auth, plaintext))


def test_subscription_is_deterministic(sim):
    assert webpush_keys.subscription(sim.base_url, "s1") == webpush_keys.subscription(sim.base_url, "s1")
    assert (
        webpush_keys.subscription(sim.base_url, "s1")[1] != webpush_keys.subscription(sim.base_url, "s2")[1]
    )
    assert len(webpush_keys.b64decode(webpush_keys.subscription(sim.base_url, "s1")[2])) == 16


def test_webpush_decrypts_and_counts(client, sim):
    resp = wp_post(client, sim, "sub-1", b'{"title":"hello \xc3\xa9"}', topic="news")
    assert resp.status_code == 201
    assert resp.headers["location"].startswith(sim.base_url + "/wp-msg/")
    assert sim.counts(["sub-1"]) == {"sub-1": 1}
    last = sim.last(["sub-1"])["sub-1"]
    assert last["payload"] == '{"title":"hello \u00e9"}'
    assert last["headers"] == {"ttl": "60", "urgency": "normal", "topic": "news"}


def test_webpush_rejects_records_for_another_subscription(client, sim):
    _, p256dh, auth = webpush_keys.subscription(sim.base_url, "other")
    endpoint = webpush_keys.subscription(sim.base_url, "sub-1")[0]
    resp = client.post(
        endpoint,
        headers={
            "authorization": vapid_authorization(sim.credentials, sim.base_url),
            "ttl": "60",
            "content-encoding": "aes128gcm",
        },
        content=webpush_encrypt(p256dh, auth, b"x"),
    )
    assert resp.status_code == 400
    assert sim.counts(["sub-1"]) == {"sub-1": 0}


@pytest.mark.parametrize(
    ("overrides", "status"),
    [
        ({"authorization": ""}, 401),
        ({"authorization": "WebPush abc"}, 401),
        ({"ttl": ""}, 400),
        ({"content_encoding": "aesgcm"}, 400),
        ({"urgency": "asap"}, 400),
        ({"topic": "t" * 33}, 400),
    ],
)
def test_webpush_request_checks(client, sim, overrides, status):
    assert wp_post(client, sim, "sub-x", **overrides).status_code == status


@pytest.mark.parametrize("case", ["wrong_aud", "expired", "too_far", "bad_sub"])
def test_vapid_claims(client, sim, case):
    creds = sim.credentials
    now = int(time.time())
    auth = {
        "wrong_aud": lambda: vapid_authorization(creds, "https://push.example.net"),
        "expired": lambda: vapid_authorization(creds, sim.base_url, exp=now - 10),
        "too_far": lambda: vapid_authorization(creds, sim.base_url, exp=now + 2 * 86400),
        "bad_sub": lambda: vapid_authorization(creds, sim.base_url, sub="ops@example.com"),
    }[case]()
    resp = wp_post(client, sim, "sub-v", authorization=auth)
    assert resp.status_code == 401


def test_webpush_too_large(client, sim):
    assert wp_post(client, sim, "sub-big", b"x" * 4100).status_code == 413


@pytest.mark.parametrize(
    ("code", "answers"),
    [
        ("01", [410, 410]),
        ("02", [404, 404]),
        ("03", [429, 201]),
        ("04", [429, 429, 201]),
        ("05", [503, 503]),
        ("06", [500, 201]),
        ("08", [410]),
    ],
)
def test_webpush_faults(client, sim, code, answers):
    sub = f"fa0175{code}-wp"
    got = []
    for _ in answers:
        resp = wp_post(client, sim, sub)
        got.append(resp.status_code)
        if resp.status_code == 429:
            assert resp.headers["retry-after"] == "1"
    assert got == answers


def test_hms_expired_token_is_80200003(client, sim):
    bearer = hms_token(client, sim)
    assert hms_send(client, sim, ["h"], bearer=bearer).json()["code"] == "80000000"
    sim.configure(oauth_token_lifetime_s=0.001)
    resp = hms_send(client, sim, ["h"], bearer=bearer)
    assert (resp.status_code, resp.json()["code"]) == (401, "80200003")
    assert sim.counts(["h"]) == {"h": 1}
