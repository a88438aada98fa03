"""Provider-token timing rules, on real Redis with a fake clock (no sleeping).

Two `SharedTokenCache` objects on one Redis database stand for two worker processes.
"""

from __future__ import annotations

import json
import logging
import threading

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from redis.backoff import NoBackoff
from redis.retry import Retry

from delivery.credentials import (
    APNS_MIN_INTERVAL,
    APNS_REFRESH_AFTER,
    ApnsTokens,
    CredentialError,
    IssuedToken,
    ServiceAccount,
    SharedTokenCache,
)

T0 = 1_900_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def p8() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _cache(client: redis.Redis, clock: FakeClock, **kw) -> SharedTokenCache:
    return SharedTokenCache(client, clock=clock, sleep=clock.sleep, **kw)


class CountingApns(ApnsTokens):
    """The real minting, counted."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.mints = 0

    def _mint(self, now: float) -> IssuedToken:
        self.mints += 1
        return super()._mint(now)


def test_apns_jwt_has_the_claims_apple_checks(redis_client: redis.Redis, clock: FakeClock, p8: str) -> None:
    tokens = ApnsTokens(_cache(redis_client, clock), "TEAM123456", "KEY1234567", p8)
    issued = tokens.get()
    public = serialization.load_pem_private_key(p8.encode(), None).public_key()
    claims = jwt.decode(issued.value, public, algorithms=["ES256"], options={"verify_iat": False})
    assert claims == {"iss": "TEAM123456", "iat": int(T0)}
    assert jwt.get_unverified_header(issued.value) == {"alg": "ES256", "kid": "KEY1234567", "typ": "JWT"}


def test_one_mint_is_shared_by_processes_until_50_minutes(
    redis_client: redis.Redis, clock: FakeClock, p8: str
) -> None:
    first = CountingApns(_cache(redis_client, clock), "TEAM123456", "KEY1234567", p8)
    second = CountingApns(_cache(redis_client, clock), "TEAM123456", "KEY1234567", p8)
    token = first.get()
    assert second.get() == token
    clock.now = T0 + APNS_REFRESH_AFTER - 1
    assert first.get() == token and second.get() == token
    assert first.mints + second.mints == 1

    clock.now = T0 + APNS_REFRESH_AFTER
    renewed = second.get()
    assert renewed.value != token.value and renewed.issued_at == int(clock.now)
    assert first.get() == renewed  # the other process picks it up from Redis
    assert first.mints + second.mints == 2


def test_forced_refresh_is_refused_within_20_minutes_of_the_last_mint(
    redis_client: redis.Redis, clock: FakeClock, p8: str
) -> None:
    tokens = CountingApns(_cache(redis_client, clock), "TEAM123456", "KEY1234567", p8)
    token = tokens.get()
    clock.now = T0 + APNS_MIN_INTERVAL - 1
    assert tokens.refresh(token) is None
    assert tokens.mints == 1
    clock.now = T0 + APNS_MIN_INTERVAL
    renewed = tokens.refresh(token)
    assert renewed is not None and renewed.value != token.value
    assert tokens.mints == 2
    assert tokens.get() == renewed


def test_forced_refresh_reuses_a_token_another_process_already_minted(
    redis_client: redis.Redis, clock: FakeClock, p8: str
) -> None:
    a = CountingApns(_cache(redis_client, clock), "TEAM123456", "KEY1234567", p8)
    b = CountingApns(_cache(redis_client, clock), "TEAM123456", "KEY1234567", p8)
    rejected = a.get()
    clock.now = T0 + 25 * 60
    newer = b.refresh(rejected)
    assert newer is not None
    # `a` sees its token rejected too, a moment later: it must adopt b's, not mint a third one.
    assert a.refresh(rejected) == newer
    assert a.mints + b.mints == 2


def test_a_replaced_key_never_reuses_tokens_of_the_old_one(
    redis_client: redis.Redis, clock: FakeClock, p8: str
) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    old = ApnsTokens(_cache(redis_client, clock), "TEAM123456", "KEY1234567", p8).get()
    new = ApnsTokens(_cache(redis_client, clock), "TEAM123456", "KEY1234567", other.decode()).get()
    assert old.value != new.value


def test_waiters_take_the_token_minted_by_the_lock_holder(
    redis_client: redis.Redis, clock: FakeClock, p8: str
) -> None:
    minter = CountingApns(_cache(redis_client, clock), "TEAM123456", "KEY1234567", p8)
    redis_client.set(minter.key + ":lock", "another-process", px=30_000)

    def other_process_finishes(seconds: float) -> None:
        clock.now += seconds
        record = {"value": "minted-elsewhere", "issued_at": clock.now}
        record.update(refresh_at=clock.now + 3000, expires_at=clock.now + 3600)
        redis_client.set(minter.key, json.dumps(record))

    waiter = CountingApns(
        SharedTokenCache(redis_client, clock=clock, sleep=other_process_finishes),
        "TEAM123456",
        "KEY1234567",
        p8,
    )
    assert waiter.get().value == "minted-elsewhere"
    assert waiter.mints == 0


def test_a_stuck_lock_holder_gives_a_transient_error_not_a_second_mint(
    redis_client: redis.Redis, clock: FakeClock, p8: str
) -> None:
    tokens = CountingApns(_cache(redis_client, clock, wait_seconds=5.0), "TEAM123456", "KEY1234567", p8)
    redis_client.set(tokens.key + ":lock", "another-process", px=600_000)
    with pytest.raises(CredentialError) as info:
        tokens.get()
    assert info.value.transient
    assert tokens.mints == 0


def test_concurrent_processes_mint_once(redis_client: redis.Redis, redis_url: str, p8: str) -> None:
    # Real threads, each with its own connection, and the real clock: only the SET NX lock keeps
    # this to one mint.
    workers = [
        CountingApns(SharedTokenCache(redis.Redis.from_url(redis_url)), "TEAM123456", "KEY1234567", p8)
        for _ in range(8)
    ]
    barrier = threading.Barrier(len(workers))
    seen: list[str] = []

    def run(w: CountingApns) -> None:
        barrier.wait()
        seen.append(w.get().value)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(seen) == 8 and len(set(seen)) == 1
    assert sum(w.mints for w in workers) == 1


def test_an_unusable_key_is_a_permanent_credential_error(redis_client: redis.Redis, clock: FakeClock) -> None:
    tokens = ApnsTokens(_cache(redis_client, clock), "TEAM123456", "KEY1234567", "not a key")
    with pytest.raises(CredentialError) as info:
        tokens.get()
    assert not info.value.transient
    assert "not a key" not in str(info.value)


def test_secrets_never_reach_the_logs(
    redis_client: redis.Redis, clock: FakeClock, p8: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = ApnsTokens(_cache(redis_client, clock), "TEAM123456", "KEY1234567", p8)
    token = tokens.get()
    clock.now += 60
    tokens.refresh(token)  # refused: logs why
    assert "minted" in caplog.text and "refusing" in caplog.text
    assert token.value not in caplog.text
    assert p8.splitlines()[1] not in caplog.text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("nope", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"project_id": "p", "client_email": "e"}', "lacks private_key, token_uri"),
    ],
)
def test_service_account_problems_are_named_without_values(text: str, words: str) -> None:
    with pytest.raises(CredentialError, match=words) as info:
        ServiceAccount.parse(text)
    assert not info.value.transient


def test_without_redis_the_held_token_is_kept_until_it_expires_then_sends_wait(
    redis_client: redis.Redis, clock: FakeClock, p8: str
) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on: connections are refused for real
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    cache = _cache(redis_client, clock)
    tokens = ApnsTokens(cache, "TEAM123456", "KEY1234567", p8)
    held = tokens.get()
    # no client-side retries: redis-py would otherwise spend ~4 s backing off per call
    cache._redis = redis.Redis(host="127.0.0.1", port=dead_port, retry=Retry(NoBackoff(), 0))
    cache._release = cache._redis.register_script("return 0")
    clock.now = T0 + APNS_REFRESH_AFTER + 60  # due for refresh, still accepted by Apple
    assert tokens.get() == held
    clock.now = T0 + 3600  # expired: no token rather than a token minted outside the shared lock
    with pytest.raises(CredentialError) as info:
        tokens.get()
    assert info.value.transient
    with pytest.raises(CredentialError):
        tokens.refresh(held)
