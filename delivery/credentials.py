"""Provider auth tokens, minted once and shared by every worker process through Redis.

- APNs provider token: an ES256 JWT (`kid` header, `iss` team id, `iat`) per (team, key). Apple rejects
  tokens older than an hour (403 ExpiredProviderToken) and answers 429 TooManyProviderTokenUpdates when
  a key's token changes more than about once per 20 minutes, across all of a sender's connections. So
  one process mints (a Redis SET NX lock), every process reuses that token until ~50 minutes, and a
  forced refresh after ExpiredProviderToken is refused while the current token is under 20 minutes old.
- FCM: an OAuth2 access token from the service account through the JWT-bearer grant (RFC 7523) to its
  `token_uri`. Built with pyjwt (RS256) plus one POST, rather than google-auth: google-auth brings
  `requests` and its own transport and retry layer, which would be a second, hidden retry policy and a
  second HTTP stack to configure (CA bundle, timeouts) for a few lines of protocol.
- HMS: an OAuth2 client-credentials access token.

Access tokens are cached until a margin before they expire. Everything here is synchronous and rare
(once per token lifetime per process): adapters call it through `asyncio.to_thread` when their local copy
is due. Time comes from an injectable clock so the timing rules are tested without sleeping.

Secrets (keys, client secrets, tokens) are never logged; log lines carry `fingerprint(...)`. Redis holds
the short-lived bearer tokens (never keys or client secrets), so it must be as private as the database.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets as _secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx
import jwt
import redis
from django.conf import settings

log = logging.getLogger(__name__)

APNS_REFRESH_AFTER = 50 * 60  # reuse a provider token this long, then mint a new one
APNS_MAX_AGE = 60 * 60  # Apple rejects older tokens
APNS_MIN_INTERVAL = 20 * 60  # never mint sooner than this after the last mint (Apple's rate rule)
ACCESS_TOKEN_MARGIN = 300  # refresh OAuth access tokens this long before they expire
OAUTH_MIN_INTERVAL = 10  # a forced refresh of an access token younger than this is refused
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
KEY_PREFIX = "pushsvc:cred:"

Clock = Callable[[], float]


class CredentialError(Exception):
    """No usable token. `transient`: the token endpoint failed (retry later) rather than refused us."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True, slots=True)
class IssuedToken:
    value: str
    issued_at: float  # epoch seconds of the mint
    refresh_at: float  # from then on, mint a new one
    expires_at: float  # unusable from then on


def fingerprint(secret: str | bytes) -> str:
    """A short, non-reversible label for a secret, for logs and cache keys."""
    raw = secret.encode() if isinstance(secret, str) else secret
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:12]


# Deletes the lock only if we still own it: a lock that expired and was taken by another process
# must not be released by the first owner finishing late.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class SharedTokenCache:
    """Tokens shared across processes through Redis, with a per-process copy in front.

    `get` returns the current token, minting under a Redis lock when none is fresh; `refresh` handles a
    provider rejecting a token: it returns a newer token if another process already minted one, mints
    one if the rejected token is at least `min_interval` old, and returns None when the rule forbids it.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        clock: Clock = time.time,
        sleep: Callable[[float], None] = time.sleep,
        lock_seconds: float = 30.0,
        wait_seconds: float = 15.0,
        poll_seconds: float = 0.05,
    ) -> None:
        self._redis = client
        self._clock = clock
        self._sleep = sleep
        self._lock_ms = int(lock_seconds * 1000)
        self._wait = wait_seconds
        self._poll = poll_seconds
        self._local: dict[str, IssuedToken] = {}
        self._release = client.register_script(_RELEASE)

    def get(self, key: str, mint: Callable[[float], IssuedToken]) -> IssuedToken:
        now = self._clock()
        local = self._local.get(key)
        if local is not None and now < local.refresh_at:
            return local
        try:
            token = self._read(key)
            if token is not None and now < token.refresh_at:
                self._local[key] = token
                return token
            return self._mint(key, mint, stale=token)
        except redis.RedisError as exc:
            # Without Redis, minting here could break the one-token-per-key rule across processes; the
            # token we hold stays good until it expires, and after that sends wait for Redis.
            if local is not None and now < local.expires_at:
                log.warning("Redis unavailable (%s); keeping %s until it expires", type(exc).__name__, key)
                return local
            raise CredentialError(
                f"Redis unavailable for {key}: {type(exc).__name__}", transient=True
            ) from None

    def refresh(
        self, key: str, mint: Callable[[float], IssuedToken], rejected: IssuedToken, *, min_interval: float
    ) -> IssuedToken | None:
        try:
            return self._refresh(key, mint, rejected, min_interval)
        except redis.RedisError as exc:
            raise CredentialError(
                f"Redis unavailable for {key}: {type(exc).__name__}", transient=True
            ) from None

    def _refresh(
        self, key: str, mint: Callable[[float], IssuedToken], rejected: IssuedToken, min_interval: float
    ) -> IssuedToken | None:
        current = self._read(key)
        if current is not None and current.value != rejected.value and self._clock() < current.expires_at:
            self._local[key] = current  # another process refreshed already
            return current
        if self._clock() - rejected.issued_at < min_interval:
            log.warning(
                "refusing to re-mint %s: the rejected token %s is only %.0f s old (minimum %.0f s)",
                key,
                fingerprint(rejected.value),
                self._clock() - rejected.issued_at,
                min_interval,
            )
            return None
        return self._mint(key, mint, stale=current or rejected, force_past=rejected.value)

    def forget_local(self) -> None:
        self._local.clear()

    def _mint(
        self,
        key: str,
        mint: Callable[[float], IssuedToken],
        *,
        stale: IssuedToken | None,
        force_past: str | None = None,
    ) -> IssuedToken:
        lock_key = key + ":lock"
        owner = _secrets.token_hex(8)
        deadline = self._clock() + self._wait
        while True:
            current = self._read(key)
            if self._usable(current, force_past):
                self._local[key] = current
                return current
            if self._redis.set(lock_key, owner, nx=True, px=self._lock_ms):
                try:
                    current = self._read(key)  # minted while we were acquiring?
                    if self._usable(current, force_past):
                        self._local[key] = current
                        return current
                    token = mint(self._clock())
                    ttl_ms = max(1, int((token.expires_at - self._clock()) * 1000))
                    self._redis.set(key, json.dumps(asdict(token)), px=ttl_ms)
                    self._local[key] = token
                    log.info("minted %s %s", key, fingerprint(token.value))
                    return token
                finally:
                    self._release(keys=[lock_key], args=[owner])
            if self._clock() >= deadline:
                if stale is not None and self._clock() < stale.expires_at and stale.value != force_past:
                    return stale  # the minter is stuck; the old token is still accepted
                raise CredentialError(f"timed out waiting for another process to mint {key}", transient=True)
            self._sleep(self._poll)

    def _usable(self, token: IssuedToken | None, force_past: str | None) -> bool:
        return token is not None and token.value != force_past and self._clock() < token.refresh_at

    def _read(self, key: str) -> IssuedToken | None:
        raw = self._redis.get(key)
        if raw is None:
            return None
        try:
            return IssuedToken(**json.loads(raw))
        except (TypeError, ValueError):
            return None


_shared: SharedTokenCache | None = None
_shared_lock = threading.Lock()


def shared_cache() -> SharedTokenCache:
    """The process-wide cache on `settings.REDIS_URL`."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = SharedTokenCache(redis.Redis.from_url(settings.REDIS_URL))
        return _shared


# --- APNs --------------------------------------------------------------------------------------------


class ApnsTokens:
    """Provider JWTs for one (team, key)."""

    def __init__(self, cache: SharedTokenCache, team_id: str, key_id: str, key_pem: str) -> None:
        self._cache = cache
        self._team_id = team_id
        self._key_id = key_id
        self._key_pem = key_pem
        # The key's fingerprint is part of the cache key: a replaced .p8 under the same key id must not
        # reuse tokens signed by the old one.
        self.key = f"{KEY_PREFIX}apns:{team_id}:{key_id}:{fingerprint(key_pem)}"

    def _mint(self, now: float) -> IssuedToken:
        iat = int(now)
        try:
            value = jwt.encode(
                {"iss": self._team_id, "iat": iat},
                self._key_pem,
                algorithm="ES256",
                headers={"kid": self._key_id},
            )
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise CredentialError(
                f"APNs key {self._key_id} ({fingerprint(self._key_pem)}) cannot sign: {type(exc).__name__}",
                transient=False,
            ) from None
        return IssuedToken(value, iat, iat + APNS_REFRESH_AFTER, iat + APNS_MAX_AGE)

    def get(self) -> IssuedToken:
        return self._cache.get(self.key, self._mint)

    def refresh(self, rejected: IssuedToken) -> IssuedToken | None:
        return self._cache.refresh(self.key, self._mint, rejected, min_interval=APNS_MIN_INTERVAL)


# --- OAuth access tokens (FCM, HMS) ------------------------------------------------------------------


def _post_token_endpoint(url: str, form: dict[str, str], what: str) -> tuple[str, float]:
    """POST a token request once (the caller's retry policy is the only one) -> (token, expires_in)."""
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=settings.PUSH_CA_BUNDLE) if settings.PUSH_CA_BUNDLE else True
    )
    try:
        with httpx.Client(verify=verify, timeout=10.0, follow_redirects=False) as client:
            resp = client.post(url, data=form, headers={"accept": "application/json"})
    except httpx.HTTPError as exc:
        raise CredentialError(
            f"{what} token endpoint unreachable: {type(exc).__name__}", transient=True
        ) from None
    if resp.status_code >= 500 or resp.status_code == 429:
        raise CredentialError(f"{what} token endpoint answered {resp.status_code}", transient=True)
    if resp.status_code != 200:
        raise CredentialError(
            f"{what} token endpoint refused the credentials: {resp.status_code} {_oauth_error(resp)}",
            transient=False,
        )
    try:
        body = resp.json()
        return str(body["access_token"]), float(body.get("expires_in", 3600))
    except (ValueError, KeyError, TypeError):
        raise CredentialError(
            f"{what} token endpoint answered without an access token", transient=True
        ) from None


def _oauth_error(resp: httpx.Response) -> str:
    """Only the standard error fields of an OAuth error body (RFC 6749 5.2), never the whole body."""
    try:
        body = resp.json()
    except ValueError:
        return "(no JSON error body)"
    if not isinstance(body, dict):
        return "(no JSON error body)"
    parts = [str(body[k])[:100] for k in ("error", "sub_error", "error_description") if k in body]
    return " ".join(parts) or "(no error fields)"


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    project_id: str
    client_email: str
    private_key: str
    private_key_id: str
    token_uri: str

    @classmethod
    def parse(cls, text: str) -> ServiceAccount:
        """Parse the service-account JSON; CredentialError names the missing field, never a value."""
        try:
            raw = json.loads(text)
        except (TypeError, ValueError):
            raise CredentialError("the FCM service account is not valid JSON", transient=False) from None
        if not isinstance(raw, dict):
            raise CredentialError("the FCM service account is not a JSON object", transient=False)
        missing = [f for f in ("project_id", "client_email", "private_key", "token_uri") if not raw.get(f)]
        if missing:
            raise CredentialError(f"the FCM service account lacks {', '.join(missing)}", transient=False)
        return cls(
            project_id=raw["project_id"],
            client_email=raw["client_email"],
            private_key=raw["private_key"],
            private_key_id=raw.get("private_key_id", ""),
            token_uri=raw["token_uri"],
        )


def _access_token(value: str, expires_in: float, now: float) -> IssuedToken:
    refresh_in = max(expires_in - ACCESS_TOKEN_MARGIN, expires_in / 2)
    return IssuedToken(value, now, now + refresh_in, now + max(expires_in - 30, refresh_in))


class FcmTokens:
    """OAuth2 access tokens for one service account (JWT-bearer grant)."""

    def __init__(self, cache: SharedTokenCache, account: ServiceAccount) -> None:
        self._cache = cache
        self._account = account
        self.key = f"{KEY_PREFIX}fcm:{account.client_email}:{fingerprint(account.private_key)}"

    def _mint(self, now: float) -> IssuedToken:
        acct = self._account
        claims = {
            "iss": acct.client_email,
            "scope": FCM_SCOPE,
            "aud": acct.token_uri,
            "iat": int(now),
            "exp": int(now) + 3600,
        }
        headers = {"kid": acct.private_key_id} if acct.private_key_id else None
        try:
            assertion = jwt.encode(claims, acct.private_key, algorithm="RS256", headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise CredentialError(
                f"the FCM service account key cannot sign: {type(exc).__name__}", transient=False
            ) from None
        value, expires_in = _post_token_endpoint(
            acct.token_uri, {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}, "FCM OAuth"
        )
        # `now` is taken before the request, so the expiry errs on the early side.
        return _access_token(value, expires_in, now)

    def get(self) -> IssuedToken:
        return self._cache.get(self.key, self._mint)

    def refresh(self, rejected: IssuedToken) -> IssuedToken | None:
        return self._cache.refresh(self.key, self._mint, rejected, min_interval=OAUTH_MIN_INTERVAL)


class HmsTokens:
    """OAuth2 client-credentials access tokens for one HMS app."""

    def __init__(self, cache: SharedTokenCache, app_id: str, client_secret: str, token_url: str) -> None:
        self._cache = cache
        self._app_id = app_id
        self._secret = client_secret
        self._url = token_url
        self.key = f"{KEY_PREFIX}hms:{app_id}:{fingerprint(client_secret)}"

    def _mint(self, now: float) -> IssuedToken:
        value, expires_in = _post_token_endpoint(
            self._url,
            {"grant_type": "client_credentials", "client_id": self._app_id, "client_secret": self._secret},
            "HMS OAuth",
        )
        return _access_token(value, expires_in, now)

    def get(self) -> IssuedToken:
        return self._cache.get(self.key, self._mint)

    def refresh(self, rejected: IssuedToken) -> IssuedToken | None:
        return self._cache.refresh(self.key, self._mint, rejected, min_interval=OAUTH_MIN_INTERVAL)
