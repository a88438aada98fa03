"""The four adapters against the provider simulator, over real sockets (TLS + HTTP/2), real Redis.

Each test builds the adapter with `from_app` exactly as a worker does; only settings point at the
simulator. Fault tokens follow the simulator contract (docs/simulator.md): `fa0175` + a two-digit code.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

import jwt
import orjson
import pytest
import redis

from delivery.credentials import ApnsTokens, FcmTokens, ServiceAccount, shared_cache
from delivery.payload import MESSAGE_ID_KEY, TRUNCATED_KEY, PushMessage
from delivery.providers.base import Outcome, Provider, Result, Target
from delivery.providers.registry import provider_class
from simulator.testing import SimulatorProcess
from simulator.webpush_keys import subscription
from tokens.models import App


@pytest.fixture
def sim(simulator_fast: SimulatorProcess, settings, redis_client: redis.Redis) -> SimulatorProcess:
    base = simulator_fast.base_url
    settings.APNS_ENDPOINT_PRODUCTION = base
    settings.APNS_ENDPOINT_SANDBOX = base
    settings.FCM_ENDPOINT = base
    settings.HMS_ENDPOINT = base
    settings.HMS_TOKEN_URL = base + "/oauth2/v3/token"
    settings.PUSH_CA_BUNDLE = simulator_fast.ca_file
    settings.WEBPUSH_ALLOW_INSECURE = True  # the simulator is an IP address
    shared_cache().forget_local()  # Redis was flushed; the process copy must not outlive it
    return simulator_fast


@pytest.fixture
def app(sim: SimulatorProcess) -> App:
    return make_app(sim)


def make_app(sim: SimulatorProcess) -> App:
    """An App holding the credentials of `sim` (its service account's token_uri points at it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    c = sim.credentials
    vapid = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return App(
        slug="sim",
        apns_topic=c.apns_topic,
        apns_environment="production",
        apns_key_p8=c.apns_key_p8,
        apns_key_id=c.apns_key_id,
        apns_team_id=c.apns_team_id,
        fcm_service_account=c.fcm_service_account,
        hms_app_id=c.hms_app_id,
        hms_client_secret=c.hms_client_secret,
        vapid_private_key=vapid.decode(),
        vapid_subject="mailto:ops@example.com",
    )


def token_for(platform: str, sim: SimulatorProcess, code: str = "") -> Target:
    """A fresh target on `platform`; `code` selects a simulator fault."""
    prefix = f"fa0175{code}" if code else ""
    if platform == "ios":
        return Target(1, (prefix + uuid.uuid4().hex * 2)[:64])
    if platform == "web":
        endpoint, p256dh, auth = subscription(sim.base_url, prefix + uuid.uuid4().hex)
        return Target(1, endpoint, p256dh=p256dh, auth=auth)
    return Target(1, prefix + "-" + uuid.uuid4().hex if prefix else "tok-" + uuid.uuid4().hex)


def sim_key(target: Target) -> str:
    """The name the simulator counts a target under (Web Push: the subscription id)."""
    return target.token.rsplit("/wp/", 1)[-1]


def send(
    app: App, platform: str, targets: list[Target], message: PushMessage, rounds: int = 1
) -> list[list[Result]]:
    """`rounds` successive send_many calls on one adapter (retries are the caller's: this is the caller)."""

    async def go() -> list[list[Result]]:
        provider: Provider = provider_class(platform).from_app(app)
        try:
            return [await provider.send_many(targets, message) for _ in range(rounds)]
        finally:
            await provider.aclose()

    return asyncio.run(go())


MESSAGE = PushMessage(title="Hello", body="From the simulator", data={"k": "v"}, ttl=3600, collapse_key="c1")
PLATFORMS = ("ios", "android", "huawei", "web")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_success_delivers_once(platform: str, app: App, sim: SimulatorProcess) -> None:
    targets = [token_for(platform, sim) for _ in range(3)]
    [results] = send(app, platform, targets, MESSAGE)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 3
    assert [r.target for r in results] == targets
    assert all(r.provider_message_id for r in results)
    assert sim.counts([sim_key(t) for t in targets]) == {sim_key(t): 1 for t in targets}


# code -> per platform: the outcomes of successive attempts (the caller re-sends after each RETRY)
FAULTS = {
    "01": {"ios": "T", "android": "T", "huawei": "T", "web": "T"},
    "02": {"ios": "T", "android": "T", "huawei": "T", "web": "T"},
    "03": {"ios": "RD", "android": "RD", "huawei": "RD", "web": "RD"},
    "04": {"ios": "RRD", "android": "RRD", "huawei": "RRD", "web": "RRD"},
    "05": {"ios": "RR", "android": "RR", "huawei": "RR", "web": "RR"},
    "06": {"ios": "RD", "android": "RD", "huawei": "RD", "web": "RD"},
    "07": {"ios": "D", "android": "D", "huawei": "D", "web": "D"},
    "08": {"ios": "T", "android": "T", "huawei": "T", "web": "T"},
    "09": {"ios": "RD", "android": "RD", "huawei": "RD", "web": "RD"},  # fast front: 500 once
}
LETTER = {"D": Outcome.DELIVERED, "R": Outcome.RETRY, "T": Outcome.INVALID_TOKEN}
REASONS = {
    ("ios", "01"): "Unregistered",
    ("ios", "02"): "BadDeviceToken",
    ("ios", "08"): "DeviceTokenNotForTopic",
    ("android", "01"): "UNREGISTERED",
    ("android", "02"): "not a valid FCM registration token",
    ("android", "08"): "SENDER_ID_MISMATCH",
    ("huawei", "02"): "80300007",
}


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("code", sorted(FAULTS))
def test_every_fault_of_the_contract(platform: str, code: str, app: App, sim: SimulatorProcess) -> None:
    sim.configure(slow_ms=150, retry_after_s=7)
    expected = [LETTER[c] for c in FAULTS[code][platform]]
    target = token_for(platform, sim, code)
    rounds = send(app, platform, [target], MESSAGE, rounds=len(expected))
    results = [r for [r] in rounds]
    assert [r.outcome for r in results] == expected
    for r in results:
        if r.outcome is Outcome.RETRY:
            # 429 and 503 carry the simulator's Retry-After; 500 falls back on our 10 s guidance
            assert r.retry_after in (7.0, 10.0)
            assert not r.maybe_duplicate  # an answer came back: nothing ambiguous
        else:
            assert r.retry_after is None
    if (platform, code) in REASONS:
        assert REASONS[platform, code] in results[0].reason
    delivered = sim.counts([sim_key(target)])[sim_key(target)]
    assert delivered == (1 if expected[-1] is Outcome.DELIVERED else 0)


def test_throttling_waits_60_s_without_retry_after(app: App, sim: SimulatorProcess) -> None:
    # The simulator always sends Retry-After on 429; the rate-limit knob's answer is a 429 too, so
    # check the guidance on a 500 (no header) and the header on a 429, both from real answers.
    [[five_hundred]] = send(app, "ios", [token_for("ios", sim, "06")], MESSAGE)
    assert (five_hundred.status, five_hundred.retry_after) == (500, 10.0)
    sim.configure(retry_after_s=120)
    [[throttled]] = send(app, "android", [token_for("android", sim, "03")], MESSAGE)
    assert (throttled.status, throttled.retry_after) == (429, 120.0)


def test_apns_410_timestamp_reaches_the_result(app: App, sim: SimulatorProcess) -> None:
    stamp_ms = 1_800_000_123_456
    sim.configure(unregistered_timestamp_ms=stamp_ms)
    [[result]] = send(app, "ios", [token_for("ios", sim, "01")], MESSAGE)
    assert result.outcome is Outcome.INVALID_TOKEN and result.status == 410
    assert result.invalid_since == datetime.fromtimestamp(stamp_ms / 1000, tz=UTC)


def _plant_apns_token(app: App, *, iat_age: float, minted_ago: float) -> None:
    """Put into Redis the provider token another worker would have minted `minted_ago` seconds ago,
    with an `iat` that Apple now considers `iat_age` seconds old."""
    tokens = ApnsTokens(shared_cache(), app.apns_team_id, app.apns_key_id, app.apns_key_p8)
    now = time.time()
    value = jwt.encode(
        {"iss": app.apns_team_id, "iat": int(now - iat_age)},
        app.apns_key_p8,
        algorithm="ES256",
        headers={"kid": app.apns_key_id},
    )
    record = {"value": value, "issued_at": now - minted_ago, "refresh_at": now + 600, "expires_at": now + 900}
    redis.Redis.from_url(redis_url_of()).set(tokens.key, json.dumps(record))


def redis_url_of() -> str:
    from django.conf import settings

    return settings.REDIS_URL


def test_apns_expired_provider_token_is_refreshed_once(app: App, sim: SimulatorProcess) -> None:
    _plant_apns_token(app, iat_age=2 * 3600, minted_ago=25 * 60)
    targets = [token_for("ios", sim) for _ in range(5)]
    [results] = send(app, "ios", targets, MESSAGE)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 5
    by = sim.stats()["by_outcome"]
    # The chunk went out with the stale token, then once more after one refresh.
    assert by["apns 403 ExpiredProviderToken"] == 5
    assert by["apns 200"] == 5
    assert sim.counts([t.token for t in targets]) == {t.token: 1 for t in targets}


def test_apns_expired_token_is_not_reminted_within_20_minutes(app: App, sim: SimulatorProcess) -> None:
    _plant_apns_token(app, iat_age=2 * 3600, minted_ago=5 * 60)
    [[result]] = send(app, "ios", [token_for("ios", sim)], MESSAGE)
    assert result.outcome is Outcome.AUTH_FAILURE
    assert result.reason == "ExpiredProviderToken"
    assert sim.stats()["by_outcome"] == {"apns 403 ExpiredProviderToken": 1}


def test_apns_revoked_key_is_an_auth_failure_and_keeps_tokens(app: App, sim: SimulatorProcess) -> None:
    sim.configure(revoked_apns_keys=[app.apns_key_id])
    [results] = send(app, "ios", [token_for("ios", sim), token_for("ios", sim, "01")], MESSAGE)
    assert {r.outcome for r in results} == {Outcome.AUTH_FAILURE}
    assert {r.reason for r in results} == {"InvalidProviderToken"}


def test_apns_disallowed_topic_pauses_like_a_credential(app: App, sim: SimulatorProcess) -> None:
    sim.configure(apns_topics=["com.example.other"])
    [[result]] = send(app, "ios", [token_for("ios", sim)], MESSAGE)
    assert (result.outcome, result.reason) == (Outcome.AUTH_FAILURE, "TopicDisallowed")


def test_apns_headers_and_payload(app: App, sim: SimulatorProcess) -> None:
    target = token_for("ios", sim)
    before = int(time.time())
    [[result]] = send(app, "ios", [target], MESSAGE)
    assert result.outcome is Outcome.DELIVERED
    seen = sim.last([target.token])[target.token]
    headers, payload = seen["headers"], seen["payload"]
    if isinstance(payload, (str, bytes)):
        payload = orjson.loads(payload)
    assert headers["apns-topic"] == app.apns_topic
    assert headers["apns-push-type"] == "alert" and headers.get("apns-priority") in (None, "", "10", 10)
    assert headers["apns-collapse-id"] == "c1"
    assert before + 3600 <= int(headers["apns-expiration"]) <= int(time.time()) + 3600  # absolute time
    assert payload["aps"]["alert"] == {"title": "Hello", "body": "From the simulator"}
    assert payload["k"] == "v" and payload[MESSAGE_ID_KEY] == MESSAGE.message_id


def test_apns_silent_push_is_background_priority_5(app: App, sim: SimulatorProcess) -> None:
    target = token_for("ios", sim)
    silent = PushMessage(silent=True, data={"sync": "1"}, ttl=0)
    [[result]] = send(app, "ios", [target], silent)
    assert result.outcome is Outcome.DELIVERED
    headers = sim.last([target.token])[target.token]["headers"]
    assert headers["apns-push-type"] == "background" and str(headers["apns-priority"]) == "5"
    assert str(headers["apns-expiration"]) == "0"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_oversize_body_is_truncated_and_delivered(platform: str, app: App, sim: SimulatorProcess) -> None:
    big = PushMessage(title="Long read", body="é" * 6000, data={"article": "42"})
    target = token_for(platform, sim)
    [[result]] = send(app, platform, [target], big)
    assert result.outcome is Outcome.DELIVERED
    seen = sim.last([sim_key(target)])[sim_key(target)]
    text = json.dumps(seen, ensure_ascii=False)
    assert "…" in text and TRUNCATED_KEY in text and big.message_id in text


def test_apns_missing_credentials_fail_without_a_request(sim: SimulatorProcess) -> None:
    [[result]] = send(App(slug="bare", apns_topic="x"), "ios", [Target(1, "ab" * 32)], MESSAGE)
    assert result.outcome is Outcome.AUTH_FAILURE
    assert "lacks apns_key_p8" in result.reason
    assert sim.stats()["requests"] == 0


def test_fcm_message_shape(app: App, sim: SimulatorProcess) -> None:
    target = token_for("android", sim)
    [[result]] = send(app, "android", [target], MESSAGE)
    assert result.outcome is Outcome.DELIVERED
    assert result.provider_message_id.startswith("projects/")
    message = sim.last([target.token])[target.token]["message"]
    assert message["token"] == target.token
    assert message["notification"] == {"title": "Hello", "body": "From the simulator"}
    assert message["data"] == {"k": "v", MESSAGE_ID_KEY: MESSAGE.message_id}
    assert message["android"]["ttl"] == "3600s" and message["android"]["collapse_key"] == "c1"
    assert message["apns"]["headers"]["apns-collapse-id"] == "c1"


def test_fcm_stale_access_token_is_refreshed_once(app: App, sim: SimulatorProcess) -> None:
    account = ServiceAccount.parse(app.fcm_service_account)
    key = FcmTokens(shared_cache(), account).key
    now = time.time()
    record = {
        "value": "ya29.stale",
        "issued_at": now - 1800,
        "refresh_at": now + 600,
        "expires_at": now + 900,
    }
    redis.Redis.from_url(redis_url_of()).set(key, json.dumps(record))
    targets = [token_for("android", sim) for _ in range(4)]
    [results] = send(app, "android", targets, MESSAGE)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 4
    by = sim.stats()["by_outcome"]
    assert by["fcm-oauth 200"] == 1  # one refresh for the whole burst
    assert by["fcm 200"] == 4


def test_fcm_revoked_credentials_are_an_auth_failure(app: App, sim: SimulatorProcess) -> None:
    sim.configure(fcm_revoked=True)
    [results] = send(app, "android", [token_for("android", sim), token_for("android", sim, "01")], MESSAGE)
    assert {r.outcome for r in results} == {Outcome.AUTH_FAILURE}
    assert sim.counts([r.target.token for r in results]) == {r.target.token: 0 for r in results}


def test_fcm_bad_service_account_fails_without_a_request(app: App, sim: SimulatorProcess) -> None:
    app.fcm_service_account = '{"project_id": "p"}'
    [[result]] = send(app, "android", [token_for("android", sim)], MESSAGE)
    assert result.outcome is Outcome.AUTH_FAILURE and "lacks client_email" in result.reason
    assert sim.stats()["requests"] == 0


def test_hms_partial_success_prunes_only_listed_tokens(app: App, sim: SimulatorProcess) -> None:
    good = [token_for("huawei", sim) for _ in range(3)]
    bad = [token_for("huawei", sim, "01"), token_for("huawei", sim, "02")]
    targets = [good[0], bad[0], good[1], bad[1], good[2]]
    [results] = send(app, "huawei", targets, MESSAGE)
    assert [r.outcome for r in results] == [
        Outcome.DELIVERED,
        Outcome.INVALID_TOKEN,
        Outcome.DELIVERED,
        Outcome.INVALID_TOKEN,
        Outcome.DELIVERED,
    ]
    assert sim.stats()["by_outcome"]["hms 200 80100000"] == 1  # one multicast request
    assert sim.counts([t.token for t in targets]) == {t.token: int(t in good) for t in targets}


def test_hms_packs_tokens_into_requests_within_the_size_limit(app: App, sim: SimulatorProcess) -> None:
    targets = [token_for("huawei", sim) for _ in range(250)]  # ~40 bytes each: more than one request
    [results] = send(app, "huawei", targets, MESSAGE)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 250
    by = sim.stats()["by_outcome"]
    assert by["hms 200 80000000"] >= 3 and "hms 413 80300008" not in by
    assert set(sim.counts([t.token for t in targets]).values()) == {1}


def test_hms_all_invalid_is_80300007(app: App, sim: SimulatorProcess) -> None:
    [results] = send(app, "huawei", [token_for("huawei", sim, "02"), token_for("huawei", sim, "08")], MESSAGE)
    assert {(r.outcome, r.reason.split(":")[0]) for r in results} == {(Outcome.INVALID_TOKEN, "80300007")}


def test_hms_wrong_secret_is_an_auth_failure(app: App, sim: SimulatorProcess) -> None:
    app.hms_client_secret = "wrong"
    [[result]] = send(app, "huawei", [token_for("huawei", sim)], MESSAGE)
    assert result.outcome is Outcome.AUTH_FAILURE and "refused the credentials" in result.reason
    assert "wrong" not in result.reason


def test_hms_message_shape(app: App, sim: SimulatorProcess) -> None:
    target = token_for("huawei", sim)
    send(app, "huawei", [target], PushMessage(title="T", body="B", url="https://e.com/x", priority="normal"))
    message = sim.last([target.token])[target.token]["message"]
    notification = message["android"]["notification"]
    assert (notification["title"], notification["body"]) == ("T", "B")
    assert notification["click_action"] == {"type": 2, "url": "https://e.com/x"}
    assert message["android"]["urgency"] == "NORMAL"
    assert json.loads(message["data"])["url"] == "https://e.com/x"


def test_webpush_is_decrypted_by_the_simulator(app: App, sim: SimulatorProcess) -> None:
    target = token_for("web", sim)
    message = PushMessage(
        title="Web", body="Ünïcode ✓", collapse_key="news: today", ttl=120, priority="normal"
    )
    [[result]] = send(app, "web", [target], message)
    assert result.outcome is Outcome.DELIVERED and result.status == 201
    seen = sim.last([sim_key(target)])[sim_key(target)]
    payload = json.loads(seen["payload"])
    assert (payload["title"], payload["body"]) == ("Web", "Ünïcode ✓")
    assert payload["data"][MESSAGE_ID_KEY] == message.message_id
    assert seen["headers"]["ttl"] == "120" and seen["headers"]["urgency"] == "normal"
    assert len(seen["headers"]["topic"]) == 32


def test_webpush_endpoint_is_rechecked_at_send_time(app: App, sim: SimulatorProcess, settings) -> None:
    settings.WEBPUSH_ALLOW_INSECURE = False  # as in production: an IP-address endpoint is refused
    [[result]] = send(app, "web", [token_for("web", sim)], MESSAGE)
    assert result.outcome is Outcome.REJECTED and result.reason.startswith("endpoint refused")
    assert sim.stats()["requests"] == 0


def test_webpush_without_vapid_key_is_an_auth_failure(app: App, sim: SimulatorProcess) -> None:
    app.vapid_private_key = ""
    [[result]] = send(app, "web", [token_for("web", sim)], MESSAGE)
    assert result.outcome is Outcome.AUTH_FAILURE
    assert sim.stats()["requests"] == 0


@pytest.fixture
def strict(simulator_strict: SimulatorProcess, settings, redis_client: redis.Redis) -> SimulatorProcess:
    base = simulator_strict.base_url
    settings.APNS_ENDPOINT_PRODUCTION = base
    settings.FCM_ENDPOINT = base
    settings.PUSH_CA_BUNDLE = simulator_strict.ca_file
    shared_cache().forget_local()
    return simulator_strict


@pytest.mark.parametrize("platform", ["ios", "android"])
def test_dropped_connection_is_re_sent_by_the_engine_and_flagged_as_maybe_duplicate(
    platform: str, strict: SimulatorProcess
) -> None:
    # Fault 09 kills the connection under the request's first attempt. The curl engine re-submits
    # a request whose connection died before its answer began (delivery/engine/curl.py), so the
    # adapter gets the provider's answer, flagged: the first copy may have been processed.
    app = make_app(strict)
    target = token_for(platform, strict, "09")
    [[first]] = send(app, platform, [target], MESSAGE, rounds=1)
    assert first.outcome is Outcome.DELIVERED and first.status == 200
    assert first.maybe_duplicate
    assert strict.counts([target.token]) == {target.token: 1}


@pytest.mark.parametrize("platform", ["ios", "android"])
def test_goaway_and_cold_start_lose_nothing_and_flag_every_duplicate(
    platform: str, strict: SimulatorProcess
) -> None:
    # APNs allows one stream until the first authenticated success, then GOAWAY every 50 requests.
    # The adapter's contract is at-least-once: every target ends DELIVERED after the caller re-sends
    # what came back RETRY, and the simulator never sees more duplicates than results flagged
    # maybe_duplicate.
    app = make_app(strict)
    strict.configure(goaway_every=50, apns_initial_streams=1)
    targets = [token_for(platform, strict) for _ in range(400)]

    async def go() -> tuple[dict[str, Result], int]:
        provider = provider_class(platform).from_app(app)
        final: dict[str, Result] = {}
        flagged = 0
        pending = targets
        try:
            for _ in range(4):
                results = await provider.send_many(pending, MESSAGE)
                flagged += sum(r.maybe_duplicate for r in results)
                assert {r.outcome for r in results} <= {Outcome.DELIVERED, Outcome.RETRY}
                final.update((r.target.token, r) for r in results)
                pending = [r.target for r in results if r.outcome is Outcome.RETRY]
                if not pending:
                    break
        finally:
            await provider.aclose()
        return final, flagged

    final, flagged = asyncio.run(go())
    assert {r.outcome for r in final.values()} == {Outcome.DELIVERED}
    stats = strict.stats()
    assert stats["delivered_unique"] == 400
    assert stats["duplicates"] <= flagged
    assert stats["connections_opened"] >= 400 // 50


def test_apns_environment_selects_the_endpoint(app: App, sim: SimulatorProcess, settings) -> None:
    settings.APNS_ENDPOINT_PRODUCTION = "https://127.0.0.1:9"  # nothing listens there
    app.apns_environment = "sandbox"
    [[sandbox]] = send(app, "ios", [token_for("ios", sim)], MESSAGE)
    assert sandbox.outcome is Outcome.DELIVERED
    app.apns_environment = "production"
    [[production]] = send(app, "ios", [token_for("ios", sim)], MESSAGE)
    assert production.outcome is Outcome.RETRY and production.status is None
    assert not production.maybe_duplicate  # refused connection: the request never left


@pytest.mark.parametrize("platform", PLATFORMS)
def test_no_secret_reaches_logs_or_results(
    platform: str,
    app: App,
    sim: SimulatorProcess,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    [results] = send(app, platform, [token_for(platform, sim), token_for(platform, sim, "01")], MESSAGE)
    assert results[0].outcome is Outcome.DELIVERED
    keys = [k for k in redis_client.keys("pushsvc:cred:*") if not k.endswith(b":lock")]
    issued = [json.loads(redis_client.get(k))["value"] for k in keys]
    assert issued or platform == "web"  # VAPID JWTs stay in the process
    secrets = [
        app.apns_key_p8.splitlines()[1],
        json.loads(app.fcm_service_account)["private_key"].splitlines()[1],
        app.hms_client_secret,
        app.vapid_private_key.splitlines()[1],
        *issued,
    ]
    text = caplog.text + repr(results)
    for secret in secrets:
        assert secret not in text


def test_apns_never_splices_a_non_hex_token_into_the_path(app: App, sim: SimulatorProcess) -> None:
    [[result]] = send(app, "ios", [Target(1, "ab/../../3/device/cd")], MESSAGE)
    assert result.outcome is Outcome.REJECTED
    assert sim.stats()["requests"] == 0


def test_fcm_refused_service_account_fails_fast_without_hammering_the_token_endpoint(
    app: App, sim: SimulatorProcess
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    account = json.loads(app.fcm_service_account)
    account["private_key"] = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )  # a key Google (the simulator) never saw: the grant is refused
    app.fcm_service_account = json.dumps(account)
    targets = [token_for("android", sim) for _ in range(50)]
    first, second = send(app, "android", targets, MESSAGE, rounds=2)
    assert {r.outcome for r in first + second} == {Outcome.AUTH_FAILURE}
    assert all("refused the credentials" in r.reason for r in first + second)
    by = sim.stats()["by_outcome"]
    assert sum(v for k, v in by.items() if k.startswith("fcm-oauth 400")) == 1  # 100 sends, one attempt
    assert not any(k.startswith("fcm ") for k in by)


def test_apns_normal_priority_is_5(app: App, sim: SimulatorProcess) -> None:
    target = token_for("ios", sim)
    [[result]] = send(app, "ios", [target], PushMessage(title="t", priority="normal"))
    assert result.outcome is Outcome.DELIVERED
    assert str(sim.last([target.token])[target.token]["headers"]["apns-priority"]) == "5"


def test_webpush_refused_vapid_token_is_an_auth_failure(app: App, sim: SimulatorProcess) -> None:
    # A worker whose clock runs two days ahead signs VAPID tokens expiring beyond the 24 h RFC 8292
    # allows: the push service answers 401, which is the credentials, not the subscription.
    provider = provider_class("web").from_app(app)
    provider._clock = lambda: time.time() + 2 * 86400
    target = token_for("web", sim)

    async def go() -> Result:
        try:
            return await provider.send(target, MESSAGE)
        finally:
            await provider.aclose()

    result = asyncio.run(go())
    assert (result.outcome, result.status) == (Outcome.AUTH_FAILURE, 401)
    assert "VAPID" in result.reason
    assert sim.counts([sim_key(target)]) == {sim_key(target): 0}
